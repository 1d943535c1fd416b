//! The agt-jail host daemon (`agt-jail daemon`) and its control API.
//!
//! The daemon launches each agent by starting a per-agent supervisor: `agt-jail exec
//! --standalone` with the client's options, in its own session. The supervisor holds
//! what cannot be pinned (the seccomp listener, the fanotify group, pidfds) and keeps
//! enforcing while the daemon is down or restarting; the daemon records each agent in
//! `RUN_DIR/agents/<id>.json` and re-adopts them when it starts (docs/adr/0012).
//!
//! The API is length-delimited protobuf on one unix socket (`proto/agt.proto`,
//! docs/control-api.md).
pub mod auth;
pub mod client;
pub mod metrics;
pub mod record;
pub mod server;
pub mod sys;
pub mod wire;

/// The control API's messages, generated from `proto/agt.proto`.
#[allow(clippy::all, clippy::pedantic)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/agtjail.v1.rs"));
}

/// The daemon's runtime directory (its socket and the agents' records).
pub const RUN_DIR: &str = "/run/agt-jail";
/// The socket's file name in the runtime directory.
pub const SOCKET_NAME: &str = "agt.sock";
/// The group whose members may use the socket besides root.
pub const GROUP: &str = "agt-jail";
/// Names the socket a client uses instead of `RUN_DIR/agt.sock` (tests, a second daemon).
pub const SOCKET_ENV: &str = "AGT_JAIL_SOCKET";

/// The socket a client talks to: `$AGT_JAIL_SOCKET`, else `/run/agt-jail/agt.sock`.
pub fn socket_path() -> std::path::PathBuf {
    match std::env::var_os(SOCKET_ENV) {
        Some(path) if !path.is_empty() => path.into(),
        _ => std::path::Path::new(RUN_DIR).join(SOCKET_NAME),
    }
}
