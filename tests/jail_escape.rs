//! The escape battery: tests/probes/escape.py runs inside rings 2 and 3 and tries 53
//! ways out, each beside a positive control. Every attempt must fail with the errno (or
//! outcome) listed here AND its control must succeed, so a jail that blocks everything
//! (or nothing) fails this test.
#![allow(clippy::unwrap_used)]

use std::{
    collections::HashMap,
    fs,
    io::Write,
    net::TcpListener,
    os::{
        linux::net::SocketAddrExt,
        unix::{
            fs::PermissionsExt,
            net::{SocketAddr as UnixAddr, UnixListener},
        },
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
};

use agt_jail_test_support::{require, Need, RemoteHost};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_agt-jail");
const PYTHON: &str = "/usr/bin/python3";
const SECRET_ENV: &str = "agt-jail-test-secret-value-5b1e";

/// Host-side things the attempts aim at, removed on drop.
struct Fixture {
    workspace: PathBuf,
    home: PathBuf,
    sleeper: Child,
    loopback_port: u16,
    allowed_port: u16,
    abstract_name: String,
    /// Ring 2's allow-listed destination: a host beyond the agent's veth and the host's NAT.
    remote: Option<RemoteHost>,
}

fn listen(host: &str) -> u16 {
    let listener = TcpListener::bind((host, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        for stream in listener.incoming() {
            drop(stream);
        }
    });
    port
}

impl Fixture {
    fn new(ring: u8, tag: &str) -> Self {
        let id = format!("{}-r{ring}{tag}", std::process::id());
        let workspace = PathBuf::from(format!("/tmp/agt-jail-escape-{id}"));
        let _ = fs::remove_dir_all(&workspace);
        fs::create_dir_all(&workspace).unwrap();
        let probe = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/probes/escape.py");
        fs::copy(&probe, workspace.join("escape.py")).unwrap();
        // A setuid-root interpreter: running it must not give the agent any capability.
        let suid = workspace.join("suid-python");
        fs::copy(fs::canonicalize(PYTHON).unwrap(), &suid).unwrap();
        fs::set_permissions(&suid, fs::Permissions::from_mode(0o4755)).unwrap();
        // A binary outside ring 3's exec allow-list (ring 2 runs what is in its workspace).
        fs::copy("/usr/bin/true", workspace.join("true-copy")).unwrap();
        // A user's home with a key (hidden) beside an ordinary file (visible), shown
        // read-only: its copy of `true` is outside every ring's exec allow-list.
        let home = PathBuf::from(format!("/home/agt-jail-escape-{id}"));
        fs::create_dir_all(home.join(".ssh")).unwrap();
        fs::copy("/usr/bin/true", home.join("true-copy")).unwrap();
        fs::write(home.join(".ssh/id_ed25519"), "PRIVATE KEY").unwrap();
        fs::write(home.join("notes.txt"), "visible").unwrap();
        let sleeper = Command::new("sleep").arg("300").spawn().unwrap();
        let abstract_name = format!("agt-jail-escape-{id}");
        let addr = UnixAddr::from_abstract_name(abstract_name.as_bytes()).unwrap();
        let unix = UnixListener::bind_addr(&addr).unwrap();
        thread::spawn(move || {
            for stream in unix.incoming() {
                drop(stream);
            }
        });
        Self {
            workspace,
            home,
            sleeper,
            loopback_port: listen("127.0.0.1"),
            allowed_port: {
                // The allowed port also has a listener on an address that is not listed, so
                // a jail that enforced the allow-list by port alone would let it through.
                let port = listen("127.0.0.2");
                let unlisted = TcpListener::bind(("127.0.0.3", port)).unwrap();
                thread::spawn(move || {
                    for stream in unlisted.incoming() {
                        drop(stream);
                    }
                });
                port
            },
            abstract_name,
            remote: (ring == 2).then(|| RemoteHost::start(if tag.is_empty() { "esc" } else { "esc0" })),
        }
    }

    /// Ring 2's allowed destination (`host:port`), the unlisted address that listens on
    /// the same port, and that port.
    fn allowed(&self) -> Option<(String, &'static str, u16)> {
        let remote = self.remote.as_ref()?;
        Some((format!("{}:{}", RemoteHost::LISTED, remote.port), RemoteHost::UNLISTED, remote.port))
    }

    /// `entry_only`: ring 3 held by the entry-only exec plane (no Landlock), where no exec
    /// after the entry command's runs: the unlisted binary is a system one (the mount view
    /// would run it) and no --allow-exec is given.
    fn config(&mut self, ring: u8, entry_only: bool) -> PathBuf {
        let inside = if ring == 3 { "/workspace".to_string() } else { self.workspace.display().to_string() };
        let (allowed, unlisted, allowed_port) = match self.allowed() {
            Some((allowed, unlisted, port)) if ring == 2 => (Value::from(allowed), unlisted, port),
            _ => (Value::Null, "127.0.0.3", self.allowed_port),
        };
        let config = serde_json::json!({
            "workspace_inside": inside,
            "host_pid": self.sleeper.id(),
            "host_port": self.loopback_port,
            "allowed": allowed,
            "allowed_port": allowed_port,
            "unlisted_host": unlisted,
            "secret_file": self.home.join(".ssh/id_ed25519"),
            "visible_file": self.home.join("notes.txt"),
            "abstract": self.abstract_name,
            "setuid_copy": self.workspace.join("suid-python"),
            "foreign_exe": if entry_only {
                PathBuf::from("/usr/bin/true")
            } else if ring == 3 {
                self.workspace.join("true-copy")
            } else {
                self.home.join("true-copy")
            },
            "allowed_exe": "/usr/bin/true",
            "entry_only": entry_only,
        });
        let path = self.workspace.join(format!("ring{ring}.json"));
        fs::File::create(&path).unwrap().write_all(config.to_string().as_bytes()).unwrap();
        path
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.sleeper.kill();
        let _ = self.sleeper.wait();
        let _ = fs::remove_dir_all(&self.workspace);
        let _ = fs::remove_dir_all(&self.home);
    }
}

/// Expected outcome per attempt: the accepted errno names (or labels) for ring 2 and 3.
/// Where two layers can answer first (a read-only mount and Landlock, or a missing
/// route and Landlock), both names are accepted; "ok" never is.
/// `entry_only`: ring 3 without Landlock, where the setuid binary's exec is refused
/// (EACCES) before it could show its capabilities.
fn expectations(ring: u8, entry_only: bool) -> Vec<(&'static str, &'static [&'static str])> {
    let r2 = ring == 2;
    vec![
        ("read_etc_shadow", &["EACCES"]),
        ("list_root_home", &["ENOENT"]),
        ("read_ssh_key", &["EACCES", "ENOENT"]),
        ("read_runtime_dir", &["ENOENT"]),
        ("write_etc", &["EROFS", "EACCES"]),
        ("write_usr_bin", &["EROFS", "EACCES"]),
        ("mount_tmpfs", &["EPERM"]),
        ("umount_proc", &["EPERM"]),
        ("new_mount_api", &["EPERM"]),
        ("unshare_userns", &["EPERM"]),
        ("unshare_mountns", &["EPERM"]),
        ("clone_userns", &["EPERM"]),
        ("clone3", &["ENOSYS"]),
        ("ptrace_attach", &["EPERM"]),
        ("process_vm_readv", &["EPERM"]),
        ("kill_host_process", &["ESRCH"]),
        // EPERM from Landlock's signal scope (ABI 6); before it, the pid namespace's init
        // drops the SIGKILL and survives ("ignored", checked by the probe).
        ("kill_jail_init", &["EPERM", "ignored"]),
        ("read_init_environ", &["EACCES"]),
        // Both rings have a network namespace of their own: 127.0.0.1 is the agent's
        // loopback, where nothing listens; the host's is out of reach by construction.
        ("connect_host_loopback", &["ECONNREFUSED"]),
        ("connect_loopback_allowed_port", &["ECONNREFUSED"]),
        // Ring 2 allows this port (for the remote host's listed address): only the BPF
        // address rule stops the unlisted address beside it.
        ("connect_unlisted_address_allowed_port", if r2 { &["EPERM"] } else { &["ECONNREFUSED"] }),
        ("connect_metadata", if r2 { &["EPERM"] } else { &["ENETUNREACH"] }),
        ("connect_unlisted", if r2 { &["EPERM"] } else { &["ENETUNREACH"] }),
        // Ring 2: datagram sockets refused (seccomp); ring 3: no route out of its net ns.
        ("udp_egress", if r2 { &["EPERM"] } else { &["ENETUNREACH"] }),
        ("raw_socket", &["EPERM"]),
        ("packet_socket", &["EPERM"]),
        ("bpf", &["EPERM"]),
        ("io_uring_setup", &["EPERM"]),
        ("keyctl", &["EPERM"]),
        ("add_key", &["EPERM"]),
        ("perf_event_open", &["EPERM"]),
        ("userfaultfd", &["EPERM"]),
        ("fileless_execveat", &["EPERM"]),
        // EACCES: the memfd is made non-executable (vm.memfd_noexec, 6.3+); EPERM: before
        // 6.3 seccomp refuses memfd_create (Landlock does not see memfds).
        ("fileless_proc_fd", &["EACCES", "EPERM"]),
        ("setuid_gains_caps", if entry_only { &["EACCES"] } else { &["no-caps"] }),
        ("write_proc_sys", &["EROFS", "EACCES"]),
        ("drop_caches", &["EROFS", "EACCES"]),
        ("leave_cgroup", &["ENOENT"]),
        ("leave_cgroup_unified", &["ENOENT"]),
        ("open_by_handle_at", &["EPERM"]),
        ("name_to_handle_at", &["EPERM"]),
        // Abstract sockets are per network namespace: the host's name does not exist there.
        ("host_abstract_socket", &["ECONNREFUSED"]),
        ("setns_host", &["EACCES", "EPERM"]),
        ("personality", &["EPERM"]),
        ("kernel_module", &["EPERM"]),
        ("kexec_load", &["EPERM"]),
        ("set_time", &["EPERM"]),
        ("mknod_device", &["EPERM"]),
        ("pivot_root", &["EPERM"]),
        ("exec_unlisted", &["EACCES"]),
        // Write-then-exec outside the workspace: the private /tmp is writable, never executable.
        ("exec_written_tmp", &["EACCES"]),
        ("fork_bomb", &["EAGAIN"]),
        ("memory_bomb", &["oom-killed"]),
    ]
}

/// `landlock_abi`: run agt-jail as on a kernel with at most this Landlock ABI
/// (`AGT_JAIL_TEST_LANDLOCK_ABI`, honoured by debug builds only; see tests/support).
fn battery(ring: u8, landlock_abi: Option<u32>) {
    let mut fx = Fixture::new(ring, if landlock_abi.is_some() { "-abi" } else { "" });
    let no_landlock = landlock_abi == Some(0) || !kernel_has_landlock();
    // Ring 3 without Landlock: the entry-only exec plane, which takes no --allow-exec.
    let entry_only = ring == 3 && no_landlock;
    let config = fx.config(ring, entry_only);
    let mut cmd = Command::new(BIN);
    cmd.args(["exec", "--ring", &ring.to_string(), "--workspace"])
        .arg(&fx.workspace)
        .arg("--ro")
        .arg(&fx.home)
        .args(["--memory", "256M", "--pids", "64"])
        .env("AGT_JAIL_TEST_SECRET", SECRET_ENV);
    if !entry_only {
        cmd.arg("--allow-exec").arg(fx.workspace.join("suid-python"));
    }
    if let Some(abi) = landlock_abi {
        cmd.env("AGT_JAIL_TEST_LANDLOCK_ABI", abi.to_string());
    }
    if let Some((allowed, _, _)) = fx.allowed() {
        cmd.args(["--allow-connect", &allowed]);
    } else if !entry_only {
        cmd.args(["--allow-exec", "/usr/bin/true"]);
    }
    let probe = fx.workspace.join("escape.py");
    let output = cmd.arg("--").arg(PYTHON).arg(&probe).arg(&config).stdin(Stdio::null()).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "probe failed:\n{stdout}\n{stderr}");
    assert!(!stdout.contains(SECRET_ENV), "the host environment leaked into the jail: {stdout}");

    let results: HashMap<String, Value> = stdout
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("bad probe line {line:?}: {e}")))
        .map(|v| (v["name"].as_str().unwrap().to_string(), v))
        .collect();
    let mut failures = Vec::new();
    let expected = expectations(ring, entry_only);
    assert!(expected.len() >= 30);
    for (name, accepted) in &expected {
        let Some(result) = results.get(*name) else {
            failures.push(format!("{name}: no result"));
            continue;
        };
        let how = result["how"].as_str().unwrap_or("?");
        if result["blocked"] != true || !accepted.contains(&how) {
            failures.push(format!("{name}: expected one of {accepted:?}, got {how} (blocked={})", result["blocked"]));
        }
        if result["control"] != "ok" {
            failures.push(format!("{name}: positive control failed: {}", result["control"]));
        }
    }
    assert!(failures.is_empty(), "ring {ring}:\n{}\nstderr: {stderr}", failures.join("\n"));

    // The host is unaffected: the host process the agent tried to kill still runs,
    // agt-jail reported the OOM, and the fork bomb did not take the host's pids.
    assert!(fx.sleeper.try_wait().unwrap().is_none(), "the host process was killed");
    assert!(stderr.contains("the agent hit its memory limit"), "no OOM report: {stderr}");
    // The run said what holds the line where Landlock is absent (and so really ran that way).
    assert_eq!(stderr.contains("no Landlock on this kernel"), no_landlock, "{stderr}");
    assert_eq!(stderr.contains("entry-only exec plane"), entry_only, "{stderr}");
    assert!(Command::new("true").status().unwrap().success());
}

/// Ring 2's remote host has fixed addresses (RemoteHost): one ring-2 battery at a time.
static REMOTE: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn ring2_escape_battery() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let _one = REMOTE.lock().unwrap_or_else(|e| e.into_inner());
    battery(2, None);
}

/// Ring 2 as on a kernel without Landlock (5.10): the mount view alone (read-only and
/// noexec mounts) must refuse every attempt the battery makes. On such a kernel
/// (the 5.10 guest) `ring2_escape_battery` is this test without pretending.
#[test]
fn ring2_escape_battery_without_landlock() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let _one = REMOTE.lock().unwrap_or_else(|e| e.into_inner());
    battery(2, Some(0));
}

#[test]
fn ring3_escape_battery() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Ring3);
    battery(3, None);
}

/// Ring 3 as on a kernel without Landlock (5.10): the entry-only exec plane (seccomp user
/// notification) lets the entry command run and refuses every later exec, the battery's
/// included. On such a kernel `ring3_escape_battery` is this test without pretending.
#[test]
fn ring3_escape_battery_without_landlock() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Ring3);
    battery(3, Some(0));
}

/// Whether the running kernel enforces Landlock (at any ABI).
fn kernel_has_landlock() -> bool {
    agt_jail_jail::host::landlock_abi().is_some()
}

/// Ring 3 runs only its entry command. Without Landlock the entry-only exec plane holds
/// that: the entry command runs, and a later exec of a system binary (which the mount
/// view alone would let run) fails with EACCES, as a Landlock denial does.
#[test]
fn ring3_without_landlock_runs_only_its_entry_command() {
    require!(Need::Root, Need::Ring3);
    let script = "echo entry; /bin/true; echo \"true=$?\"; exec /usr/bin/env; echo \"env=$?\"";
    let output = Command::new(BIN)
        .args(["exec", "--ring", "3", "--", "/bin/sh", "-c", script])
        .env("AGT_JAIL_TEST_LANDLOCK_ABI", "0")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("entry-only exec plane"), "{stderr}");
    assert!(stdout.starts_with("entry\n"), "the entry command did not run: {stdout}\n{stderr}");
    // 126: the shell's "cannot execute" (EACCES), not 127 (not found) or a run of true.
    assert!(stdout.contains("true=126\n"), "{stdout}\n{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
    // `exec` in a non-interactive shell that fails ends the shell with 126.
    assert!(!stdout.contains("env="), "{stdout}");
    assert_eq!(output.status.code(), Some(126), "{stdout}\n{stderr}");
}

/// Where the entry-only plane holds ring 3, what would need a path check on later execs
/// (which can be raced) is refused before anything starts (125), with the reason.
#[test]
fn ring3_without_landlock_refuses_allow_exec() {
    require!(Need::Root, Need::Ring3);
    let output = Command::new(BIN)
        .args(["exec", "--ring", "3", "--allow-exec", "/usr/bin/true", "--", "/bin/true"])
        .env("AGT_JAIL_TEST_LANDLOCK_ABI", "0")
        .output()
        .unwrap();
    agt_jail_test_support::assert_one_line_error(&output, 125, "--allow-exec /usr/bin/true");
}

/// Under a policy the policy's exec plane holds ring 3 to its entry command where no
/// Landlock does: the entry command is decided by the policy like any exec (a denied one
/// never runs), and every later exec fails with EACCES without reaching the policy.
#[test]
fn ring3_without_landlock_runs_only_its_entry_command_under_a_policy() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Ring3);
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/policies/guard.yaml");
    let run = |command: &[&str]| {
        Command::new(BIN)
            .args(["exec", "--ring", "3", "--agent", "audited", "--policy"])
            .arg(&policy)
            .arg("--")
            .args(command)
            .env("AGT_JAIL_TEST_LANDLOCK_ABI", "0")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let output = run(&["/bin/sh", "-c", "echo entry; /bin/true; echo \"true=$?\""]);
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert_eq!(stdout, "entry\ntrue=126\n", "{stderr}");
    assert!(stderr.contains("denied the exec by pid"), "the later exec's denial is reported: {stderr}");
    assert_eq!(output.status.code(), Some(0), "{stderr}");

    // The policy's rule on the entry command itself still holds.
    let victim = tempfile::tempdir().unwrap();
    let output = run(&["/bin/rm", "-rf", victim.path().to_str().unwrap()]);
    assert!(victim.path().exists(), "a denied entry command must not run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no-recursive-rm") || stderr.contains("denied"), "{stderr}");
    assert_ne!(output.status.code(), Some(0), "{stderr}");
}
