//! Builds the eBPF object reproducibly and installs or checks the committed copy.
//!
//! The object is committed (agent/ebpf-loader/bpf/agt-jail.bpf.o) so userspace builds
//! on stable alone. Reproducibility: no debug info, one codegen unit, LTO, and every
//! machine-specific path remapped, so the bytes depend only on the sources, the
//! toolchain and bpf-linker's version.
use std::{fs, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::util::{clean_cargo_env, output, repo_root, run_checked};

pub const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
const TARGET: &str = "bpfel-unknown-none";
pub const COMMITTED_OBJECT: &str = "agent/ebpf-loader/bpf/agt-jail.bpf.o";

#[derive(clap::Args)]
pub struct Options {
    /// Do not install; fail when the committed object differs from a rebuild of the sources.
    #[arg(long)]
    check: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    ensure_toolchain()?;
    let built = build()?;
    let committed = repo_root().join(COMMITTED_OBJECT);
    let fresh = fs::read(&built).with_context(|| format!("cannot read {}", built.display()))?;
    if opts.check {
        let old =
            fs::read(&committed).with_context(|| format!("cannot read committed object {}", committed.display()))?;
        if old != fresh {
            bail!(
                "{COMMITTED_OBJECT} differs from a rebuild of ebpf/ ({} vs {} bytes): run `cargo xtask build-ebpf` and commit the object",
                old.len(),
                fresh.len()
            );
        }
        println!("build-ebpf --check: {COMMITTED_OBJECT} matches the sources ({} bytes)", fresh.len());
        return Ok(());
    }
    fs::write(&committed, &fresh).with_context(|| format!("cannot write {}", committed.display()))?;
    println!("build-ebpf: wrote {COMMITTED_OBJECT} ({} bytes)", fresh.len());
    Ok(())
}

/// Installs nightly's rust-src and bpf-linker when missing; does nothing when present.
pub fn ensure_toolchain() -> Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY]))
        .unwrap_or_default();
    if !installed.lines().any(|line| line.starts_with("rust-src")) {
        // Adding the component to an installed nightly never updates it: a newer nightly
        // would build different bytes than the committed object.
        let has_nightly = output(Command::new("rustup").args(["toolchain", "list"]))
            .is_some_and(|list| list.lines().any(|line| line.starts_with(NIGHTLY)));
        let args: &[&str] = if has_nightly {
            &["component", "add", "rust-src", "--toolchain", NIGHTLY]
        } else {
            &["toolchain", "install", NIGHTLY, "--profile", "minimal", "--component", "rust-src"]
        };
        run_checked(Command::new("rustup").args(args))?;
    }
    let linker = output(Command::new("bpf-linker").arg("--version")).unwrap_or_default();
    if !linker.contains(BPF_LINKER_VERSION) {
        install_bpf_linker()?;
    }
    Ok(())
}

/// bpf-linker against Debian's LLVM 22 (apt), or, without apt, against the nightly
/// toolchain's own libLLVM. Both give byte-identical objects.
fn install_bpf_linker() -> Result<()> {
    let llvm = PathBuf::from("/usr/lib/llvm-22");
    if !llvm.join("bin/llvm-config").exists() && crate::util::is_root() && which("apt-get") {
        let _ = Command::new("apt-get").args(["update", "-qq"]).status();
        let _ = Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends", "llvm-22-dev"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
    }
    let mut cmd = Command::new("cargo");
    clean_cargo_env(&mut cmd);
    cmd.args(["+stable", "install", "--locked", &format!("bpf-linker@{BPF_LINKER_VERSION}"), "--no-default-features"]);
    if llvm.join("bin/llvm-config").exists() {
        cmd.args(["--features", "llvm-22"]).env("LLVM_PREFIX", &llvm);
    } else {
        let sysroot = output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"]))
            .context("cannot find the nightly toolchain's sysroot")?;
        let lib = PathBuf::from(sysroot.trim()).join("lib");
        let dylib = fs::read_dir(&lib)
            .with_context(|| format!("cannot list {}", lib.display()))?
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| entry.file_name().into_string().ok())
            .find(|name| name.starts_with("libLLVM") && name.ends_with(".so"))
            .context("nightly toolchain has no libLLVM*.so and llvm-22-dev is not installed")?;
        let name = dylib.trim_start_matches("lib").trim_end_matches(".so");
        cmd.args(["--features", "llvm-22,no-llvm-linking"])
            .env("RUSTFLAGS", format!("-L {0} -l dylib={name} -C link-arg=-Wl,-rpath,{0}", lib.display()));
    }
    run_checked(&mut cmd)
}

fn which(program: &str) -> bool {
    output(Command::new("sh").args(["-c", &format!("command -v {program}")])).is_some()
}

/// Builds the eBPF crate and returns the path of the object.
pub fn build() -> Result<PathBuf> {
    let root = repo_root();
    let crate_dir = root.join("ebpf/agt-jail-ebpf");
    let target_dir = root.join("target/ebpf");
    let home = std::env::var("HOME").unwrap_or_default();
    let cargo_home = std::env::var("CARGO_HOME").unwrap_or_else(|_| format!("{home}/.cargo"));
    let sysroot =
        output(Command::new("rustc").args([&format!("+{NIGHTLY}"), "--print", "sysroot"])).unwrap_or_default();
    // \x1f separates flags in CARGO_ENCODED_RUSTFLAGS, so paths with spaces survive.
    let flags = [
        "--cfg=bpf_target_arch=\"x86_64\"".to_string(),
        // BTF for the object's own types: the verifier needs it to find the
        // bpf_spin_lock inside BTF-defined map values (rate-limit state).
        "-Cdebuginfo=2".to_string(),
        "-Clink-arg=--btf".to_string(),
        format!("--remap-path-prefix={}=/agt-jail", root.display()),
        format!("--remap-path-prefix={cargo_home}=/cargo"),
        format!("--remap-path-prefix={}=/rust", sysroot.trim()),
    ]
    .join("\x1f");
    let mut cmd = Command::new("rustup");
    clean_cargo_env(&mut cmd);
    cmd.args([
        "run",
        NIGHTLY,
        "cargo",
        "build",
        "--quiet",
        "--release",
        "--locked",
        "--target",
        TARGET,
        "-Z",
        "build-std=core",
    ])
    .current_dir(&crate_dir)
    .env("CARGO_TARGET_DIR", &target_dir)
    .env("CARGO_ENCODED_RUSTFLAGS", flags);
    run_checked(&mut cmd)?;
    Ok(target_dir.join(TARGET).join("release/agt-jail"))
}
