//! Agent cgroups: created (and given to the BPF loader) before the agent runs,
//! killed and removed on every exit path.
//!
//! All paths are derived from a root passed in, so the logic runs against a
//! temporary directory in unit tests and against `/sys/fs/cgroup` in production.
use std::{
    fs::{self, File},
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use crate::sys;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 hierarchy is mounted (looked in {mountinfo}); agt-jail needs cgroup2 for attaching BPF programs"
    )]
    NoCgroup2 { mountinfo: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot create cgroup {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot open cgroup {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("cgroup {path} still has processes after {waited_ms} ms of SIGKILL")]
    StillPopulated { path: PathBuf, waited_ms: u128 },
    #[error("cannot remove cgroup {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("no {controller} controller is available (neither cgroup v2 nor a v1 hierarchy offers it); cannot enforce the {controller} limit")]
    NoController { controller: String },
}

/// Where the cgroup hierarchies are mounted on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupLayout {
    /// The cgroup2 mount: `/sys/fs/cgroup` on pure v2 hosts, `/sys/fs/cgroup/unified` on hybrid ones.
    pub v2: PathBuf,
    /// True when v1 controller hierarchies (memory, pids, cpu...) are mounted beside it.
    pub hybrid: bool,
    /// v1 hierarchies by controller name (`memory` -> `/sys/fs/cgroup/memory`).
    pub v1: Vec<(String, PathBuf)>,
}

impl CgroupLayout {
    /// Reads the layout from a mountinfo file (normally `/proc/self/mountinfo`).
    pub fn detect(mountinfo: &Path) -> Result<Self, CgroupError> {
        let text = fs::read_to_string(mountinfo)
            .map_err(|source| CgroupError::Read { path: mountinfo.to_path_buf(), source })?;
        Self::parse(&text).ok_or_else(|| CgroupError::NoCgroup2 { mountinfo: mountinfo.to_path_buf() })
    }

    /// Parses mountinfo text (proc(5) format): the mount point is field 5, the
    /// filesystem type follows the " - " separator.
    pub fn parse(mountinfo: &str) -> Option<Self> {
        let mut v2 = None;
        let mut hybrid = false;
        let mut v1 = Vec::new();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else { continue };
            let Some(mount_point) = left.split_whitespace().nth(4) else { continue };
            let mut fields = right.split_whitespace();
            match fields.next() {
                Some("cgroup2") if v2.is_none() => v2 = Some(PathBuf::from(unescape_mount_path(mount_point))),
                Some("cgroup") => {
                    hybrid = true;
                    // Super options name the controllers ("rw,cpu,cpuacct").
                    let options = fields.nth(1).unwrap_or("");
                    for controller in options.split(',').filter(|o| V1_CONTROLLERS.contains(o)) {
                        if !v1.iter().any(|(c, _): &(String, PathBuf)| c == controller) {
                            v1.push((controller.to_string(), PathBuf::from(unescape_mount_path(mount_point))));
                        }
                    }
                }
                _ => {}
            }
        }
        v2.map(|v2| Self { v2, hybrid, v1 })
    }

    /// The directory under which agt-jail creates agent cgroups.
    pub fn agents_parent(&self) -> PathBuf {
        self.v2.join("agt-jail")
    }

    /// The v1 hierarchy of `controller`, when mounted.
    pub fn v1_root(&self, controller: &str) -> Option<&Path> {
        self.v1.iter().find(|(c, _)| c == controller).map(|(_, p)| p.as_path())
    }

    /// Controllers the v2 hierarchy offers (empty on this machine's hybrid layout).
    pub fn v2_controllers(&self) -> Vec<String> {
        fs::read_to_string(self.v2.join("cgroup.controllers"))
            .map(|t| t.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Where each limited controller lives: v2 when it offers the controller, else the
    /// v1 hierarchy, else nowhere (the limit cannot be enforced).
    pub fn placement(&self, controller: &str) -> Placement {
        if self.v2_controllers().iter().any(|c| c == controller) {
            Placement::V2
        } else if let Some(root) = self.v1_root(controller) {
            Placement::V1(root.to_path_buf())
        } else {
            Placement::Missing
        }
    }
}

/// The v1 controllers agt-jail uses for limits.
pub const V1_CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];

/// Where a controller is found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placement {
    V2,
    V1(PathBuf),
    Missing,
}

/// Resource limits of one agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    pub memory: Option<u64>,
    pub pids: Option<u64>,
    pub cpu_millis: Option<u64>,
}

/// Control-file writes that implement `limits`, for cgroup v2 or v1 (pure; tested).
pub fn limit_writes(controller: &str, v2: bool, limits: &CgroupLimits) -> Vec<(&'static str, String)> {
    const PERIOD: u64 = 100_000;
    match (controller, v2) {
        ("memory", true) => limits
            .memory
            .map(|m| {
                vec![("memory.max", m.to_string()), ("memory.swap.max", "0".into()), ("memory.oom.group", "0".into())]
            })
            .unwrap_or_default(),
        ("memory", false) => limits
            .memory
            .map(|m| vec![("memory.limit_in_bytes", m.to_string()), ("memory.memsw.limit_in_bytes", m.to_string())])
            .unwrap_or_default(),
        ("pids", _) => limits.pids.map(|p| vec![("pids.max", p.to_string())]).unwrap_or_default(),
        ("cpu", true) => {
            limits.cpu_millis.map(|c| vec![("cpu.max", format!("{} {PERIOD}", c * PERIOD / 1000))]).unwrap_or_default()
        }
        ("cpu", false) => limits
            .cpu_millis
            .map(|c| {
                vec![("cpu.cfs_period_us", PERIOD.to_string()), ("cpu.cfs_quota_us", (c * PERIOD / 1000).to_string())]
            })
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Files whose absence is fine (no swap accounting, older kernels).
fn optional_file(name: &str) -> bool {
    matches!(name, "memory.swap.max" | "memory.memsw.limit_in_bytes" | "memory.oom.group")
}

/// Writes control files; optional ones may be missing (see [`optional_file`]).
fn write_limits(dir: &Path, writes: Vec<(&'static str, String)>) -> Result<(), CgroupError> {
    for (file, value) in writes {
        let path = dir.join(file);
        match fs::write(&path, &value) {
            Ok(()) => {}
            Err(e) if optional_file(file) && matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINVAL)) => {}
            Err(source) => return Err(CgroupError::Write { path, source }),
        }
    }
    Ok(())
}

/// One v1 controller cgroup of an agent (hybrid hosts), planned by
/// [`AgentCgroup::apply_limits_deferred`] and created by the launcher. Its owner
/// [`AgentCgroup`] removes it, created or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct V1Cgroup {
    dir: PathBuf,
    writes: Vec<(&'static str, String)>,
    /// Already created by an earlier `apply_limits` of the same agent.
    adopt: bool,
}

impl V1Cgroup {
    /// Creates the cgroup (never adopting one that exists: two agents never share one)
    /// and writes its limits.
    pub fn create(&self) -> Result<(), CgroupError> {
        if let Some(parent) = self.dir.parent() {
            fs::create_dir_all(parent).map_err(|source| CgroupError::Create { path: parent.to_path_buf(), source })?;
        }
        match fs::create_dir(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && self.adopt => {}
            Err(source) => return Err(CgroupError::Create { path: self.dir.clone(), source }),
        }
        write_limits(&self.dir, self.writes.clone())
    }

    /// The cgroup's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its `cgroup.procs`, which the agent's first process joins.
    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`); this undoes it.
pub fn unescape_mount_path(raw: &str) -> String {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() && bytes[i + 1..i + 4].iter().all(|b| (b'0'..=b'7').contains(b)) {
            let value = bytes[i + 1..i + 4].iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One agent's cgroup v2 directory.
#[derive(Debug)]
pub struct AgentCgroup {
    path: PathBuf,
    dir: File,
    id: u64,
    removed: bool,
    /// Matching v1 cgroups (hybrid hosts), joined and removed with this one.
    v1: Vec<PathBuf>,
    /// The memory controller's directory, for OOM reports.
    memory: Option<(PathBuf, bool)>,
}

/// How long [`AgentCgroup::remove`] waits for killed processes to leave.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

impl AgentCgroup {
    /// Creates `parent/name` (and `parent` if needed). The name must be fresh: an
    /// existing cgroup is never adopted, so two agents never share one.
    pub fn create(parent: &Path, name: &str) -> Result<Self, CgroupError> {
        fs::create_dir_all(parent).map_err(|source| CgroupError::Create { path: parent.to_path_buf(), source })?;
        let path = parent.join(name);
        fs::create_dir(&path).map_err(|source| CgroupError::Create { path: path.clone(), source })?;
        match Self::open(&path) {
            Ok(cgroup) => Ok(cgroup),
            Err(err) => {
                let _ = fs::remove_dir(&path);
                Err(err)
            }
        }
    }

    fn open(path: &Path) -> Result<Self, CgroupError> {
        let dir = File::open(path).map_err(|source| CgroupError::Open { path: path.to_path_buf(), source })?;
        let meta = dir.metadata().map_err(|source| CgroupError::Open { path: path.to_path_buf(), source })?;
        // On cgroup2 the directory's inode number is the cgroup id that
        // bpf_get_current_cgroup_id() returns.
        Ok(Self { path: path.to_path_buf(), dir, id: meta.ino(), removed: false, v1: Vec::new(), memory: None })
    }

    /// Applies `limits`: on v2 where it offers the controller, otherwise in a v1 cgroup
    /// of the same name (created here, joined with [`Self::procs_paths`]). A limit no
    /// hierarchy can hold is an error: limits are never silently dropped.
    pub fn apply_limits(&mut self, layout: &CgroupLayout, limits: &CgroupLimits) -> Result<(), CgroupError> {
        for v1 in self.plan_limits(layout, limits)? {
            v1.create()?;
        }
        Ok(())
    }

    /// Like [`Self::apply_limits`], but the v1 cgroups (hybrid hosts) are only planned:
    /// checked, named and registered for removal, not yet created. The launcher creates
    /// them ([`V1Cgroup::create`]) and moves the jail in while the jail builds its root,
    /// so that work overlaps instead of delaying the clone; the agent still starts only
    /// after every limit is written and every hierarchy joined. v2 limits are written
    /// here (the jail is cloned straight into the v2 cgroup).
    pub fn apply_limits_deferred(
        &mut self,
        layout: &CgroupLayout,
        limits: &CgroupLimits,
    ) -> Result<Vec<V1Cgroup>, CgroupError> {
        self.plan_limits(layout, limits)
    }

    fn plan_limits(&mut self, layout: &CgroupLayout, limits: &CgroupLimits) -> Result<Vec<V1Cgroup>, CgroupError> {
        let name = self.path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        // Read once: every controller's placement depends on it.
        let v2_controllers = layout.v2_controllers();
        let mut deferred = Vec::new();
        for controller in V1_CONTROLLERS {
            let wanted = match controller {
                "memory" => limits.memory.is_some(),
                "pids" => limits.pids.is_some(),
                _ => limits.cpu_millis.is_some(),
            };
            // No limit, no controller cgroup: joining a v1 hierarchy is a migration that
            // waits for an RCU grace period, the largest part of a jail's start-up.
            if !wanted {
                continue;
            }
            let placement = if v2_controllers.iter().any(|c| c == controller) {
                Placement::V2
            } else {
                layout.v1_root(controller).map_or(Placement::Missing, |root| Placement::V1(root.to_path_buf()))
            };
            match placement {
                Placement::V2 => {
                    let parent = self.path.parent().map(Path::to_path_buf).unwrap_or_default();
                    for level in [layout.v2.clone(), parent] {
                        let control = level.join("cgroup.subtree_control");
                        let _ = fs::write(&control, format!("+{controller}"));
                    }
                    if controller == "memory" {
                        self.memory = Some((self.path.clone(), true));
                    }
                    write_limits(&self.path, limit_writes(controller, true, limits))?;
                }
                Placement::V1(root) => {
                    let dir = root.join("agt-jail").join(&name);
                    let adopt = self.v1.contains(&dir);
                    if !adopt {
                        self.v1.push(dir.clone());
                    }
                    if controller == "memory" {
                        self.memory = Some((dir.clone(), false));
                    }
                    deferred.push(V1Cgroup { dir, writes: limit_writes(controller, false, limits), adopt });
                }
                Placement::Missing => return Err(CgroupError::NoController { controller: controller.to_string() }),
            }
        }
        Ok(deferred)
    }

    /// Every `cgroup.procs` file the agent's first process must join (v2 first).
    pub fn procs_paths(&self) -> Vec<PathBuf> {
        std::iter::once(self.path.join("cgroup.procs")).chain(self.v1.iter().map(|d| d.join("cgroup.procs"))).collect()
    }

    /// How many times the kernel's OOM killer ran in the agent's memory cgroup.
    pub fn oom_kills(&self) -> u64 {
        let Some((dir, v2)) = &self.memory else { return 0 };
        let file = if *v2 { "memory.events" } else { "memory.oom_control" };
        fs::read_to_string(dir.join(file))
            .ok()
            .and_then(|text| text.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse().ok())))
            .unwrap_or(0)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The cgroup id as BPF programs see it.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The open directory, for attaching cgroup BPF programs.
    pub fn dir(&self) -> &File {
        &self.dir
    }

    /// Every `cgroup.procs` of the agent ([`Self::procs_paths`]: v2, then the v1 cgroups
    /// that hold its limits on hybrid hosts), opened for writing, for a child to move
    /// itself into all of them before exec.
    pub fn procs_for_join(&self) -> Result<Vec<File>, CgroupError> {
        self.procs_paths()
            .into_iter()
            .map(|path| {
                fs::OpenOptions::new().write(true).open(&path).map_err(|source| CgroupError::Open { path, source })
            })
            .collect()
    }

    /// Process ids currently in the cgroup.
    pub fn pids(&self) -> Result<Vec<libc::pid_t>, CgroupError> {
        let path = self.path.join("cgroup.procs");
        match fs::read_to_string(&path) {
            Ok(text) => Ok(text.lines().filter_map(|line| line.trim().parse().ok()).collect()),
            // The cgroup is already gone: nothing is in it.
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(CgroupError::Read { path, source }),
        }
    }

    /// Kills every process in the cgroup: `cgroup.kill` where the kernel has it
    /// (5.14+, atomic against forks), otherwise SIGKILL to each listed pid, repeated
    /// until the cgroup is empty.
    pub fn kill_all(&self) -> Result<(), CgroupError> {
        let kill_file = self.path.join("cgroup.kill");
        if kill_file.exists() {
            fs::write(&kill_file, "1").map_err(|source| CgroupError::Write { path: kill_file, source })?;
        } else {
            for pid in self.pids()? {
                sys::kill(pid, libc::SIGKILL)
                    .map_err(|source| CgroupError::Write { path: self.path.join("cgroup.procs"), source })?;
            }
        }
        Ok(())
    }

    /// Kills what is left, waits for the cgroup to empty and removes it.
    pub fn remove(mut self) -> Result<(), CgroupError> {
        self.remove_inner()
    }

    fn remove_inner(&mut self) -> Result<(), CgroupError> {
        if self.removed {
            return Ok(());
        }
        let started = Instant::now();
        let mut pause = Backoff::default();
        loop {
            // rmdir first: it fails with EBUSY while anything is left, and an empty
            // cgroup (the usual case) then costs no read of cgroup.procs.
            match fs::remove_dir(&self.path) {
                Ok(()) => {
                    self.removed = true;
                    self.remove_v1();
                    return Ok(());
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    self.removed = true;
                    self.remove_v1();
                    return Ok(());
                }
                // Still populated, or exiting tasks keep it busy for a moment after
                // cgroup.procs reads empty.
                Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
                    if !self.pids()?.is_empty() {
                        self.kill_all()?;
                    }
                }
                Err(source) => return Err(CgroupError::Remove { path: self.path.clone(), source }),
            }
            if started.elapsed() > DRAIN_TIMEOUT {
                return Err(CgroupError::StillPopulated {
                    path: self.path.clone(),
                    waited_ms: started.elapsed().as_millis(),
                });
            }
            pause.wait();
        }
    }
}

/// Short sleeps that grow: an exiting task usually leaves its cgroup within a few
/// hundred microseconds, and a fixed 5 ms pause would dominate jail start-up cost.
#[derive(Default)]
struct Backoff(u32);

impl Backoff {
    fn wait(&mut self) {
        let micros = (50u64 << self.0.min(7)).min(5_000);
        self.0 += 1;
        thread::sleep(Duration::from_micros(micros));
    }
}

impl AgentCgroup {
    /// The v2 cgroup is empty, so its v1 twins are too (the same processes); a short
    /// retry covers tasks that are still exiting.
    fn remove_v1(&mut self) {
        for dir in std::mem::take(&mut self.v1) {
            let mut pause = Backoff::default();
            for _ in 0..2_000 {
                match fs::remove_dir(&dir) {
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => pause.wait(),
                    _ => break,
                }
            }
        }
    }
}

impl Drop for AgentCgroup {
    fn drop(&mut self) {
        // Every exit path removes the cgroup; an explicit remove() reports errors.
        let _ = self.remove_inner();
    }
}

/// The root `cgroup.procs` of the v1 hierarchy an agent's v1 `cgroup.procs`
/// (`<root>/agt-jail/<name>/cgroup.procs`) belongs to: where a process that must not stay
/// in the agent's v1 cgroup goes (v1 allows processes in any cgroup, the root included).
pub fn hierarchy_procs(agent_procs: &Path) -> Option<PathBuf> {
    let dir = agent_procs.parent()?;
    let agents = dir.parent().filter(|p| p.file_name().is_some_and(|n| n == "agt-jail"))?;
    Some(agents.parent()?.join("cgroup.procs"))
}

/// Names agent cgroups `<owner pid>-<sequence>` so stale ones can be recognised.
pub fn cgroup_name(owner: u32, sequence: u64) -> String {
    format!("{owner}-{sequence}")
}

/// Starts the one RCU grace period a cgroup migration costs, in the background.
///
/// Moving a task between cgroups takes the global cgroup threadgroup lock for writing,
/// and the first writer after an idle period waits for an RCU grace period (several
/// milliseconds on a loaded VM). On hybrid hosts the jail must join v1 hierarchies, so
/// a helper thread "moves" itself into the v1 cgroup it is already in (no change of
/// membership) while agt-jail prepares the jail; the real joins moments later find the
/// lock's fast path already switched off and do not wait again.
pub fn warm_migration_lock(layout: &CgroupLayout) {
    let Some((tasks, _)) = own_v1_cgroup(layout, &fs::read_to_string("/proc/self/cgroup").unwrap_or_default()) else {
        return;
    };
    let _ = thread::Builder::new().name("cgroup-warm".into()).spawn(move || {
        let _ = fs::write(&tasks, sys::gettid().to_string());
    });
}

/// The `tasks` file of this process's cgroup in the first v1 hierarchy agt-jail uses.
fn own_v1_cgroup(layout: &CgroupLayout, proc_cgroup: &str) -> Option<(PathBuf, String)> {
    for line in proc_cgroup.lines() {
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        for controller in controllers.split(',') {
            if let Some(root) = layout.v1_root(controller) {
                let relative = path.trim_start_matches('/');
                return Some((root.join(relative).join("tasks"), controller.to_string()));
            }
        }
    }
    None
}

/// [`sweep_stale`] for the v1 hierarchies agt-jail uses (hybrid hosts).
pub fn sweep_stale_v1(layout: &CgroupLayout, proc_root: &Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for (_, root) in &layout.v1 {
        let parent = root.join("agt-jail");
        let Ok(entries) = fs::read_dir(&parent) else { continue };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let owner = name.to_str().and_then(|n| n.split_once('-')).map(|(pid, _)| pid.to_string());
            let Some(owner) = owner else { continue };
            if owner.parse::<u32>().is_err() || proc_root.join(&owner).exists() {
                continue;
            }
            if fs::remove_dir(entry.path()).is_ok() {
                removed.push(entry.path());
            }
        }
    }
    removed
}

/// Removes empty agent cgroups whose owning agt-jail process is gone (it was killed
/// with SIGKILL and could not clean up). `proc_root` is normally `/proc`.
/// Returns the paths removed.
pub fn sweep_stale(parent: &Path, proc_root: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(parent) else { return Vec::new() };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name.to_str().and_then(|n| n.split_once('-')).map(|(pid, _)| pid.to_string()) else {
            continue;
        };
        if owner.parse::<u32>().is_err() || proc_root.join(&owner).exists() {
            continue;
        }
        let path = entry.path();
        if let Ok(mut cgroup) = AgentCgroup::open(&path) {
            if cgroup.remove_inner().is_ok() {
                removed.push(path);
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_agents_v1_cgroup_belongs_to_its_hierarchy_root() {
        let procs = Path::new("/sys/fs/cgroup/memory/agt-jail/42-0/cgroup.procs");
        assert_eq!(hierarchy_procs(procs), Some(PathBuf::from("/sys/fs/cgroup/memory/cgroup.procs")));
        assert_eq!(hierarchy_procs(Path::new("/sys/fs/cgroup/memory/other/42-0/cgroup.procs")), None);
        assert_eq!(hierarchy_procs(Path::new("cgroup.procs")), None);
    }

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const PURE: &str = "30 23 0:27 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn detects_hybrid_layout() {
        let layout = CgroupLayout::parse(HYBRID).unwrap();
        assert_eq!(layout.v2, PathBuf::from("/sys/fs/cgroup/unified"));
        assert!(layout.hybrid);
        assert_eq!(layout.agents_parent(), PathBuf::from("/sys/fs/cgroup/unified/agt-jail"));
    }

    #[test]
    fn finds_v1_controllers() {
        let text = format!("{HYBRID}32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n39 31 0:36 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n");
        let layout = CgroupLayout::parse(&text).unwrap();
        assert_eq!(layout.v1_root("memory"), Some(Path::new("/sys/fs/cgroup/memory")));
        assert_eq!(layout.v1_root("cpu"), Some(Path::new("/sys/fs/cgroup/cpu,cpuacct")));
        assert_eq!(layout.v1_root("pids"), Some(Path::new("/sys/fs/cgroup/pids")));
        assert_eq!(layout.v1_root("cpuacct"), None);
        assert!(CgroupLayout::parse(PURE).unwrap().v1.is_empty());
    }

    #[test]
    fn finds_its_own_v1_cgroup() {
        let layout = CgroupLayout::parse(HYBRID).unwrap();
        let proc_cgroup = "9:name=systemd:/\n4:memory:/process_api/abc\n0::/\n";
        let (tasks, controller) = own_v1_cgroup(&layout, proc_cgroup).unwrap();
        assert_eq!(tasks, PathBuf::from("/sys/fs/cgroup/memory/process_api/abc/tasks"));
        assert_eq!(controller, "memory");
        assert!(own_v1_cgroup(&CgroupLayout::parse(PURE).unwrap(), "0::/\n").is_none());
    }

    #[test]
    fn limit_files_for_both_versions() {
        let limits = CgroupLimits { memory: Some(1 << 30), pids: Some(64), cpu_millis: Some(500) };
        assert_eq!(limit_writes("memory", true, &limits)[0], ("memory.max", "1073741824".to_string()));
        assert_eq!(limit_writes("memory", false, &limits)[0], ("memory.limit_in_bytes", "1073741824".to_string()));
        assert_eq!(limit_writes("pids", false, &limits), vec![("pids.max", "64".to_string())]);
        assert_eq!(limit_writes("cpu", true, &limits), vec![("cpu.max", "50000 100000".to_string())]);
        assert_eq!(limit_writes("cpu", false, &limits)[1], ("cpu.cfs_quota_us", "50000".to_string()));
        assert!(limit_writes("cpu", true, &CgroupLimits::default()).is_empty());
    }

    #[test]
    fn limits_go_to_v1_on_a_fake_hybrid_tree() {
        let tmp = tempfile::tempdir().unwrap();
        let v2 = tmp.path().join("unified");
        let mem = tmp.path().join("memory");
        fs::create_dir_all(&v2).unwrap();
        fs::create_dir_all(&mem).unwrap();
        let layout = CgroupLayout { v2: v2.clone(), hybrid: true, v1: vec![("memory".into(), mem.clone())] };
        let mut cgroup = AgentCgroup::create(&layout.agents_parent(), "1-0").unwrap();
        let limits = CgroupLimits { memory: Some(64 << 20), pids: None, cpu_millis: None };
        cgroup.apply_limits(&layout, &limits).unwrap();
        assert_eq!(fs::read_to_string(mem.join("agt-jail/1-0/memory.limit_in_bytes")).unwrap(), "67108864");
        assert_eq!(cgroup.procs_paths().len(), 2);
        let err = cgroup.apply_limits(&layout, &CgroupLimits { pids: Some(5), ..Default::default() }).unwrap_err();
        assert!(matches!(err, CgroupError::NoController { .. }), "{err}");
        // A fake cgroup directory holds plain files; clear them so rmdir works.
        for dir in [mem.join("agt-jail/1-0"), layout.agents_parent().join("1-0")] {
            for entry in fs::read_dir(&dir).unwrap() {
                fs::remove_file(entry.unwrap().path()).unwrap();
            }
        }
        cgroup.remove().unwrap();
        assert!(!mem.join("agt-jail/1-0").exists());
    }

    #[test]
    fn deferred_v1_cgroups_are_planned_then_created_never_adopted() {
        let tmp = tempfile::tempdir().unwrap();
        let v2 = tmp.path().join("unified");
        let pids = tmp.path().join("pids");
        fs::create_dir_all(&v2).unwrap();
        fs::create_dir_all(&pids).unwrap();
        let layout = CgroupLayout { v2: v2.clone(), hybrid: true, v1: vec![("pids".into(), pids.clone())] };
        let mut cgroup = AgentCgroup::create(&layout.agents_parent(), "2-0").unwrap();
        let limits = CgroupLimits { pids: Some(16), ..Default::default() };
        let planned = cgroup.apply_limits_deferred(&layout, &limits).unwrap();
        // Planned, registered for removal and joined, but nothing created yet.
        assert_eq!(planned.len(), 1);
        assert_eq!(planned[0].dir(), pids.join("agt-jail/2-0"));
        assert!(!pids.join("agt-jail").exists());
        assert!(cgroup.procs_paths().contains(&planned[0].procs()));
        planned[0].create().unwrap();
        assert_eq!(fs::read_to_string(pids.join("agt-jail/2-0/pids.max")).unwrap(), "16");
        // A second create finds it existing: refused, never shared.
        let err = planned[0].create().unwrap_err();
        assert!(matches!(err, CgroupError::Create { .. }), "{err}");
        // A limit no hierarchy holds is refused when planning, before anything runs.
        let err = cgroup.apply_limits_deferred(&layout, &CgroupLimits { memory: Some(1), ..Default::default() });
        assert!(matches!(err, Err(CgroupError::NoController { .. })));
        for dir in [pids.join("agt-jail/2-0"), layout.agents_parent().join("2-0")] {
            for entry in fs::read_dir(&dir).unwrap() {
                fs::remove_file(entry.unwrap().path()).unwrap();
            }
        }
        cgroup.remove().unwrap();
        assert!(!pids.join("agt-jail/2-0").exists());
    }

    #[test]
    fn detects_pure_v2_layout() {
        let layout = CgroupLayout::parse(PURE).unwrap();
        assert_eq!(layout.v2, PathBuf::from("/sys/fs/cgroup"));
        assert!(!layout.hybrid);
    }

    #[test]
    fn no_cgroup2_is_none_and_garbage_does_not_panic() {
        assert!(CgroupLayout::parse("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n").is_none());
        assert!(CgroupLayout::parse("garbage\n - \n\\\\\\ - cgroup2\n").is_none());
        assert!(CgroupLayout::parse("").is_none());
    }

    #[test]
    fn unescapes_octal_in_mount_points() {
        let line = "41 31 0:38 / /mnt/my\\040cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(CgroupLayout::parse(line).unwrap().v2, PathBuf::from("/mnt/my cgroup"));
        assert_eq!(unescape_mount_path("trailing\\04"), "trailing\\04");
        assert_eq!(unescape_mount_path("a\\134b\\012"), "a\\b\n");
    }

    #[test]
    fn detect_reports_the_file() {
        let err = CgroupLayout::detect(Path::new("/nonexistent/mountinfo")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/mountinfo"));
    }

    // On an ordinary filesystem, a "cgroup" is a directory with a cgroup.procs file;
    // enough to test naming, creation, refusal to adopt, and sweeping.
    fn fake_cgroup(parent: &Path, name: &str) -> PathBuf {
        let path = parent.join(name);
        fs::create_dir_all(&path).unwrap();
        fs::write(path.join("cgroup.procs"), "").unwrap();
        path
    }

    #[test]
    fn create_refuses_an_existing_cgroup() {
        let tmp = tempfile::tempdir().unwrap();
        fake_cgroup(tmp.path(), "1-1");
        let err = AgentCgroup::create(tmp.path(), "1-1").unwrap_err();
        assert!(matches!(err, CgroupError::Create { .. }), "{err}");
    }

    #[test]
    fn sweep_removes_only_cgroups_of_dead_owners() {
        let tmp = tempfile::tempdir().unwrap();
        let proc_root = tmp.path().join("proc");
        fs::create_dir_all(proc_root.join("100")).unwrap();
        let parent = tmp.path().join("agt-jail");
        let alive = fake_cgroup(&parent, &cgroup_name(100, 1));
        let dead = fake_cgroup(&parent, &cgroup_name(200, 1));
        let foreign = fake_cgroup(&parent, "not-ours");
        // A real cgroupfs lets rmdir succeed with the control files present; a plain
        // directory does not, so empty the fake of its file first.
        fs::remove_file(dead.join("cgroup.procs")).unwrap();
        let removed = sweep_stale(&parent, &proc_root);
        assert!(alive.exists());
        assert!(foreign.exists());
        assert!(!dead.exists());
        assert_eq!(removed, vec![dead]);
    }
}
