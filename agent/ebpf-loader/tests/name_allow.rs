//! The DNS proxy's sink against the real kernel: an address a name allowed is reachable
//! from the agent's cgroup, and denied again once the name lapsed. Root.
#![allow(clippy::unwrap_used)]
use std::{
    net::{IpAddr, TcpListener},
    path::Path,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agt_jail_dns::AllowSink;
use agt_jail_ebpf_loader::{name_allows, AgentPrograms, AllowRule};
use agt_jail_jail::{cgroup::cgroup_name, AgentCgroup, CgroupLayout};
use agt_jail_test_support::{require, Need};

/// Connects from a shell moved into `procs` (so inside the agent's cgroup) to 127.0.0.1:`port`.
fn connect_from(procs: &Path, port: u16) -> std::process::Output {
    let script = format!("echo $$ > '{}' && exec 3<>/dev/tcp/127.0.0.1/{port}", procs.display());
    Command::new("bash").args(["-c", &script]).output().unwrap()
}

#[test]
fn a_name_opens_its_address_until_it_lapses() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let layout = CgroupLayout::detect(Path::new("/proc/self/mountinfo")).unwrap();
    let cgroup = AgentCgroup::create(&layout.agents_parent(), &cgroup_name(std::process::id(), 53_053)).unwrap();
    let procs = cgroup.path().join("cgroup.procs");
    let agent_id = 53_053;
    let mut programs = AgentPrograms::load().unwrap();
    programs.register_agent(cgroup.id(), agent_id).unwrap();
    programs.enable_connect_allowlist(agent_id).unwrap();
    programs.attach_cgroup(cgroup.dir()).unwrap();
    let programs = Arc::new(Mutex::new(programs));

    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let denied = connect_from(&procs, port);
    assert!(!denied.status.success(), "allow-list mode without an entry must deny");
    assert!(String::from_utf8_lossy(&denied.stderr).contains("not permitted"), "{denied:?}");

    let loopback: IpAddr = "127.0.0.1".parse().unwrap();
    let mut allows = name_allows(Arc::clone(&programs), agent_id, &[]);
    let now = Instant::now();
    allows.allow(loopback, port, now + Duration::from_secs(60), "test.example").unwrap();
    let allowed = connect_from(&procs, port);
    assert!(allowed.status.success(), "{allowed:?}");
    assert_eq!(allows.names_of(loopback), vec!["test.example"]);

    assert_eq!(allows.expire(now + Duration::from_secs(61)).unwrap(), vec![(loopback, port)]);
    let lapsed = connect_from(&procs, port);
    assert!(!lapsed.status.success(), "the lapsed entry must be gone from the kernel map");
    assert!(allows.names_of(loopback).is_empty());

    // An entry the profile listed itself outlives a name that allowed the same destination.
    let mut pinned = name_allows(Arc::clone(&programs), agent_id, &[AllowRule::host(loopback, port)]);
    programs.lock().unwrap().allow_connect(agent_id, AllowRule::host(loopback, port)).unwrap();
    pinned.allow(loopback, port, now + Duration::from_secs(1), "test.example").unwrap();
    assert!(pinned.expire(now + Duration::from_secs(2)).unwrap().is_empty());
    assert!(connect_from(&procs, port).status.success());

    drop(programs);
    cgroup.remove().unwrap();
}
