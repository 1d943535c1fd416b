//! The network policy plane and process tracking, through the loader API: a compiled plan
//! (address classes, port classes, verdicts, limits) installed for an agent cgroup denies
//! connect, UDP sendto and bind with EPERM before anything leaves the socket, allows its
//! allowed classes, rate-limits, reports kill verdicts, is replaced atomically, and the
//! fork/exec/exit tracepoints report the agent's processes.
//!
//! The probe runs in a child that joins the agent's cgroup and does its socket calls
//! between fork and exec (plain syscalls, async-signal-safe), then execs a shell that
//! forks once, so one child exercises both planes. Needs root, kernel BTF and cgroup v2.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    ffi::CString,
    io::{self, Read},
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4, TcpListener, UdpSocket},
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::{ffi::OsStrExt, process::CommandExt},
    },
    path::Path,
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use agt_jail_ebpf_loader::{
    AgentPrograms, Event, EventReader, NetAction, NetHook, NetLayer, NetLimitRow, NetProto, NetTables, NetVerdictRow,
    VerdictName,
};
use agt_jail_jail::{cgroup::cgroup_name, AgentCgroup, CgroupLayout};
use agt_jail_test_support::{require, Need};

const AGENT: u64 = 0x6e65_7470_6c61_6e65;

/// A TCP listener on 127.0.0.1 that counts the connections it accepts.
struct Counted {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

fn counted_listener() -> Counted {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    thread::spawn(move || {
        for stream in listener.incoming() {
            if stream.is_ok() {
                count.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    Counted { port, accepted }
}

/// Waits (bounded) until the listener accepted `want` connections; returns what it saw.
fn accepted(listener: &Counted, want: usize) -> usize {
    for _ in 0..200 {
        if listener.accepted.load(Ordering::SeqCst) >= want {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    listener.accepted.load(Ordering::SeqCst)
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Connect(Ipv4Addr, u16),
    SendTo(Ipv4Addr, u16),
    BindUdp(Ipv4Addr, u16),
}

fn sockaddr(addr: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(addr.octets()) },
        sin_zero: [0; 8],
    }
}

/// The result of one op in the child: 0 or the errno.
///
/// # Safety
/// Called between fork and exec: only async-signal-safe calls, no allocation.
unsafe fn run_op(op: Op) -> i32 {
    let (kind, addr) = match op {
        Op::Connect(a, p) => (libc::SOCK_STREAM, sockaddr(a, p)),
        Op::SendTo(a, p) | Op::BindUdp(a, p) => (libc::SOCK_DGRAM, sockaddr(a, p)),
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let ptr = (&addr as *const libc::sockaddr_in).cast::<libc::sockaddr>();
    // SAFETY: plain socket syscalls on a fresh fd and a valid sockaddr_in.
    unsafe {
        let fd = libc::socket(libc::AF_INET, kind | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return -1;
        }
        let rc = match op {
            Op::Connect(..) => libc::connect(fd, ptr, len),
            Op::SendTo(..) => {
                let sent = libc::sendto(fd, b"x".as_ptr().cast(), 1, 0, ptr, len);
                if sent < 0 {
                    -1
                } else {
                    0
                }
            }
            Op::BindUdp(..) => libc::bind(fd, ptr, len),
        };
        let result = if rc == 0 { 0 } else { *libc::__errno_location() };
        libc::close(fd);
        result
    }
}

/// Moves the calling process into the cgroup whose `cgroup.procs` path is `procs`.
/// Async-signal-safe (open, write, close), for use between fork and exec.
fn join_cgroup(procs: &CString) -> io::Result<()> {
    // SAFETY: a NUL-terminated path, a one-byte buffer, and an fd closed here.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 || libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
            return Err(io::Error::last_os_error());
        }
        libc::close(fd);
    }
    Ok(())
}

/// Runs `ops` in a child inside `cgroup` (after `unshare(CLONE_NEWNET)` when `new_netns`),
/// then execs `sh -c script` there; returns each op's errno (0 = success) and the exit code.
fn probe(cgroup: &Path, ops: &[Op], new_netns: bool, script: &str) -> (Vec<i32>, i32) {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned here.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let write_fd = write_end.as_raw_fd();
    let ops = ops.to_vec();
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", script]);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (open, write, close, unshare, socket calls) on memory
    // prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            join_cgroup(&procs)?;
            if new_netns && libc::unshare(libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            for op in &ops {
                let result = run_op(*op);
                libc::write(write_fd, (&result as *const i32).cast(), 4);
            }
            Ok(())
        });
    }
    let status = cmd.status().unwrap();
    drop(write_end);
    drop(cmd);
    let mut bytes = Vec::new();
    std::fs::File::from(read_end).read_to_end(&mut bytes).unwrap();
    let results = bytes.chunks_exact(4).map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]])).collect();
    (results, status.code().unwrap_or(-1))
}

fn row(addr_class: u32, port_class: u16, hook: NetHook, proto: NetProto, action: NetAction) -> NetVerdictRow {
    NetVerdictRow { addr_class, port_class, hook, proto, action, log: false, rule: 0xffff, limit: 0 }
}

/// Collects events until `done` holds for the collection (bounded wait).
fn collect(reader: &mut EventReader, done: impl Fn(&[Event]) -> bool) -> Vec<Event> {
    let mut events = Vec::new();
    for _ in 0..50 {
        reader.poll(Duration::from_millis(100), &mut |event| events.push(event.unwrap())).unwrap();
        if done(&events) {
            break;
        }
    }
    events
}

fn net_of(event: &Event) -> Option<(u16, VerdictName, NetLayer, bool)> {
    match event {
        Event::Connect { port, verdict, layer, plan, .. } => {
            Some((*port, *verdict, *layer, plan.is_some_and(|p| p.rate_limited)))
        }
        Event::Sendmsg { net, verdict, .. } | Event::Bind { net, verdict, .. } => {
            Some((net.port, *verdict, net.layer, net.plan.is_some_and(|p| p.rate_limited)))
        }
        _ => None,
    }
}

/// A cgroup v2 child for one test, named so that parallel tests and runs never share one.
fn test_cgroup(tag: u64) -> AgentCgroup {
    let layout = CgroupLayout::detect(Path::new("/proc/self/mountinfo")).unwrap();
    AgentCgroup::create(
        &layout.agents_parent(),
        &cgroup_name(std::process::id(), tag + u64::from(std::process::id() % 1000)),
    )
    .unwrap()
}

#[test]
fn net_plan_denies_before_effect_and_process_events_arrive() {
    require!(Need::Root, Need::Btf, Need::CgroupV2);

    let cgroup = test_cgroup(0x6e70);

    let allowed = counted_listener();
    let denied = counted_listener();
    let limited = counted_listener();
    let udp_allowed = UdpSocket::bind("127.0.0.1:0").unwrap();
    let udp_denied = UdpSocket::bind("127.0.0.1:0").unwrap();
    udp_allowed.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    udp_denied.set_nonblocking(true).unwrap();
    let udp_allowed_port = udp_allowed.local_addr().unwrap().port();
    let udp_denied_port = udp_denied.local_addr().unwrap().port();
    // A port nothing listens on, for bind.
    let bind_denied_port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let kill_addr = Ipv4Addr::new(127, 0, 0, 9);
    let local = Ipv4Addr::LOCALHOST;

    // Address classes: 0 everything, 1 loopback, 2 the "kill" host. Port classes: 0 any
    // other, 1 denied ports, 2 the limited port, 3 the denied bind port.
    let plan = NetTables {
        v4: vec![(Ipv4Addr::UNSPECIFIED, 0, 0), (Ipv4Addr::new(127, 0, 0, 0), 8, 1), (kill_addr, 32, 2)],
        v6: vec![(Ipv6Addr::UNSPECIFIED, 0, 0)],
        ports: vec![(denied.port, 1), (udp_denied_port, 1), (limited.port, 2), (bind_denied_port, 3)],
        verdicts: vec![
            row(1, 0, NetHook::Connect, NetProto::Tcp, NetAction::Allow),
            row(1, 1, NetHook::Connect, NetProto::Tcp, NetAction::Deny),
            NetVerdictRow { limit: 1, rule: 4, ..row(1, 2, NetHook::Connect, NetProto::Tcp, NetAction::Allow) },
            NetVerdictRow { rule: 5, ..row(2, 0, NetHook::Connect, NetProto::Tcp, NetAction::Kill) },
            row(1, 0, NetHook::Sendmsg, NetProto::Udp, NetAction::Allow),
            row(1, 1, NetHook::Sendmsg, NetProto::Udp, NetAction::Deny),
            row(1, 0, NetHook::Bind, NetProto::Udp, NetAction::Allow),
            row(1, 3, NetHook::Bind, NetProto::Udp, NetAction::Deny),
        ],
        limits: vec![NetLimitRow { id: 1, max: 3, period_ns: 0 }],
    };

    let mut programs = AgentPrograms::load().unwrap();
    let mut reader = programs.take_events().unwrap();
    programs.register_agent(cgroup.id(), AGENT).unwrap();
    programs.attach_cgroup(cgroup.dir()).unwrap();
    programs.install_net_plan(AGENT, &plan).unwrap();

    let ops = [
        Op::Connect(local, allowed.port),
        Op::Connect(local, denied.port),
        Op::SendTo(local, udp_allowed_port),
        Op::SendTo(local, udp_denied_port),
        Op::BindUdp(local, 0),
        Op::BindUdp(local, bind_denied_port),
        Op::Connect(kill_addr, allowed.port),
        Op::Connect(local, limited.port),
        Op::Connect(local, limited.port),
        Op::Connect(local, limited.port),
        Op::Connect(local, limited.port),
        Op::Connect(local, limited.port),
    ];
    let (results, code) = probe(cgroup.path(), &ops, false, "(exit 7); exit 3");
    assert_eq!(code, 3, "the shell ran in the agent");
    let eperm = libc::EPERM;
    assert_eq!(results, vec![0, eperm, 0, eperm, 0, eperm, eperm, 0, 0, 0, eperm, eperm], "per op: {ops:?}");
    // Deny before effect: the denied listener never saw a connection (no SYN left).
    assert_eq!(accepted(&allowed, 1), 1, "the allowed class connects");
    assert_eq!(accepted(&limited, 3), 3, "the limit allows exactly max connects");
    assert_eq!(accepted(&denied, 1), 0, "a denied connect must not reach the listener");
    let mut buf = [0u8; 8];
    assert_eq!(udp_allowed.recv(&mut buf).unwrap(), 1, "the allowed datagram arrives");
    assert_eq!(udp_denied.recv(&mut buf).unwrap_err().kind(), io::ErrorKind::WouldBlock, "no denied datagram");

    let events = collect(&mut reader, |events| {
        events.iter().filter(|e| matches!(e, Event::Exit { agent_id: AGENT, .. })).count() >= 2
            && events.iter().any(|e| matches!(e, Event::Connect { verdict: VerdictName::Kill, .. }))
    });
    let ours: Vec<&Event> = events
        .iter()
        .filter(|e| {
            matches!(
                e,
                Event::Fork { agent_id: AGENT, .. }
                    | Event::Exit { agent_id: AGENT, .. }
                    | Event::Exec { agent_id: AGENT, .. }
                    | Event::Connect { agent_id: AGENT, .. }
                    | Event::Sendmsg { agent_id: AGENT, .. }
                    | Event::Bind { agent_id: AGENT, .. }
            )
        })
        .collect();
    let net: Vec<_> = ours.iter().filter_map(|e| net_of(e)).collect();
    let has = |port: u16, verdict: VerdictName, layer: NetLayer| {
        net.iter().any(|(p, v, l, _)| *p == port && *v == verdict && *l == layer)
    };
    assert!(has(allowed.port, VerdictName::Allow, NetLayer::None), "{ours:#?}");
    assert!(has(denied.port, VerdictName::Deny, NetLayer::Plan), "{ours:#?}");
    assert!(has(udp_denied_port, VerdictName::Deny, NetLayer::Plan), "sendmsg deny event: {ours:#?}");
    assert!(has(bind_denied_port, VerdictName::Deny, NetLayer::Plan), "bind deny event: {ours:#?}");
    let rate_limited = net.iter().filter(|(p, v, _, hit)| *p == limited.port && *v == VerdictName::Deny && *hit);
    assert_eq!(rate_limited.count(), 2, "two rate-limited connects: {ours:#?}");
    let kill = ours.iter().find(|e| e.is_kill()).expect("a kill event");
    assert!(
        matches!(kill, Event::Connect { addr, plan: Some(plan), .. } if *addr == kill_addr && plan.rule == Some(5)),
        "{kill:?}"
    );

    // Process tracking: the shell's exec, its fork of the subshell, both exits.
    let exec = ours.iter().find_map(|e| match e {
        Event::Exec { tgid, ppid, comm, filename, .. } if filename == "/bin/sh" => Some((*tgid, *ppid, comm.clone())),
        _ => None,
    });
    let (shell, ppid, comm) = exec.unwrap_or_else(|| panic!("no exec event of /bin/sh: {ours:#?}"));
    assert_eq!(ppid, std::process::id(), "the shell's parent is this test");
    assert_eq!(comm, "sh");
    let child = ours
        .iter()
        .find_map(|e| match e {
            Event::Fork { parent_tgid, child_tgid, .. } if *parent_tgid == shell => Some(*child_tgid),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no fork event from the shell {shell}: {ours:#?}"));
    assert_ne!(child, shell);
    let exit_of = |pid: u32| {
        ours.iter().find_map(|e| match e {
            Event::Exit { tgid, status, .. } if *tgid == pid => Some(*status),
            _ => None,
        })
    };
    assert_eq!(exit_of(child), Some(Some(7)), "the subshell's exit: {ours:#?}");
    assert_eq!(exit_of(shell), Some(Some(3)), "the shell's exit: {ours:#?}");

    // Replacing the plan: the formerly denied port is allowed, nothing of the old plan
    // (its deny verdict) survives the switch.
    let mut open = plan.clone();
    open.verdicts[1].action = NetAction::Allow;
    programs.install_net_plan(AGENT, &open).unwrap();
    let (results, _) = probe(cgroup.path(), &[Op::Connect(local, denied.port)], false, "exit 0");
    assert_eq!(results, vec![0], "the replaced plan allows the port");
    assert_eq!(accepted(&denied, 1), 1);
    // The rate limit (same id, max and period) kept its exhausted window across the switch.
    let (results, _) = probe(cgroup.path(), &[Op::Connect(local, limited.port)], false, "exit 0");
    assert_eq!(results, vec![eperm], "the limit's window survives a replacement with the same limit");

    // Live demotion: host loopback is denied; loopback in the agent's own netns is not.
    programs.deny_all_net(AGENT).unwrap();
    let (results, _) = probe(cgroup.path(), &[Op::Connect(local, allowed.port)], false, "exit 0");
    assert_eq!(results, vec![eperm], "deny-all refuses loopback of the host's netns");
    let (results, _) = probe(cgroup.path(), &[Op::BindUdp(local, 0), Op::Connect(local, allowed.port)], true, "exit 0");
    if agt_jail_ebpf_loader::netns_cookie_readable() {
        assert_ne!(results[1], eperm, "loopback inside the agent's own netns is not refused by the plane");
    } else {
        // Before 5.14 the loader cannot tell its own namespace from the agent's: closed.
        assert_eq!(results[1], eperm, "without SO_NETNS_COOKIE deny-all refuses every loopback");
    }
    assert_eq!(results.len(), 2);

    // Removing the plan (and the demotion flag) restores plain connects.
    programs.remove_net_plan(AGENT).unwrap();
    programs.set_agent_flags(AGENT, 0).unwrap();
    let (results, _) = probe(cgroup.path(), &[Op::Connect(local, limited.port)], false, "exit 0");
    assert_eq!(results, vec![0]);
    assert_eq!(programs.dropped_events().unwrap(), 0);
    drop(programs);
    cgroup.remove().unwrap();
}

/// A plan whose one class (every address, every port) denies TCP connects.
fn deny_every_tcp_connect() -> NetTables {
    NetTables {
        v4: vec![(Ipv4Addr::UNSPECIFIED, 0, 0)],
        v6: vec![(Ipv6Addr::UNSPECIFIED, 0, 0)],
        verdicts: vec![row(0, 0, NetHook::Connect, NetProto::Tcp, NetAction::Deny)],
        ..NetTables::default()
    }
}

/// A test cgroup registered as `agent`, with the programs attached, every TCP connect denied
/// by its plan, and the reader of its records.
fn agent_denying_tcp(tag: u64, agent: u64) -> (AgentCgroup, AgentPrograms, EventReader) {
    let cgroup = test_cgroup(tag);
    let mut programs = AgentPrograms::load().unwrap();
    let reader = programs.take_events().unwrap();
    programs.register_agent(cgroup.id(), agent).unwrap();
    programs.attach_cgroup(cgroup.dir()).unwrap();
    programs.install_net_plan(agent, &deny_every_tcp_connect()).unwrap();
    (cgroup, programs, reader)
}

/// Outside the agent's cgroup nothing of the plan applies.
#[test]
fn the_plan_is_scoped_to_the_agent() {
    require!(Need::Root, Need::Btf, Need::CgroupV2);
    let cgroup = test_cgroup(0x7e70);
    let listener = counted_listener();
    let deny_all = deny_every_tcp_connect();
    let mut programs = AgentPrograms::load().unwrap();
    programs.register_agent(cgroup.id(), AGENT + 1).unwrap();
    programs.attach_cgroup(cgroup.dir()).unwrap();
    programs.install_net_plan(AGENT + 1, &deny_all).unwrap();
    let (inside, _) = probe(cgroup.path(), &[Op::Connect(Ipv4Addr::LOCALHOST, listener.port)], false, "exit 0");
    assert_eq!(inside, vec![libc::EPERM]);
    std::net::TcpStream::connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, listener.port)).unwrap();
    assert_eq!(accepted(&listener, 1), 1, "the test itself (outside the agent) connects");
    drop(programs);
    cgroup.remove().unwrap();
}

/// A deny and the exec of the process that made it come through one ring, in order: the
/// reader sees the exec first, and the deny's executable key is the exec's, so userspace
/// can name what made the deny even when the process is gone before the records are read.
#[test]
fn a_deny_is_read_after_the_exec_of_its_process_and_carries_its_executable() {
    require!(Need::Root, Need::Btf, Need::CgroupV2);
    let agent = AGENT + 3;
    let (cgroup, programs, mut reader) = agent_denying_tcp(0x0e7e, agent);
    let listener = counted_listener();
    // The shell forks a bash that connects (denied) and exits at once.
    let script = format!("bash -c 'echo > /dev/tcp/127.0.0.1/{}'; exit 0", listener.port);
    let (_, status) = probe(cgroup.path(), &[], false, &script);
    assert_eq!(status, 0);
    assert_eq!(accepted(&listener, 0), 0, "the denied connect never arrived");

    let is_our_deny =
        |e: &Event| matches!(e, Event::Connect { agent_id, verdict: VerdictName::Deny, .. } if *agent_id == agent);
    let events = collect(&mut reader, |events| events.iter().any(is_our_deny));
    let deny_at = events.iter().position(is_our_deny).unwrap_or_else(|| panic!("no deny record: {events:#?}"));
    let Event::Connect { tgid, caller, .. } = &events[deny_at] else { unreachable!() };
    let exec_at = events
        .iter()
        .position(|e| matches!(e, Event::Exec { tgid: t, filename, .. } if t == tgid && filename.ends_with("/bash")))
        .unwrap_or_else(|| panic!("no exec record of bash ({tgid}): {events:#?}"));
    assert!(exec_at < deny_at, "the exec is read before the deny it explains: {events:#?}");
    let Event::Exec { exe, .. } = &events[exec_at] else { unreachable!() };
    assert_ne!(*exe, [0; 3], "the kernel knows what the exec runs");
    assert_eq!(caller.exe, *exe, "the deny names the executable the exec started");
    assert_eq!(caller.comm, "bash");
    drop(programs);
    cgroup.remove().unwrap();
}

/// A burst of denies larger than the priority ring holds, with nobody reading: every deny is
/// still accounted for, in the ring or in the kernel's deny summary (a record with a
/// count), and none is dropped. Ring records carry the caller as the kernel saw it.
#[test]
fn denies_beyond_the_deny_ring_are_counted_not_lost() {
    require!(Need::Root, Need::Btf, Need::CgroupV2);
    let agent = AGENT + 2;
    let (cgroup, programs, mut reader) = agent_denying_tcp(0x8e70, agent);

    // The 1 MiB priority ring holds ~7,700 network records; the results (4 bytes each) must
    // fit into the pipe the child writes them to before anyone reads it.
    const DENIES: usize = 15_000;
    let port = 9;
    let ops = vec![Op::Connect(Ipv4Addr::LOCALHOST, port); DENIES];
    let (results, _) = probe(cgroup.path(), &ops, false, "exit 0");
    assert!(results.iter().all(|r| *r == libc::EPERM), "every connect denied");

    let mut events = Vec::new();
    reader.drain(&mut |event| events.push(event.unwrap()));
    let (mut accounted, mut summaries) = (0, 0);
    for event in &events {
        if let Event::Connect { agent_id, port: p, verdict: VerdictName::Deny, count, ktime_ns, caller, .. } = event {
            if *agent_id == agent && *p == port {
                accounted += count;
                if *count > 1 || *ktime_ns == 0 {
                    summaries += 1;
                } else {
                    assert_eq!((caller.uid, caller.ppid), (0, std::process::id()), "the caller: {event:?}");
                }
            }
        }
    }
    assert_eq!(accounted, DENIES as u64, "every deny in a record or a summary count");
    assert!(summaries >= 1, "the burst overflowed the priority ring into the summary");
    assert_eq!(programs.dropped_denies().unwrap(), 0);
    // Nothing new: a second drain hands out no summary again.
    let mut again = 0;
    reader.drain(&mut |_| again += 1);
    assert_eq!(again, 0);
    drop(programs);
    cgroup.remove().unwrap();
}

/// The kernel keeps each agent thread's `comm` and executable for the exec plane: set at
/// fork and exec, renamed with the task (`task_rename`), gone at its exit; tasks outside
/// agents are not in the map.
#[test]
fn the_kernel_keeps_each_agent_threads_name_and_executable() {
    require!(Need::Root, Need::Btf, Need::CgroupV2);
    let cgroup = test_cgroup(0x7a51);
    let mut programs = AgentPrograms::load().unwrap();
    programs.register_agent(cgroup.id(), AGENT + 2).unwrap();
    let facts = programs.take_task_facts().unwrap();
    assert!(facts.get(std::process::id()).is_none(), "the test process is no agent");

    let procs = CString::new(cgroup.path().join("cgroup.procs").as_os_str().as_bytes()).unwrap();
    // The shell renames itself, forks a subshell that keeps the name and the executable,
    // prints both pids and waits for its stdin to close (the subshell too, through fd 3).
    let script = "printf renamed > /proc/self/comm; exec 3<&0; ( read y <&3 ) & echo $$ $!; read x; wait";
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", script]).stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe calls (open, write, close) on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || join_cgroup(&procs));
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    io::BufRead::read_line(&mut io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let pids: Vec<u32> = line.split_whitespace().map(|p| p.parse().unwrap()).collect();
    let (shell, subshell) = (pids[0], pids[1]);

    let exe_ino = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(format!("/proc/{shell}/exe")).unwrap());
    let named = |tid: u32| facts.get(tid).map(|f| (f.comm, f.exe));
    let (comm, exe) = named(shell).expect("the shell exec'd in the agent's cgroup");
    assert_eq!(&comm[..8], b"renamed\0", "renamed after its exec");
    assert_eq!(exe.ino, exe_ino, "the executable's inode, read through the BTF offsets");
    assert_ne!((exe.mnt, exe.dentry), (0, 0));
    let (child_comm, child_exe) = named(subshell).expect("the subshell forked as the agent's");
    assert_eq!((child_comm, child_exe), (comm, exe), "a fork keeps the name and executable");

    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    // The shell waited for the subshell: both have exited.
    assert!(facts.get(shell).is_none() && facts.get(subshell).is_none(), "entries are removed at exit");
    drop(programs);
    cgroup.remove().unwrap();
}

/// A bpffs instance of the test's own (each mount is a new one), unmounted when dropped.
struct Bpffs(tempfile::TempDir);

impl Bpffs {
    fn mount() -> Bpffs {
        let dir = tempfile::tempdir().unwrap();
        let target = CString::new(dir.path().as_os_str().as_bytes()).unwrap();
        // SAFETY: mount(2) with valid NUL-terminated strings and no data.
        let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
        assert_eq!(rc, 0, "mount bpffs: {}", std::io::Error::last_os_error());
        Bpffs(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let target = CString::new(self.0.path().as_os_str().as_bytes()).unwrap();
        // SAFETY: umount2(2) of the mount made above.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Deny records (with their counts) of `agent` to `port` that `reader` hands out now.
fn denies_read(reader: &mut EventReader, agent: u64, port: u16) -> u64 {
    let mut denies = 0;
    reader.drain(&mut |event| {
        if let Ok(Event::Connect { agent_id, port: p, verdict: VerdictName::Deny, count, .. }) = event {
            if agent_id == agent && p == port {
                denies += count;
            }
        }
    });
    denies
}

/// What a reader read but did not commit stays in the pinned rings: a reader of the pins
/// in its place (another process, after a kill -9) reads it again, and nothing committed.
#[test]
fn records_read_but_not_committed_stay_for_a_reader_of_the_pinned_rings() {
    require!(Need::Root, Need::Btf, Need::CgroupV2);
    let agent = AGENT + 5;
    let bpffs = Bpffs::mount();
    let cgroup = test_cgroup(0x91e0);
    let mut programs = AgentPrograms::load().unwrap();
    programs.register_agent(cgroup.id(), agent).unwrap();
    programs.attach_cgroup(cgroup.dir()).unwrap();
    programs.install_net_plan(agent, &deny_every_tcp_connect()).unwrap();
    programs.pin_events(bpffs.0.path()).unwrap();
    let mut reader = programs.take_events().unwrap();
    reader.commit_manually();
    let port = 9;
    let denied = |n: usize| {
        let (results, _) = probe(cgroup.path(), &vec![Op::Connect(Ipv4Addr::LOCALHOST, port); n], false, "exit 0");
        assert!(results.iter().all(|r| *r == libc::EPERM), "every connect denied");
    };
    denied(100);
    assert_eq!(denies_read(&mut reader, agent, port), 100);
    reader.commit().unwrap();
    denied(40);
    assert_eq!(denies_read(&mut reader, agent, port), 40);
    // Read, not committed: the reader goes away (as a killed process does).
    drop(reader);
    let mut again = EventReader::open_pinned(bpffs.0.path()).unwrap();
    assert_eq!(denies_read(&mut again, agent, port), 40, "what was not committed is read again, nothing else");
    let mut third = EventReader::open_pinned(bpffs.0.path()).unwrap();
    assert_eq!(denies_read(&mut third, agent, port), 0, "a reader that does not defer commits as it reads");
    assert_eq!(
        agt_jail_ebpf_loader::pinned_counter(bpffs.0.path(), agt_jail_ebpf_loader::pins::DENY_DROPS).unwrap(),
        0
    );
    drop((again, third, programs));
    cgroup.remove().unwrap();
}
