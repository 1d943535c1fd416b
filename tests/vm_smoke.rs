//! The test VM's smoke test: proves the VM is real and that Tier A exec enforcement
//! works there — BPF LSM `bprm_check_security` denies an agent's exec with EPERM while
//! other execs still run (attach → deny → detach → allow).
//!
//! Tier A: needs root, BPF LSM, kernel BTF and cgroup v2. On a host without BPF LSM it
//! skips with the reason; inside the VM (`AGT_JAIL_IN_VM=1`) a missing need is a failure.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    ffi::CString,
    fs, io,
    os::unix::{ffi::OsStrExt, fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use agt_jail_ebpf_loader::{
    lsm::{ExecIdentity, ExecLsm},
    AgentPrograms, Event,
};
use agt_jail_test_support::{current_test_name, in_vm, require, unmet, which, Need};

const AGENT_ID: u64 = 0x5e0c_0001;

#[test]
fn vm_is_real_and_bpf_lsm_denies_exec() {
    require!(Need::Root, Need::BpfLsm, Need::Btf, Need::CgroupV2);

    let guest_kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let guest_kernel = guest_kernel.trim();
    eprintln!("kernel: {guest_kernel}");
    if in_vm() {
        // The runner writes the host's `uname -r` into the initramfs; a VM that reports
        // the host's kernel is not the VM this suite asked for.
        let host_kernel = std::env::var("AGT_JAIL_HOST_KERNEL")
            .expect("the VM runner passes the host kernel in AGT_JAIL_HOST_KERNEL");
        eprintln!("host kernel: {host_kernel}");
        assert_ne!(host_kernel.trim(), guest_kernel, "the guest runs the host's kernel");
    }
    let lsm = fs::read_to_string("/sys/kernel/security/lsm").unwrap();
    eprintln!("active LSMs: {}", lsm.trim());
    assert!(lsm.trim().split(',').any(|name| name == "bpf"), "bpf not in {lsm:?}");

    let scratch = Scratch::new();
    let cgroup = scratch.cgroup();
    let cgroup_id = fs::metadata(&cgroup).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).unwrap();

    // Two copies of `true`, both named `true` (busybox picks its applet by name): the
    // same content, different inodes, so only the identity decides.
    let real_true = fs::canonicalize(which("true")).unwrap();
    let denied = scratch.executable_copy(&real_true, "denied");
    let allowed = scratch.executable_copy(&real_true, "allowed");

    let mut programs = AgentPrograms::load().unwrap();
    let mut events = programs.take_events().expect("event reader");
    programs.register_agent(cgroup_id, AGENT_ID).unwrap();
    let mut lsm = match ExecLsm::load(&mut programs) {
        Ok(lsm) => lsm,
        Err(err) => {
            // Some kernels list `bpf` and still refuse BPF_PROG_TYPE_LSM (EPERM): a skip on
            // the host, a failure in the VM.
            let test = current_test_name("vm_is_real_and_bpf_lsm_denies_exec");
            unmet(&test, &format!("the kernel refuses BPF LSM programs: {err}"));
            return;
        }
    };
    ExecLsm::deny_exec(&mut programs, AGENT_ID, ExecIdentity::of_path(&denied).unwrap()).unwrap();

    // Before attach: nothing enforces the rule.
    assert_eq!(run_in(&cgroup, &denied).unwrap(), 0, "denied binary must run before attach");

    lsm.attach(&mut programs).unwrap();
    let err = run_in(&cgroup, &denied).expect_err("exec of the denied inode must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "denied exec failed with {err}");
    assert_eq!(run_in(&cgroup, &allowed).unwrap(), 0, "an allowed binary still runs in the agent");
    // Scoped to the agent: the same file runs outside the agent's cgroup.
    assert_eq!(Command::new(&denied).status().unwrap().code(), Some(0), "non-agent exec must run");

    let mut deny_events = Vec::new();
    events
        .poll(Duration::from_secs(5), &mut |event| {
            if let Ok(event @ Event::ExecCheck { .. }) = event {
                deny_events.push(event);
            }
        })
        .unwrap();
    events.drain(&mut |event| {
        if let Ok(event @ Event::ExecCheck { .. }) = event {
            deny_events.push(event);
        }
    });
    let denied_name = denied.to_string_lossy().into_owned();
    assert!(
        deny_events.iter().any(|event| matches!(event,
            Event::ExecCheck { agent_id, filename, .. }
                if *agent_id == AGENT_ID && *filename == denied_name && event.is_deny())),
        "no ExecCheck deny event for {denied_name}: {deny_events:?}"
    );

    lsm.detach(&mut programs).unwrap();
    assert_eq!(run_in(&cgroup, &denied).unwrap(), 0, "after detach the denied binary runs again");
    eprintln!("attach → deny (EPERM) → allowed runs → detach → runs again: ok on {guest_kernel}");
}

/// Runs `program` in a child that first moves itself into `cgroup`; returns its exit code
/// or the exec error.
fn run_in(cgroup: &Path, program: &Path) -> io::Result<i32> {
    let procs = CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
    let mut cmd = Command::new(program);
    // SAFETY: the closure runs in the forked child before exec and only calls
    // async-signal-safe functions (open, write, close) on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            // "0" moves the writing task itself.
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    let status = cmd.status()?;
    Ok(status.code().unwrap_or(-1))
}

/// A temporary directory and a cgroup v2 child, both removed on drop.
struct Scratch {
    dir: PathBuf,
    cgroup: PathBuf,
}

impl Scratch {
    fn new() -> Self {
        let id = std::process::id();
        let dir = std::env::temp_dir().join(format!("agt-jail-vm-smoke-{id}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let cgroup = cgroup2_root().join(format!("agt-jail-vm-smoke-{id}"));
        let _ = fs::remove_dir(&cgroup);
        fs::create_dir(&cgroup).unwrap();
        Self { dir, cgroup }
    }

    fn cgroup(&self) -> PathBuf {
        self.cgroup.clone()
    }

    fn executable_copy(&self, source: &Path, sub: &str) -> PathBuf {
        let dir = self.dir.join(sub);
        fs::create_dir_all(&dir).unwrap();
        let target = dir.join("true");
        fs::copy(source, &target).unwrap();
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        target
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.cgroup);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Where cgroup v2 is mounted: /sys/fs/cgroup (pure v2) or e.g. /sys/fs/cgroup/unified.
fn cgroup2_root() -> PathBuf {
    agt_jail_jail::CgroupLayout::detect(std::path::Path::new("/proc/self/mountinfo")).expect("a cgroup2 mount").v2
}
