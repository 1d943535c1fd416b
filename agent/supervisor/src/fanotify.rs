//! File decisions on the synchronous path: fanotify permission events on the jail's mounts.
//!
//! [`FileGuard::start`] creates a fanotify group of class `FAN_CLASS_CONTENT` and puts a
//! `FAN_OPEN_PERM` mount mark on every mount of the jail's view that holds files. The
//! marks are added through `/proc/<jail_pid>/root/<mount point>`, so they sit on the jail's
//! own mount objects (its bind mounts, its tmpfs, the copies its mount namespace made):
//! a host process opening the same file through the host's mount is never held.
//!
//! Every open of a regular file through a marked mount blocks in the kernel until the
//! guard answers. The guard's thread turns the event into a [`Request`] (the path as the
//! agent sees it, the access the opener asked for, the file's identity) and hands it to the
//! [`Decider`] with a [`Reply`]; the reply writes `FAN_ALLOW` or `FAN_DENY` (EPERM for the
//! opener) and closes the event's fd. A reply dropped unanswered denies.
//!
//! **Path mapping.** `readlink(/proc/self/fd/<event fd>)` is computed by the kernel from
//! the guard's root, which the jail's mounts are not under: the string is not the agent's
//! path. The guard keeps, per marked mount, its mount id, its mount point as the jail sees
//! it (from `/proc/<jail_pid>/mountinfo`) and an `O_PATH` fd on the mount's root. For an
//! event it reads the mount id of the event fd (statx `STATX_MNT_ID`), finds that mount,
//! and strips the readlink of the mount's root fd from the readlink of the event fd: both
//! are built by the kernel walking up the same chain of mounts, so the remainder is the
//! path inside the mount. Jail path = mount point + remainder. A path that does not map
//! (unknown mount, prefix mismatch) is denied.
//!
//! **Access.** fanotify does not report the opener's flags. With `FAN_REPORT_TID` the event
//! names the blocked thread; `/proc/<tid>/syscall` gives the syscall number and its
//! argument registers as saved at syscall entry (the thread sleeps in the kernel, so they
//! are stable and no other thread can change them; the event can reach agt-jail a moment
//! before the thread is asleep, when the file reads "running", so it is read again for up
//! to ~2 ms). `open` (flags = arg 1), `openat` and
//! `open_by_handle_at` (arg 2) map `O_ACCMODE`, `O_TRUNC` and `O_CREAT` to [`FileAccess`];
//! `execve`/`execveat` (the kernel opening the program or its interpreter) are reads.
//! `openat2` keeps its flags in the agent's memory (`struct open_how`), which other threads
//! or processes sharing that memory can rewrite after the kernel copied it, so the value
//! read with `process_vm_readv` is used only when it asks for *more* than a read; a
//! read-only claim is not trusted and reported as [`FileAccess::ReadWrite`]. Anything else
//! (io_uring workers, unknown syscalls, a thread that is gone) is `ReadWrite`, the stricter.
//!
//! **Cache.** [`FileGuardHandle::allow_always`] adds an ignore mark for `FAN_OPEN_PERM` on
//! the inode of a pending event (marked through the event's own fd, never by path, so it
//! is the very file the decision was about). Later opens of that inode through any
//! marked mount are not held. The decider must call it only for files the policy allows
//! for every access; [`FileGuardHandle::forget_allowed`] drops all of them (policy reload).
//! Hard links do not make this weaker than path rules already are: an inode only gets the
//! mark after it was opened through a name whose every access is allowed, so whatever an
//! open through another name of the same inode gives the agent, it could already get
//! through the allowed name (read it, write it, copy it). Path rules cannot protect
//! content that has an allowed name.
use std::{
    collections::HashMap,
    ffi::CString,
    fs::File,
    io::{self, Read, Write},
    os::{
        fd::{AsFd, AsRawFd, OwnedFd},
        unix::fs::OpenOptionsExt,
    },
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard,
    },
    thread::JoinHandle,
};

use agt_jail_jail::cgroup::unescape_mount_path;

use crate::{sys::fanotify as sys, Answer, Decider, FileAccess, FileIdentity, Reply, Request, RequestKind};

/// The `plane` of every request this module makes.
pub const PLANE: &str = "fanotify";

/// Filesystem types whose mounts are not marked. They hold kernel interfaces, not files a
/// file rule is about: `proc` and `sysfs` are views of kernel state (a mark there would
/// hold every `/proc` read of the agent and of its runtime), `devpts` holds terminals
/// (opened by the jail's own stdio set-up), `mqueue` holds message queues (an IPC plane),
/// and `cgroup`/`cgroup2` are the resource controllers the jail is placed in. Access to
/// all of them is limited by the namespaces, capabilities and seccomp, not by file rules.
pub const SKIPPED_FSTYPES: &[&str] = &["proc", "sysfs", "devpts", "mqueue", "cgroup", "cgroup2"];

/// How long [`FileGuard::stop`] keeps denying events that were already under way when the
/// marks went (the kernel detaches marks lazily; events still queued when the group is
/// closed would be *allowed* by the kernel).
const STOP_QUIET_MS: i32 = 50;

/// Errors of the fanotify file plane.
#[derive(Debug, thiserror::Error)]
pub enum FanotifyError {
    /// The kernel has no fanotify permission events (CONFIG_FANOTIFY_ACCESS_PERMISSIONS) or
    /// refuses them to this process.
    #[error("fanotify permission events are unavailable: {0}")]
    Unavailable(#[source] io::Error),
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("malformed mountinfo line in {path}: {}", agt_jail_policy::quoted(.line))]
    Mountinfo { path: PathBuf, line: String },
    #[error("cannot mark mount {mount_point} ({fstype}, mount id {mnt_id}) of the jail: {source}")]
    Mark { mount_point: String, fstype: String, mnt_id: u64, source: io::Error },
    #[error("mount point {mount_point} of the jail resolves to mount id {found}, not any of {expected:?}")]
    MountMismatch { mount_point: String, found: u64, expected: Vec<u64> },
    #[error("the kernel does not report mount ids (statx STATX_MNT_ID) needed to map paths")]
    NoMountIds,
    #[error("marks of the fanotify group do not match the jail's mounts: marked {marked:?}, wanted {wanted:?}")]
    MarksMismatch { marked: Vec<u64>, wanted: Vec<u64> },
    #[error("fanotify marks remain after stop: {}", .0.join(", "))]
    MarksRemain(Vec<String>),
    #[error("no held open of file {dev}:{ino} (answered already, or not this thread's)")]
    NotPending { dev: u64, ino: u64 },
    #[error("the request is not a fanotify file request with a file identity")]
    NotAFileRequest,
    #[error("the file guard is stopped")]
    Stopped,
    #[error("cannot add an ignore mark for {dev}:{ino}: {source}")]
    IgnoreMark { dev: u64, ino: u64, source: io::Error },
    #[error("cannot flush ignore marks: {0}")]
    Flush(#[source] io::Error),
    #[error("cannot start the fanotify event thread: {0}")]
    Thread(#[source] io::Error),
    #[error("fanotify: {what}: {source}")]
    Io { what: &'static str, source: io::Error },
}

impl FanotifyError {
    /// Whether the error means the kernel cannot do this at all (a skip, not a bug).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, FanotifyError::Unavailable(_))
    }
}

/// Options of [`FileGuard::start`].
#[derive(Debug, Clone)]
pub struct FileGuardOptions {
    /// Filesystem types whose mounts are not marked (see [`SKIPPED_FSTYPES`]).
    pub skip_fstypes: Vec<String>,
}

impl Default for FileGuardOptions {
    fn default() -> Self {
        FileGuardOptions { skip_fstypes: SKIPPED_FSTYPES.iter().map(|s| s.to_string()).collect() }
    }
}

/// Whether this kernel gives this process fanotify permission events. Creates a group
/// and adds an *ignore* mark for `FAN_OPEN_PERM` (which validates the permission mask
/// without ever holding an opener), then closes it.
pub fn probe() -> Result<(), FanotifyError> {
    let group = sys::init(libc::FAN_CLASS_CONTENT | libc::FAN_CLOEXEC, (libc::O_RDONLY | libc::O_CLOEXEC) as u32)
        .map_err(FanotifyError::Unavailable)?;
    sys::mark(group.as_fd(), libc::FAN_MARK_ADD | libc::FAN_MARK_IGNORED_MASK, libc::FAN_OPEN_PERM, Some(c"/"))
        .map_err(FanotifyError::Unavailable)
}

/// One marked mount of the jail.
#[derive(Debug)]
struct JailMount {
    /// Where the jail sees it.
    mount_point: String,
    /// An `O_PATH` fd on the mount's root (through the jail's mount object).
    root: File,
}

/// A held open: the event's fd (needed to answer) and what identifies it.
#[derive(Debug)]
struct Pending {
    fd: OwnedFd,
    tid: u32,
    identity: Option<FileIdentity>,
}

#[derive(Debug)]
struct Shared {
    group: File,
    mounts: HashMap<u64, JailMount>,
    pending: Mutex<HashMap<u64, Pending>>,
    next_id: AtomicU64,
    stopped: AtomicBool,
    report_tid: bool,
    /// fanotify_mark flags that worked for ignore marks (0: not yet found).
    ignore_flags: AtomicU32,
    own_pid: u32,
}

impl Shared {
    fn lock_pending(&self) -> MutexGuard<'_, HashMap<u64, Pending>> {
        // A panic while holding the lock leaves the map consistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.pending.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes the response for `fd` and closes it.
    fn respond(&self, fd: OwnedFd, answer: Answer) {
        let response = match answer {
            Answer::Allow => libc::FAN_ALLOW,
            Answer::Deny => libc::FAN_DENY,
        };
        let mut bytes = [0u8; 8];
        bytes[..4].copy_from_slice(&fd.as_raw_fd().to_ne_bytes());
        bytes[4..].copy_from_slice(&response.to_ne_bytes());
        match (&self.group).write(&bytes) {
            Ok(8) => {}
            Ok(n) => agt_jail_jail::stderr_line!("agt-jail: fanotify: short response write ({n} of 8 bytes)"),
            // ENOENT: the opener is gone (killed while held); nothing left to answer.
            Err(err) if err.raw_os_error() == Some(libc::ENOENT) => {}
            Err(err) => agt_jail_jail::stderr_line!("agt-jail: fanotify: cannot answer a held open: {err}"),
        }
        drop(fd);
    }

    /// Answers pending event `id` unless it was already answered (by stop).
    fn finish(&self, id: u64, answer: Answer) {
        let entry = self.lock_pending().remove(&id);
        if let Some(entry) = entry {
            self.respond(entry.fd, answer);
        }
    }

    /// Denies every pending event.
    fn deny_all_pending(&self) {
        let drained: Vec<Pending> = self.lock_pending().drain().map(|(_, p)| p).collect();
        for pending in drained {
            self.respond(pending.fd, Answer::Deny);
        }
    }
}

/// A cloneable handle on a running guard, for the decider: the decision cache.
#[derive(Debug, Clone)]
pub struct FileGuardHandle {
    shared: Arc<Shared>,
}

impl FileGuardHandle {
    /// Stops holding opens of the file `request` is about: an ignore mark for
    /// `FAN_OPEN_PERM` on its inode, added through the held event's own fd (the exact
    /// file decided on, not a path looked up again). Call it *before* answering, and only
    /// when the policy allows every access to this file and the decision cannot change
    /// while the mark stands (drop all marks with [`forget_allowed`](Self::forget_allowed)
    /// when the policy changes). The mark survives modification of the file.
    pub fn allow_always(&self, request: &Request) -> Result<(), FanotifyError> {
        let identity = match (&request.kind, request.plane) {
            (RequestKind::File { identity: Some(identity), .. }, PLANE) => *identity,
            _ => return Err(FanotifyError::NotAFileRequest),
        };
        self.ignore_pending(identity, Some(request.tid))
    }

    /// [`allow_always`](Self::allow_always) by file identity alone (for callers that keep
    /// only the identity of the request they are deciding): the mark still goes through
    /// the fd of a held open of that very inode, so it must be called before answering.
    pub fn allow_always_identity(&self, identity: FileIdentity) -> Result<(), FanotifyError> {
        self.ignore_pending(identity, None)
    }

    fn ignore_pending(&self, identity: FileIdentity, tid: Option<u32>) -> Result<(), FanotifyError> {
        // Hold the lock while marking: stop() flushes marks under the same lock, so a
        // mark can never be added after the flush.
        let pending = self.shared.lock_pending();
        if self.shared.stopped.load(Ordering::SeqCst) {
            return Err(FanotifyError::Stopped);
        }
        let entry = pending
            .values()
            .find(|p| tid.is_none_or(|tid| p.tid == tid) && p.identity == Some(identity))
            .ok_or(FanotifyError::NotPending { dev: identity.dev, ino: identity.ino })?;
        let known = self.shared.ignore_flags.load(Ordering::SeqCst);
        let candidates: &[u32] = if known != 0 {
            &[known]
        } else {
            // Newest first: FAN_MARK_IGNORE (6.0) with an evictable mark (5.19; the kernel
            // may drop it under memory pressure, after which the file is simply asked
            // again), then the legacy ignored mask.
            &[
                libc::FAN_MARK_ADD | libc::FAN_MARK_IGNORE_SURV | libc::FAN_MARK_EVICTABLE,
                libc::FAN_MARK_ADD | libc::FAN_MARK_IGNORE_SURV,
                libc::FAN_MARK_ADD | libc::FAN_MARK_IGNORED_MASK | libc::FAN_MARK_IGNORED_SURV_MODIFY,
            ]
        };
        let mut last = None;
        for &flags in candidates {
            match sys::mark_fd(self.shared.group.as_fd(), flags, libc::FAN_OPEN_PERM, entry.fd.as_fd()) {
                Ok(()) => {
                    self.shared.ignore_flags.store(flags, Ordering::SeqCst);
                    return Ok(());
                }
                Err(err) if err.raw_os_error() == Some(libc::EINVAL) && known == 0 => last = Some(err),
                Err(err) => {
                    return Err(FanotifyError::IgnoreMark { dev: identity.dev, ino: identity.ino, source: err })
                }
            }
        }
        Err(FanotifyError::IgnoreMark {
            dev: identity.dev,
            ino: identity.ino,
            source: last.unwrap_or_else(|| io::Error::from_raw_os_error(libc::EINVAL)),
        })
    }

    /// Drops every [`allow_always`](Self::allow_always) mark: all files are asked again.
    pub fn forget_allowed(&self) -> Result<(), FanotifyError> {
        sys::mark(self.shared.group.as_fd(), libc::FAN_MARK_FLUSH, 0, None).map_err(FanotifyError::Flush)
    }

    /// How many opens are held waiting for an answer.
    pub fn pending(&self) -> usize {
        self.shared.lock_pending().len()
    }
}

/// The fanotify file plane of one jail. Stop it with [`stop`](Self::stop) (dropping it
/// stops it too): held opens are denied and every mark is removed.
#[derive(Debug)]
pub struct FileGuard {
    shared: Arc<Shared>,
    wake: Option<io::PipeWriter>,
    thread: Option<JoinHandle<()>>,
    marked: Vec<u64>,
}

impl FileGuard {
    /// Marks every file-holding mount of the jail whose init is `jail_pid` and starts
    /// answering its opens through `decider`. The jail's mounts must be complete and the
    /// agent must not have run yet.
    pub fn start(jail_pid: u32, decider: Arc<dyn Decider>, opts: FileGuardOptions) -> Result<FileGuard, FanotifyError> {
        Self::start_with(jail_pid, move |_| decider, opts)
    }

    /// Like [`start`](Self::start), for a decider that needs the guard's handle (to call
    /// [`FileGuardHandle::allow_always`]): `make_decider` gets it before any event.
    pub fn start_with(
        jail_pid: u32,
        make_decider: impl FnOnce(FileGuardHandle) -> Arc<dyn Decider>,
        opts: FileGuardOptions,
    ) -> Result<FileGuard, FanotifyError> {
        let base = libc::FAN_CLASS_CONTENT | libc::FAN_CLOEXEC | libc::FAN_UNLIMITED_QUEUE | libc::FAN_NONBLOCK;
        let event_flags = (libc::O_RDONLY | libc::O_LARGEFILE | libc::O_CLOEXEC) as u32;
        let (group, report_tid) = match sys::init(base | libc::FAN_REPORT_TID, event_flags) {
            Ok(fd) => (fd, true),
            // Kernels before 4.20 have no FAN_REPORT_TID: the event names the process
            // only, and the access is then unknown (ReadWrite).
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => {
                (sys::init(base, event_flags).map_err(FanotifyError::Unavailable)?, false)
            }
            Err(err) => return Err(FanotifyError::Unavailable(err)),
        };
        let group = File::from(group);

        let mountinfo_path = PathBuf::from(format!("/proc/{jail_pid}/mountinfo"));
        let text = std::fs::read_to_string(&mountinfo_path)
            .map_err(|source| FanotifyError::Read { path: mountinfo_path.clone(), source })?;
        let entries =
            parse_mountinfo(&text).map_err(|line| FanotifyError::Mountinfo { path: mountinfo_path.clone(), line })?;

        // Group the entries by mount point: several mounts stacked on one point leave only
        // the top one reachable by path, which is the one the jail's opens go through.
        let mut by_point: Vec<(String, Vec<&MountEntry>)> = Vec::new();
        for entry in entries.iter().filter(|e| !opts.skip_fstypes.contains(&e.fstype)) {
            match by_point.iter_mut().find(|(point, _)| *point == entry.mount_point) {
                Some((_, list)) => list.push(entry),
                None => by_point.push((entry.mount_point.clone(), vec![entry])),
            }
        }

        let mut mounts = HashMap::new();
        for (point, candidates) in by_point {
            let through = format!("/proc/{jail_pid}/root{}", if point == "/" { "" } else { point.as_str() });
            let root = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH)
                .open(&through)
                .map_err(|source| FanotifyError::Read { path: PathBuf::from(&through), source })?;
            let (_, _, mnt_id, _) = sys::statx_fd(root.as_fd())
                .map_err(|source| FanotifyError::Read { path: PathBuf::from(&through), source })?;
            let mnt_id = mnt_id.ok_or(FanotifyError::NoMountIds)?;
            let Some(entry) = candidates.iter().find(|e| e.mnt_id == mnt_id) else {
                // A mount of an unmarked type stacked on top hides these: no path reaches them.
                if entries.iter().any(|e| e.mnt_id == mnt_id && e.mount_point == point) {
                    continue;
                }
                return Err(FanotifyError::MountMismatch {
                    mount_point: point,
                    found: mnt_id,
                    expected: candidates.iter().map(|e| e.mnt_id).collect(),
                });
            };
            // Mark through the O_PATH fd's magic link: exactly the mount object it holds,
            // whether its root is a directory or a file bind mount.
            let link = CString::new(format!("/proc/self/fd/{}", root.as_raw_fd())).map_err(|_| FanotifyError::Io {
                what: "fd path",
                source: io::Error::from(io::ErrorKind::InvalidInput),
            })?;
            sys::mark(
                group.as_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_MOUNT,
                libc::FAN_OPEN_PERM,
                Some(link.as_c_str()),
            )
            .map_err(|source| FanotifyError::Mark {
                mount_point: point.clone(),
                fstype: entry.fstype.clone(),
                mnt_id,
                source,
            })?;
            mounts.insert(mnt_id, JailMount { mount_point: point, root });
        }

        // Check with the kernel that exactly these mounts carry our marks.
        let mut wanted: Vec<u64> = mounts.keys().copied().collect();
        wanted.sort_unstable();
        let mut marked = marked_mounts(&group)?;
        marked.sort_unstable();
        if marked != wanted {
            return Err(FanotifyError::MarksMismatch { marked, wanted });
        }

        let shared = Arc::new(Shared {
            group,
            mounts,
            pending: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            stopped: AtomicBool::new(false),
            report_tid,
            ignore_flags: AtomicU32::new(0),
            own_pid: std::process::id(),
        });
        let decider = make_decider(FileGuardHandle { shared: shared.clone() });
        let (wake_reader, wake) = io::pipe().map_err(|source| FanotifyError::Io { what: "pipe", source })?;
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fanotify-{jail_pid}"))
            .spawn(move || event_loop(&thread_shared, decider.as_ref(), &wake_reader))
            .map_err(FanotifyError::Thread)?;
        Ok(FileGuard { shared, wake: Some(wake), thread: Some(thread), marked })
    }

    /// The handle for the decider.
    pub fn handle(&self) -> FileGuardHandle {
        FileGuardHandle { shared: self.shared.clone() }
    }

    /// Mount ids of the jail's mounts that carry a mark.
    pub fn marked_mounts(&self) -> &[u64] {
        &self.marked
    }

    /// Stops the guard: removes every mark, denies every held open (also those a decider
    /// still holds a [`Reply`] for; answering those later does nothing) and checks with
    /// the kernel that no mark remains.
    pub fn stop(mut self) -> Result<(), FanotifyError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), FanotifyError> {
        let Some(wake) = self.wake.take() else { return Ok(()) };
        let flush_result = {
            let _pending = self.shared.lock_pending();
            self.shared.stopped.store(true, Ordering::SeqCst);
            let group = self.shared.group.as_fd();
            let mounts = sys::mark(group, libc::FAN_MARK_FLUSH | libc::FAN_MARK_MOUNT, 0, None);
            let inodes = sys::mark(group, libc::FAN_MARK_FLUSH, 0, None);
            mounts.and(inodes)
        };
        drop(wake); // the event loop sees the pipe close and returns
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                agt_jail_jail::stderr_line!("agt-jail: fanotify: the event thread panicked");
            }
        }
        // Events already under way when the marks went may still be queued: deny them
        // until the queue stays quiet (the kernel allows what is left at close).
        loop {
            match sys::poll_readable(&[self.shared.group.as_fd()], STOP_QUIET_MS) {
                Ok(ready) if ready.first() == Some(&true) => {
                    if !drain(&self.shared, &mut |_, fd, _| self.shared.respond(fd, Answer::Deny)) {
                        break;
                    }
                }
                Ok(_) => break,
                Err(err) => {
                    agt_jail_jail::stderr_line!("agt-jail: fanotify: poll while stopping: {err}");
                    break;
                }
            }
        }
        self.shared.deny_all_pending();
        flush_result.map_err(FanotifyError::Flush)?;
        let remaining = mark_lines(&self.shared.group)?;
        if !remaining.is_empty() {
            return Err(FanotifyError::MarksRemain(remaining));
        }
        Ok(())
    }
}

impl Drop for FileGuard {
    fn drop(&mut self) {
        if let Err(err) = self.shutdown() {
            agt_jail_jail::stderr_line!("agt-jail: fanotify: stopping the file guard: {err}");
        }
    }
}

/// Reads the `fanotify ...` mark lines of the group's fdinfo.
fn mark_lines(group: &File) -> Result<Vec<String>, FanotifyError> {
    let path = PathBuf::from(format!("/proc/self/fdinfo/{}", group.as_raw_fd()));
    let text = std::fs::read_to_string(&path).map_err(|source| FanotifyError::Read { path, source })?;
    Ok(text.lines().filter(|l| l.starts_with("fanotify ") && l.contains(" mflags:")).map(str::to_owned).collect())
}

/// Mount ids (hex in fdinfo) of the group's mount marks.
fn marked_mounts(group: &File) -> Result<Vec<u64>, FanotifyError> {
    Ok(mark_lines(group)?
        .iter()
        .filter_map(|line| {
            let field = line.split_whitespace().find_map(|f| f.strip_prefix("mnt_id:"))?;
            u64::from_str_radix(field, 16).ok()
        })
        .collect())
}

fn event_loop(shared: &Arc<Shared>, decider: &dyn Decider, wake: &io::PipeReader) {
    loop {
        let ready = match sys::poll_readable(&[shared.group.as_fd(), wake.as_fd()], -1) {
            Ok(ready) => ready,
            Err(err) => {
                // Without poll no event can be answered; stop() denies what is left.
                agt_jail_jail::stderr_line!("agt-jail: fanotify: poll failed, the file guard stops answering: {err}");
                return;
            }
        };
        if ready.get(1) == Some(&true) {
            return;
        }
        if ready.first() == Some(&true) {
            drain(shared, &mut |pid, fd, mask| handle_event(shared, decider, pid, fd, mask));
        }
    }
}

/// Reads every queued event and passes each fd-carrying one to `handle`. Returns whether
/// anything was read.
fn drain(shared: &Shared, handle: &mut dyn FnMut(u32, OwnedFd, u64)) -> bool {
    // Aligned for the 8-byte mask; room for many events per read.
    let mut buf = vec![0u64; 4096 / 8];
    let mut any = false;
    loop {
        let bytes: &mut [u8] = bytemuck_bytes(&mut buf);
        let n = match (&shared.group).read(bytes) {
            Ok(0) => return any,
            Ok(n) => n,
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => return any,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => {
                // E.g. EMFILE: the kernel could not install the event's fd and has
                // denied that permission event itself.
                agt_jail_jail::stderr_line!("agt-jail: fanotify: reading events: {err}");
                return any;
            }
        };
        any = true;
        let mut at = 0;
        while at + EVENT_HEADER_LEN <= n {
            let Some(event) = parse_event(&bytes[at..n]) else {
                agt_jail_jail::stderr_line!("agt-jail: fanotify: malformed event at byte {at} of {n}");
                break;
            };
            at += event.len.max(EVENT_HEADER_LEN);
            if event.vers != libc::FANOTIFY_METADATA_VERSION {
                agt_jail_jail::stderr_line!("agt-jail: fanotify: unexpected metadata version {}", event.vers);
            }
            if event.mask & libc::FAN_Q_OVERFLOW != 0 {
                // Impossible with FAN_UNLIMITED_QUEUE; events were lost, and lost
                // permission events are answered by nobody.
                agt_jail_jail::stderr_line!("agt-jail: fanotify: EVENT QUEUE OVERFLOW: events were lost");
            }
            if event.fd < 0 {
                continue;
            }
            // SAFETY: the kernel installed this fd for this event in this read; nothing
            // else has seen it.
            let fd = unsafe { sys::own_event_fd(event.fd) };
            handle(event.pid, fd, event.mask);
        }
    }
}

fn bytemuck_bytes(buf: &mut [u64]) -> &mut [u8] {
    let len = std::mem::size_of_val(buf);
    // SAFETY: u64 has no invalid bit patterns and no padding; the byte view covers
    // exactly the same memory and borrows it mutably for its lifetime.
    unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<u8>(), len) }
}

const EVENT_HEADER_LEN: usize = 24;

struct Event {
    len: usize,
    vers: u8,
    mask: u64,
    fd: i32,
    pid: u32,
}

/// Parses one `struct fanotify_event_metadata` (24 bytes, native endian).
fn parse_event(bytes: &[u8]) -> Option<Event> {
    let u32_at = |i: usize| bytes.get(i..i + 4).and_then(|b| b.try_into().ok()).map(u32::from_ne_bytes);
    let len = u32_at(0)? as usize;
    let vers = *bytes.get(4)?;
    let mask = bytes.get(8..16).and_then(|b| b.try_into().ok()).map(u64::from_ne_bytes)?;
    let fd = i32::from_ne_bytes(bytes.get(16..20)?.try_into().ok()?);
    let pid = u32_at(20)?;
    (len >= EVENT_HEADER_LEN).then_some(Event { len, vers, mask, fd, pid })
}

fn handle_event(shared: &Arc<Shared>, decider: &dyn Decider, pid: u32, fd: OwnedFd, mask: u64) {
    if mask & libc::FAN_OPEN_PERM == 0 {
        return; // not a permission event: nothing to answer
    }
    if pid == shared.own_pid {
        shared.respond(fd, Answer::Allow);
        return;
    }
    let (tgid, tid) = if shared.report_tid {
        match thread_group(pid) {
            Some(tgid) => (tgid, pid),
            None => {
                // The thread is gone: nobody is waiting for the open any more.
                shared.respond(fd, Answer::Deny);
                return;
            }
        }
    } else {
        (pid, pid)
    };
    if tgid == shared.own_pid {
        shared.respond(fd, Answer::Allow);
        return;
    }
    if shared.stopped.load(Ordering::SeqCst) {
        shared.respond(fd, Answer::Deny);
        return;
    }
    let (identity, path) = match file_facts(shared, &fd) {
        Ok(facts) => facts,
        Err(why) => {
            agt_jail_jail::stderr_line!("agt-jail: fanotify: denying an open by pid {tgid} tid {tid}: {why}");
            shared.respond(fd, Answer::Deny);
            return;
        }
    };
    let access = if shared.report_tid { opener_access(tid) } else { FileAccess::ReadWrite };
    let id = shared.next_id.fetch_add(1, Ordering::SeqCst);
    shared.lock_pending().insert(id, Pending { fd, tid, identity: Some(identity) });
    let request = Request {
        pid: tgid,
        tid,
        kind: RequestKind::File { path, access, identity: Some(identity) },
        plane: PLANE,
        proc: None,
    };
    let reply_shared = Arc::clone(shared);
    let reply = Reply::new(move |answer| reply_shared.finish(id, answer));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| decider.decide(request, reply)));
    if outcome.is_err() {
        // The reply was dropped while unwinding: the open is denied.
        agt_jail_jail::stderr_line!("agt-jail: fanotify: the decider panicked; the open was denied");
    }
}

/// The thread group (process) of thread `tid`, from /proc/<tid>/status.
fn thread_group(tid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Tgid:")).and_then(|v| v.trim().parse().ok())
}

/// Identity and jail path of the file an event fd is open on.
fn file_facts(shared: &Shared, fd: &OwnedFd) -> Result<(FileIdentity, String), String> {
    let (dev, ino, mnt_id, nlink) = sys::statx_fd(fd.as_fd()).map_err(|e| format!("statx of the event fd: {e}"))?;
    let identity = FileIdentity { dev, ino };
    let mnt_id = mnt_id.ok_or("no mount id for the event fd")?;
    let mount = shared.mounts.get(&mnt_id).ok_or_else(|| format!("event on unmarked mount id {mnt_id}"))?;
    let file_link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| format!("readlink of the event fd: {e}"))?;
    let root_link = std::fs::read_link(format!("/proc/self/fd/{}", mount.root.as_raw_fd()))
        .map_err(|e| format!("readlink of the mount root of {}: {e}", mount.mount_point))?;
    let file_link = file_link.to_str().ok_or("non-UTF-8 path")?;
    let root_link = root_link.to_str().ok_or("non-UTF-8 mount path")?;
    // An unlinked file (reopened through /proc/<pid>/fd) reads "<path> (deleted)": report
    // the name it had, so rules on that name still apply.
    let file_link = match file_link.strip_suffix(" (deleted)") {
        Some(stripped) if nlink == 0 => stripped,
        _ => file_link,
    };
    let path = map_to_jail(&mount.mount_point, root_link, file_link).ok_or_else(|| {
        format!(
            "{} is not under the mount root {}",
            agt_jail_policy::quoted(file_link),
            agt_jail_policy::quoted(root_link)
        )
    })?;
    Ok((identity, path))
}

/// Maps the kernel's path of a file (`file_link`) to the jail's view, given the kernel's
/// path of the mount's root (`root_link`) and where the jail sees the mount.
fn map_to_jail(mount_point: &str, root_link: &str, file_link: &str) -> Option<String> {
    let rest = if root_link == "/" {
        file_link.strip_prefix('/')?
    } else if file_link == root_link {
        ""
    } else {
        file_link.strip_prefix(root_link)?.strip_prefix('/')?
    };
    Some(match (mount_point, rest) {
        (point, "") => point.to_string(),
        ("/", rest) => format!("/{rest}"),
        (point, rest) => format!("{point}/{rest}"),
    })
}

/// How often [`opener_access`] looks at a thread that is not asleep yet (about 2 ms in all).
const OPENER_SYSCALL_TRIES: u32 = 48;

/// The access the blocked thread `tid` asked for, from its syscall registers.
fn opener_access(tid: u32) -> FileAccess {
    // The kernel queues the event before the opener goes to sleep waiting for the answer;
    // until it sleeps its registers read "running". It sleeps within microseconds (it is
    // waiting for this very answer), so look again for a moment before falling back.
    let path = format!("/proc/{tid}/syscall");
    let mut call = None;
    for attempt in 0..OPENER_SYSCALL_TRIES {
        let Ok(text) = std::fs::read_to_string(&path) else { return FileAccess::ReadWrite };
        call = parse_syscall_line(&text);
        if call.is_some() || !text.starts_with("running") {
            break;
        }
        if attempt > 8 {
            std::thread::sleep(std::time::Duration::from_micros(50));
        } else {
            std::thread::yield_now();
        }
    }
    let Some(call) = call else { return FileAccess::ReadWrite };
    classify(&call, |addr| {
        let mut flags = [0u8; 8];
        sys::read_process_memory(tid, addr, &mut flags).ok().map(|()| u64::from_ne_bytes(flags))
    })
}

/// A syscall number and its six argument registers.
#[derive(Debug, PartialEq, Eq)]
struct SyscallLine {
    nr: i64,
    args: [u64; 6],
}

/// Parses `/proc/<tid>/syscall`: "nr arg0 .. arg5 sp pc" (args in hex); "running" or a
/// negative number when the thread is not in a syscall.
fn parse_syscall_line(text: &str) -> Option<SyscallLine> {
    let mut fields = text.split_whitespace();
    let nr: i64 = fields.next()?.parse().ok()?;
    if nr < 0 {
        return None;
    }
    let mut args = [0u64; 6];
    for arg in &mut args {
        *arg = u64::from_str_radix(fields.next()?.strip_prefix("0x")?, 16).ok()?;
    }
    Some(SyscallLine { nr, args })
}

/// The access of an open by syscall. `read_how_flags` reads `open_how.flags` at an address
/// of the opener's memory (openat2).
fn classify(call: &SyscallLine, read_how_flags: impl FnOnce(u64) -> Option<u64>) -> FileAccess {
    #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
    {
        if call.nr == libc::SYS_open {
            return access_from_flags(call.args[1]);
        }
        if call.nr == libc::SYS_creat {
            return FileAccess::Write;
        }
    }
    if call.nr == libc::SYS_openat || call.nr == libc::SYS_open_by_handle_at {
        access_from_flags(call.args[2])
    } else if call.nr == libc::SYS_execve || call.nr == libc::SYS_execveat {
        FileAccess::Read
    } else if call.nr == libc::SYS_openat2 {
        // The agent's memory can change after the kernel copied it: a read-only claim
        // there is not trusted; a claim of writing only makes the answer stricter.
        match read_how_flags(call.args[2]).map(access_from_flags) {
            Some(FileAccess::Write) => FileAccess::Write,
            _ => FileAccess::ReadWrite,
        }
    } else {
        FileAccess::ReadWrite
    }
}

/// Maps open(2) flags to the access they give: O_TRUNC and O_CREAT change the file (or
/// its directory) even with O_RDONLY.
fn access_from_flags(flags: u64) -> FileAccess {
    let flags = flags as libc::c_int;
    let (reads, mut writes) = match flags & libc::O_ACCMODE {
        libc::O_RDONLY => (true, false),
        libc::O_WRONLY => (false, true),
        _ => (true, true),
    };
    writes |= flags & (libc::O_TRUNC | libc::O_CREAT) != 0;
    match (reads, writes) {
        (true, false) => FileAccess::Read,
        (false, true) => FileAccess::Write,
        _ => FileAccess::ReadWrite,
    }
}

/// One line of mountinfo, the fields this module needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountEntry {
    mnt_id: u64,
    mount_point: String,
    fstype: String,
}

/// Parses mountinfo; on error returns the offending line.
fn parse_mountinfo(text: &str) -> Result<Vec<MountEntry>, String> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-").ok_or_else(|| line.to_string())?;
            let mnt_id = fields.first().and_then(|f| f.parse().ok()).ok_or_else(|| line.to_string())?;
            let mount_point = fields.get(4).map(|f| unescape_mount_path(f)).ok_or_else(|| line.to_string())?;
            let fstype = fields.get(sep + 1).map(|f| unescape_mount_path(f)).ok_or_else(|| line.to_string())?;
            if sep < 6 {
                return Err(line.to_string());
            }
            Ok(MountEntry { mnt_id, mount_point, fstype })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn paths_map_from_the_mount_root_to_the_jail_mount_point() {
        assert_eq!(map_to_jail("/work", "/tmp/x/src", "/tmp/x/src/a/id_rsa").as_deref(), Some("/work/a/id_rsa"));
        assert_eq!(map_to_jail("/", "/tmp/root", "/tmp/root/etc/passwd").as_deref(), Some("/etc/passwd"));
        assert_eq!(map_to_jail("/etc/hosts", "/x/hosts", "/x/hosts").as_deref(), Some("/etc/hosts"));
        assert_eq!(map_to_jail("/w", "/", "/a/b").as_deref(), Some("/w/a/b"));
        // A sibling with the root as a string prefix is not under the root.
        assert_eq!(map_to_jail("/w", "/tmp/src", "/tmp/src2/f"), None);
        assert_eq!(map_to_jail("/w", "/tmp/src", "/elsewhere/f"), None);
    }

    #[test]
    fn syscall_lines_parse_and_non_syscalls_do_not() {
        let line = "257 0xffffff9c 0x7ffd1234 0x241 0x1b6 0x0 0x0 0x7ffd0000 0x7f0000001234\n";
        assert_eq!(
            parse_syscall_line(line),
            Some(SyscallLine { nr: 257, args: [0xffffff9c, 0x7ffd1234, 0x241, 0x1b6, 0, 0] })
        );
        assert_eq!(parse_syscall_line("running\n"), None);
        assert_eq!(parse_syscall_line("-1 0x7ffd0000 0x7f0000001234\n"), None);
        assert_eq!(parse_syscall_line("257 0x1 0x2\n"), None);
    }

    #[test]
    fn open_flags_map_to_access() {
        let f = |v: libc::c_int| access_from_flags(v as u64);
        assert_eq!(f(libc::O_RDONLY), FileAccess::Read);
        assert_eq!(f(libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW), FileAccess::Read);
        assert_eq!(f(libc::O_WRONLY | libc::O_APPEND), FileAccess::Write);
        assert_eq!(f(libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC), FileAccess::Write);
        assert_eq!(f(libc::O_RDWR), FileAccess::ReadWrite);
        assert_eq!(f(libc::O_ACCMODE), FileAccess::ReadWrite);
        assert_eq!(f(libc::O_RDONLY | libc::O_TRUNC), FileAccess::ReadWrite);
        assert_eq!(f(libc::O_RDONLY | libc::O_CREAT), FileAccess::ReadWrite);
    }

    #[test]
    fn syscalls_classify_and_openat2_read_claims_are_not_trusted() {
        let call = |nr: libc::c_long, args: [u64; 6]| SyscallLine { nr, args };
        let none = |_| None;
        assert_eq!(classify(&call(libc::SYS_openat, [0, 0, libc::O_WRONLY as u64, 0, 0, 0]), none), FileAccess::Write);
        assert_eq!(classify(&call(libc::SYS_openat, [0, 0, 0, 0, 0, 0]), none), FileAccess::Read);
        assert_eq!(classify(&call(libc::SYS_execve, [0; 6]), none), FileAccess::Read);
        assert_eq!(classify(&call(libc::SYS_read, [0; 6]), none), FileAccess::ReadWrite);
        assert_eq!(classify(&call(libc::SYS_openat2, [0; 6]), |_| Some(0)), FileAccess::ReadWrite);
        assert_eq!(classify(&call(libc::SYS_openat2, [0; 6]), |_| Some(libc::O_WRONLY as u64)), FileAccess::Write);
        assert_eq!(classify(&call(libc::SYS_openat2, [0; 6]), none), FileAccess::ReadWrite);
        #[cfg(target_arch = "x86_64")]
        assert_eq!(classify(&call(libc::SYS_open, [0, libc::O_RDWR as u64, 0, 0, 0, 0]), none), FileAccess::ReadWrite);
    }

    #[test]
    fn mountinfo_parses_with_optional_fields_and_escapes() {
        let text = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                    30 22 8:1 /tmp/a\\040b /work/my\\040dir rw shared:1 master:2 - ext4 /dev/sda1 rw\n";
        let entries = parse_mountinfo(text).unwrap();
        assert_eq!(entries[0], MountEntry { mnt_id: 22, mount_point: "/proc".into(), fstype: "proc".into() });
        assert_eq!(entries[1], MountEntry { mnt_id: 30, mount_point: "/work/my dir".into(), fstype: "ext4".into() });
        assert!(parse_mountinfo("garbage line\n").is_err());
    }

    #[test]
    fn events_parse_from_native_bytes() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&24u32.to_ne_bytes());
        bytes.extend_from_slice(&[3, 0, 24, 0]);
        bytes.extend_from_slice(&libc::FAN_OPEN_PERM.to_ne_bytes());
        bytes.extend_from_slice(&7i32.to_ne_bytes());
        bytes.extend_from_slice(&1234u32.to_ne_bytes());
        let event = parse_event(&bytes).unwrap();
        assert_eq!((event.len, event.vers, event.mask, event.fd, event.pid), (24, 3, libc::FAN_OPEN_PERM, 7, 1234));
        assert!(parse_event(&bytes[..20]).is_none());
    }
}
