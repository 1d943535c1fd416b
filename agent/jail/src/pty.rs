//! `--tty`: a pseudo-terminal for the agent, relayed to agt-jail's own stdio.
use std::{
    io,
    os::fd::{FromRawFd, OwnedFd},
};

use crate::sys;

/// A pty pair: the agent gets `slave`; agt-jail relays `master`.
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

impl Pty {
    pub fn open() -> io::Result<Self> {
        let (master, slave) = sys::openpty()?;
        // SAFETY: openpty just returned these fds and nothing else owns them.
        let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
        Ok(Self { master, slave })
    }

    /// Copies the size of agt-jail's terminal (stdin) to the agent's, when there is one.
    pub fn copy_size_from_stdin(&self) {
        use std::os::fd::AsRawFd;
        sys::copy_winsize(0, self.slave.as_raw_fd());
    }
}

/// Copies the window size of agt-jail's terminal (stdin) to the pty open at `to` (the
/// master works: the kernel then sends SIGWINCH to the agent's foreground group).
pub fn copy_window_size(to: std::os::fd::BorrowedFd<'_>) {
    use std::os::fd::AsRawFd;
    sys::copy_winsize(0, to.as_raw_fd());
}

/// Puts agt-jail's stdin terminal in raw mode while alive (keys go to the agent
/// untouched); restores it on drop. A non-terminal stdin is left alone.
pub struct RawMode {
    saved: Option<libc::termios>,
}

impl RawMode {
    pub fn enter() -> Self {
        Self { saved: sys::make_raw(0) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            sys::restore_termios(0, saved);
        }
    }
}
