//! The one place this crate makes raw system calls. Each wrapper states the
//! conditions under which it is sound, so callers stay in safe Rust.
//!
//! Wrappers used between clone and exec (marked "child-safe") allocate nothing and
//! take no locks: the launcher clones a possibly multi-threaded parent with a raw
//! clone(2), after which only async-signal-safe work is allowed. `io::Error` built from
//! an errno does not allocate.
use std::{ffi::CStr, io, ptr};

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Like [`check`], but one errno counts as success: the state the caller wanted already
/// holds (the entry exists, the process is gone). Child-safe: reads errno, allocates nothing.
fn check_tolerating(rc: libc::c_int, tolerated: libc::c_int) -> io::Result<()> {
    match check(rc) {
        Ok(_) => Ok(()),
        Err(err) if err.raw_os_error() == Some(tolerated) => Ok(()),
        Err(err) => Err(err),
    }
}

fn check_long(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Sends `signal` to process `pid`. Missing processes (ESRCH) are not an error:
/// the caller wanted them gone or signalled, and a process that already exited
/// satisfies that. Child-safe.
pub fn kill(pid: libc::pid_t, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    check_tolerating(unsafe { libc::kill(pid, signal) }, libc::ESRCH)
}

/// Makes every process this thread creates from now on start with normal scheduling:
/// a real-time policy becomes SCHED_OTHER and a negative nice value 0 in the child
/// (SCHED_RESET_ON_FORK), while this thread keeps its own. Setting the flag needs no
/// privilege.
pub fn reset_scheduling_on_fork() -> io::Result<()> {
    // SAFETY: sched_getscheduler(2) on the calling thread touches no memory of ours.
    let policy = check(unsafe { libc::sched_getscheduler(0) })?;
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid, writable sched_param for the duration of the call.
    check(unsafe { libc::sched_getparam(0, &mut param) })?;
    // SAFETY: `param` is a valid sched_param; the policy is the thread's own, with the
    // reset-on-fork flag added.
    check(unsafe { libc::sched_setscheduler(0, policy | libc::SCHED_RESET_ON_FORK, &param) })?;
    Ok(())
}

/// pidfd_open(2): a descriptor that names process `pid` for as long as it exists; a
/// signal sent through it can never reach a later process that reuses the number.
pub fn pidfd_open(pid: libc::pid_t) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: pidfd_open takes plain integers and touches no memory of ours.
    let fd = check_long(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    let fd = libc::c_int::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just returned this descriptor and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// pidfd_send_signal(2). A process that is gone (ESRCH) is not an error, as in [`kill`].
pub fn pidfd_send_signal(pidfd: std::os::fd::BorrowedFd<'_>, signal: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd is borrowed for the call; a null siginfo asks the kernel to fill in
    // the sender's own, and no other memory is touched.
    let rc = unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0)
    };
    check_tolerating(if rc < 0 { -1 } else { 0 }, libc::ESRCH)
}

/// write(2) of a whole small buffer to a raw fd, for use between fork and exec:
/// it allocates nothing and is async-signal-safe.
pub fn write_all_raw(fd: libc::c_int, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: `bytes` is a valid slice for its length; the fd is owned by the caller
    // and stays open for the duration of the call.
    let written = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    if written < 0 {
        return Err(io::Error::last_os_error());
    }
    if written as usize != bytes.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
    }
    Ok(())
}

/// read(2) into `buf`; returns the byte count (0 at end of file).
pub fn read_raw(fd: libc::c_int, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// A pipe whose ends are close-on-exec. Returns (read, write).
pub fn pipe_cloexec() -> io::Result<(libc::c_int, libc::c_int)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    Ok((fds[0], fds[1]))
}

/// Takes ownership of a descriptor this process just created (closed when dropped).
pub fn owned(fd: libc::c_int) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    // SAFETY: callers pass a descriptor they created and hand over; nothing else closes it.
    unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }
}

/// close(2). Child-safe.
pub fn close(fd: libc::c_int) {
    // SAFETY: closing an fd the caller owns; errors are irrelevant to callers.
    unsafe { libc::close(fd) };
}

/// Marks every fd from `first` up close-on-exec, so the agent inherits only stdio:
/// close_range(CLOSE_RANGE_CLOEXEC) (Linux 5.11); where the kernel refuses the flag
/// (EINVAL: 5.10) or the call (ENOSYS), each open fd listed in /proc/self/fd. Child-safe.
pub fn cloexec_from(first: libc::c_uint) -> io::Result<()> {
    // SAFETY: close_range with plain integers.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, libc::c_uint::MAX, libc::CLOSE_RANGE_CLOEXEC) };
    match check_long(rc) {
        Ok(_) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => cloexec_listed(first),
        Err(e) => Err(e),
    }
}

/// [`cloexec_from`] by reading /proc/self/fd (getdents64 into a buffer on the stack:
/// child-safe, no allocation).
fn cloexec_listed(first: libc::c_uint) -> io::Result<()> {
    const DIR: &CStr = c"/proc/self/fd";
    // SAFETY: a NUL-terminated path and plain flags.
    let dir = check(unsafe { libc::open(DIR.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC) })?;
    let mut buf = [0u8; 4096];
    let result = loop {
        // SAFETY: the buffer is valid for writes of its length.
        let n = unsafe { libc::syscall(libc::SYS_getdents64, dir, buf.as_mut_ptr(), buf.len()) };
        let n = match check_long(n) {
            Ok(0) => break Ok(()),
            Ok(n) => n as usize,
            Err(e) => break Err(e),
        };
        // struct linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, then the NUL-terminated name.
        let mut at = 0;
        let mut failed = None;
        while at + 19 <= n {
            let reclen = usize::from(u16::from_ne_bytes([buf[at + 16], buf[at + 17]]));
            if reclen == 0 || at + reclen > n {
                break;
            }
            let mut fd: libc::c_uint = 0;
            let mut digits = 0;
            for byte in &buf[at + 19..at + reclen] {
                match byte {
                    b'0'..=b'9' => {
                        fd = fd.saturating_mul(10).saturating_add(libc::c_uint::from(byte - b'0'));
                        digits += 1;
                    }
                    _ => break,
                }
            }
            at += reclen;
            if digits == 0 || fd < first || fd as libc::c_int == dir {
                continue;
            }
            // SAFETY: fcntl on an fd number with a plain flag; a closed fd fails with EBADF.
            let rc = unsafe { libc::fcntl(fd as libc::c_int, libc::F_SETFD, libc::FD_CLOEXEC) };
            if let Err(e) = check(rc) {
                if e.raw_os_error() != Some(libc::EBADF) {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
    };
    close(dir);
    result
}

/// dup2(2). Child-safe.
pub fn dup2(from: libc::c_int, to: libc::c_int) -> io::Result<()> {
    // SAFETY: plain integers.
    check(unsafe { libc::dup2(from, to) }).map(|_| ())
}

/// A raw clone(2) with `flags` (namespace flags | SIGCHLD) and no new stack: it
/// behaves like fork(2) and returns 0 in the child. Unlike glibc's fork it runs no
/// atfork handlers, so the child must only call child-safe functions until it execs
/// or exits.
pub fn clone_process(flags: libc::c_ulong) -> io::Result<libc::pid_t> {
    // SAFETY: with a null stack the child continues on a copy of the caller's stack,
    // exactly like fork(2); the other pointer arguments are null and unused because
    // no CLONE_*TID / CLONE_SETTLS flag is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags,
            ptr::null_mut::<libc::c_void>(),
            ptr::null_mut::<libc::c_int>(),
            ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    check_long(rc).map(|pid| pid as libc::pid_t)
}

/// unshare(2). Child-safe.
pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: plain integer flags.
    check(unsafe { libc::unshare(flags) }).map(|_| ())
}

/// Leaves the process immediately, without running Rust or libc exit handlers
/// (they belong to the parent's copy of the address space). Child-safe.
pub fn exit_now(code: libc::c_int) -> ! {
    // SAFETY: _exit never returns and has no preconditions.
    unsafe { libc::_exit(code) }
}

/// waitpid(2), retrying on EINTR unless `interruptible`. Returns (pid, raw status).
pub fn waitpid(pid: libc::pid_t, interruptible: bool) -> io::Result<(libc::pid_t, libc::c_int)> {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if rc >= 0 {
            return Ok((rc, status));
        }
        let err = io::Error::last_os_error();
        if interruptible || err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// mount(2) with optional source, fstype and data. Child-safe.
pub fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> io::Result<()> {
    let opt = |s: Option<&CStr>| s.map_or(ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives the call.
    check(unsafe { libc::mount(opt(source), target.as_ptr(), opt(fstype), flags, opt(data).cast()) }).map(|_| ())
}

/// umount2(2). Child-safe.
pub fn umount2(target: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: `target` is NUL-terminated.
    check(unsafe { libc::umount2(target.as_ptr(), flags) }).map(|_| ())
}

/// pivot_root(2). Child-safe.
pub fn pivot_root(new_root: &CStr, put_old: &CStr) -> io::Result<()> {
    // SAFETY: both paths are NUL-terminated strings.
    check_long(unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) }).map(|_| ())
}

/// chdir(2). Child-safe.
pub fn chdir(path: &CStr) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated.
    check(unsafe { libc::chdir(path.as_ptr()) }).map(|_| ())
}

/// mkdir(2); an existing entry is not an error. Child-safe.
pub fn mkdir(path: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated.
    check_tolerating(unsafe { libc::mkdir(path.as_ptr(), mode) }, libc::EEXIST)
}

/// Creates an empty regular file (a bind-mount target); existing is fine. Child-safe.
pub fn touch(path: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: `path` is NUL-terminated; the fd is closed right away.
    let fd = check(unsafe {
        libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CREAT | libc::O_CLOEXEC | libc::O_NOFOLLOW, mode)
    })?;
    close(fd);
    Ok(())
}

/// symlink(2); an existing entry is not an error. Child-safe.
pub fn symlink(target: &CStr, link: &CStr) -> io::Result<()> {
    // SAFETY: both are NUL-terminated.
    check_tolerating(unsafe { libc::symlink(target.as_ptr(), link.as_ptr()) }, libc::EEXIST)
}

/// open(2) with flags; returns the fd. Child-safe.
pub fn open(path: &CStr, flags: libc::c_int) -> io::Result<libc::c_int> {
    // SAFETY: `path` is NUL-terminated; no O_CREAT, so no mode is read.
    check(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) })
}

/// Writes `bytes` to the file at `path` (cgroup.procs, uid_map, sysctls). Child-safe.
pub fn write_file(path: &CStr, bytes: &[u8]) -> io::Result<()> {
    let fd = open(path, libc::O_WRONLY)?;
    let result = write_all_raw(fd, bytes);
    close(fd);
    result
}

/// Mount flags of the filesystem holding `path` (statvfs f_flag mapped to MS_*), so a
/// read-only remount keeps the nosuid/nodev/noexec locks a user namespace requires.
/// Child-safe.
pub fn mount_flags_of(path: &CStr) -> io::Result<libc::c_ulong> {
    // SAFETY: an all-zero statvfs is a valid value to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` is a valid out pointer.
    check(unsafe { libc::statvfs(path.as_ptr(), &mut st) })?;
    let map = [
        (libc::ST_RDONLY, libc::MS_RDONLY),
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    Ok(map.iter().filter(|(st_flag, _)| st.f_flag & st_flag != 0).fold(0, |acc, (_, ms)| acc | ms))
}

/// True when `fd` refers to a directory. Child-safe.
pub fn fd_is_dir(fd: libc::c_int) -> io::Result<bool> {
    // SAFETY: an all-zero stat is a valid value to be overwritten.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out pointer.
    check(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st.st_mode & libc::S_IFMT == libc::S_IFDIR)
}

/// sethostname(2). Child-safe.
pub fn sethostname(name: &[u8]) -> io::Result<()> {
    // SAFETY: `name` is valid for its length.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(|_| ())
}

/// setsid(2). Child-safe.
pub fn setsid() -> io::Result<()> {
    // SAFETY: no arguments.
    check(unsafe { libc::setsid() }).map(|_| ())
}

/// Makes `fd` (a terminal) the controlling terminal of this session. Child-safe.
pub fn set_controlling_tty(fd: libc::c_int) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument.
    check(unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) }).map(|_| ())
}

/// Brings the loopback interface up in the current network namespace. Child-safe.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: socket(2) with integer arguments.
    let fd = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: an all-zero ifreq is valid; the name fits in IFNAMSIZ.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    req.ifr_name[0] = b'l' as libc::c_char;
    req.ifr_name[1] = b'o' as libc::c_char;
    // SAFETY: `req` is a valid ifreq for SIOCGIFFLAGS/SIOCSIFFLAGS; the union member
    // written and read is ifru_flags.
    let result = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            Err(io::Error::last_os_error())
        } else {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            check(libc::ioctl(fd, libc::SIOCSIFFLAGS, &req)).map(|_| ())
        }
    };
    close(fd);
    result
}

/// The parent's pid as this process sees it. Child-safe.
pub fn parent_pid() -> u32 {
    // SAFETY: getppid(2) takes no arguments and cannot fail.
    let ppid = unsafe { libc::getppid() };
    u32::try_from(ppid).unwrap_or(0)
}

/// prctl(2) with up to two integer arguments. Child-safe.
pub fn prctl(option: libc::c_int, arg2: libc::c_ulong, arg3: libc::c_ulong) -> io::Result<libc::c_int> {
    // SAFETY: the options this crate uses take integer arguments only.
    check(unsafe { libc::prctl(option, arg2, arg3, 0 as libc::c_ulong, 0 as libc::c_ulong) })
}

/// Clears the effective, permitted and inheritable capability sets. Child-safe.
pub fn clear_capabilities() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header { version: LINUX_CAPABILITY_VERSION_3, pid: 0 };
    let data = [Data { effective: 0, permitted: 0, inheritable: 0 }; 2];
    // SAFETY: capset reads a v3 header and two data structs, which is what we pass.
    check_long(unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) }).map(|_| ())
}

/// setrlimit(2). Child-safe.
pub fn setrlimit(resource: libc::__rlimit_resource_t, soft: u64, hard: u64) -> io::Result<()> {
    let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: `limit` is a valid rlimit.
    check(unsafe { libc::setrlimit(resource, &limit) }).map(|_| ())
}

/// The soft RLIMIT_STACK (`RLIM_INFINITY` as u64::MAX).
pub fn stack_rlimit() -> io::Result<u64> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one rlimit into `limit`.
    check(unsafe { libc::getrlimit(libc::RLIMIT_STACK, &mut limit) })?;
    Ok(limit.rlim_cur)
}

/// The Landlock ABI version the kernel supports, or the errno when it has none.
pub fn landlock_abi() -> io::Result<u32> {
    // SAFETY: with a null attribute, size 0 and the VERSION flag the call only returns a number.
    let rc = unsafe {
        libc::syscall(libc::SYS_landlock_create_ruleset, ptr::null::<libc::c_void>(), 0usize, 1 as libc::c_uint)
    };
    check_long(rc).map(|v| v as u32)
}

/// landlock_create_ruleset(2) with the three-field attribute (fs, net, scoped). Child-safe.
pub fn landlock_create_ruleset(fs: u64, net: u64, scoped: u64, abi: u32) -> io::Result<libc::c_int> {
    let attr = [fs, net, scoped];
    // ABI 1-3 know only handled_access_fs, ABI 4-5 add net; a larger size with non-zero
    // unknown fields is rejected, so pass the size this kernel understands.
    let size = match abi {
        0..=3 => 8usize,
        4 | 5 => 16,
        _ => 24,
    };
    // SAFETY: `attr` is valid for `size` bytes (at most 24).
    let rc = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, attr.as_ptr(), size, 0 as libc::c_uint) };
    check_long(rc).map(|fd| fd as libc::c_int)
}

/// Adds a path-beneath rule for the directory or file open at `parent_fd`. Child-safe.
pub fn landlock_add_path_rule(ruleset: libc::c_int, access: u64, parent_fd: libc::c_int) -> io::Result<()> {
    #[repr(C, packed)]
    struct PathBeneath {
        allowed_access: u64,
        parent_fd: i32,
    }
    let rule = PathBeneath { allowed_access: access, parent_fd };
    // SAFETY: rule type 1 (LANDLOCK_RULE_PATH_BENEATH) reads a packed PathBeneath.
    let rc =
        unsafe { libc::syscall(libc::SYS_landlock_add_rule, ruleset, 1 as libc::c_uint, &rule, 0 as libc::c_uint) };
    check_long(rc).map(|_| ())
}

/// Adds a TCP port rule. Child-safe.
pub fn landlock_add_port_rule(ruleset: libc::c_int, access: u64, port: u16) -> io::Result<()> {
    #[repr(C)]
    struct NetPort {
        allowed_access: u64,
        port: u64,
    }
    let rule = NetPort { allowed_access: access, port: u64::from(port) };
    // SAFETY: rule type 2 (LANDLOCK_RULE_NET_PORT) reads a NetPort.
    let rc =
        unsafe { libc::syscall(libc::SYS_landlock_add_rule, ruleset, 2 as libc::c_uint, &rule, 0 as libc::c_uint) };
    check_long(rc).map(|_| ())
}

/// landlock_restrict_self(2). Child-safe.
pub fn landlock_restrict_self(ruleset: libc::c_int) -> io::Result<()> {
    // SAFETY: plain integers.
    check_long(unsafe { libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0 as libc::c_uint) }).map(|_| ())
}

/// Installs a classic-BPF seccomp filter (no_new_privs must already be set). Child-safe.
pub fn seccomp_set_filter(filter: &[libc::sock_filter]) -> io::Result<()> {
    let len = u16::try_from(filter.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let prog = libc::sock_fprog { len, filter: filter.as_ptr().cast_mut() };
    // SAFETY: `prog` points at `len` valid instructions that outlive the call (the
    // kernel copies them).
    let rc = unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0 as libc::c_uint, &prog) };
    check_long(rc).map(|_| ())
}

/// Installs a classic-BPF seccomp filter with SECCOMP_FILTER_FLAG_NEW_LISTENER and returns
/// the listener fd (close-on-exec). Needs no_new_privs or CAP_SYS_ADMIN. Child-safe.
pub fn seccomp_set_filter_listener(filter: &[libc::sock_filter]) -> io::Result<libc::c_int> {
    let len = u16::try_from(filter.len()).map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?;
    let prog = libc::sock_fprog { len, filter: filter.as_ptr().cast_mut() };
    // SAFETY: `prog` points at `len` valid instructions that outlive the call (the
    // kernel copies them); with NEW_LISTENER the return value is a new fd.
    let rc = unsafe {
        libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, libc::SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog)
    };
    check_long(rc).map(|fd| fd as libc::c_int)
}

/// Sends `fd` over the unix socket `socket` (one byte of data, the fd as SCM_RIGHTS).
/// Child-safe: the control buffer is on the stack.
pub fn send_fd(socket: libc::c_int, fd: libc::c_int) -> io::Result<()> {
    // Room for one cmsghdr carrying one int, u64-aligned (CMSG_SPACE(4) is 24 on LP64).
    let mut control = [0u64; 4];
    let mut byte = [b'L'];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is pure arithmetic.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    // SAFETY: msg_control points at `control`, which is at least CMSG_SPACE(4) bytes and
    // aligned for cmsghdr; CMSG_FIRSTHDR/CMSG_DATA stay inside it.
    let rc = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>(), fd);
        libc::sendmsg(socket, &msg, libc::MSG_NOSIGNAL)
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether seccomp filter mode is available (prctl PR_GET_SECCOMP works and the
/// action SECCOMP_RET_ERRNO is known to the kernel).
pub fn seccomp_available() -> bool {
    let action: u32 = libc::SECCOMP_RET_ERRNO;
    // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32.
    let rc = unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_GET_ACTION_AVAIL, 0 as libc::c_uint, &action) };
    rc == 0
}

/// Whether this kernel has seccomp user notification (SECCOMP_RET_USER_NOTIF, Linux 5.0).
pub fn seccomp_notify_available() -> bool {
    let action: u32 = libc::SECCOMP_RET_USER_NOTIF;
    // SAFETY: SECCOMP_GET_ACTION_AVAIL reads one u32.
    let rc = unsafe { libc::syscall(libc::SYS_seccomp, libc::SECCOMP_GET_ACTION_AVAIL, 0 as libc::c_uint, &action) };
    rc == 0
}

/// execve(2): returns only on failure. Child-safe.
pub fn execve(path: &CStr, argv: &[*const libc::c_char], envp: &[*const libc::c_char]) -> io::Error {
    // SAFETY: `argv` and `envp` are null-terminated arrays of pointers to
    // NUL-terminated strings, all owned by the caller and alive during the call.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
}

/// Signal numbers recorded by [`install_forwarding_handlers`]'s handler, one bit each.
static PENDING_SIGNALS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

extern "C" fn record_signal(signal: libc::c_int) {
    if (1..64).contains(&signal) {
        PENDING_SIGNALS.fetch_or(1u64 << signal, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Installs a recording handler (without SA_RESTART, so a blocking waitpid returns
/// EINTR) for each of `signals`. pid 1 of a namespace only receives signals it has a
/// handler for. Child-safe.
pub fn install_forwarding_handlers(signals: &[libc::c_int]) -> io::Result<()> {
    for &signal in signals {
        // SAFETY: an all-zero sigaction is valid; we set the handler and an empty mask.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = record_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: `action.sa_mask` is a valid sigset_t; `action` is fully initialised and
        // the handler only touches an atomic.
        check(unsafe {
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, ptr::null_mut())
        })?;
    }
    Ok(())
}

/// Blocks `signals` (sigprocmask SIG_BLOCK). Child-safe.
pub fn block_signals(signals: &[libc::c_int]) -> io::Result<()> {
    // SAFETY: an all-zero sigset_t is valid storage; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is initialised by sigemptyset before signals are added.
    unsafe { libc::sigemptyset(&mut set) };
    for &signal in signals {
        // SAFETY: `set` is an initialised sigset_t.
        check(unsafe { libc::sigaddset(&mut set, signal) })?;
    }
    // SAFETY: a valid set and a null old-set pointer.
    check(unsafe { libc::sigprocmask(libc::SIG_BLOCK, &set, ptr::null_mut()) }).map(|_| ())
}

/// Waits, with no signal blocked, until a handler has run (sigsuspend): a signal blocked
/// outside the wait and raised meanwhile ends it at once, so none is lost. Child-safe.
pub fn wait_for_signal() {
    // SAFETY: an all-zero sigset_t is valid storage; sigemptyset initialises it.
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `empty` is initialised by sigemptyset; sigsuspend always returns -1/EINTR.
    unsafe {
        libc::sigemptyset(&mut empty);
        libc::sigsuspend(&empty);
    }
}

/// waitpid(-1, WNOHANG): Some((pid, status)) for a child that ended, None while every
/// child still runs. Child-safe.
pub fn reap_one() -> io::Result<Option<(libc::pid_t, libc::c_int)>> {
    let mut status = 0;
    // SAFETY: `status` is a valid out pointer.
    let rc = check(unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG | libc::__WALL) })?;
    Ok((rc > 0).then_some((rc, status)))
}

/// Takes the signals recorded since the last call (bit N set = signal N).
pub fn take_pending_signals() -> u64 {
    PENDING_SIGNALS.swap(0, std::sync::atomic::Ordering::SeqCst)
}

/// Restores default dispositions and an empty signal mask before exec. Child-safe.
pub fn reset_signals() {
    for signal in 1..32 {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: SIG_DFL for a valid signal number.
        unsafe { libc::signal(signal, libc::SIG_DFL) };
    }
    // SAFETY: an empty, initialised set is passed.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, ptr::null_mut());
    }
}

/// The effective uid.
pub fn geteuid() -> u32 {
    // SAFETY: no preconditions, cannot fail.
    unsafe { libc::geteuid() }
}

/// The effective gid.
pub fn getegid() -> u32 {
    // SAFETY: no preconditions, cannot fail.
    unsafe { libc::getegid() }
}

/// Opens a pseudo-terminal pair; returns (master, slave).
pub fn openpty() -> io::Result<(libc::c_int, libc::c_int)> {
    let (mut master, mut slave) = (0, 0);
    // SAFETY: out pointers are valid; name, termios and winsize are null (unused).
    check(unsafe { libc::openpty(&mut master, &mut slave, ptr::null_mut(), ptr::null(), ptr::null()) })?;
    for fd in [master, slave] {
        // SAFETY: F_SETFD on fds we just got.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((master, slave))
}

/// Copies the window size of terminal `from` to terminal `to` (best effort).
pub fn copy_winsize(from: libc::c_int, to: libc::c_int) {
    // SAFETY: an all-zero winsize is valid; both ioctls read/write one winsize.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(from, libc::TIOCGWINSZ, &mut ws) == 0 {
            libc::ioctl(to, libc::TIOCSWINSZ, &ws);
        }
    }
}

/// uname(2) release string.
pub fn kernel_release() -> String {
    // SAFETY: an all-zero utsname is valid to be overwritten.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid out pointer.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return "unknown".into();
    }
    // SAFETY: the kernel NUL-terminates release.
    unsafe { CStr::from_ptr(uts.release.as_ptr()) }.to_string_lossy().into_owned()
}

/// Switches terminal `fd` to raw mode; returns the previous settings, or None when
/// `fd` is not a terminal.
pub fn make_raw(fd: libc::c_int) -> Option<libc::termios> {
    // SAFETY: an all-zero termios is valid to be overwritten; tcgetattr/cfmakeraw/
    // tcsetattr read and write one termios.
    unsafe {
        let mut saved: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut saved) != 0 {
            return None;
        }
        let mut raw = saved;
        libc::cfmakeraw(&mut raw);
        libc::tcsetattr(fd, libc::TCSANOW, &raw);
        Some(saved)
    }
}

/// Restores terminal settings saved by [`make_raw`].
pub fn restore_termios(fd: libc::c_int, saved: &libc::termios) {
    // SAFETY: `saved` is a valid termios.
    unsafe { libc::tcsetattr(fd, libc::TCSANOW, saved) };
}

/// clone3(2) without a new stack (fork-like), optionally straight into the cgroup v2
/// directory open at `cgroup_fd` (CLONE_INTO_CGROUP, Linux 5.7): the child is born in
/// the agent's cgroup, so no migration (and no RCU grace period under the cgroup
/// threadgroup lock) is needed. `flags` are CLONE_* flags without an exit signal.
/// Same child-side rules as [`clone_process`].
pub fn clone3_process(flags: libc::c_ulong, cgroup_fd: Option<libc::c_int>) -> io::Result<libc::pid_t> {
    #[repr(C)]
    struct CloneArgs {
        flags: u64,
        pidfd: u64,
        child_tid: u64,
        parent_tid: u64,
        exit_signal: u64,
        stack: u64,
        stack_size: u64,
        tls: u64,
        set_tid: u64,
        set_tid_size: u64,
        cgroup: u64,
    }
    const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;
    let mut args = CloneArgs {
        flags,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: 0,
        stack_size: 0,
        tls: 0,
        set_tid: 0,
        set_tid_size: 0,
        cgroup: 0,
    };
    if let Some(fd) = cgroup_fd {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = fd as u64;
    }
    // SAFETY: `args` is a valid clone_args of the size passed; with a zero stack the
    // child continues on a copy of the caller's stack, like fork(2).
    let rc = unsafe { libc::syscall(libc::SYS_clone3, &mut args, std::mem::size_of::<CloneArgs>()) };
    check_long(rc).map(|pid| pid as libc::pid_t)
}

/// gettid(2).
pub fn gettid() -> libc::pid_t {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::gettid() }
}

/// A netlink socket of `protocol` (NETLINK_ROUTE, NETLINK_NETFILTER), close-on-exec, in
/// the calling thread's network namespace. Written to with `write(2)`, it talks to the
/// kernel (the default destination of an unconnected netlink socket).
pub fn netlink_socket(protocol: libc::c_int) -> io::Result<std::os::fd::OwnedFd> {
    // SAFETY: socket(2) with integer arguments; the new descriptor is handed to `owned`.
    let fd = check(unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) })?;
    Ok(owned(fd))
}

/// Moves the calling thread into the network namespace `fd` refers to. Only this thread
/// changes namespace; sockets it creates afterwards belong to that namespace.
pub fn setns_net(fd: std::os::fd::BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    setns_net_raw(fd.as_raw_fd())
}

/// [`setns_net`] on a raw descriptor the caller keeps open. Child-safe.
pub fn setns_net_raw(fd: libc::c_int) -> io::Result<()> {
    // SAFETY: setns(2) with integer arguments; no memory is passed.
    check(unsafe { libc::setns(fd, libc::CLONE_NEWNET) }).map(|_| ())
}

/// The index of network interface `name` in the calling thread's network namespace.
pub fn if_index(name: &CStr) -> io::Result<u32> {
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(io::Error::last_os_error()),
        index => Ok(index),
    }
}

/// Every address configured on an interface of the calling thread's network namespace.
pub fn interface_addresses() -> io::Result<Vec<std::net::IpAddr>> {
    let mut head: *mut libc::ifaddrs = ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `head`, freed below with freeifaddrs.
    check(unsafe { libc::getifaddrs(&mut head) })?;
    let mut found = Vec::new();
    let mut entry = head;
    while !entry.is_null() {
        // SAFETY: `entry` is a node of the list getifaddrs returned, not yet freed.
        let node = unsafe { &*entry };
        if !node.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr whose family says which struct it is.
            let family = libc::c_int::from(unsafe { (*node.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: the family is AF_INET, so the storage is a sockaddr_in.
                let sin = unsafe { &*node.ifa_addr.cast::<libc::sockaddr_in>() };
                found.push(std::net::IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes()));
            } else if family == libc::AF_INET6 {
                // SAFETY: the family is AF_INET6, so the storage is a sockaddr_in6.
                let sin6 = unsafe { &*node.ifa_addr.cast::<libc::sockaddr_in6>() };
                found.push(std::net::IpAddr::from(sin6.sin6_addr.s6_addr));
            }
        }
        entry = node.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once; no node is used afterwards.
    unsafe { libc::freeifaddrs(head) };
    Ok(found)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::fd::AsRawFd;

    fn cloexec(fd: libc::c_int) -> bool {
        // SAFETY: F_GETFD on an fd this test owns.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert!(flags >= 0);
        flags & libc::FD_CLOEXEC != 0
    }

    /// The path for kernels whose close_range lacks CLOSE_RANGE_CLOEXEC (5.10): every fd
    /// from `first` up listed in /proc/self/fd gets FD_CLOEXEC, those below keep theirs.
    #[test]
    fn fds_listed_in_proc_become_close_on_exec() {
        let (r, w) = super::pipe_cloexec().unwrap();
        let (r, w) = (super::owned(r), super::owned(w));
        for fd in [&r, &w] {
            // SAFETY: clearing FD_CLOEXEC on an fd this test owns.
            assert_eq!(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) }, 0);
        }
        let (low, high) = (r.as_raw_fd().min(w.as_raw_fd()), r.as_raw_fd().max(w.as_raw_fd()));
        super::cloexec_listed(high as libc::c_uint).unwrap();
        assert!(cloexec(high) && !cloexec(low));
        super::cloexec_listed(low as libc::c_uint).unwrap();
        assert!(cloexec(high) && cloexec(low));
    }
}
