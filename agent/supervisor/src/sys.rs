//! The one place this crate makes raw system calls. Each wrapper states the conditions
//! under which it is sound, so the rest of the crate stays in safe Rust.
//!
//! Sections: seccomp user-notification (exec_notify), fanotify (fanotify), shared helpers.

// ---------------------------------------------------------------------------
// Shared helpers (control socket).

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// The uid of the process at the other end of a connected unix socket (SO_PEERCRED).
pub fn peer_uid(stream: &std::os::unix::net::UnixStream) -> std::io::Result<u32> {
    use std::os::fd::AsRawFd;
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes of the sizes passed; the fd is a
    // live socket borrowed for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &raw mut len)
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cred.uid)
}

/// Writes all of `bytes` to a connected unix socket with MSG_NOSIGNAL: a peer that went
/// away is an EPIPE error, never a SIGPIPE (the non-`exec` commands have its default
/// action, which would end them without a word).
pub fn send_all(stream: &std::os::unix::net::UnixStream, mut bytes: &[u8]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    while !bytes.is_empty() {
        // SAFETY: `bytes` is valid for reads of its length; the fd is a live socket
        // borrowed for the duration of the call.
        let n = unsafe { libc::send(stream.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
        match usize::try_from(n) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = bytes.get(n..).unwrap_or_default(),
            Err(_) => {
                let err = std::io::Error::last_os_error();
                if err.kind() != std::io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
        }
    }
    Ok(())
}

/// chmod(2) on a path.
pub fn chmod(path: &std::path::Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

// ---------------------------------------------------------------------------------------
// fanotify
// ---------------------------------------------------------------------------------------

pub(crate) mod fanotify {
    use std::{
        ffi::CStr,
        io,
        os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    };

    fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    /// fanotify_init(2): a new notification group.
    pub fn init(flags: libc::c_uint, event_f_flags: libc::c_uint) -> io::Result<OwnedFd> {
        // SAFETY: fanotify_init takes two integers and touches no memory of ours.
        let fd = check(unsafe { libc::fanotify_init(flags, event_f_flags) })?;
        // SAFETY: the kernel just installed `fd` for us; nothing else owns it.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// fanotify_mark(2) on the object `path` names (relative to the cwd; `None` with
    /// FAN_MARK_FLUSH).
    pub fn mark(group: BorrowedFd<'_>, flags: libc::c_uint, mask: u64, path: Option<&CStr>) -> io::Result<()> {
        let path_ptr = path.map_or(std::ptr::null(), CStr::as_ptr);
        // SAFETY: `path_ptr` is null or a NUL-terminated string borrowed for the call;
        // the group fd is open for the call's duration.
        check(unsafe { libc::fanotify_mark(group.as_raw_fd(), flags, mask, libc::AT_FDCWD, path_ptr) })?;
        Ok(())
    }

    /// fanotify_mark(2) on the file `target` is open on (an event's fd).
    pub fn mark_fd(group: BorrowedFd<'_>, flags: libc::c_uint, mask: u64, target: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: a null pathname makes the kernel use `target`'s own file; both fds are
        // open for the call's duration.
        check(unsafe { libc::fanotify_mark(group.as_raw_fd(), flags, mask, target.as_raw_fd(), std::ptr::null()) })?;
        Ok(())
    }

    /// Takes ownership of the file descriptor the kernel installed for one event.
    ///
    /// # Safety
    /// `fd` must be an event fd just read from a fanotify group by this process and not
    /// yet wrapped or closed anywhere else.
    pub unsafe fn own_event_fd(fd: RawFd) -> OwnedFd {
        // SAFETY: the caller guarantees `fd` is a fresh descriptor nobody else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// What statx(2) says of an open file: (dev, ino, mount id, link count). The mount
    /// id is `None` when the kernel does not report STATX_MNT_ID.
    pub fn statx_fd(fd: BorrowedFd<'_>) -> io::Result<(u64, u64, Option<u64>, u32)> {
        // SAFETY: statx is plain old data; all-zero is a valid value.
        let mut buf: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: the empty path with AT_EMPTY_PATH makes the kernel stat `fd` itself;
        // `buf` is valid for writes of one statx.
        check(unsafe {
            libc::statx(
                fd.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH | libc::AT_STATX_SYNC_AS_STAT,
                libc::STATX_INO | libc::STATX_NLINK | libc::STATX_MNT_ID,
                &mut buf,
            )
        })?;
        let dev = libc::makedev(buf.stx_dev_major, buf.stx_dev_minor);
        let mnt_id = (buf.stx_mask & libc::STATX_MNT_ID != 0).then_some(buf.stx_mnt_id);
        Ok((dev, buf.stx_ino, mnt_id, buf.stx_nlink))
    }

    /// poll(2) for readability of `fds`; returns which ones are readable (or hung up).
    /// `timeout_ms` < 0 waits without limit. EINTR counts as "nothing ready".
    pub fn poll_readable(fds: &[BorrowedFd<'_>], timeout_ms: i32) -> io::Result<Vec<bool>> {
        let mut pfds: Vec<libc::pollfd> =
            fds.iter().map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd entries whose fds are
        // borrowed (open) for the call's duration.
        let rc = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                return Ok(vec![false; fds.len()]);
            }
            return Err(err);
        }
        Ok(pfds.iter().map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0).collect())
    }

    /// Reads `buf.len()` bytes at `addr` in the address space of thread `tid`
    /// (process_vm_readv(2)). Short reads are an error.
    pub fn read_process_memory(tid: u32, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let remote = libc::iovec { iov_base: addr as usize as *mut libc::c_void, iov_len: buf.len() };
        // SAFETY: `local` describes `buf`, valid for writes of its length; the remote
        // iovec is only dereferenced by the kernel, in the other process, with its checks.
        let n = unsafe { libc::process_vm_readv(tid as libc::pid_t, &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n as usize != buf.len() {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short process_vm_readv"));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// seccomp user-notification (exec_notify)

pub use notif::*;

/// The seccomp user-notification calls (own module, so its imports stay its own).
mod notif {
    use std::{
        ffi::CStr,
        io,
        os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    };

    /// The sizes of the notification structures this kernel uses (SECCOMP_GET_NOTIF_SIZES).
    pub fn seccomp_notif_sizes() -> io::Result<libc::seccomp_notif_sizes> {
        let mut sizes = libc::seccomp_notif_sizes { seccomp_notif: 0, seccomp_notif_resp: 0, seccomp_data: 0 };
        // SAFETY: SECCOMP_GET_NOTIF_SIZES writes one seccomp_notif_sizes to the pointer.
        let rc = unsafe {
            libc::syscall(libc::SYS_seccomp, libc::SECCOMP_GET_NOTIF_SIZES, 0 as libc::c_uint, &mut sizes as *mut _)
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(sizes)
    }

    /// SECCOMP_IOCTL_NOTIF_RECV into `buf` (zeroed here first, as the kernel requires; it must
    /// hold at least the kernel's `seccomp_notif` size), returning the fields this crate knows.
    pub fn seccomp_notif_recv(listener: BorrowedFd<'_>, buf: &mut [u64]) -> io::Result<libc::seccomp_notif> {
        if std::mem::size_of_val(buf) < std::mem::size_of::<libc::seccomp_notif>() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        buf.fill(0);
        // SAFETY: `buf` is u64-aligned, zeroed and at least as large as the kernel's
        // seccomp_notif (the caller sized it from SECCOMP_GET_NOTIF_SIZES).
        let rc = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_RECV, buf.as_mut_ptr()) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the buffer is at least size_of::<seccomp_notif>() bytes, u64-aligned, and
        // every bit pattern is a valid seccomp_notif (plain integers).
        Ok(unsafe { std::ptr::read(buf.as_ptr().cast::<libc::seccomp_notif>()) })
    }

    /// SECCOMP_IOCTL_NOTIF_SEND: `allow` lets the call continue (SECCOMP_USER_NOTIF_FLAG_CONTINUE),
    /// otherwise it fails with `errno`. `resp_words` is the kernel's response size in u64s.
    pub fn seccomp_notif_send(
        listener: BorrowedFd<'_>,
        id: u64,
        allow: bool,
        errno: i32,
        resp_words: usize,
    ) -> io::Result<()> {
        // The response is 3 words on every kernel so far; a larger one (a future kernel) is
        // built on the heap.
        let words = resp_words.max(std::mem::size_of::<libc::seccomp_notif_resp>().div_ceil(8));
        let mut stack = [0u64; 8];
        let mut heap = Vec::new();
        let buf: &mut [u64] = if words <= stack.len() {
            &mut stack[..words]
        } else {
            heap.resize(words, 0);
            &mut heap
        };
        let resp = libc::seccomp_notif_resp {
            id,
            val: 0,
            error: if allow { 0 } else { -errno },
            flags: if allow { libc::SECCOMP_USER_NOTIF_FLAG_CONTINUE as u32 } else { 0 },
        };
        // SAFETY: `buf` is u64-aligned and at least size_of::<seccomp_notif_resp>() bytes, and
        // the ioctl reads the kernel's response size from it (zero beyond our fields).
        let rc = unsafe {
            std::ptr::write(buf.as_mut_ptr().cast::<libc::seccomp_notif_resp>(), resp);
            libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, buf.as_mut_ptr())
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// SECCOMP_IOCTL_NOTIF_ID_VALID: whether notification `id` is still pending (the target
    /// has not died or been interrupted since it was received).
    pub fn seccomp_notif_id_valid(listener: BorrowedFd<'_>, id: u64) -> io::Result<bool> {
        let mut id = id;
        // SAFETY: the ioctl reads one u64.
        let rc = unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ID_VALID, &mut id as *mut u64) };
        if rc == 0 {
            return Ok(true);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOENT) {
            return Ok(false);
        }
        Err(err)
    }

    /// SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (include/uapi/linux/seccomp.h, Linux 6.6): the
    /// flag of SECCOMP_IOCTL_NOTIF_SET_FLAGS that hands each notification and its reply
    /// between the target and the supervisor on one CPU. Not in libc yet.
    const SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: libc::c_ulong = 1;

    /// SECCOMP_IOCTL_NOTIF_SET_FLAGS (`SECCOMP_IOW(4, __u64)`) with
    /// SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP: the kernel wakes the supervisor on the notifying
    /// task's CPU, and the task on the replying supervisor's CPU. Kernels before 6.6 answer
    /// EINVAL (unknown ioctl); the listener then works as before, with ordinary wake-ups.
    pub fn seccomp_notif_set_sync_wake_up(listener: BorrowedFd<'_>) -> io::Result<()> {
        // SAFETY: this ioctl takes its argument by value (kernel/seccomp.c passes `arg`, not a
        // pointer, to seccomp_notify_set_flags), so no memory of ours is read or written; the
        // listener fd is open for the call's duration.
        let rc = unsafe {
            libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SET_FLAGS, SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// process_vm_readv(2) of `buf.len()` bytes at `addr` in process (or thread) `pid`.
    /// Returns the bytes read (short at an unmapped page).
    pub fn process_vm_read(pid: libc::pid_t, addr: u64, buf: &mut [u8]) -> io::Result<usize> {
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let remote = libc::iovec { iov_base: addr as usize as *mut libc::c_void, iov_len: buf.len() };
        // SAFETY: `local` describes `buf`, valid for writes of its length; the remote address
        // is only dereferenced by the kernel in the other process, which checks it.
        let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// process_vm_readv(2) of several remote ranges of thread `pid` into one buffer, in
    /// order (`buf` must be at least the sum of the lengths). Returns the bytes read: the
    /// kernel stops at the first range that faults, so a short count means the ranges after
    /// the one it ended in were not read.
    pub fn process_vm_read_ranges(pid: libc::pid_t, ranges: &[(u64, usize)], buf: &mut [u8]) -> io::Result<usize> {
        let total: usize = ranges.iter().map(|(_, len)| len).sum();
        if total > buf.len() {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: total };
        let remote: Vec<libc::iovec> = ranges
            .iter()
            .map(|&(addr, len)| libc::iovec { iov_base: addr as usize as *mut libc::c_void, iov_len: len })
            .collect();
        // SAFETY: `local` describes the first `total` bytes of `buf`, valid for writes; the
        // remote iovecs are only dereferenced by the kernel, in the other process, with its
        // checks; both arrays outlive the call and their lengths are passed.
        let n = unsafe { libc::process_vm_readv(pid, &local, 1, remote.as_ptr(), remote.len() as libc::c_ulong, 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// pidfd_open(2) of thread `tid` (PIDFD_THREAD, Linux 6.9: a thread that does not lead
    /// its group gets a pidfd of its own).
    pub fn pidfd_open_thread(tid: libc::pid_t) -> io::Result<OwnedFd> {
        // SAFETY: pidfd_open takes two integers; a non-negative result is a new fd we own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, tid, PIDFD_THREAD) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
    }

    /// Ids of a task as PIDFD_GET_INFO reports them (in this process's pid and user
    /// namespaces).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct TaskIds {
        pub tgid: u32,
        pub ppid: u32,
        /// The real uid (the first `Uid:` field of `/proc/PID/status`).
        pub uid: u32,
    }

    /// The kernel's struct pidfd_info as of Linux 6.13 (PIDFD_INFO_SIZE_VER0); later kernels
    /// append fields and fill only as much as the size in the ioctl number says.
    #[repr(C)]
    #[derive(Default)]
    struct PidfdInfo {
        mask: u64,
        cgroupid: u64,
        pid: u32,
        tgid: u32,
        ppid: u32,
        ruid: u32,
        rgid: u32,
        euid: u32,
        egid: u32,
        suid: u32,
        sgid: u32,
        fsuid: u32,
        fsgid: u32,
        spare0: u32,
    }
    const _: () = assert!(std::mem::size_of::<PidfdInfo>() == 64);

    const PIDFD_THREAD: libc::c_int = libc::O_EXCL;
    const PIDFD_INFO_CREDS: u64 = 1 << 1;
    /// _IOWR(PIDFS_IOCTL_MAGIC 0xFF, 11, struct pidfd_info of 64 bytes).
    const PIDFD_GET_INFO: libc::c_ulong = (3 << 30) | (64 << 16) | (0xFF << 8) | 11;

    /// PIDFD_GET_INFO (Linux 6.13) on `pidfd`: the task's thread group, parent and real
    /// uid without generating `/proc/PID/status`. ENOTTY or EINVAL on older kernels.
    pub fn pidfd_task_ids(pidfd: BorrowedFd<'_>) -> io::Result<TaskIds> {
        let mut info = PidfdInfo { mask: PIDFD_INFO_CREDS, ..PidfdInfo::default() };
        // SAFETY: PIDFD_GET_INFO reads and writes one struct pidfd_info of the size encoded
        // in the request number (64 bytes, the size of `info`); the fd is open for the call.
        let rc = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO, &raw mut info) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if info.mask & PIDFD_INFO_CREDS == 0 {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        Ok(TaskIds { tgid: info.tgid, ppid: info.ppid, uid: info.ruid })
    }

    /// Receives one fd sent as SCM_RIGHTS on `socket` (made close-on-exec). Ok(None) when the
    /// peer closed the socket, or sent data without an fd.
    pub fn recv_fd(socket: BorrowedFd<'_>) -> io::Result<Option<OwnedFd>> {
        let mut control = [0u64; 8];
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
        // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        let n = loop {
            // SAFETY: `msg` describes valid buffers for the data byte and the control data.
            let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
            if n >= 0 {
                break n;
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        };
        if n == 0 {
            return Ok(None);
        }
        let mut received = None;
        // SAFETY: the kernel filled `msg_controllen` bytes of `control`; CMSG_FIRSTHDR and
        // CMSG_NXTHDR stay inside them, and an SCM_RIGHTS payload is an array of ints, each a
        // new fd this process now owns.
        unsafe {
            let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
            while !cmsg.is_null() {
                if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                    let data = libc::CMSG_DATA(cmsg);
                    let count = ((*cmsg).cmsg_len - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<libc::c_int>();
                    for i in 0..count {
                        let fd = std::ptr::read_unaligned(data.cast::<libc::c_int>().add(i));
                        let owned = OwnedFd::from_raw_fd(fd);
                        if received.is_none() {
                            received = Some(owned);
                        }
                    }
                }
                cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
            }
        }
        Ok(received)
    }

    /// poll(2) on `fds` without a timeout, retrying on EINTR.
    pub fn poll(fds: &mut [libc::pollfd]) -> io::Result<()> {
        loop {
            // SAFETY: `fds` is a valid array of pollfd of the given length.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if rc >= 0 {
                return Ok(());
            }
            let err = io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EINTR) {
                return Err(err);
            }
        }
    }

    /// A close-on-exec eventfd (the stop signal of a loop thread).
    pub fn eventfd() -> io::Result<OwnedFd> {
        // SAFETY: eventfd(2) with integer arguments; a non-negative result is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Adds one to an eventfd's counter (wakes its pollers).
    pub fn eventfd_signal(fd: BorrowedFd<'_>) -> io::Result<()> {
        let one: u64 = 1;
        // SAFETY: an eventfd write takes exactly 8 bytes from a valid buffer.
        let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// openat(2) of `name` relative to the directory `dir`, close-on-exec.
    pub fn open_at(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
        // SAFETY: `name` is NUL-terminated and borrowed for the call; `dir` is open for its
        // duration; a non-negative result is a new fd we own.
        let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by openat and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// readlinkat(2) of `name` relative to `dir` into `buf`; returns the length of the link
    /// text written (not NUL-terminated; a full buffer means it may have been cut).
    pub fn readlink_at(dir: BorrowedFd<'_>, name: &CStr, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `name` is NUL-terminated, `buf` is valid for writes of its length and the
        // kernel writes at most that many bytes; `dir` is open for the call's duration.
        let n = unsafe { libc::readlinkat(dir.as_raw_fd(), name.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// openat2(2) of `path`, resolved with `dirfd` as the root (RESOLVE_IN_ROOT: `..` and
    /// absolute symlinks stay inside it) and without following procfs magic links
    /// (RESOLVE_NO_MAGICLINKS). `flags` are open flags (O_CLOEXEC is added).
    pub fn open_in_root(dirfd: BorrowedFd<'_>, path: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
        // The kernel's struct open_how (libc's is non-exhaustive).
        #[repr(C)]
        struct OpenHow {
            flags: u64,
            mode: u64,
            resolve: u64,
        }
        let how = OpenHow {
            flags: (flags | libc::O_CLOEXEC) as u64,
            mode: 0,
            resolve: libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS,
        };
        // SAFETY: `path` is NUL-terminated and `how` is a valid open_how of the size passed; a
        // non-negative result is a new fd we own.
        let fd = unsafe {
            libc::syscall(libc::SYS_openat2, dirfd.as_raw_fd(), path.as_ptr(), &how, std::mem::size_of::<OpenHow>())
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by openat2 and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
    }
}
