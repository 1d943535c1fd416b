//! The governed start-up rows of `cargo xtask bench`: what a harness that wraps every tool
//! call in `agt-jail exec` pays, standalone and through a host daemon, beside bwrap in the
//! same interleaved rounds. Two commands (issue 16): ring 3 with limits and an events
//! file, and ring 2 under the coding-agent policy with an events file. The standalone
//! rows also get their peak memory (the largest `ru_maxrss` of the run's process tree,
//! from wait4).
use std::{
    fs,
    os::unix::{net::UnixStream, process::ExitStatusExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use super::{ms, percentile, BWRAP};

/// One row: the command line and the socket it may use (None: no daemon in sight).
struct Row {
    name: String,
    argv: Vec<String>,
    socket: Option<PathBuf>,
    samples: Vec<Duration>,
}

/// A daemon of the bench's own, on a run directory of its own (so a host daemon, if one
/// runs, is neither used nor disturbed). Killed when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
}

impl Daemon {
    fn start(bin: &Path, run_dir: &Path) -> Result<Self> {
        let child = Command::new(bin)
            .args(["daemon", "--run-dir"])
            .arg(run_dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start agt-jail daemon")?;
        let mut daemon = Daemon { child, socket: run_dir.join("agt.sock") };
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&daemon.socket).is_err() {
            if let Some(status) = daemon.child.try_wait()? {
                bail!("agt-jail daemon ended before it listened ({status})");
            }
            if Instant::now() > deadline {
                bail!("agt-jail daemon did not listen on {} within 30 s", daemon.socket.display());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM lets it remove its socket; no agent is left running by then.
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: kill(2) on the pid of a child this process has not reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let _ = self.child.wait();
    }
}

/// Runs `row` once: wall time from spawn to exit, and the peak RSS in KiB of the
/// process tree (the child and the descendants it waited for).
fn once(row: &Row) -> Result<(Duration, u64)> {
    let mut command = Command::new(&row.argv[0]);
    command.args(&row.argv[1..]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    match &row.socket {
        Some(socket) => command.env("AGT_JAIL_SOCKET", socket),
        None => command.env_remove("AGT_JAIL_SOCKET"),
    };
    let start = Instant::now();
    let child = command.spawn().with_context(|| format!("cannot run {}", row.argv[0]))?;
    let pid = i32::try_from(child.id()).context("pid out of range")?;
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let mut status = 0;
    // SAFETY: wait4 on our own unreaped child, with valid pointers to locals.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let elapsed = start.elapsed();
    if rc != pid {
        bail!("wait4 on {} failed: {}", row.name, std::io::Error::last_os_error());
    }
    let stderr = child.stderr.map(|mut e| {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut e, &mut text);
        text
    });
    let status = std::process::ExitStatus::from_raw(status);
    if !status.success() {
        bail!("{} failed with {status}: {}", row.argv.join(" "), stderr.unwrap_or_default().trim());
    }
    Ok((elapsed, u64::try_from(usage.ru_maxrss).unwrap_or(0)))
}

/// The section's table rows and its text, for `runs` interleaved rounds.
pub fn section(bin: &Path, runs: usize) -> Result<String> {
    let root = crate::util::repo_root();
    let scratch = std::env::temp_dir().join(format!("agt-jail-bench-{}", std::process::id()));
    fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    let daemon = Daemon::start(bin, &scratch.join("run"))?;
    let policy = root.join("policies/coding-agent/policy.yaml");
    let commands: [(&str, Vec<String>); 2] = [
        (
            "ring 3 --memory 256M --pids 64 --events F",
            ["--ring", "3", "--memory", "256M", "--pids", "64"].map(String::from).to_vec(),
        ),
        (
            "ring 2 --policy coding-agent --events F",
            vec!["--ring".into(), "2".into(), "--policy".into(), policy.display().to_string()],
        ),
    ];
    let mut rows = vec![Row {
        name: "bwrap (equivalent isolation)".into(),
        argv: BWRAP.iter().map(|s| s.to_string()).collect(),
        socket: None,
        samples: Vec::new(),
    }];
    for (index, (name, flags)) in commands.iter().enumerate() {
        for through_daemon in [false, true] {
            let events = scratch.join(format!("events-{index}-{through_daemon}.jsonl"));
            let mut argv = vec![bin.display().to_string(), "exec".into()];
            if !through_daemon {
                argv.push("--standalone".into());
            }
            argv.extend(flags.iter().cloned());
            argv.extend(["--events".into(), events.display().to_string(), "--".into(), "/bin/true".into()]);
            rows.push(Row {
                name: format!(
                    "agt-jail exec {name}, {}",
                    if through_daemon { "through the daemon" } else { "standalone" }
                ),
                argv,
                socket: Some(daemon.socket.clone()),
                samples: Vec::new(),
            });
        }
    }
    let mut peak: Vec<Vec<u64>> = vec![Vec::new(); rows.len()];
    for row in &rows {
        for _ in 0..5 {
            once(row)?;
        }
    }
    for _ in 0..runs {
        for (row, peak) in rows.iter_mut().zip(peak.iter_mut()) {
            let (elapsed, rss) = once(row)?;
            row.samples.push(elapsed);
            peak.push(rss);
        }
    }
    drop(daemon);
    let _ = fs::remove_dir_all(&scratch);

    let bwrap_median = {
        let mut sorted = rows[0].samples.clone();
        sorted.sort();
        percentile(&sorted, 50.0).as_secs_f64().max(1e-9)
    };
    let mut table = String::from(
        "| command | median ms | p95 ms | median / bwrap | peak RSS MB (median) |\n| --- | --- | --- | --- | --- |\n",
    );
    for (row, peak) in rows.iter_mut().zip(peak.iter_mut()) {
        row.samples.sort();
        peak.sort();
        let median = percentile(&row.samples, 50.0);
        let rss = peak.get(peak.len() / 2).copied().unwrap_or(0) as f64 / 1024.0;
        table.push_str(&format!(
            "| {} | {} | {} | {:.2} | {rss:.1} |\n",
            row.name,
            ms(median),
            ms(percentile(&row.samples, 95.0)),
            median.as_secs_f64() / bwrap_median,
        ));
    }
    let scratch_prefix = scratch.display().to_string();
    let shown = |word: &String| {
        if word.starts_with(&scratch_prefix) {
            "F".to_string()
        } else {
            word.replace(&bin.display().to_string(), "agt-jail").replace(&root.display().to_string(), ".")
        }
    };
    let commands: String =
        rows.iter().map(|r| r.argv.iter().map(shown).collect::<Vec<_>>().join(" ")).collect::<Vec<_>>().join("\n");
    Ok(format!(
        "### Governed start-up: standalone and through the daemon\n\n\
         The same run, {runs} more interleaved rounds after 5 warm-up runs of each: the commands a harness that \
         wraps every tool call pays for. \"Through the daemon\" is `agt-jail exec` with a daemon of the bench's \
         own answering on its socket (`AGT_JAIL_SOCKET`): the client hands the command line and its stdio to the \
         daemon, which starts the agent's supervisor (`agt-jail exec --standalone`, docs/adr/0012) and returns its \
         exit status. Peak RSS is the largest resident set of the run's process tree (`ru_maxrss` from wait4 on \
         the command: for the daemon rows that is the client alone, the supervisor being the daemon's child).\n\n\
         {table}\nCommands (`F` is an events file of the row's own; `./` is the repository):\n\n```\n{commands}\n```\n"
    ))
}
