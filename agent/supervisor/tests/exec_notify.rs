//! Exec decisions through seccomp user-notification, against real processes (root).
//!
//! A child is started with the jail's exec listener (`agt_jail_jail::notify_execs`, the
//! ring-0 path) and an [`ExecNotifier`] serving it. "Probes" are execs the child makes
//! after the listener is installed and before its own exec, prepared in the parent (the
//! child only makes system calls); each reports its errno through a pipe. The test
//! decider denies argv containing "-rf" and fileless execs, drops the reply for
//! "drop-me", holds it for "approve-me", and allows the rest.
#![allow(clippy::unwrap_used)]

use std::{
    ffi::CString,
    fs,
    io::Read,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::{fs::MetadataExt, net::UnixStream, process::CommandExt},
    },
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use agt_jail_supervisor::{
    exec_notify::{ExecNotifier, Handle, NotifyError},
    Answer, Decider, FileIdentity, Reply, Request, RequestKind,
};
use agt_jail_test_support::{require, Need};

/// How long a test waits for an event before it calls the run hung (a hang guard, not a
/// timing assertion).
const HANG: Duration = Duration::from_secs(60);

struct TestDecider {
    seen: Mutex<mpsc::Sender<Request>>,
    held: Mutex<Vec<Reply>>,
}

impl Decider for TestDecider {
    fn decide(&self, request: Request, reply: Reply) {
        let RequestKind::Exec { argv, fileless, .. } = &request.kind else { panic!("{request:?}") };
        let has = |word: &str| argv.iter().any(|a| a == word);
        let (drop_it, hold, deny) = (has("drop-me"), has("approve-me"), has("-rf") || *fileless);
        if drop_it {
            drop(reply);
        } else if hold {
            self.held.lock().unwrap().push(reply);
        } else if deny {
            reply.answer(Answer::Deny);
        } else {
            reply.answer(Answer::Allow);
        }
        // Last, so a test that saw the request finds a held reply in place.
        let _ = self.seen.lock().unwrap().send(request);
    }
}

struct Rig {
    decider: Arc<TestDecider>,
    requests: mpsc::Receiver<Request>,
    errors: mpsc::Receiver<String>,
    handle: Option<Handle>,
    child_end: Option<UnixStream>,
}

impl Rig {
    fn start() -> Rig {
        let (tx, requests) = mpsc::channel();
        let (etx, errors) = mpsc::channel();
        let etx = Mutex::new(etx);
        let decider = Arc::new(TestDecider { seen: Mutex::new(tx), held: Mutex::new(Vec::new()) });
        let (parent, child) = UnixStream::pair().unwrap();
        let handle = ExecNotifier::start_with(OwnedFd::from(parent), decider.clone(), move |e: &NotifyError| {
            let _ = etx.lock().unwrap().send(e.to_string());
        })
        .unwrap();
        Rig { decider, requests, errors, handle: Some(handle), child_end: Some(child) }
    }

    /// Registers the listener step on `cmd` (after any step registered before).
    fn arm(&self, cmd: &mut Command) {
        agt_jail_jail::notify_execs(cmd, self.child_end.as_ref().unwrap().as_raw_fd()).unwrap();
    }

    /// Spawns `cmd` (armed) and closes this side's copy of the child end.
    fn spawn(&mut self, cmd: &mut Command) -> std::io::Result<Child> {
        let child = cmd.spawn();
        self.child_end = None;
        child
    }

    fn next(&self) -> Request {
        self.requests.recv_timeout(HANG).expect("no exec request arrived")
    }

    fn all(&self) -> Vec<Request> {
        self.requests.try_iter().collect()
    }
}

/// One exec a child makes after its listener is installed, prepared in the parent.
struct Probe {
    dirfd: Option<RawFd>,
    path: CString,
    _args: Vec<CString>,
    argv: Vec<usize>,
    envp: [usize; 1],
    flags: libc::c_int,
}

impl Probe {
    fn new(dirfd: Option<RawFd>, path: &str, args: &[&str], flags: libc::c_int) -> Probe {
        let args: Vec<CString> = args.iter().map(|a| CString::new(*a).unwrap()).collect();
        let mut argv: Vec<usize> = args.iter().map(|a| a.as_ptr() as usize).collect();
        argv.push(0);
        Probe { dirfd, path: CString::new(path).unwrap(), _args: args, argv, envp: [0], flags }
    }

    /// Makes the exec; returns its errno (0 cannot happen: a successful exec does not return).
    fn run(&self) -> i32 {
        // SAFETY: path, argv and envp are NUL-terminated strings and NULL-terminated pointer
        // arrays owned by `self`, alive for the call.
        let rc = unsafe {
            match self.dirfd {
                None => libc::syscall(libc::SYS_execve, self.path.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr()),
                Some(fd) => libc::syscall(
                    libc::SYS_execveat,
                    fd,
                    self.path.as_ptr(),
                    self.argv.as_ptr(),
                    self.envp.as_ptr(),
                    self.flags,
                ),
            }
        };
        if rc < 0 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        } else {
            0
        }
    }
}

/// A pipe for probe results: (read end, write end), both close-on-exec.
fn pipe() -> (fs::File, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for two descriptors.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    unsafe { (fs::File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// Registers `probes` on `cmd` (after the listener step): each runs in the child and
/// writes its errno to the returned reader.
fn add_probes(cmd: &mut Command, probes: Vec<Probe>) -> (fs::File, OwnedFd) {
    let (reader, writer) = pipe();
    let w = writer.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only makes system calls
    // (execve/execveat on prepared data, write(2)): no allocation, no locks.
    unsafe {
        cmd.pre_exec(move || {
            for probe in &probes {
                let errno = probe.run().to_ne_bytes();
                libc::write(w, errno.as_ptr().cast(), errno.len());
            }
            Ok(())
        });
    }
    (reader, writer)
}

fn errnos(mut reader: fs::File, writer: OwnedFd) -> Vec<i32> {
    drop(writer);
    let mut bytes = Vec::new();
    reader.read_to_end(&mut bytes).unwrap();
    bytes.chunks(4).map(|c| i32::from_ne_bytes(c.try_into().unwrap())).collect()
}

fn exec_of(request: &Request) -> (&str, &[String], bool, Option<FileIdentity>) {
    match &request.kind {
        RequestKind::Exec { path, argv, fileless, identity, .. } => (path, argv, *fileless, *identity),
        other => panic!("not an exec: {other:?}"),
    }
}

fn identity(path: &Path) -> Option<FileIdentity> {
    let meta = fs::metadata(path).unwrap();
    Some(FileIdentity { dev: meta.dev(), ino: meta.ino() })
}

fn tempdir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().canonicalize().unwrap();
    (dir, path)
}

fn sh_touch(marker: &Path) -> Command {
    let mut cmd = Command::new("/bin/sh");
    cmd.args(["-c", "touch \"$0\"", marker.to_str().unwrap()]);
    cmd
}

#[test]
fn a_denied_exec_fails_with_eperm_and_does_not_run_and_an_allowed_one_runs() {
    require!(Need::Root);
    let (_dir, dir) = tempdir();
    let (denied, allowed) = (dir.join("denied"), dir.join("allowed"));
    let mut rig = Rig::start();
    let mut cmd = sh_touch(&allowed);
    rig.arm(&mut cmd);
    let denied_argv = ["sh", "-c", "touch \"$0\"", denied.to_str().unwrap(), "-rf", "two words", ""];
    let (r, w) = add_probes(&mut cmd, vec![Probe::new(None, "/bin/sh", &denied_argv, 0)]);
    let mut child = rig.spawn(&mut cmd).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(errnos(r, w), vec![libc::EPERM]);
    assert!(!denied.exists(), "a denied exec ran");
    assert!(allowed.exists(), "the allowed exec did not run");

    let first = rig.next();
    let (path, argv, fileless, id) = exec_of(&first);
    assert_eq!(path, "/bin/sh");
    assert_eq!(argv, denied_argv, "argv must be exact");
    assert!(!fileless);
    assert_eq!(id, identity(Path::new("/bin/sh")));
    assert_eq!(first.pid, child.id());
    assert_eq!(first.plane, "seccomp_notify");
    // The facts of the held process, read before its exec: it is still the fork of this
    // test's thread.
    let proc = first.proc.as_ref().expect("the exec plane reads the process facts");
    assert_eq!((proc.pid, proc.ppid, proc.uid), (child.id(), std::process::id(), 0));
    assert_eq!(proc.comm, fs::read_to_string("/proc/thread-self/comm").unwrap().trim_end());
    assert_eq!(Path::new(&proc.exe), std::env::current_exe().unwrap());
    let RequestKind::Exec { interpreter, .. } = &first.kind else { unreachable!() };
    assert_eq!(interpreter.as_deref(), None, "an ELF file has no #! line");
    // Linux 6.6 and later take the listener's synchronous wake-ups; older ones refuse them
    // and the notifier works with ordinary ones (as above).
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let mut version = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (version.next().unwrap_or(0), version.next().unwrap_or(0));
    let sync = rig.handle.as_ref().unwrap().sync_wake_up();
    assert_eq!(sync, Some((major, minor) >= (6, 6)), "kernel {}", release.trim());
    let second = rig.next();
    let (path, argv, ..) = exec_of(&second);
    assert_eq!(path, "/bin/sh");
    assert_eq!(argv, ["/bin/sh", "-c", "touch \"$0\"", allowed.to_str().unwrap()]);
}

#[test]
fn relative_paths_and_execveat_dirfds_are_resolved() {
    require!(Need::Root);
    let (_dir, dir) = tempdir();
    fs::create_dir(dir.join("sub")).unwrap();
    let exe = dir.join("sub/t");
    // A script, not a copy of /bin/true: where /bin/true is a multi-call binary (busybox
    // in the test VM) a copy named `t` does not know what to be.
    fs::write(&exe, "#!/bin/sh\nexit 0\n").unwrap();
    fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let dirfd = fs::File::open(dir.join("sub")).unwrap();
    let mut rig = Rig::start();
    let mut cmd = Command::new("./sub/./t");
    cmd.current_dir(&dir);
    rig.arm(&mut cmd);
    let probes = vec![
        // execveat(dirfd, "t"): denied by argv, resolved against the dirfd.
        Probe::new(Some(dirfd.as_raw_fd()), "t", &["t", "-rf"], 0),
        // execve of a relative name: resolved against the cwd.
        Probe::new(None, "sub/t", &["t", "-rf"], 0),
    ];
    let (r, w) = add_probes(&mut cmd, probes);
    let mut child = rig.spawn(&mut cmd).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(errnos(r, w), vec![libc::EPERM, libc::EPERM]);
    let expected = exe.to_str().unwrap();
    for request in [rig.next(), rig.next()] {
        let (path, argv, fileless, id) = exec_of(&request);
        assert_eq!((path, argv, fileless), (expected, &["t".to_string(), "-rf".into()][..], false));
        assert_eq!(id, identity(&exe));
        let RequestKind::Exec { interpreter, .. } = &request.kind else { unreachable!() };
        assert_eq!(interpreter.as_deref(), Some("/bin/sh"), "read from the script's #! line");
    }
    let own = rig.next();
    assert_eq!(exec_of(&own).0, expected, "`./sub/./t` from the cwd");
}

#[test]
fn a_fileless_exec_is_marked_and_the_deny_filter_refuses_it_first() {
    require!(Need::Root);
    let target = fs::File::open("/bin/true").unwrap();
    // Listener only: the notifier sees it, marked fileless, and the decider denies it.
    let mut rig = Rig::start();
    let mut cmd = Command::new("/bin/true");
    rig.arm(&mut cmd);
    let (r, w) = add_probes(&mut cmd, vec![Probe::new(Some(target.as_raw_fd()), "", &["true"], libc::AT_EMPTY_PATH)]);
    let mut child = rig.spawn(&mut cmd).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(errnos(r, w), vec![libc::EPERM]);
    let request = rig.next();
    let (path, _, fileless, id) = exec_of(&request);
    assert!(fileless, "execveat(AT_EMPTY_PATH) must be marked fileless");
    assert!(path.starts_with('/'), "{path}");
    assert_eq!(id, identity(Path::new("/bin/true")));
    assert!(!exec_of(&rig.next()).2, "the command's own exec is not fileless");

    // With the rings' deny filter below the listener (as in rings 1-3), its ERRNO outranks
    // USER_NOTIF: the call fails before the supervisor ever hears of it.
    let deny = agt_jail_jail::seccomp::SeccompPolicy::default()
        .build(agt_jail_jail::seccomp::Arch::native().unwrap())
        .unwrap();
    let mut rig = Rig::start();
    let mut cmd = Command::new("/bin/true");
    // SAFETY: seccomp(2) on a filter the child's copy of memory holds; no allocation.
    unsafe {
        cmd.pre_exec(move || {
            let prog = libc::sock_fprog { len: deny.len() as u16, filter: deny.as_ptr().cast_mut() };
            if libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &prog) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    rig.arm(&mut cmd);
    let probes = vec![Probe::new(Some(target.as_raw_fd()), "", &["true"], libc::AT_EMPTY_PATH)];
    let (r, w) = add_probes(&mut cmd, probes);
    let mut child = rig.spawn(&mut cmd).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(errnos(r, w), vec![libc::EPERM]);
    let seen: Vec<_> = std::iter::once(rig.next()).chain(rig.all()).collect();
    assert!(seen.iter().all(|r| !exec_of(r).2), "the deny filter must refuse it first: {seen:?}");
}

#[test]
fn a_dropped_reply_denies() {
    require!(Need::Root);
    let (_dir, dir) = tempdir();
    let marker = dir.join("dropped");
    let mut rig = Rig::start();
    let mut cmd = Command::new("/bin/true");
    rig.arm(&mut cmd);
    let argv = ["sh", "-c", "touch \"$0\"", marker.to_str().unwrap(), "drop-me"];
    let (r, w) = add_probes(&mut cmd, vec![Probe::new(None, "/bin/sh", &argv, 0)]);
    let mut child = rig.spawn(&mut cmd).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(errnos(r, w), vec![libc::EPERM]);
    assert!(!marker.exists());
}

#[test]
fn oversize_argv_is_denied_without_asking() {
    require!(Need::Root);
    let mut rig = Rig::start();
    let mut cmd = Command::new("/bin/true");
    rig.arm(&mut cmd);
    let many: Vec<&str> = std::iter::repeat_n("x", 5000).collect();
    let (r, w) = add_probes(&mut cmd, vec![Probe::new(None, "/bin/true", &many, 0)]);
    let mut child = rig.spawn(&mut cmd).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(errnos(r, w), vec![libc::EPERM]);
    let error = rig.errors.recv_timeout(HANG).unwrap();
    assert!(error.contains("more than 4096 arguments"), "{error}");
    // The decider only heard of the allowed exec.
    let request = rig.next();
    let (_, argv, ..) = exec_of(&request);
    assert_eq!(argv, ["/bin/true"]);
    assert!(rig.all().is_empty());
}

#[test]
fn a_late_answer_from_another_thread_works_while_other_execs_are_served() {
    require!(Need::Root);
    let (_dir, dir) = tempdir();
    let (late, quick) = (dir.join("late"), dir.join("quick"));
    let mut rig = Rig::start();
    let mut cmd = Command::new("/bin/sh");
    let script = "/bin/sh -c 'touch \"$0\"' \"$0\" approve-me & /bin/touch \"$1\"; wait";
    cmd.args(["-c", script, late.to_str().unwrap(), quick.to_str().unwrap()]);
    rig.arm(&mut cmd);
    let mut child = rig.spawn(&mut cmd).unwrap();
    // The entry, then (in either order) the held exec and the quick one.
    let mut held_seen = false;
    let mut quick_seen = false;
    while !(held_seen && quick_seen) {
        let request = rig.next();
        let (_, argv, ..) = exec_of(&request);
        held_seen |= argv.iter().any(|a| a == "approve-me");
        quick_seen |= argv.first().is_some_and(|a| a == "/bin/touch");
    }
    // The quick exec was answered while the other one waits; now approve from elsewhere.
    assert!(!late.exists());
    // The agent holds no listener (it could answer its own execs): only agt-jail does.
    for entry in fs::read_dir(format!("/proc/{}/fd", child.id())).unwrap() {
        let link = fs::read_link(entry.unwrap().path()).unwrap_or_default();
        assert!(!link.to_string_lossy().contains("seccomp"), "the agent holds {}", link.display());
    }
    let reply = rig.decider.held.lock().unwrap().pop().unwrap();
    std::thread::spawn(move || reply.answer(Answer::Allow)).join().unwrap();
    assert!(child.wait().unwrap().success());
    assert!(late.exists(), "the approved exec did not run");
    assert!(quick.exists());
}

#[test]
fn stopping_the_supervisor_fails_the_pending_exec_and_every_later_one() {
    require!(Need::Root);
    let (_dir, dir) = tempdir();
    let (pending, later) = (dir.join("pending"), dir.join("later"));
    let mut rig = Rig::start();
    let mut cmd = sh_touch(&later);
    rig.arm(&mut cmd);
    let argv = ["sh", "-c", "touch \"$0\"", pending.to_str().unwrap(), "approve-me"];
    let (r, w) = add_probes(&mut cmd, vec![Probe::new(None, "/bin/sh", &argv, 0)]);
    // spawn returns only when the command's own exec has been answered: run it aside.
    let child_end = rig.child_end.take();
    let spawner = std::thread::spawn(move || {
        let result = cmd.spawn();
        drop(child_end);
        result
    });
    let request = rig.next();
    let (_, argv, ..) = exec_of(&request);
    assert!(argv.iter().any(|a| a == "approve-me"));
    // The supervisor goes away (a dead agt-jail closes the listener the same way).
    rig.handle.take().unwrap().stop().unwrap();
    let spawned = spawner.join().unwrap();
    let err = spawned.expect_err("the command's exec must fail once nobody answers");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSYS), "{err}");
    assert_eq!(errnos(r, w), vec![libc::ENOSYS], "the pending exec fails");
    assert!(!pending.exists() && !later.exists(), "nothing runs without an answer");
    // A late answer to a closed listener is a no-op.
    rig.decider.held.lock().unwrap().pop().unwrap().answer(Answer::Allow);
}

#[test]
fn when_the_receiving_process_is_killed_the_exec_fails_and_does_not_run() {
    require!(Need::Root);
    let (_dir, dir) = tempdir();
    let (pending, later) = (dir.join("pending"), dir.join("later"));
    // The "supervisor" is another process holding the parent end (fd 3) and never
    // answering; the listener the agent sends sits in its socket until it dies.
    let (parent, child_end) = UnixStream::pair().unwrap();
    let parent_fd = parent.as_raw_fd();
    let mut holder = Command::new("/bin/sleep");
    holder.arg("600").stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    // SAFETY: dup2(2)/fcntl(2) in the forked child before exec. dup2 onto itself keeps
    // close-on-exec, so fd 3 itself has the flag cleared instead.
    unsafe {
        holder.pre_exec(move || {
            let rc = if parent_fd == 3 { libc::fcntl(3, libc::F_SETFD, 0) } else { libc::dup2(parent_fd, 3) };
            if rc < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    /// Kills the holder however the test ends.
    struct Reaper(Child);
    impl Drop for Reaper {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut holder = Reaper(holder.spawn().unwrap());
    drop(parent);
    let mut cmd = sh_touch(&later);
    agt_jail_jail::notify_execs(&mut cmd, child_end.as_raw_fd()).unwrap();
    // Once the listener is in flight to the holder, the child says so (then execs).
    let (mut ready, ready_w) = pipe();
    let ready_fd = ready_w.as_raw_fd();
    // SAFETY: write(2) of a stack byte in the forked child before exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::write(ready_fd, b"r".as_ptr().cast(), 1);
            Ok(())
        });
    }
    let argv = ["sh", "-c", "touch \"$0\"", pending.to_str().unwrap()];
    let (r, w) = add_probes(&mut cmd, vec![Probe::new(None, "/bin/sh", &argv, 0)]);
    let spawner = std::thread::spawn(move || {
        let result = cmd.spawn();
        drop((child_end, ready_w));
        result
    });
    let mut byte = [0u8; 1];
    ready.read_exact(&mut byte).unwrap();
    // The agent's exec is pending now or comes next: both must fail once the holder dies.
    holder.0.kill().unwrap();
    holder.0.wait().unwrap();
    let err = spawner.join().unwrap().expect_err("no exec may run once the supervisor is dead");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSYS), "{err}");
    assert_eq!(errnos(r, w), vec![libc::ENOSYS]);
    assert!(!pending.exists() && !later.exists(), "nothing runs without an answer");
}

#[test]
fn the_jail_ring3_path_asks_before_the_entry_command_runs() {
    require!(Need::Root, Need::Ring3);
    use agt_jail_jail::{launch, JailConfig, LaunchError, Profile};
    let profile = Profile::builtin(3).unwrap();
    let enforcement = match launch::check_enforcement(&profile) {
        Ok(e) => e,
        Err(e) => panic!("ring 3 cannot be enforced here: {e}"),
    };
    let run = |program: &str, argv: &[&str]| {
        let mut rig = Rig::start();
        let cfg = JailConfig {
            profile: profile.clone(),
            program: program.into(),
            argv: argv.iter().map(|a| (*a).into()).collect(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            workspace: None,
            allow_exec: vec![],
            cgroup_procs: vec![],
            cgroup_dir: None,
            home: None,
            rootless: false,
            tty: None,
            tty_path: None,
            exec_notify: rig.child_end.as_ref().map(|s| s.as_raw_fd()),
            egress: None,
            resolv_conf: None,
        };
        let started = launch::launch(&cfg, &enforcement);
        rig.child_end = None;
        let status = started.map(|jail| jail.wait().unwrap());
        (status, rig.next(), rig)
    };
    let (status, request, _rig) = run("/bin/true", &["true", "ok"]);
    assert_eq!(status.unwrap(), 0);
    let (path, argv, fileless, id) = exec_of(&request);
    assert_eq!((path, argv, fileless), ("/bin/true", &["true".to_string(), "ok".into()][..], false));
    assert_eq!(id, identity(Path::new("/bin/true")), "the jail's bind shows the host file");
    assert_ne!(request.pid, std::process::id());

    let (status, request, _rig) = run("/bin/echo", &["echo", "-rf"]);
    assert!(matches!(status, Err(LaunchError::NotExecutable { .. })), "{status:?}");
    assert_eq!(exec_of(&request).1, ["echo", "-rf"]);
}

/// Cost per exec with the notifier (always-allow decider) and without: 2000 fork+exec of
/// /bin/true from one shell. Prints numbers, asserts nothing about time.
#[test]
#[ignore = "measurement: cargo test -p agt-jail-supervisor --test exec_notify -- --ignored --nocapture"]
fn measure_exec_cost() {
    require!(Need::Root);
    struct AllowAll;
    impl Decider for AllowAll {
        fn decide(&self, _: Request, reply: Reply) {
            reply.answer(Answer::Allow);
        }
    }
    let script = "i=0; while [ $i -lt 2000 ]; do /bin/true; i=$((i+1)); done";
    let time = |notify: bool| {
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", script]);
        let (parent, child) = UnixStream::pair().unwrap();
        let handle = notify.then(|| ExecNotifier::start(OwnedFd::from(parent), Arc::new(AllowAll)).unwrap());
        if notify {
            agt_jail_jail::notify_execs(&mut cmd, child.as_raw_fd()).unwrap();
        }
        let start = Instant::now();
        let status = cmd.spawn().unwrap().wait().unwrap();
        let elapsed = start.elapsed();
        assert!(status.success());
        drop(handle);
        elapsed
    };
    // Alternate the two, several rounds; min and median per exec (the host is shared).
    let (mut plain, mut notified) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        plain.push(time(false).as_secs_f64() * 1e6 / 2000.0);
        notified.push(time(true).as_secs_f64() * 1e6 / 2000.0);
    }
    for v in [&mut plain, &mut notified] {
        v.sort_by(f64::total_cmp);
    }
    println!("without notifier: min {:.0} us/exec, median {:.0} us/exec", plain[0], plain[3]);
    println!("with notifier:    min {:.0} us/exec, median {:.0} us/exec", notified[0], notified[3]);
    println!(
        "overhead:         min {:.0} us/exec, median {:.0} us/exec",
        notified[0] - plain[0],
        notified[3] - plain[3]
    );
}
