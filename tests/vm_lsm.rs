//! Tier A (BPF LSM) enforcement beyond exec deny rules, proven inside the test VM:
//! exec verdicts (approval per thread and file, script → interpreter, fileless exec),
//! path rules on open and unlink, and the guard hooks (ptrace, signals, mount, bpf, kernel
//! loads, abstract unix sockets). Every denial is checked together with its allowed
//! counterpart and its event.
//!
//! Needs root, BPF LSM, kernel BTF and cgroup v2: on a host without BPF LSM each test
//! skips with the reason; inside the VM (`AGT_JAIL_IN_VM=1`) a missing need is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    ffi::{CStr, CString},
    fs, io,
    os::{
        fd::{AsRawFd, RawFd},
        unix::{ffi::OsStrExt, fs::PermissionsExt, net::UnixListener, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command},
    time::Duration,
};

use agt_jail_ebpf_loader::{
    lsm::{
        guard, ExecIdentity, ExecLsm, FileLsm, FileRule, FileRuleKind, GuardLsm, FILE_ACCESS_READ, FILE_ACCESS_UNLINK,
    },
    AgentPrograms, Event, EventReader, LoaderError,
};
use agt_jail_test_support::{current_test_name, require, unmet, which, Need};

/// Loads a BPF LSM group, or records that the kernel refuses BPF LSM (skip on the host,
/// failure in the VM).
fn load_or_unmet<T>(test: &str, result: Result<T, LoaderError>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(err) => {
            unmet(&current_test_name(test), &format!("the kernel refuses BPF LSM programs: {err}"));
            None
        }
    }
}

#[test]
fn vm_lsm_exec_verdicts() {
    require!(Need::Root, Need::BpfLsm, Need::Btf, Need::CgroupV2);
    const AGENT: u64 = 0x1a5e_0001;
    let scratch = Scratch::new("exec");
    let cgroup = scratch.cgroup("agent");
    let mut programs = AgentPrograms::load().unwrap();
    let mut events = programs.take_events().unwrap();
    programs.register_agent(cgroup_id(&cgroup), AGENT).unwrap();
    let Some(mut lsm) = load_or_unmet("vm_lsm_exec_verdicts", ExecLsm::load(&mut programs)) else {
        return;
    };
    ExecLsm::enable_exec_verdicts(&mut programs, AGENT).unwrap();
    lsm.attach(&mut programs).unwrap();

    let real_true = fs::canonicalize(which("true")).unwrap();
    let program = scratch.executable_copy(&real_true, "bin", "true");
    let other = scratch.executable_copy(&real_true, "other", "true");
    let identity = ExecIdentity::of_path(&program).unwrap();

    // No approval: denied, with the reason.
    let gated = Gated::spawn(&cgroup, Target::Path(&program));
    assert_eq!(gated.release(), Err(libc::EPERM), "an unapproved exec must fail with EPERM");
    // Approved for this thread and this file: runs, and the approval is used up.
    let gated = Gated::spawn(&cgroup, Target::Path(&program));
    let tid = gated.pid as u32;
    ExecLsm::approve_exec(&mut programs, tid, identity).unwrap();
    assert_eq!(gated.release(), Ok(0), "an approved exec must run");
    assert!(!ExecLsm::approval_pending(&mut programs, tid).unwrap(), "the approval is consumed");
    // Approved for another file (a same-content copy): denied, wrong file.
    let gated = Gated::spawn(&cgroup, Target::Path(&program));
    ExecLsm::approve_exec(&mut programs, gated.pid as u32, ExecIdentity::of_path(&other).unwrap()).unwrap();
    assert_eq!(gated.release(), Err(libc::EPERM), "an exec of a file other than the approved one must fail");
    // Approved for another thread: denied.
    let gated = Gated::spawn(&cgroup, Target::Path(&program));
    ExecLsm::approve_exec(&mut programs, std::process::id(), identity).unwrap();
    assert_eq!(gated.release(), Err(libc::EPERM), "another thread's approval must not let this exec run");
    ExecLsm::revoke_approval(&mut programs, std::process::id()).unwrap();

    // A script: the approval of the script lets its interpreter round through.
    // Not canonicalized: `sh` may be a link to a multi-call binary that picks its applet by name.
    let sh = which("sh");
    let script = scratch.dir.join("bin/script.sh");
    fs::write(&script, format!("#!{}\nexit 7\n", sh.display())).unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let gated = Gated::spawn(&cgroup, Target::Path(&script));
    ExecLsm::approve_exec(&mut programs, gated.pid as u32, ExecIdentity::of_path(&script).unwrap()).unwrap();
    assert_eq!(gated.release(), Ok(7), "an approved script must run through its interpreter");
    // Approving the interpreter does not approve a script that names it.
    let gated = Gated::spawn(&cgroup, Target::Path(&script));
    ExecLsm::approve_exec(&mut programs, gated.pid as u32, ExecIdentity::of_path(&sh).unwrap()).unwrap();
    assert_eq!(gated.release(), Err(libc::EPERM), "approving the interpreter must not run the script");

    // Fileless: a memfd with the same program, even approved, is denied.
    let memfd = memfd_with(&real_true);
    let meta = fs::metadata(format!("/proc/self/fd/{}", memfd.as_raw_fd())).unwrap();
    let gated = Gated::spawn(&cgroup, Target::Fd(memfd.as_raw_fd()));
    ExecLsm::approve_exec(&mut programs, gated.pid as u32, ExecIdentity::of_metadata(&meta)).unwrap();
    assert_eq!(gated.release(), Err(libc::EPERM), "a fileless exec must fail even when approved");

    // Scoped to the agent: the unapproved file runs outside it.
    assert_eq!(Command::new(&program).status().unwrap().code(), Some(0), "a non-agent exec must run");

    let seen = collect(&mut events);
    let reasons: Vec<&str> = seen
        .iter()
        .filter_map(|event| match event {
            Event::ExecCheck { agent_id, reason, .. } if *agent_id == AGENT && event.is_deny() => Some(reason.as_str()),
            _ => None,
        })
        .collect();
    for reason in ["not_approved", "wrong_file", "fileless"] {
        assert!(reasons.contains(&reason), "no ExecCheck deny with reason {reason}: {reasons:?}");
    }
    lsm.detach(&mut programs).unwrap();
    let gated = Gated::spawn(&cgroup, Target::Path(&program));
    assert_eq!(gated.release(), Ok(0), "after detach an unapproved exec runs again");
    eprintln!("exec verdicts: unapproved/wrong file/other thread/fileless denied, approved file and script ran");
}

#[test]
fn vm_lsm_file_rules() {
    require!(Need::Root, Need::BpfLsm, Need::Btf, Need::CgroupV2);
    const AGENT: u64 = 0x1a5e_0002;
    let test = current_test_name("vm_lsm_file_rules");
    let scratch = Scratch::new("file");
    let cgroup = scratch.cgroup("agent");
    let mut programs = AgentPrograms::load().unwrap();
    let mut events = programs.take_events().unwrap();
    programs.register_agent(cgroup_id(&cgroup), AGENT).unwrap();
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let Some(mut lsm) = load_or_unmet("vm_lsm_file_rules", FileLsm::load(&mut programs)) else { return };
    // The file_open program resolves paths with bpf_d_path, which 5.10 does not allow
    // there (6.1 does): the hook is reported refused (its rules stay with the fanotify
    // plane), and file rules in the kernel are impossible on it.
    if let Some((_, why)) = lsm.unavailable().iter().find(|(hook, _)| *hook == "file_open") {
        assert!(kernel_before(&release, 6, 1) && why.contains("bpf_d_path"), "file_open refused on {release}: {why}");
        eprintln!(
            "VM-SKIP vm_lsm_file_rules: file rules need bpf_d_path in lsm/file_open, which this kernel refuses: {why} (kernel {})",
            release.trim()
        );
        return;
    }
    let home = scratch.dir.join("home");
    for (path, text) in [
        ("home/.ssh/id_ed25519", "secret"),
        ("home/notes.txt", "notes"),
        ("home/app/.env.local", "TOKEN=1"),
        ("home/app/.envrc", "ok"),
        ("home/protected/keep", "keep"),
        ("home/scratch/tmp", "tmp"),
    ] {
        let path = scratch.dir.join(path);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }
    let protected = home.join("protected");
    let rules = [
        FileRule { kind: FileRuleKind::Component, text: ".ssh".into(), access_mask: FILE_ACCESS_READ, rule_index: 0 },
        FileRule {
            kind: FileRuleKind::Prefix,
            text: protected.to_str().unwrap().into(),
            access_mask: FILE_ACCESS_UNLINK,
            rule_index: 1,
        },
        FileRule {
            kind: FileRuleKind::BasenamePrefix,
            text: ".env.".into(),
            access_mask: FILE_ACCESS_READ,
            rule_index: 2,
        },
    ];
    FileLsm::install_file_rules(&mut programs, AGENT, &rules).unwrap();
    lsm.attach(&mut programs).unwrap();

    let open = |path: &Path| {
        let path = cstring(path);
        fork_in(&cgroup, move || {
            // SAFETY: a valid C string; the fd is closed at once.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
            if fd < 0 {
                return errno();
            }
            // SAFETY: fd is ours.
            unsafe { libc::close(fd) };
            0
        })
    };
    let ssh_key = home.join(".ssh/id_ed25519");
    assert_eq!(open(&ssh_key), libc::EPERM, "a read below a .ssh component must be denied");
    assert_eq!(open(&home.join("notes.txt")), 0, "another file opens");
    assert_eq!(open(&home.join("app/.env.local")), libc::EPERM, "a .env.* basename must be denied");
    assert_eq!(open(&home.join("app/.envrc")), 0, ".envrc does not match the .env. prefix");
    assert!(fs::read(&ssh_key).is_ok(), "a non-agent read of the same file works");

    let seen = collect(&mut events);
    let ssh_name = ssh_key.to_string_lossy().into_owned();
    assert!(
        seen.iter().any(|event| matches!(event, Event::File { agent_id, op, path, rule_index: Some(0), rule_kind, .. }
            if *agent_id == AGENT && op == "open" && *path == ssh_name && rule_kind == "component")),
        "no File deny event for {ssh_name}: {seen:?}"
    );

    let unlink = |path: &Path| {
        let path = cstring(path);
        fork_in(&cgroup, move || {
            // SAFETY: a valid C string.
            if unsafe { libc::unlink(path.as_ptr()) } != 0 {
                return errno();
            }
            0
        })
    };
    let refused = lsm.unavailable().iter().find(|(hook, _)| *hook == "path_unlink").cloned();
    if let Some((hook, reason)) = refused {
        // bpf_d_path in the path_* hooks arrived in 6.8; before that the kernel must refuse them.
        assert!(kernel_before(&release, 6, 8), "{hook} refused on {release}: {reason}");
        lsm.detach(&mut programs).unwrap();
        eprintln!(
            "VM-SKIP {test}: unlink rules need bpf_d_path in path_unlink (Linux 6.8+); the kernel refused {hook}: {reason} (kernel {})",
            release.trim()
        );
        return;
    }
    assert_eq!(unlink(&protected.join("keep")), libc::EPERM, "unlink below a protected directory must be denied");
    assert!(protected.join("keep").exists());
    assert_eq!(unlink(&home.join("scratch/tmp")), 0, "unlink elsewhere works");
    let seen = collect(&mut events);
    assert!(
        seen.iter().any(|event| matches!(event, Event::File { op, rule_index: Some(1), rule_kind, .. }
            if op == "unlink" && rule_kind == "prefix")),
        "no File unlink deny event: {seen:?}"
    );
    lsm.detach(&mut programs).unwrap();
    assert_eq!(open(&ssh_key), 0, "after detach the file opens again");
    eprintln!("file rules: component/basename-prefix reads and protected unlink denied, others allowed");
}

#[test]
fn vm_lsm_guards() {
    require!(Need::Root, Need::BpfLsm, Need::Btf, Need::CgroupV2);
    const GUARDED: u64 = 0x1a5e_0003;
    const PLAIN: u64 = 0x1a5e_0004;
    let scratch = Scratch::new("guard");
    let guarded = scratch.cgroup("guarded");
    let plain = scratch.cgroup("plain");
    let mut programs = AgentPrograms::load().unwrap();
    let mut events = programs.take_events().unwrap();
    programs.register_agent(cgroup_id(&guarded), GUARDED).unwrap();
    programs.register_agent(cgroup_id(&plain), PLAIN).unwrap();
    let Some(mut lsm) = load_or_unmet("vm_lsm_guards", GuardLsm::load(&mut programs)) else {
        return;
    };
    let all = guard::DENY_PTRACE
        | guard::DENY_FOREIGN_SIGNALS
        | guard::DENY_MOUNT
        | guard::DENY_BPF
        | guard::DENY_KERNEL_LOAD
        | guard::DENY_FOREIGN_SOCKETS;
    GuardLsm::enable(&mut programs, GUARDED, all).unwrap();
    lsm.attach(&mut programs).unwrap();

    let sleep = which("sleep");
    let mut host = Reaped(Command::new(&sleep).arg("60").spawn().unwrap());
    let mut inner = Reaped(spawn_in(&guarded, &sleep, "60"));
    let host_pid = host.0.id() as i32;
    let inner_pid = inner.0.id() as i32;

    // ptrace: a host process is off limits, one of the agent's own is not.
    let seize = |pid: i32| {
        fork_in(&guarded, move || {
            // SAFETY: PTRACE_SEIZE with no options; the tracee is released when we exit.
            let ret = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) };
            if ret != 0 {
                errno()
            } else {
                0
            }
        })
    };
    assert_eq!(seize(host_pid), libc::EPERM, "ptrace of a host process must be denied");
    assert_eq!(seize(inner_pid), 0, "ptrace of the agent's own process works");

    // Signals: likewise.
    let kill = |pid: i32, sig: i32| {
        fork_in(&guarded, move || {
            // SAFETY: plain kill(2).
            if unsafe { libc::kill(pid, sig) } != 0 {
                errno()
            } else {
                0
            }
        })
    };
    assert_eq!(kill(host_pid, libc::SIGTERM), libc::EPERM, "a signal to a host process must be denied");
    assert!(host.0.try_wait().unwrap().is_none(), "the host process survived");
    assert_eq!(kill(inner_pid, libc::SIGTERM), 0, "a signal to the agent's own process works");

    // mount: denied for the guarded agent, works for the plain one.
    let target = scratch.dir.join("mnt");
    fs::create_dir_all(&target).unwrap();
    let mount = |cgroup: &Path| {
        let target = cstring(&target);
        fork_in(cgroup, move || {
            let (src, fstype) = (c"none", c"tmpfs");
            // SAFETY: valid C strings; the mount is undone before returning.
            if unsafe { libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) } != 0 {
                return errno();
            }
            // SAFETY: as above.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
            0
        })
    };
    assert_eq!(mount(&guarded), libc::EPERM, "mount must be denied");
    assert_eq!(mount(&plain), 0, "mount works for an agent without the flag");

    // bpf(2): a one-entry array map.
    let bpf = |cgroup: &Path| {
        fork_in(cgroup, || {
            // union bpf_attr for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries.
            let attr: [u32; 16] = [2, 4, 4, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            // SAFETY: a valid attr buffer of the size passed; the fd is released on exit.
            let fd = unsafe { libc::syscall(libc::SYS_bpf, 0, attr.as_ptr(), 64) };
            if fd < 0 {
                errno()
            } else {
                0
            }
        })
    };
    assert_eq!(bpf(&guarded), libc::EPERM, "bpf() must be denied");
    assert_eq!(bpf(&plain), 0, "bpf() works for an agent without the flag");

    // Module load: garbage never loads; the guarded agent is refused before the kernel looks.
    let init_module = |cgroup: &Path| {
        fork_in(cgroup, || {
            let image = [0u8; 64];
            // SAFETY: a valid buffer and an empty parameter string.
            let ret = unsafe { libc::syscall(libc::SYS_init_module, image.as_ptr(), image.len(), c"".as_ptr()) };
            if ret != 0 {
                errno()
            } else {
                0
            }
        })
    };
    assert_eq!(init_module(&guarded), libc::EPERM, "a module load must be denied");
    let plain_errno = init_module(&plain);
    assert!(plain_errno != libc::EPERM && plain_errno != 0, "garbage module from a plain agent: errno {plain_errno}");

    // Sockets: abstract AF_UNIX denied, a pathname socket works.
    let abstract_name = format!("agt-jail-lsm-{}", std::process::id());
    let abstract_listener = abstract_listen(&abstract_name);
    let path_socket = scratch.dir.join("sock");
    let _path_listener = UnixListener::bind(&path_socket).unwrap();
    let connect = |cgroup: &Path, target: UnixTarget| {
        let target = target.clone();
        fork_in(cgroup, move || unix_connect(&target))
    };
    let abstract_target = UnixTarget::Abstract(abstract_name.clone().into_bytes());
    assert_eq!(connect(&guarded, abstract_target.clone()), libc::EPERM, "an abstract unix connect must be denied");
    assert_eq!(connect(&guarded, UnixTarget::Path(cstring(&path_socket))), 0, "a pathname unix connect works");
    assert_eq!(connect(&plain, abstract_target), 0, "an abstract connect works for an agent without the flag");
    drop(abstract_listener);

    let seen = collect(&mut events);
    let hooks: Vec<&str> = seen
        .iter()
        .filter_map(|event| match event {
            Event::Guard { agent_id, hook, .. } if *agent_id == GUARDED => Some(hook.as_str()),
            _ => None,
        })
        .collect();
    for hook in ["ptrace", "signal", "mount", "bpf", "kernel_load", "socket_connect"] {
        assert!(hooks.contains(&hook), "no Guard deny event for {hook}: {hooks:?}");
    }
    assert!(
        seen.iter().any(|event| matches!(event, Event::Guard { hook, target_pid, .. }
            if hook == "signal" && *target_pid == host_pid as u32)),
        "the signal event names the host target: {seen:?}"
    );
    assert!(!seen.iter().any(|event| matches!(event, Event::Guard { agent_id, .. } if *agent_id == PLAIN)));
    lsm.detach(&mut programs).unwrap();
    let _ = (&mut host, &mut inner);
    eprintln!("guards: ptrace/kill of host, mount, bpf, module load, abstract unix denied; counterparts allowed");
}

// ---- helpers ----

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

fn cstring(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

fn kernel_before(release: &str, major: u32, minor: u32) -> bool {
    let mut parts = release.trim().split(['.', '-']).map(|part| part.parse::<u32>().unwrap_or(0));
    let (have_major, have_minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (have_major, have_minor) < (major, minor)
}

fn cgroup_id(cgroup: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&fs::metadata(cgroup).unwrap())
}

/// Moves the calling task into `cgroup` (async-signal-safe: open, write, close).
fn join(procs: &CStr) -> bool {
    // SAFETY: a valid C string; the fd is closed before returning.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return false;
        }
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        libc::close(fd);
        written == 1
    }
}

/// Runs `body` in a forked child inside `cgroup`; returns what it returned (an errno,
/// 0 for success) as the child's exit code.
fn fork_in(cgroup: &Path, body: impl FnOnce() -> i32) -> i32 {
    let procs = cstring(&cgroup.join("cgroup.procs"));
    // SAFETY: the child only calls async-signal-safe functions and _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        let code = if join(&procs) { body() } else { 120 };
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    wait_code(pid)
}

fn wait_code(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: waits for our own child.
    let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(ret, pid, "waitpid: {}", io::Error::last_os_error());
    assert!(libc::WIFEXITED(status), "child {pid} did not exit normally: {status:#x}");
    libc::WEXITSTATUS(status)
}

enum Target<'a> {
    Path(&'a Path),
    Fd(RawFd),
}

/// A child in the agent's cgroup that waits at a gate before its execve, so that the
/// test can approve the exec for the child's thread id first (as a supervisor would).
struct Gated {
    pid: i32,
    gate: RawFd,
    errors: RawFd,
}

impl Gated {
    fn spawn(cgroup: &Path, target: Target<'_>) -> Self {
        let procs = cstring(&cgroup.join("cgroup.procs"));
        let (path, fd) = match target {
            Target::Path(path) => (cstring(path), -1),
            Target::Fd(fd) => (CString::new("").unwrap(), fd),
        };
        let argv0 = match target {
            Target::Path(path) => CString::new(path.file_name().unwrap().as_bytes()).unwrap(),
            Target::Fd(_) => CString::new("true").unwrap(),
        };
        let argv = [argv0.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null::<libc::c_char>()];
        let (gate_r, gate_w) = pipe();
        let (err_r, err_w) = pipe();
        // SAFETY: the child only calls async-signal-safe functions and _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
        if pid == 0 {
            // SAFETY: fds and C strings prepared before the fork; _exit ends the child.
            unsafe {
                libc::close(gate_w);
                libc::close(err_r);
                if !join(&procs) {
                    libc::_exit(120);
                }
                let mut byte = 0u8;
                if libc::read(gate_r, (&mut byte as *mut u8).cast(), 1) != 1 {
                    libc::_exit(121);
                }
                if fd < 0 {
                    libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr());
                } else {
                    libc::syscall(
                        libc::SYS_execveat,
                        fd,
                        path.as_ptr(),
                        argv.as_ptr(),
                        envp.as_ptr(),
                        libc::AT_EMPTY_PATH,
                    );
                }
                let code: i32 = *libc::__errno_location();
                libc::write(err_w, (&code as *const i32).cast(), 4);
                libc::_exit(127);
            }
        }
        // SAFETY: closing the child's ends in the parent.
        unsafe {
            libc::close(gate_r);
            libc::close(err_w);
        }
        Self { pid, gate: gate_w, errors: err_r }
    }

    /// Lets the child exec; returns its exit code, or the exec's errno.
    fn release(self) -> Result<i32, i32> {
        let mut code = [0u8; 4];
        // SAFETY: our own pipe fds and buffers.
        let read = unsafe {
            libc::write(self.gate, b"x".as_ptr().cast(), 1);
            libc::close(self.gate);
            let read = libc::read(self.errors, code.as_mut_ptr().cast(), 4);
            libc::close(self.errors);
            read
        };
        let status = wait_code(self.pid);
        if read == 4 {
            return Err(i32::from_ne_bytes(code));
        }
        Ok(status)
    }
}

fn pipe() -> (RawFd, RawFd) {
    let mut fds = [0; 2];
    // SAFETY: fds has room for two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    (fds[0], fds[1])
}

fn memfd_with(source: &Path) -> fs::File {
    use std::os::fd::FromRawFd;
    // SAFETY: a valid name; no MFD_CLOEXEC so that execveat can run it in the child.
    let fd = unsafe { libc::memfd_create(c"agt-fileless".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor we own.
    let mut file = unsafe { fs::File::from_raw_fd(fd) };
    io::copy(&mut fs::File::open(source).unwrap(), &mut file).unwrap();
    file
}

fn spawn_in(cgroup: &Path, program: &Path, arg: &str) -> Child {
    let procs = cstring(&cgroup.join("cgroup.procs"));
    let mut cmd = Command::new(program);
    cmd.arg(arg);
    // SAFETY: async-signal-safe work only, on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || if join(&procs) { Ok(()) } else { Err(io::Error::last_os_error()) });
    }
    cmd.spawn().unwrap()
}

/// Kills and reaps a child on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Clone)]
enum UnixTarget {
    Abstract(Vec<u8>),
    Path(CString),
}

fn sockaddr_un(target: &UnixTarget) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: an all-zero sockaddr_un is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let (bytes, start): (&[u8], usize) = match target {
        UnixTarget::Abstract(name) => (name, 1),
        UnixTarget::Path(path) => (path.as_bytes(), 0),
    };
    for (slot, byte) in addr.sun_path[start..].iter_mut().zip(bytes) {
        *slot = *byte as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + start + bytes.len() + usize::from(start == 0);
    (addr, len as libc::socklen_t)
}

fn unix_connect(target: &UnixTarget) -> i32 {
    let (addr, len) = sockaddr_un(target);
    // SAFETY: plain socket calls on a local fd and a valid address.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return errno();
        }
        let ret = libc::connect(fd, (&addr as *const libc::sockaddr_un).cast(), len);
        let code = if ret != 0 { errno() } else { 0 };
        libc::close(fd);
        code
    }
}

/// A listening abstract unix socket, closed on drop.
struct AbstractListener(RawFd);

impl Drop for AbstractListener {
    fn drop(&mut self) {
        // SAFETY: our own fd.
        unsafe { libc::close(self.0) };
    }
}

fn abstract_listen(name: &str) -> AbstractListener {
    let (addr, len) = sockaddr_un(&UnixTarget::Abstract(name.as_bytes().to_vec()));
    // SAFETY: plain socket calls on a local fd and a valid address.
    unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        assert_eq!(
            libc::bind(fd, (&addr as *const libc::sockaddr_un).cast(), len),
            0,
            "{}",
            io::Error::last_os_error()
        );
        assert_eq!(libc::listen(fd, 16), 0);
        AbstractListener(fd)
    }
}

fn collect(events: &mut EventReader) -> Vec<Event> {
    let mut seen = Vec::new();
    let mut sink = |event: Result<Event, _>| {
        if let Ok(event) = event {
            seen.push(event);
        }
    };
    events.poll(Duration::from_secs(2), &mut sink).unwrap();
    events.drain(&mut sink);
    seen
}

/// A temporary directory and cgroup v2 children, all removed on drop.
struct Scratch {
    dir: PathBuf,
    cgroups: std::cell::RefCell<Vec<PathBuf>>,
}

impl Scratch {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("agt-jail-vm-lsm-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Self { dir, cgroups: Default::default() }
    }

    fn cgroup(&self, name: &str) -> PathBuf {
        let cgroup = cgroup2_root().join(format!("agt-jail-vm-lsm-{name}-{}", std::process::id()));
        let _ = fs::remove_dir(&cgroup);
        fs::create_dir(&cgroup).unwrap();
        self.cgroups.borrow_mut().push(cgroup.clone());
        cgroup
    }

    fn executable_copy(&self, source: &Path, sub: &str, name: &str) -> PathBuf {
        let dir = self.dir.join(sub);
        fs::create_dir_all(&dir).unwrap();
        let target = dir.join(name);
        fs::copy(source, &target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        target
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for cgroup in self.cgroups.borrow().iter() {
            let _ = fs::remove_dir(cgroup);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Where cgroup v2 is mounted: /sys/fs/cgroup (pure v2) or e.g. /sys/fs/cgroup/unified.
fn cgroup2_root() -> PathBuf {
    agt_jail_jail::CgroupLayout::detect(std::path::Path::new("/proc/self/mountinfo")).expect("a cgroup2 mount").v2
}
