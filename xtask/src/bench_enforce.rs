//! `cargo xtask bench-enforce`: what enforcement costs the governed agent, per hook, and
//! what it costs everything else on the host; and how many kernel events per second
//! reach the evaluator, with every drop counted.
//!
//! The workload is `bench/loops` (compiled, no runtime of its own): tight open/close,
//! fork+exec and connect loops that time themselves and print ns per iteration, so the
//! jail's start-up is not in the numbers. Each repetition runs every loop
//!
//! - (a) bare on the host,
//! - (b) in `agt-jail exec --ring 2` without a policy (the ungoverned jail),
//! - (c) the same with `--policy bench/loops/governed.yaml --events FILE` (governed: every
//!   exec, open and connect goes through the policy planes, none is denied),
//! - (d) bare on the host while a governed agent (same policy, ring 2) sits idle,
//!
//! interleaved, so drift in the machine's load hits every case alike. (c)/(b) is the cost
//! of governance per hook, (d)/(a) the cost for processes outside agents.
//!
//! The pipeline run drives a governed agent with a multi-threaded connect loop, half of
//! its connects denied by the kernel, and checks the events file against what the
//! workload saw: every denied connect must be accounted for by a deny record (a kernel
//! deny summary of N counts N); the kernel's drop counters (reported by agt-jail) say how
//! many allowed events, and how many denies, never reached userspace.
use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::util::{is_root, repo_root, run_checked, target_dir};

#[derive(clap::Args)]
pub struct Options {
    /// Repetitions of every case (after one warm-up repetition).
    #[arg(long, default_value_t = 15)]
    reps: usize,
    /// Iterations per run of each loop, as open=N,exec=N,connect=N (any subset).
    #[arg(long, value_name = "LOOP=N,...", default_value = "open=20000,exec=300,connect=5000")]
    iterations: String,
    /// Connects of the event-pipeline run (0 skips it).
    #[arg(long, default_value_t = 100_000)]
    pipeline_connects: u64,
    /// Threads of the event-pipeline run's connect loop.
    #[arg(long, default_value_t = 2)]
    pipeline_threads: u64,
    /// Only the event-pipeline run (no overhead repetitions).
    #[arg(long)]
    pipeline_only: bool,
    /// Write the results into the `## Enforcement overhead` and `## Event pipeline`
    /// sections of docs/benchmarks.md (only the latter with --pipeline-only).
    #[arg(long)]
    write: bool,
}

const LOOPS: [&str; 3] = ["open", "exec", "connect"];

/// The four ways each loop is run.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Mode {
    Bare,
    Jail,
    Governed,
    BareBesideAgent,
}

impl Mode {
    const ALL: [Mode; 4] = [Mode::Bare, Mode::Jail, Mode::Governed, Mode::BareBesideAgent];

    fn label(self) -> &'static str {
        match self {
            Mode::Bare => "(a) bare",
            Mode::Jail => "(b) ring 2, no policy",
            Mode::Governed => "(c) ring 2, governed",
            Mode::BareBesideAgent => "(d) bare, governed agent running",
        }
    }
}

fn parse_iterations(text: &str) -> Result<BTreeMap<&'static str, u64>> {
    let mut out: BTreeMap<&'static str, u64> = [("open", 20_000), ("exec", 300), ("connect", 5_000)].into();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        let (name, n) = part.split_once('=').with_context(|| format!("'{part}': expected LOOP=N"))?;
        let Some(name) = LOOPS.iter().find(|l| **l == name) else {
            bail!("'{name}' is not a loop (open, exec, connect)");
        };
        let n: u64 = n.parse().ok().filter(|n| *n > 0).with_context(|| format!("'{n}' is not a positive count"))?;
        out.insert(name, n);
    }
    Ok(out)
}

/// What one run of `loops` printed.
#[derive(Debug, Default, Clone)]
struct LoopResult {
    ns_per_iter: f64,
    elapsed_ns: u64,
    denied: u64,
    refused: u64,
    ok: u64,
}

fn parse_loop_line(stdout: &str) -> Option<LoopResult> {
    let line = stdout.lines().rev().find(|l| l.starts_with("loop="))?;
    let field = |name: &str| -> Option<&str> {
        line.split_whitespace().find_map(|kv| kv.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')))
    };
    Some(LoopResult {
        ns_per_iter: field("ns_per_iter")?.parse().ok()?,
        elapsed_ns: field("elapsed_ns")?.parse().ok()?,
        denied: field("denied")?.parse().ok()?,
        refused: field("refused")?.parse().ok()?,
        ok: field("ok")?.parse().ok()?,
    })
}

/// Runs a command to completion and returns its parsed loop line and its stderr.
fn run_loop(argv: &[String]) -> Result<(LoopResult, String)> {
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {}", argv[0]))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        bail!("{} failed with {}:\n{stdout}{stderr}", argv.join(" "), out.status);
    }
    let result = parse_loop_line(&stdout)
        .with_context(|| format!("{} printed no loop line:\n{stdout}{stderr}", argv.join(" ")))?;
    Ok((result, stderr))
}

/// A port on 127.0.0.1 that nobody listens on: connects are refused at once (no
/// TIME_WAIT left behind, so the loop can run as long as it likes).
fn refused_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(listener.local_addr().context("cannot read the bound port")?.port())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(values: &[f64]) -> Vec<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v
}

fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "unknown CPU".to_string(), |(_, v)| v.trim().to_string());
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    format!("{cores} CPUs (/proc/cpuinfo), {cpu}, Linux {}; load average at the start: {load}", kernel.trim())
}

/// The command lines of one benchmark run, with the paths it needs.
struct Setup {
    jail_bin: PathBuf,
    loops: PathBuf,
    workspace: PathBuf,
    policy: PathBuf,
    port: u16,
}

impl Setup {
    fn loop_args(&self, name: &str, n: u64) -> Vec<String> {
        let mut args = vec![self.loops.display().to_string(), name.to_string(), n.to_string()];
        match name {
            "open" => args.push(self.workspace.join("data.txt").display().to_string()),
            "connect" => args.push(self.port.to_string()),
            _ => {}
        }
        args
    }

    /// `agt-jail exec --ring 2` around `inner`, governed when `events` is given.
    fn jail(&self, inner: &[String], governed: Option<&Path>) -> Vec<String> {
        let mut argv: Vec<String> = vec![
            self.jail_bin.display().to_string(),
            "exec".into(),
            "--ring".into(),
            "2".into(),
            "--quiet".into(),
            "--workspace".into(),
            self.workspace.display().to_string(),
            "--allow-exec".into(),
            self.loops.display().to_string(),
            "--allow-connect".into(),
            format!("127.0.0.1:{}", self.port),
        ];
        if let Some(events) = governed {
            argv.extend([
                "--policy".into(),
                self.policy.display().to_string(),
                "--events".into(),
                events.display().to_string(),
            ]);
        }
        argv.push("--".into());
        argv.extend(inner.iter().cloned());
        argv
    }

    fn argv(&self, mode: Mode, name: &str, n: u64) -> Vec<String> {
        let inner = self.loop_args(name, n);
        match mode {
            Mode::Bare | Mode::BareBesideAgent => inner,
            Mode::Jail => self.jail(&inner, None),
            Mode::Governed => self.jail(&inner, Some(&self.events_file())),
        }
    }

    fn events_file(&self) -> PathBuf {
        self.workspace.join("events.jsonl")
    }

    /// Shows a command line with the machine-specific paths shortened.
    fn show(&self, argv: &[String]) -> String {
        argv.join(" ")
            .replace(&self.jail_bin.display().to_string(), "agt-jail")
            .replace(&self.loops.display().to_string(), "$WS/loops")
            .replace(&self.workspace.display().to_string(), "$WS")
            .replace(&self.policy.display().to_string(), "bench/loops/governed.yaml")
            .replace(&format!(":{}", self.port), ":$PORT")
            .replace(&format!(" {}", self.port), " $PORT")
    }
}

/// A governed agent that does nothing, for the outside-agent case.
struct IdleAgent {
    child: Child,
}

impl IdleAgent {
    fn start(setup: &Setup) -> Result<IdleAgent> {
        let inner: Vec<String> =
            ["/bin/sh", "-c", "echo ready; exec sleep 3600"].iter().map(|s| s.to_string()).collect();
        let argv = setup.jail(&inner, Some(&setup.workspace.join("idle-events.jsonl")));
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start the idle governed agent")?;
        // The line comes from inside the jail: cgroup, BPF programs, seccomp, Landlock and
        // the evaluator are all in place by then.
        let mut line = String::new();
        let read = child.stdout.take().map(|out| BufReader::new(out).read_line(&mut line));
        if !matches!(read, Some(Ok(n)) if n > 0) || line.trim() != "ready" {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the idle governed agent did not start ({})", setup.show(&argv));
        }
        Ok(IdleAgent { child })
    }

    fn stop(mut self) -> Result<()> {
        // SIGTERM: agt-jail forwards it to the jail, reaps it and removes the cgroup.
        run_checked(Command::new("kill").args(["-TERM", &self.child.id().to_string()]))?;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if self.child.try_wait().context("cannot wait for the idle agent")?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("the idle governed agent did not stop on SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

type Samples = BTreeMap<(&'static str, Mode), Vec<f64>>;
/// Per loop: how many records of each event and plane one governed run wrote.
type Planes = BTreeMap<&'static str, BTreeMap<String, u64>>;

/// Counts the records of an events file by event and plane, so the report says which
/// planes the governed runs actually went through on this host.
fn tally_planes(path: &Path) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in fs::read_to_string(path).unwrap_or_default().lines() {
        let Ok(record) = serde_json::from_str::<Value>(line) else { continue };
        let event = record["event"].as_str().or(record["kind"].as_str()).unwrap_or("?");
        let plane = record["plane"].as_str().unwrap_or("observed");
        *out.entry(format!("{event} ({plane})")).or_insert(0) += 1;
    }
    out
}

fn one_repetition(
    setup: &Setup,
    iterations: &BTreeMap<&'static str, u64>,
    samples: &mut Samples,
    planes: &mut Planes,
) -> Result<()> {
    for name in LOOPS {
        let n = iterations[name];
        for mode in [Mode::Bare, Mode::Jail, Mode::Governed] {
            let (result, _) = run_loop(&setup.argv(mode, name, n))?;
            samples.entry((name, mode)).or_default().push(result.ns_per_iter);
            if mode == Mode::Governed {
                planes.insert(name, tally_planes(&setup.events_file()));
            }
            let _ = fs::remove_file(setup.events_file());
        }
    }
    let agent = IdleAgent::start(setup)?;
    let mut outcome = Ok(());
    for name in LOOPS {
        match run_loop(&setup.argv(Mode::BareBesideAgent, name, iterations[name])) {
            Ok((result, _)) => samples.entry((name, Mode::BareBesideAgent)).or_default().push(result.ns_per_iter),
            Err(err) => {
                outcome = Err(err);
                break;
            }
        }
    }
    agent.stop()?;
    let _ = fs::remove_file(setup.workspace.join("idle-events.jsonl"));
    outcome
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 100_000.0 {
        format!("{:.0} µs", ns / 1000.0)
    } else if ns >= 10_000.0 {
        format!("{:.1} µs", ns / 1000.0)
    } else {
        format!("{ns:.0} ns")
    }
}

/// Median of the per-repetition ratios (each pair ran back to back) and the ratio of medians.
fn ratios(num: &[f64], den: &[f64]) -> (f64, f64) {
    let paired: Vec<f64> = num.iter().zip(den).map(|(n, d)| n / d).collect();
    let of_medians = percentile(&sorted(num), 50.0) / percentile(&sorted(den), 50.0);
    (percentile(&sorted(&paired), 50.0), of_medians)
}

fn overhead_section(
    setup: &Setup,
    opts: &Options,
    iterations: &BTreeMap<&'static str, u64>,
    samples: &Samples,
    planes: &Planes,
    machine: &str,
) -> String {
    let mut seen = String::new();
    for name in LOOPS {
        let records = planes.get(name).filter(|p| !p.is_empty()).map_or_else(
            || "no records (no plane of this host reported these events)".to_string(),
            |p| p.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", "),
        );
        seen.push_str(&format!("- `{name}` ({} iterations): {records}\n", iterations[name]));
    }
    let mut table =
        String::from("| loop | case | median / iteration | p95 / iteration |\n| --- | --- | ---: | ---: |\n");
    let mut summary = String::from(
        "| loop | governed / ungoverned jail (c)/(b) | outside agents (d)/(a) | jail without policy (b)/(a) |\n\
         | --- | ---: | ---: | ---: |\n",
    );
    for name in LOOPS {
        for mode in Mode::ALL {
            let s = sorted(&samples[&(name, mode)]);
            table.push_str(&format!(
                "| {name} | {} | {} | {} |\n",
                mode.label(),
                fmt_ns(percentile(&s, 50.0)),
                fmt_ns(percentile(&s, 95.0))
            ));
        }
        let get = |m: Mode| &samples[&(name, m)];
        let (gov, gov_m) = ratios(get(Mode::Governed), get(Mode::Jail));
        let (out, out_m) = ratios(get(Mode::BareBesideAgent), get(Mode::Bare));
        let (jail, jail_m) = ratios(get(Mode::Jail), get(Mode::Bare));
        summary.push_str(&format!(
            "| {name} | {gov:.3} ({gov_m:.3}) | {out:.3} ({out_m:.3}) | {jail:.3} ({jail_m:.3}) |\n"
        ));
    }
    let commands: Vec<String> = LOOPS
        .iter()
        .flat_map(|name| {
            [Mode::Bare, Mode::Jail, Mode::Governed].map(|mode| setup.show(&setup.argv(mode, name, iterations[name])))
        })
        .collect();
    let idle = setup.show(&setup.jail(
        &["/bin/sh", "-c", "'echo ready; exec sleep 3600'"].map(String::from),
        Some(&setup.workspace.join("idle-events.jsonl")),
    ));
    format!(
        "## Enforcement overhead\n\n\
         Measured by `cargo xtask bench-enforce --reps {reps} --iterations {iters}` (as root): {reps} \
         repetitions (after one warm-up) of every loop in every case, interleaved. The workload is \
         `bench/loops` (a compiled binary that times its own loop, so the jail's start-up is not in \
         the numbers): `open` opens a workspace file read-only and closes it, `exec` forks, execs \
         /bin/true and waits, `connect` makes a TCP connect to a loopback port with no listener \
         (refused at once) and closes the socket.\n\n\
         - (a) bare on the host;\n\
         - (b) inside `agt-jail exec --ring 2` without a policy (namespaces, Landlock, seccomp, the \
         ring's connect allow-list in the cgroup BPF programs);\n\
         - (c) the same under `--policy bench/loops/governed.yaml --events FILE`: exec, file and \
         network rules that the workload never trips, so every exec, open and connect takes the \
         policy's planes and is recorded, and none is denied;\n\
         - (d) bare on the host while a governed agent (ring 2, same policy) sits idle.\n\n\
         Machine: {machine}.\n\n\
         Records one governed run (c) wrote, by event and plane (what the governed numbers \
         include on this host):\n\n{seen}\n\
         Ratios: the median of the per-repetition ratios (each pair ran back to back), in brackets the \
         ratio of the medians. 1.000 is no overhead.\n\n{summary}\n{table}\nCommands (`$WS` is a \
         scratch workspace holding a copy of the loops binary and `data.txt`; `$PORT` a loopback \
         port nobody listens on):\n\n```\n{commands}\n# (d): the loops as in (a), while this runs:\n{idle}\n```\n",
        reps = opts.reps,
        iters = opts.iterations,
        commands = commands.join("\n"),
    )
}

/// What the pipeline run found.
struct Pipeline {
    command: String,
    workload: LoopResult,
    wall: Duration,
    kernel_drops: u64,
    deny_drops: u64,
    records: u64,
    connect_records: u64,
    /// Denied connects the deny records account for (a summary record counts `count`).
    deny_records: u64,
    /// Of those, the ones counted by kernel deny summaries, and the number of summary records.
    summarised_denies: u64,
    summary_records: u64,
    first_time: f64,
    last_time: f64,
    max_latency_us: u64,
}

fn run_pipeline(setup: &Setup, opts: &Options) -> Result<Pipeline> {
    let events = setup.workspace.join("pipeline.jsonl");
    let _ = fs::remove_file(&events);
    let inner: Vec<String> = vec![
        setup.loops.display().to_string(),
        "connect".into(),
        opts.pipeline_connects.to_string(),
        setup.port.to_string(),
        "--to".into(),
        "127.0.0.1".into(),
        "--to".into(),
        // Not on the allow-list: the kernel denies it (EPERM) in the cgroup program. (Not a
        // loopback address: the agent's own loopback is always allowed in its namespace.)
        "198.51.100.1".into(),
        "--threads".into(),
        opts.pipeline_threads.to_string(),
    ];
    let mut argv = setup.jail(&inner, Some(&events));
    // The denial lines on stderr are part of what a governed agent costs, but here they
    // would be 50,000 lines; --quiet stays, the kernel's drop warning is printed anyway.
    argv.retain(|a| a != "--quiet");
    argv.insert(2, "--quiet".into());
    // Without this, trust falls with every denial and after a few dozen the agent is
    // demoted to ring 3 (no network): every connect after that is denied, and the run
    // would measure the demotion, not the pipeline.
    argv.splice(3..3, ["--deny-penalty".to_string(), "0".to_string()]);
    let start = Instant::now();
    let (workload, stderr) = run_loop(&argv)?;
    let wall = start.elapsed();
    let counter = |what: &str| {
        stderr
            .lines()
            .filter(|l| l.contains(what))
            .find_map(|l| l.split("the kernel dropped ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let kernel_drops = counter("event(s) because the ring buffer was full");
    let deny_drops = counter("deny record(s)");
    let text = fs::read_to_string(&events).with_context(|| format!("cannot read {}", events.display()))?;
    let (mut records, mut connect_records, mut deny_records, mut max_latency_us) = (0, 0, 0, 0);
    let (mut summarised_denies, mut summary_records) = (0, 0);
    let (mut first_time, mut last_time) = (f64::MAX, f64::MIN);
    for line in text.lines() {
        let record: Value = serde_json::from_str(line).with_context(|| format!("bad record in events file: {line}"))?;
        records += 1;
        if record["event"] == "connect" {
            if let Some(t) = record["time"].as_f64() {
                first_time = first_time.min(t);
                last_time = last_time.max(t);
            }
            connect_records += 1;
            if record["outcome"] == "deny" {
                match record["count"].as_u64() {
                    Some(count) => {
                        deny_records += count;
                        summarised_denies += count;
                        summary_records += 1;
                    }
                    None => deny_records += 1,
                }
            }
            max_latency_us = max_latency_us.max(record["latency_us"].as_u64().unwrap_or(0));
        }
    }
    let _ = fs::remove_file(&events);
    Ok(Pipeline {
        command: setup.show(&argv),
        workload,
        wall,
        kernel_drops,
        deny_drops,
        records,
        connect_records,
        deny_records,
        summarised_denies,
        summary_records,
        first_time,
        last_time,
        max_latency_us,
    })
}

fn pipeline_section(p: &Pipeline, machine: &str) -> String {
    let offered = p.workload.ok + p.workload.refused + p.workload.denied;
    let workload_secs = p.workload.elapsed_ns as f64 / 1e9;
    let record_span = (p.last_time - p.first_time).max(1e-9);
    let lost_denies = p.workload.denied.saturating_sub(p.deny_records);
    let verdict = if lost_denies == 0 {
        let summaries = if p.summarised_denies == 0 {
            "none needed a kernel summary".to_string()
        } else {
            format!(
                "{} of them through {} kernel deny summaries, when the priority ring buffer was full",
                p.summarised_denies, p.summary_records
            )
        };
        let drops = if p.kernel_drops == 0 {
            "the kernel dropped no allowed event".to_string()
        } else {
            format!("the kernel dropped {} allowed events (ring buffer full, counted)", p.kernel_drops)
        };
        format!(
            "**every one of the {} denied connects is accounted for by a deny record** ({summaries}); {drops}",
            p.workload.denied
        )
    } else {
        format!(
            "**{lost_denies} of {} denied connects have no deny record** ({} denies dropped by the kernel with \
             both the priority ring buffer and the deny summary map full)",
            p.workload.denied, p.deny_drops
        )
    };
    format!(
        "## Event pipeline\n\n\
         Measured by `cargo xtask bench-enforce` (its pipeline run; `--pipeline-only` runs just this): a \
         governed ring-2 agent runs a connect loop on {threads} threads, alternating between an allowed \
         loopback destination (refused, no listener) and 198.51.100.1, which is not on the allow-list and is \
         denied with EPERM in the cgroup connect program. `--deny-penalty 0` keeps the agent in ring 2 \
         (with the default penalty, a few dozen denials demote it to ring 3, where every connect is \
         denied). Every connect is one kernel event; the events file is then checked against what the \
         workload saw.\n\n\
         How the kernel side keeps denies: allowed events go to the 4 MiB event ring buffer, and when \
         it is full they are dropped and counted (`EVENT_DROPS`). Deny and kill records go to a ring \
         buffer of their own (1 MiB, shared with process records while it is less than half full), \
         which allowed events cannot fill; a deny that does not fit there either is counted in a \
         per-CPU hash map keyed by the whole record minus thread id and time (agent, cgroup, process, \
         uid, comm, executable, destination, verdict, layer, plan class), and agt-jail \
         writes each increment as one deny record with `\"count\": N`. Only a deny that fits neither \
         (16,384 distinct keys) is lost, and it is counted (`DENY_DROPS`) and reported. The records \
         carry the caller's pid, uid, parent and comm from the kernel, so the evaluator reads no /proc \
         per event (only the executable's path, once per executable); each network event's context is one \
         context updated in place, whose agent and process sections (and the decision) are \
         serialised again only when they change; records are written with one write per \
         ring-buffer drain. The reader is woken at once by a deny record and otherwise drains \
         every 10 ms.\n\n\
         Machine: {machine}.\n\n\
         | | |\n| --- | ---: |\n\
         | connects made (kernel events offered) | {offered} |\n\
         | of which denied (EPERM seen by the workload) | {denied} |\n\
         | workload time | {workload_secs:.2} s |\n\
         | offered rate | {offered_rate:.0} events/s |\n\
         | connect records written by the evaluator | {connect_records} |\n\
         | denied connects accounted for by deny records (a summary of N counts N) | {deny_records} |\n\
         | of which in kernel deny summaries (summary records) | {summarised} ({summary_records}) |\n\
         | deny records missing | {lost_denies} |\n\
         | kernel deny drop counter (priority ring and summary map full) | {deny_drops} |\n\
         | kernel drop counter for allowed events (event ring buffer full) | {drops} |\n\
         | deny records missing with no drop counted (silent loss) | {silent} |\n\
         | evaluator rate: connect records / span of their record times | {connect_records} / {record_span:.2} s = {record_rate:.0} records/s |\n\
         | records of any kind | {records} |\n\
         | longest evaluation of one connect event (`latency_us`) | {max_latency} µs |\n\
         | agt-jail wall time (start-up, run, drain, clean-up) | {wall:.2} s |\n\n\
         Result: {verdict}.\n\n\
         This is the end-to-end rate with the kernel in the loop, bounded by what two CPUs can offer \
         (a refused loopback connect costs ~18 µs in the kernel, and the workload, the kernel side and \
         the evaluator share the two CPUs). The userspace ceiling per event is measured apart, below.\n\n\
         Command:\n\n```\n{command}\n```\n",
        threads = p.workload_threads_hint(),
        denied = p.workload.denied,
        offered_rate = offered as f64 / workload_secs,
        connect_records = p.connect_records,
        deny_records = p.deny_records,
        summarised = p.summarised_denies,
        summary_records = p.summary_records,
        deny_drops = p.deny_drops,
        drops = p.kernel_drops,
        records = p.records,
        record_rate = p.connect_records as f64 / record_span,
        silent = lost_denies.saturating_sub(p.deny_drops),
        max_latency = p.max_latency_us,
        wall = p.wall.as_secs_f64(),
        command = p.command,
    )
}

impl Pipeline {
    fn workload_threads_hint(&self) -> String {
        self.command
            .split("--threads ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("1")
            .to_string()
    }
}

/// Replaces the section starting at `heading` (up to the next `## ` heading) or appends
/// it, leaving every other section as it is.
fn replace_section(text: &str, heading: &str, section: &str) -> String {
    let found = text
        .match_indices(heading)
        .find(|(i, _)| (*i == 0 || text[..*i].ends_with('\n')) && text[i + heading.len()..].starts_with('\n'));
    match found {
        Some((start, _)) => {
            let rest = &text[start + heading.len()..];
            let end = rest.find("\n## ").map_or(text.len(), |i| start + heading.len() + i + 1);
            let sep = if end < text.len() && !section.ends_with("\n\n") { "\n" } else { "" };
            format!("{}{}{}{}", &text[..start], section, sep, &text[end..])
        }
        None => {
            let sep = if text.ends_with("\n\n") {
                ""
            } else if text.ends_with('\n') {
                "\n"
            } else {
                "\n\n"
            };
            format!("{text}{sep}{section}")
        }
    }
}

pub fn run(opts: &Options) -> Result<()> {
    if !is_root() {
        bail!("the enforcement benchmark needs root (agt-jail exec creates cgroups and loads BPF programs)");
    }
    if opts.reps < 3 {
        bail!("--reps must be at least 3");
    }
    let iterations = parse_iterations(&opts.iterations)?;
    let root = repo_root();
    run_checked(Command::new("cargo").current_dir(&root).args([
        "build",
        "--release",
        "-p",
        "agt-jail-cli",
        "-p",
        "agt-jail-bench-loops",
    ]))?;
    let release = target_dir().join("release");
    let jail_bin = release.join("agt-jail");
    let built_loops = release.join("loops");
    for bin in [&jail_bin, &built_loops] {
        if !bin.exists() {
            bail!("{} was not built", bin.display());
        }
    }
    // The workspace holds the workload so that the jail sees it at the same path.
    let workspace = std::env::temp_dir().join(format!("agt-jail-bench-enforce-{}", std::process::id()));
    fs::create_dir_all(&workspace).with_context(|| format!("cannot create {}", workspace.display()))?;
    let result = (|| {
        let loops = workspace.join("loops");
        fs::copy(&built_loops, &loops).with_context(|| format!("cannot copy {}", built_loops.display()))?;
        fs::write(workspace.join("data.txt"), "agt-jail bench\n").context("cannot write the data file")?;
        let setup = Setup {
            jail_bin,
            loops,
            workspace: workspace.clone(),
            policy: root.join("bench/loops/governed.yaml"),
            port: refused_port()?,
        };
        let machine = machine();
        eprintln!("bench-enforce: {machine}");
        let mut sections = Vec::new();
        if !opts.pipeline_only {
            let mut samples = Samples::new();
            let mut warm_up = Samples::new();
            let mut planes = Planes::new();
            one_repetition(&setup, &iterations, &mut warm_up, &mut planes)?;
            for rep in 0..opts.reps {
                eprintln!("bench-enforce: repetition {}/{}", rep + 1, opts.reps);
                one_repetition(&setup, &iterations, &mut samples, &mut planes)?;
            }
            let overhead = overhead_section(&setup, opts, &iterations, &samples, &planes, &machine);
            sections.push(("## Enforcement overhead", overhead));
        }
        if opts.pipeline_connects > 0 {
            eprintln!("bench-enforce: pipeline run ({} connects)", opts.pipeline_connects);
            let pipeline = run_pipeline(&setup, opts)?;
            sections.push(("## Event pipeline", pipeline_section(&pipeline, &machine)));
        }
        Ok::<_, anyhow::Error>(sections)
    })();
    let _ = fs::remove_dir_all(&workspace);
    let sections = result?;
    for (_, text) in &sections {
        println!("{text}");
    }
    if opts.write {
        let path = root.join("docs/benchmarks.md");
        let mut text = fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".into());
        for (heading, section) in &sections {
            text = replace_section(&text, heading, section);
        }
        fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn loop_lines_parse() {
        let out = "noise\nloop=connect iterations=10 ns_per_iter=51868.9 elapsed_ns=518689 ok=0 denied=5 refused=5 errors=0\n";
        let r = parse_loop_line(out).unwrap();
        assert_eq!((r.ns_per_iter, r.elapsed_ns, r.denied, r.refused, r.ok), (51868.9, 518689, 5, 5, 0));
        assert!(parse_loop_line("loop=open iterations=1\n").is_none());
    }

    #[test]
    fn iterations_parse_and_reject() {
        let it = parse_iterations("exec=7").unwrap();
        assert_eq!((it["open"], it["exec"], it["connect"]), (20_000, 7, 5_000));
        assert!(parse_iterations("fork=3").is_err());
        assert!(parse_iterations("open=0").is_err());
        assert!(parse_iterations("open").is_err());
    }

    #[test]
    fn sections_are_replaced_or_appended_without_touching_others() {
        let doc = "# B\n\n## Jail start-up\n\nx\n";
        let once = replace_section(doc, "## Event pipeline", "## Event pipeline\n\nold\n");
        assert_eq!(once, "# B\n\n## Jail start-up\n\nx\n\n## Event pipeline\n\nold\n");
        let with_next = format!("{once}\n## Other\n\ny\n");
        assert_eq!(
            replace_section(&with_next, "## Event pipeline", "## Event pipeline\n\nnew\n"),
            "# B\n\n## Jail start-up\n\nx\n\n## Event pipeline\n\nnew\n\n## Other\n\ny\n"
        );
        // A heading that only starts the same way is another section.
        let similar = "# B\n\n## Event pipeline: userspace\n\nz\n";
        assert_eq!(
            replace_section(similar, "## Event pipeline", "## Event pipeline\n\nnew\n"),
            "# B\n\n## Event pipeline: userspace\n\nz\n\n## Event pipeline\n\nnew\n"
        );
    }

    #[test]
    fn ratios_pair_repetitions() {
        // The third pair ran while something else loaded the machine: the paired median
        // ignores it, the ratio of medians does not.
        let (paired, of_medians) = ratios(&[110.0, 220.0, 300.0], &[100.0, 200.0, 100.0]);
        assert!((paired - 1.1).abs() < 1e-9);
        assert!((of_medians - 2.2).abs() < 1e-9);
    }
}
