//! The agent's own network: a jail in a network namespace of its own has a working
//! loopback (a server and its client inside the jail talk over 127.0.0.1 and ::1).
#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};

use agt_jail_test_support::{require, Need};

const BIN: &str = env!("CARGO_BIN_EXE_agt-jail");
const PYTHON: &str = "/usr/bin/python3";

/// A TCP server and its client inside one process, over the jail's own loopback: prints
/// one `family: ok` or `family: ERRNAME` line per address.
const LOOPBACK_PROBE: &str = r#"
import errno, socket
for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
    name = "v4" if family == socket.AF_INET else "v6"
    try:
        server = socket.socket(family)
        server.bind((addr, 0))
        server.listen(1)
        client = socket.socket(family)
        client.connect(server.getsockname()[:2])
        peer, _ = server.accept()
        client.sendall(b"ping")
        print(f"{name}: {'ok' if peer.recv(4) == b'ping' else 'bad data'}")
    except OSError as e:
        print(f"{name}: {errno.errorcode.get(e.errno, e.errno)}")
"#;

fn jailed(args: &[&str], script: &str) -> Output {
    Command::new(BIN)
        .args(["exec", "--quiet"])
        .args(args)
        .args(["--allow-exec", PYTHON, "--", PYTHON, "-c", script])
        .output()
        .unwrap()
}

fn assert_loopback_works(args: &[&str]) {
    let output = jailed(args, LOOPBACK_PROBE);
    let out = String::from_utf8_lossy(&output.stdout);
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{args:?}: {:?}\n{out}{err}", output.status);
    assert_eq!(out.lines().collect::<Vec<_>>(), ["v4: ok", "v6: ok"], "{args:?}\n{err}");
}

#[test]
fn ring3_loopback_server_and_client_inside_the_jail() {
    require!(Need::Root);
    assert_loopback_works(&["--ring", "3"]);
}

#[test]
fn net_none_in_ring2_has_a_working_loopback() {
    require!(Need::Root);
    assert_loopback_works(&["--ring", "2", "--net", "none"]);
}
