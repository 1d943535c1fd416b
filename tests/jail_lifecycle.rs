//! Jailed commands behave like commands: exit codes, signals (SIGTERM reaches the
//! jailed process group, SIGKILL after the grace period), stdin/stdout, --tty, the
//! unprivileged path, and clean one-line failures (125) that leave nothing behind.
#![allow(clippy::unwrap_used)]

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::PathBuf,
    process::{Child, ChildStdout, Command, Output, Stdio},
};

use agt_jail_test_support::{assert_one_line_error, require, Need};

const BIN: &str = env!("CARGO_BIN_EXE_agt-jail");
const FULL: &str = env!("CARGO_BIN_EXE_agt-jail-full");

fn agt_jail() -> Command {
    Command::new(BIN)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(format!("/tmp/agt-jail-life-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Agent cgroups (v2 and v1) named after an agt-jail process.
fn cgroups_of(owner: u32) -> Vec<PathBuf> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let layout = agt_jail_jail::CgroupLayout::parse(&mountinfo).unwrap();
    let name = agt_jail_jail::cgroup::cgroup_name(owner, 0);
    let mut dirs = vec![layout.agents_parent().join(&name)];
    dirs.extend(layout.v1.iter().map(|(_, root)| root.join("agt-jail").join(&name)));
    dirs.into_iter().filter(|d| d.exists()).collect()
}

/// Those of `rings` this kernel runs: ring 3 needs Landlock or seccomp user notification
/// (the entry-only exec plane), and where the kernel has neither the ring-3 half of a test
/// is skipped with that reason (a failure in the VM, whose kernels all have it).
fn rings_here<'a>(rings: &[&'a str]) -> Vec<&'a str> {
    let name = format!("{} (ring 3)", agt_jail_test_support::current_test_name("?"));
    rings.iter().copied().filter(|ring| *ring != "3" || agt_jail_test_support::require(&name, &[Need::Ring3])).collect()
}

#[test]
fn exit_codes_and_signals_are_propagated_from_rings_2_and_3() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    for ring in rings_here(&["2", "3"]) {
        let status = agt_jail().args(["exec", "--ring", ring, "--", "/bin/sh", "-c", "exit 42"]).status().unwrap();
        assert_eq!(status.code(), Some(42), "ring {ring}");
        let status =
            agt_jail().args(["exec", "--ring", ring, "--", "/bin/sh", "-c", "kill -TERM $$"]).status().unwrap();
        assert_eq!(status.code(), Some(128 + 15), "ring {ring}");
        let status = agt_jail().args(["exec", "--ring", ring, "--", "/bin/true"]).status().unwrap();
        assert_eq!(status.code(), Some(0), "ring {ring}");
    }
}

#[test]
fn an_agent_never_inherits_real_time_scheduling() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock, Need::Ring3);
    // agt-jail itself runs SCHED_FIFO; ring 3's default limits include a v1 cpu cgroup
    // on hybrid hosts, which a real-time task could not even join.
    let script = "read -r stat < /proc/self/stat; echo \"$stat\"";
    let mut command = agt_jail();
    command.args(["exec", "--ring", "3", "--", "/bin/sh", "-c", script]);
    // SAFETY: between fork and exec only sched_setscheduler(2) runs, which is
    // async-signal-safe and touches nothing but its own argument.
    unsafe {
        command.pre_exec(|| {
            let param = libc::sched_param { sched_priority: 10 };
            if libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let stat = stdout(&output);
    let (_, after_comm) = stat.rsplit_once(") ").unwrap();
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // Fields 40 (rt_priority) and 41 (policy) of proc_pid_stat(5); field 3 is fields[0].
    assert_eq!((fields[37], fields[38]), ("0", "0"), "the agent runs SCHED_OTHER: {stat}");
}

#[test]
fn stdin_and_stdout_are_piped() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock, Need::Ring3);
    let mut child = agt_jail()
        .args(["exec", "--ring", "3", "--", "/bin/cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"through the jail\n").unwrap();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(stdout(&output), "through the jail\n");
}

#[test]
fn environment_is_scrubbed_and_env_adds() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock, Need::Ring3);
    let output = agt_jail()
        .args([
            "exec",
            "--ring",
            "3",
            "--env",
            "GREETING=hi",
            "--",
            "/bin/sh",
            "-c",
            "echo \"$GREETING|$HOST_SECRET|$HOME\"",
        ])
        .env("HOST_SECRET", "leak")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_eq!(stdout(&output), "hi||/workspace\n");
}

/// Starts `agt-jail exec OPTIONS -- /bin/sh -c SCRIPT` (stdin and stdout piped) and
/// returns once the script has printed its first line, which must be `ready`.
fn start_until_ready(options: &[&str], script: &str) -> (Child, BufReader<ChildStdout>) {
    let mut child = agt_jail()
        .arg("exec")
        .args(options)
        .args(["--", "/bin/sh", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    (child, out)
}

#[test]
fn sigterm_reaches_the_jailed_process_group() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    // The shell traps TERM and exits 7: the signal went through agt-jail and the
    // jail's init to the agent's group.
    let script = "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done";
    let (mut child, mut out) = start_until_ready(&["--ring", "2", "--workspace", "/tmp"], script);
    let owner = child.id();
    agt_jail_jail::host::kill(owner as i32, libc::SIGTERM).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(7));
    assert!(rest.contains("got-term"), "{rest}");
    assert!(cgroups_of(owner).is_empty(), "cgroups left: {:?}", cgroups_of(owner));
}

#[test]
fn sigkill_follows_after_the_grace_period() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let script = "trap '' TERM; echo ready; while :; do sleep 0.05; done";
    let (mut child, _out) = start_until_ready(&["--ring", "2", "--grace", "1", "--workspace", "/tmp"], script);
    let owner = child.id();
    agt_jail_jail::host::kill(owner as i32, libc::SIGTERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(128 + 9));
    assert!(cgroups_of(owner).is_empty(), "cgroups left: {:?}", cgroups_of(owner));
}

#[test]
fn tty_gives_the_agent_a_terminal() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let script = "import os,sys; print('tty', os.isatty(0), os.isatty(1), os.ttyname(0)); print('line', sys.stdin.readline().strip())";
    let mut child = agt_jail()
        .args(["exec", "--ring", "2", "--tty", "--workspace", "/tmp", "--", "/usr/bin/python3", "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"typed\n").unwrap();
    let output = child.wait_with_output().unwrap();
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text} {}", stderr(&output));
    assert!(text.contains("tty True True /dev/console"), "{text}");
    assert!(text.contains("line typed"), "{text}");
    // Without --tty the same command sees pipes.
    let output = agt_jail()
        .args([
            "exec",
            "--ring",
            "2",
            "--workspace",
            "/tmp",
            "--",
            "/usr/bin/python3",
            "-c",
            "import os; print(os.isatty(1))",
        ])
        .output()
        .unwrap();
    assert_eq!(stdout(&output), "False\n");
}

#[test]
fn limits_hold_pids_and_memory() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock, Need::Ring3);
    // 20 sleepers under --pids 8: some forks fail with EAGAIN.
    let script = "import os\nn=0\ntry:\n  for _ in range(20):\n    if os.fork()==0:\n      import time; time.sleep(5); os._exit(0)\n    n+=1\nexcept OSError as e:\n  print('stopped', n, e.errno)";
    let output = agt_jail()
        .args(["exec", "--ring", "3", "--pids", "8", "--", "/usr/bin/python3", "-c", script])
        .output()
        .unwrap();
    let text = stdout(&output);
    assert!(text.starts_with("stopped "), "{text} {}", stderr(&output));
    assert!(text.trim().ends_with(&format!(" {}", libc::EAGAIN)), "{text}");
    // A memory hog under --memory 64M is killed and reported.
    let output = agt_jail()
        .args([
            "exec",
            "--ring",
            "3",
            "--memory",
            "64M",
            "--",
            "/usr/bin/python3",
            "-c",
            "x=bytearray(512<<20); print('survived')",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(128 + 9), "{}", stderr(&output));
    assert!(!stdout(&output).contains("survived"));
    assert!(stderr(&output).contains("the agent hit its memory limit"), "{}", stderr(&output));
}

#[test]
fn ring0_without_flags_is_record_mode() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    // Not confined: sees the host's /root and keeps the environment.
    let output = agt_jail()
        .args(["exec", "--", "/bin/sh", "-c", "test -d /root && echo \"$KEEP\" && cat /proc/self/cgroup"])
        .env("KEEP", "kept")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    assert!(text.starts_with("kept\n"), "{text}");
    assert!(text.contains("agt-jail/"), "not in its own cgroup: {text}");
}

/// The executable behind a running agt-jail (after any hand-over to `agt-jail-full`).
fn executable_of(child: &Child) -> String {
    let exe = fs::read_link(format!("/proc/{}/exe", child.id())).unwrap();
    exe.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn jails_without_bpf_run_in_agt_jail_and_the_rest_in_agt_jail_full() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock, Need::Ring3);
    let script = "echo ready; read line";
    let cases: [(&[&str], &str); 4] = [
        (&["--ring", "3"], "agt-jail"),
        (&["--ring", "2", "--net", "none", "--workspace", "/tmp"], "agt-jail"),
        (&["--ring", "3", "--deny-connect", "127.0.0.1:9"], "agt-jail-full"),
        (&[], "agt-jail-full"),
    ];
    for (options, expected) in cases {
        let (mut child, _out) = start_until_ready(options, script);
        let running = executable_of(&child);
        child.stdin.take().unwrap().write_all(b"done\n").unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(0), "{options:?}");
        assert_eq!(running, expected, "{options:?}");
    }
}

#[test]
fn without_agt_jail_full_beside_it_agt_jail_still_runs_jails_and_says_what_is_missing() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock, Need::Ring3);
    let dir = scratch("alone");
    let bin = dir.join("agt-jail");
    fs::copy(BIN, &bin).unwrap();
    let output = Command::new(&bin).args(["exec", "--ring", "3", "--", "/bin/true"]).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    for args in [&["doctor"][..], &["exec", "--ring", "3", "--deny-connect", "127.0.0.1:9", "--", "/bin/true"]] {
        let output = Command::new(&bin).args(args).output().unwrap();
        assert_one_line_error(&output, 125, "agt-jail-full must be installed beside agt-jail");
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn unprivileged_ring3_runs_in_a_user_namespace() {
    require!(Need::Root, Need::UserNamespaces, Need::Ring3);
    // The test runs as root; drop to nobody for the launch. The build directory may not
    // be reachable for nobody, so run a world-readable copy of the binary.
    let dir = scratch("rootless");
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    let bin = dir.join("agt-jail");
    for (from, to) in [(BIN, bin.clone()), (FULL, dir.join("agt-jail-full"))] {
        fs::copy(from, &to).unwrap();
        fs::set_permissions(&to, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let output = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&bin)
        .args(["exec", "--ring", "3", "--", "/bin/sh", "-c", "echo inside; read map < /proc/self/uid_map; echo $map"])
        .current_dir("/tmp")
        .output()
        .unwrap();
    let err = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{err}");
    let text = stdout(&output);
    assert!(text.starts_with("inside\n"), "{text}");
    assert!(text.contains("65534"), "uid 0 inside should map to nobody: {text}");
    assert!(
        err.contains("limits (memory, pids, cpu) are not enforced") || err.contains("limits are not enforced"),
        "{err}"
    );
    // Without root, only --net none is possible.
    let output = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(&bin)
        .args(["exec", "--ring", "2", "--", "/bin/true"])
        .current_dir("/tmp")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(125));
    assert!(stderr(&output).contains("only --net none"), "{}", stderr(&output));
    // A limit asked for cannot be held without a cgroup: refused, not dropped.
    for limit in ["--memory=64M", "--pids=10", "--cpu=1"] {
        let output = Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(&bin)
            .args(["exec", "--ring", "3", limit, "--", "/bin/true"])
            .current_dir("/tmp")
            .output()
            .unwrap();
        assert_one_line_error(&output, 125, "needs root: limits are held by cgroups");
    }
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn bad_profiles_are_located_one_line_errors() {
    let dir = scratch("profiles");
    let cases = [
        ("ring: 2\nnetwork:\n  mode: wide\n", ":3:9: network.mode 'wide' is not one of none, allowlist, host"),
        ("ring: 2\nbogus: true\n", ":2:1: unknown key 'bogus'"),
        ("ring: 2\ncapabilities: [CAP_SYS_ADMIN]\n", ":2:16: rings 1-3 keep no capabilities"),
        ("ring: 3\nseccomp:\n  allow: [ptrace]\n", ":3:11: syscall 'ptrace' can never be allowed"),
        ("ring: [\n", ".yaml:"),
        ("\u{0}\u{1}", ".yaml:"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.join(format!("bad{i}.yaml"));
        fs::write(&path, text).unwrap();
        let output = agt_jail().arg("exec").arg("--profile").arg(&path).args(["--", "/bin/true"]).output().unwrap();
        assert_one_line_error(&output, 125, needle);
        assert!(stderr(&output).contains(&path.display().to_string()), "{}", stderr(&output));
    }
    let output = agt_jail().args(["exec", "--profile", "/nonexistent/p.yaml", "--", "/bin/true"]).output().unwrap();
    assert_one_line_error(&output, 125, "cannot read profile");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn bad_flags_are_one_line_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["--ring", "4"], "--ring"),
        (&["--ring", "2", "--net", "wide"], "--net"),
        (&["--ring", "2", "--memory", "lots"], "'lots' is not a size"),
        (&["--ring", "2", "--pids", "1"], "at least 2"),
        (&["--ring", "2", "--cpu=-3"], "--cpu"),
        (&["--ring", "2", "--allow-connect", "10.0.0.300:443"], "not an IP address"),
        (&["--ring", "2", "--allow-connect", "*:443"], "would allow every name"),
        (&["--ring", "2", "--allow-connect", "exa_mple..com:443"], "label ''"),
        (&["--ring", "3", "--allow-connect", "10.0.0.1:443"], "ring 3 has no network"),
        (&["--ring", "3", "--allow-connect", "example.com:443"], "ring 3 has no network"),
        (&["--env", "NOEQUALS"], "is not KEY=VAL"),
        (&["--tty"], "needs a confined ring"),
        (&["--ring", "2", "--rw", "/nonexistent/agt-jail"], "cannot use /nonexistent/agt-jail"),
        (&["--ring", "2", "--workspace", "/"], "overlaps the system paths"),
    ];
    for (flags, needle) in cases {
        let output = agt_jail().arg("exec").args(*flags).args(["--", "/bin/true"]).output().unwrap();
        assert_one_line_error(&output, 125, needle);
    }
}

#[test]
fn failures_after_setup_began_leave_nothing_behind() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let dir = scratch("leftovers");
    // Executable on the host, but its interpreter does not exist: exec fails inside
    // the jail after the cgroup, BPF programs and namespaces were set up.
    let script = dir.join("broken");
    fs::write(&script, "#!/nonexistent/interpreter\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let mounts_before = fs::read_to_string("/proc/self/mountinfo").unwrap().lines().count();
    for ring in rings_here(&["3", "2"]) {
        let args = if ring == "3" { vec!["--ring", "3"] } else { vec!["--ring", "2", "--workspace", "/tmp"] };
        let child = agt_jail().arg("exec").args(&args).arg("--").arg(&script).stderr(Stdio::piped()).spawn().unwrap();
        let owner = child.id();
        let output = child.wait_with_output().unwrap();
        assert_one_line_error(&output, 127, "not found inside the jail");
        assert!(cgroups_of(owner).is_empty(), "cgroups left: {:?}", cgroups_of(owner));
    }
    // A profile error after flags were read: refused before anything exists.
    let child = agt_jail()
        .args(["exec", "--ring", "2", "--memory", "12Q", "--", "/bin/true"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let owner = child.id();
    assert_eq!(child.wait_with_output().unwrap().status.code(), Some(125));
    assert!(cgroups_of(owner).is_empty());
    assert_eq!(fs::read_to_string("/proc/self/mountinfo").unwrap().lines().count(), mounts_before);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn doctor_reports_the_host_and_every_ring() {
    let output = agt_jail().arg("doctor").output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let text = stdout(&output);
    for needle in ["kernel", "landlock", "seccomp", "user namespaces", "cgroup", "BTF", "BPF LSM", "ring 0", "ring 3"] {
        assert!(text.contains(needle), "{needle} missing in:\n{text}");
    }
    // Without Landlock, ring 3 is said to run on the entry-only exec plane, not to refuse.
    if agt_jail_jail::host::landlock_abi().is_none() && Need::Ring3.missing().is_none() {
        assert!(text.contains("the entry command only (the entry-only exec plane"), "{text}");
    }
    let output = agt_jail().args(["doctor", "--json"]).output().unwrap();
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["rings"].as_array().unwrap().len(), 4);
    assert!(json["kernel"].is_string());
}
