//! `cargo xtask vm-test`: boots Debian kernels in QEMU and runs the test suite inside.
//!
//! Some enforcement (BPF LSM, "Tier A") only exists on kernels the build machine may not
//! offer, and the jail must hold on the kernels people run, so the suite also runs in a VM
//! on each kernel of a small matrix: 5.10 (Debian 11), 6.1 (Debian 12) and 6.12 (Debian 12
//! security/backports).
//!
//! 1. host packages: qemu-system-x86 and busybox-static are installed with apt when
//!    missing (as root); nothing else is needed on the host.
//! 2. kernels: the newest `linux-image-6.1.0-N-amd64-unsigned` (bookworm),
//!    `linux-image-6.12.N+deb12-amd64-unsigned` (bookworm-security; on machines whose
//!    archive lacks it, bookworm-backports is added once as
//!    /etc/apt/sources.list.d/agt-jail-vm-backports.list) and
//!    `linux-image-5.10.0-N-amd64-unsigned` (bullseye, bullseye-security) are fetched with
//!    `apt-get download` and unpacked with `dpkg-deb -x` — never installed — and cached
//!    under target/vm/kernels/PACKAGE_VERSION/. A cached kernel is used without asking
//!    apt again unless `--refresh` is given. Bullseye is an older release than the host's,
//!    so it is not added to the host's sources (that would offer its packages to every
//!    `apt-get install` on the machine): the runner keeps an apt of its own for it under
//!    target/vm/apt/bullseye (sources.list, lists, cache; `apt-get -o Dir::...`), written
//!    from the mirrors that serve the host's own release in /etc/apt (so a local mirror is
//!    used), and updated once per run that needs it. apt still checks the archive's
//!    signatures with Debian's keyring (which holds the older releases' keys); no root is
//!    needed for it. Fetching a .deb straight from the pool was the alternative: it would
//!    need the Packages index parsed and its signature checked by hand.
//! 3. tests: `cargo test --no-run` builds the integration test binaries (with
//!    `--unit` the unit tests too); their paths come from cargo's JSON messages.
//!    vm-tests/matrix (vm_matrix.rs) says which of them each kernel runs: every guest runs
//!    under TCG on the build machines, so the newest kernel runs every test that touches
//!    the kernel and the older ones the jail suites that must hold everywhere. The
//!    selection, each kernel's time by test target and every skip with its reason are in
//!    the summary; a command-line filter narrows the selection (a kernel left with no
//!    matching test is not booted), `--no-matrix` drops it.
//! 4. initramfs: a static busybox, vm-tests/init.sh as /init, the test binaries,
//!    `agt-jail` and `agt-jail-full` at their host paths (tests find the binary through the
//!    compile-time `CARGO_BIN_EXE_agt-jail`, and it finds `agt-jail-full` beside it), their shared libraries (ldd), the repository's
//!    policies/, profiles/, tests/probes/ and tests/policies/, the host programs listed in
//!    vm-tests/guest-tools (bash for /dev/tcp, python3 for the escape probes) and the
//!    directories in vm-tests/guest-trees (Python's standard library), one test list per
//!    kernel (etc/agt-vm/tests-SERIES) and the host's `uname -r`. Debug info is stripped to
//!    keep it small. No kernel modules are needed: serial console, initramfs root, results
//!    over the console. The host's glibc travels with the binaries, so the bookworm-built
//!    tests run on the bullseye kernel as on the others.
//! 5. QEMU: TCG (KVM only when a probe shows it runs guests), `lsm=...,bpf` (a name the
//!    kernel lacks is left out by the kernel: 5.10 predates Landlock and runs
//!    lockdown,capability,bpf), `agt_vm_series=SERIES` for the init to pick its list, pure
//!    cgroup v2. The init prints `AGT-VM-RESULT` lines and an `AGT-VM-VERDICT`; this
//!    runner fails on any failed test, a missing verdict, a kernel panic or a timeout,
//!    and then prints the tail of the guest console (the whole console is kept in
//!    target/vm/logs/KERNEL.log).
use std::{
    collections::{BTreeMap, VecDeque},
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    util::{is_root, output, repo_root},
    vm_matrix::{self, Matrix, Part},
};

/// The kernel command line's LSM order: BPF LSM active next to Landlock.
const LSM: &str = "lockdown,capability,landlock,bpf";
const BACKPORTS_LIST: &str = "/etc/apt/sources.list.d/agt-jail-vm-backports.list";
const CONSOLE_TAIL: usize = 80;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KernelChoice {
    #[value(name = "5.10")]
    V5_10,
    #[value(name = "6.1")]
    V6_1,
    #[value(name = "6.12")]
    V6_12,
    #[value(name = "all")]
    All,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// KVM when a probe shows QEMU can run guests with it, else TCG.
    Auto,
    Tcg,
    Kvm,
}

#[derive(clap::Args)]
pub struct Options {
    /// Kernel(s) to boot (with --systemd, `all` means 6.12).
    #[arg(long, value_enum, default_value = "all")]
    pub(crate) kernel: KernelChoice,
    /// QEMU accelerator.
    #[arg(long, value_enum, default_value = "auto")]
    pub(crate) accel: Accel,
    /// Boot a Debian userspace with systemd as PID 1 (built with mmdebstrap, cached under
    /// target/vm/systemd) instead of the test suite, install agt-jail and its unit there
    /// and run vm-tests/systemd-guest.sh (xtask/src/vm_systemd.rs).
    #[arg(long)]
    pub(crate) systemd: bool,
    /// Limit for one VM run (boot + all tests), in seconds; past it the VM is killed and
    /// the run fails.
    #[arg(long, default_value_t = 1800)]
    pub(crate) timeout: u64,
    /// Limit for a KVM guest to reach init, in seconds; past it the guest is stopped and
    /// this and every later kernel boot under TCG instead (with `--accel auto`).
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..))]
    kvm_init_timeout: u64,
    /// Limit for one test inside the VM, in seconds (killed and failed past it).
    #[arg(long, default_value_t = 300)]
    test_timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    pub(crate) memory: u32,
    /// Ask apt for the newest kernel packages even when kernels are cached.
    #[arg(long)]
    pub(crate) refresh: bool,
    /// Also run the unit-test binaries (default: the integration tests, `[[test]]` targets);
    /// vm-tests/matrix places them under its `*` line.
    #[arg(long)]
    pub(crate) unit: bool,
    /// Run every built test on every kernel booted, not the selection of vm-tests/matrix.
    #[arg(long)]
    pub(crate) no_matrix: bool,
    /// Print the whole guest console, not only the result lines.
    #[arg(long, short)]
    pub(crate) verbose: bool,
    /// Run only tests whose `TARGET::NAME` contains one of these strings (within each
    /// kernel's selection from vm-tests/matrix unless --no-matrix).
    #[arg(last = true)]
    pub(crate) filter: Vec<String>,
}

/// A kernel series of the matrix and how its Debian packages are named.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Series {
    pub(crate) name: &'static str,
    /// `apt-cache search --names-only` pattern.
    search: &'static str,
    /// Name prefix before the number that orders packages of the series.
    prefix: &'static str,
    /// What may follow that number (flavour and build), e.g. `-amd64-unsigned`.
    suffixes: &'static [&'static str],
    archive: Archive,
}

/// Which apt answers for a series' packages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Archive {
    /// The machine's own apt (bookworm, bookworm-security; bookworm-backports added
    /// when the archive has no 6.12).
    Host,
    /// A private apt under target/vm/apt/SUITE with SUITE and SUITE-security from the
    /// machine's own Debian mirror: an older release is never made a source of the host.
    Suite(&'static str),
}

pub(crate) const SERIES: [Series; 3] = [
    Series {
        name: "5.10",
        search: r"^linux-image-5\.10\.0-[0-9]+-amd64-unsigned$",
        prefix: "linux-image-5.10.0-",
        suffixes: &["-amd64-unsigned"],
        archive: Archive::Suite("bullseye"),
    },
    Series {
        name: "6.1",
        search: r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
        prefix: "linux-image-6.1.0-",
        suffixes: &["-amd64-unsigned"],
        archive: Archive::Host,
    },
    Series {
        name: "6.12",
        search: r"^linux-image-6\.12\.[0-9]+\+(deb12|bpo)-amd64-unsigned$",
        prefix: "linux-image-6.12.",
        suffixes: &["+deb12-amd64-unsigned", "+bpo-amd64-unsigned"],
        archive: Archive::Host,
    },
];

impl Series {
    /// The number that orders this series' packages (ABI or patch level), if `package` is one.
    fn rank(&self, package: &str) -> Option<u64> {
        let rest = package.strip_prefix(self.prefix)?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let after = &rest[digits.len()..];
        self.suffixes.contains(&after).then(|| digits.parse().ok()).flatten()
    }
}

/// An unpacked kernel in the cache.
#[derive(Debug)]
pub(crate) struct Kernel {
    pub(crate) series: &'static str,
    pub(crate) package: String,
    pub(crate) version: String,
    vmlinuz: PathBuf,
    /// `uname -r` of the guest (from the vmlinuz file name).
    pub(crate) release: String,
    /// The modules the guest loads at boot ([`GUEST_MODULES`] and what they depend on),
    /// uncompressed, with `order` listing them dependencies first.
    pub(crate) modules: PathBuf,
}

struct TestBinary {
    target: String,
    path: PathBuf,
}

struct Built {
    tests: Vec<TestBinary>,
    /// `agt-jail` and `agt-jail-full`, which it finds beside itself.
    executables: Vec<PathBuf>,
}

#[derive(Default, Debug)]
pub(crate) struct Outcome {
    pub(crate) pass: u64,
    pub(crate) fail: u64,
    skip: u64,
    pub(crate) verdict: bool,
    pub(crate) failed_tests: Vec<String>,
    /// (test, reason) of every skip, shown in the summary.
    skipped_tests: Vec<(String, String)>,
    pub(crate) boot_secs: Option<f64>,
    /// Seconds spent per test target (from each `AGT-VM-RUN` line to its result), to
    /// show what each part of vm-tests/matrix costs.
    target_secs: BTreeMap<String, f64>,
    /// The test started last and when its `AGT-VM-RUN` line came.
    running: Option<(String, Instant)>,
    /// The guest was stopped because it had not reached init by the KVM init bound.
    pub(crate) init_timed_out: bool,
    pub(crate) total_secs: f64,
    pub(crate) problem: Option<String>,
}

/// Totals over every kernel booted, for `cargo xtask test`'s summary.
#[derive(Default)]
pub struct VmTotals {
    pub passed: u64,
    pub failed: u64,
    /// `kernel: test: reason` for each skip.
    pub skipped: Vec<String>,
    /// True when a kernel run failed as a whole (panic, timeout, no verdict, a failed test).
    pub any_failure: bool,
}

pub fn run(opts: &Options) -> Result<()> {
    if opts.systemd {
        return crate::vm_systemd::run(opts);
    }
    if run_suite(opts)?.any_failure {
        bail!("vm-test failed");
    }
    Ok(())
}

/// The default run (every kernel, default limits), as `cargo xtask test` does it.
pub fn default_options() -> Options {
    #[derive(clap::Parser)]
    struct Defaults {
        #[command(flatten)]
        options: Options,
    }
    <Defaults as clap::Parser>::parse_from(["vm-test"]).options
}

pub fn run_suite(opts: &Options) -> Result<VmTotals> {
    let started = Instant::now();
    let root = repo_root();
    let vm_dir = root.join("target/vm");
    fs::create_dir_all(&vm_dir).with_context(|| format!("cannot create {}", vm_dir.display()))?;

    let mut apt = Apt::default();
    ensure_host_packages(&mut apt)?;

    let series: Vec<Series> = SERIES
        .iter()
        .copied()
        .filter(|s| match opts.kernel {
            KernelChoice::All => true,
            KernelChoice::V5_10 => s.name == "5.10",
            KernelChoice::V6_1 => s.name == "6.1",
            KernelChoice::V6_12 => s.name == "6.12",
        })
        .collect();
    let mut kernels = Vec::new();
    for s in &series {
        let kernel = resolve_kernel(&vm_dir, s, opts.refresh, &mut apt)?;
        println!("vm-test: kernel {} = {} {} ({})", s.name, kernel.package, kernel.version, kernel.release);
        kernels.push(kernel);
    }
    let prepared = started.elapsed();

    let build_started = Instant::now();
    let built = build_tests(&root, opts.unit)?;
    println!("vm-test: {} test binaries built in {:.1}s", built.tests.len(), build_started.elapsed().as_secs_f64());
    let selections = select_tests(&root, &built, &kernels, opts.no_matrix)?;
    for selection in &selections {
        println!("vm-test: {}", selection.describe(built.tests.len()));
    }
    // A filter may name tests that only some kernels run (`-- enforce_policy` with the
    // default `--kernel all`): those kernels are not booted rather than failed for running
    // nothing. Which tests match is known on the host from the binaries' own lists.
    let (kernels, selections) = if opts.filter.is_empty() {
        (kernels, selections)
    } else {
        let listed = list_tests(&built)?;
        let mut kept = (Vec::new(), Vec::new());
        for (kernel, selection) in kernels.into_iter().zip(selections) {
            let matching = selection.matching(&built, &listed, &opts.filter);
            if matching == 0 {
                println!("vm-test: {}: none of its tests matches the filter; not booted", selection.series);
            } else {
                println!("vm-test: {}: {matching} of its tests match the filter", selection.series);
                kept.0.push(kernel);
                kept.1.push(selection);
            }
        }
        if kept.0.is_empty() {
            bail!(
                "no test of the kernels chosen matches the filter {:?} (in their selection from {}; --no-matrix runs every test)",
                opts.filter,
                vm_matrix::PATH
            );
        }
        kept
    };

    // Per-run names: several people may run the VM suite from one checkout at once.
    let initrd = vm_dir.join(format!("initramfs-{}.cpio", std::process::id()));
    let _remove_initrd = RemoveOnDrop(initrd.clone());
    let image_started = Instant::now();
    let size = build_initramfs(&root, &vm_dir, &built, &selections, &kernels, opts, &initrd)?;
    println!(
        "vm-test: initramfs {} ({:.1} MiB) in {:.1}s",
        initrd.display(),
        size as f64 / (1024.0 * 1024.0),
        image_started.elapsed().as_secs_f64()
    );

    let mut accel = choose_accel(opts.accel);
    println!("vm-test: accelerator {accel}");
    let logs = vm_dir.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;

    let mut outcomes = Vec::new();
    for (kernel, selection) in kernels.iter().zip(&selections) {
        println!("vm-test: booting {} ({})", kernel.release, kernel.package);
        let log = logs.join(format!("{}.log", kernel.series));
        let mut outcome = boot(kernel, &initrd, &Extra::default(), accel, opts, &log)?;
        // Some paravirtual KVMs pass the firmware probe yet never bring a Linux guest to
        // init: under `--accel auto` that is a host problem, not a test result, so the
        // rest of the run uses TCG (which works everywhere, only slower).
        if outcome.init_timed_out && opts.accel == Accel::Auto {
            println!(
                "vm-test: the KVM guest of {} did not reach init within {}s; falling back to TCG for it and every later kernel (log kept as .kvm)",
                kernel.release, opts.kvm_init_timeout
            );
            let _ = fs::rename(&log, log.with_extension("log.kvm"));
            accel = Accelerator::Tcg;
            outcome = boot(kernel, &initrd, &Extra::default(), accel, opts, &log)?;
        }
        // A guest that dies before our init ran (seen: a TCG guest kernel panicking in
        // early boot) says nothing about the code under test: boot it once more. A guest
        // that reached init is never booted again, whatever its tests did.
        if outcome.boot_secs.is_none() {
            println!("vm-test: {} never reached init; booting it once more (log kept as .first)", kernel.release);
            let _ = fs::rename(&log, log.with_extension("log.first"));
            outcome = boot(kernel, &initrd, &Extra::default(), accel, opts, &log)?;
        }
        outcomes.push((kernel, selection, outcome, log));
    }

    println!();
    println!("vm-test summary (kernels ready in {:.1}s):", prepared.as_secs_f64());
    let mut totals = VmTotals::default();
    for (kernel, selection, outcome, log) in &outcomes {
        let boot = outcome.boot_secs.map_or_else(|| "no init".to_string(), |secs| format!("init after {secs:.1}s"));
        let ok = outcome.problem.is_none() && outcome.verdict && outcome.fail == 0;
        println!(
            "  {:<5} {:<24} {}  pass={} fail={} skip={}  {boot}, {:.1}s total  log {}",
            kernel.series,
            kernel.release,
            if ok { "ok    " } else { "FAILED" },
            outcome.pass,
            outcome.fail,
            outcome.skip,
            outcome.total_secs,
            log.display()
        );
        println!("        {}", selection.describe(built.tests.len()));
        println!("        time by target: {}", time_by_target(&outcome.target_secs));
        if let Some(problem) = &outcome.problem {
            println!("        {problem}");
        }
        for test in &outcome.failed_tests {
            println!("        failed: {test}");
        }
        for (test, reason) in &outcome.skipped_tests {
            println!("        skipped: {test}: {reason}");
            totals.skipped.push(format!("{} guest: {test}: {reason}", kernel.release));
        }
        totals.passed += outcome.pass;
        totals.failed += outcome.fail;
        totals.any_failure |= !ok;
    }
    println!("vm-test: wall time {:.1}s", started.elapsed().as_secs_f64());
    Ok(totals)
}

/// Runs a command, failing with the command line when it exits non-zero.
fn run_cmd(cmd: &mut Command) -> Result<()> {
    let shown = format!("{cmd:?}");
    let status = cmd.status().with_context(|| format!("cannot start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

/// Removes a per-run file however the run ends.
pub(crate) struct RemoveOnDrop(pub(crate) PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// Host packages and apt

#[derive(Default)]
pub(crate) struct Apt {
    updated: bool,
    /// Private archives (`Archive::Suite`) already updated in this run.
    updated_suites: Vec<&'static str>,
}

impl Apt {
    fn available() -> bool {
        output(Command::new("sh").args(["-c", "command -v apt-get"])).is_some()
    }

    fn update(&mut self) -> Result<()> {
        if self.updated {
            return Ok(());
        }
        if !is_root() {
            bail!("apt-get update needs root; run as root or install the packages named above");
        }
        run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
        self.updated = true;
        Ok(())
    }

    pub(crate) fn install(&mut self, packages: &[&str]) -> Result<()> {
        self.update()?;
        run_cmd(
            Command::new("apt-get")
                .args(["install", "-y", "-qq", "--no-install-recommends"])
                .args(packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    }
}

pub(crate) fn package_installed(name: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", name]))
        .is_some_and(|status| status.contains("install ok installed"))
}

/// qemu-system-x86 and busybox-static (a static busybox is the guest's userland).
pub(crate) fn ensure_host_packages(apt: &mut Apt) -> Result<()> {
    let mut missing = Vec::new();
    if output(Command::new("sh").args(["-c", "command -v qemu-system-x86_64"])).is_none() {
        missing.push("qemu-system-x86");
    }
    if !package_installed("busybox-static") {
        missing.push("busybox-static");
    }
    // modinfo reads the dependencies of the modules the guest loads (stage_modules).
    if output(Command::new("sh").args(["-c", "command -v modinfo"])).is_none() {
        missing.push("kmod");
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !Apt::available() {
        bail!("missing host tools ({}) and no apt-get to install them", missing.join(", "));
    }
    println!("vm-test: installing {}", missing.join(" "));
    apt.install(&missing)
}

// ---------------------------------------------------------------------------------------
// Kernels

fn kernels_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join("kernels")
}

/// The newest cached kernel of the series, or the newest in the archive (downloaded once).
pub(crate) fn resolve_kernel(vm_dir: &Path, series: &Series, refresh: bool, apt: &mut Apt) -> Result<Kernel> {
    let cache = kernels_dir(vm_dir);
    if !refresh {
        if let Some(kernel) = newest_cached(&cache, series) {
            return Ok(kernel);
        }
    }
    if !Apt::available() {
        bail!("no cached {} kernel under {} and no apt-get to fetch one", series.name, cache.display());
    }
    let options = match series.archive {
        Archive::Host => {
            apt.update()?;
            Vec::new()
        }
        Archive::Suite(suite) => private_apt(vm_dir, suite, apt)?,
    };
    let mut package = newest_in_archive(series, &options)?;
    if package.is_none() && series.name == "6.12" {
        add_backports_source()?;
        apt.updated = false;
        apt.update()?;
        package = newest_in_archive(series, &options)?;
    }
    let package =
        package.with_context(|| format!("apt knows no package matching {} (after apt-get update)", series.search))?;
    let version = output(Command::new("apt-cache").args(&options).args(["show", "--no-all-versions", &package]))
        .and_then(|text| text.lines().find_map(|line| line.strip_prefix("Version: ").map(|v| v.trim().to_string())))
        .with_context(|| format!("apt-cache show {package} gave no version"))?;
    let dir = cache.join(format!("{package}_{version}"));
    if let Some(kernel) = cached_kernel(&dir, series) {
        return Ok(kernel);
    }
    download_kernel(&cache, &dir, &package, &options)?;
    cached_kernel(&dir, series).with_context(|| format!("{} holds no vmlinuz after unpacking", dir.display()))
}

fn newest_in_archive(series: &Series, apt_options: &[String]) -> Result<Option<String>> {
    let found = output(Command::new("apt-cache").args(apt_options).args(["search", "--names-only", series.search]))
        .context("apt-cache search failed")?;
    Ok(found
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter_map(|name| series.rank(name).map(|rank| (rank, name.to_string())))
        .max()
        .map(|(_, name)| name))
}

fn newest_cached(cache: &Path, series: &Series) -> Option<Kernel> {
    let entries = fs::read_dir(cache).ok()?;
    entries
        .filter_map(|entry| entry.ok())
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            let package = name.split('_').next()?.to_string();
            let rank = series.rank(&package)?;
            let kernel = cached_kernel(&entry.path(), series)?;
            Some((rank, kernel))
        })
        .max_by_key(|(rank, _)| *rank)
        .map(|(_, kernel)| kernel)
}

fn cached_kernel(dir: &Path, series: &Series) -> Option<Kernel> {
    let name = dir.file_name()?.to_str()?;
    let (package, version) = name.split_once('_')?;
    let vmlinuz = dir.join("vmlinuz");
    let release = fs::read_to_string(dir.join("release")).ok()?.trim().to_string();
    let modules = dir.join("modules");
    // A kernel cached before its modules (or the ones [`GUEST_MODULES`] names now) were
    // kept is fetched again.
    (vmlinuz.is_file() && modules_current(&modules)).then(|| Kernel {
        series: series.name,
        package: package.to_string(),
        version: version.to_string(),
        vmlinuz,
        release,
        modules,
    })
}

/// `apt-get download` + `dpkg-deb -x` into a scratch directory; keeps vmlinuz, config,
/// the release name and the modules the guest loads ([`stage_modules`]), then drops the rest.
/// Modules the guest loads at boot, for what Debian builds as modules and the jail uses:
/// the veth pair and the nf_tables masquerade of an allowlist ring's egress
/// (agent/jail/src/egress.rs). Their dependencies come along ([`stage_modules`]).
/// virtio_blk and ext4 mount the systemd guest's root disk (xtask/src/vm_systemd.rs).
const GUEST_MODULES: [&str; 8] =
    ["veth", "nf_tables", "nf_nat", "nf_conntrack", "nft_chain_nat", "nft_masq", "virtio_blk", "ext4"];

/// Whether a kernel's staged modules are those of [`GUEST_MODULES`] (stage_modules writes
/// the list it staged for as `wanted`).
fn modules_current(modules: &Path) -> bool {
    modules.join("order").is_file()
        && fs::read_to_string(modules.join("wanted")).is_ok_and(|wanted| wanted == GUEST_MODULES.join("\n"))
}

/// Copies [`GUEST_MODULES`] and every module they depend on (`modinfo -F depends`) from a
/// kernel package's `lib/modules/RELEASE` into `out`, uncompressed (busybox's insmod
/// takes plain ELF), and writes `out/order`: the file names, each after its dependencies.
/// A module the kernel has built in is not in the package and is not needed.
fn stage_modules(tree: &Path, out: &Path) -> Result<()> {
    let mut files = BTreeMap::new();
    index_modules(tree, &mut files)?;
    fs::create_dir_all(out)?;
    let mut order = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for name in GUEST_MODULES {
        add_module(name, &files, out, &mut seen, &mut order)?;
    }
    fs::write(out.join("order"), order.iter().map(|n| format!("{n}\n")).collect::<String>())?;
    fs::write(out.join("wanted"), GUEST_MODULES.join("\n"))?;
    Ok(())
}

/// Module name (dashes as underscores) → its file, for every module under `dir`.
fn index_modules(dir: &Path, files: &mut BTreeMap<String, PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            index_modules(&path, files)?;
        } else if let Some(name) = module_name(&path) {
            files.insert(name, path);
        }
    }
    Ok(())
}

/// `nf_tables` for `.../nf_tables.ko`, `.ko.xz` or `.ko.zst`.
fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst"].iter().find_map(|ext| file.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

fn add_module(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    out: &Path,
    seen: &mut std::collections::BTreeSet<String>,
    order: &mut Vec<String>,
) -> Result<()> {
    if !seen.insert(name.to_string()) {
        return Ok(());
    }
    // Not a module of this kernel: built in (the config says `=y`), nothing to load.
    let Some(file) = files.get(name) else { return Ok(()) };
    for dep in module_field(file, "depends")?.split(',').filter(|d| !d.is_empty()) {
        add_module(&dep.replace('-', "_"), files, out, seen, order)?;
    }
    // Soft dependencies load first too: libcrc32c's `pre: crc32c` is the algorithm its init
    // asks the crypto API for (its init fails with ENOENT without it). A soft dependency
    // may name an algorithm rather than a module: crc32c is crc32c_generic's.
    for dep in softdep_pre(&module_field(file, "softdep")?) {
        let dep = dep.replace('-', "_");
        let generic = format!("{dep}_generic");
        let name = if files.contains_key(&dep) { dep } else { generic };
        add_module(&name, files, out, seen, order)?;
    }
    let plain = format!("{name}.ko");
    let file_name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    let bytes = if file_name.ends_with(".xz") {
        Command::new("xz").args(["-dc"]).arg(file).output().context("cannot run xz")?.stdout
    } else if file_name.ends_with(".zst") {
        Command::new("zstd").args(["-dcq"]).arg(file).output().context("cannot run zstd")?.stdout
    } else {
        read(file)?
    };
    if !bytes.starts_with(b"\x7fELF") {
        bail!("{}: not a module after decompression", file.display());
    }
    fs::write(out.join(&plain), bytes)?;
    order.push(plain);
    Ok(())
}

/// One `modinfo -F FIELD` of a module file (values on separate lines joined by spaces).
fn module_field(file: &Path, field: &str) -> Result<String> {
    let out =
        Command::new("modinfo").args(["-F", field]).arg(file).output().context("cannot run modinfo (install kmod)")?;
    if !out.status.success() {
        bail!("modinfo {}: {}", file.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).split_whitespace().collect::<Vec<_>>().join(" "))
}

/// The `pre:` names of a `softdep` value (`pre: a b post: c`).
fn softdep_pre(softdep: &str) -> Vec<String> {
    let mut pre = Vec::new();
    let mut in_pre = false;
    for word in softdep.split_whitespace() {
        match word {
            "pre:" => in_pre = true,
            "post:" => in_pre = false,
            name if in_pre => pre.push(name.to_string()),
            _ => {}
        }
    }
    pre
}

fn download_kernel(cache: &Path, dir: &Path, package: &str, apt_options: &[String]) -> Result<()> {
    let scratch = cache.join(format!(".partial-{package}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    // apt drops privileges to _apt for downloads when it can; a world-writable scratch
    // directory lets it (otherwise it warns and downloads as root).
    let _ = fs::set_permissions(&scratch, fs::Permissions::from_mode(0o777));
    println!("vm-test: apt-get download {package}");
    run_cmd(Command::new("apt-get").args(apt_options).args(["download", "-qq", package]).current_dir(&scratch))?;
    let deb = fs::read_dir(&scratch)?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    let unpacked = scratch.join("root");
    run_cmd(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let boot = unpacked.join("boot");
    let vmlinuz = fs::read_dir(&boot)
        .with_context(|| format!("{} has no boot/", deb.display()))?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path())
        .find(|path| path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .with_context(|| format!("{} has no boot/vmlinuz-*", deb.display()))?;
    let release = vmlinuz
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("vmlinuz-"))
        .context("odd vmlinuz name")?
        .to_string();
    let staged = scratch.join("kernel");
    fs::create_dir_all(&staged)?;
    fs::rename(&vmlinuz, staged.join("vmlinuz"))?;
    let config = boot.join(format!("config-{release}"));
    if config.exists() {
        fs::rename(&config, staged.join("config"))?;
    }
    stage_modules(&unpacked.join("lib/modules").join(&release), &staged.join("modules"))?;
    fs::write(staged.join("release"), format!("{release}\n"))?;
    fs::write(staged.join("package"), format!("{package}\n"))?;
    // A concurrent run may have cached the same kernel meanwhile; then keep its copy
    // (a copy from before modules were kept is replaced).
    if !(dir.join("vmlinuz").is_file() && modules_current(&dir.join("modules"))) {
        let _ = fs::remove_dir_all(dir);
        fs::rename(&staged, dir).with_context(|| format!("cannot move the kernel to {}", dir.display()))?;
    }
    let _ = fs::remove_dir_all(&scratch);
    Ok(())
}

/// Adds bookworm-backports as an apt source, once (the file is left for later runs).
fn add_backports_source() -> Result<()> {
    if Path::new(BACKPORTS_LIST).exists() {
        return Ok(());
    }
    let release = fs::read_to_string("/etc/os-release").unwrap_or_default();
    if !release.contains("VERSION_CODENAME=bookworm") {
        bail!("no 6.12 kernel package in the apt archive and this is not Debian bookworm; add a source that has one");
    }
    let mirror = debian_mirror(&apt_sources(Path::new("/etc/apt")), "bookworm").with_context(|| {
        "no apt source under /etc/apt serves Debian bookworm, so there is no mirror to take bookworm-backports (the 6.12 kernel) from"
    })?;
    println!("vm-test: adding apt source {BACKPORTS_LIST} (bookworm-backports from {mirror}) for the 6.12 kernel");
    fs::write(
        BACKPORTS_LIST,
        format!("# Added by `cargo xtask vm-test` for the 6.12 test kernel.\ndeb {mirror} bookworm-backports main\n"),
    )
    .with_context(|| format!("cannot write {BACKPORTS_LIST}"))
}

/// An apt of our own for an older Debian release (bullseye for 5.10): its sources,
/// package lists and cache live under target/vm/apt/SUITE, so the host's apt never sees
/// that release (adding it to /etc/apt would offer its packages to every `apt-get
/// install` on the machine), while apt still checks the archive's signatures with the
/// keys the host trusts. Returns the `-o` options that point apt-get/apt-cache at it;
/// updated once per run.
fn private_apt(vm_dir: &Path, suite: &'static str, apt: &mut Apt) -> Result<Vec<String>> {
    let dir = vm_dir.join("apt").join(suite);
    let options = private_apt_options(&dir);
    if apt.updated_suites.contains(&suite) {
        return Ok(options);
    }
    let sources = apt_sources(Path::new("/etc/apt"));
    let codename = host_codename().context("cannot tell this machine's Debian release from /etc/os-release")?;
    let mirror = debian_mirror(&sources, &codename).with_context(|| {
        format!("no apt source under /etc/apt serves Debian {codename}, so there is no mirror to take {suite} from")
    })?;
    let security = debian_mirror(&sources, &format!("{codename}-security"));
    let list = private_sources_list(suite, &mirror, security.as_deref());
    for sub in ["sources.list.d", "lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(dir.join(sub)).with_context(|| format!("cannot create {}", dir.join(sub).display()))?;
    }
    // Rewritten every time: the machine's mirror may have changed since the last run.
    fs::write(dir.join("sources.list"), list)
        .with_context(|| format!("cannot write {}/sources.list", dir.display()))?;
    println!(
        "vm-test: apt-get update of {suite} from {mirror}{} (private to {})",
        security.as_deref().map(|s| format!(" and {s}")).unwrap_or_default(),
        dir.display()
    );
    run_cmd(Command::new("apt-get").args(&options).args(["update", "-qq"]))?;
    apt.updated_suites.push(suite);
    Ok(options)
}

fn private_apt_options(dir: &Path) -> Vec<String> {
    [
        ("Dir::Etc::SourceList", dir.join("sources.list")),
        ("Dir::Etc::SourceParts", dir.join("sources.list.d")),
        ("Dir::State::Lists", dir.join("lists")),
        ("Dir::Cache", dir.join("cache")),
    ]
    .into_iter()
    .flat_map(|(key, path)| ["-o".to_string(), format!("{key}={}", path.display())])
    .collect()
}

/// One-line sources for `suite` (and `suite-security` where the machine has a security mirror).
fn private_sources_list(suite: &str, mirror: &str, security: Option<&str>) -> String {
    // Debian's keyring holds the keys of the older releases too.
    let keyring = "/usr/share/keyrings/debian-archive-keyring.gpg";
    let signed = if Path::new(keyring).is_file() { format!("[signed-by={keyring}] ") } else { String::new() };
    let mut list =
        format!("# Written by `cargo xtask vm-test` for its {suite} test kernel.\ndeb {signed}{mirror} {suite} main\n");
    if let Some(security) = security {
        list.push_str(&format!("deb {signed}{security} {suite}-security main\n"));
    }
    list
}

/// `VERSION_CODENAME` from /etc/os-release.
pub(crate) fn host_codename() -> Option<String> {
    let release = fs::read_to_string("/etc/os-release").ok()?;
    release.lines().find_map(|line| line.strip_prefix("VERSION_CODENAME=")).map(|c| c.trim_matches('"').to_string())
}

/// The text of every apt source file: `sources.list` and `sources.list.d/*.list|*.sources`.
pub(crate) fn apt_sources(etc_apt: &Path) -> Vec<String> {
    let mut files = vec![etc_apt.join("sources.list")];
    if let Ok(entries) = fs::read_dir(etc_apt.join("sources.list.d")) {
        let mut found: Vec<PathBuf> = entries
            .filter_map(|entry| entry.ok().map(|e| e.path()))
            .filter(|path| path.extension().is_some_and(|ext| ext == "list" || ext == "sources"))
            .collect();
        found.sort();
        files.extend(found);
    }
    files.iter().filter_map(|file| fs::read_to_string(file).ok()).collect()
}

/// The first mirror URI that serves `suite` itself (not `suite-security` or another
/// suite), from one-line (`deb URI SUITE ...`) or deb822 (`URIs:` / `Suites:`) sources:
/// machines with a local mirror keep using it for the extra suites the VM needs.
pub(crate) fn debian_mirror(sources: &[String], suite: &str) -> Option<String> {
    for text in sources {
        for stanza in text.split("\n\n") {
            let mut uris = Vec::new();
            let mut suites = Vec::new();
            for line in stanza.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
                if let Some(rest) = line.strip_prefix("deb ") {
                    // Options in brackets ([signed-by=...]) come before the URI.
                    let rest = match rest.trim_start().strip_prefix('[') {
                        Some(opts) => opts.split_once(']').map_or("", |(_, tail)| tail),
                        None => rest,
                    };
                    let mut words = rest.split_whitespace();
                    if let (Some(uri), Some(line_suite)) = (words.next(), words.next()) {
                        if line_suite == suite {
                            return Some(uri.trim_end_matches('/').to_string());
                        }
                    }
                } else if let Some(list) = line.strip_prefix("URIs:") {
                    uris.extend(list.split_whitespace());
                } else if let Some(list) = line.strip_prefix("Suites:") {
                    suites.extend(list.split_whitespace());
                }
            }
            if suites.contains(&suite) {
                if let Some(uri) = uris.first() {
                    return Some(uri.trim_end_matches('/').to_string());
                }
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// Test binaries

fn build_tests(root: &Path, unit: bool) -> Result<Built> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).args(["test", "--no-run", "--workspace", "--message-format=json-render-diagnostics"]);
    if unit {
        cmd.arg("--tests");
    } else {
        cmd.args(["--test", "*"]);
    }
    let out = cmd.stderr(Stdio::inherit()).output().context("cannot start cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed with {}", out.status);
    }
    let mut built = Built { tests: Vec::new(), executables: Vec::new() };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(executable) = message["executable"].as_str() else {
            continue;
        };
        let name = message["target"]["name"].as_str().unwrap_or_default().to_string();
        let kinds: Vec<&str> = message["target"]["kind"]
            .as_array()
            .map(|kinds| kinds.iter().filter_map(|k| k.as_str()).collect())
            .unwrap_or_default();
        let is_test = message["profile"]["test"].as_bool().unwrap_or(false);
        if is_test {
            let package = message["package_id"].as_str().unwrap_or_default();
            let target = if kinds.contains(&"test") { name } else { format!("{}/{name}", package_name(package)) };
            if package_name(package) == "xtask" {
                continue;
            }
            built.tests.push(TestBinary { target, path: PathBuf::from(executable) });
        } else if kinds.contains(&"bin") && (name == "agt-jail" || name == "agt-jail-full") {
            built.executables.push(PathBuf::from(executable));
        }
    }
    built.tests.sort_by(|a, b| a.target.cmp(&b.target));
    built.tests.dedup_by(|a, b| a.path == b.path);
    if built.tests.is_empty() {
        bail!("cargo built no test binaries");
    }
    Ok(built)
}

/// The package name in a cargo package id (`path+file:///...#name@0.1.0` or `name 0.1.0 (...)`).
fn package_name(id: &str) -> String {
    if let Some((_, tail)) = id.rsplit_once('#') {
        let name = tail.split('@').next().unwrap_or(tail);
        // `#0.1.0` alone means the directory name is the package name.
        if name.chars().next().is_some_and(|c| c.is_ascii_digit()) {
            let path = id.rsplit_once('#').map_or(id, |(path, _)| path);
            return path.rsplit('/').next().unwrap_or(path).to_string();
        }
        return name.to_string();
    }
    id.split_whitespace().next().unwrap_or(id).to_string()
}

/// The tests one kernel runs: per test binary (index into `Built::tests`), all of it or
/// the listed `TARGET::NAME` prefixes.
struct KernelTests {
    series: &'static str,
    parts: Vec<(usize, Part)>,
    /// From vm-tests/matrix (false with --no-matrix).
    from_matrix: bool,
}

impl KernelTests {
    /// "6.1: 9 of 21 test binaries (1 of them in part) from vm-tests/matrix".
    fn describe(&self, built: usize) -> String {
        let partial = self.parts.iter().filter(|(_, part)| *part != Part::Whole).count();
        format!(
            "{}: {} of {built} test binaries{}{}",
            self.series,
            self.parts.len(),
            if partial > 0 { format!(" ({partial} of them in part)") } else { String::new() },
            if self.from_matrix { format!(" from {}", vm_matrix::PATH) } else { " (--no-matrix)".to_string() }
        )
    }

    /// How many of this kernel's tests a command-line filter selects (`TARGET::NAME`
    /// contains one of its strings, as the guest's init decides). `listed` holds each
    /// binary's test names.
    fn matching(&self, built: &Built, listed: &[Vec<String>], filter: &[String]) -> usize {
        self.parts
            .iter()
            .flat_map(|(index, part)| {
                listed[*index].iter().map(move |name| (part, format!("{}::{name}", built.tests[*index].target)))
            })
            .filter(|(part, full)| part.selects(full) && filter.iter().any(|f| full.contains(f.as_str())))
            .count()
    }

    /// Lines `TARGET PART PATH` for the guest's init: PART is `all` or the comma-separated
    /// `TARGET::NAME` prefixes (test names hold no commas; the path may hold spaces).
    fn init_list(&self, built: &Built) -> String {
        self.parts
            .iter()
            .map(|(index, part)| {
                let test = &built.tests[*index];
                let part = match part {
                    Part::Whole => "all".to_string(),
                    Part::Tests(prefixes) => prefixes.join(","),
                };
                format!("{} {part} {}\n", test.target, test.path.display())
            })
            .collect()
    }
}

/// The test names of every built binary (`--list --format terse`, run on the host).
fn list_tests(built: &Built) -> Result<Vec<Vec<String>>> {
    built
        .tests
        .iter()
        .map(|test| {
            let out = Command::new(&test.path)
                .args(["--list", "--format", "terse"])
                .stderr(Stdio::null())
                .output()
                .with_context(|| format!("cannot run {} --list", test.path.display()))?;
            if !out.status.success() {
                bail!("{} --list failed with {}", test.path.display(), out.status);
            }
            Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| l.strip_suffix(": test"))
                .map(str::to_owned)
                .collect())
        })
        .collect()
}

/// Each kernel's tests, from vm-tests/matrix (or all of them with `no_matrix`).
fn select_tests(root: &Path, built: &Built, kernels: &[Kernel], no_matrix: bool) -> Result<Vec<KernelTests>> {
    if no_matrix {
        let parts = || (0..built.tests.len()).map(|index| (index, Part::Whole)).collect();
        return Ok(kernels
            .iter()
            .map(|k| KernelTests { series: k.series, parts: parts(), from_matrix: false })
            .collect());
    }
    let path = root.join(vm_matrix::PATH);
    let text = fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let names: Vec<&str> = SERIES.iter().map(|s| s.name).collect();
    let matrix = Matrix::parse(&text, &names)?;
    let targets: Vec<&str> = built.tests.iter().map(|t| t.target.as_str()).collect();
    matrix.check_targets(&targets)?;
    kernels
        .iter()
        .map(|kernel| {
            let mut parts = Vec::new();
            for (index, target) in targets.iter().enumerate() {
                if let Some(part) = matrix.part(kernel.series, target)? {
                    parts.push((index, part));
                }
            }
            Ok(KernelTests { series: kernel.series, parts, from_matrix: true })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Initramfs

fn build_initramfs(
    root: &Path,
    vm_dir: &Path,
    built: &Built,
    selections: &[KernelTests],
    kernels: &[Kernel],
    opts: &Options,
    out: &Path,
) -> Result<u64> {
    let mut archive = Cpio::default();
    // Each kernel's modules, which init.sh loads for the kernel it runs on.
    for kernel in kernels {
        let dir = format!("usr/lib/agt-modules/{}", kernel.release);
        archive.dir(&dir);
        let order = fs::read_to_string(kernel.modules.join("order"))?;
        for name in order.lines().chain(["order"]) {
            archive.file(&format!("{dir}/{name}"), 0o644, read(&kernel.modules.join(name))?);
        }
    }
    for dir in ["usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "proc", "sys", "dev", "tmp", "run", "root", "etc/agt-vm"]
    {
        archive.dir(dir);
    }
    // Merged /usr, as on the Debian host: /bin/true and /usr/bin/true are the same file.
    for dir in MERGED_USR {
        archive.symlink(dir, &format!("usr/{dir}"));
    }
    archive.device("dev/console", 0o600, 5, 1);
    archive.file("init", 0o755, include_bytes!("../../vm-tests/init.sh").to_vec());

    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("no busybox (install busybox-static)")?;
    if !ldd(&busybox)?.is_empty() {
        bail!("{} is not static (install busybox-static)", busybox.display());
    }
    archive.file("usr/bin/busybox", 0o755, read(&busybox)?);
    archive.symlink("usr/bin/sh", "busybox");

    let stage = vm_dir.join(format!("stage-{}", std::process::id()));
    let _ = fs::remove_dir_all(&stage);
    fs::create_dir_all(&stage)?;
    let mut elves: Vec<PathBuf> = built.tests.iter().map(|t| t.path.clone()).collect();
    elves.extend(built.executables.iter().cloned());
    let mut libraries = BTreeMap::new();
    for elf in &elves {
        archive.file(&rel(elf), 0o755, stripped(elf, &stage)?);
        for lib in ldd(elf)? {
            libraries.insert(lib.clone(), lib);
        }
    }
    for tool in guest_tools() {
        // A host without the program still runs the suite; the tests that need it fail
        // in the guest and say so.
        let host = match host_program(&tool) {
            Ok(host) => host,
            Err(err) => {
                println!("vm-test: warning: {err:#}");
                continue;
            }
        };
        archive.file(&format!("usr/bin/{tool}"), 0o755, read(&host)?);
        for lib in ldd(&host)? {
            libraries.insert(lib.clone(), lib);
        }
    }
    for (dir, excluded) in guest_trees() {
        add_host_tree(&mut archive, &dir, &excluded, &mut libraries)?;
    }
    for lib in libraries.values() {
        archive.file(&rel(lib), 0o755, read(lib)?);
    }
    // Tests reach repository files through CARGO_MANIFEST_DIR/../..: every directory on
    // such a path has to exist in the guest.
    add_dir_skeleton(&mut archive, root)?;
    for data in ["policies", "profiles", "tests/probes", "tests/policies"] {
        add_tree(&mut archive, &root.join(data))?;
    }

    let host_kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    archive.file("etc/agt-vm/host-kernel", 0o644, host_kernel.trim().as_bytes().to_vec());
    let list: String = built.tests.iter().map(|t| format!("{} all {}\n", t.target, t.path.display())).collect();
    archive.file("etc/agt-vm/tests", 0o644, list.into_bytes());
    // The guest's init picks its kernel's list by the `agt_vm_series=` boot parameter.
    for selection in selections {
        archive.file(&format!("etc/agt-vm/tests-{}", selection.series), 0o644, selection.init_list(built).into_bytes());
    }
    archive.file(
        "etc/agt-vm/filter",
        0o644,
        opts.filter.iter().map(|f| format!("{f}\n")).collect::<String>().into_bytes(),
    );
    archive.file("etc/agt-vm/test-timeout", 0o644, opts.test_timeout.to_string().into_bytes());
    archive.file("etc/agt-vm/cwd", 0o644, root.display().to_string().into_bytes());
    archive.file(
        "etc/passwd",
        0o644,
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n".to_vec(),
    );
    archive.file("etc/group", 0o644, b"root:x:0:\nshadow:x:42:\nnogroup:x:65534:\n".to_vec());
    // Like Debian's: tests check that a jailed agent cannot read it.
    archive.file("etc/shadow", 0o640, b"root:*:20000:0:99999:7:::\nnobody:*:20000:0:99999:7:::\n".to_vec());
    archive.file("etc/hostname", 0o644, b"agt-vm\n".to_vec());
    // Every Debian system has one; a jail binds the agent's resolver over it (docs/dns-egress.md).
    archive.file("etc/resolv.conf", 0o644, b"# the guest has no network and no nameserver\n".to_vec());

    let bytes = archive.finish();
    fs::write(out, &bytes).with_context(|| format!("cannot write {}", out.display()))?;
    let _ = fs::remove_dir_all(&stage);
    Ok(bytes.len() as u64)
}

/// Names listed in vm-tests/guest-tools (comments and blank lines dropped).
fn guest_tools() -> Vec<String> {
    include_str!("../../vm-tests/guest-tools")
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default().trim())
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The repository's directories (not their files), without build output and git data.
fn add_dir_skeleton(archive: &mut Cpio, dir: &Path) -> Result<()> {
    archive.dir(&rel(dir));
    let entries = fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries.filter_map(|e| e.ok()) {
        let name = entry.file_name();
        if name == "target" || name == ".git" {
            continue;
        }
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            add_dir_skeleton(archive, &entry.path())?;
        }
    }
    Ok(())
}

/// Directories listed in vm-tests/guest-trees, each with the entry names it leaves out.
fn guest_trees() -> Vec<(PathBuf, Vec<String>)> {
    include_str!("../../vm-tests/guest-trees")
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let dir = PathBuf::from(words.next()?);
            let excluded = words.filter_map(|w| w.strip_prefix('-')).map(str::to_owned).collect();
            Some((dir, excluded))
        })
        .collect()
}

/// Copies a host directory tree (files, symlinks) to the same path in the archive and
/// collects the shared libraries its ELF files need. A missing directory adds nothing.
fn add_host_tree(
    archive: &mut Cpio,
    dir: &Path,
    excluded: &[String],
    libraries: &mut BTreeMap<PathBuf, PathBuf>,
) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        println!("vm-test: warning: vm-tests/guest-trees names {}, which this host does not have", dir.display());
        return Ok(());
    };
    archive.dir(&rel(dir));
    for entry in entries.filter_map(|e| e.ok()) {
        if excluded.iter().any(|name| entry.file_name().to_str() == Some(name.as_str())) {
            continue;
        }
        let path = entry.path();
        let meta = fs::symlink_metadata(&path)?;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&path)?;
            archive.symlink(&rel(&path), &target.to_string_lossy());
        } else if meta.is_dir() {
            add_host_tree(archive, &path, excluded, libraries)?;
        } else if meta.is_file() {
            let data = read(&path)?;
            if data.starts_with(b"\x7fELF") {
                for lib in ldd(&path)? {
                    libraries.insert(lib.clone(), lib);
                }
            }
            archive.file(&rel(&path), meta.permissions().mode() & 0o7777, data);
        }
    }
    Ok(())
}

/// The host's copy of a program the guest needs, following symlinks.
fn host_program(name: &str) -> Result<PathBuf> {
    let found = ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
        .with_context(|| format!("vm-tests/guest-tools names {name}, which this host does not have"))?;
    fs::canonicalize(&found).with_context(|| format!("cannot resolve {}", found.display()))
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// An absolute host path as a path inside the archive.
fn rel(path: &Path) -> String {
    let path = path.to_string_lossy();
    let path = path.trim_start_matches('/');
    let top = path.split('/').next().unwrap_or_default();
    if MERGED_USR.contains(&top) {
        format!("usr/{path}")
    } else {
        path.to_string()
    }
}

/// Top-level directories that are links into /usr in the guest (merged /usr).
const MERGED_USR: [&str; 4] = ["bin", "sbin", "lib", "lib64"];

/// The ELF's bytes without debug info (objcopy), or as-is when objcopy is missing.
fn stripped(elf: &Path, stage: &Path) -> Result<Vec<u8>> {
    let name = elf.file_name().context("binary without a name")?;
    let out = stage.join(name);
    let ok =
        Command::new("objcopy").arg("--strip-debug").arg(elf).arg(&out).status().is_ok_and(|status| status.success());
    read(if ok { &out } else { elf })
}

/// The shared libraries (and dynamic loader) an ELF needs, as absolute paths.
pub(crate) fn ldd(elf: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd").arg(elf).output().context("cannot run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        let candidate = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = candidate.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

/// Adds a directory of small data files (policies, profiles) at its host path.
fn add_tree(archive: &mut Cpio, dir: &Path) -> Result<()> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.filter_map(|e| e.ok()) {
        let path = entry.path();
        let meta = entry.metadata()?;
        if meta.is_dir() {
            add_tree(archive, &path)?;
        } else if meta.is_file() && meta.len() <= 1 << 20 {
            archive.file(&rel(&path), 0o644, read(&path)?);
        }
    }
    Ok(())
}

enum Node {
    Dir,
    File { mode: u32, data: Vec<u8> },
    Symlink(String),
    Device { mode: u32, major: u32, minor: u32 },
}

/// A cpio "newc" archive (what the kernel unpacks as an initramfs), built in memory.
/// Parents are added for every path; entries are written in path order, so each
/// directory precedes its contents. Timestamps are zero, so equal inputs give equal bytes.
#[derive(Default)]
pub(crate) struct Cpio {
    nodes: BTreeMap<String, Node>,
}

impl Cpio {
    fn parents(&mut self, path: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.nodes.entry(prefix.clone()).or_insert(Node::Dir);
        }
    }

    pub(crate) fn dir(&mut self, path: &str) {
        self.parents(path);
        self.nodes.entry(path.to_string()).or_insert(Node::Dir);
    }

    pub(crate) fn file(&mut self, path: &str, mode: u32, data: Vec<u8>) {
        self.parents(path);
        self.nodes.insert(path.to_string(), Node::File { mode, data });
    }

    pub(crate) fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.nodes.insert(path.to_string(), Node::Symlink(target.to_string()));
    }

    pub(crate) fn device(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.parents(path);
        self.nodes.insert(path.to_string(), Node::Device { mode, major, minor });
    }

    pub(crate) fn finish(self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, node)) in (1u32..).zip(&self.nodes) {
            let (mode, data, rdev): (u32, &[u8], (u32, u32)) = match node {
                Node::Dir => (0o040_755, &[], (0, 0)),
                Node::File { mode, data } => (0o100_000 | mode, data, (0, 0)),
                Node::Symlink(target) => (0o120_777, target.as_bytes(), (0, 0)),
                Node::Device { mode, major, minor } => (0o020_000 | mode, &[], (*major, *minor)),
            };
            let nlink = if matches!(node, Node::Dir) { 2 } else { 1 };
            write_entry(&mut out, ino, mode, nlink, rdev, path, data);
        }
        write_entry(&mut out, 0, 0, 1, (0, 0), "TRAILER!!!", &[]);
        out
    }
}

fn write_entry(out: &mut Vec<u8>, ino: u32, mode: u32, nlink: u32, rdev: (u32, u32), name: &str, data: &[u8]) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        nlink,
        0, // mtime
        data.len() as u32,
        0, // devmajor
        0, // devminor
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

// ---------------------------------------------------------------------------------------
// QEMU

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Accelerator {
    Tcg,
    Kvm,
}

impl std::fmt::Display for Accelerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accelerator::Tcg => "tcg",
            Accelerator::Kvm => "kvm",
        })
    }
}

pub(crate) fn choose_accel(wanted: Accel) -> Accelerator {
    match wanted {
        Accel::Tcg => Accelerator::Tcg,
        Accel::Kvm => Accelerator::Kvm,
        Accel::Auto if kvm_runs_guests() => Accelerator::Kvm,
        Accel::Auto => Accelerator::Tcg,
    }
}

/// /dev/kvm existing is not enough (some paravirtual KVMs make stock QEMU abort when it
/// sets up its first vCPU) and a QEMU still running after a while proves nothing on a
/// loaded host, where it may not have reached that point yet: start a guest with nothing
/// to boot and wait for the firmware's banner on its debug console, which only a vCPU
/// that runs guest code prints.
fn kvm_runs_guests() -> bool {
    if !Path::new("/dev/kvm").exists() {
        return false;
    }
    let Ok(mut child) = Command::new("qemu-system-x86_64")
        .args(["-accel", "kvm", "-cpu", "host", "-smp", "2", "-display", "none", "-monitor", "none"])
        .args(["-serial", "none", "-nodefaults", "-no-reboot", "-m", "64"])
        .args(["-chardev", "stdio,id=firmware", "-device", "isa-debugcon,iobase=0x402,chardev=firmware"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
    else {
        return false;
    };
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            for byte in std::io::Read::bytes(stdout) {
                let Ok(byte) = byte else { break };
                seen.push(byte);
                if seen.ends_with(b"SeaBIOS") {
                    let _ = tx.send(());
                    return;
                }
            }
        });
    }
    // EOF (QEMU aborted) drops the sender and ends the wait at once.
    let runs = rx.recv_timeout(Duration::from_secs(20)).is_ok();
    let _ = child.kill();
    let _ = child.wait();
    runs
}

/// What a guest boots with besides the kernel and the initramfs.
#[derive(Default)]
pub(crate) struct Extra<'a> {
    /// More kernel command-line words.
    pub(crate) append: &'a str,
    /// A raw disk image attached as virtio disk `vda`, copy-on-write (`snapshot=on`): the
    /// guest's writes go to a temporary overlay and the image stays as it was.
    pub(crate) disk: Option<&'a Path>,
}

pub(crate) fn boot(
    kernel: &Kernel,
    initrd: &Path,
    extra: &Extra,
    accel: Accelerator,
    opts: &Options,
    log: &Path,
) -> Result<Outcome> {
    let started = Instant::now();
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", &accel.to_string()])
        .args(["-cpu", if accel == Accelerator::Kvm { "host" } else { "max" }])
        .args(["-m", &opts.memory.to_string(), "-smp", "2"])
        .args(["-nodefaults", "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            &format!("console=ttyS0 panic=-1 quiet lsm={LSM} agt_vm_series={} {}", kernel.series, extra.append),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(disk) = extra.disk {
        cmd.arg("-drive").arg(format!("file={},format=raw,if=virtio,snapshot=on", disk.display()));
    }
    let mut child = cmd.spawn().context("cannot start qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel::<String>();
    let readers = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ];
    for reader in readers.into_iter().flatten() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(reader);
            let mut buf = Vec::new();
            while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                let line = String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_string();
                if tx.send(line).is_err() {
                    break;
                }
                buf.clear();
            }
        });
    }
    drop(tx);

    let mut log_file = fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
    let mut tail: VecDeque<String> = VecDeque::with_capacity(CONSOLE_TAIL);
    let mut outcome = Outcome::default();
    let deadline = started + Duration::from_secs(opts.timeout);
    let init_deadline = (accel == Accelerator::Kvm).then(|| started + Duration::from_secs(opts.kvm_init_timeout));
    let mut verdict_at: Option<Instant> = None;
    loop {
        let (limit, expiry) = wait_limit(deadline, init_deadline, outcome.boot_secs.is_some(), verdict_at);
        let now = Instant::now();
        if now >= limit {
            match expiry {
                Expiry::Init => {
                    outcome.init_timed_out = true;
                    outcome.problem = Some(format!("the KVM guest reached no init within {}s", opts.kvm_init_timeout));
                }
                Expiry::Run => outcome.problem = Some(format!("timed out after {}s (--timeout)", opts.timeout)),
                Expiry::PowerOff => {}
            }
            break;
        }
        match rx.recv_timeout(limit - now) {
            Ok(line) => {
                let _ = writeln!(log_file, "{line}");
                if tail.len() == CONSOLE_TAIL {
                    tail.pop_front();
                }
                tail.push_back(line.clone());
                observe(&line, started, &mut outcome, opts.verbose);
                if line.contains("AGT-VM-VERDICT ") && verdict_at.is_none() {
                    verdict_at = Some(Instant::now());
                }
                if line.contains("Kernel panic") && outcome.problem.is_none() {
                    outcome.problem = Some(format!("kernel panic: {}", line.trim()));
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    stop(&mut child);
    outcome.total_secs = started.elapsed().as_secs_f64();
    if outcome.problem.is_none() && !outcome.verdict {
        outcome.problem = Some("the guest printed no AGT-VM-VERDICT".to_string());
    }
    if outcome.problem.is_none() && outcome.pass + outcome.fail == 0 {
        outcome.problem = Some("no test ran (does the filter match any test?)".to_string());
    }
    let failed = outcome.problem.is_some() || outcome.fail > 0;
    if failed {
        println!("---- last {} lines of the {} console ----", tail.len(), kernel.release);
        for line in &tail {
            println!("{line}");
        }
        println!("---- end of console (whole log: {}) ----", log.display());
    }
    Ok(outcome)
}

/// What a guest run is waiting for when its time runs out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    /// The guest had not reached init by the KVM init bound.
    Init,
    /// The whole run's `--timeout`.
    Run,
    /// The verdict came; the guest was given a moment to power off.
    PowerOff,
}

/// Until when to wait for the next console line, and what it means if nothing comes.
fn wait_limit(
    deadline: Instant,
    init_deadline: Option<Instant>,
    reached_init: bool,
    verdict_at: Option<Instant>,
) -> (Instant, Expiry) {
    if let Some(at) = verdict_at {
        // After the verdict the guest powers off; give it a moment, then stop waiting.
        return ((at + Duration::from_secs(30)).min(deadline), Expiry::PowerOff);
    }
    match init_deadline {
        Some(at) if !reached_init && at < deadline => (at, Expiry::Init),
        _ => (deadline, Expiry::Run),
    }
}

/// Reads the init's result lines (they may follow other output on the same line).
fn observe(line: &str, started: Instant, outcome: &mut Outcome, verbose: bool) {
    if verbose {
        println!("  | {line}");
    }
    if let Some(at) = line.find("AGT-VM-INIT ") {
        outcome.boot_secs = Some(started.elapsed().as_secs_f64());
        if !verbose {
            println!("  {} (after {:.1}s)", &line[at..], started.elapsed().as_secs_f64());
        }
    } else if let Some(at) = line.find("AGT-VM-RUN ") {
        outcome.running = field(&line[at..], "test").map(|test| (test.to_string(), Instant::now()));
    } else if let Some(at) = line.find("AGT-VM-RESULT ") {
        let result = &line[at..];
        if !verbose {
            println!("  {result}");
        }
        let test = field(result, "test").unwrap_or("?").to_string();
        if let Some((running, since)) = outcome.running.take_if(|(running, _)| *running == test) {
            let target = running.split("::").next().unwrap_or_default().to_string();
            *outcome.target_secs.entry(target).or_default() += since.elapsed().as_secs_f64();
        }
        match field(result, "status") {
            Some("pass") => outcome.pass += 1,
            Some("skip") => {
                outcome.skip += 1;
                let reason = result.split_once(" reason=").map_or("", |(_, reason)| reason);
                outcome.skipped_tests.push((test, reason.to_string()));
            }
            _ => {
                outcome.fail += 1;
                outcome.failed_tests.push(test);
            }
        }
    } else if let Some(at) = line.find("AGT-VM-VERDICT ") {
        let verdict = &line[at..];
        if !verbose {
            println!("  {verdict}");
        }
        outcome.verdict = true;
        // The guest's own count must agree with the lines seen.
        let guest_fail: u64 = field(verdict, "fail").and_then(|n| n.parse().ok()).unwrap_or(u64::MAX);
        if guest_fail != outcome.fail {
            outcome.problem =
                Some(format!("verdict says fail={guest_fail} but {} failures were reported", outcome.fail));
        }
    }
}

/// "jail_lifecycle 312s, jail_escape 95s, ..." (slowest first).
fn time_by_target(secs: &BTreeMap<String, f64>) -> String {
    let mut by_time: Vec<(&String, &f64)> = secs.iter().collect();
    by_time.sort_by(|a, b| b.1.total_cmp(a.1));
    let shown: Vec<String> = by_time.iter().map(|(target, secs)| format!("{target} {secs:.0}s")).collect();
    if shown.is_empty() {
        "-".to_string()
    } else {
        shown.join(", ")
    }
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|part| part.strip_prefix(key).and_then(|rest| rest.strip_prefix('=')))
}

fn stop(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn series_rank_accepts_only_the_series() {
        let [v510, v61, v612] = SERIES;
        assert_eq!(v510.rank("linux-image-5.10.0-46-amd64-unsigned"), Some(46));
        assert_eq!(v510.rank("linux-image-5.10.0-46-cloud-amd64-unsigned"), None);
        assert_eq!(v510.rank("linux-image-5.10.0-46-rt-amd64-unsigned"), None);
        assert_eq!(v510.rank("linux-image-5.10.0-46-amd64"), None);
        assert_eq!(v510.rank("linux-image-5.10.0-46-amd64-unsigned-dbg"), None);
        assert_eq!(v510.rank("linux-image-6.1.0-56-amd64-unsigned"), None);
        assert_eq!(v61.rank("linux-image-5.10.0-46-amd64-unsigned"), None);
        assert_eq!(v61.rank("linux-image-6.1.0-56-amd64-unsigned"), Some(56));
        assert_eq!(v61.rank("linux-image-6.1.0-56-cloud-amd64-unsigned"), None);
        assert_eq!(v61.rank("linux-image-6.1.0-56-amd64"), None);
        assert_eq!(v612.rank("linux-image-6.12.117+deb12-amd64-unsigned"), Some(117));
        assert_eq!(v612.rank("linux-image-6.12.9+bpo-amd64-unsigned"), Some(9));
        assert_eq!(v612.rank("linux-image-6.12.117+deb12-rt-amd64-unsigned"), None);
        assert_eq!(v612.rank("linux-image-6.1.0-56-amd64-unsigned"), None);
    }

    #[test]
    fn soft_dependencies_loaded_first_are_the_pre_ones() {
        assert_eq!(softdep_pre("pre: crc32c"), ["crc32c"]);
        assert_eq!(softdep_pre("pre: a b post: c pre: d"), ["a", "b", "d"]);
        assert!(softdep_pre("").is_empty() && softdep_pre("post: x").is_empty());
        assert_eq!(module_name(Path::new("/m/nft-masq.ko.xz")).as_deref(), Some("nft_masq"));
        assert_eq!(module_name(Path::new("/m/modules.order")), None);
    }

    #[test]
    fn a_kvm_guest_is_given_a_bound_to_reach_init_and_then_the_whole_run() {
        let start = Instant::now();
        let run = start + Duration::from_secs(900);
        let init = Some(start + Duration::from_secs(90));
        assert_eq!(wait_limit(run, init, false, None), (start + Duration::from_secs(90), Expiry::Init));
        assert_eq!(wait_limit(run, init, true, None), (run, Expiry::Run));
        // TCG guests (no init bound) and a bound past the run's own limit wait for the run.
        assert_eq!(wait_limit(run, None, false, None), (run, Expiry::Run));
        assert_eq!(wait_limit(run, Some(run + Duration::from_secs(1)), false, None), (run, Expiry::Run));
        let verdict = start + Duration::from_secs(100);
        assert_eq!(wait_limit(run, init, true, Some(verdict)), (verdict + Duration::from_secs(30), Expiry::PowerOff));
        let late = start + Duration::from_secs(880);
        assert_eq!(wait_limit(run, init, true, Some(late)), (run, Expiry::PowerOff));
    }

    #[test]
    fn the_mirror_comes_from_the_machines_own_sources() {
        let deb822 =
            "Types: deb\nURIs: http://mirror.local/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://mirror.local/debian-security\nSuites: bookworm-security\n"
                .to_string();
        assert_eq!(debian_mirror(&[deb822], "bookworm").as_deref(), Some("http://mirror.local/debian"));
        let legacy = "# deb http://old.example/debian bookworm main\n\
                      deb http://sec.example/debian-security bookworm-security main\n\
                      deb [signed-by=/k.gpg arch=amd64] http://one.example/debian bookworm main contrib\n"
            .to_string();
        assert_eq!(
            debian_mirror(std::slice::from_ref(&legacy), "bookworm").as_deref(),
            Some("http://one.example/debian")
        );
        assert_eq!(debian_mirror(&[legacy], "bullseye"), None);
        assert_eq!(debian_mirror(&[], "bookworm"), None);
    }

    #[test]
    fn an_older_release_gets_its_own_sources_from_the_machines_mirrors() {
        let list = private_sources_list("bullseye", "http://mirror.local/debian", Some("http://mirror.local/sec"));
        let lines: Vec<&str> = list.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("deb ") && lines[0].ends_with("http://mirror.local/debian bullseye main"));
        assert!(lines[1].ends_with("http://mirror.local/sec bullseye-security main"));
        let list = private_sources_list("bullseye", "http://mirror.local/debian", None);
        assert_eq!(list.lines().filter(|l| l.starts_with("deb ")).count(), 1);
        // apt-get and apt-cache look only at the private directory's sources, lists and cache.
        let options = private_apt_options(Path::new("/v/apt/bullseye"));
        assert!(options.contains(&"Dir::Etc::SourceList=/v/apt/bullseye/sources.list".to_string()));
        assert!(options.contains(&"Dir::Etc::SourceParts=/v/apt/bullseye/sources.list.d".to_string()));
        assert!(options.contains(&"Dir::State::Lists=/v/apt/bullseye/lists".to_string()));
        assert!(options.contains(&"Dir::Cache=/v/apt/bullseye/cache".to_string()));
        assert_eq!(options.iter().filter(|o| *o == "-o").count(), 4);
    }

    #[test]
    fn result_lines_are_counted() {
        let mut outcome = Outcome::default();
        let start = Instant::now();
        observe("AGT-VM-RESULT test=a::b status=pass", start, &mut outcome, false);
        observe("noise AGT-VM-RESULT test=a::c status=fail reason=exit-101", start, &mut outcome, false);
        observe("AGT-VM-RESULT test=a::d status=skip reason=ignored", start, &mut outcome, false);
        observe(
            "AGT-VM-RESULT test=a::e status=skip reason=Landlock ABI 6 is needed (this kernel: 2)",
            start,
            &mut outcome,
            false,
        );
        observe("AGT-VM-VERDICT pass=1 fail=1 skip=2", start, &mut outcome, false);
        assert_eq!((outcome.pass, outcome.fail, outcome.skip), (1, 1, 2));
        assert!(outcome.verdict && outcome.problem.is_none());
        assert_eq!(outcome.failed_tests, vec!["a::c".to_string()]);
        assert_eq!(outcome.skipped_tests[0], ("a::d".to_string(), "ignored".to_string()));
        assert_eq!(outcome.skipped_tests[1].1, "Landlock ABI 6 is needed (this kernel: 2)");
    }

    #[test]
    fn time_is_added_up_per_target_from_run_to_result() {
        let mut outcome = Outcome::default();
        let start = Instant::now();
        observe("AGT-VM-RUN test=a::b", start, &mut outcome, false);
        observe("AGT-VM-RESULT test=a::b status=pass", start, &mut outcome, false);
        observe("AGT-VM-RUN test=a::c", start, &mut outcome, false);
        observe("AGT-VM-RESULT test=a::c status=fail reason=exit-101", start, &mut outcome, false);
        // A result without its run line (an ignored test) adds no time.
        observe("AGT-VM-RESULT test=z::d status=skip reason=ignored", start, &mut outcome, false);
        assert_eq!(outcome.target_secs.keys().collect::<Vec<_>>(), vec!["a"]);
        assert!(outcome.running.is_none());
        let shown = time_by_target(&BTreeMap::from([("a".to_string(), 3.0), ("b".to_string(), 40.2)]));
        assert_eq!(shown, "b 40s, a 3s");
        assert_eq!(time_by_target(&BTreeMap::new()), "-");
    }

    #[test]
    fn the_checked_in_matrix_places_every_kernel_and_the_init_list_says_what_runs() {
        let names: Vec<&str> = SERIES.iter().map(|s| s.name).collect();
        let matrix = Matrix::parse(include_str!("../../vm-tests/matrix"), &names).unwrap();
        for series in &names {
            assert_eq!(matrix.part(series, "jail_escape").unwrap(), Some(Part::Whole), "{series}");
            assert_eq!(matrix.part(series, "jail_lifecycle").unwrap(), Some(Part::Whole), "{series}");
        }
        let built = Built {
            tests: vec![
                TestBinary { target: "jail_escape".into(), path: "/t/jail escape-1".into() },
                TestBinary { target: "exec_flags".into(), path: "/t/exec_flags-2".into() },
            ],
            executables: Vec::new(),
        };
        let tests = KernelTests {
            series: "6.1",
            parts: vec![(0, Part::Whole), (1, Part::Tests(vec!["exec_flags::a".into(), "exec_flags::b".into()]))],
            from_matrix: true,
        };
        assert_eq!(
            tests.init_list(&built),
            "jail_escape all /t/jail escape-1\nexec_flags exec_flags::a,exec_flags::b /t/exec_flags-2\n"
        );
        assert_eq!(tests.describe(21), "6.1: 2 of 21 test binaries (1 of them in part) from vm-tests/matrix");
        let listed = vec![
            vec!["ring2_escape_battery".to_string(), "ring3_escape_battery".to_string()],
            vec!["a_1".to_string(), "b".to_string(), "c".to_string()],
        ];
        let filter = |words: &[&str]| words.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        assert_eq!(tests.matching(&built, &listed, &filter(&["ring2"])), 1);
        assert_eq!(tests.matching(&built, &listed, &filter(&["exec_flags"])), 2);
        assert_eq!(tests.matching(&built, &listed, &filter(&["exec_flags::c", "escape"])), 2);
        assert_eq!(tests.matching(&built, &listed, &filter(&["nothing"])), 0);
    }

    #[test]
    fn verdict_disagreeing_with_lines_is_a_problem() {
        let mut outcome = Outcome::default();
        observe("AGT-VM-VERDICT pass=0 fail=2 skip=0", Instant::now(), &mut outcome, false);
        assert!(outcome.problem.is_some());
    }

    #[test]
    fn cpio_has_parents_first_and_a_trailer() {
        let mut cpio = Cpio::default();
        cpio.file("a/b/c", 0o644, b"xyz".to_vec());
        cpio.symlink("bin/sh", "busybox");
        let bytes = cpio.finish();
        let text = String::from_utf8_lossy(&bytes);
        let a = text.find("a\0").unwrap();
        let ab = text.find("a/b\0").unwrap();
        let abc = text.find("a/b/c\0").unwrap();
        assert!(a < ab && ab < abc);
        assert!(text.contains("TRAILER!!!"));
        assert_eq!(bytes.len() % 4, 0);
    }

    #[test]
    fn package_names_from_ids() {
        assert_eq!(package_name("path+file:///work/main/agent/cli#agt-jail-cli@0.1.0"), "agt-jail-cli");
        assert_eq!(package_name("path+file:///work/main/xtask#0.1.0"), "xtask");
        assert_eq!(package_name("agt-jail-cli 0.1.0 (path+file:///x)"), "agt-jail-cli");
    }
}
