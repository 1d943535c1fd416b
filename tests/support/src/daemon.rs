//! A host daemon of a test's own: `agt-jail daemon` on a runtime directory under
//! /run/agt-jail (so the jails' view hides it as it hides the real one), with a group file
//! of its own, its log in a scratch directory, and commands pointed at its socket with
//! `AGT_JAIL_SOCKET`. Other `agt-jail exec` runs on the machine are not affected. Dropped,
//! it ends every supervisor on its record and itself.
#![allow(clippy::unwrap_used)]

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// A gid no account on the build machines uses, for the test's agt-jail group.
pub const TEST_GID: u32 = 64_999;

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct TestDaemon {
    child: Option<Child>,
    bin: PathBuf,
    args: Vec<String>,
    pub run_dir: PathBuf,
    log: PathBuf,
    group_file: PathBuf,
}

impl TestDaemon {
    /// Starts `bin daemon ARGS` with `members` in its agt-jail group and waits until it is
    /// ready.
    pub fn start(bin: &str, members: &str, args: &[&str]) -> TestDaemon {
        Self::start_with(bin, members, args, &[])
    }

    /// [`TestDaemon::start`] with `env` added to the daemon's environment.
    pub fn start_with(bin: &str, members: &str, args: &[&str], env: &[(&str, &str)]) -> TestDaemon {
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!("{}-{n}", std::process::id());
        let run_dir = PathBuf::from(format!("/run/agt-jail/test-{tag}"));
        let _ = std::fs::remove_dir_all(&run_dir);
        std::fs::create_dir_all(&run_dir).unwrap();
        let scratch = std::env::temp_dir().join(format!("agt-jail-daemon-test-{tag}"));
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).unwrap();
        let group_file = scratch.join("group");
        std::fs::write(&group_file, format!("root:x:0:\nagt-jail:x:{TEST_GID}:{members}\n")).unwrap();
        let mut daemon = TestDaemon {
            child: None,
            bin: bin.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            run_dir,
            log: scratch.join("daemon.log"),
            group_file,
        };
        daemon.spawn_with(env);
        daemon
    }

    pub fn socket(&self) -> PathBuf {
        self.run_dir.join("agt.sock")
    }

    /// The running daemon's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts (again) the daemon on the same runtime directory and waits until it is ready.
    pub fn spawn(&mut self) {
        self.spawn_with(&[]);
    }

    pub fn spawn_with(&mut self, env: &[(&str, &str)]) {
        let readies = self.log_text().matches("ready:").count();
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(&self.bin)
            .arg("daemon")
            .args(&self.args)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg("--group-file")
            .arg(&self.group_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .envs(env.iter().copied())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.log_text().matches("ready:").count() == readies {
            assert!(Instant::now() < deadline, "daemon not ready: {}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon process, for a test that ends it itself.
    pub fn take_child(&mut self) -> Option<Child> {
        self.child.take()
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// `agt-jail ARGS` pointed at this daemon.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).env("AGT_JAIL_SOCKET", self.socket());
        cmd
    }

    /// Kills agent `name` through this daemon and waits for its client to end.
    pub fn kill_and_wait(&self, name: &str, client: &mut Child) {
        let out = self.cmd(&["kill", "--agent", name]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let deadline = Instant::now() + Duration::from_secs(30);
        while client.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the killed agent's client never ended");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `agt-jail ps` through this daemon.
    pub fn ps(&self) -> String {
        let out = self.cmd(&["ps"]).output().unwrap();
        assert!(out.status.success(), "ps: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits until `ps` shows a line containing `needle`; returns the agent's name.
    pub fn wait_listed(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ps = self.ps();
            if let Some(line) = ps.lines().find(|l| l.contains(needle)) {
                return line.split_whitespace().next().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "{needle} never listed:\n{ps}\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        // A failed test leaves no agent behind: SIGTERM to every supervisor on record
        // (each forwards it to its agent).
        for entry in std::fs::read_dir(self.run_dir.join("agents")).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            if let Some(pid) = record_pid(&text) {
                // SAFETY: kill takes plain integers; the pid is a supervisor this test launched.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: SIGTERM to our own child, which has not been waited for.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.run_dir);
        if let Some(scratch) = self.log.parent() {
            let _ = std::fs::remove_dir_all(scratch);
        }
    }
}

/// The supervisor pid of an agent record (`"pid": N`), without a JSON parser.
fn record_pid(text: &str) -> Option<i32> {
    let at = text.find("\"pid\":")? + "\"pid\":".len();
    let digits: String = text[at..].trim_start().chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok().filter(|pid| *pid > 0)
}
