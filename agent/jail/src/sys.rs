//! The one place this crate makes raw system calls. Each wrapper states the
//! conditions under which it is sound, so callers stay in safe Rust.
use std::io;

/// Sends `signal` to process `pid`. Missing processes (ESRCH) are not an error:
/// the caller wanted them gone or signalled, and a process that already exited
/// satisfies that.
pub fn kill(pid: libc::pid_t, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, signal) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ESRCH) {
        return Ok(());
    }
    Err(err)
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
