//! The crate's raw system calls (everything aya does not expose).
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
