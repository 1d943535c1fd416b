//! The crate's raw system calls (everything aya does not expose; `poll(2)` lives in the event reader).
use std::{io, os::fd::BorrowedFd};

/// `BPF_MAP_FREEZE` from include/uapi/linux/bpf.h.
const BPF_MAP_FREEZE: libc::c_long = 22;

/// Freezes a map: no more writes from userspace. Together with `BPF_F_RDONLY_PROG` the
/// verifier then treats the map's contents as constants.
pub(crate) fn freeze_map(fd: BorrowedFd<'_>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // union bpf_attr for BPF_MAP_FREEZE: only `map_fd` (the first u32); the rest zero.
    let mut attr = [0u32; 16];
    attr[0] = fd.as_raw_fd() as u32;
    // SAFETY: `attr` is a valid, initialised buffer of the size passed; the kernel reads
    // it only during the call and writes nothing back for this command.
    let ret = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_FREEZE, attr.as_mut_ptr(), std::mem::size_of_val(&attr) as libc::c_uint)
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `BPF_LINK_GET_FD_BY_ID` from include/uapi/linux/bpf.h.
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

/// A new descriptor of the bpf_link with kernel id `id` (Linux 5.8).
pub(crate) fn link_fd_by_id(id: u32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // union bpf_attr for the *_GET_FD_BY_ID commands: `link_id`, `next_id`, `open_flags`.
    let mut attr = [0u32; 16];
    attr[0] = id;
    // SAFETY: `attr` is a valid, initialised buffer of the size passed; the kernel only
    // reads it. The result is a new descriptor or -1.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_GET_FD_BY_ID,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr) as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(ret).map_err(|_| io::Error::other("bpf returned an out-of-range descriptor"))?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// `SO_NETNS_COOKIE` (Linux 5.14): the cookie of the socket's network namespace.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of this process's network namespace, as `bpf_get_netns_cookie` reports it.
pub(crate) fn own_netns_cookie() -> io::Result<u64> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes passed; `fd` is ours.
    let rc =
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len) };
    let err = io::Error::last_os_error();
    // SAFETY: `fd` was opened above and is closed once.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err);
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_cookie_is_stable_and_nonzero() {
        match own_netns_cookie() {
            Ok(cookie) => {
                assert_ne!(cookie, 0);
                assert_eq!(own_netns_cookie().ok(), Some(cookie));
            }
            // Kernels before 5.14 lack the option; the loader then fails loudly.
            Err(err) => assert_eq!(err.raw_os_error(), Some(libc::ENOPROTOOPT), "{err}"),
        }
    }
}
