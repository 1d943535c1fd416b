//! The whole test suite in one command, with one summary line at the end.
//!
//! Tests that need a kernel feature this host lacks skip with a reason; they append
//! that reason to the skip log named by `AGT_JAIL_SKIP_LOG`, so the summary can say
//! how many skipped and why instead of counting them as passes.
use std::{
    fs,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::util::{repo_root, target_dir};

#[derive(clap::Args)]
pub struct Options {
    /// Leave out the VM suite (Debian 5.10, 6.1 and 6.12 under QEMU, Tier A; each kernel
    /// runs its tests from vm-tests/matrix).
    #[arg(long)]
    no_vm: bool,
    /// Extra arguments for `cargo test` (e.g. a test name filter).
    #[arg(last = true)]
    cargo_args: Vec<String>,
}

/// Debian packages of the programs the root integration tests drive: `nft` (the NAT tables
/// of the network tests), tmux (the tty case), pip and wheel (the venv case), git, make and a
/// C compiler (the build cases).
const HOST_PACKAGES: &[&str] =
    &["nftables", "tmux", "python3-venv", "python3-pip", "python3-wheel", "git", "make", "gcc"];

#[derive(Default)]
struct Tally {
    passed: u64,
    vm_passed: u64,
    failed: u64,
}

pub fn run(opts: &Options) -> Result<()> {
    let root = repo_root();
    let skip_log = target_dir().join("test-skips.log");
    fs::create_dir_all(target_dir()).context("cannot create the target directory")?;
    let _ = fs::remove_file(&skip_log);

    // Programs the root integration tests drive (tests/real_workloads.rs, tests/jail_network.rs):
    // installed where they can be, said where they cannot (those tests then skip or fail).
    if let Err(err) = crate::util::apt_install(HOST_PACKAGES) {
        eprintln!("xtask test: {err:#}");
    }
    let mut tally = Tally::default();
    let mut failures = Vec::new();

    let mut cargo = Command::new("cargo");
    cargo
        .current_dir(&root)
        .args(["test", "--workspace", "--no-fail-fast"])
        .args(&opts.cargo_args)
        .env("AGT_JAIL_SKIP_LOG", &skip_log);
    if let Err(err) = run_counting(&mut cargo, &mut tally) {
        failures.push(format!("{err:#}"));
    }

    let agt_jail = target_dir().join("debug/agt-jail");
    let xtask = std::env::current_exe().context("cannot find the xtask binary")?;
    let checks: [(&str, Command); 3] = [
        ("example policies pass their test cases (agt-jail policy test policies)", {
            let mut cmd = Command::new(&agt_jail);
            cmd.current_dir(&root).args(["policy", "test", "policies"]);
            cmd
        }),
        ("decisions equal AGT's own evaluators (tests/differential/run.sh)", {
            let mut cmd = Command::new("bash");
            cmd.current_dir(&root).arg("tests/differential/run.sh").env("AGT_JAIL_BIN", &agt_jail);
            cmd
        }),
        ("a compromised AGT agent is stopped by agt-jail; README's table is the run's (cargo xtask demo agt --check)", {
            let mut cmd = Command::new(&xtask);
            cmd.current_dir(&root).args(["demo", "agt", "--check", "--agt-jail"]).arg(&agt_jail);
            cmd
        }),
    ];
    for (name, mut cmd) in checks {
        println!("\n==> {name}");
        match cmd.status() {
            Ok(status) if status.success() => tally.passed += 1,
            Ok(status) => {
                tally.failed += 1;
                failures.push(format!("{name}: {status}"));
            }
            Err(err) => {
                tally.failed += 1;
                failures.push(format!("{name}: cannot start: {err}"));
            }
        }
    }

    let mut skipped: Vec<String> =
        fs::read_to_string(&skip_log).map(|text| text.lines().map(str::to_owned).collect()).unwrap_or_default();
    // Host skips are counted out of cargo's passes; VM results are counted on their own.
    let host_skips = skipped.len() as u64;

    if !opts.no_vm {
        println!(
            "\n==> the suite again inside the test VM: Debian 5.10, 6.1 and 6.12 with BPF LSM (Tier A), tests per kernel from vm-tests/matrix"
        );
        match crate::vm::run_suite(&crate::vm::default_options()) {
            Ok(vm) => {
                tally.vm_passed += vm.passed;
                tally.failed += vm.failed;
                if vm.any_failure {
                    failures.push("vm-test: a kernel run failed (see its summary above)".to_string());
                    if vm.failed == 0 {
                        tally.failed += 1;
                    }
                }
                skipped.extend(vm.skipped);
            }
            Err(err) => {
                tally.failed += 1;
                failures.push(format!("vm-test: {err:#}"));
            }
        }
    }

    if !skipped.is_empty() {
        println!("\nskipped (the kernel they ran on lacks what they need):");
        for line in &skipped {
            println!("  {line}");
        }
    }
    let skipped_count = skipped.len() as u64;
    let passed = tally.passed.saturating_sub(host_skips) + tally.vm_passed;
    println!();
    for failure in &failures {
        println!("failed step: {failure}");
    }
    println!("{passed} passed, {} failed, {skipped_count} skipped", tally.failed);
    if tally.failed > 0 || !failures.is_empty() {
        bail!("test suite failed");
    }
    Ok(())
}

/// Runs `cmd`, echoing its stdout and adding up libtest's `test result:` lines.
fn run_counting(cmd: &mut Command, tally: &mut Tally) -> Result<()> {
    let shown = format!("{cmd:?}");
    let mut child = cmd.stdout(Stdio::piped()).spawn().with_context(|| format!("cannot start {shown}"))?;
    if let Some(stdout) = child.stdout.take() {
        for line in BufReader::new(stdout).lines() {
            let line = line.context("cannot read test output")?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                tally.passed += count_before(rest, " passed");
                tally.failed += count_before(rest, " failed");
            }
        }
    }
    let status = child.wait().context("cannot wait for cargo test")?;
    if !status.success() {
        bail!("{shown} exited with {status}");
    }
    Ok(())
}

/// In "ok. 3 passed; 1 failed; ..." finds the number before `label`.
fn count_before(text: &str, label: &str) -> u64 {
    text.split(';')
        .find_map(|part| {
            let part = part.trim().trim_start_matches("ok. ").trim_start_matches("FAILED. ");
            part.strip_suffix(label.trim_start()).and_then(|n| n.trim().parse().ok())
        })
        .unwrap_or(0)
}
