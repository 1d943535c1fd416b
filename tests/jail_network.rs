//! The agent's own network: a jail in a network namespace of its own has a working
//! loopback (a server and its client inside the jail talk over 127.0.0.1 and ::1); in
//! allowlist mode (rings 1-2) a veth routed through the host's NAT reaches allow-listed
//! destinations only, never the host's own services (loopback, gateway, other addresses,
//! abstract unix sockets), and nothing of it is left once the agent is gone.
#![allow(clippy::unwrap_used)]

use std::{
    net::TcpListener,
    os::{linux::net::SocketAddrExt, unix::net::SocketAddr as UnixAddr, unix::net::UnixListener},
    process::{Command, Output},
    thread,
    time::Duration,
};

use agt_jail_test_support::{require, Need, RemoteHost};

const BIN: &str = env!("CARGO_BIN_EXE_agt-jail");

/// One test at a time: the agents' slots and NAT tables are shared host state, and the
/// leftover test counts on the lowest free slot being the one a killed run had.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
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
    Command::new(BIN).args(["exec", "--quiet"]).args(args).args(["--", PYTHON, "-c", script]).output().unwrap()
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
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Ring3);
    let _serial = serial();
    assert_loopback_works(&["--ring", "3"]);
}

#[test]
fn net_none_in_ring2_has_a_working_loopback() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let _serial = serial();
    assert_loopback_works(&["--ring", "2", "--net", "none"]);
}

#[test]
fn ring2_loopback_server_and_client_inside_the_jail() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let _serial = serial();
    assert_loopback_works(&["--ring", "2"]);
}

/// Connects to each `host:port` and prints `ok` or the errno name, one line each.
fn connect_probe(targets: &[String]) -> String {
    format!(
        r#"
import errno, socket
gateway = None
for line in open("/proc/net/route").read().splitlines()[1:]:
    f = line.split()
    if f[1] == "00000000":
        gateway = socket.inet_ntoa(int(f[2], 16).to_bytes(4, "little"))
for target in {targets:?}:
    host, port = target.rsplit(":", 1)
    host = gateway if host == "GATEWAY" else host
    try:
        s = socket.create_connection((host, int(port)), timeout=5)
        s.close()
        print("ok")
    except OSError as e:
        print(errno.errorcode.get(e.errno, str(e)))
"#
    )
}

fn lines(output: &Output) -> Vec<String> {
    String::from_utf8_lossy(&output.stdout).lines().map(str::to_owned).collect()
}

#[test]
fn ring2_reaches_no_host_service_through_its_namespace() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let _serial = serial();
    let loopback = TcpListener::bind("127.0.0.1:0").unwrap();
    let any = TcpListener::bind("0.0.0.0:0").unwrap();
    let (lo_port, any_port) = (loopback.local_addr().unwrap().port(), any.local_addr().unwrap().port());
    // Host loopback: the agent's 127.0.0.1 is its own (nothing listens there). The gateway
    // and the host's other addresses: denied in the kernel even on a port of the allow-list.
    let host_addr = agt_jail_jail::host::interface_addresses()
        .unwrap()
        .into_iter()
        .find(|a| a.is_ipv4() && !a.is_loopback())
        .map(|a| a.to_string());
    let mut targets = vec![format!("127.0.0.1:{lo_port}"), format!("GATEWAY:{any_port}")];
    targets.extend(host_addr.iter().map(|a| format!("{a}:{any_port}")));
    let output = jailed(
        &[
            "--ring",
            "2",
            "--allow-connect",
            &format!("0.0.0.0/0:{any_port}"),
            "--allow-connect",
            &format!("0.0.0.0/0:{lo_port}"),
        ],
        &connect_probe(&targets),
    );
    let mut expected = vec!["ECONNREFUSED", "EPERM"];
    expected.extend(host_addr.iter().map(|_| "EPERM"));
    assert_eq!(lines(&output), expected, "{targets:?}\n{}", String::from_utf8_lossy(&output.stderr));
    loopback.set_nonblocking(true).unwrap();
    any.set_nonblocking(true).unwrap();
    assert!(loopback.accept().is_err() && any.accept().is_err(), "no connection reached a host listener");
}

#[test]
fn ring2_cannot_reach_a_host_abstract_socket_without_landlock_scopes() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let _serial = serial();
    let name = format!("agt-jail-netns-test-{}", std::process::id());
    let _listener = UnixListener::bind_addr(&UnixAddr::from_abstract_name(name.as_bytes()).unwrap()).unwrap();
    // A ring-2 profile without Landlock's IPC scopes: only the namespace keeps it out.
    let dir = std::env::temp_dir().join(format!("agt-jail-netns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let profile = dir.join("ring2-unscoped.yaml");
    let ring2 = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../profiles/ring2.yaml")).unwrap();
    std::fs::write(&profile, ring2.replace("scope_ipc: true", "scope_ipc: false")).unwrap();
    let script = format!(
        "import errno, socket\ns = socket.socket(socket.AF_UNIX)\ntry:\n    s.connect('\\0{name}')\n    print('ok')\n\
         except OSError as e:\n    print(errno.errorcode.get(e.errno))\n"
    );
    let output = jailed(&["--profile", profile.to_str().unwrap()], &script);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(lines(&output), ["ECONNREFUSED"], "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn ring2_reaches_an_allow_listed_remote_host_through_nat_and_nothing_else() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let _serial = serial();
    let remote = RemoteHost::start("net");
    let port = remote.port;
    let targets = [
        format!("{}:{port}", RemoteHost::LISTED),
        format!("{}:{}", RemoteHost::LISTED, port + 1),
        format!("{}:{port}", RemoteHost::UNLISTED),
        format!("{}:{port}", RemoteHost::GATEWAY),
    ];
    // A listed range holds the host's own end of the link: the host's address stays
    // denied; the listed remote address is reached through NAT, its neighbour is not.
    let (listed, range) = (format!("{}:{port}", RemoteHost::LISTED), format!("203.0.113.0/31:{port}"));
    let output =
        jailed(&["--ring", "2", "--allow-connect", &listed, "--allow-connect", &range], &connect_probe(&targets));
    assert_eq!(lines(&output), ["ok", "EPERM", "EPERM", "EPERM"], "{}", String::from_utf8_lossy(&output.stderr));
}

/// The slot of the host end whose alias names `owner`, if one exists.
fn slot_owned_by(owner: u32) -> Option<String> {
    std::fs::read_dir("/sys/class/net").unwrap().flatten().find_map(|entry| {
        let alias = std::fs::read_to_string(entry.path().join("ifalias")).unwrap_or_default();
        (alias.trim() == format!("agt-jail owner {owner}"))
            .then(|| entry.file_name().to_string_lossy().trim_start_matches("agtj").to_string())
    })
}

/// The rules of agt-jail's shared NAT table (`nft` only looks; agt-jail itself speaks
/// netlink), or an empty list when there is no such table. On the build machines `nft` must
/// be installed (`.ci/run` installs nftables), or this check could not fail; the test VM's
/// minimal userspace has no `nft`, and there (None) only the veth side is checked.
fn nat_rules() -> Option<Vec<String>> {
    let out = match Command::new("nft").args(["list", "table", "ip", "agt-jail"]).output() {
        Ok(out) => out,
        Err(_) if agt_jail_test_support::in_vm() => return None,
        Err(err) => panic!("cannot run nft ({err}): install nftables, which this test reads the NAT table with"),
    };
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("No such file or directory"), "nft list table ip agt-jail: {err}");
        return Some(Vec::new());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Some(text.lines().map(str::trim).filter(|l| l.contains("masquerade")).map(String::from).collect())
}

/// The one rule the shared table must hold: agents' source range, from agents' veths.
fn assert_one_nat_rule(when: &str) {
    if let Some(rules) = nat_rules() {
        assert_eq!(rules, [r#"iifname "agtj*" ip saddr 10.213.0.0/16 masquerade"#], "{when}");
    }
}

fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    for _ in 0..400 {
        if done() {
            return true;
        }
        thread::sleep(Duration::from_millis(25));
    }
    done()
}

/// A ring-2 agent sleeping `seconds`, its owner (the agt-jail pid) and its slot, once its
/// veth exists.
fn sleeping_agent(seconds: &str) -> (std::process::Child, u32, String) {
    let agent =
        Command::new(BIN).args(["exec", "--quiet", "--ring", "2", "--", "/bin/sleep", seconds]).spawn().unwrap();
    let owner = agent.id();
    let mut slot = None;
    assert!(
        wait_until(|| {
            slot = slot_owned_by(owner);
            slot.is_some()
        }),
        "the agent's veth appears while it runs"
    );
    (agent, owner, slot.unwrap())
}

#[test]
fn a_run_leaves_nothing_but_the_shared_nat_table_even_after_kill_9() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let _serial = serial();
    // The shared table a removed one is made again by the next run, with its one rule.
    let _ = Command::new("nft").args(["delete", "table", "ip", "agt-jail"]).status();
    let (mut clean, _owner, slot) = sleeping_agent("1");
    assert_one_nat_rule("while an agent runs");
    assert!(clean.wait().unwrap().success());
    // The pair goes with the agent's namespace, which the kernel tears down in the background.
    let link = format!("/sys/class/net/agtj{slot}");
    assert!(wait_until(|| !std::path::Path::new(&link).exists()), "veth {link} left after a clean exit");
    assert_one_nat_rule("after a clean exit (the table stays; runs add no rules)");

    // kill -9 of agt-jail: its jail goes (and takes the pair with it), or the next run
    // sweeps a pair whose owner is gone; the next run works and reuses the slot.
    let (mut killed, owner, _slot) = sleeping_agent("30");
    killed.kill().unwrap();
    killed.wait().unwrap();
    let output = jailed(&["--ring", "2"], LOOPBACK_PROBE);
    assert_eq!(lines(&output), ["v4: ok", "v6: ok"], "{}", String::from_utf8_lossy(&output.stderr));
    assert!(wait_until(|| slot_owned_by(owner).is_none()), "the killed run's veth is never removed");
    let next = Command::new(BIN).args(["exec", "--quiet", "--ring", "2", "--", "/bin/true"]).status().unwrap();
    assert!(next.success());
    assert_one_nat_rule("after a killed run and two more");
}

#[test]
fn a_host_that_cannot_route_the_agent_out_refuses_the_run() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let _serial = serial();
    // A host route over the whole range leaves no /30 for the agent: exec refuses (125,
    // one line) instead of falling back to the host's network.
    let ip = agt_jail_test_support::which("ip");
    let route = |verb: &str| Command::new(&ip).args(["route", verb, "blackhole", "10.213.0.0/16"]).status().unwrap();
    assert!(route("add").success());
    let output = Command::new(BIN).args(["exec", "--ring", "2", "--", "/bin/true"]).output().unwrap();
    assert!(route("del").success());
    agt_jail_test_support::assert_one_line_error(&output, 125, "no free /30 in 10.213.0.0/16");
    // --net none needs no route out and still runs.
    let none = Command::new(BIN).args(["exec", "--ring", "2", "--net", "none", "--", "/bin/true"]).status().unwrap();
    assert!(none.success());
}
