//! Exec decisions on the synchronous path: seccomp user-notification on execve/execveat.
//!
//! The jail installs `agt_jail_jail::seccomp::exec_listener` as the agent's last seccomp
//! filter (with SECCOMP_FILTER_FLAG_NEW_LISTENER) and sends the listener fd over a unix
//! socket; [`ExecNotifier::start`] receives it and serves it on its own thread. From then
//! on every `execve`/`execveat` in the agent's process tree, the entry command's own
//! first, is held by the kernel until it is answered:
//!
//! 1. SECCOMP_IOCTL_NOTIF_RECV (structure sizes from SECCOMP_GET_NOTIF_SIZES);
//! 2. the pathname and argv are read from the target with `process_vm_readv`, bounded
//!    ([`MAX_PATH`], [`MAX_ARGS`] entries, [`MAX_ARGV_BYTES`] in all): usually in two calls
//!    (the path with the page of argv pointers, then all arguments), a string at a time
//!    when they do not fit what those two take;
//! 3. the path is made absolute as the agent sees it: a relative name is joined to
//!    `/proc/TID/cwd` (or `/proc/TID/fd/DIRFD` for `execveat`), whose link text is the
//!    directory in the agent's own mount namespace; `.` and empty components are dropped,
//!    `..` is kept as written. Symlinks are not followed in `path`;
//! 4. `identity` is the (dev, ino) of the file the name resolves to now, looked up with
//!    `openat2(RESOLVE_IN_ROOT)` under the agent's root (so `..` and absolute symlinks
//!    resolve as they would for the agent), None when it does not resolve; `interpreter`
//!    is what a `#!` line at the start of that file names, read from the same open file;
//!    `execveat(fd, "", AT_EMPTY_PATH)` is `fileless`, its path is the link text of the fd
//!    (e.g. `/memfd:x (deleted)`) and its identity the fd's file. The process facts (tgid,
//!    ppid, uid, comm, exe) are read while the task is held: the ids from PIDFD_GET_INFO
//!    (Linux 6.13; `/proc/TID/status` before), comm and exe from the kernel's per-thread
//!    record ([`TaskSource`], kept by the fork, exec and rename tracepoints) where it has
//!    one, else from `/proc/TID`. The `#!` line is read once per version of a file (inode
//!    and change time), not once per exec;
//!
//!    `/proc/TID` is looked up only when something is not known otherwise: the root when
//!    it can change ([`NotifierOptions::fixed_root`] unset; set, it is opened once from the
//!    first exec), the cwd of a relative name, a thread the kernel's record lacks. The
//!    lookup is what an exec of a just-forked process pays most for: the kernel builds that
//!    pid's `/proc` entries and tears them down again at its exit, on the path the parent
//!    waits for (docs/benchmarks.md);
//! 5. SECCOMP_IOCTL_NOTIF_ID_VALID after reading: a target that died or was interrupted
//!    meanwhile is dropped quietly (its pid may already be someone else's);
//! 6. the [`Decider`] gets the [`Request`] and a [`Reply`]: Allow sends
//!    SECCOMP_USER_NOTIF_FLAG_CONTINUE, Deny (or a dropped reply) makes the call fail with
//!    EPERM. Replies may come later from any thread (approvals) while the loop keeps
//!    serving new notifications.
//!
//! Once the listener arrives it is switched to synchronous wake-ups
//! (SECCOMP_IOCTL_NOTIF_SET_FLAGS with SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP, Linux 6.6): the
//! kernel then wakes this thread on the CPU of the task that execs, and the task on this
//! thread's CPU when it answers, instead of sending both wake-ups across CPUs. Older kernels
//! refuse the ioctl; the notifier then runs with ordinary wake-ups
//! ([`Handle::sync_wake_up`] says which).
//!
//! Fail closed: memory that cannot be read, bad pointers, a path or argv over the bounds,
//! a relative path whose directory cannot be resolved, or a syscall the filter should not
//! have sent are answered Deny without asking the decider, and reported to the error
//! callback of [`ExecNotifier::start_with`]. Stopping the notifier (or agt-jail dying)
//! closes the listener: the kernel then fails every pending and future exec of the jail
//! with ENOSYS, so nothing runs unanswered.
//!
//! # Known race (TOCTOU)
//! With SECCOMP_USER_NOTIF_FLAG_CONTINUE the kernel runs the syscall as the target issued
//! it and reads the pathname and argv from the target's memory *again*. Another thread of
//! the target (or a process sharing the memory) can swap them between this check and the
//! exec, and a path can be re-pointed (rename, symlink swap) after it was resolved. The
//! decision here is therefore for rule evaluation, accounting and approvals against a
//! cooperative or careless agent, not a boundary against a hostile one. The race-free
//! floors are Landlock EXECUTE rules (Tier B: checked by the kernel on the file it actually
//! executes) and, on Tier A, the LSM verdict map keyed by the inode actually executed.
//! See docs/threat-model.md.
use std::{
    collections::HashMap,
    ffi::CString,
    io::{self, Read},
    os::{
        fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd},
        unix::fs::{FileExt, MetadataExt, OpenOptionsExt},
    },
    sync::{
        atomic::{AtomicBool, AtomicU8, Ordering},
        Arc, RwLock,
    },
    thread::JoinHandle,
};

use agt_jail_policy::context::ProcFacts;

use crate::{sys, Answer, Decider, FileIdentity, Reply, Request, RequestKind};

/// The longest pathname read (PATH_MAX, including the NUL): a longer one is denied.
pub const MAX_PATH: usize = 4096;
/// The most argv entries read: more are denied.
pub const MAX_ARGS: usize = 4096;
/// The most argv bytes read (all strings with their NULs): more are denied.
pub const MAX_ARGV_BYTES: usize = 256 * 1024;

const AT_FDCWD: i32 = libc::AT_FDCWD;
const AT_EMPTY_PATH: u64 = libc::AT_EMPTY_PATH as u64;
const PAGE: u64 = 4096;

/// Why an exec was denied without asking the decider, or why the notifier stopped.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("cannot read the {what} of the exec by pid {tid}: {source}")]
    Unreadable { tid: u32, what: &'static str, source: io::Error },
    #[error("the exec path of pid {tid} is longer than {MAX_PATH} bytes")]
    PathTooLong { tid: u32 },
    #[error("the exec by pid {tid} has more than {MAX_ARGS} arguments")]
    TooManyArgs { tid: u32 },
    #[error("the arguments of the exec by pid {tid} exceed {MAX_ARGV_BYTES} bytes")]
    ArgsTooLarge { tid: u32 },
    #[error("cannot resolve the exec path '{path}' of pid {tid}: {source}")]
    Unresolvable { tid: u32, path: String, source: io::Error },
    #[error("unexpected syscall {nr} (arch {arch:#x}) from pid {tid} on the exec listener")]
    Unexpected { tid: u32, nr: i32, arch: u32 },
    #[error("exec by pid {tid} after the entry command: this ring runs its entry command only (EACCES)")]
    AfterEntry { tid: u32 },
    #[error("no seccomp listener arrived on the socket (the child ended before its exec)")]
    NoListener,
    #[error("seccomp listener: {0}")]
    Listener(io::Error),
}

/// What the kernel records of one thread of an agent: its `comm` and which executable it
/// runs (an opaque key; see `agt_jail_common::ExeKey`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelTask {
    pub comm: String,
    /// Equal keys are the same executable file at the same place; all zero is unknown.
    pub exe: [u64; 3],
}

/// The kernel's per-thread records, looked up by host thread id.
pub trait TaskSource: Send + Sync {
    /// None when the kernel has no record of `tid` (the exec plane then reads `/proc`).
    fn task(&self, tid: u32) -> Option<KernelTask>;
}

/// How the notifier reads what it does not get from the notification itself.
#[derive(Clone, Default)]
pub struct NotifierOptions {
    /// The kernel's per-thread `comm` and executable; None: read from `/proc/TID`.
    pub tasks: Option<Arc<dyn TaskSource>>,
    /// No process of the jail can change its root (no capability to chroot, and mount
    /// namespaces and pivot_root refused by its seccomp filter, as in rings 1-3): the root
    /// is opened once, from the first exec, instead of from `/proc/TID/root` each time.
    pub fixed_root: bool,
    /// The ring runs its entry command only and no Landlock holds that (a kernel without
    /// it): the launcher's own exec goes to the decider like any other; once one exec was
    /// let through, every later exec fails with EACCES without asking (a Landlock EXECUTE
    /// denial's errno), and `on_error` hears [`NotifyError::AfterEntry`]. The policy's
    /// plane and the entry-only rule then share the jail's one exec listener.
    pub entry_only: bool,
}

/// The listener, shared by the loop and every pending [`Reply`]. Closed (set to None)
/// when the loop ends, whatever replies are still outstanding: their targets then fail
/// with ENOSYS and a late answer is a no-op.
struct Listener {
    fd: RwLock<Option<OwnedFd>>,
    resp_words: usize,
    /// [`WAKE_UNKNOWN`] until the listener arrived, then [`WAKE_SYNC`] or [`WAKE_PLAIN`].
    wake: AtomicU8,
    /// An exec was let through (delivered): with [`NotifierOptions::entry_only`] the
    /// entry command runs and nothing more may.
    entered: AtomicBool,
}

const WAKE_UNKNOWN: u8 = 0;
const WAKE_SYNC: u8 = 1;
const WAKE_PLAIN: u8 = 2;

impl Listener {
    fn send(&self, id: u64, answer: Answer) {
        self.send_errno(id, answer, libc::EPERM);
    }

    /// Answers `id`; a denial fails the exec with `errno`.
    fn send_errno(&self, id: u64, answer: Answer, errno: libc::c_int) {
        let Ok(guard) = self.fd.read() else { return };
        let Some(fd) = guard.as_ref() else { return };
        let allow = answer == Answer::Allow;
        for _ in 0..8 {
            match sys::seccomp_notif_send(fd.as_fd(), id, allow, errno, self.resp_words) {
                // EINTR: not delivered, try again. ENOENT: the target died or was interrupted
                // by a signal (its syscall restarts as a new notification): nothing to answer.
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Ok(()) if allow => return self.entered.store(true, Ordering::SeqCst),
                _ => return,
            }
        }
    }

    fn close(&self) {
        match self.fd.write() {
            Ok(mut guard) => drop(guard.take()),
            Err(poisoned) => drop(poisoned.into_inner().take()),
        }
    }
}

/// Starts exec notifiers.
pub struct ExecNotifier;

/// A running notifier. Dropping it (or [`Handle::stop`]) closes the listener: every
/// pending and future exec of the jail then fails (ENOSYS).
pub struct Handle {
    stop: Arc<OwnedFd>,
    listener: Arc<Listener>,
    thread: Option<JoinHandle<Result<(), NotifyError>>>,
}

impl ExecNotifier {
    /// Serves the exec listener that arrives on `socket` (the parent end of the socketpair
    /// whose child end is `JailConfig::exec_notify`), asking `decider` about every exec.
    /// Returns at once; the listener is received on the notifier's thread, so call this
    /// before launching the jail (the launch returns only once the entry's exec was
    /// answered). Denials without a decision (unreadable, oversize) are not reported; see
    /// [`ExecNotifier::start_with`].
    pub fn start(socket: OwnedFd, decider: Arc<dyn Decider>) -> io::Result<Handle> {
        Self::start_with(socket, decider, |_| {})
    }

    /// [`ExecNotifier::start`], with `on_error` told about every exec denied without asking
    /// the decider (fail closed) and why.
    pub fn start_with(
        socket: OwnedFd,
        decider: Arc<dyn Decider>,
        on_error: impl Fn(&NotifyError) + Send + Sync + 'static,
    ) -> io::Result<Handle> {
        Self::start_with_options(socket, decider, NotifierOptions::default(), on_error)
    }

    /// [`ExecNotifier::start_with`], reading through `options`.
    pub fn start_with_options(
        socket: OwnedFd,
        decider: Arc<dyn Decider>,
        options: NotifierOptions,
        on_error: impl Fn(&NotifyError) + Send + Sync + 'static,
    ) -> io::Result<Handle> {
        spawn_serving("exec-notify", move |stop, listener, notif_words| {
            serve(&socket, stop, listener, notif_words, &*decider, options, &on_error)
        })
    }
}

/// Starts the thread serving one listener with `body(stop, listener, notif_words)`.
/// Whatever ends `body`, nothing answers any more: the listener is closed, so the kernel
/// fails pending and future execs instead of holding them.
fn spawn_serving(
    name: &str,
    body: impl FnOnce(&OwnedFd, &Arc<Listener>, usize) -> Result<(), NotifyError> + Send + 'static,
) -> io::Result<Handle> {
    let sizes = sys::seccomp_notif_sizes()?;
    let stop = Arc::new(sys::eventfd()?);
    let listener = Arc::new(Listener {
        fd: RwLock::new(None),
        resp_words: usize::from(sizes.seccomp_notif_resp).div_ceil(8),
        wake: AtomicU8::new(WAKE_UNKNOWN),
        entered: AtomicBool::new(false),
    });
    let notif_words = usize::from(sizes.seccomp_notif).max(std::mem::size_of::<libc::seccomp_notif>()).div_ceil(8);
    let (thread_stop, thread_listener) = (Arc::clone(&stop), Arc::clone(&listener));
    let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
        let served = body(&thread_stop, &thread_listener, notif_words);
        thread_listener.close();
        served
    })?;
    Ok(Handle { stop, listener, thread: Some(thread) })
}

/// Waits for the listener to arrive on `socket` and notes which wake-ups it uses; None on
/// stop. The caller's copy of the child end closes after the launch, so EOF here means
/// the child ended before its exec.
fn receive_listener(socket: &OwnedFd, stop: &OwnedFd, listener: &Listener) -> Result<Option<OwnedFd>, NotifyError> {
    let (go, _) = wait(socket.as_fd(), stop)?;
    if !go {
        return Ok(None);
    }
    let fd = sys::recv_fd(socket.as_fd()).map_err(NotifyError::Listener)?.ok_or(NotifyError::NoListener)?;
    // Synchronous wake-ups only change which CPU each side runs on; where the kernel lacks
    // them (EINVAL before Linux 6.6) the listener works the same with ordinary ones.
    let wake = if sys::seccomp_notif_set_sync_wake_up(fd.as_fd()).is_ok() { WAKE_SYNC } else { WAKE_PLAIN };
    listener.wake.store(wake, Ordering::Relaxed);
    Ok(Some(fd))
}

/// What the entry-only plane did with one exec: `Denied` is every exec after the entry's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryOnly {
    /// The launcher's own exec of the entry command was let through.
    Entry { tid: u32 },
    /// A later exec, failed with EACCES.
    Denied { tid: u32 },
}

impl ExecNotifier {
    /// Serves the exec listener that arrives on `socket` as the entry-only exec plane: the
    /// first exec (the launcher's own, installed right before it, when no code of the
    /// agent exists yet) continues, every later one fails with EACCES, as a Landlock
    /// EXECUTE denial does. Nothing is read from the agent's memory: the answer depends
    /// only on the order, so nothing can be raced. A launcher exec interrupted by a signal
    /// before its answer arrived comes again from the same thread and is let through again;
    /// once a CONTINUE was delivered, nothing is. `on_exec` hears of each answer.
    ///
    /// Fail closed: when the loop ends (stop, agt-jail gone, an error) the listener closes
    /// and the kernel fails every pending and later exec with ENOSYS.
    pub fn start_entry_only(
        socket: OwnedFd,
        on_exec: impl Fn(EntryOnly) + Send + Sync + 'static,
    ) -> io::Result<Handle> {
        spawn_serving("exec-entry-only", move |stop, listener, notif_words| {
            serve_entry_only(&socket, stop, listener, notif_words, &on_exec)
        })
    }
}

fn serve_entry_only(
    socket: &OwnedFd,
    stop: &OwnedFd,
    listener: &Arc<Listener>,
    notif_words: usize,
    on_exec: &dyn Fn(EntryOnly),
) -> Result<(), NotifyError> {
    let Some(fd) = receive_listener(socket, stop, listener)? else { return Ok(()) };
    let resp_words = listener.resp_words;
    let mut buf = vec![0u64; notif_words];
    // The launcher's thread until its exec was let through; None afterwards.
    let mut launcher: Option<u32> = None;
    let mut entered = false;
    loop {
        let (go, hup) = wait(fd.as_fd(), stop)?;
        if !go || hup {
            return Ok(());
        }
        let notif = match sys::seccomp_notif_recv(fd.as_fd(), &mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINTR)) => continue,
            Err(e) => return Err(NotifyError::Listener(e)),
        };
        let tid = notif.pid;
        let entry = !entered && launcher.is_none_or(|first| first == tid);
        if entry {
            launcher = Some(tid);
        }
        let mut delivered = false;
        for _ in 0..8 {
            match sys::seccomp_notif_send(fd.as_fd(), notif.id, entry, libc::EACCES, resp_words) {
                Ok(()) => delivered = true,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // ENOENT: the target died or was interrupted (a restarted call comes again).
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                // EINVAL on an allow: no SECCOMP_USER_NOTIF_FLAG_CONTINUE (before Linux 5.5);
                // the loop ends and the listener closes, so the exec fails (ENOSYS).
                Err(e) => return Err(NotifyError::Listener(e)),
            }
            break;
        }
        if delivered {
            if entry {
                entered = true;
                on_exec(EntryOnly::Entry { tid });
            } else {
                on_exec(EntryOnly::Denied { tid });
            }
        }
    }
}

impl Handle {
    /// Stops serving and closes the listener; returns what ended the loop if it failed.
    pub fn stop(mut self) -> Result<(), NotifyError> {
        self.shutdown()
    }

    /// Whether the loop still runs (it ends when every process of the jail is gone, on
    /// stop, or on a listener error).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Whether the listener hands notifications over with synchronous wake-ups (Linux 6.6
    /// and later); None until the listener has arrived (it has once the jail's launch
    /// returned).
    pub fn sync_wake_up(&self) -> Option<bool> {
        match self.listener.wake.load(Ordering::Relaxed) {
            WAKE_SYNC => Some(true),
            WAKE_PLAIN => Some(false),
            _ => None,
        }
    }

    fn shutdown(&mut self) -> Result<(), NotifyError> {
        let _ = sys::eventfd_signal(self.stop.as_fd());
        let result = match self.thread.take() {
            Some(thread) => thread.join().unwrap_or(Err(NotifyError::Listener(io::Error::other("panicked")))),
            None => Ok(()),
        };
        self.listener.close();
        result
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Waits until `fd` is readable or `stop` fires; Ok(false) on stop. `hup` reports a
/// hang-up without data (no process uses the filter any more).
fn wait(fd: BorrowedFd<'_>, stop: &OwnedFd) -> Result<(bool, bool), NotifyError> {
    let mut fds = [
        libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    sys::poll(&mut fds).map_err(NotifyError::Listener)?;
    if fds[1].revents != 0 {
        return Ok((false, false));
    }
    let hup = fds[0].revents & libc::POLLIN == 0 && fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0;
    Ok((true, hup))
}

fn serve(
    socket: &OwnedFd,
    stop: &OwnedFd,
    listener: &Arc<Listener>,
    notif_words: usize,
    decider: &dyn Decider,
    options: NotifierOptions,
    on_error: &dyn Fn(&NotifyError),
) -> Result<(), NotifyError> {
    let Some(fd) = receive_listener(socket, stop, listener)? else { return Ok(()) };
    *listener.fd.write().map_err(|_| NotifyError::Listener(io::Error::other("lock poisoned")))? = Some(fd);
    let mut buf = vec![0u64; notif_words];
    let entry_only = options.entry_only;
    // With `entry_only`: the launcher's thread, whose execs go to the decider until one
    // was let through (an exec interrupted by a signal comes again from it).
    let mut launcher: Option<u32> = None;
    let mut memory = ReadMemory { options, ..ReadMemory::default() };
    loop {
        let guard = listener.fd.read().map_err(|_| NotifyError::Listener(io::Error::other("lock poisoned")))?;
        let Some(fd) = guard.as_ref().map(|fd| fd.as_fd()) else { return Ok(()) };
        let (go, hup) = wait(fd, stop)?;
        if !go || hup {
            return Ok(());
        }
        let notif = match sys::seccomp_notif_recv(fd, &mut buf) {
            Ok(n) => n,
            // ENOENT: the target went away between poll and receive.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::EINTR)) => continue,
            Err(e) => return Err(NotifyError::Listener(e)),
        };
        let id = notif.id;
        if entry_only {
            let tid = notif.pid;
            // Only the launcher's thread exists until its exec is let through; any other
            // exec is after the entry's, or not the launcher's: neither may run.
            if listener.entered.load(Ordering::SeqCst) || launcher.is_some_and(|first| first != tid) {
                drop(guard);
                listener.send_errno(id, Answer::Deny, libc::EACCES);
                on_error(&NotifyError::AfterEntry { tid });
                continue;
            }
            launcher = Some(tid);
        }
        let request = read_request(&notif, &mut memory);
        // The target may have died (and its pid been reused) or been interrupted while we
        // read: only a still-pending notification is worth a decision.
        match sys::seccomp_notif_id_valid(fd, id) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => return Err(NotifyError::Listener(e)),
        }
        drop(guard);
        match request {
            Ok(request) => {
                let shared = Arc::clone(listener);
                decider.decide(request, Reply::new(move |answer| shared.send(id, answer)));
            }
            Err(err) => {
                listener.send(id, Answer::Deny);
                on_error(&err);
            }
        }
    }
}

/// What the loop keeps from one notification to the next, so each exec costs fewer
/// system calls (on this path every call is paid while the agent waits).
#[derive(Default)]
struct ReadMemory {
    /// The `#!` interpreter of each version of a file already read (see [`FileVersion`]).
    interpreters: HashMap<FileVersion, Option<String>>,
    /// Whether PIDFD_GET_INFO answers on this kernel; None until the first try.
    pidfd_info: Option<bool>,
    options: NotifierOptions,
    /// The jail's root, when [`NotifierOptions::fixed_root`] (opened at the first exec).
    root: Option<OwnedFd>,
    /// The path of each executable the kernel's record named (its key) and `/proc/TID/exe`
    /// gave once: the link text as it read then (a rename of the file afterwards is not
    /// followed while a process still runs it).
    exes: HashMap<[u64; 3], String>,
}

/// Interpreters (and executables' paths) remembered at most; the memory is emptied when
/// it is full.
const INTERPRETERS_MAX: usize = 4096;

/// `/proc/TID`, looked up on first use (the lookup is what costs; see the module doc).
struct ProcDir {
    tid: u32,
    fd: Option<OwnedFd>,
}

impl ProcDir {
    fn new(tid: u32) -> Self {
        ProcDir { tid, fd: None }
    }

    fn get(&mut self) -> Result<BorrowedFd<'_>, NotifyError> {
        if self.fd.is_none() {
            let name = CString::new(self.tid.to_string()).unwrap_or_default();
            let fd = sys::open_at(proc_root(), &name, O_DIR).map_err(|source| NotifyError::Unreadable {
                tid: self.tid,
                what: "/proc entry",
                source,
            })?;
            self.fd = Some(fd);
        }
        match &self.fd {
            Some(fd) => Ok(fd.as_fd()),
            None => {
                Err(NotifyError::Unreadable { tid: self.tid, what: "/proc entry", source: io::Error::other("gone") })
            }
        }
    }
}

/// The agent's root for resolving an exec's path (`kept` once opened, when `fixed`), or
/// None when it cannot be opened.
fn agent_root<'a>(kept: &'a mut Option<OwnedFd>, fixed: bool, proc: &mut ProcDir) -> Option<RootDir<'a>> {
    if !fixed {
        return sys::open_at(proc.get().ok()?, c"root", O_DIR).ok().map(RootDir::Own);
    }
    if kept.is_none() {
        *kept = Some(sys::open_at(proc.get().ok()?, c"root", O_DIR).ok()?);
    }
    kept.as_ref().map(|fd| RootDir::Kept(fd.as_fd()))
}

impl ReadMemory {
    /// The `comm` and executable of thread `tid`: from the kernel's record where it has
    /// one (the executable's path read once per executable), else from `/proc/TID`.
    fn comm_and_exe(&mut self, proc: &mut ProcDir, tid: u32) -> (String, String) {
        let known = self.options.tasks.as_ref().and_then(|tasks| tasks.task(tid)).filter(|t| t.exe != [0; 3]);
        let Some(task) = known else {
            let Ok(dir) = proc.get() else { return (String::new(), String::new()) };
            return (read_comm(dir), read_exe(dir));
        };
        let comm = task.comm;
        if let Some(exe) = self.exes.get(&task.exe) {
            return (comm, exe.clone());
        }
        let exe = proc.get().map(read_exe).unwrap_or_default();
        if !exe.is_empty() {
            if self.exes.len() >= INTERPRETERS_MAX {
                self.exes.clear();
            }
            self.exes.insert(task.exe, exe.clone());
        }
        (comm, exe)
    }
}

/// A root directory fd: kept for the life of the notifier, or opened for one exec.
enum RootDir<'a> {
    Kept(BorrowedFd<'a>),
    Own(OwnedFd),
}

impl RootDir<'_> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            RootDir::Kept(fd) => *fd,
            RootDir::Own(fd) => fd.as_fd(),
        }
    }
}

/// `comm` of `/proc/TID` (`proc`); empty when unreadable.
fn read_comm(proc: BorrowedFd<'_>) -> String {
    // `comm` is at most 16 bytes and a newline: one read returns all of it.
    let mut comm = [0u8; 64];
    sys::open_at(proc, c"comm", libc::O_RDONLY)
        .and_then(|fd| std::fs::File::from(fd).read(&mut comm))
        .map(|n| String::from_utf8_lossy(&comm[..n]).trim_end().to_string())
        .unwrap_or_default()
}

/// The link text of `/proc/TID/exe` (`proc`); empty when unreadable.
fn read_exe(proc: BorrowedFd<'_>) -> String {
    let mut exe = [0u8; MAX_PATH];
    match sys::readlink_at(proc, c"exe", &mut exe) {
        Ok(n) => String::from_utf8_lossy(&exe[..n]).into_owned(),
        Err(_) => String::new(),
    }
}

/// One version of a file: any write to it changes its ctime (which no one can set back),
/// so the bytes at its start are the same while this is. A write through a shared mapping
/// whose page is already dirty updates no time; that is one more way to change a file
/// between the check and the exec, which the decision does not guard against anyway (see
/// "Known race" above).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct FileVersion {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileVersion {
    fn of(meta: &std::fs::Metadata) -> Self {
        FileVersion {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// What one notification asks for, read from the target.
fn read_request(notif: &libc::seccomp_notif, memory: &mut ReadMemory) -> Result<Request, NotifyError> {
    let tid = notif.pid;
    let data = &notif.data;
    let (arch, nr) = (data.arch, data.nr);
    let native = agt_arch();
    let (dirfd, path_ptr, argv_ptr, flags) = match (native, nr) {
        (Some((audit, execve, _)), n) if arch == audit && n == execve => (AT_FDCWD, data.args[0], data.args[1], 0),
        (Some((audit, _, execveat)), n) if arch == audit && n == execveat => {
            (data.args[0] as i32, data.args[1], data.args[2], data.args[4])
        }
        _ => return Err(NotifyError::Unexpected { tid, nr, arch }),
    };
    let pid = tid as libc::pid_t;
    let (name, argv) = match read_quick(pid, path_ptr, argv_ptr) {
        Some(read) => read,
        None => {
            let name = read_cstr(pid, path_ptr, MAX_PATH).map_err(|e| match e {
                ReadFail::Io(source) => NotifyError::Unreadable { tid, what: "path", source },
                ReadFail::TooLong => NotifyError::PathTooLong { tid },
            })?;
            (name, read_argv(pid, argv_ptr, tid)?)
        }
    };
    let name = String::from_utf8_lossy(&name).into_owned();
    let fileless = flags & AT_EMPTY_PATH != 0 && name.is_empty();
    let mut proc = ProcDir::new(tid);
    let (path, identity, interpreter) = if fileless {
        let fd = format!("/proc/{tid}/fd/{dirfd}");
        let link = std::fs::read_link(&fd)
            .map_err(|source| NotifyError::Unresolvable { tid, path: fd.clone(), source })?
            .to_string_lossy()
            .into_owned();
        let identity = std::fs::metadata(&fd).ok().map(|m| FileIdentity { dev: m.dev(), ino: m.ino() });
        (link, identity, None)
    } else {
        let path = absolute(&mut proc, tid, dirfd, &name)?;
        let (identity, interpreter) = match agent_root(&mut memory.root, memory.options.fixed_root, &mut proc) {
            Some(root) => {
                let root = root.as_fd();
                identify(root, &path, &mut memory.interpreters)
            }
            None => (None, None),
        };
        (path, identity, interpreter)
    };
    let (tgid, proc) = facts(&mut proc, tid, memory);
    Ok(Request {
        pid: tgid,
        tid,
        kind: RequestKind::Exec { path, argv, fileless, identity, interpreter },
        plane: "seccomp_notify",
        proc,
    })
}

/// Flags of the `/proc` directory fds (no reads through them, lookups only).
const O_DIR: libc::c_int = libc::O_PATH | libc::O_DIRECTORY;

/// `/proc`, opened once for the life of the process.
fn proc_root() -> BorrowedFd<'static> {
    static PROC: std::sync::OnceLock<Option<OwnedFd>> = std::sync::OnceLock::new();
    match PROC.get_or_init(|| sys::open_at(cwd_fd(), c"/proc", O_DIR).ok()) {
        Some(fd) => fd.as_fd(),
        // Without /proc every lookup below fails (and the exec is denied) the same way.
        None => cwd_fd(),
    }
}

fn cwd_fd() -> BorrowedFd<'static> {
    // SAFETY: AT_FDCWD is a valid directory argument for the *at calls for the life of the
    // process and is never closed.
    unsafe { BorrowedFd::borrow_raw(AT_FDCWD) }
}

/// (audit arch, execve, execveat) of this build.
fn agt_arch() -> Option<(u32, i32, i32)> {
    if cfg!(target_arch = "x86_64") {
        Some((0xC000_003E, 59, 322))
    } else if cfg!(target_arch = "aarch64") {
        Some((0xC000_00B7, 221, 281))
    } else {
        None
    }
}

enum ReadFail {
    Io(io::Error),
    TooLong,
}

/// Reads a NUL-terminated string of at most `max` bytes (NUL included) at `addr`, a page
/// at a time so an unmapped page after the string is never touched.
fn read_cstr(pid: libc::pid_t, addr: u64, max: usize) -> Result<Vec<u8>, ReadFail> {
    if addr == 0 {
        return Err(ReadFail::Io(io::Error::from_raw_os_error(libc::EFAULT)));
    }
    let mut out = Vec::new();
    let mut at = addr;
    let mut chunk = [0u8; PAGE as usize];
    while out.len() < max {
        let to_page_end = (PAGE - at % PAGE) as usize;
        let want = to_page_end.min(max - out.len());
        let got = sys::process_vm_read(pid, at, &mut chunk[..want]).map_err(ReadFail::Io)?;
        if let Some(end) = chunk[..got].iter().position(|b| *b == 0) {
            out.extend_from_slice(&chunk[..end]);
            return Ok(out);
        }
        if got < want {
            return Err(ReadFail::Io(io::Error::from_raw_os_error(libc::EFAULT)));
        }
        out.extend_from_slice(&chunk[..got]);
        at = at.checked_add(got as u64).ok_or(ReadFail::Io(io::Error::from_raw_os_error(libc::EFAULT)))?;
    }
    Err(ReadFail::TooLong)
}

/// Arguments [`read_quick`] reads (an argv with more is read the slow way).
const QUICK_ARGS: usize = 64;
/// Bytes of each argument [`read_quick`] reads at most (a longer argument sends the whole
/// argv the slow way).
const QUICK_ARG_BYTES: usize = 1024;

/// Bytes from `addr` to the end of its page.
fn to_page_end(addr: u64) -> usize {
    (PAGE - addr % PAGE) as usize
}

/// The path and argv in two `process_vm_readv` calls (the path with the page of argv
/// pointers, then every argument), where [`read_cstr`] and [`read_argv`] make one call per
/// string. None when something is not within what was read (a longer string, more
/// arguments, an unmapped page, a NULL pointer): the caller then reads the slow way, which
/// gives the same result or the precise error. Never reads past the page a string starts
/// on, as the slow way.
fn read_quick(pid: libc::pid_t, path_ptr: u64, argv_ptr: u64) -> Option<(Vec<u8>, Vec<String>)> {
    if path_ptr == 0 || argv_ptr == 0 {
        return None;
    }
    let path_len = to_page_end(path_ptr).min(MAX_PATH);
    let ptrs_len = (to_page_end(argv_ptr) / 8).min(QUICK_ARGS + 1) * 8;
    if ptrs_len == 0 {
        return None;
    }
    let mut head = vec![0u8; path_len + ptrs_len];
    let got = sys::process_vm_read_ranges(pid, &[(path_ptr, path_len), (argv_ptr, ptrs_len)], &mut head).ok()?;
    if got != head.len() {
        return None;
    }
    let (path, ptrs) = head.split_at(path_len);
    let path = path[..path.iter().position(|b| *b == 0)?].to_vec();
    let mut ranges = Vec::new();
    let mut terminated = false;
    for word in ptrs.chunks_exact(8) {
        let ptr = u64::from_ne_bytes(word.try_into().ok()?);
        if ptr == 0 {
            terminated = true;
            break;
        }
        ranges.push((ptr, to_page_end(ptr).min(QUICK_ARG_BYTES)));
    }
    if !terminated {
        return None;
    }
    let mut strings = vec![0u8; ranges.iter().map(|(_, len)| len).sum()];
    if !ranges.is_empty() && sys::process_vm_read_ranges(pid, &ranges, &mut strings).ok()? != strings.len() {
        return None;
    }
    let mut argv = Vec::with_capacity(ranges.len());
    let mut rest = strings.as_slice();
    for (_, len) in &ranges {
        let (chunk, after) = rest.split_at(*len);
        rest = after;
        argv.push(String::from_utf8_lossy(&chunk[..chunk.iter().position(|b| *b == 0)?]).into_owned());
    }
    Some((path, argv))
}

/// Reads argv (a NULL-terminated array of string pointers) within the bounds. A NULL argv
/// is an empty one, as for the kernel. The pointers are read up to a page at a time (one
/// system call for the usual argv), never past the page the next pointer is on.
fn read_argv(pid: libc::pid_t, addr: u64, tid: u32) -> Result<Vec<String>, NotifyError> {
    let mut argv = Vec::new();
    if addr == 0 {
        return Ok(argv);
    }
    let mut budget = MAX_ARGV_BYTES;
    let unreadable = |source: io::Error| NotifyError::Unreadable { tid, what: "argv", source };
    let fault = || unreadable(io::Error::from_raw_os_error(libc::EFAULT));
    let mut words = [0u8; PAGE as usize];
    let (mut have, mut used) = (0usize, 0usize);
    for i in 0..=MAX_ARGS {
        if used == have {
            let slot = addr.checked_add(8 * i as u64).ok_or_else(fault)?;
            // Whole words up to the end of the page `slot` is on (at least one), and no more
            // than the slots still allowed.
            let to_page_end = ((PAGE - slot % PAGE) as usize / 8).max(1);
            let want = to_page_end.min(MAX_ARGS + 1 - i) * 8;
            let got = sys::process_vm_read(pid, slot, &mut words[..want]).map_err(unreadable)?;
            if got < 8 {
                return Err(fault());
            }
            (have, used) = (got / 8, 0);
        }
        let at = used * 8;
        let ptr = u64::from_ne_bytes(words[at..at + 8].try_into().map_err(|_| fault())?);
        used += 1;
        if ptr == 0 {
            return Ok(argv);
        }
        if i == MAX_ARGS {
            break;
        }
        let arg = read_cstr(pid, ptr, budget).map_err(|e| match e {
            ReadFail::Io(source) => unreadable(source),
            ReadFail::TooLong => NotifyError::ArgsTooLarge { tid },
        })?;
        budget = budget.checked_sub(arg.len() + 1).ok_or(NotifyError::ArgsTooLarge { tid })?;
        argv.push(String::from_utf8_lossy(&arg).into_owned());
    }
    Err(NotifyError::TooManyArgs { tid })
}

/// `name` made absolute in the agent's view: joined to the cwd or the execveat dirfd
/// (`proc` is `/proc/TID`, looked up only for a relative name).
fn absolute(proc: &mut ProcDir, tid: u32, dirfd: i32, name: &str) -> Result<String, NotifyError> {
    let joined = if name.starts_with('/') {
        name.to_string()
    } else {
        let base =
            if dirfd == AT_FDCWD { c"cwd".to_owned() } else { CString::new(format!("fd/{dirfd}")).unwrap_or_default() };
        let unresolvable = |source| NotifyError::Unresolvable { tid, path: name.to_string(), source };
        let mut buf = [0u8; MAX_PATH];
        let n = sys::readlink_at(proc.get()?, &base, &mut buf).map_err(unresolvable)?;
        if n == buf.len() {
            return Err(unresolvable(io::Error::from_raw_os_error(libc::ENAMETOOLONG)));
        }
        format!("{}/{name}", String::from_utf8_lossy(&buf[..n]))
    };
    Ok(normalize(&joined))
}

/// Drops empty and `.` components; keeps `..` as written (collapsing it lexically would
/// be wrong across symlinks, and hiding it would hide what was asked).
fn normalize(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    format!("/{}", parts.join("/"))
}

/// (dev, ino) of what `path` resolves to inside the agent's root (`root`), now, when it
/// is a regular file; and the interpreter its `#!` line names.
fn identify(
    root: BorrowedFd<'_>,
    path: &str,
    interpreters: &mut HashMap<FileVersion, Option<String>>,
) -> (Option<FileIdentity>, Option<String>) {
    let Ok(name) = CString::new(path.trim_start_matches('/')) else { return (None, None) };
    let name = if name.as_bytes().is_empty() { c".".to_owned() } else { name };
    // O_PATH first: nothing but a regular file is ever opened for reading, since opening a
    // device can act (a watchdog arms, a tape rewinds) and the supervisor would do it with
    // its own privileges on the agent's behalf.
    let Ok(fd) = sys::open_in_root(root, &name, libc::O_PATH) else { return (None, None) };
    let held = std::fs::File::from(fd);
    let Ok(meta) = held.metadata() else { return (None, None) };
    if !meta.is_file() {
        return (None, None);
    }
    let identity = FileIdentity { dev: meta.dev(), ino: meta.ino() };
    let version = FileVersion::of(&meta);
    if let Some(known) = interpreters.get(&version) {
        return (Some(identity), known.clone());
    }
    // Reopened through the descriptor already held, so it is the same file whatever the
    // agent renames meanwhile; without blocking (a lease) and without taking a terminal.
    let readable = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(format!("/proc/self/fd/{}", held.as_raw_fd()));
    let named = readable.ok().and_then(|file| interpreter(&file));
    if interpreters.len() >= INTERPRETERS_MAX {
        interpreters.clear();
    }
    interpreters.insert(version, named.clone());
    (Some(identity), named)
}

/// The interpreter named by a `#!` line at the start of `file` (first 256 bytes).
fn interpreter(file: &std::fs::File) -> Option<String> {
    let mut head = [0u8; 256];
    let n = file.read_at(&mut head, 0).ok()?;
    let line = head.get(..n)?.strip_prefix(b"#!")?;
    let end = line.iter().position(|b| *b == b'\n').unwrap_or(line.len());
    let text = std::str::from_utf8(line.get(..end)?).ok()?;
    text.split_whitespace().next().map(str::to_string)
}

/// The thread group (process) id of thread `tid`, and, when `tid` leads its group, the
/// process facts (the evaluator reads a non-leader's from `/proc/TGID`). Unreadable fields
/// stay empty, as in `evaluator::proc_facts`.
fn facts(proc: &mut ProcDir, tid: u32, memory: &mut ReadMemory) -> (u32, Option<ProcFacts>) {
    let ids = task_ids(proc, tid, &mut memory.pidfd_info);
    let tgid = ids.map_or(tid, |ids| ids.tgid);
    if tgid != tid {
        return (tgid, None);
    }
    let (comm, exe) = memory.comm_and_exe(proc, tid);
    let proc = ProcFacts {
        pid: tgid,
        ppid: ids.map_or(0, |ids| ids.ppid),
        uid: ids.map_or(u32::MAX, |ids| ids.uid),
        comm,
        exe,
    };
    (tgid, Some(proc))
}

/// The thread group, parent and real uid of thread `tid`: from PIDFD_GET_INFO where the
/// kernel has it (Linux 6.13; `works` remembers whether it does), else from the head of
/// `/proc/TID/status`, which the kernel generates in full (signal masks, capabilities,
/// CPU lists) to be read (about three times the cost here).
fn task_ids(proc: &mut ProcDir, tid: u32, works: &mut Option<bool>) -> Option<sys::TaskIds> {
    if *works != Some(false) {
        match sys::pidfd_open_thread(tid as libc::pid_t).and_then(|fd| sys::pidfd_task_ids(fd.as_fd())) {
            Ok(ids) => {
                *works = Some(true);
                return Some(ids);
            }
            // PIDFD_THREAD (6.9) or PIDFD_GET_INFO (6.13) unknown: `status` from now on.
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTTY | libc::ENOSYS | libc::EOPNOTSUPP)) =>
            {
                *works = Some(false);
            }
            Err(_) => {}
        }
    }
    // The fields needed come first in `status` (Tgid, PPid, Uid; the long Groups and
    // signal lines come after): one read of its head is enough.
    let mut head = [0u8; 1024];
    let n = sys::open_at(proc.get().ok()?, c"status", libc::O_RDONLY)
        .and_then(|fd| read_full(&mut std::fs::File::from(fd), &mut head))
        .ok()?;
    let status = String::from_utf8_lossy(&head[..n]);
    let field = |name: &str| crate::evaluator::status_field(&status, name);
    Some(sys::TaskIds {
        tgid: field("Tgid:").unwrap_or(tid),
        ppid: field("PPid:").unwrap_or(0),
        uid: field("Uid:").unwrap_or(u32::MAX),
    })
}

/// Reads until `buf` is full or the end of the file; returns the bytes read.
fn read_full(file: &mut std::fs::File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn normalize_keeps_dotdot_and_drops_dots() {
        assert_eq!(normalize("/work/./a//b"), "/work/a/b");
        assert_eq!(normalize("/tmp/../bin/rm"), "/tmp/../bin/rm");
        assert_eq!(normalize("/"), "/");
    }

    #[test]
    fn reads_strings_and_argv_of_this_process_within_bounds() {
        let pid = std::process::id() as libc::pid_t;
        let s = CString::new("hello").unwrap();
        assert_eq!(read_cstr(pid, s.as_ptr() as u64, 64).ok().unwrap(), b"hello");
        assert!(matches!(read_cstr(pid, s.as_ptr() as u64, 3), Err(ReadFail::TooLong)));
        assert!(matches!(read_cstr(pid, 0, 64), Err(ReadFail::Io(_))));
        let args: Vec<CString> = ["a", "", "c d"].iter().map(|a| CString::new(*a).unwrap()).collect();
        let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        assert_eq!(read_argv(pid, ptrs.as_ptr() as u64, 1).unwrap(), vec!["a", "", "c d"]);
        // Pointers across several pages, read a page at a time.
        let names: Vec<CString> = (0..1500).map(|i| CString::new(format!("a{i}")).unwrap()).collect();
        let mut long: Vec<*const libc::c_char> = names.iter().map(|a| a.as_ptr()).collect();
        long.push(std::ptr::null());
        let read = read_argv(pid, long.as_ptr() as u64, 1).unwrap();
        assert_eq!(read.len(), 1500);
        assert!(read.iter().zip(&names).all(|(r, n)| r.as_bytes() == n.as_bytes()));
        // From an address that is not at the start of a page, and a null argv.
        assert_eq!(read_argv(pid, long[1..].as_ptr() as u64, 1).unwrap().len(), 1499);
        assert!(read_argv(pid, 0, 1).unwrap().is_empty());
        let many: Vec<*const libc::c_char> =
            std::iter::repeat_n(args[0].as_ptr(), MAX_ARGS + 1).chain([std::ptr::null()]).collect();
        assert!(matches!(read_argv(pid, many.as_ptr() as u64, 1), Err(NotifyError::TooManyArgs { .. })));
        let big = CString::new(vec![b'x'; MAX_ARGV_BYTES]).unwrap();
        let huge = [big.as_ptr(), std::ptr::null()];
        assert!(matches!(read_argv(pid, huge.as_ptr() as u64, 1), Err(NotifyError::ArgsTooLarge { .. })));
    }

    /// What `read_quick` returns is what the page-at-a-time reads return; what it cannot
    /// take whole it leaves to them.
    #[test]
    fn the_quick_read_agrees_with_the_slow_one_or_leaves_it_to_it() {
        let pid = std::process::id() as libc::pid_t;
        let slow = |path: u64, argv: u64| {
            let name = read_cstr(pid, path, MAX_PATH).ok().unwrap();
            (name, read_argv(pid, argv, 1).unwrap())
        };
        let path = CString::new("/usr/bin/env").unwrap();
        let shapes: Vec<Vec<String>> = vec![
            vec![],
            vec!["env".into()],
            vec!["sh".into(), "-c".into(), "echo hi".into(), String::new()],
            (0..QUICK_ARGS).map(|i| format!("arg{i}")).collect(),
            vec!["x".repeat(QUICK_ARG_BYTES - 1)],
        ];
        for shape in &shapes {
            let args: Vec<CString> = shape.iter().map(|a| CString::new(a.as_str()).unwrap()).collect();
            let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
            ptrs.push(std::ptr::null());
            let (p, a) = (path.as_ptr() as u64, ptrs.as_ptr() as u64);
            let quick = read_quick(pid, p, a);
            // The path, the pointer array or an argument that crosses into the next page
            // (where the allocator happened to put it) is left to the slow read.
            let crosses = |addr: u64, len: usize| to_page_end(addr) < len;
            if let Some(read) = quick {
                assert_eq!(read, slow(p, a), "{shape:?}");
                assert_eq!(&read.1, shape);
            } else {
                assert!(
                    crosses(p, path.as_bytes_with_nul().len())
                        || crosses(a, ptrs.len() * 8)
                        || args.iter().any(|s| crosses(s.as_ptr() as u64, s.as_bytes_with_nul().len())),
                    "{shape:?}"
                );
            }
        }
        // Beyond what it takes: more arguments, a longer one, NULL pointers.
        let many: Vec<CString> = (0..=QUICK_ARGS).map(|i| CString::new(format!("a{i}")).unwrap()).collect();
        let mut ptrs: Vec<*const libc::c_char> = many.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        assert!(read_quick(pid, path.as_ptr() as u64, ptrs.as_ptr() as u64).is_none());
        let long = CString::new("y".repeat(QUICK_ARG_BYTES)).unwrap();
        let ptrs = [long.as_ptr(), std::ptr::null()];
        assert!(read_quick(pid, path.as_ptr() as u64, ptrs.as_ptr() as u64).is_none());
        assert!(read_quick(pid, 0, ptrs.as_ptr() as u64).is_none());
        assert!(read_quick(pid, path.as_ptr() as u64, 0).is_none());
    }

    /// Placed by hand around page boundaries: what ends on its page is read quickly; an
    /// argument, a path or a pointer array that runs onto the next page is left to the slow
    /// read, which still reads it.
    #[test]
    fn what_crosses_a_page_boundary_goes_to_the_slow_read() {
        let pid = std::process::id() as libc::pid_t;
        let page = PAGE as usize;
        let mut buffer = vec![0u8; 6 * page];
        let base = buffer.as_ptr() as u64;
        // Offsets in `buffer` of four page boundaries with a whole page before each; each
        // boundary has one string or array across or just before it.
        let first = page + to_page_end(base);
        let [b1, b2, b3, b4] = [0, 1, 2, 3].map(|n| first + n * page);
        let mut put = |at: usize, bytes: &[u8]| {
            buffer[at..at + bytes.len()].copy_from_slice(bytes);
            base + at as u64
        };
        let path = put(b1 - page, b"/usr/bin/env\0");
        let path_across = put(b1 - 5, b"/usr/bin/env\0");
        let arg_within = put(b2 - 4, b"abc\0");
        let arg_across = put(b3 - 2, b"abc\0");
        let words = |ptrs: &[u64]| ptrs.iter().flat_map(|p| p.to_ne_bytes()).collect::<Vec<u8>>();
        let argv_within = put(b2 - page + 64, &words(&[arg_within, 0]));
        let argv_across_arg = put(b2 - page + 128, &words(&[arg_across, 0]));
        let argv_across_page = put(b4 - 8, &words(&[arg_within, 0]));
        let env = (b"/usr/bin/env".to_vec(), vec!["abc".to_string()]);
        let slow = |path: u64, argv: u64| {
            (read_cstr(pid, path, MAX_PATH).ok().expect("a readable path"), read_argv(pid, argv, 1).unwrap())
        };

        assert_eq!(read_quick(pid, path, argv_within), Some(env.clone()));
        for (path, argv) in [(path_across, argv_within), (path, argv_across_arg), (path, argv_across_page)] {
            assert!(read_quick(pid, path, argv).is_none());
            assert_eq!(slow(path, argv), env);
        }
    }

    fn own_tid() -> u32 {
        let tid = std::fs::read_link("/proc/thread-self").unwrap();
        tid.file_name().unwrap().to_str().unwrap().parse().unwrap()
    }

    /// A kernel record for one thread, as the fork/exec/rename tracepoints would keep it.
    struct OneTask(u32, KernelTask);

    impl TaskSource for OneTask {
        fn task(&self, tid: u32) -> Option<KernelTask> {
            (tid == self.0).then(|| self.1.clone())
        }
    }

    /// With the kernel's record, `comm` comes from it and the executable's path from
    /// `/proc` once per executable; without one, both from `/proc`.
    #[test]
    fn comm_and_exe_come_from_the_kernel_record_where_it_has_one() {
        let tid = own_tid();
        let exe = std::fs::read_link("/proc/self/exe").unwrap().display().to_string();
        let own_comm = std::fs::read_to_string("/proc/thread-self/comm").unwrap().trim_end().to_string();
        let task = KernelTask { comm: "named".into(), exe: [1, 2, 3] };
        let options =
            NotifierOptions { tasks: Some(Arc::new(OneTask(tid, task.clone()))), fixed_root: false, entry_only: false };
        let mut memory = ReadMemory { options, ..ReadMemory::default() };
        assert_eq!(memory.comm_and_exe(&mut ProcDir::new(tid), tid), ("named".to_string(), exe.clone()));
        assert_eq!(memory.exes.get(&[1, 2, 3]), Some(&exe), "the path is remembered by the executable's key");
        // Known executable: no /proc at all (a pid that does not exist would fail it).
        memory.exes.insert([1, 2, 3], "/remembered".into());
        let gone = u32::MAX - 1;
        let options = NotifierOptions {
            tasks: Some(Arc::new(OneTask(gone, task.clone()))),
            fixed_root: false,
            entry_only: false,
        };
        memory.options = options;
        assert_eq!(memory.comm_and_exe(&mut ProcDir::new(gone), gone), ("named".into(), "/remembered".into()));
        // A thread the kernel has no record of, or whose executable it could not read.
        assert_eq!(memory.comm_and_exe(&mut ProcDir::new(tid), tid), (own_comm.clone(), exe.clone()));
        let unknown_exe = KernelTask { comm: task.comm.clone(), exe: [0; 3] };
        memory.options.tasks = Some(Arc::new(OneTask(tid, unknown_exe)));
        assert_eq!(memory.comm_and_exe(&mut ProcDir::new(tid), tid), (own_comm, exe));
        assert_eq!(memory.comm_and_exe(&mut ProcDir::new(gone), gone), (String::new(), String::new()));
    }

    /// A fixed root is opened once and kept; otherwise it is the thread's, each time.
    #[test]
    fn a_fixed_root_is_opened_once() {
        let tid = own_tid();
        let gone = u32::MAX - 1;
        let mut kept = None;
        assert!(agent_root(&mut kept, false, &mut ProcDir::new(tid)).is_some());
        assert!(agent_root(&mut kept, false, &mut ProcDir::new(gone)).is_none());
        assert!(kept.is_none());
        assert!(agent_root(&mut kept, true, &mut ProcDir::new(gone)).is_none(), "nothing to keep yet");
        assert!(agent_root(&mut kept, true, &mut ProcDir::new(tid)).is_some());
        let kept = agent_root(&mut kept, true, &mut ProcDir::new(gone))
            .map(|root| std::fs::File::from(root.as_fd().try_clone_to_owned().unwrap()).metadata().unwrap().ino());
        assert_eq!(kept, Some(std::fs::metadata("/").unwrap().ino()));
    }

    /// PIDFD_GET_INFO and `status` give the same ids, for the process and for a thread.
    #[test]
    fn task_ids_from_the_pidfd_match_status() {
        let tid = own_tid();
        let mut proc = ProcDir::new(tid);
        let from_status = task_ids(&mut proc, tid, &mut Some(false)).unwrap();
        assert_eq!(from_status.tgid, std::process::id());
        assert_eq!(from_status.uid, sys::euid());
        let mut works = None;
        let from_pidfd = task_ids(&mut proc, tid, &mut works).unwrap();
        assert_eq!(from_pidfd, from_status);
        if works != Some(true) {
            eprintln!("note: PIDFD_GET_INFO (Linux 6.13) is not on this kernel; both reads used `status`");
        }
    }

    #[test]
    fn only_regular_files_are_opened_for_their_interpreter() {
        let dir = std::env::temp_dir().join(format!("agt-jail-identify-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("script");
        std::fs::write(&script, "#!/bin/sh -e\necho hi\n").unwrap();
        let fifo = dir.join("fifo");
        let fifo_c = CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path and a mode; no memory of ours is kept.
        assert_eq!(unsafe { libc::mkfifo(fifo_c.as_ptr(), 0o600) }, 0);
        // An open of the FIFO for reading would show as IN_OPEN; an O_PATH open does not.
        // SAFETY: inotify_init1 takes flags only; the fd is owned below.
        let inotify = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(inotify >= 0);
        // SAFETY: `inotify` was just created and is owned by nobody else.
        let inotify = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(inotify) };
        // SAFETY: a valid inotify fd and a NUL-terminated path.
        assert!(unsafe { libc::inotify_add_watch(inotify.as_raw_fd(), fifo_c.as_ptr(), libc::IN_OPEN) } >= 0);

        let me = sys::open_at(cwd_fd(), c"/", O_DIR).unwrap();
        let mut known = HashMap::new();
        let (identity, interpreter) = identify(me.as_fd(), script.to_str().unwrap(), &mut known);
        let meta = std::fs::metadata(&script).unwrap();
        assert_eq!(identity, Some(FileIdentity { dev: meta.dev(), ino: meta.ino() }));
        assert_eq!(interpreter.as_deref(), Some("/bin/sh"));
        assert_eq!(identify(me.as_fd(), fifo.to_str().unwrap(), &mut known), (None, None));
        assert_eq!(identify(me.as_fd(), "/dev/null", &mut known), (None, None));
        assert_eq!(known.len(), 1, "only the regular file's interpreter is remembered");
        // The same version of the file is answered from memory; a rewrite is read again
        // (same inode, new ctime).
        assert_eq!(identify(me.as_fd(), script.to_str().unwrap(), &mut known).1.as_deref(), Some("/bin/sh"));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&script, "#!/usr/bin/python3\nprint(1)\n").unwrap();
        assert_eq!(std::fs::metadata(&script).unwrap().ino(), meta.ino());
        let (again, rewritten) = identify(me.as_fd(), script.to_str().unwrap(), &mut known);
        assert_eq!(again, identity);
        assert_eq!(rewritten.as_deref(), Some("/usr/bin/python3"));
        let mut events = [0u8; 256];
        let read = std::fs::File::from(inotify).read(&mut events);
        assert!(matches!(&read, Err(e) if e.kind() == io::ErrorKind::WouldBlock), "the FIFO was opened: {read:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
