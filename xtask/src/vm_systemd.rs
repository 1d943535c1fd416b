//! `cargo xtask vm-test --systemd`: the agt-jail unit under systemd as PID 1.
//!
//! The busybox guests of `vm-test` have no init system; this guest is a Debian userspace
//! with systemd, built from Debian packages, booted with a kernel of the matrix (6.12
//! unless `--kernel` names another):
//!
//! 1. image: `mmdebstrap --variant=minbase --include=systemd,systemd-sysv` of the host's
//!    release from the mirror that serves it in /etc/apt (as the kernels are fetched), then
//!    `mkfs.ext4 -d` into a raw disk image, cached as target/vm/systemd/IMAGE.ext4 and only
//!    rebuilt when missing or when [`IMAGE`] changes with the recipe. Root on a virtio disk
//!    works under TCG and costs no memory for the root; the disk is opened copy-on-write
//!    (`snapshot=on`), so every run starts from the same image. An initramfs root (the
//!    whole userspace unpacked into RAM, then copied to a tmpfs because pivot_root refuses
//!    the initial rootfs) was the alternative: slower to boot and ~3x the guest memory.
//! 2. payload: the debug `agt-jail` binaries, this xtask binary and the repository's
//!    profiles/ and policies/, so that the guest runs `xtask install --prebuilt` itself
//!    under systemd (the real install: files, group, `systemctl daemon-reload`); the guest
//!    script vm-tests/systemd-guest.sh and its unit. The guest is Debian of the host's
//!    release, so host-built binaries run there as they are.
//! 3. initramfs: a static busybox running vm-tests/systemd-stage1.sh, the kernel's staged
//!    modules (virtio_blk and ext4 are modules in Debian's kernels), and the payload. It
//!    mounts the disk, copies the payload in and `switch_root`s to /lib/systemd/systemd.
//! 4. systemd starts agt-vm-guest.service (`systemd.wants=` on the command line), whose
//!    script prints the same `AGT-VM-RESULT` / `AGT-VM-VERDICT` lines as the busybox guests
//!    and powers off; [`vm::boot`] reads them.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::{
    util::{is_root, output, repo_root, run_checked, target_dir},
    vm::{self, Accel, Accelerator, Apt, Cpio, Extra, KernelChoice, Options, RemoveOnDrop, SERIES},
};

/// The cached image's name: change it when the recipe below changes, and every checkout
/// builds the new image on its next run.
const IMAGE: &str = "debian-systemd-v1";
/// Debian packages on top of minbase: systemd as PID 1 (systemd-sysv gives /sbin/init).
const PACKAGES: &str = "systemd,systemd-sysv";
/// Size of the (sparse) root image; the guest's writes go to a temporary overlay.
const IMAGE_SIZE: &str = "1G";
/// Where the guest script and its unit go in the guest.
const GUEST_SCRIPT: &str = "usr/local/libexec/agt-vm/systemd-guest.sh";
const GUEST_UNIT: &str = "etc/systemd/system/agt-vm-guest.service";
/// Where the binaries the guest installs wait (vm-tests/systemd-guest.sh names it too).
const PREBUILT: &str = "usr/local/lib/agt-vm/bin";
/// The repository's profiles/ and policies/ for the xtask binary, which finds them at the
/// repository's host path (written beside it as `REPO_COPY.path`).
const REPO_COPY: &str = "usr/local/lib/agt-vm/repo";

pub fn run(opts: &Options) -> Result<()> {
    // They select tests of the busybox guests; this guest runs its own fixed checks.
    if opts.unit || opts.no_matrix || !opts.filter.is_empty() {
        bail!("--systemd runs vm-tests/systemd-guest.sh: --unit, --no-matrix and a test filter do not apply to it");
    }
    let started = Instant::now();
    let root = repo_root();
    let vm_dir = root.join("target/vm");
    let dir = vm_dir.join("systemd");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;

    let mut apt = Apt::default();
    vm::ensure_host_packages(&mut apt)?;
    let mut missing = Vec::new();
    for (tool, package) in [("mmdebstrap", "mmdebstrap"), ("mkfs.ext4", "e2fsprogs")] {
        if output(Command::new("sh").args(["-c", &format!("command -v {tool}")])).is_none() {
            missing.push(package);
        }
    }
    if !missing.is_empty() {
        println!("vm-test: installing {}", missing.join(" "));
        apt.install(&missing)?;
    }

    let series = match opts.kernel {
        KernelChoice::All | KernelChoice::V6_12 => "6.12",
        KernelChoice::V6_1 => "6.1",
        KernelChoice::V5_10 => "5.10",
    };
    let series = SERIES.iter().find(|s| s.name == series).context("the matrix has no such kernel")?;
    let kernel = vm::resolve_kernel(&vm_dir, series, opts.refresh, &mut apt)?;
    println!("vm-test: kernel {} = {} {} ({})", series.name, kernel.package, kernel.version, kernel.release);

    let image_started = Instant::now();
    let image = ensure_image(&dir)?;
    println!("vm-test: systemd image {} ready in {:.1}s", image.display(), image_started.elapsed().as_secs_f64());

    let build_started = Instant::now();
    let bin_dir = build_debug(&root)?;
    println!("vm-test: agt-jail built in {:.1}s", build_started.elapsed().as_secs_f64());

    let initrd = dir.join(format!("stage1-{}.cpio", std::process::id()));
    let _remove_initrd = RemoveOnDrop(initrd.clone());
    build_stage1(&kernel, &bin_dir, &initrd)?;

    let mut accel = vm::choose_accel(opts.accel);
    println!("vm-test: accelerator {accel}");
    let logs = vm_dir.join("logs");
    fs::create_dir_all(&logs).with_context(|| format!("cannot create {}", logs.display()))?;
    let log = logs.join(format!("systemd-{}.log", kernel.series));
    println!("vm-test: booting {} with systemd as PID 1", kernel.release);
    let append = "systemd.show_status=0 systemd.wants=agt-vm-guest.service";
    let extra = Extra { append, disk: Some(&image) };
    let mut outcome = vm::boot(&kernel, &initrd, &extra, accel, opts, &log)?;
    // As for the busybox guests: a KVM that passes the firmware probe yet never runs the
    // guest to its checks is the host's problem; TCG works everywhere.
    if outcome.init_timed_out && opts.accel == Accel::Auto {
        println!("vm-test: the KVM guest did not start its checks in time; booting it under TCG (log kept as .kvm)");
        let _ = fs::rename(&log, log.with_extension("log.kvm"));
        accel = Accelerator::Tcg;
        outcome = vm::boot(&kernel, &initrd, &extra, accel, opts, &log)?;
    }
    // As for the busybox guests: a guest whose kernel dies in early boot (seen under TCG: a
    // panic in an interrupt before init) says nothing about the code under test; boot it
    // once more. A guest that reported anything is never booted again.
    if outcome.boot_secs.is_none() && outcome.pass + outcome.fail == 0 {
        println!("vm-test: the guest never started its checks; booting it once more (log kept as .first)");
        let _ = fs::rename(&log, log.with_extension("log.first"));
        outcome = vm::boot(&kernel, &initrd, &extra, accel, opts, &log)?;
    }

    println!();
    let ok = outcome.problem.is_none() && outcome.verdict && outcome.fail == 0;
    println!(
        "vm-test --systemd: {} {}  pass={} fail={}  {}, {:.1}s total  log {}",
        kernel.release,
        if ok { "ok" } else { "FAILED" },
        outcome.pass,
        outcome.fail,
        outcome.boot_secs.map_or_else(|| "no checks ran".to_string(), |s| format!("checks began after {s:.1}s")),
        outcome.total_secs,
        log.display()
    );
    if let Some(problem) = &outcome.problem {
        println!("        {problem}");
    }
    for test in &outcome.failed_tests {
        println!("        failed: {test}");
    }
    println!("vm-test: wall time {:.1}s", started.elapsed().as_secs_f64());
    if !ok {
        bail!("vm-test --systemd failed");
    }
    Ok(())
}

/// The cached root image, built when missing.
fn ensure_image(dir: &Path) -> Result<PathBuf> {
    let image = dir.join(format!("{IMAGE}.ext4"));
    if image.is_file() {
        return Ok(image);
    }
    if !is_root() {
        bail!("building {} needs root (mmdebstrap, mkfs.ext4 with root-owned files)", image.display());
    }
    let codename = vm::host_codename().context("cannot tell this machine's Debian release from /etc/os-release")?;
    let mirror = vm::debian_mirror(&vm::apt_sources(Path::new("/etc/apt")), &codename).with_context(|| {
        format!("no apt source under /etc/apt serves Debian {codename}, so there is no mirror to build the guest from")
    })?;
    let tree = dir.join(format!(".rootfs-{}", std::process::id()));
    let _remove_tree = RemoveDirOnDrop(tree.clone());
    println!("vm-test: building the systemd guest image with mmdebstrap ({codename} from {mirror})");
    run_checked(
        Command::new("mmdebstrap")
            .args(["--variant=minbase", &format!("--include={PACKAGES}"), "--quiet"])
            // Documentation and translations are not needed to boot.
            .args(["--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*"])
            .args(["--dpkgopt=path-exclude=/usr/share/locale/*"])
            .arg(&codename)
            .arg(&tree)
            .arg(&mirror),
    )?;
    configure_tree(&tree)?;
    let partial = dir.join(format!(".{IMAGE}-{}.ext4", std::process::id()));
    let _remove_partial = RemoveOnDrop(partial.clone());
    run_checked(
        Command::new("mkfs.ext4").args(["-q", "-F", "-L", "agt-root", "-d"]).arg(&tree).arg(&partial).arg(IMAGE_SIZE),
    )?;
    // Another run may have built it meanwhile: either copy is the same recipe.
    fs::rename(&partial, &image).with_context(|| format!("cannot move the image to {}", image.display()))?;
    Ok(image)
}

/// What the guest needs beyond the packages: a name, a root file system entry, no login
/// prompts on the serial console the runner reads.
fn configure_tree(tree: &Path) -> Result<()> {
    let write = |path: &str, text: &str| {
        let path = tree.join(path);
        fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))
    };
    write("etc/hostname", "agt-vm\n")?;
    write("etc/hosts", "127.0.0.1 localhost agt-vm\n::1 localhost\n")?;
    write("etc/fstab", "/dev/vda / ext4 rw 0 1\n")?;
    // systemd gives the guest a machine id at first boot (the image is never written back).
    write("etc/machine-id", "")?;
    let units = tree.join("etc/systemd/system");
    fs::create_dir_all(&units)?;
    for masked in ["serial-getty@ttyS0.service", "getty@tty1.service", "console-getty.service"] {
        let link = units.join(masked);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/null", &link)
            .with_context(|| format!("cannot mask {masked} in {}", units.display()))?;
    }
    Ok(())
}

/// `cargo build` of the two binaries (the debug build the other VM runs use too).
fn build_debug(root: &Path) -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    run_checked(Command::new(cargo).current_dir(root).args([
        "build",
        "-p",
        "agt-jail-cli",
        "--bin",
        "agt-jail",
        "--bin",
        "agt-jail-full",
    ]))?;
    Ok(target_dir().join("debug"))
}

/// The first-stage initramfs: busybox, the kernel's modules, vm-tests/systemd-stage1.sh as
/// /init, and under /payload what stage 1 copies over the guest's root: the binaries to
/// install and this xtask (in [`PREBUILT`]), the repository's profiles/ and policies/
/// ([`REPO_COPY`]), the guest script and its unit.
fn build_stage1(kernel: &vm::Kernel, bin_dir: &Path, out: &Path) -> Result<()> {
    let mut archive = Cpio::default();
    for name in ["agt-jail", "agt-jail-full"] {
        archive.file(&format!("payload/{PREBUILT}/{name}"), 0o755, vm::read(&bin_dir.join(name))?);
    }
    let xtask = std::env::current_exe().context("cannot find the xtask binary")?;
    archive.file(&format!("payload/{PREBUILT}/xtask"), 0o755, vm::read(&xtask)?);
    // The guest script links the repository path to these: under /tmp (a checkout there)
    // they would not survive boot, which empties /tmp (systemd-tmpfiles).
    let repo = repo_root();
    for dir in ["profiles", "policies"] {
        let inside = format!("payload/{REPO_COPY}/{dir}");
        archive.dir(&inside);
        add_payload(&mut archive, &repo.join(dir), &inside)?;
    }
    archive.file(&format!("payload/{REPO_COPY}.path"), 0o644, repo.to_string_lossy().into_owned().into_bytes());
    archive.file(&format!("payload/{GUEST_SCRIPT}"), 0o755, include_bytes!("../../vm-tests/systemd-guest.sh").to_vec());
    archive.file(
        &format!("payload/{GUEST_UNIT}"),
        0o644,
        include_bytes!("../../vm-tests/systemd-guest.service").to_vec(),
    );

    let modules = format!("lib/agt-modules/{}", kernel.release);
    archive.dir(&modules);
    let order = fs::read_to_string(kernel.modules.join("order"))?;
    for name in order.lines().chain(["order"]) {
        archive.file(&format!("{modules}/{name}"), 0o644, vm::read(&kernel.modules.join(name))?);
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .context("no busybox (install busybox-static)")?;
    if !vm::ldd(&busybox)?.is_empty() {
        bail!("{} is not static (install busybox-static)", busybox.display());
    }
    archive.file("bin/busybox", 0o755, vm::read(&busybox)?);
    archive.device("dev/console", 0o600, 5, 1);
    archive.file("init", 0o755, include_bytes!("../../vm-tests/systemd-stage1.sh").to_vec());
    fs::write(out, archive.finish()).with_context(|| format!("cannot write {}", out.display()))
}

/// Adds the files of a staged tree under `prefix` in the archive (directories come with them).
fn add_payload(archive: &mut Cpio, dir: &Path, prefix: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_str().with_context(|| format!("{:?} is not UTF-8", entry.path()))?;
        let inside = format!("{prefix}/{name}");
        let meta = entry.metadata()?;
        if meta.is_dir() {
            archive.dir(&inside);
            add_payload(archive, &entry.path(), &inside)?;
        } else {
            archive.file(&inside, meta.permissions().mode() & 0o7777, vm::read(&entry.path())?);
        }
    }
    Ok(())
}

struct RemoveDirOnDrop(PathBuf);

impl Drop for RemoveDirOnDrop {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
