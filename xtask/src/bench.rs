//! `cargo xtask bench`: jail start-up, side by side with bubblewrap doing equivalent
//! isolation. Runs are interleaved (bare, agt-jail, bwrap, bare, ...) so drift in the
//! machine's load hits every command alike; median and p95 over `--runs` each.
//! The network namespace's cost is isolated on both sides in the same run: agt-jail's
//! ring 2 with its routed namespace (veth, /30, NAT) against ring 2 with `--net none`
//! (a bare namespace; the same BPF programs, forced by a connect rule), and bwrap with
//! and without its network namespace (`--share-net`).
//! Needs no extra tool: timing is done here with a monotonic clock around spawn+wait.
use std::{
    fs::{self, File},
    io::Write,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::util::{is_root, repo_root, run_checked, target_dir};

mod governed;

#[derive(clap::Args)]
pub struct Options {
    /// Runs per command (after 10 warm-up runs each).
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// Write the results into the `## Jail start-up` section of docs/benchmarks.md.
    #[arg(long)]
    write: bool,
    /// Rounds of the governed rows (standalone and through a daemon; each takes a BPF
    /// load), run after the others; 0 leaves them out.
    #[arg(long, default_value_t = 50)]
    governed_runs: usize,
}

/// The bubblewrap command closest to `agt-jail exec --ring 3 -- /bin/true`: every
/// namespace, no capabilities, read-only /usr and /etc, private /tmp, scratch
/// /workspace, fresh /proc and minimal /dev, scrubbed environment. (bwrap applies no
/// seccomp filter or Landlock ruleset of its own and creates no cgroup, so agt-jail
/// does strictly more work here.)
pub const BWRAP: &[&str] = &[
    "/usr/bin/bwrap",
    "--unshare-all",
    "--die-with-parent",
    "--new-session",
    "--cap-drop",
    "ALL",
    "--ro-bind",
    "/usr",
    "/usr",
    "--symlink",
    "usr/bin",
    "/bin",
    "--symlink",
    "usr/lib",
    "/lib",
    "--symlink",
    "usr/lib64",
    "/lib64",
    "--symlink",
    "usr/sbin",
    "/sbin",
    "--ro-bind",
    "/etc",
    "/etc",
    "--tmpfs",
    "/tmp",
    "--tmpfs",
    "/workspace",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "--chdir",
    "/workspace",
    "--clearenv",
    "--setenv",
    "PATH",
    "/usr/bin:/bin",
    "--",
    "/bin/true",
];

/// Ring 3's default limits (profiles/ring3.yaml): memory 512M, pids 64, cpu 1 core.
const RING3_LIMITS: [(&str, &str, &str); 4] = [
    ("memory", "memory.limit_in_bytes", "536870912"),
    ("pids", "pids.max", "64"),
    ("cpu", "cpu.cfs_period_us", "100000"),
    ("cpu", "cpu.cfs_quota_us", "100000"),
];

/// Where `--share-net` goes in [`BWRAP`] (after `--unshare-all`): bwrap then keeps the
/// host's network namespace and unshares every other one.
fn bwrap_share_net() -> Vec<String> {
    let mut argv: Vec<String> = BWRAP.iter().map(|s| s.to_string()).collect();
    argv.insert(2, "--share-net".into());
    argv
}

/// Ring 2 without its routed namespace: `--net none` (a bare namespace, loopback only) and
/// a connect rule (TEST-NET-1, RFC 5737: nothing is ever there) that loads the same BPF
/// programs the allow-list needs, so the run does the same work but the network.
const BPF_WITHOUT_NETWORK: [&str; 4] = ["--net", "none", "--deny-connect", "192.0.2.1:9"];

struct Case {
    name: &'static str,
    argv: Vec<String>,
    /// Run inside cgroups with ring 3's limits that the harness creates, joins (before
    /// exec) and removes on every run, as a script giving bwrap limits would.
    limited: bool,
    samples: Vec<Duration>,
}

/// The v1 hierarchies of memory, pids and cpu (hybrid hosts), from /proc/self/mountinfo.
fn v1_roots() -> Vec<(String, PathBuf)> {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut roots = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else { continue };
        let mut fields = right.split_whitespace();
        if fields.next() != Some("cgroup") {
            continue;
        }
        let Some(mount_point) = left.split_whitespace().nth(4) else { continue };
        let options = fields.nth(1).unwrap_or("");
        for controller in options.split(',').filter(|o| ["memory", "pids", "cpu"].contains(o)) {
            roots.push((controller.to_string(), PathBuf::from(mount_point)));
        }
    }
    roots
}

/// Creates one cgroup per v1 controller with ring 3's limits; returns their directories.
fn limited_cgroups(roots: &[(String, PathBuf)], run: usize) -> Result<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (controller, root) in roots {
        let dir = root.join("agt-bench").join(format!("{}-{run}", std::process::id()));
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        for (_, file, value) in RING3_LIMITS.iter().filter(|(c, _, _)| c == controller) {
            fs::write(dir.join(file), value).with_context(|| format!("cannot write {}/{file}", dir.display()))?;
        }
        dirs.push(dir);
    }
    Ok(dirs)
}

fn once(argv: &[String], cgroups: Option<&[(String, PathBuf)]>, run: usize) -> Result<Duration> {
    let start = Instant::now();
    let mut command = Command::new(&argv[0]);
    command.args(&argv[1..]).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let dirs = match cgroups {
        Some(roots) => limited_cgroups(roots, run)?,
        None => Vec::new(),
    };
    let mut procs = Vec::new();
    for dir in &dirs {
        let path = dir.join("cgroup.procs");
        procs.push(File::options().write(true).open(&path).with_context(|| format!("cannot open {}", path.display()))?);
    }
    if !procs.is_empty() {
        // SAFETY: the closure only writes to files opened before the fork (no allocation,
        // no locks); "0" moves the calling process, i.e. the child before it execs.
        unsafe {
            command.pre_exec(move || {
                for mut file in &procs {
                    file.write_all(b"0")?;
                }
                Ok(())
            });
        }
    }
    let status = command.status().with_context(|| format!("cannot run {}", argv[0]))?;
    for dir in &dirs {
        remove_cgroup(dir);
    }
    let elapsed = start.elapsed();
    if !status.success() {
        bail!("{} failed with {status}", argv.join(" "));
    }
    Ok(elapsed)
}

/// What ring 2's routed namespace puts on the run's path, read from the run itself
/// (`AGT_JAIL_DEBUG` lines): the end-to-end rows cannot resolve it, since the BPF load's
/// spread is many times larger. Medians over `runs` runs of `argv` (release build).
fn network_start_path(argv: &[String], runs: usize) -> Result<String> {
    let micros = |text: &str, before: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.contains(before))?;
        let at = line.find(before)? + before.len();
        line[at..].split_whitespace().next()?.parse().ok()
    };
    let (mut setup, mut waited, mut resolver, mut stopped, mut path) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let out = Command::new(&argv[0]).args(&argv[1..]).env("AGT_JAIL_DEBUG", "1").stdin(Stdio::null()).output()?;
        let text = String::from_utf8_lossy(&out.stderr);
        let (Some(s), Some(w), Some(r), Some(e)) = (
            micros(&text, "network was set up in "),
            micros(&text, "the launch waited "),
            micros(&text, "started in "),
            micros(&text, "stop took "),
        ) else {
            bail!("{} did not report its network timing: {text}", argv.join(" "));
        };
        setup.push(s);
        waited.push(w);
        resolver.push(r);
        stopped.push(e);
        path.push(w + r + e);
    }
    let median = |v: Vec<f64>| quartiles(v)[1] / 1000.0;
    let worst = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() * 95 / 100).copied().unwrap_or(0.0) / 1000.0
    };
    Ok(format!(
        "Ring 2's routed namespace on the run's path, from the run's own timing (`AGT_JAIL_DEBUG`, {runs} runs, \
         medians): the set-up (namespace, veth pair, addresses, route, forwarding, the shared NAT table's \
         lookup) took {:.2} ms on its thread, beside the BPF load; the launch waited {:.3} ms for it; the \
         agent's resolver started in {:.2} ms and stopped in {:.2} ms. On the run's path: {:.2} ms (p95 {:.2} ms). Nothing else of the network is undone on the exit path (the kernel deletes the pair with the \
         namespace).\n\n",
        median(setup),
        median(waited),
        median(resolver),
        median(stopped),
        median(path.clone()),
        worst(path),
    ))
}

/// rmdir, retried while the exited process still keeps the cgroup busy.
fn remove_cgroup(dir: &Path) {
    for _ in 0..1000 {
        match fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(16) => thread::sleep(Duration::from_micros(50)),
            _ => return,
        }
    }
}

/// What one cgroup migration costs on this host: an idle process written into a fresh
/// cgroup's `cgroup.procs` after a pause (the global cgroup threadgroup lock waits for an
/// RCU grace period unless the host switched that off, e.g. with `favordynmods`).
fn migration_cost(roots: &[(String, PathBuf)]) -> Result<Option<Duration>> {
    let Some((_, root)) = roots.first() else { return Ok(None) };
    let dir = root.join("agt-bench").join(format!("{}-migration", std::process::id()));
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut samples = Vec::new();
    for _ in 0..20 {
        let mut sleeper = Command::new("sleep").arg("5").spawn().context("cannot run sleep")?;
        thread::sleep(Duration::from_millis(50));
        let start = Instant::now();
        let moved = fs::write(dir.join("cgroup.procs"), sleeper.id().to_string());
        samples.push(start.elapsed());
        let _ = sleeper.kill();
        let _ = sleeper.wait();
        moved.with_context(|| format!("cannot move a process into {}", dir.display()))?;
    }
    remove_cgroup(&dir);
    samples.sort();
    Ok(Some(percentile(&samples, 50.0)))
}

/// The cgroup2 mount's options (favordynmods shows here).
fn cgroup2_options() -> String {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| line.split_once(" - "))
        .find_map(|(_, right)| {
            let mut fields = right.split_whitespace();
            (fields.next() == Some("cgroup2")).then(|| fields.nth(1).unwrap_or("").to_string())
        })
        .unwrap_or_default()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn load_average() -> String {
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

/// The first quartile, the median and the third quartile of `values` (nearest rank, as
/// [`percentile`]); zeros when empty.
fn quartiles(mut values: Vec<f64>) -> [f64; 3] {
    values.sort_by(f64::total_cmp);
    [25.0, 50.0, 75.0].map(|p| {
        let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
        values.get(rank.clamp(1, values.len().max(1)) - 1).copied().unwrap_or(0.0)
    })
}

fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    // Shared build machines are rarely idle: say how busy this one was.
    let load = load_average();
    format!("{nproc} CPUs (`nproc`), {cpu}, Linux {}; load average at the start: {load}", kernel.trim())
}

pub fn run(opts: &Options) -> Result<()> {
    if !is_root() {
        bail!("the jail benchmark needs root (agt-jail exec creates cgroups)");
    }
    if opts.runs < 10 {
        bail!("--runs must be at least 10");
    }
    let root = repo_root();
    run_checked(Command::new("cargo").current_dir(&root).args(["build", "--release", "-p", "agt-jail-cli"]))?;
    let bin = target_dir().join("release/agt-jail");
    // The load when the runs begin (the machine line), and again when they end.
    let machine = machine();
    if !bin.exists() {
        bail!("{} was not built", bin.display());
    }
    // The peer is measured in the same run: install it as the test command installs its tools.
    crate::util::apt_install(&["bubblewrap"])?;
    if !std::path::Path::new(BWRAP[0]).exists() {
        bail!("bubblewrap is not installed at {} (apt-get install bubblewrap)", BWRAP[0]);
    }
    let jail: Vec<String> = [bin.display().to_string()]
        .into_iter()
        .chain(["exec", "--ring", "3", "--", "/bin/true"].map(String::from))
        .collect();
    let unlimited: Vec<String> = [bin.display().to_string()]
        .into_iter()
        .chain(
            ["exec", "--ring", "3", "--memory", "max", "--pids", "max", "--cpu", "max", "--", "/bin/true"]
                .map(String::from),
        )
        .collect();
    let ring2 = |extra: &[&str]| -> Vec<String> {
        [bin.display().to_string()]
            .into_iter()
            .chain(["exec", "--ring", "2"].map(String::from))
            .chain(extra.iter().map(|s| s.to_string()))
            .chain(["--", "/bin/true"].map(String::from))
            .collect()
    };
    let bwrap: Vec<String> = BWRAP.iter().map(|s| s.to_string()).collect();
    let roots = v1_roots();
    let case = |name, argv| Case { name, argv, limited: false, samples: Vec::new() };
    let mut cases = vec![
        case("bare /bin/true", vec!["/bin/true".into()]),
        case("agt-jail exec --ring 3", jail),
        case("agt-jail exec --ring 3, no cgroup limits", unlimited),
        case("bwrap (equivalent isolation)", bwrap.clone()),
        case("bwrap --share-net (no network namespace)", bwrap_share_net()),
        case("agt-jail exec --ring 2 (own namespace, veth, NAT)", ring2(&[])),
        case(
            "agt-jail exec --ring 2 --net none (own namespace, no veth; same BPF programs)",
            ring2(&BPF_WITHOUT_NETWORK),
        ),
    ];
    const BWRAP_ROW: usize = 3;
    const BWRAP_SHARED_ROW: usize = 4;
    const RING2_ROW: usize = 5;
    const RING2_NONE_ROW: usize = 6;
    // On a hybrid host, also bwrap with ring 3's limits in v1 cgroups the harness makes:
    // the isolation agt-jail's first row gives (on pure v2 hosts agt-jail's limits need
    // no migration, and this row is left out).
    if !roots.is_empty() {
        cases.push(Case {
            name: "bwrap + ring 3's limits (v1 cgroups made by the harness)",
            argv: bwrap,
            limited: true,
            samples: Vec::new(),
        });
    }
    let mut run = 0;
    for case in &cases {
        for _ in 0..10 {
            run += 1;
            once(&case.argv, case.limited.then_some(roots.as_slice()), run)?;
        }
    }
    for _ in 0..opts.runs {
        for case in cases.iter_mut() {
            run += 1;
            let sample = once(&case.argv, case.limited.then_some(roots.as_slice()), run)?;
            case.samples.push(sample);
        }
    }
    let migration = migration_cost(&roots)?;
    let start_path = network_start_path(&cases[RING2_ROW].argv, opts.runs.min(100))?;
    for (_, root) in &roots {
        let _ = fs::remove_dir(root.join("agt-bench"));
    }
    // The network's cost on each side: the difference of the medians, and the median of
    // the differences within each round (the rounds are interleaved, so drift cancels).
    let net_cost = |with: usize, without: usize| -> (f64, [f64; 3]) {
        let paired: Vec<f64> = cases[with]
            .samples
            .iter()
            .zip(&cases[without].samples)
            .map(|(a, b)| a.as_secs_f64() - b.as_secs_f64())
            .collect();
        let mut sorted_with = cases[with].samples.clone();
        let mut sorted_without = cases[without].samples.clone();
        sorted_with.sort();
        sorted_without.sort();
        let of_medians = percentile(&sorted_with, 50.0).as_secs_f64() - percentile(&sorted_without, 50.0).as_secs_f64();
        (of_medians * 1000.0, quartiles(paired).map(|q| q * 1000.0))
    };
    let (jail_net, jail_net_paired) = net_cost(RING2_ROW, RING2_NONE_ROW);
    let (bwrap_net, bwrap_net_paired) = net_cost(BWRAP_ROW, BWRAP_SHARED_ROW);
    let load_after = load_average();
    let mut table = String::from("| command | median ms | p95 ms | mean ms |\n| --- | --- | --- | --- |\n");
    let mut medians = Vec::new();
    for case in cases.iter_mut() {
        case.samples.sort();
        let mean = case.samples.iter().sum::<Duration>() / case.samples.len() as u32;
        let median = percentile(&case.samples, 50.0);
        medians.push(median);
        table.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            case.name,
            ms(median),
            ms(percentile(&case.samples, 95.0)),
            ms(mean)
        ));
    }
    let bwrap_median = medians[BWRAP_ROW].as_secs_f64().max(1e-9);
    let ratio = medians[1].as_secs_f64() / bwrap_median;
    let ratio_unlimited = medians[2].as_secs_f64() / bwrap_median;
    let limited_ratio = match medians.get(RING2_NONE_ROW + 1) {
        Some(limited) => format!(
            "; against bwrap with the same limits: {:.2}",
            medians[1].as_secs_f64() / limited.as_secs_f64().max(1e-9)
        ),
        None => String::new(),
    };
    let migration = match migration {
        Some(cost) => format!(
            "One cgroup migration (an idle process written into a fresh v1 cgroup's `cgroup.procs`) took {} ms \
             (median of 20) on this host; the cgroup2 mount's options are `{}`. Where a migration waits for an RCU \
             grace period (several ms; see docs/adr/0004-jail-start-up.md) the limited rows pay part of it.\n\n",
            ms(cost),
            cgroup2_options()
        ),
        None => String::new(),
    };
    let section = format!(
        "## Jail start-up\n\nMeasured by `cargo xtask bench --runs {runs}` (as root): {runs} interleaved runs of each \
         command after 10 warm-up runs, wall time from spawn to exit.\n\nMachine: {machine}.\n\n{table}\nagt-jail / bwrap \
         median ratio: {ratio:.2} with ring 3's limits, {ratio_unlimited:.2} without (bwrap sets none){limited_ratio}.\n\n\
         Load average at the end: {load_after}.\n\n\
         What the network namespace costs (difference of the medians; in brackets the median of the per-round \
         differences, then its quartiles): agt-jail's routed namespace (ring 2 against ring 2 `--net none`) \
         {jail_net:.2} ms [{:.2}; {:.2} to {:.2}]; bwrap's namespace (bwrap against bwrap `--share-net`) \
         {bwrap_net:.2} ms [{:.2}; {:.2} to {:.2}].\n\n\
         {start_path}{migration}Commands:\n\n```\n{jail}\n{unlimited}\n{bwrap}\n{bwrap_shared}\n{ring2}\n{ring2_none}\n```\n\n\
         Ring 2 makes the agent's network namespace, its veth pair (the agent's end created right in it), the /30, \
         the default route (and checks the shared nf_tables masquerade table) on a thread while its cgroup and its BPF programs \
         (the load dominates ring 2) are made, and joins it before the jail starts: the jail's init joins that \
         namespace, so the agent never runs without it, and a failed setup refuses the run (125). The masquerade \
         table is one for all agents, added only when missing, so a run neither adds nor deletes nf_tables \
         state; the pair goes with the agent's namespace (docs/adr/0009-agent-network-veth-nat.md). \
         Ring 2 `--net none` clones a bare namespace (loopback only) and loads the same programs (a connect rule \
         forces them); ring 3 clones the same bare namespace as bwrap. \
         What each ring 3 row does: agt-jail creates the \
         agent's cgroup v2 (and, with limits on a hybrid host, v1 memory/pids/cpu cgroups) with ring 3's limits, clones \
         into new pid, mount, net, ipc, uts and cgroup namespaces, builds the view with pivot_root, drops every capability, applies Landlock and the seccomp filter, execs, reaps \
         and removes the cgroups. bwrap does the namespaces (plus a user namespace) and the view but no cgroup, \
         Landlock or seccomp; the last row gives it ring 3's limits the way a script would: the harness creates v1 \
         cgroups, the child joins them before exec, the harness removes them after. Neither loads BPF programs here \
         (ring 3 without `--events` or connect rules does not; see docs/adr/0003-launcher.md), so the `agt-jail` \
         executable runs the jail itself, without handing over to `agt-jail-full`. The agent is born in its cgroup v2 (clone3 with CLONE_INTO_CGROUP); its v1 cgroups are created, limited and joined \
         while the jail builds its root, before the agent exists; agt-jail exits on the status the jail's init sends, without waiting for the init's namespace teardown (docs/adr/0004-jail-start-up.md).\n",
        jail_net_paired[1],
        jail_net_paired[0],
        jail_net_paired[2],
        bwrap_net_paired[1],
        bwrap_net_paired[0],
        bwrap_net_paired[2],
        runs = opts.runs,
        machine = machine,
        jail = cases[1].argv.join(" ").replace(&bin.display().to_string(), "agt-jail"),
        unlimited = cases[2].argv.join(" ").replace(&bin.display().to_string(), "agt-jail"),
        bwrap = BWRAP.join(" "),
        bwrap_shared = cases[BWRAP_SHARED_ROW].argv.join(" "),
        ring2 = cases[RING2_ROW].argv.join(" ").replace(&bin.display().to_string(), "agt-jail"),
        ring2_none = cases[RING2_NONE_ROW].argv.join(" ").replace(&bin.display().to_string(), "agt-jail"),
    );
    let section = if opts.governed_runs > 0 {
        format!("{section}\n{}", governed::section(&bin, opts.governed_runs)?)
    } else {
        section
    };
    print!("{section}");
    if opts.write {
        let path = root.join("docs/benchmarks.md");
        let text = fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".into());
        let updated = replace_section(&text, &section);
        fs::write(&path, updated).with_context(|| format!("cannot write {}", path.display()))?;
        println!("\nwrote {}", path.display());
    }
    Ok(())
}

/// Replaces the `## Jail start-up` section (up to the next `## ` heading) or appends it,
/// leaving every other section as it is.
fn replace_section(text: &str, section: &str) -> String {
    let heading = "## Jail start-up";
    match text.find(heading) {
        Some(start) => {
            let rest = &text[start + heading.len()..];
            let end = rest.find("\n## ").map_or(text.len(), |i| start + heading.len() + i + 1);
            format!("{}{}{}", &text[..start], section, &text[end..])
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn section_is_replaced_or_appended_without_touching_others() {
        let other = "# Benchmarks\n\n## Policy kernel\n\nfast\n";
        let appended = replace_section(other, "## Jail start-up\n\nnew\n");
        assert_eq!(appended, "# Benchmarks\n\n## Policy kernel\n\nfast\n\n## Jail start-up\n\nnew\n");
        let both = "# B\n\n## Jail start-up\n\nold\n\n## Policy kernel\n\nfast\n";
        assert_eq!(
            replace_section(both, "## Jail start-up\n\nnew\n"),
            "# B\n\n## Jail start-up\n\nnew\n## Policy kernel\n\nfast\n"
        );
    }

    #[test]
    fn quartiles_of_differences() {
        assert_eq!(quartiles(vec![3.0, -1.0, 2.0, 0.0]), [-1.0, 0.0, 2.0]);
        assert_eq!(quartiles((1..=100).rev().map(f64::from).collect()), [25.0, 50.0, 75.0]);
        assert_eq!(quartiles(Vec::new()), [0.0; 3]);
    }

    #[test]
    fn share_net_keeps_every_other_namespace() {
        let argv = bwrap_share_net();
        assert_eq!(&argv[..3], ["/usr/bin/bwrap", "--unshare-all", "--share-net"]);
        assert_eq!(argv.len(), BWRAP.len() + 1);
    }

    #[test]
    fn percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&samples, 95.0), Duration::from_millis(95));
    }
}
