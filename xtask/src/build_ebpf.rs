//! Builds the eBPF object reproducibly and installs or checks the committed copy.
//!
//! The object is committed (agent/ebpf-loader/bpf/agt-jail.bpf.o) so userspace builds
//! on stable alone. Reproducibility: one codegen unit, LTO, every machine-specific path
//! remapped, and the build always runs from one fixed directory ([`STAGE`]) holding a copy
//! of `ebpf/`, so the bytes depend only on the sources, the toolchain and bpf-linker's
//! version. The object carries BTF (the verifier needs it for spin locks in map values),
//! whose debug info names crates by a hash that covers the compiler flags; building where
//! the clone happens to live would put the clone's path into that hash.
use std::{fs, path::PathBuf, process::Command};

use anyhow::{bail, Context, Result};

use crate::util::{clean_cargo_env, output, repo_root, run_checked};

pub const NIGHTLY: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
const TARGET: &str = "bpfel-unknown-none";
pub const COMMITTED_OBJECT: &str = "agent/ebpf-loader/bpf/agt-jail.bpf.o";
/// Where the eBPF crate is built from: the same path on every machine and clone.
const STAGE: &str = "/tmp/agt-jail-ebpf-build";

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
    let root = PathBuf::from(STAGE);
    stage_sources(&repo_root().join("ebpf"), &root.join("ebpf"))?;
    let crate_dir = root.join("ebpf/agt-jail-ebpf");
    let target_dir = root.join("target");
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

/// Replaces `dst` with a copy of the eBPF sources under `src` (build output excluded),
/// beside a workspace manifest holding only `ebpf/common` (which inherits its package
/// fields and lints from the workspace).
fn stage_sources(src: &std::path::Path, dst: &std::path::Path) -> Result<()> {
    if dst.exists() {
        fs::remove_dir_all(dst).with_context(|| format!("cannot clear {}", dst.display()))?;
    }
    copy_tree(src, dst)?;
    let manifest = repo_root().join("Cargo.toml");
    let text = fs::read_to_string(&manifest).with_context(|| format!("cannot read {}", manifest.display()))?;
    let stage_manifest = dst.parent().unwrap_or(dst).join("Cargo.toml");
    fs::write(&stage_manifest, common_only_workspace(&text))
        .with_context(|| format!("cannot write {}", stage_manifest.display()))
}

/// The workspace manifest with `ebpf/common` as its only member.
fn common_only_workspace(manifest: &str) -> String {
    let mut out = String::new();
    let mut in_members = false;
    for line in manifest.lines() {
        let trimmed = line.trim_start();
        if in_members {
            in_members = !trimmed.starts_with(']');
            continue;
        }
        if trimmed.starts_with("default-members") {
            continue;
        }
        if trimmed.starts_with("members") {
            out.push_str("members = [\"ebpf/common\"]\n");
            in_members = !trimmed.contains(']');
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn copy_tree(src: &std::path::Path, dst: &std::path::Path) -> Result<()> {
    fs::create_dir_all(dst).with_context(|| format!("cannot create {}", dst.display()))?;
    for entry in fs::read_dir(src).with_context(|| format!("cannot read {}", src.display()))? {
        let entry = entry.with_context(|| format!("cannot read {}", src.display()))?;
        let name = entry.file_name();
        if name == "target" {
            continue;
        }
        let (from, to) = (entry.path(), dst.join(&name));
        if entry.file_type().with_context(|| format!("cannot stat {}", from.display()))?.is_dir() {
            copy_tree(&from, &to)?;
        } else {
            fs::copy(&from, &to).with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_staged_workspace_holds_only_the_common_crate() {
        let root = "[workspace]\nmembers = [\n    \"agent/cli\",\n    \"ebpf/common\",\n]\nexclude = [\"x\"]\ndefault-members = [\"agent/cli\"]\n\n[workspace.package]\nedition = \"2021\"\n";
        let staged = common_only_workspace(root);
        assert_eq!(
            staged,
            "[workspace]\nmembers = [\"ebpf/common\"]\nexclude = [\"x\"]\n\n[workspace.package]\nedition = \"2021\"\n"
        );
    }
}
