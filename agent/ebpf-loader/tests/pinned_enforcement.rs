//! Enforcement that outlives its process: a child loads the programs, governs a test
//! cgroup (every TCP connect denied), pins events and enforcement into a bpffs directory
//! and is killed with SIGKILL. A connect from the cgroup is still refused with EPERM, an
//! adopting reader of the pins sees the deny, and unpinning ends the enforcement. Without
//! the pins the kernel lets go when the process dies (the control). Root, BTF, cgroup v2.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::{
    ffi::CString,
    io::{BufRead, BufReader},
    net::{Ipv4Addr, Ipv6Addr, TcpListener},
    os::unix::{ffi::OsStrExt, fs::MetadataExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use agt_jail_ebpf_loader::{
    enforcement_pins, pinned_counter, pins, AgentPrograms, Event, EventReader, NetAction, NetHook, NetProto, NetTables,
    NetVerdictRow, PinnedEnforcement, VerdictName,
};
use agt_jail_jail::{cgroup::cgroup_name, AgentCgroup, CgroupLayout};
use agt_jail_test_support::{require, Need};

const CHILD: &str = "child_governs_and_waits_to_be_killed";
const READY: &str = "AGT-JAIL-PINNED-READY";

/// A bpffs instance of the test's own, unmounted when dropped.
struct Bpffs(PathBuf);

impl Bpffs {
    fn mount(tag: &str) -> Bpffs {
        let dir = std::env::temp_dir().join(format!("agt-jail-bpffs-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = CString::new(dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: mount(2) with valid NUL-terminated strings and no data.
        let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, std::ptr::null()) };
        assert_eq!(rc, 0, "mount bpffs: {}", std::io::Error::last_os_error());
        Bpffs(dir)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let target = CString::new(self.0.as_os_str().as_bytes()).unwrap();
        // SAFETY: umount2(2) of the mount made above.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Connects from a shell moved into `procs` (so inside the agent's cgroup) to 127.0.0.1:`port`.
fn connect_from(procs: &Path, port: u16) -> std::process::Output {
    let script = format!("echo $$ > '{}' && exec 3<>/dev/tcp/127.0.0.1/{port}", procs.display());
    Command::new("bash").args(["-c", &script]).output().unwrap()
}

fn denied(output: &std::process::Output) -> bool {
    !output.status.success() && String::from_utf8_lossy(&output.stderr).contains("not permitted")
}

fn deny_every_tcp_connect() -> NetTables {
    NetTables {
        v4: vec![(Ipv4Addr::UNSPECIFIED, 0, 0)],
        v6: vec![(Ipv6Addr::UNSPECIFIED, 0, 0)],
        verdicts: vec![NetVerdictRow {
            addr_class: 0,
            port_class: 0,
            hook: NetHook::Connect,
            proto: NetProto::Tcp,
            action: NetAction::Deny,
            log: false,
            rule: 0,
            limit: 0,
        }],
        ..NetTables::default()
    }
}

/// Runs [`child_governs_and_waits_to_be_killed`] in a child process and waits until it
/// governs `cgroup`; the caller kills it.
fn spawn_governing_child(cgroup: &Path, bpffs: &Path, agent: u64, pin: bool) -> std::process::Child {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", CHILD, "--ignored", "--nocapture", "--test-threads=1"])
        .env("AGT_JAIL_TEST_CGROUP", cgroup)
        .env("AGT_JAIL_TEST_BPFFS", bpffs)
        .env("AGT_JAIL_TEST_AGENT", agent.to_string())
        .env("AGT_JAIL_TEST_PIN", if pin { "1" } else { "0" })
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = BufReader::new(stdout).lines().map_while(Result::ok).any(|line| line.contains(READY));
    assert!(ready, "the child never governed the cgroup: {:?}", child.wait());
    child
}

/// The governing side, run only as the child of the tests below.
#[test]
#[ignore = "helper: run in a child process by pinned_enforcement_survives_kill_9_until_unpinned and without_pins_enforcement_ends_with_its_process"]
fn child_governs_and_waits_to_be_killed() {
    let var = |name: &str| std::env::var(name).expect(name);
    let cgroup = PathBuf::from(var("AGT_JAIL_TEST_CGROUP"));
    let bpffs = PathBuf::from(var("AGT_JAIL_TEST_BPFFS"));
    let agent: u64 = var("AGT_JAIL_TEST_AGENT").parse().unwrap();
    let dir = std::fs::File::open(&cgroup).unwrap();
    let mut programs = AgentPrograms::load().unwrap();
    programs.register_agent(dir.metadata().unwrap().ino(), agent).unwrap();
    programs.install_net_plan(agent, &deny_every_tcp_connect()).unwrap();
    programs.attach_cgroup(&dir).unwrap();
    if var("AGT_JAIL_TEST_PIN") == "1" {
        programs.pin_events(&bpffs).unwrap();
        programs.pin_enforcement(&bpffs).unwrap();
    }
    println!("{READY}");
    // Held until the parent kills us; bounded so that a lost parent leaves no process.
    std::thread::sleep(Duration::from_secs(120));
    std::process::exit(1);
}

fn test_cgroup(tag: u64) -> AgentCgroup {
    let layout = CgroupLayout::detect(Path::new("/proc/self/mountinfo")).unwrap();
    AgentCgroup::create(&layout.agents_parent(), &cgroup_name(std::process::id(), tag)).unwrap()
}

#[test]
fn pinned_enforcement_survives_kill_9_until_unpinned() {
    require!(Need::Root, Need::Btf, Need::CgroupV2);
    let agent = 0x7069_6e6e_6564;
    let bpffs = Bpffs::mount("survive");
    let cgroup = test_cgroup(0x91e1);
    let procs = cgroup.path().join("cgroup.procs");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();

    let mut child = spawn_governing_child(cgroup.path(), &bpffs.0, agent, true);
    assert!(denied(&connect_from(&procs, port)), "governed while the child lives");
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(libc::SIGKILL));

    let after = connect_from(&procs, port);
    assert!(denied(&after), "still EPERM after the owner died by SIGKILL: {after:?}");

    // Adopt: the links and maps are there, and the rings hold both denies.
    let adopted = PinnedEnforcement::open(&bpffs.0).unwrap();
    assert_eq!(adopted.links(), 6, "connect, sendmsg and bind, IPv4 and IPv6");
    assert_ne!(adopted.agent_flags(agent).unwrap(), 0, "the plan layer's flag is in the pinned map");
    let mut reader = EventReader::open_pinned(&bpffs.0).unwrap();
    let mut denies = 0;
    reader.drain(&mut |event| {
        if let Ok(Event::Connect { agent_id, port: p, verdict: VerdictName::Deny, count, .. }) = event {
            if agent_id == agent && p == port {
                denies += count;
            }
        }
    });
    assert_eq!(denies, 2, "the deny before and the deny after the kill");
    assert_eq!(pinned_counter(&bpffs.0, pins::DENY_DROPS).unwrap(), 0);
    drop(reader);

    adopted.unpin().unwrap();
    for (_, pin) in enforcement_pins::MAPS {
        assert!(!bpffs.0.join(pin).exists(), "{pin} unpinned");
    }
    let freed = connect_from(&procs, port);
    assert!(freed.status.success(), "unpinning ends the enforcement: {freed:?}");
    assert!(PinnedEnforcement::open(&bpffs.0).is_err(), "nothing left to adopt");
    cgroup.remove().unwrap();
}

/// The control: without pins the programs go with their process.
#[test]
fn without_pins_enforcement_ends_with_its_process() {
    require!(Need::Root, Need::Btf, Need::CgroupV2);
    let bpffs = Bpffs::mount("control");
    let cgroup = test_cgroup(0x91e2);
    let procs = cgroup.path().join("cgroup.procs");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();

    let mut child = spawn_governing_child(cgroup.path(), &bpffs.0, 0x636f_6e74, false);
    assert!(denied(&connect_from(&procs, port)), "governed while the child lives");
    child.kill().unwrap();
    child.wait().unwrap();
    let after = connect_from(&procs, port);
    assert!(after.status.success(), "{after:?}");
    cgroup.remove().unwrap();
}

/// A link whose pin fails stays attached while its owner lives (fail closed), and the pins
/// made before the failure can be adopted and removed.
#[test]
fn a_failed_link_pin_leaves_the_cgroup_governed() {
    require!(Need::Root, Need::Btf, Need::CgroupV2);
    let agent = 0x6661_696c;
    let bpffs = Bpffs::mount("fail");
    let cgroup = test_cgroup(0x91e3);
    let procs = cgroup.path().join("cgroup.procs");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut programs = AgentPrograms::load().unwrap();
    programs.register_agent(cgroup.id(), agent).unwrap();
    programs.install_net_plan(agent, &deny_every_tcp_connect()).unwrap();
    programs.attach_cgroup(cgroup.dir()).unwrap();
    // Something already sits where connect4's link would be pinned.
    let taken = bpffs.0.join(format!("{}{}-connect4", enforcement_pins::LINK_PREFIX, cgroup.id()));
    std::fs::create_dir(&taken).unwrap();
    let err = programs.pin_enforcement(&bpffs.0).unwrap_err().to_string();
    assert!(err.contains("connect4"), "{err}");
    assert!(denied(&connect_from(&procs, port)), "the link whose pin failed is still attached");
    std::fs::remove_dir(&taken).unwrap();
    let adopted = PinnedEnforcement::open(&bpffs.0).unwrap();
    assert_eq!(adopted.links(), 5, "the pins made before the failure");
    adopted.unpin().unwrap();
    assert!(denied(&connect_from(&procs, port)), "still held by the live owner");
    drop(programs);
    let freed = connect_from(&procs, port);
    assert!(freed.status.success(), "{freed:?}");
    cgroup.remove().unwrap();
}
