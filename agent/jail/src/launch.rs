//! The launcher for rings 1-3: one ordered sequence from "run this" to exec.
//!
//! ```text
//! parent  prepare everything (paths, mount plan, Landlock plan, seccomp BPF, argv/env)
//!   └─ clone(NEWPID|NEWNS|NEWIPC|NEWUTS[|NEWNET][|NEWUSER])      = jail init (pid 1)
//!        uid/gid map (rootless) → private mounts → build view → pivot_root → hostname
//!        → lo up → wait until the parent has moved it into the agent's v1 cgroups
//!        └─ clone3(CLONE_INTO_CGROUP: the agent's v2 cgroup)        = the agent
//!             unshare(NEWCGROUP) → setsid/ctty → chdir → securebits + drop
//!             bounding/ambient/all caps → rlimits → no_new_privs → Landlock → seccomp → exec
//!        init: leave the v1 cgroups, reap children, forward signals to the agent's group;
//!        once the agent is gone, write its status to the parent, then exit
//! ```
//!
//! The init is agt-jail's code, not the agent's, and is in none of the agent's cgroups
//! once the agent exists: it is born outside the v2 cgroup and leaves the v1 ones (which
//! the agent inherits) right after the fork, while the agent sets itself up. When the
//! agent's processes are gone the cgroups are empty, and the parent removes them and exits
//! on the status the init writes, without waiting for the init's own exit: that tears the
//! jail's namespaces down (unmounting the view waits for an RCU grace period).
//!
//! Everything the children need is built in the parent before clone: after a raw
//! clone of a multi-threaded process only async-signal-safe work is allowed, so the
//! child code only reads prepared data and makes system calls. A failure in a child
//! is reported through a close-on-exec pipe as (stage, index, errno); the parent
//! turns it into a message and nothing runs. EOF on that pipe means the exec happened.
use std::{
    ffi::{CString, OsString},
    io::{self, Read},
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{ffi::OsStrExt, fs::PermissionsExt},
    },
    path::{Path, PathBuf},
};

use crate::{
    cgroup::{self, CgroupError, V1Cgroup},
    exec_size::{self, ExecSizeError},
    landlock::{self, LandlockPlan, LandlockRequest},
    mounts::{self, Bind, MountOp, ViewSpec},
    profile::{self, NetMode, Profile, WorkspaceMode},
    seccomp::Arch,
    sys,
};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("{0}")]
    Config(String),
    #[error("landlock is required by ring {ring} but {reason}")]
    Landlock { ring: u8, reason: String },
    #[error("cannot build the seccomp filter: {0}")]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("cannot start the jail: {0}")]
    Clone(io::Error),
    #[error("jail setup failed at {stage}: {source}")]
    Setup { stage: String, source: io::Error },
    #[error("jail setup failed: {0}")]
    Cgroup(#[from] CgroupError),
    #[error("{program}: command not found inside the jail")]
    NotFound { program: String },
    #[error("{program}: permission denied inside the jail")]
    NotExecutable { program: String },
    #[error("cannot run {program}: {source}")]
    TooLarge { program: String, source: ExecSizeError },
    #[error("cannot give the agent its own network with egress: {0}")]
    Egress(#[from] crate::egress::EgressError),
}

impl LaunchError {
    /// Exit status a shell would give (127/126), else None (agt-jail's 125).
    pub fn shell_status(&self) -> Option<u8> {
        match self {
            LaunchError::NotFound { .. } => Some(127),
            LaunchError::NotExecutable { .. } => Some(126),
            _ => None,
        }
    }
}

/// What to run and how, after the CLI merged the profile with its flags.
#[derive(Clone, Debug)]
pub struct JailConfig {
    pub profile: Profile,
    /// The program as resolved on the host.
    pub program: PathBuf,
    /// argv, argv[0] as the user typed it (any bytes but NUL: arguments need not be UTF-8).
    pub argv: Vec<OsString>,
    /// The complete environment of the agent (already scrubbed by the caller).
    pub env: Vec<(OsString, OsString)>,
    /// The host workspace directory (canonical), if any.
    pub workspace: Option<PathBuf>,
    /// Extra executables (`--allow-exec`).
    pub allow_exec: Vec<PathBuf>,
    /// `cgroup.procs` files to join before anything else (empty when rootless).
    pub cgroup_procs: Vec<PathBuf>,
    /// The agent's cgroup v2 directory (open), to clone the jail straight into it.
    pub cgroup_dir: Option<libc::c_int>,
    /// The invoking user's home, for `~` in hide patterns.
    pub home: Option<PathBuf>,
    /// Use a user namespace (not root): uid 0 inside maps to the caller.
    pub rootless: bool,
    /// The pty slave to use as stdio and controlling terminal.
    pub tty: Option<libc::c_int>,
    /// The pty slave's host path (`/dev/pts/N`), shown inside as /dev/console.
    pub tty_path: Option<PathBuf>,
    /// The child end of a unix socketpair: when set, the agent installs the exec listener
    /// (`seccomp::exec_listener`, SECCOMP_FILTER_FLAG_NEW_LISTENER) right before its exec
    /// and sends the listener fd over it (SCM_RIGHTS). Every exec in the jail, the entry
    /// command's first, then waits for an answer on that fd, so the receiver
    /// (`agt_jail_supervisor::exec_notify::ExecNotifier`) must be running before
    /// [`launch`] is called. The caller closes its copy after `launch` returns.
    pub exec_notify: Option<std::os::fd::RawFd>,
    /// The routed path out of the jail's own network namespace (allowlist mode): the
    /// namespace, made and configured by [`crate::egress::Egress`], which the init joins.
    pub egress: Option<crate::egress::EgressPlan>,
    /// The agent's resolver (allowlist mode with egress, docs/dns-egress.md): a generated
    /// resolv.conf on the host, shown read-only over `/etc/resolv.conf` (over its final
    /// target when that is a symlink, e.g. into /run/systemd/resolve). With it, seccomp
    /// lets UDP sockets through (not ICMP): the cgroup sendmsg programs decide where
    /// their datagrams go, and the only UDP destination they allow is that resolver.
    pub resolv_conf: Option<PathBuf>,
}

/// What the jail will enforce on this host (for `exec` warnings and `doctor`).
#[derive(Clone, Debug, Default)]
pub struct Enforcement {
    pub landlock_abi: u32,
    pub unenforced: Vec<String>,
    /// The kernel can make a pid namespace's memfds non-executable (`vm.memfd_noexec`,
    /// Linux 6.3). Landlock does not see memfds (they live on an internal mount), so
    /// where this is missing seccomp refuses `memfd_create` in the confined rings:
    /// otherwise `/proc/self/fd/N` of a memfd would run code outside the exec allow-list.
    pub memfd_noexec: bool,
    /// Without Landlock, a ring that runs only its entry command (exec.system and
    /// exec.workspace false, no exec.allow) is held by the entry-only exec plane: the
    /// caller must pass [`JailConfig::exec_notify`] served by
    /// `agt_jail_supervisor::exec_notify::ExecNotifier::start_entry_only`, and no
    /// `allow_exec` paths.
    pub entry_exec_plane: bool,
}

/// A started jail: its init process, as seen from the host.
#[derive(Debug)]
pub struct JailProcess {
    pub pid: libc::pid_t,
    /// Where the init writes the agent's status (exit code, or 128+N for signal N).
    status: OwnedFd,
    /// Without cgroups nothing else ends what the agent left running, so the init's exit
    /// (which kills the rest of the pid namespace) is waited for after all.
    wait_for_init: bool,
}

impl JailProcess {
    /// Waits until the agent is gone and returns a wait(2) status word whose exit code is
    /// the agent's (128+N when killed by N). The init sends it before it tears the
    /// jail's namespaces down, and in a jail with cgroups that teardown is not waited for:
    /// the init is no longer in the agent's cgroups and dies with agt-jail, and removing
    /// the cgroups ends whatever the agent left running. When the init itself was killed,
    /// its own status is returned.
    pub fn wait(&self) -> io::Result<libc::c_int> {
        let mut code = [0u8; 4];
        if read_message(self.status.as_raw_fd(), &mut code) == code.len() && !self.wait_for_init {
            return Ok((libc::c_int::from_ne_bytes(code) & 0xff) << 8);
        }
        sys::waitpid(self.pid, false).map(|(_, status)| status)
    }
}

// ---------------------------------------------------------------------------
// Parent side: planning (allocation allowed).

/// Mount operations with their strings ready for the child.
enum COp {
    Mkdir(CString),
    Touch(CString),
    Bind(CString, CString),
    RemountRo(CString),
    RemountNoexec(CString, bool),
    Tmpfs(CString, CString, libc::c_ulong),
    Proc(CString),
    Devpts(CString),
    Symlink(CString, CString),
    HideFile(CString),
    HideDir(CString),
}

struct LandlockChild {
    plan: LandlockPlan,
    paths: Vec<(CString, u64)>,
}

/// Everything the child needs, prepared in the parent.
struct Plan {
    clone_flags: libc::c_ulong,
    rootless: bool,
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
    /// The v2 `cgroup.procs` (the agent joins through it when clone3 could not place it).
    cgroup_v2_procs: Option<PathBuf>,
    /// That file, open (set by the parent right before the clone).
    cgroup_v2_join: Option<libc::c_int>,
    /// The v1 hierarchies' root `cgroup.procs`, open: the init leaves the agent's v1
    /// cgroups through them once the agent exists.
    cgroup_v1_leave: Vec<libc::c_int>,
    /// The write end of the status pipe (see [`JailProcess::wait`]).
    status: libc::c_int,
    /// v1 `cgroup.procs` files, written by the parent while the child builds its root.
    cgroup_v1_procs: Vec<PathBuf>,
    /// v1 cgroups the parent creates (with their limits) before joining them.
    cgroup_v1_create: Vec<V1Cgroup>,
    cgroup_dir: Option<libc::c_int>,
    cgroup_ns: bool,
    ops: Vec<COp>,
    op_names: Vec<String>,
    memfd_noexec: bool,
    net_ns: bool,
    /// A network namespace made beforehand (allowlist egress) to join instead of a new one.
    net_join: Option<libc::c_int>,
    uts_ns: bool,
    cwd: CString,
    landlock: Option<LandlockChild>,
    seccomp: Option<Vec<libc::sock_filter>>,
    /// The exec listener filter and the socket to send its fd over.
    exec_listener: Option<(Vec<libc::sock_filter>, libc::c_int)>,
    exe: CString,
    /// The strings of argv and envp, kept alive for `argv_ptrs`/`envp_ptrs`, which point into them.
    _strings: [Vec<CString>; 2],
    /// Null-terminated pointer arrays for execve(2), built before clone because the
    /// child must not allocate. A CString's bytes stay where they are when the Plan moves.
    argv_ptrs: Vec<*const libc::c_char>,
    envp_ptrs: Vec<*const libc::c_char>,
    tty: Option<libc::c_int>,
}

/// A null-terminated array of pointers to `strings` (valid while they live).
fn pointer_array(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect()
}

fn cstr(text: impl AsRef<[u8]>) -> Result<CString, LaunchError> {
    CString::new(text.as_ref())
        .map_err(|_| LaunchError::Config(format!("'{}' contains a NUL byte", String::from_utf8_lossy(text.as_ref()))))
}

/// The command as the user typed it, for messages.
fn program_name(cfg: &JailConfig) -> String {
    cfg.argv.first().map(|arg| arg.to_string_lossy().into_owned()).unwrap_or_default()
}

fn path_c(path: &Path) -> Result<CString, LaunchError> {
    cstr(path.as_os_str().as_bytes())
}

/// The interpreter of a script (`#!`) or the dynamic loader of an ELF file, so that a
/// ring that allows exec of only its entry command can still start it.
pub fn interpreters(program: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut current = program.to_path_buf();
    for _ in 0..3 {
        let Ok(mut file) = std::fs::File::open(&current) else { break };
        let mut head = vec![0u8; 4096];
        let Ok(n) = file.read(&mut head) else { break };
        head.truncate(n);
        let next = if head.starts_with(b"#!") {
            let line = head[2..].split(|b| *b == b'\n').next().unwrap_or_default();
            let text = String::from_utf8_lossy(line);
            text.split_whitespace().next().map(PathBuf::from)
        } else {
            elf_interpreter(&head, &mut file)
        };
        match next {
            Some(p) if !out.contains(&p) => {
                out.push(p.clone());
                current = p;
            }
            _ => break,
        }
    }
    out
}

fn elf_interpreter(head: &[u8], file: &mut std::fs::File) -> Option<PathBuf> {
    use std::io::{Seek, SeekFrom};
    // ELF64, little-endian only (x86_64 and aarch64).
    if head.len() < 64 || &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return None;
    }
    let u16_at = |b: &[u8], o: usize| -> Option<u16> { Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?)) };
    let u64_at = |b: &[u8], o: usize| -> Option<u64> { Some(u64::from_le_bytes(b.get(o..o + 8)?.try_into().ok()?)) };
    let phoff = u64_at(head, 0x20)?;
    let phentsize = usize::from(u16_at(head, 0x36)?);
    let phnum = usize::from(u16_at(head, 0x38)?);
    if phentsize < 56 || phnum > 256 {
        return None;
    }
    let mut table = vec![0u8; phentsize * phnum];
    file.seek(SeekFrom::Start(phoff)).ok()?;
    file.read_exact(&mut table).ok()?;
    for i in 0..phnum {
        let ph = &table[i * phentsize..(i + 1) * phentsize];
        if u32::from_le_bytes(ph[..4].try_into().ok()?) == 3 {
            let offset = u64_at(ph, 8)?;
            let size = usize::try_from(u64_at(ph, 32)?).ok().filter(|s| *s <= 4096)?;
            let mut name = vec![0u8; size];
            file.seek(SeekFrom::Start(offset)).ok()?;
            file.read_exact(&mut name).ok()?;
            let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
            return Some(PathBuf::from(String::from_utf8_lossy(&name[..end]).into_owned()));
        }
    }
    None
}

fn is_under(path: &Path, base: &Path) -> bool {
    path.starts_with(base)
}

/// A writable (or read-only) workspace must not be `/`, a system path, or contain one:
/// it would replace the read-only system view.
pub fn check_workspace(profile: &Profile, ws: &Path) -> Result<(), LaunchError> {
    if profile.workspace == WorkspaceMode::Scratch || !profile.confine {
        return Ok(());
    }
    if overlaps_system(profile, ws) {
        return Err(LaunchError::Config(format!(
            "workspace {} overlaps the system paths of the jail; give a project directory with --workspace",
            ws.display()
        )));
    }
    Ok(())
}

/// Whether `path` (canonical) is `/`, a system path of the profile, above one or under one.
fn overlaps_system(profile: &Profile, path: &Path) -> bool {
    let system: Vec<PathBuf> = profile.system.iter().filter_map(|s| Path::new(s).canonicalize().ok()).collect();
    path == Path::new("/") || system.iter().any(|s| is_under(s, path) || is_under(path, s))
}

/// Checks an extra path (`--rw`/`--ro`, canonical) can be honoured: a writable one never
/// makes a system path (or an ancestor) writable, nor the host's /sys; neither goes
/// under /proc, where the jail's own procfs (of its pid namespace) would hide it.
pub fn check_extra_path(profile: &Profile, path: &Path, writable: bool) -> Result<(), LaunchError> {
    let flag = if writable { "--rw" } else { "--ro" };
    if is_under(path, Path::new("/proc")) {
        return Err(LaunchError::Config(format!(
            "{flag} {}: the jail has its own /proc (its pid namespace's); a host path there would be hidden",
            path.display()
        )));
    }
    if writable && is_under(path, Path::new("/sys")) {
        return Err(LaunchError::Config(format!(
            "--rw {}: the host's /sys is never writable in a jail (use --ro)",
            path.display()
        )));
    }
    if writable && overlaps_system(profile, path) {
        return Err(LaunchError::Config(format!(
            "--rw {} overlaps the system paths of the jail, which stay read-only; give a directory outside them",
            path.display()
        )));
    }
    Ok(())
}

/// Where what the agent builds may run (`exec.workspace`, rings 1-2): the workspace as the
/// agent sees it (in scratch mode the scratch /workspace and the directory shown beside
/// it) and the writable extra paths. Never the private /tmp or /dev/shm: writing a
/// binary anywhere else and running it stays refused.
pub fn workspace_exec_paths(profile: &Profile, workspace: Option<&Path>) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = Vec::new();
    if profile.workspace == WorkspaceMode::Scratch {
        paths.push(mounts::SCRATCH.into());
    }
    paths.extend(workspace.map(Path::to_path_buf));
    paths.extend(profile.rw.iter().cloned());
    paths
}

/// Without Landlock, exec is confined by the mount view: every bind that is not under a
/// path in `execute` is remounted noexec, a path in `execute` inside such a bind gets a
/// bind of its own (from the host, so it is executable), and the private /tmp (and the
/// scratch workspace unless the ring runs what is in it) are mounted noexec. The result
/// runs what Landlock's EXECUTE rules would, and less: nothing at all, shared libraries
/// included, is mapped executable from a noexec mount (`--ro` paths, /tmp).
fn noexec_view(view: &mut ViewSpec, execute: &[PathBuf], exec_workspace: bool) {
    let real = |path: &Path| path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    let roots: Vec<PathBuf> = execute
        .iter()
        .filter(|path| !(view.scratch && path.as_path() == Path::new(mounts::SCRATCH)))
        .map(|path| real(path))
        .collect();
    let runnable = |path: &Path| roots.iter().any(|root| is_under(path, root));
    for bind in &mut view.binds {
        bind.noexec = !runnable(&bind.path);
    }
    for root in &roots {
        if view.binds.iter().any(|b| b.path == *root) {
            continue;
        }
        // The innermost bind holding it decides what it gets otherwise.
        let holder = view.binds.iter().filter(|b| is_under(root, &b.path)).max_by_key(|b| b.path.components().count());
        if let Some(holder) = holder.filter(|b| b.noexec) {
            let writable = holder.writable;
            // A path that does not exist runs nothing (as with a Landlock rule it could not open).
            let Ok(meta) = root.metadata() else { continue };
            view.binds.push(Bind { path: root.clone(), writable, is_dir: meta.is_dir(), noexec: false });
        }
    }
    view.tmp_noexec = true;
    view.scratch_noexec = !exec_workspace;
}

/// The Landlock ABI the jail uses: the kernel's. A debug build (tests only) takes a lower
/// one from `AGT_JAIL_TEST_LANDLOCK_ABI`, so that the paths for older kernels and for
/// kernels without Landlock (`0`) can be exercised on a newer one; it never raises the
/// kernel's, and a release build ignores it.
fn landlock_abi_in_use() -> u32 {
    let abi = sys::landlock_abi().unwrap_or(0);
    #[cfg(debug_assertions)]
    if let Some(lower) = std::env::var("AGT_JAIL_TEST_LANDLOCK_ABI").ok().and_then(|v| v.trim().parse::<u32>().ok()) {
        return abi.min(lower);
    }
    abi
}

/// Reports what Landlock can enforce here for `profile`, or why the ring cannot run.
pub fn check_enforcement(profile: &Profile) -> Result<Enforcement, LaunchError> {
    enforcement_at(profile, landlock_abi_in_use())
}

/// [`check_enforcement`] with the Landlock ABI given.
fn enforcement_at(profile: &Profile, abi: u32) -> Result<Enforcement, LaunchError> {
    let mut unenforced = Vec::new();
    let mut entry_exec_plane = false;
    if profile.confine && abi == 0 {
        const ABSENT: &str = "this kernel does not enforce Landlock (not built in or not in the active LSM list)";
        if profile.landlock_required {
            return Err(LaunchError::Landlock {
                ring: profile.ring,
                reason: format!("{ABSENT}; the profile requires it (landlock.required: true)"),
            });
        }
        // What runs: with exec of the system paths the mount view holds the line (system
        // paths read-only, everything else that must not run mounted noexec). Without it
        // (ring 3: its entry command only) the system paths must stay executable for the
        // shared libraries every program maps, so the mount view cannot; the entry-only
        // exec plane can: a seccomp user-notification filter on execve/execveat whose
        // supervisor lets the launcher's own exec through and fails every later one. It
        // reads nothing from the agent's memory, so there is nothing to race. What it
        // cannot do is tell one path from another: extra runnable paths would need the
        // path-reading plane, which can be raced (docs/threat-model.md).
        if !profile.exec_system {
            if profile.exec_workspace || !profile.exec_allow.is_empty() {
                let what = if profile.exec_workspace { "exec.workspace: true" } else { "exec.allow" };
                return Err(LaunchError::Landlock {
                    ring: profile.ring,
                    reason: format!(
                        "{ABSENT}: ring {} runs only its entry command plus {what}, and without Landlock only the \
                         entry command can be held race-free here (the entry-only exec plane); a path check \
                         on later execs could be raced",
                        profile.ring
                    ),
                });
            }
            if !sys::seccomp_notify_available() {
                return Err(LaunchError::Landlock {
                    ring: profile.ring,
                    reason: format!(
                        "{ABSENT}: ring {} runs only its entry command (exec.system: false), and this kernel has \
                         no seccomp user notification (Linux 5.0) for the entry-only exec plane",
                        profile.ring
                    ),
                });
            }
            entry_exec_plane = true;
            unenforced.push(
                "no Landlock on this kernel: only the entry command runs by the entry-only exec plane (seccomp \
                 user notification: every exec after the first fails with EACCES, ENOSYS once agt-jail is gone); \
                 writes are held by the mount view alone"
                    .to_string(),
            );
        } else {
            unenforced.push(
                "no Landlock on this kernel: writes and exec are held by the mount view alone (read-only and noexec \
             mounts); --ro paths and the private /tmp are noexec, so shared libraries there cannot be loaded either"
                    .to_string(),
            );
        }
    }
    if profile.confine {
        if profile.scope_ipc && abi < 6 {
            // The jail's own pid namespace keeps the host's processes out of reach and its
            // own network namespace the host's abstract sockets; what ABI 6 adds is the
            // line between the agent and the jail's init inside them.
            unenforced.push(if profile.net.own_namespace() {
                format!("Landlock ABI {abi} cannot scope signals (needs 6): the agent can signal the jail's init, which drops SIGKILL and forwards the rest to the agent")
            } else {
                format!("Landlock ABI {abi} cannot scope signals and abstract unix sockets (needs 6)")
            });
        }
        if profile.seccomp.is_some() && !sys::seccomp_available() {
            return Err(LaunchError::Config("this kernel has no seccomp filter support; rings 1-3 need it".into()));
        }
    }
    let memfd_noexec = Path::new("/proc/sys/vm/memfd_noexec").exists();
    Ok(Enforcement { landlock_abi: abi, unenforced, memfd_noexec, entry_exec_plane })
}

const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Where a file bound over `path` must go so that a lookup of `path` finds it: the end of
/// its chain of symlinks (at most 8, relative targets taken from the link's directory),
/// even when that end does not exist (a dangling link into /run/systemd/resolve).
fn resolv_conf_target(path: &Path) -> PathBuf {
    let mut current = path.to_path_buf();
    for _ in 0..8 {
        let Ok(target) = std::fs::read_link(&current) else { break };
        current = match current.parent() {
            Some(dir) if target.is_relative() => dir.join(target),
            _ => target,
        };
    }
    // `..` components are resolved lexically: the bind destination is a plain path.
    let mut clean = PathBuf::from("/");
    for component in current.components() {
        match component {
            std::path::Component::ParentDir => {
                clean.pop();
            }
            std::path::Component::Normal(part) => clean.push(part),
            _ => {}
        }
    }
    clean
}

/// Whether a generated resolv.conf can be shown to a jail of `profile`: the end of the
/// host's `/etc/resolv.conf` links exists (a file to bind over, even inside a read-only
/// system path), or it lies outside the profile's system paths (the view makes its
/// directories on its own tmpfs). A host without the file, whose /etc is a system path,
/// has nowhere to put one: the read-only bind of /etc cannot take a new entry.
pub fn resolv_conf_placeable(profile: &Profile) -> Result<PathBuf, String> {
    let target = resolv_conf_target(Path::new(RESOLV_CONF));
    if target.exists() {
        return Ok(target);
    }
    let system = profile.system.iter().map(|s| Path::new(s).canonicalize().unwrap_or_else(|_| PathBuf::from(s)));
    match system.into_iter().find(|dir| is_under(&target, dir)) {
        Some(dir) => Err(format!(
            "{} does not exist on this host and {} is read-only in the jail, so the agent's resolver cannot be named \
             there (create the file; an empty one will do)",
            target.display(),
            dir.display()
        )),
        None => Ok(target),
    }
}

fn build_plan(cfg: &JailConfig, enforcement: &Enforcement) -> Result<Plan, LaunchError> {
    let p = &cfg.profile;
    let mut view = ViewSpec { devices: mounts::DEVICES.to_vec(), devpts: true, ..Default::default() };
    let mut bound: Vec<PathBuf> = Vec::new();
    let mut add_bind =
        |view: &mut ViewSpec, path: &Path, writable: bool, must_exist: bool| -> Result<(), LaunchError> {
            let meta = match path.symlink_metadata() {
                Ok(meta) => meta,
                Err(_) if !must_exist => return Ok(()),
                Err(e) => return Err(LaunchError::Config(format!("cannot use {}: {e}", path.display()))),
            };
            if meta.file_type().is_symlink() && !must_exist {
                let target = std::fs::read_link(path)
                    .map_err(|e| LaunchError::Config(format!("cannot read link {}: {e}", path.display())))?;
                view.symlinks.push((path.to_path_buf(), target));
                return Ok(());
            }
            let path =
                path.canonicalize().map_err(|e| LaunchError::Config(format!("cannot use {}: {e}", path.display())))?;
            if let Some(b) = view.binds.iter_mut().find(|b| b.path == path) {
                b.writable |= writable;
                return Ok(());
            }
            view.binds.push(Bind { is_dir: path.is_dir(), path: path.clone(), writable, noexec: false });
            bound.push(path);
            Ok(())
        };
    for sys_path in &p.system {
        add_bind(&mut view, Path::new(sys_path), false, false)?;
    }
    let system_dirs: Vec<PathBuf> = view.binds.iter().map(|b| b.path.clone()).collect();
    // The workspace.
    let mut cwd = PathBuf::from("/tmp");
    let mut write_paths: Vec<PathBuf> =
        ["/tmp", "/dev/shm", "/dev/pts", "/dev/null", "/dev/zero", "/dev/full", "/dev/tty"]
            .into_iter()
            .map(PathBuf::from)
            .collect();
    if let Some(console) = &cfg.tty_path {
        view.console = Some(console.clone());
        write_paths.push("/dev/console".into());
    }
    match (p.workspace, &cfg.workspace) {
        (WorkspaceMode::Scratch, ws) => {
            view.scratch = true;
            cwd = PathBuf::from(mounts::SCRATCH);
            write_paths.push(mounts::SCRATCH.into());
            if let Some(ws) = ws {
                add_bind(&mut view, ws, false, true)?;
            }
        }
        (mode, Some(ws)) => {
            check_workspace(p, ws)?;
            add_bind(&mut view, ws, mode == WorkspaceMode::Rw, true)?;
            if mode == WorkspaceMode::Rw {
                write_paths.push(ws.clone());
            }
            cwd = ws.clone();
        }
        (_, None) => {}
    }
    for rw in &p.rw {
        add_bind(&mut view, rw, true, true)?;
        write_paths.push(rw.clone());
    }
    for ro in &p.ro {
        add_bind(&mut view, ro, false, true)?;
    }
    // The entry command, its interpreters and --allow-exec paths must be visible.
    let mut exec_paths: Vec<PathBuf> = vec![cfg.program.clone()];
    exec_paths.extend(interpreters(&cfg.program));
    exec_paths.extend(p.exec_allow.iter().map(PathBuf::from));
    exec_paths.extend(cfg.allow_exec.iter().cloned());
    for exe in &exec_paths {
        let real = exe.canonicalize().unwrap_or_else(|_| exe.clone());
        if !view.binds.iter().any(|b| is_under(&real, &b.path)) && real.exists() {
            add_bind(&mut view, &real, false, true)?;
        }
    }
    // Hidden paths: only what would otherwise be visible, and never an ancestor of
    // something explicitly mounted (that would cover it).
    let binds: Vec<PathBuf> = view.binds.iter().map(|b| b.path.clone()).collect();
    for pattern in &p.hide {
        for hidden in profile::expand_hide(pattern, cfg.home.as_deref()) {
            let hidden = hidden.canonicalize().unwrap_or(hidden);
            let visible = binds.iter().any(|b| is_under(&hidden, b));
            let covers = binds.iter().any(|b| is_under(b, &hidden));
            if visible && !covers && !view.hide.iter().any(|(h, _)| *h == hidden) {
                view.hide.push((hidden.clone(), hidden.is_dir()));
            }
        }
    }
    let _ = bound;
    if let Some(generated) = &cfg.resolv_conf {
        view.files.push((generated.clone(), resolv_conf_target(Path::new(RESOLV_CONF))));
    }

    // What may run: Landlock's EXECUTE rules, or without Landlock the mounts that are not noexec.
    let mut execute: Vec<PathBuf> = Vec::new();
    if p.exec_system {
        execute.extend(system_dirs.iter().cloned());
    }
    if p.exec_workspace {
        execute.extend(workspace_exec_paths(p, cfg.workspace.as_deref()));
    }
    execute.extend(exec_paths.iter().cloned());
    if enforcement.landlock_abi == 0 {
        if enforcement.entry_exec_plane {
            // Only the entry command runs, by the entry-only exec plane: it must be there,
            // and it can hold nothing else. The system paths stay executable in the view
            // (the shared libraries every program maps), beside the entry command's file.
            if cfg.exec_notify.is_none() {
                return Err(LaunchError::Config(
                    "the entry-only exec plane holds this ring's exec without Landlock, and no exec listener was \
                     given"
                        .into(),
                ));
            }
            if let Some(path) = cfg.allow_exec.first() {
                return Err(LaunchError::Landlock {
                    ring: p.ring,
                    reason: format!(
                        "this kernel does not enforce Landlock: --allow-exec {} cannot be honoured in ring {}, whose \
                         only race-free exec plane here lets the entry command alone run",
                        path.display(),
                        p.ring
                    ),
                });
            }
            execute.extend(system_dirs.iter().cloned());
        }
        noexec_view(&mut view, &execute, p.exec_workspace);
    }

    // Landlock.
    let landlock = if enforcement.landlock_abi > 0 {
        // No TCP port rules: a confined jail's network is a namespace of its own, whose
        // loopback is the agent's (port rules would only break servers and clients
        // talking inside the jail) and whose every way out is decided by the cgroup BPF
        // programs (address and port); the host network (ring 0, or --net host under a
        // policy) is the policy's to decide.
        let (connect_ports, bind_ports) = (None, None);
        let req = LandlockRequest {
            read: vec!["/".into()],
            write: write_paths,
            execute,
            connect_ports,
            bind_ports,
            scope_ipc: p.scope_ipc,
        };
        let plan = LandlockPlan::for_abi(&req, enforcement.landlock_abi);
        let paths = plan.paths.iter().map(|r| Ok((path_c(&r.path)?, r.access))).collect::<Result<_, LaunchError>>()?;
        Some(LandlockChild { plan, paths })
    } else {
        None
    };

    let seccomp = match &p.seccomp {
        Some(policy) => {
            let arch = Arch::native()
                .ok_or_else(|| LaunchError::Config("seccomp filters are built for x86_64 and aarch64 only".into()))?;
            let mut policy = policy.clone();
            let dgram_filtered = p.net == NetMode::Allowlist && !p.allow_udp;
            if cfg.resolv_conf.is_some() {
                policy.deny_inet_dgram_not_udp |= dgram_filtered;
            } else {
                policy.deny_inet_dgram |= dgram_filtered;
            }
            policy.deny_memfd |= p.confine && !enforcement.memfd_noexec;
            Some(policy.build(arch)?)
        }
        None => None,
    };

    let exec_listener = match cfg.exec_notify {
        Some(socket) => {
            let arch = Arch::native()
                .ok_or_else(|| LaunchError::Config("seccomp filters are built for x86_64 and aarch64 only".into()))?;
            Some((crate::seccomp::exec_listener(arch), socket))
        }
        None => None,
    };

    let ops_plain = view.plan();
    let mut ops = Vec::with_capacity(ops_plain.len());
    let mut op_names = Vec::with_capacity(ops_plain.len());
    for op in &ops_plain {
        op_names.push(op.to_string());
        ops.push(match op {
            MountOp::Mkdir(p) => COp::Mkdir(path_c(p)?),
            MountOp::Touch(p) => COp::Touch(path_c(p)?),
            MountOp::Bind { src, dst } => COp::Bind(path_c(src)?, path_c(dst)?),
            MountOp::RemountRo { dst } => COp::RemountRo(path_c(dst)?),
            MountOp::RemountNoexec { dst, readonly } => COp::RemountNoexec(path_c(dst)?, *readonly),
            MountOp::Tmpfs { dst, options, flags } => COp::Tmpfs(path_c(dst)?, cstr(options)?, *flags as libc::c_ulong),
            MountOp::Proc { dst } => COp::Proc(path_c(dst)?),
            MountOp::Devpts { dst } => COp::Devpts(path_c(dst)?),
            MountOp::Symlink { target, link } => COp::Symlink(path_c(target)?, path_c(link)?),
            MountOp::HideFile { dst } => COp::HideFile(path_c(dst)?),
            MountOp::HideDir { dst } => COp::HideDir(path_c(dst)?),
        });
    }

    let mut clone_flags = (libc::CLONE_NEWNS | libc::SIGCHLD) as libc::c_ulong;
    for (on, flag) in [
        (p.pid_ns, libc::CLONE_NEWPID),
        (p.ipc_ns, libc::CLONE_NEWIPC),
        (p.uts_ns, libc::CLONE_NEWUTS),
        (p.net.own_namespace() && cfg.egress.is_none(), libc::CLONE_NEWNET),
        (cfg.rootless, libc::CLONE_NEWUSER),
    ] {
        if on {
            clone_flags |= flag as libc::c_ulong;
        }
    }
    let argv = cfg.argv.iter().map(|arg| cstr(arg.as_bytes())).collect::<Result<Vec<_>, _>>()?;
    let envp = cfg
        .env
        .iter()
        .map(|(k, v)| cstr([k.as_bytes(), b"=", v.as_bytes()].concat()))
        .collect::<Result<Vec<_>, _>>()?;
    let exe = path_c(&cfg.program)?;
    let lengths = |list: &[CString]| list.iter().map(|s| s.as_bytes().len()).collect::<Vec<_>>();
    exec_size::check(exe.as_bytes().len(), &lengths(&argv), &lengths(&envp), exec_size::host_limit())
        .map_err(|source| LaunchError::TooLarge { program: program_name(cfg), source })?;
    let (argv_ptrs, envp_ptrs) = (pointer_array(&argv), pointer_array(&envp));
    Ok(Plan {
        clone_flags,
        rootless: cfg.rootless,
        uid_map: format!("0 {} 1", sys::geteuid()).into_bytes(),
        gid_map: format!("0 {} 1", sys::getegid()).into_bytes(),
        cgroup_v2_procs: cfg.cgroup_procs.first().cloned(),
        cgroup_v2_join: None,
        cgroup_v1_leave: Vec::new(),
        status: -1,
        cgroup_v1_procs: cfg.cgroup_procs.iter().skip(1).cloned().collect(),
        cgroup_v1_create: Vec::new(),
        cgroup_dir: cfg.cgroup_dir,
        cgroup_ns: p.cgroup_ns,
        ops,
        op_names,
        memfd_noexec: p.pid_ns,
        net_ns: p.net.own_namespace(),
        net_join: cfg.egress.map(|e| e.netns),
        uts_ns: p.uts_ns,
        cwd: path_c(&cwd)?,
        landlock,
        seccomp,
        exec_listener,
        exe,
        _strings: [argv, envp],
        argv_ptrs,
        envp_ptrs,
        tty: cfg.tty,
    })
}

/// Reads a child's fixed-size message from a pipe: until `buf` is full, the pipe ends
/// (the writer exited or exec'd) or it fails. Returns the bytes read.
fn read_message(fd: libc::c_int, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match sys::read_raw(fd, &mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

/// Opens a cgroup file for writing (close-on-exec).
fn open_for_write(path: &Path) -> io::Result<OwnedFd> {
    std::fs::OpenOptions::new().write(true).open(path).map(OwnedFd::from)
}

/// Checks `program` is a runnable file before anything is set up.
pub fn check_program(program: &Path) -> Result<(), LaunchError> {
    let name = program.display().to_string();
    match program.metadata() {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(LaunchError::NotExecutable { program: name }),
        Err(_) => Err(LaunchError::NotFound { program: name }),
    }
}

/// Starts the jail. Returns once the agent has exec'd (or the setup failed and
/// nothing ran).
pub fn launch(cfg: &JailConfig, enforcement: &Enforcement) -> Result<JailProcess, LaunchError> {
    launch_with_cgroups(cfg, enforcement, &[])
}

/// [`launch`], also creating, limiting and joining the v1 cgroups planned by
/// [`crate::AgentCgroup::apply_limits_deferred`] (hybrid hosts) after the clone, while
/// the jail builds its root; the agent starts only once all are joined.
pub fn launch_with_cgroups(
    cfg: &JailConfig,
    enforcement: &Enforcement,
    cgroup_v1: &[V1Cgroup],
) -> Result<JailProcess, LaunchError> {
    check_program(&cfg.program)?;
    let mut plan = build_plan(cfg, enforcement)?;
    // Every v1 `cgroup.procs` once: an AgentCgroup's `procs_paths` lists the planned ones too.
    for v1 in cgroup_v1 {
        let procs = v1.procs();
        if !plan.cgroup_v1_procs.contains(&procs) {
            plan.cgroup_v1_procs.push(procs);
        }
    }
    plan.cgroup_v1_create = cgroup_v1.to_vec();
    // The children inherit these; the parent's copies close when they drop (a child
    // never comes back here: it execs or exits).
    let pipe = || sys::pipe_cloexec().map(|(r, w)| (sys::owned(r), sys::owned(w))).map_err(LaunchError::Clone);
    let (report_r, report_w) = pipe()?;
    let (go_r, go_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    plan.status = status_w.as_raw_fd();
    let mut inherited = Vec::new();
    if let Some(procs) = &plan.cgroup_v2_procs {
        let join = open_for_write(procs)
            .map_err(|source| LaunchError::Setup { stage: format!("opening {}", procs.display()), source })?;
        plan.cgroup_v2_join = Some(join.as_raw_fd());
        inherited.push(join);
    }
    // Best effort: an init that cannot leave a v1 cgroup stays in it until its exit, and
    // removing that cgroup then waits for the exit.
    for procs in &plan.cgroup_v1_procs {
        if let Some(leave) = cgroup::hierarchy_procs(procs).and_then(|root| open_for_write(&root).ok()) {
            plan.cgroup_v1_leave.push(leave.as_raw_fd());
            inherited.push(leave);
        }
    }
    // The init is born outside the agent's cgroups (see the module docs).
    let pid = match sys::clone_process(plan.clone_flags) {
        Ok(0) => {
            sys::close(go_w.as_raw_fd());
            child_init(&plan, report_w.as_raw_fd(), go_r.as_raw_fd())
        }
        Ok(pid) => pid,
        Err(e) => return Err(LaunchError::Clone(e)),
    };
    drop((report_w, go_r, status_w, inherited));
    // The v1 hierarchies (hybrid hosts): the parent creates the agent's v1 cgroups,
    // writes their limits and moves the init in while it builds its root (the two
    // overlap); the init forks the agent, which inherits them, only after the go byte.
    let joined =
        plan.cgroup_v1_create.iter().try_for_each(|v1| v1.create().map_err(LaunchError::from)).and_then(|()| {
            plan.cgroup_v1_procs.iter().try_for_each(|procs| {
                std::fs::write(procs, pid.to_string())
                    .map_err(|source| LaunchError::Setup { stage: format!("joining {}", procs.display()), source })
            })
        });
    if let Err(err) = joined {
        let _ = sys::kill(pid, libc::SIGKILL);
        let _ = sys::waitpid(pid, false);
        return Err(err);
    }
    let _ = sys::write_all_raw(go_w.as_raw_fd(), b"g");
    drop(go_w);
    let mut buf = [0u8; 12];
    let got = read_message(report_r.as_raw_fd(), &mut buf);
    drop(report_r);
    if got == 0 {
        return Ok(JailProcess { pid, status: status_r, wait_for_init: plan.cgroup_v2_procs.is_none() });
    }
    // The child failed and exits; reap it so nothing is left behind.
    let _ = sys::waitpid(pid, false);
    let word = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let (stage, index, errno) = (word(0), word(4) as usize, word(8) as i32);
    let source = io::Error::from_raw_os_error(errno);
    let program = program_name(cfg);
    if stage == Stage::Exec as u32 {
        return Err(match errno {
            libc::ENOENT => LaunchError::NotFound { program },
            libc::EACCES | libc::EPERM => LaunchError::NotExecutable { program },
            _ => LaunchError::Setup { stage: "exec".into(), source },
        });
    }
    let mut stage_name = stage_name(stage).to_string();
    if stage == Stage::Mount as u32 {
        if let Some(op) = plan.op_names.get(index) {
            stage_name = format!("mount step {op}");
        }
    }
    if stage == Stage::Landlock as u32 {
        if let Some(l) = &plan.landlock {
            if let Some((path, _)) = l.paths.get(index) {
                stage_name = format!("landlock rule for {}", path.to_string_lossy());
            }
        }
    }
    Err(LaunchError::Setup { stage: stage_name, source })
}

#[derive(Clone, Copy)]
#[repr(u32)]
enum Stage {
    UserMap = 1,
    JoinCgroup,
    CgroupNs,
    Mount,
    Pivot,
    Hostname,
    Loopback,
    Fork,
    Session,
    Chdir,
    Capabilities,
    Rlimits,
    NoNewPrivs,
    Landlock,
    Seccomp,
    Exec,
}

fn stage_name(stage: u32) -> &'static str {
    const NAMES: [&str; 17] = [
        "?",
        "user namespace mapping",
        "joining the agent cgroup",
        "cgroup namespace",
        "mount",
        "pivot_root",
        "hostname",
        "loopback",
        "fork",
        "session/terminal",
        "chdir",
        "dropping capabilities",
        "rlimits",
        "no_new_privs",
        "landlock",
        "seccomp",
        "exec",
    ];
    NAMES.get(stage as usize).copied().unwrap_or("?")
}

// ---------------------------------------------------------------------------
// Child side: only system calls on prepared data from here on.

fn fail(report: libc::c_int, stage: Stage, index: usize, err: &io::Error, code: libc::c_int) -> ! {
    let mut buf = [0u8; 12];
    buf[..4].copy_from_slice(&(stage as u32).to_ne_bytes());
    buf[4..8].copy_from_slice(&(index as u32).to_ne_bytes());
    buf[8..].copy_from_slice(&err.raw_os_error().unwrap_or(libc::EIO).to_ne_bytes());
    let _ = sys::write_all_raw(report, &buf);
    sys::exit_now(code)
}

macro_rules! step {
    ($report:expr, $stage:expr, $index:expr, $e:expr) => {
        if let Err(err) = $e {
            fail($report, $stage, $index, &err, 125);
        }
    };
}

const C_ROOT: &std::ffi::CStr = c"/";
const C_DOT: &std::ffi::CStr = c".";
const C_TMP: &std::ffi::CStr = c"/tmp";
const C_TMPFS: &std::ffi::CStr = c"tmpfs";
const C_NEWROOT: &std::ffi::CStr = c"/newroot";
const C_OLDROOT_REL: &std::ffi::CStr = c"/tmp/oldroot";
const C_EMPTY: &std::ffi::CStr = c"/.agt-jail-empty";
const C_PROC: &std::ffi::CStr = c"proc";
const C_DEVPTS: &std::ffi::CStr = c"devpts";
const C_PTS_OPTS: &std::ffi::CStr = c"newinstance,ptmxmode=0666,mode=620";
const C_HIDE_OPTS: &std::ffi::CStr = c"mode=000,size=4k";
const C_ROOT_OPTS: &std::ffi::CStr = c"mode=0755";
const C_MEMFD_NOEXEC: &std::ffi::CStr = c"/newroot/proc/sys/vm/memfd_noexec";
const C_SETGROUPS: &std::ffi::CStr = c"/proc/self/setgroups";
const C_UID_MAP: &std::ffi::CStr = c"/proc/self/uid_map";
const C_GID_MAP: &std::ffi::CStr = c"/proc/self/gid_map";

/// Signals the jail's init forwards to the agent's process group.
const FORWARDED: [libc::c_int; 7] =
    [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGWINCH];

fn child_init(plan: &Plan, report: libc::c_int, go: libc::c_int) -> ! {
    // Handlers first: pid 1 drops signals it has no handler for.
    step!(report, Stage::Session, 0, sys::install_forwarding_handlers(&FORWARDED));
    // Die with agt-jail: if the supervisor is killed, the jail goes too.
    step!(report, Stage::Session, 1, sys::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0));
    // Allowlist egress: the namespace agt-jail made, with the agent's end of the veth in it.
    if let Some(netns) = plan.net_join {
        step!(report, Stage::Loopback, 1, sys::setns_net_raw(netns));
    }
    if plan.rootless {
        step!(report, Stage::UserMap, 0, sys::write_file(C_SETGROUPS, b"deny"));
        step!(report, Stage::UserMap, 1, sys::write_file(C_UID_MAP, &plan.uid_map));
        step!(report, Stage::UserMap, 2, sys::write_file(C_GID_MAP, &plan.gid_map));
    }
    build_root(plan, report);
    if plan.uts_ns {
        step!(report, Stage::Hostname, 0, sys::sethostname(b"agt-jail"));
    }
    if plan.net_ns {
        step!(report, Stage::Loopback, 0, sys::loopback_up());
    }
    // Wait until the parent has moved us into every v1 hierarchy, which the agent
    // inherits: no agent code runs outside the agent's cgroups. EOF without the byte
    // means the parent gave up.
    let mut byte = [0u8; 1];
    match sys::read_raw(go, &mut byte) {
        Ok(1) => {}
        Ok(_) => fail(report, Stage::JoinCgroup, 1, &io::Error::from_raw_os_error(libc::ECANCELED), 125),
        Err(err) => fail(report, Stage::JoinCgroup, 1, &err, 125),
    }
    sys::close(go);
    // The init's memory holds agt-jail's environment: keep it out of reach.
    step!(report, Stage::Session, 2, sys::prctl(libc::PR_SET_DUMPABLE, 0, 0));
    let agent = match fork_agent(plan) {
        Ok((0, in_v2)) => child_agent(plan, report, in_v2),
        Ok((pid, _)) => pid,
        Err(err) => fail(report, Stage::Fork, 0, &err, 125),
    };
    sys::close(report);
    // Only the agent sends the exec listener: the init keeps no copy of the socket.
    if let Some((_, socket)) = &plan.exec_listener {
        sys::close(*socket);
    }
    // The agent holds the v1 cgroups now; the init leaves them while the agent sets
    // itself up, so that they are empty the moment the agent's processes are gone.
    for leave in &plan.cgroup_v1_leave {
        let _ = sys::write_all_raw(*leave, b"0");
        sys::close(*leave);
    }
    if let Some(join) = plan.cgroup_v2_join {
        sys::close(join);
    }
    // The init itself needs no privilege from here on.
    let _ = drop_privileges();
    init_loop(agent, plan.status)
}

/// Forks the agent, born in the agent's v2 cgroup when the kernel can (clone3 with
/// CLONE_INTO_CGROUP, Linux 5.7+); otherwise it joins through `cgroup_v2_join` itself.
/// Returns (pid, born in the v2 cgroup). Child-safe.
fn fork_agent(plan: &Plan) -> io::Result<(libc::pid_t, bool)> {
    let plain = libc::SIGCHLD as libc::c_ulong;
    match plan.cgroup_dir {
        Some(dir) => match sys::clone3_process(0, Some(dir)) {
            Ok(pid) => Ok((pid, true)),
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL | libc::EOPNOTSUPP)) =>
            {
                sys::clone_process(plain).map(|pid| (pid, false))
            }
            Err(e) => Err(e),
        },
        None => sys::clone_process(plain).map(|pid| (pid, false)),
    }
}

fn build_root(plan: &Plan, report: libc::c_int) {
    step!(report, Stage::Mount, usize::MAX, sys::mount(None, C_ROOT, None, libc::MS_REC | libc::MS_PRIVATE, None));
    // A scratch tmpfs becomes the root for a moment: the old root is parked in it and
    // the view is built beside it (see the module docs of `mounts`).
    step!(
        report,
        Stage::Pivot,
        0,
        sys::mount(Some(C_TMPFS), C_TMP, Some(C_TMPFS), libc::MS_NOSUID | libc::MS_NODEV, Some(C_ROOT_OPTS))
    );
    step!(report, Stage::Pivot, 1, sys::mkdir(C_OLDROOT_REL, 0o755));
    step!(report, Stage::Pivot, 2, sys::pivot_root(C_TMP, C_OLDROOT_REL));
    step!(report, Stage::Pivot, 3, sys::chdir(C_ROOT));
    step!(report, Stage::Pivot, 4, sys::mkdir(C_NEWROOT, 0o755));
    step!(
        report,
        Stage::Pivot,
        5,
        sys::mount(Some(C_TMPFS), C_NEWROOT, Some(C_TMPFS), libc::MS_NOSUID | libc::MS_NODEV, Some(C_ROOT_OPTS))
    );
    step!(report, Stage::Pivot, 6, sys::touch(C_EMPTY, 0));
    for (i, op) in plan.ops.iter().enumerate() {
        let result = match op {
            COp::Mkdir(p) => sys::mkdir(p, 0o755),
            COp::Touch(p) => sys::touch(p, 0o644),
            COp::Bind(src, dst) => sys::mount(Some(src), dst, None, libc::MS_BIND | libc::MS_REC, None),
            COp::RemountRo(dst) => sys::mount_flags_of(dst).and_then(|flags| {
                let flags =
                    flags | libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
                sys::mount(None, dst, None, flags, None)
            }),
            COp::RemountNoexec(dst, readonly) => sys::mount_flags_of(dst).and_then(|flags| {
                let mut flags =
                    flags | libc::MS_BIND | libc::MS_REMOUNT | libc::MS_NOEXEC | libc::MS_NOSUID | libc::MS_NODEV;
                if *readonly {
                    flags |= libc::MS_RDONLY;
                }
                sys::mount(None, dst, None, flags, None)
            }),
            COp::Tmpfs(dst, options, flags) => sys::mount(Some(C_TMPFS), dst, Some(C_TMPFS), *flags, Some(options)),
            COp::Proc(dst) => {
                let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                let mounted = sys::mount(Some(C_PROC), dst, Some(C_PROC), flags, None);
                if mounted.is_ok() && plan.memfd_noexec {
                    // vm.memfd_noexec=2 in the jail's pid namespace: no executable memfds
                    // at all (Linux 6.3+; older kernels lack the file and rely on seccomp).
                    // Written now, before /proc/sys becomes read-only.
                    let _ = sys::write_file(C_MEMFD_NOEXEC, b"2");
                }
                mounted
            }
            COp::Devpts(dst) => {
                sys::mount(Some(C_DEVPTS), dst, Some(C_DEVPTS), libc::MS_NOSUID | libc::MS_NOEXEC, Some(C_PTS_OPTS))
            }
            COp::Symlink(target, link) => sys::symlink(target, link),
            COp::HideFile(dst) => sys::mount(Some(C_EMPTY), dst, None, libc::MS_BIND, None),
            COp::HideDir(dst) => sys::mount(
                Some(C_TMPFS),
                dst,
                Some(C_TMPFS),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
                Some(C_HIDE_OPTS),
            ),
        };
        // A devpts instance can be refused in some user namespaces; the jail then
        // simply has no /dev/pts (a --tty still works through the inherited fd).
        if let (Err(err), false) = (&result, matches!(op, COp::Devpts(_))) {
            fail(report, Stage::Mount, i, err, 125);
        }
    }
    // No separate unmount of /oldroot: detaching the scratch root below (lazily, with
    // everything mounted in it) takes the old root along. Each unmount waits for an
    // expedited RCU grace period, so one is cheaper than two.
    step!(report, Stage::Pivot, 8, sys::chdir(C_NEWROOT));
    step!(report, Stage::Pivot, 9, sys::pivot_root(C_DOT, C_DOT));
    step!(report, Stage::Pivot, 10, sys::umount2(C_DOT, libc::MNT_DETACH));
    step!(report, Stage::Pivot, 11, sys::chdir(C_ROOT));
    // The view's own root: read-only, so nothing new appears beside the mounts.
    step!(
        report,
        Stage::Pivot,
        12,
        sys::mount_flags_of(C_ROOT).and_then(|flags| {
            sys::mount(None, C_ROOT, None, flags | libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY, None)
        })
    );
}

/// Securebits so uid 0 never regains capabilities, then empty bounding, ambient,
/// effective, permitted and inheritable sets.
fn drop_privileges() -> io::Result<()> {
    const SECBIT_NOROOT: libc::c_ulong = 1 << 0;
    const SECBIT_NOROOT_LOCKED: libc::c_ulong = 1 << 1;
    const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;
    const SECBIT_NO_SETUID_FIXUP_LOCKED: libc::c_ulong = 1 << 3;
    const SECBIT_KEEP_CAPS_LOCKED: libc::c_ulong = 1 << 5;
    const SECBIT_NO_CAP_AMBIENT_RAISE: libc::c_ulong = 1 << 6;
    const SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED: libc::c_ulong = 1 << 7;
    let bits = SECBIT_NOROOT
        | SECBIT_NOROOT_LOCKED
        | SECBIT_NO_SETUID_FIXUP
        | SECBIT_NO_SETUID_FIXUP_LOCKED
        | SECBIT_KEEP_CAPS_LOCKED
        | SECBIT_NO_CAP_AMBIENT_RAISE
        | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
    sys::prctl(libc::PR_SET_SECUREBITS, bits, 0)?;
    for cap in 0..64 {
        match sys::prctl(libc::PR_CAPBSET_DROP, cap, 0) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => break,
            Err(e) => return Err(e),
        }
    }
    sys::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong, 0)?;
    sys::clear_capabilities()
}

fn apply_landlock(l: &LandlockChild, report: libc::c_int) {
    let plan = &l.plan;
    let ruleset = match sys::landlock_create_ruleset(plan.handled_fs, plan.handled_net, plan.scoped, plan.abi) {
        Ok(fd) => fd,
        Err(err) => fail(report, Stage::Landlock, usize::MAX, &err, 125),
    };
    for (i, (path, access)) in l.paths.iter().enumerate() {
        let fd = match sys::open(path, libc::O_PATH) {
            Ok(fd) => fd,
            // A profile path this host lacks (e.g. /lib32) grants nothing.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(err) => fail(report, Stage::Landlock, i, &err, 125),
        };
        let access = match sys::fd_is_dir(fd) {
            Ok(true) => *access,
            Ok(false) => *access & landlock::fs::FILE_ONLY,
            Err(err) => fail(report, Stage::Landlock, i, &err, 125),
        };
        step!(report, Stage::Landlock, i, sys::landlock_add_path_rule(ruleset, access, fd));
        sys::close(fd);
    }
    for (i, (access, port)) in plan.ports.iter().enumerate() {
        step!(report, Stage::Landlock, l.paths.len() + i, sys::landlock_add_port_rule(ruleset, *access, *port));
    }
    step!(report, Stage::Landlock, usize::MAX, sys::landlock_restrict_self(ruleset));
    sys::close(ruleset);
}

fn child_agent(plan: &Plan, report: libc::c_int, in_v2: bool) -> ! {
    if let (Some(join), false) = (plan.cgroup_v2_join, in_v2) {
        step!(report, Stage::JoinCgroup, 0, sys::write_all_raw(join, b"0"));
    }
    // The cgroup namespace is rooted at the agent's cgroups, which it is in from birth.
    if plan.cgroup_ns {
        step!(report, Stage::CgroupNs, 0, sys::unshare(libc::CLONE_NEWCGROUP));
    }
    step!(report, Stage::Session, 3, sys::setsid());
    if let Some(tty) = plan.tty {
        for fd in 0..3 {
            step!(report, Stage::Session, 4, sys::dup2(tty, fd));
        }
        step!(report, Stage::Session, 5, sys::set_controlling_tty(0));
    }
    step!(report, Stage::Chdir, 0, sys::chdir(&plan.cwd));
    step!(report, Stage::Capabilities, 0, drop_privileges());
    step!(report, Stage::Rlimits, 0, sys::setrlimit(libc::RLIMIT_CORE, 0, 0));
    // Landlock without CAP_SYS_ADMIN needs no_new_privs first; it is also what keeps
    // setuid binaries from gaining anything.
    step!(report, Stage::NoNewPrivs, 0, sys::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0));
    if let Some(l) = &plan.landlock {
        apply_landlock(l, report);
    }
    sys::reset_signals();
    step!(report, Stage::Exec, 1, sys::cloexec_from(3));
    if let Some(filter) = &plan.seccomp {
        step!(report, Stage::Seccomp, 0, sys::seccomp_set_filter(filter));
    }
    // The exec listener, last: from here every execve/execveat waits for the supervisor,
    // this one first. The listener fd leaves the agent before it runs anything.
    if let Some((filter, socket)) = &plan.exec_listener {
        let listener = match sys::seccomp_set_filter_listener(filter) {
            Ok(fd) => fd,
            Err(err) => fail(report, Stage::Seccomp, 1, &err, 125),
        };
        step!(report, Stage::Seccomp, 2, sys::send_fd(*socket, listener));
        sys::close(listener);
        sys::close(*socket);
    }
    let err = sys::execve(&plan.exe, &plan.argv_ptrs, &plan.envp_ptrs);
    let code = match err.raw_os_error() {
        Some(libc::ENOENT) => 127,
        Some(libc::EACCES) => 126,
        _ => 125,
    };
    fail(report, Stage::Exec, 0, &err, code)
}

/// pid 1 of the jail: forward signals to the agent's process group, reap every child,
/// and once the agent is gone, send its status to the parent and leave with it (the
/// kernel then kills whatever is left in the pid namespace).
fn init_loop(agent: libc::pid_t, status_pipe: libc::c_int) -> ! {
    // The forwarded signals and SIGCHLD stay blocked except inside `wait_for_signal`,
    // which unblocks them atomically: a signal that arrives while the init is busy (say,
    // before it first waits, on a loaded machine) stays pending and ends the next wait
    // instead of being recorded by a handler and left unforwarded.
    let mut watched = [0; FORWARDED.len() + 1];
    watched[..FORWARDED.len()].copy_from_slice(&FORWARDED);
    watched[FORWARDED.len()] = libc::SIGCHLD;
    if sys::install_forwarding_handlers(&[libc::SIGCHLD]).is_err() || sys::block_signals(&watched).is_err() {
        sys::exit_now(125);
    }
    loop {
        loop {
            match sys::reap_one() {
                Ok(Some((pid, status))) if pid == agent => {
                    let code = if libc::WIFEXITED(status) {
                        libc::WEXITSTATUS(status)
                    } else if libc::WIFSIGNALED(status) {
                        128 + libc::WTERMSIG(status)
                    } else {
                        125
                    };
                    let _ = sys::write_all_raw(status_pipe, &code.to_ne_bytes());
                    sys::exit_now(code);
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
                Err(_) => sys::exit_now(125),
            }
        }
        let pending = sys::take_pending_signals();
        for signal in FORWARDED {
            if pending & (1u64 << signal) != 0 {
                let _ = sys::kill(-agent, signal);
            }
        }
        sys::wait_for_signal();
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn without_memfd_noexec_the_confined_rings_refuse_memfd_create() {
        let has = |plan: &Plan| plan.seccomp.as_ref().map(Vec::len);
        let with = build_plan(
            &config(2),
            &Enforcement { landlock_abi: 7, unenforced: vec![], memfd_noexec: true, entry_exec_plane: false },
        );
        let without = build_plan(
            &config(2),
            &Enforcement { landlock_abi: 2, unenforced: vec![], memfd_noexec: false, entry_exec_plane: false },
        );
        let (with, without) = (with.unwrap(), without.unwrap());
        // One more rule: memfd_create → EPERM (its effect is tested in the seccomp module).
        assert!(has(&without) > has(&with), "{:?} vs {:?}", has(&without), has(&with));
    }

    #[test]
    fn finds_the_dynamic_loader_and_script_interpreters() {
        let sh = interpreters(Path::new("/bin/sh"));
        assert!(sh.iter().any(|p| p.to_string_lossy().contains("ld-")), "{sh:?}");
        let tmp = tempfile::tempdir().unwrap();
        let script = tmp.path().join("s");
        std::fs::write(&script, "#!/bin/sh -e\necho hi\n").unwrap();
        let found = interpreters(&script);
        assert_eq!(found[0], PathBuf::from("/bin/sh"));
        assert!(found.len() >= 2);
        std::fs::write(&script, "plain text").unwrap();
        assert!(interpreters(&script).is_empty());
    }

    #[test]
    fn resolv_conf_is_bound_at_the_end_of_its_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc");
        let run = dir.path().join("run/systemd/resolve");
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::create_dir_all(&run).unwrap();
        // Relative, via a second link, and the end need not exist.
        std::os::unix::fs::symlink("../run/systemd/resolve/stub-resolv.conf", etc.join("resolv.conf")).unwrap();
        std::os::unix::fs::symlink("missing.conf", run.join("stub-resolv.conf")).unwrap();
        assert_eq!(resolv_conf_target(&etc.join("resolv.conf")), run.join("missing.conf"));
        std::fs::write(etc.join("plain"), "nameserver 192.0.2.1\n").unwrap();
        assert_eq!(resolv_conf_target(&etc.join("plain")), etc.join("plain"));
        // A loop stops after 8 links instead of spinning.
        std::os::unix::fs::symlink("b", etc.join("a")).unwrap();
        std::os::unix::fs::symlink("a", etc.join("b")).unwrap();
        let end = resolv_conf_target(&etc.join("a"));
        assert!(end == etc.join("a") || end == etc.join("b"), "{end:?}");
    }

    fn config(ring: u8) -> JailConfig {
        JailConfig {
            profile: Profile::builtin(ring).unwrap(),
            program: "/bin/true".into(),
            argv: vec!["true".into()],
            env: vec![],
            workspace: None,
            allow_exec: vec![],
            cgroup_procs: vec![],
            cgroup_dir: None,
            home: None,
            rootless: false,
            tty: None,
            tty_path: None,
            exec_notify: None,
            egress: None,
            resolv_conf: None,
        }
    }

    #[test]
    fn ring3_plan_allows_exec_of_the_entry_only() {
        let plan = build_plan(
            &config(3),
            &Enforcement { landlock_abi: 7, unenforced: vec![], memfd_noexec: true, entry_exec_plane: false },
        )
        .unwrap();
        let l = plan.landlock.unwrap();
        let execs: Vec<_> = l
            .paths
            .iter()
            .filter(|(_, a)| a & landlock::fs::EXECUTE != 0)
            .map(|(p, _)| p.to_string_lossy().into_owned())
            .collect();
        assert!(execs.contains(&"/bin/true".to_string()), "{execs:?}");
        assert!(!execs.contains(&"/usr".to_string()), "{execs:?}");
        assert_ne!(plan.clone_flags & libc::CLONE_NEWNET as libc::c_ulong, 0);
        assert_eq!(l.plan.handled_net, 0, "its own loopback is not narrowed to ports");
        assert!(plan.seccomp.is_some());
    }

    #[test]
    fn ring2_plan_execs_system_in_a_network_namespace_of_its_own() {
        let plan = build_plan(
            &config(2),
            &Enforcement { landlock_abi: 7, unenforced: vec![], memfd_noexec: true, entry_exec_plane: false },
        )
        .unwrap();
        assert_ne!(plan.clone_flags & libc::CLONE_NEWNET as libc::c_ulong, 0);
        assert!(plan.net_ns, "lo comes up in the jail's init");
        let l = plan.landlock.unwrap();
        assert!(l.paths.iter().any(|(p, a)| p.as_bytes() == b"/usr" && a & landlock::fs::EXECUTE != 0));
        assert!(l.paths.iter().any(|(p, a)| p.as_bytes() == b"/tmp" && a & landlock::fs::WRITE_FILE != 0));
    }

    /// The paths a plan lets the agent execute.
    fn executable(plan: &Plan) -> Vec<String> {
        let l = plan.landlock.as_ref().unwrap();
        l.paths
            .iter()
            .filter(|(_, a)| a & landlock::fs::EXECUTE != 0)
            .map(|(p, _)| p.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn rings_1_and_2_execute_the_workspace_and_rw_paths_but_not_tmp() {
        let ws = tempfile::tempdir().unwrap();
        let extra = tempfile::tempdir().unwrap();
        let (ws_path, extra_path) = (ws.path().display().to_string(), extra.path().display().to_string());
        for ring in [1, 2] {
            let mut cfg = config(ring);
            cfg.workspace = Some(ws.path().to_path_buf());
            cfg.profile.rw.push(extra.path().to_path_buf());
            let abi7 = Enforcement { landlock_abi: 7, unenforced: vec![], memfd_noexec: true, entry_exec_plane: false };
            let execs = executable(&build_plan(&cfg, &abi7).unwrap());
            assert!(execs.contains(&ws_path) && execs.contains(&extra_path), "ring {ring}: {execs:?}");
            assert!(execs.contains(&"/usr".to_string()), "ring {ring}: {execs:?}");
            for private in ["/tmp", "/dev/shm"] {
                assert!(!execs.contains(&private.to_string()), "ring {ring}: {execs:?}");
            }
            // A profile with exec.workspace: false keeps exec to the system paths.
            cfg.profile.exec_workspace = false;
            let execs = executable(&build_plan(&cfg, &abi7).unwrap());
            assert!(!execs.contains(&ws_path) && !execs.contains(&extra_path), "ring {ring}: {execs:?}");
            assert!(execs.contains(&"/usr".to_string()), "ring {ring}: {execs:?}");
        }
        // Ring 3: the workspace shown beside the scratch one stays non-executable.
        let mut cfg = config(3);
        cfg.workspace = Some(ws.path().to_path_buf());
        let execs = executable(
            &build_plan(
                &cfg,
                &Enforcement { landlock_abi: 7, unenforced: vec![], memfd_noexec: true, entry_exec_plane: false },
            )
            .unwrap(),
        );
        assert!(!execs.contains(&ws_path) && !execs.contains(&mounts::SCRATCH.to_string()), "{execs:?}");
    }

    /// Without Landlock the mount view says what runs: the same paths as the EXECUTE rules.
    #[test]
    fn without_landlock_what_must_not_run_is_mounted_noexec() {
        let ws = tempfile::tempdir().unwrap();
        let ro = tempfile::tempdir().unwrap();
        let tool = ro.path().join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").unwrap();
        let none = Enforcement { landlock_abi: 0, unenforced: vec![], memfd_noexec: false, entry_exec_plane: false };
        let mut cfg = config(2);
        cfg.workspace = Some(ws.path().to_path_buf());
        cfg.profile.ro.push(ro.path().to_path_buf());
        cfg.allow_exec.push(tool.clone());
        let plan = build_plan(&cfg, &none).unwrap();
        assert!(plan.landlock.is_none());
        let step = |name: String| plan.op_names.contains(&name);
        let at = |path: &Path| format!("{}{}", mounts::NEWROOT, path.display());
        // The --ro path: read-only and noexec; the --allow-exec file in it: a bind of its own.
        assert!(step(format!("remount {} read-only and noexec", at(ro.path()))), "{:?}", plan.op_names);
        assert!(step(format!("bind {}{} on {}", mounts::OLDROOT, tool.display(), at(&tool))), "{:?}", plan.op_names);
        assert!(!step(format!("remount {} read-only and noexec", at(&tool))), "{:?}", plan.op_names);
        // System paths and the workspace run; /usr stays merely read-only.
        assert!(step(format!("remount {}/usr read-only", mounts::NEWROOT)), "{:?}", plan.op_names);
        assert!(!plan.op_names.iter().any(|op| op.contains(&at(ws.path())) && op.contains("noexec")));
        // The private /tmp is noexec.
        let tmp = ViewSpec { tmp_noexec: true, ..Default::default() }.plan();
        assert!(tmp.iter().any(|op| matches!(op, mounts::MountOp::Tmpfs { dst, flags, .. }
            if dst == Path::new("/newroot/tmp") && flags & libc::MS_NOEXEC != 0)));
        // exec.workspace: false: the workspace is noexec too.
        cfg.profile.exec_workspace = false;
        let plan = build_plan(&cfg, &none).unwrap();
        assert!(
            plan.op_names.iter().any(|op| *op == format!("remount {} noexec", at(ws.path()))),
            "{:?}",
            plan.op_names
        );
    }

    /// Ring 3 on the entry-only exec plane: the plane's listener is required, --allow-exec
    /// refused, and the system paths stay executable (shared libraries) in the view.
    #[test]
    fn the_entry_only_plane_needs_its_listener_and_keeps_system_paths_executable() {
        let plane = Enforcement { landlock_abi: 0, unenforced: vec![], memfd_noexec: false, entry_exec_plane: true };
        let mut cfg = config(3);
        let err = build_plan(&cfg, &plane).err().unwrap().to_string();
        assert!(err.contains("no exec listener"), "{err}");
        cfg.exec_notify = Some(-1);
        let plan = build_plan(&cfg, &plane).unwrap();
        assert!(plan.landlock.is_none());
        assert!(plan.op_names.contains(&format!("remount {}/usr read-only", mounts::NEWROOT)), "{:?}", plan.op_names);
        assert!(!plan.op_names.iter().any(|op| op.contains("/usr") && op.contains("noexec")), "{:?}", plan.op_names);
        cfg.allow_exec.push("/usr/bin/true".into());
        let err = build_plan(&cfg, &plane).err().unwrap().to_string();
        assert!(err.contains("--allow-exec /usr/bin/true"), "{err}");
    }

    #[test]
    fn without_landlock_ring_3_takes_the_entry_only_plane_and_rings_1_2_say_what_holds_instead() {
        let ring3 = Profile::builtin(3).unwrap();
        if sys::seccomp_notify_available() {
            let e = enforcement_at(&ring3, 0).unwrap();
            assert!(e.entry_exec_plane);
            assert!(e.unenforced.iter().any(|gap| gap.contains("entry-only exec plane")), "{:?}", e.unenforced);
            // More than the entry command would need a path check: refused, with the key named.
            let mut allow = ring3.clone();
            allow.exec_allow.push("/usr/bin/true".into());
            let err = enforcement_at(&allow, 0).unwrap_err().to_string();
            assert!(err.contains("exec.allow") && err.contains("raced"), "{err}");
        } else {
            let err = enforcement_at(&ring3, 0).unwrap_err().to_string();
            assert!(err.contains("seccomp user notification"), "{err}");
        }
        let with = enforcement_at(&ring3, 1).unwrap();
        assert!(!with.entry_exec_plane);
        for ring in [1, 2] {
            let e = enforcement_at(&Profile::builtin(ring).unwrap(), 0).unwrap();
            assert!(e.unenforced.iter().any(|gap| gap.contains("no Landlock on this kernel")), "{:?}", e.unenforced);
            let with = enforcement_at(&Profile::builtin(ring).unwrap(), 2).unwrap();
            assert!(!with.unenforced.iter().any(|gap| gap.contains("no Landlock")), "{:?}", with.unenforced);
            let mut insist = Profile::builtin(ring).unwrap();
            insist.landlock_required = true;
            assert!(enforcement_at(&insist, 0).unwrap_err().to_string().contains("landlock.required"));
            assert!(enforcement_at(&insist, 1).is_ok());
        }
    }

    #[test]
    fn workspace_exec_paths_follow_the_workspace_mode() {
        let mut ring2 = Profile::builtin(2).unwrap();
        ring2.rw.push("/srv/cache".into());
        let ws = Path::new("/home/u/proj");
        assert_eq!(workspace_exec_paths(&ring2, Some(ws)), [ws.to_path_buf(), "/srv/cache".into()]);
        assert_eq!(workspace_exec_paths(&ring2, None), [PathBuf::from("/srv/cache")]);
        ring2.workspace = WorkspaceMode::Scratch;
        assert_eq!(
            workspace_exec_paths(&ring2, Some(ws)),
            [PathBuf::from(mounts::SCRATCH), ws.to_path_buf(), "/srv/cache".into()]
        );
    }

    #[test]
    fn extra_paths_never_make_the_system_writable_or_hide_under_proc() {
        let ring2 = Profile::builtin(2).unwrap();
        for (path, writable, needle) in [
            ("/", true, "overlaps the system paths"),
            ("/usr", true, "overlaps the system paths"),
            ("/usr/share", true, "overlaps the system paths"),
            ("/sys", true, "never writable"),
            ("/sys/fs/cgroup", true, "never writable"),
            ("/proc", false, "its own /proc"),
            ("/proc/sys", true, "its own /proc"),
        ] {
            let err = check_extra_path(&ring2, Path::new(path), writable).unwrap_err().to_string();
            assert!(err.contains(needle) && err.contains(path), "{path}: {err}");
        }
        for (path, writable) in [("/usr", false), ("/sys", false), ("/tmp", true), ("/dev/null", true)] {
            assert!(check_extra_path(&ring2, Path::new(path), writable).is_ok(), "{path}");
        }
    }

    #[test]
    fn mount_steps_are_named_in_plain_words() {
        let op = MountOp::Touch("/newroot/dev/tty".into());
        assert_eq!(op.to_string(), "create /newroot/dev/tty");
        let op = MountOp::Bind { src: "/oldroot/usr".into(), dst: "/newroot/usr".into() };
        assert_eq!(op.to_string(), "bind /oldroot/usr on /newroot/usr");
    }

    #[test]
    fn a_workspace_over_system_paths_is_refused() {
        let mut cfg = config(2);
        cfg.workspace = Some("/".into());
        assert!(build_plan(&cfg, &Enforcement::default()).is_err());
        cfg.workspace = Some("/usr/share".into());
        assert!(build_plan(&cfg, &Enforcement::default()).is_err());
    }
}
