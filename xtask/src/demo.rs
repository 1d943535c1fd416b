//! `cargo xtask demo`: the main job, end to end, for a newcomer.
//!
//! `cargo xtask demo agt` shows why agt-jail exists: an AGT-governed agent that is
//! compromised skips AGT's in-process check, and the kernel stops it (`demo_agt.rs`).
//!
//! `cargo xtask demo` alone builds the release binary, starts a TCP service on 127.0.0.1, and runs the same
//! client twice under `agt-jail exec`: once with the destination denied (the kernel
//! refuses the connect with EPERM and the event says so), once without (it connects).
use std::{net::TcpListener, process::Command, thread};

use anyhow::{bail, Context, Result};

use crate::util::{is_root, repo_root, run_checked, target_dir};

#[derive(clap::Args)]
pub struct Options {
    #[command(subcommand)]
    which: Option<Which>,
}

#[derive(clap::Subcommand)]
enum Which {
    /// An AGT-governed agent, honest and compromised, with and without agt-jail: one table.
    Agt(crate::demo_agt::Options),
}

pub fn run(opts: &Options) -> Result<()> {
    match &opts.which {
        Some(Which::Agt(agt)) => crate::demo_agt::run(agt),
        None => connect_demo(),
    }
}

/// A jailed command whose connect is denied in the kernel, and the same command allowed.
fn connect_demo() -> Result<()> {
    if !is_root() {
        bail!("the demo creates cgroups and loads BPF programs: run it as root (sudo -E env PATH=\"$PATH\" cargo xtask demo)");
    }
    let root = repo_root();
    println!("==> building agt-jail (release, stable toolchain, embedded eBPF object)");
    run_checked(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "--quiet",
        "-p",
        "agt-jail-cli",
    ]))?;
    let binary = target_dir().join("release/agt-jail");

    let listener = TcpListener::bind("127.0.0.1:0").context("cannot start the demo service")?;
    let port = listener.local_addr().context("no local address")?.port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    let client = format!("exec 3<>/dev/tcp/127.0.0.1/{port} && echo 'client: connected to 127.0.0.1:{port}'");

    println!("\n==> a service listens on 127.0.0.1:{port}; the agent may not reach it");
    println!("$ agt-jail exec --events - --deny-connect 127.0.0.1:{port} -- bash -c '<connect to 127.0.0.1:{port}>'");
    let denied = Command::new(&binary)
        .args(["exec", "--events", "-", "--deny-connect", &format!("127.0.0.1:{port}"), "--", "bash", "-c", &client])
        .status()
        .context("cannot run agt-jail")?;
    println!("(exit status {})", denied.code().map_or_else(|| "signal".to_string(), |c| c.to_string()));

    println!("\n==> the same client without the rule");
    println!("$ agt-jail exec --events - -- bash -c '<connect to 127.0.0.1:{port}>'");
    let allowed = Command::new(&binary)
        .args(["exec", "--events", "-", "--", "bash", "-c", &client])
        .status()
        .context("cannot run agt-jail")?;
    println!("(exit status {})", allowed.code().map_or_else(|| "signal".to_string(), |c| c.to_string()));

    if denied.success() || !allowed.success() {
        bail!("demo did not behave as expected: denied run {denied}, allowed run {allowed}");
    }
    println!("\nThe denied connect failed inside the command with EPERM, decided in the kernel by the");
    println!("cgroup/connect4 program attached to the agent's cgroup before the command started.");
    Ok(())
}
