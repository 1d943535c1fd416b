//! `cargo xtask ...`: the project's developer tasks, in Rust so they run wherever cargo runs.
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod bench_enforce;
mod build_ebpf;
mod demo;
mod demo_agt;
mod install;
mod test;
mod util;
mod vm;
mod vm_matrix;
mod vm_systemd;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "agt-jail developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Rebuild the eBPF object from ebpf/ (installs nightly rust-src and bpf-linker if missing).
    BuildEbpf(build_ebpf::Options),
    /// Run the whole test suite: unit, root integration, policy tests; prints a pass/fail/skip summary.
    Test(test::Options),
    /// Show the main job (needs root): `demo agt` runs an AGT-governed agent, honest and compromised,
    /// with and without agt-jail; `demo` alone runs a jailed command whose denied connect is reported.
    Demo(demo::Options),
    /// Boot Debian kernels (5.10, 6.1, 6.12) in QEMU and run in each the tests vm-tests/matrix gives it (Tier A);
    /// `--systemd` boots a Debian userspace with systemd as PID 1 and runs the unit there.
    VmTest(vm::Options),
    /// Measure jail start-up side by side with bubblewrap (needs root); --write updates docs/benchmarks.md.
    Bench(bench::Options),
    /// Build release binaries and install them, the profiles, example policies and the systemd unit
    /// (as root); then `systemctl enable --now agt-jail`.
    Install(install::Options),
    /// Measure per-hook enforcement overhead and event-pipeline throughput (needs root); --write updates docs/benchmarks.md.
    BenchEnforce(bench_enforce::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::BuildEbpf(opts) => build_ebpf::run(&opts),
        Task::Test(opts) => test::run(&opts),
        Task::Demo(opts) => demo::run(&opts),
        Task::VmTest(opts) => vm::run(&opts),
        Task::Bench(opts) => bench::run(&opts),
        Task::BenchEnforce(opts) => bench_enforce::run(&opts),
        Task::Install(opts) => install::run(&opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}
