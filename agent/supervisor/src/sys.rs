//! The one place this crate makes raw system calls. Each wrapper states the conditions
//! under which it is sound, so the rest of the crate stays in safe Rust.
//!
//! Sections: seccomp user-notification (exec_notify), fanotify (fanotify), shared helpers.
