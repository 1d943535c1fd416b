//! The fanotify file plane against a real private mount namespace (as root).
//!
//! Each test starts an "agent": a Python process in its own mount namespace
//! (`unshare --mount`) with a temporary directory `src` bind-mounted at `view`, waiting for
//! commands on a pipe. The guard marks the agent's mounts; the test decider denies reads
//! of `*id_rsa` and writes of `*locked`, drops the reply for `*drop`, hands `*late` and
//! `*hold` to the test, and caches `*cached` with `allow_always`.
#![allow(clippy::unwrap_used)]

use std::{
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{mpsc, Arc, Mutex, OnceLock},
};

use agt_jail_supervisor::{
    fanotify::{self, FileGuard, FileGuardHandle, FileGuardOptions},
    Answer, Decider, FileAccess, Reply, Request, RequestKind,
};
use agt_jail_test_support::{require, Need};

const AGENT: &str = r#"
import os, sys, time
modes = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}
print("ready", os.getpid(), flush=True)
for line in sys.stdin:
    cmd = line.split()
    try:
        if cmd[0] == "open":
            fd = os.open(cmd[1], modes[cmd[2]])
            n = len(os.read(fd, 4096)) if cmd[2] != "w" else 0
            os.close(fd)
            print("ok", n, flush=True)
        elif cmd[0] == "loop":
            path, count = cmd[1], int(cmd[2])
            start = time.perf_counter_ns()
            for _ in range(count):
                os.close(os.open(path, os.O_RDONLY))
            print("done", time.perf_counter_ns() - start, flush=True)
    except OSError as e:
        print("err", e.errno, flush=True)
"#;

fn python() -> String {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            // Resolve the interpreter once: version-manager shims are scripts that would
            // open files through the marked mounts on every start.
            let out = Command::new("python3").args(["-c", "import sys; print(sys.executable)"]).output().unwrap();
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        })
        .clone()
}

struct Agent {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pid: u32,
    src: PathBuf,
    view: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    fn spawn() -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let view = dir.path().join("view");
        std::fs::create_dir(&src).unwrap();
        std::fs::create_dir(&view).unwrap();
        for (name, content) in [
            ("id_rsa", "secret-key"),
            ("notes", "hello"),
            ("locked", "lock"),
            ("x.drop", "d"),
            ("x.late", "late!"),
            ("x.hold", "h"),
            ("cached", "cache"),
            ("cached2", "cache2"),
        ] {
            std::fs::write(src.join(name), content).unwrap();
        }
        let mut child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$1" "$2" && cd "$2" && exec "$3" -u -c "$4""#)
            .arg("sh")
            .args([&src, &view])
            .arg(python())
            .arg(AGENT)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let pid: u32 =
            line.strip_prefix("ready ").unwrap_or_else(|| panic!("agent said {line:?}")).trim().parse().unwrap();
        assert_eq!(pid, child.id(), "the agent runs as the spawned process");
        Agent { child, stdin, stdout, pid, src, view, _dir: dir }
    }

    fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
    }

    fn answer(&mut self) -> String {
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the agent exited");
        line.trim().to_string()
    }

    fn run(&mut self, command: &str) -> String {
        self.send(command);
        self.answer()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct TestDecider {
    seen: Mutex<Vec<Request>>,
    handle: OnceLock<FileGuardHandle>,
    handed_over: Mutex<Option<mpsc::Sender<(Request, Reply)>>>,
}

impl Decider for TestDecider {
    fn decide(&self, request: Request, reply: Reply) {
        self.seen.lock().unwrap().push(request.clone());
        let RequestKind::File { path, access, .. } = &request.kind else {
            return; // dropped: deny
        };
        let denied_read = path.ends_with("id_rsa") && *access != FileAccess::Write;
        let denied_write = path.ends_with("locked") && access.writes();
        if denied_read || denied_write {
            reply.answer(Answer::Deny);
        } else if path.ends_with("drop") {
            drop(reply);
        } else if path.ends_with("late") || path.ends_with("hold") {
            let sender = self.handed_over.lock().unwrap().clone().unwrap();
            sender.send((request, reply)).unwrap();
        } else {
            if path.ends_with("cached") {
                self.handle.get().unwrap().allow_always(&request).unwrap();
            }
            if path.ends_with("cached2") {
                let RequestKind::File { identity: Some(identity), .. } = &request.kind else { panic!("no identity") };
                self.handle.get().unwrap().allow_always_identity(*identity).unwrap();
            }
            reply.answer(Answer::Allow);
        }
    }
}

impl TestDecider {
    fn requests_for(&self, suffix: &str) -> Vec<Request> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| matches!(&r.kind, RequestKind::File { path, .. } if path.ends_with(suffix)))
            .cloned()
            .collect()
    }
}

/// Starts an agent and a guard on it; `None` (after a recorded skip) when the kernel has
/// no fanotify permission events.
type Setup = (Agent, FileGuard, Arc<TestDecider>, mpsc::Receiver<(Request, Reply)>);

fn setup(test: &str) -> Option<Setup> {
    if let Err(err) = fanotify::probe() {
        assert!(err.is_unavailable(), "{err}");
        agt_jail_test_support::unmet(test, &err.to_string());
        return None;
    }
    let agent = Agent::spawn();
    let decider = Arc::new(TestDecider::default());
    let (tx, rx) = mpsc::channel();
    *decider.handed_over.lock().unwrap() = Some(tx);
    let guard = guard_for(&agent, &decider);
    Some((agent, guard, decider, rx))
}

/// A guard over `agent` whose decisions `decider` makes (it keeps the guard's handle).
fn guard_for(agent: &Agent, decider: &Arc<TestDecider>) -> FileGuard {
    let for_guard = decider.clone();
    FileGuard::start_with(
        agent.pid,
        move |handle| {
            for_guard.handle.set(handle).unwrap();
            for_guard as Arc<dyn Decider>
        },
        FileGuardOptions::default(),
    )
    .unwrap()
}

fn file_request(request: &Request) -> (&str, FileAccess) {
    match &request.kind {
        RequestKind::File { path, access, .. } => (path.as_str(), *access),
        other => panic!("not a file request: {other:?}"),
    }
}

#[test]
fn reads_of_id_rsa_and_writes_of_locked_are_denied_and_the_rest_is_allowed() {
    require!(Need::Root);
    let Some((mut agent, guard, decider, _rx)) = setup("reads_of_id_rsa_and_writes_of_locked_are_denied") else {
        return;
    };
    assert_eq!(agent.run("open id_rsa r"), "err 1", "a read of id_rsa fails with EPERM, no bytes");
    assert_eq!(agent.run("open notes r"), "ok 5", "another file reads");
    assert_eq!(agent.run("open locked w"), "err 1", "a write-open of locked fails with EPERM");
    assert_eq!(agent.run("open locked r"), "ok 4", "its read-open works");
    assert_eq!(agent.run("open locked rw"), "err 1", "read-write is a write");

    let view = agent.view.to_str().unwrap().to_string();
    let id_rsa = decider.requests_for("id_rsa");
    assert_eq!(id_rsa.len(), 1);
    // Opened relative to the agent's cwd; reported as the absolute path the agent sees.
    assert_eq!(file_request(&id_rsa[0]), (format!("{view}/id_rsa").as_str(), FileAccess::Read));
    assert_eq!(id_rsa[0].pid, agent.pid);
    assert_eq!(id_rsa[0].plane, "fanotify");
    let locked: Vec<FileAccess> = decider.requests_for("locked").iter().map(|r| file_request(r).1).collect();
    // A write-only open is Write where the opener's flags can be read from
    // /proc/<tid>/syscall; where they cannot (seen on the 6.1 guest) the plane falls back
    // to the stricter ReadWrite. A read-only open must never be reported as anything else.
    assert!(matches!(locked.first(), Some(FileAccess::Write | FileAccess::ReadWrite)), "{locked:?}");
    if !agt_jail_test_support::in_vm() {
        assert_eq!(locked.first(), Some(&FileAccess::Write), "this host reads the opener's flags");
    }
    assert_eq!(locked.get(1..), Some(&[FileAccess::Read, FileAccess::ReadWrite][..]));
    guard.stop().unwrap();
}

#[test]
fn host_processes_opening_the_same_file_through_the_host_mount_are_not_held() {
    require!(Need::Root);
    let Some((mut agent, guard, decider, _rx)) = setup("host_processes_opening_the_same_file") else {
        return;
    };
    let host_path = agent.src.join("id_rsa");
    let cat = Command::new("cat").arg(&host_path).output().unwrap();
    assert!(cat.status.success());
    assert_eq!(cat.stdout, b"secret-key", "the host reads the file the jail may not read");
    assert!(decider.requests_for("id_rsa").is_empty(), "the host's open was not asked at all");
    // The guard is active: the same file through the jail's mount is held and denied.
    assert_eq!(agent.run("open id_rsa r"), "err 1");
    assert_eq!(decider.requests_for("id_rsa").len(), 1);
    guard.stop().unwrap();
}

#[test]
fn an_allow_always_file_is_not_asked_again() {
    require!(Need::Root);
    let Some((mut agent, guard, decider, _rx)) = setup("an_allow_always_file_is_not_asked_again") else {
        return;
    };
    assert_eq!(agent.run("open cached r"), "ok 5");
    assert_eq!(agent.run("open cached r"), "ok 5");
    assert_eq!(agent.run("open cached w"), "ok 0");
    assert_eq!(agent.run(&format!("open {}/cached rw", agent.view.display())), "ok 5");
    assert_eq!(decider.requests_for("cached").len(), 1, "asked once, then cached");
    assert_eq!(agent.run("open cached2 r"), "ok 6");
    assert_eq!(agent.run("open cached2 rw"), "ok 6");
    assert_eq!(decider.requests_for("cached2").len(), 1, "cached by identity alone");
    // The control: an uncached file is asked every time.
    assert_eq!(agent.run("open notes r"), "ok 5");
    assert_eq!(agent.run("open notes r"), "ok 5");
    assert_eq!(decider.requests_for("notes").len(), 2);
    // Forgetting drops the cache.
    guard.handle().forget_allowed().unwrap();
    assert_eq!(agent.run("open cached r"), "ok 5");
    assert_eq!(decider.requests_for("cached").len(), 2);
    guard.stop().unwrap();
}

#[test]
fn a_dropped_reply_denies_and_a_late_answer_from_another_thread_works() {
    require!(Need::Root);
    let Some((mut agent, guard, _decider, rx)) = setup("a_dropped_reply_denies_and_a_late_answer") else {
        return;
    };
    assert_eq!(agent.run("open x.drop r"), "err 1", "an unanswered (dropped) reply denies");
    agent.send("open x.late r");
    let (request, reply) = rx.recv().unwrap();
    assert_eq!(file_request(&request).0, format!("{}/x.late", agent.view.display()));
    std::thread::spawn(move || reply.answer(Answer::Allow)).join().unwrap();
    assert_eq!(agent.answer(), "ok 5", "the late allow from another thread lets the open through");
    guard.stop().unwrap();
}

/// `fanotify mnt_id:` mark lines of every fanotify fd of this process, as mount ids.
fn marks_in_this_process() -> Vec<u64> {
    let mut ids = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fdinfo").unwrap().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        for line in text.lines().filter(|l| l.starts_with("fanotify ")) {
            if let Some(hex) = line.split_whitespace().find_map(|f| f.strip_prefix("mnt_id:")) {
                ids.push(u64::from_str_radix(hex, 16).unwrap());
            }
        }
    }
    ids
}

#[test]
fn stopping_the_guard_denies_held_opens_and_leaves_nothing_marked() {
    require!(Need::Root);
    let Some((mut agent, guard, decider, rx)) = setup("stopping_the_guard_denies_held_opens") else {
        return;
    };
    let marked = guard.marked_mounts().to_vec();
    assert!(!marked.is_empty());
    assert!(marked.iter().all(|id| marks_in_this_process().contains(id)));
    agent.send("open x.hold r");
    let (_request, held) = rx.recv().unwrap(); // the open is now held, its reply with us
    guard.stop().unwrap();
    assert_eq!(agent.answer(), "err 1", "stopping denied the held open");
    held.answer(Answer::Allow); // too late: does nothing
    let asked = decider.seen.lock().unwrap().len();
    assert_eq!(agent.run("open notes r"), "ok 5", "after stop opens are not held");
    assert_eq!(decider.seen.lock().unwrap().len(), asked, "and not asked");
    let left: Vec<u64> = marks_in_this_process().into_iter().filter(|id| marked.contains(id)).collect();
    assert!(left.is_empty(), "marks left on the jail's mounts: {left:?}");
}

fn loop_ns(agent: &mut Agent, path: &Path, count: u32) -> u64 {
    let answer = agent.run(&format!("loop {} {count}", path.display()));
    answer.strip_prefix("done ").unwrap_or_else(|| panic!("loop: {answer}")).parse().unwrap()
}

/// Cost of one open+close (report only: `cargo test --test fanotify -- --ignored --nocapture`).
#[test]
#[ignore = "measurement: cargo test --release -p agt-jail-supervisor --test fanotify -- --ignored --nocapture"]
fn measure_open_close_cost() {
    require!(Need::Root);
    const N: u32 = 100_000;
    let Some(mut agent) = fanotify::probe().ok().map(|()| Agent::spawn()) else {
        agt_jail_test_support::unmet("measure_open_close_cost", "fanotify permission events unavailable");
        return;
    };
    let in_jail = agent.view.join("notes");
    let cached = agent.view.join("cached");
    let per = |ns: u64| ns as f64 / f64::from(N);
    let unguarded = loop_ns(&mut agent, &in_jail, N);

    let decider = Arc::new(TestDecider::default());
    let guard = guard_for(&agent, &decider);
    let guarded = loop_ns(&mut agent, &in_jail, N);
    assert_eq!(decider.requests_for("notes").len(), N as usize, "every open was asked");
    let cached_ns = loop_ns(&mut agent, &cached, N);
    assert_eq!(decider.requests_for("cached").len(), 1);

    // A process outside the jail (host mount namespace), same file, while the guard runs.
    let mut outside =
        Command::new(python()).args(["-u", "-c", AGENT]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut out_stdin = outside.stdin.take().unwrap();
    let mut out_stdout = BufReader::new(outside.stdout.take().unwrap());
    let mut line = String::new();
    out_stdout.read_line(&mut line).unwrap();
    writeln!(out_stdin, "loop {} {N}", agent.src.join("notes").display()).unwrap();
    line.clear();
    out_stdout.read_line(&mut line).unwrap();
    let outside_ns: u64 = line.trim().strip_prefix("done ").unwrap().parse().unwrap();
    drop(out_stdin);
    outside.wait().unwrap();
    guard.stop().unwrap();
    println!("open+close of one file, {N} iterations, per iteration:");
    println!("  in the jail, no guard:             {:>10.0} ns", per(unguarded));
    println!("  in the jail, guard, no cache:      {:>10.0} ns", per(guarded));
    println!("  in the jail, guard, allow_always:  {:>10.0} ns", per(cached_ns));
    println!("  outside the jail, guard running:   {:>10.0} ns", per(outside_ns));
}
