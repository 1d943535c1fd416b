//! Every flag of `exec` is honoured or refused (125, one line), in every ring and
//! through both executables: ring/flag combinations a ring cannot honour, limits in
//! ring 0, bad values, `--agent` without a policy, a policy's denial of the command
//! itself, and command lines of every size up to the kernel's limits.
#![allow(clippy::unwrap_used)]

use std::{
    ffi::OsStr,
    fs,
    net::TcpListener,
    os::unix::ffi::OsStrExt,
    path::PathBuf,
    process::{Command, Output},
};

use agt_jail_test_support::{assert_one_line_error, require, Need};

const BIN: &str = env!("CARGO_BIN_EXE_agt-jail");
const FULL: &str = env!("CARGO_BIN_EXE_agt-jail-full");

fn agt_jail() -> Command {
    Command::new(BIN)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = PathBuf::from(format!("/tmp/agt-jail-flags-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs `exec FLAGS -- /bin/true` through both executables and checks each refuses it
/// with 125 and one line containing `needle`.
fn refused_by_both(flags: &[&str], needle: &str) {
    for bin in [BIN, FULL] {
        let output = Command::new(bin).arg("exec").args(flags).args(["--", "/bin/true"]).output().unwrap();
        assert_one_line_error(&output, 125, needle);
    }
}

#[test]
fn a_ring_is_never_given_a_wider_network_or_a_writable_path_it_does_not_have() {
    require!(Need::Root, Need::CgroupV2);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let host_service = format!("127.0.0.1:{port}");
    refused_by_both(&["--ring", "3", "--net", "host"], "--net host cannot be honoured in ring 3");
    refused_by_both(&["--ring", "3", "--net", "allowlist"], "--net allowlist cannot be honoured in ring 3");
    refused_by_both(&["--ring", "2", "--net", "host"], "--net host cannot be honoured in ring 2");
    refused_by_both(&["--ring", "1", "--net", "host"], "--net host needs --policy");
    // Not even a policy opens ring 3's network.
    refused_by_both(&["--ring", "3", "--net", "host", "--policy", "/dev/null"], "cannot be honoured in ring 3");
    refused_by_both(&["--ring", "0", "--net", "none"], "--net needs a confined ring");
    refused_by_both(&["--ring", "3", "--allow-connect", &host_service], "ring 3 has no network");
    refused_by_both(
        &["--ring", "2", "--net", "none", "--allow-connect", &host_service],
        "needs network mode allowlist",
    );
    refused_by_both(&["--ring", "3", "--rw", "/tmp"], "--rw cannot be honoured in ring 3");
    refused_by_both(&["--ring", "0", "--workspace", "/tmp"], "--workspace needs a confined ring");
    refused_by_both(&["--tty"], "--tty needs a confined ring");
    refused_by_both(&["--ring", "2", "--rw", "/"], "--rw / overlaps the system paths");
    refused_by_both(&["--ring", "1", "--rw", "/usr/bin"], "overlaps the system paths");
    refused_by_both(&["--ring", "2", "--rw", "/sys"], "the host's /sys is never writable");
    refused_by_both(&["--ring", "2", "--ro", "/proc"], "the jail has its own /proc");
    // Nothing reached the host service.
    listener.set_nonblocking(true).unwrap();
    assert!(listener.accept().is_err(), "a refused run connected to the host service");
}

#[test]
fn a_profile_file_cannot_widen_its_ring_or_hang_the_loader() {
    let dir = scratch("profiles");
    for (text, needle) in [
        ("ring: 3\nnetwork: {mode: host}\n", ":2:10: ring 3 cannot have network.mode host; ring 3 allows none"),
        ("ring: 2\nnetwork: {mode: host}\n", "ring 2 allows allowlist or none"),
        ("ring: 3\nfilesystem: {rw: [/tmp]}\n", "ring 3 has nothing writable"),
        ("ring: 2\nlimits: {memory: ''}\n", "an empty size is not a limit"),
    ] {
        let path = dir.join("p.yaml");
        fs::write(&path, text).unwrap();
        let output = agt_jail().arg("exec").arg("--profile").arg(&path).args(["--", "/bin/true"]).output().unwrap();
        assert_one_line_error(&output, 125, needle);
    }
    let output = agt_jail().args(["exec", "--profile", "/dev/zero", "--", "/bin/true"]).output().unwrap();
    assert_one_line_error(&output, 125, "/dev/zero:1:1: cannot read profile: not a regular file");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_narrower_network_is_honoured() {
    require!(Need::Root, Need::CgroupV2, Need::Landlock);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let script = format!("exec 3<>/dev/tcp/127.0.0.1/{port} && echo connected");
    let output =
        agt_jail().args(["exec", "--ring", "2", "--net", "none", "--", "/bin/bash", "-c", &script]).output().unwrap();
    assert_ne!(output.status.code(), Some(0), "ring 2 with --net none reached the host: {output:?}");
    assert!(!stdout(&output).contains("connected"));
}

#[test]
fn sizes_and_counts_refuse_empty_zero_garbage_and_overflow_with_the_flag_named() {
    require!(Need::Root, Need::CgroupV2);
    for ring in ["0", "3"] {
        for (flag, value, needle) in [
            ("--memory", "", "--memory: an empty size is not a limit"),
            ("--memory", " ", "--memory: an empty size"),
            ("--memory", "0", "--memory: memory limit '0' is below 1M"),
            ("--memory", "-5M", "--memory: '-5M' is not a size"),
            ("--memory", "lots", "--memory: 'lots' is not a size"),
            ("--memory", "99999999999999T", "--memory: '99999999999999T' is larger than the kernel takes"),
            ("--pids", "", "--pids:"),
            ("--pids", "0", "--pids: pids '0' must be a number of at least 2"),
            ("--pids", "1", "--pids:"),
            ("--pids", "18446744073709551616", "--pids:"),
            ("--pids", "99999999", "--pids: pids '99999999' is more than the kernel has"),
            ("--cpu", "", "--cpu:"),
            ("--cpu", "0", "--cpu: cpu '0' must be between"),
            ("--cpu", "nan", "--cpu:"),
            ("--cpu", "1e400", "--cpu:"),
        ] {
            refused_by_both(&["--ring", ring, &format!("{flag}={value}")], needle);
        }
    }
    refused_by_both(&["--grace", "99999999"], "--grace");
    for ring in ["0", "2"] {
        let output = agt_jail().args(["exec", "--ring", ring, "--", ""]).output().unwrap();
        assert_one_line_error(&output, 127, "'': command not found");
    }
    refused_by_both(&["--ring", "2", "--allow-exec", "/nonexistent/agt-jail-tool"], "--allow-exec");
}

/// Not a test of its own: the allocation the ring 0 limit test runs as its command.
#[test]
#[ignore = "helper: run by ring_0_applies_memory_and_pids_limits"]
fn helper_allocates_300_mib() {
    if std::env::var_os("AGT_JAIL_ALLOCATE").is_none() {
        return;
    }
    let mut block = vec![0u8; 300 << 20];
    for page in block.chunks_mut(4096) {
        page[0] = 1;
    }
    println!("allocated {} MiB", (block.iter().filter(|b| **b == 1).count() * 4096) >> 20);
}

#[test]
fn ring_0_applies_memory_and_pids_limits() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let me = std::env::current_exe().unwrap();
    let helper = ["--exact", "helper_allocates_300_mib", "--ignored", "--nocapture", "--test-threads=1"];
    let run = |limit: &[&str]| {
        Command::new(BIN)
            .arg("exec")
            .args(limit)
            .args(["--env", "AGT_JAIL_ALLOCATE=1", "--"])
            .arg(&me)
            .args(helper)
            .output()
            .unwrap()
    };
    let free = run(&[]);
    assert!(stdout(&free).contains("allocated 300 MiB"), "the control run could not allocate: {free:?}");
    let limited = run(&["--ring", "0", "--memory", "20M"]);
    assert!(!stdout(&limited).contains("allocated"), "ring 0 --memory 20M allocated 300 MiB: {limited:?}");
    assert_eq!(limited.status.code(), Some(137), "{limited:?}");
    // Every controller that holds a limit has the command in the agent's cgroup (the v1
    // ones on hybrid hosts; on pure v2 hosts the one line is the v2 cgroup).
    let output = agt_jail()
        .args(["exec", "--memory", "64M", "--pids", "32", "--cpu", "1", "--", "/bin/cat", "/proc/self/cgroup"])
        .output()
        .unwrap();
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let layout = agt_jail_jail::CgroupLayout::parse(&mountinfo).unwrap();
    let v2_controllers = layout.v2_controllers();
    for controller in ["memory", "pids", "cpu"] {
        let line = if v2_controllers.iter().any(|c| c == controller) || layout.v1_root(controller).is_none() {
            stdout(&output).lines().find(|l| l.starts_with("0::")).map(str::to_string)
        } else {
            stdout(&output)
                .lines()
                .find(|l| l.split(':').nth(1).is_some_and(|c| c.split(',').any(|c| c == controller)))
                .map(str::to_string)
        };
        let line = line.unwrap_or_default();
        assert!(line.contains("/agt-jail/"), "{controller}: the command is not in the agent's cgroup: {line:?}");
    }
    let forks = "for i in 1 2 3 4 5 6 7 8; do /bin/sleep 1 & done; wait";
    let output = agt_jail().args(["exec", "--pids", "4", "--", "/bin/sh", "-c", forks]).output().unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("fork"), "--pids 4 let 9 processes run: {output:?}");
}

#[test]
fn agent_names_and_policy_flags_need_a_policy_and_a_valid_name() {
    for flags in [
        &["--agent", "coder"][..],
        &["--trust", "700"],
        &["--kill-below", "100"],
        &["--deny-penalty", "5"],
        &["--approval-timeout", "5"],
        &["--dns-refresh", "5"],
        &["--strict"],
    ] {
        refused_by_both(flags, "need --policy");
    }
    for name in ["a/b", "", ".hidden", "../x", "x y", &"n".repeat(65)] {
        refused_by_both(&["--agent", name], "is not an agent name");
    }
    refused_by_both(&["--policy", "/dev/null", "--kill-below", "1001"], "--kill-below");
    refused_by_both(&["--policy", "/dev/null", "--deny-penalty", "-1"], "-1");
    refused_by_both(&["--policy", "/dev/null", "--approval-timeout", "0"], "--approval-timeout");
    refused_by_both(&["--policy", "/dev/null", "--approval-timeout", "18446744073709551615"], "--approval-timeout");
    for command in [
        &["kill", "--agent", "a/b"][..],
        &["status", "--agent", "../run"],
        &["demote", "--agent", "x/y", "--ring", "3"],
    ] {
        let output = agt_jail().args(command).output().unwrap();
        assert_one_line_error(&output, 125, "is not an agent name");
    }
}

#[test]
fn demote_takes_only_rings_a_demotion_can_reach() {
    for ring in ["0", "4", "", "-1", "two"] {
        let output = agt_jail().args(["demote", "--agent", "x", "--ring", ring]).output().unwrap();
        assert_one_line_error(&output, 125, "");
    }
    for (request, needle) in [("0", "is not a request number"), ("x", "is not a request number"), ("", "")] {
        let output = agt_jail().args(["approve", "--agent", "x", request]).output().unwrap();
        assert_one_line_error(&output, 125, needle);
    }
    // Help text wraps at the terminal's width: compared with single spaces.
    let help = |command: &str| {
        let text = stdout(&agt_jail().args([command, "--help"]).output().unwrap());
        text.split_whitespace().collect::<Vec<_>>().join(" ")
    };
    for command in ["approve", "deny", "kill", "demote", "status"] {
        assert!(help(command).contains("Exit status: 0 done; 1 the agent refused"), "{command} --help");
    }
    let demote = help("demote");
    assert!(demote.contains("1, 2 or 3, and higher than the agent's ring"), "{demote}");
    let help = help("exec");
    for needle in [
        "Flags that need rings 1-3",
        "Default: the ring's (0 host, 1-2 allowlist, 3 none)",
        "Needs --policy",
        "Rings 1-2 execute system binaries and what the agent builds",
        "its files may also be executed, as the workspace's are",
    ] {
        assert!(help.contains(needle), "exec --help lacks {needle:?}");
    }
}

#[test]
fn a_policy_denial_of_the_command_reads_as_a_denial() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let dir = scratch("deny-entry");
    let policy = dir.join("no-agent.yaml");
    // Names no agent, so it applies to none, and the default (deny) decides.
    fs::write(
        &policy,
        "apiVersion: governance.toolkit/v1\nname: nobody\nrules:\n  - name: r\n    condition: \"exec.path == '/x'\"\n    action: allow\n",
    )
    .unwrap();
    for ring in ["0", "2"] {
        let output = agt_jail()
            .args(["exec", "--quiet", "--ring", ring, "--policy"])
            .arg(&policy)
            .args(["--", "/bin/echo", "hi"])
            .output()
            .unwrap();
        assert_one_line_error(&output, 126, "/bin/echo: denied by policy");
        assert!(!String::from_utf8_lossy(&output.stderr).contains("not executable"));
    }
    // A file that really cannot be run still says so.
    let plain = dir.join("plain");
    fs::write(&plain, "data").unwrap();
    let output = agt_jail().args(["exec", "--ring", "2", "--"]).arg(&plain).output().unwrap();
    assert_one_line_error(&output, 126, "not executable");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn under_a_policy_a_command_line_the_exec_plane_cannot_read_is_refused_not_denied() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let policy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/policies/caller.yaml");
    let run = |count: usize| {
        let numbers: Vec<String> = (1..=count).map(|n| n.to_string()).collect();
        let mut command = agt_jail();
        command.arg("exec").arg("--policy").arg(&policy).args(["-q", "--", "/bin/echo"]).args(&numbers);
        (command.output().unwrap(), numbers.join(" "))
    };
    let (output, expected) = run(4000);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    assert_eq!(stdout(&output).trim_end(), expected);
    assert_one_line_error(&run(5000).0, 125, "reads at most 4096 arguments");
}

/// The kernel's budget for argv+envp of a child of this process (fs/exec.c).
fn exec_budget() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_STACK, &mut limit) }, 0);
    (6u64 << 20).min(limit.rlim_cur / 4).max(128 << 10)
}

#[test]
fn every_argument_and_environment_entry_reaches_the_command() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    for ring in ["0", "2", "3"] {
        for count in [300, 5000] {
            let numbers: Vec<String> = (1..=count).map(|n| n.to_string()).collect();
            let output = agt_jail().args(["exec", "--ring", ring, "--", "/bin/echo"]).args(&numbers).output().unwrap();
            assert_eq!(output.status.code(), Some(0), "ring {ring}: {output:?}");
            assert_eq!(stdout(&output).trim_end(), numbers.join(" "), "ring {ring}, {count} arguments");
        }
        let mut command = agt_jail();
        command.args(["exec", "--ring", ring]);
        for n in 0..600 {
            command.arg("--env").arg(format!("AGT_JAIL_VAR_{n}={n}"));
        }
        let output = command.args(["--", "/usr/bin/env"]).output().unwrap();
        let seen = stdout(&output).lines().filter(|l| l.starts_with("AGT_JAIL_VAR_")).count();
        assert_eq!(seen, 600, "ring {ring}: {output:?}");
    }
}

#[test]
fn arguments_of_any_bytes_reach_the_command_and_flags_name_a_bad_byte() {
    require!(Need::Root, Need::CgroupV2, Need::Btf, Need::Landlock);
    let raw = OsStr::from_bytes(b"caf\xe9");
    for ring in ["0", "2", "3"] {
        let output = agt_jail().args(["exec", "--ring", ring, "--", "/bin/echo"]).arg(raw).output().unwrap();
        assert_eq!(output.stdout, b"caf\xe9\n", "ring {ring}: {output:?}");
    }
    let entry = OsStr::from_bytes(b"AGT_JAIL_RAW=caf\xe9");
    for ring in ["0", "2", "3"] {
        let output = agt_jail()
            .args(["exec", "--ring", ring, "--env"])
            .arg(entry)
            .args(["--", "/usr/bin/env"])
            .output()
            .unwrap();
        let found = output.stdout.split(|b| *b == b'\n').any(|line| line == entry.as_bytes());
        assert!(found, "ring {ring}: {output:?}");
    }
    for flag in ["--memory", "--agent", "--net"] {
        let output =
            agt_jail().args(["exec", "--ring", "2", flag]).arg(raw).args(["--", "/bin/true"]).output().unwrap();
        assert_one_line_error(&output, 125, &format!("argument 5 'caf\u{fffd}' (the value of {flag}) is not UTF-8"));
    }
    let output = agt_jail().args(["kill", "--agent"]).arg(raw).output().unwrap();
    assert_one_line_error(&output, 125, "(the value of --agent) is not UTF-8");
    // Paths of any bytes are shown in the jail's view: workspace, --rw, --ro, --allow-exec
    // and the command itself.
    let dir = scratch("raw-path");
    let odd = dir.join(raw);
    fs::create_dir_all(&odd).unwrap();
    let tool = odd.join("true");
    fs::copy("/bin/true", &tool).unwrap();
    let output = agt_jail().args(["exec", "--ring", "2", "--workspace"]).arg(&odd).args(["--", "/bin/pwd"]).output();
    assert_eq!(output.unwrap().stdout, [odd.as_os_str().as_bytes(), b"\n"].concat());
    let write = "for d in \"$0\"; do : > \"$d/written\"; done";
    let writes = |flag: &str| {
        let mut command = agt_jail();
        command.args(["exec", "--ring", "2", flag]).arg(&odd).args(["--", "/bin/sh", "-c", write]).arg(&odd);
        command.status().unwrap().code()
    };
    assert_eq!(writes("--rw"), Some(0));
    assert!(odd.join("written").exists(), "--rw of a non-UTF-8 path was not writable");
    fs::remove_file(odd.join("written")).unwrap();
    assert_ne!(writes("--ro"), Some(0), "--ro of a non-UTF-8 path was writable");
    assert!(!odd.join("written").exists());
    for ring in ["0", "3"] {
        let status = agt_jail().args(["exec", "--ring", ring, "--"]).arg(&tool).status().unwrap();
        assert_eq!(status.code(), Some(0), "ring {ring}");
    }
    let status = agt_jail().args(["exec", "--ring", "2", "--allow-exec"]).arg(&tool).arg("--").arg(&tool).status();
    assert_eq!(status.unwrap().code(), Some(0));
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn a_command_line_over_the_kernels_limit_is_refused() {
    require!(Need::Root, Need::CgroupV2, Need::Landlock);
    // The jail adds PATH and HOME (the workspace, here the current directory, which is
    // not on agt-jail's own command line): agt-jail's own exec fits, the command's would
    // not.
    let mut deep = scratch("over-limit");
    for i in 0..17 {
        deep.push(format!("{i:02}{}", "d".repeat(198)));
    }
    fs::create_dir_all(&deep).unwrap();
    let prefix = ["exec", "--ring", "2", "--", "/bin/true"];
    let own = |args: &[String]| -> u64 {
        let strings: u64 = args.iter().map(|a| a.len() as u64 + 1).sum();
        (BIN.len() as u64 + 1) * 2 + strings + (args.len() as u64 + 1) * 8 + 8
    };
    let mut args: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
    let budget = exec_budget();
    while own(&args) + 1008 + 1600 < budget {
        args.push("x".repeat(999));
    }
    let fill = budget - 1500 - own(&args) - 9;
    args.push("y".repeat(usize::try_from(fill).unwrap()));
    assert!(own(&args) <= budget - 1500 && deep.as_os_str().len() > 3000);
    let output = agt_jail().args(&args).env_clear().current_dir(&deep).output().unwrap();
    assert_one_line_error(&output, 125, "the kernel takes at most");
    let _ = fs::remove_dir_all(scratch("over-limit"));
}

#[test]
fn exec_says_the_policy_load_warnings_once_unless_quiet() {
    require!(Need::Root, Need::CgroupV2, Need::Btf);
    let dir = scratch("load-warnings");
    let policy = dir.join("p.yaml");
    // A bare literal condition: `policy lint` warns that it never matches.
    fs::write(
        &policy,
        "name: p\nagents: ['*']\ndefault_action: allow\nrules:\n  - {name: lit, condition: 'true', action: log}\n",
    )
    .unwrap();
    for (quiet, count) in [(&[][..], 1), (&["-q"][..], 0)] {
        let output =
            agt_jail().arg("exec").args(quiet).arg("--policy").arg(&policy).args(["--", "/bin/true"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        assert_eq!(stderr.matches("warning: rule \"lit\"").count(), count, "{quiet:?}: {stderr}");
        let located = format!("agt-jail: {}:5:", policy.display());
        assert_eq!(stderr.contains(&located), count == 1, "{quiet:?}: {stderr}");
    }
}

#[test]
fn no_running_agent_says_only_a_policy_run_can_be_controlled() {
    let name = format!("nobody-{}", std::process::id());
    for command in [&["kill", "--agent", &name][..], &["status", "--agent", &name]] {
        let output = agt_jail().args(command).output().unwrap();
        assert_one_line_error(&output, 125, &format!("no running agent {name}: no control socket at"));
        assert_one_line_error(&output, 125, "only `agt-jail exec --policy` creates one");
    }
}
