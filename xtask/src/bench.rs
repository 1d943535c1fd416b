//! `cargo xtask bench`: jail start-up, side by side with bubblewrap doing equivalent
//! isolation. Runs are interleaved (bare, agt-jail, bwrap, bare, ...) so drift in the
//! machine's load hits every command alike; median and p95 over `--runs` each.
//! Needs no extra tool: timing is done here with a monotonic clock around spawn+wait.
use std::{
    fs,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::util::{is_root, repo_root, run_checked, target_dir};

#[derive(clap::Args)]
pub struct Options {
    /// Runs per command (after 10 warm-up runs each).
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// Write the results into the `## Jail start-up` section of docs/benchmarks.md.
    #[arg(long)]
    write: bool,
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

struct Case {
    name: &'static str,
    argv: Vec<String>,
    samples: Vec<Duration>,
}

fn once(argv: &[String]) -> Result<Duration> {
    let start = Instant::now();
    let status = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("cannot run {}", argv[0]))?;
    let elapsed = start.elapsed();
    if !status.success() {
        bail!("{} failed with {status}", argv.join(" "));
    }
    Ok(elapsed)
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
    let load = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load.split_whitespace().take(3).collect::<Vec<_>>().join(" ");
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
    if !bin.exists() {
        bail!("{} was not built", bin.display());
    }
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
    let mut cases = vec![
        Case { name: "bare /bin/true", argv: vec!["/bin/true".into()], samples: Vec::new() },
        Case { name: "agt-jail exec --ring 3", argv: jail, samples: Vec::new() },
        Case { name: "agt-jail exec --ring 3, no cgroup limits", argv: unlimited, samples: Vec::new() },
        Case {
            name: "bwrap (equivalent isolation)",
            argv: BWRAP.iter().map(|s| s.to_string()).collect(),
            samples: Vec::new(),
        },
    ];
    for case in &cases {
        for _ in 0..10 {
            once(&case.argv)?;
        }
    }
    for _ in 0..opts.runs {
        for case in cases.iter_mut() {
            let sample = once(&case.argv)?;
            case.samples.push(sample);
        }
    }
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
    let bwrap_median = medians[3].as_secs_f64().max(1e-9);
    let ratio = medians[1].as_secs_f64() / bwrap_median;
    let ratio_unlimited = medians[2].as_secs_f64() / bwrap_median;
    let section = format!(
        "## Jail start-up\n\nMeasured by `cargo xtask bench --runs {runs}` (as root): {runs} interleaved runs of each \
         command after 10 warm-up runs, wall time from spawn to exit.\n\nMachine: {machine}.\n\n{table}\nagt-jail / bwrap \
         median ratio: {ratio:.2} with ring 3's limits, {ratio_unlimited:.2} without (bwrap sets none).\n\nCommands:\n\n```\n{jail}\n{unlimited}\n{bwrap}\n```\n\nWhat each does: agt-jail creates the \
         agent's cgroup (v2 plus v1 memory/pids/cpu on hybrid hosts) with ring 3's limits, clones into new pid, mount, \
         net, ipc, uts and cgroup namespaces, builds the view with pivot_root, drops every capability, applies Landlock \
         and the seccomp filter, execs, reaps and removes the cgroup. bwrap does the namespaces and the view but no \
         cgroup, Landlock or seccomp. Neither loads BPF programs here (ring 3 without `--events` or connect rules does \
         not; see docs/adr/0003-launcher.md). The jail is cloned straight into its cgroup v2 (clone3 with \
         CLONE_INTO_CGROUP); on a hybrid host each limit also means joining a v1 hierarchy, a cgroup migration \
         that waits for an RCU grace period - that is the gap between the two agt-jail rows.\n",
        runs = opts.runs,
        machine = machine(),
        jail = cases[1].argv.join(" ").replace(&bin.display().to_string(), "agt-jail"),
        unlimited = cases[2].argv.join(" ").replace(&bin.display().to_string(), "agt-jail"),
        bwrap = BWRAP.join(" "),
    );
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
    fn percentiles() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&samples, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&samples, 95.0), Duration::from_millis(95));
    }
}
