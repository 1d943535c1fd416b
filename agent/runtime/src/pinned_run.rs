//! The kernel objects of an audited run, pinned so that they outlive agt-jail.
//!
//! `exec --audit` pins its event rings, deny summary (and the counts of it written) and
//! drop counters at
//! `/sys/fs/bpf/agt-jail/exec-<pid>-<cgroup id>/` and writes what the run is (its audit
//! log, key, agent, DID, policy hash, cgroup) to `/run/agt-jail/runs/exec-<pid>-<cgroup id>.json`.
//! A normal end drains the rings into the log, closes it and removes both. After kill -9
//! they stay: `agt-jail audit recover` writes what the rings still hold into the same log
//! and removes them (docs/audit.md, "Durability").
use std::{
    io::Write,
    path::{Path, PathBuf},
};

use agt_jail_ebpf_loader::{pins, AgentPrograms};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Where runs pin their maps (on bpffs; the daemon pins its own objects beside them).
pub const PIN_ROOT: &str = "/sys/fs/bpf/agt-jail";
/// Where runs describe themselves.
pub const RUN_ROOT: &str = "/run/agt-jail/runs";

/// bpffs's `f_type`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What a pinned run is, for whoever recovers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunMeta {
    /// `exec-<pid>-<cgroup id>`: the pin directory's and this file's name.
    pub id: String,
    /// The audit log's first file (absolute).
    pub audit: PathBuf,
    /// The signing key the log is written with.
    pub audit_key: PathBuf,
    /// The agent's name (`--agent`, or none without a policy).
    pub agent: Option<String>,
    pub did: String,
    /// `policy_hash` of every record.
    pub policy: String,
    /// The agent's cgroup v2 directory and id.
    pub cgroup: PathBuf,
    pub cgroup_id: u64,
    /// agt-jail's process id and its start time (clock ticks since boot, /proc/PID/stat
    /// field 22): a live process with another start time is another process.
    pub pid: u32,
    pub pid_start: u64,
    /// Under a policy the evaluator wrote the records; without one, the kernel's events.
    pub governed: bool,
    pub created_ms: u64,
}

impl RunMeta {
    pub fn pin_dir(&self) -> PathBuf {
        Path::new(PIN_ROOT).join(&self.id)
    }

    pub fn meta_path(&self) -> PathBuf {
        meta_path(&self.id)
    }

    /// Whether the agt-jail that wrote this run still runs.
    pub fn writer_alive(&self) -> bool {
        start_time(self.pid).is_some_and(|start| start == self.pid_start)
    }
}

fn meta_path(id: &str) -> PathBuf {
    Path::new(RUN_ROOT).join(format!("{id}.json"))
}

/// A process's start time, `None` when it does not exist.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Mounts bpffs at /sys/fs/bpf when nothing is mounted there.
fn ensure_bpffs() -> Result<()> {
    let root = Path::new("/sys/fs/bpf");
    if fs_type(root)? == BPF_FS_MAGIC {
        return Ok(());
    }
    let (source, target, fstype) = (c"bpf", c"/sys/fs/bpf", c"bpf");
    // SAFETY: mount(2) with valid NUL-terminated strings and no data; the result is checked.
    let rc = unsafe { libc::mount(source.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        bail!(
            "cannot mount bpffs at /sys/fs/bpf (audited runs pin their kernel records there): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

fn fs_type(path: &Path) -> Result<i64> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).context("path with a NUL byte")?;
    // SAFETY: an all-zero statfs is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid path and a valid out-pointer; the result is checked.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        bail!("cannot stat {}: {}", path.display(), std::io::Error::last_os_error());
    }
    Ok(st.f_type as i64)
}

/// A run's pins and description; removed when dropped unless [`PinnedRun::keep`] was called.
pub struct PinnedRun {
    meta: RunMeta,
    keep: bool,
}

impl PinnedRun {
    /// Pins `programs`' rings, summary and counters for the run `meta` describes, then
    /// writes the description. Fails (and leaves nothing behind) when either cannot be done.
    pub fn create(programs: &mut AgentPrograms, meta: RunMeta) -> Result<PinnedRun> {
        ensure_bpffs()?;
        let dir = meta.pin_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let run = PinnedRun { meta, keep: false };
        programs.pin_events(&dir).context("cannot pin the run's event rings")?;
        std::fs::create_dir_all(RUN_ROOT).with_context(|| format!("cannot create {RUN_ROOT}"))?;
        let path = run.meta.meta_path();
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(&run.meta).context("cannot describe the run")?;
        let mut file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(&text)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(run)
    }

    /// Leaves the pins in place (what they hold is not all in the log).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for PinnedRun {
    fn drop(&mut self) {
        if self.keep {
            agt_jail_jail::stderr_line!(
                "agt-jail: warning: the run's kernel records stay pinned at {}; `agt-jail audit recover` writes them to {}",
                self.meta.pin_dir().display(),
                self.meta.audit.display()
            );
            return;
        }
        if let Err(err) = unpin(&self.meta) {
            agt_jail_jail::stderr_line!("agt-jail: warning: {err:#}");
        }
    }
}

/// Removes a run's pins and its description.
pub fn unpin(meta: &RunMeta) -> Result<()> {
    let dir = meta.pin_dir();
    for name in [
        pins::EVENTS,
        pins::PRIORITY,
        pins::DENY_SUMMARY,
        pins::DENY_SUMMARY_WRITTEN,
        pins::EVENT_DROPS,
        pins::DENY_DROPS,
    ] {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(err).with_context(|| format!("cannot unpin {}", dir.join(name).display())),
        }
    }
    match std::fs::remove_dir(&dir) {
        Ok(()) => {}
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("cannot remove {}", dir.display())),
    }
    match std::fs::remove_file(meta.meta_path()) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(err).with_context(|| format!("cannot remove {}", meta.meta_path().display())),
    }
}

/// Every run described under [`RUN_ROOT`] (live or not), by id; unreadable descriptions
/// are errors naming the file.
pub fn runs() -> Result<Vec<RunMeta>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(RUN_ROOT) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(err) => return Err(err).with_context(|| format!("cannot list {RUN_ROOT}")),
    };
    for entry in entries {
        let path = entry.with_context(|| format!("cannot list {RUN_ROOT}"))?.path();
        if path.extension().is_none_or(|e| e != "json") {
            continue;
        }
        let text = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let meta: RunMeta =
            serde_json::from_slice(&text).with_context(|| format!("{}: not a run description", path.display()))?;
        out.push(meta);
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Runs whose agt-jail is gone (kill -9, a crash) and whose kernel records are still pinned.
pub fn orphaned() -> Result<Vec<RunMeta>> {
    Ok(runs()?.into_iter().filter(|run| !run.writer_alive()).collect())
}

/// One line per orphaned run, as `exec --audit` and `doctor` warn of them.
pub fn orphan_warning(runs: &[RunMeta]) -> Option<String> {
    if runs.is_empty() {
        return None;
    }
    let logs: Vec<String> = runs.iter().map(|r| r.audit.display().to_string()).collect();
    Some(format!(
        "{} audited run(s) ended without closing their log (killed?); their kernel records are still pinned: \
         run `agt-jail audit recover` to write them to {}",
        runs.len(),
        logs.join(", ")
    ))
}
