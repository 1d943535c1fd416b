//! `agt-jail`: the command an operator runs. A jail that needs no BPF programs (rings
//! 1-3 without --policy, --events, --deny-connect or an allow-list) runs from here; every
//! other command line goes, unchanged, to `agt-jail-full` installed beside this file.
//!
//! The split is for start-up time: this executable links only the jail, so the dynamic
//! loader has a tenth of the relocations to apply before `main` (docs/adr/0004). The
//! flags and the run are the same code in both (`agt_jail_cli`), so a command line means
//! the same whichever executable runs it.
use std::{
    ffi::OsString,
    os::unix::process::CommandExt,
    path::PathBuf,
    process::{Command, ExitCode},
};

use agt_jail_cli::{
    args::ExecArgs,
    run::{self, Prepared, Ungoverned},
    EXIT_INTERNAL,
};
use clap::{Parser, Subcommand};

/// The full command set, installed beside `agt-jail`.
const FULL: &str = "agt-jail-full";

/// `exec` alone: what this executable can parse. Help, versions and errors are printed
/// by `agt-jail-full`, which knows every command.
#[derive(Parser)]
#[command(name = "agt-jail")]
struct Front {
    #[command(subcommand)]
    command: FrontCommand,
}

#[derive(Subcommand)]
enum FrontCommand {
    Exec(Box<ExecArgs>),
}

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    if argv.get(1).is_some_and(|word| word == "exec") {
        if let Ok(Front { command: FrontCommand::Exec(args) }) = Front::try_parse_from(&argv) {
            match Prepared::new(&args) {
                // A running daemon launches the command: `agt-jail-full` talks to it.
                _ if !args.standalone && daemon_socket().exists() => {}
                Ok(prepared) if !prepared.needs_bpf(&args) => {
                    return run::exit_status(run::execute(&args, prepared, |_| Ok(Ungoverned)));
                }
                Ok(_) => {}
                Err(err) => return run::exit_status(Err(err)),
            }
        }
    }
    hand_over(&argv)
}

/// The host daemon's socket (`AGT_JAIL_SOCKET`, else /run/agt-jail/agt.sock; the same
/// rule as `agt_jail_daemon::socket_path`, which this executable does not link).
fn daemon_socket() -> PathBuf {
    match std::env::var_os("AGT_JAIL_SOCKET") {
        Some(path) if !path.is_empty() => path.into(),
        _ => PathBuf::from("/run/agt-jail/agt.sock"),
    }
}

/// Replaces this process with `agt-jail-full` and the same arguments (and `argv[0]`,
/// so usage lines name the command the operator typed).
fn hand_over(argv: &[OsString]) -> ExitCode {
    let full = match full_path() {
        Ok(path) => path,
        Err(err) => {
            eprintln!("agt-jail: cannot find {FULL}: {err}");
            return ExitCode::from(EXIT_INTERNAL);
        }
    };
    let mut command = Command::new(&full);
    if let Some((arg0, rest)) = argv.split_first() {
        command.arg0(arg0).args(rest);
    }
    let err = command.exec();
    eprintln!("agt-jail: cannot run {}: {err} ({FULL} must be installed beside agt-jail)", full.display());
    ExitCode::from(EXIT_INTERNAL)
}

/// `agt-jail-full` in the directory of this executable (symbolic links resolved).
fn full_path() -> std::io::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().ok_or_else(|| std::io::Error::other(format!("{} has no directory", exe.display())))?;
    Ok(dir.join(FULL))
}
