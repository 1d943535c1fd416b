//! The client side of the control API (blocking; the commands use it).
use std::{
    ffi::OsString,
    io::{self, Write},
    os::{
        fd::AsFd,
        unix::{ffi::OsStringExt, net::UnixStream},
    },
    path::{Path, PathBuf},
};

use crate::{
    proto::{request::Op, response::Body, Request, Response},
    sys, wire,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no agt-jail daemon answers at {path}: {source}")]
    NotRunning { path: PathBuf, source: io::Error },
    #[error("daemon at {path}: {source}")]
    Wire { path: PathBuf, source: wire::WireError },
}

/// A connection to the daemon, if one answers at `path`.
pub fn connect(path: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(path).map_err(|source| ClientError::NotRunning { path: path.to_path_buf(), source })
}

/// Sends one request and reads the first response.
pub fn call(path: &Path, op: Op) -> Result<Response, ClientError> {
    let mut stream = connect(path)?;
    let wire_err = |source| ClientError::Wire { path: path.to_path_buf(), source };
    if let Err(err) = stream.write_all(&wire::frame(&Request { op: Some(op) })) {
        return refusal(&mut stream).ok_or_else(|| wire_err(err.into()));
    }
    wire::read_blocking(&mut stream).map_err(wire_err)
}

/// The response a daemon sent before it closed a connection the client could not finish
/// writing to: a refused peer gets its refusal at once, before its request is read.
fn refusal(stream: &mut UnixStream) -> Option<Response> {
    wire::read_blocking(stream).ok()
}

/// Reads the next response of a streaming request.
pub fn next(stream: &mut UnixStream) -> Result<Response, wire::WireError> {
    wire::read_blocking(stream)
}

/// Opens a streaming request (events) and returns the connection to read from.
pub fn open(path: &Path, op: Op) -> Result<UnixStream, ClientError> {
    let mut stream = connect(path)?;
    // On a failed write the daemon's refusal, if any, is still there to read.
    let _ = stream.write_all(&wire::frame(&Request { op: Some(op) }));
    Ok(stream)
}

/// Writes one line to stderr; a closed stderr is not a reason to stop.
fn say(line: &str) {
    let _ = writeln!(io::stderr(), "agt-jail: {line}");
}

/// Signals the client forwards to the agent through the daemon (those `agt-jail exec`
/// forwards to its command).
const FORWARDED: [i32; 5] = [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1];

/// Runs `agt-jail exec ARGS` through the daemon on `stream`: this process's stdin, stdout
/// and stderr go to the agent, signals sent to it are forwarded, and its exit status is
/// the agent's (`exec`'s). Returns the status to exit with.
pub fn launch(path: &Path, mut stream: UnixStream, args: &[OsString]) -> u8 {
    let cwd = match std::env::current_dir() {
        Ok(cwd) => cwd,
        Err(err) => {
            say(&format!("cannot read the working directory: {err}"));
            return 125;
        }
    };
    let env = std::env::vars_os()
        .map(|(k, v)| {
            let mut kv = k;
            kv.push("=");
            kv.push(v);
            kv.into_vec()
        })
        .collect();
    let request = Request {
        op: Some(Op::Launch(crate::proto::Launch {
            args: args.iter().map(|a| a.clone().into_vec()).collect(),
            cwd: cwd.into_os_string().into_vec(),
            env,
        })),
    };
    // Installed before the launch: a signal that arrives meanwhile waits to be forwarded.
    let signals = signal_hook::iterator::Signals::new(FORWARDED);
    let bytes = wire::frame(&request);
    let sent = sys::send_with_fds(stream.as_fd(), &bytes, &[0, 1, 2]).and_then(|n| stream.write_all(&bytes[n..]));
    if let Err(err) = sent {
        if let Some(Response { body: Some(Body::Error(e)) }) = refusal(&mut stream) {
            say(&e.message);
            return u8::try_from(e.exit_code).unwrap_or(125);
        }
        say(&format!("cannot send the launch to the daemon at {}: {err}", path.display()));
        return 125;
    }
    let (agent, pid) = match next(&mut stream) {
        Ok(Response { body: Some(Body::Launched(l)) }) => (l.agent, l.pid),
        Ok(Response { body: Some(Body::Error(e)) }) => {
            say(&e.message);
            return u8::try_from(e.exit_code).unwrap_or(125);
        }
        Ok(other) => {
            say(&format!("unexpected answer from the daemon: {other:?}"));
            return 125;
        }
        Err(err) => {
            say(&format!("the daemon at {} did not launch the agent: {err}", path.display()));
            return 125;
        }
    };
    if let Ok(mut signals) = signals {
        let (path, agent) = (path.to_path_buf(), agent.clone());
        let _ = std::thread::Builder::new().name("signals".into()).spawn(move || {
            for signal in signals.forever() {
                let op = Op::Signal(crate::proto::Signal { agent: agent.clone(), signal });
                if let Ok(Response { body: Some(Body::Error(e)) }) = call(&path, op) {
                    say(&e.message);
                }
            }
        });
    }
    match next(&mut stream) {
        Ok(Response { body: Some(Body::Exited(e)) }) if e.known => u8::try_from(e.status).unwrap_or(125),
        Ok(Response { body: Some(Body::Exited(_)) }) => {
            say(&format!("agent {agent} ended; its exit status is unknown (the daemon restarted meanwhile)"));
            125
        }
        Ok(other) => {
            say(&format!("unexpected answer from the daemon: {other:?}"));
            125
        }
        Err(_) => {
            say(&format!(
                "the daemon went away; agent {agent} keeps running under its supervisor (pid {pid}); waiting for it \
                 to end, its exit status cannot be reported"
            ));
            if let Ok(pidfd) = sys::pidfd_open(pid) {
                let _ = sys::wait_readable(pidfd.as_fd());
            }
            125
        }
    }
}
