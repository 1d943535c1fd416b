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
