//! Enforcement in userspace, below the agent: the synchronous decision paths and the
//! evaluator behind them.
//!
//! The kernel holds an action (an `execve` caught by seccomp user-notification, an
//! `open` caught by a fanotify permission event) and hands it over as a [`Request`]; a
//! [`Decider`] answers through a [`Reply`]. A reply that is dropped unanswered denies,
//! so every error path on the synchronous side fails closed.
pub mod control;
pub mod evaluator;
pub mod exec_notify;
pub mod fanotify;
pub mod identity;
pub mod identity_socket;
mod line_socket;
pub mod metrics;
pub mod peer;
mod sys;
pub mod trust;

use std::fmt;

use agt_jail_policy::context::ProcFacts;
use serde::Serialize;

/// The file access an open asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileAccess {
    Read,
    Write,
    ReadWrite,
}

impl FileAccess {
    pub fn as_str(self) -> &'static str {
        match self {
            FileAccess::Read => "read",
            FileAccess::Write => "write",
            FileAccess::ReadWrite => "read_write",
        }
    }

    /// Whether the open can change the file (write budgets and write rules apply).
    pub fn writes(self) -> bool {
        !matches!(self, FileAccess::Read)
    }
}

/// The identity of a file as the kernel knows it (for verdict maps keyed by inode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FileIdentity {
    pub dev: u64,
    pub ino: u64,
}

/// What the held action is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestKind {
    /// `execve`/`execveat`. `path` is as the agent sees it (absolute when it could be
    /// resolved); `fileless` is an exec of a file descriptor (`AT_EMPTY_PATH`);
    /// `interpreter` is what a `#!` line of the file names.
    Exec {
        path: String,
        argv: Vec<String>,
        fileless: bool,
        identity: Option<FileIdentity>,
        interpreter: Option<String>,
    },
    /// An open of `path` (as the agent sees it).
    File { path: String, access: FileAccess, identity: Option<FileIdentity> },
}

/// One action the kernel is holding until it is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Host pid (thread group id) of the acting process.
    pub pid: u32,
    /// Host thread id of the acting thread.
    pub tid: u32,
    pub kind: RequestKind,
    /// Which mechanism holds the action (`seccomp_notify`, `fanotify`), for the record.
    pub plane: &'static str,
    /// The acting process's facts, when the plane read them while the action was held;
    /// None: the evaluator reads them from `/proc`.
    pub proc: Option<ProcFacts>,
}

/// The answer to a held action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Allow,
    /// Refuse with EPERM.
    Deny,
}

/// The one-shot answer channel of a held action. Dropping it unanswered denies.
pub struct Reply {
    send: Option<Box<dyn FnOnce(Answer) + Send>>,
}

impl Reply {
    pub fn new(send: impl FnOnce(Answer) + Send + 'static) -> Self {
        Reply { send: Some(Box::new(send)) }
    }

    pub fn answer(mut self, answer: Answer) {
        if let Some(send) = self.send.take() {
            send(answer);
        }
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if let Some(send) = self.send.take() {
            send(Answer::Deny);
        }
    }
}

impl fmt::Debug for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.send.is_some() { "Reply(pending)" } else { "Reply(answered)" })
    }
}

/// Decides held actions. `decide` may answer at once or later from another thread
/// (approvals); it must never block the caller for long.
pub trait Decider: Send + Sync {
    fn decide(&self, request: Request, reply: Reply);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn an_unanswered_reply_denies() {
        let (tx, rx) = mpsc::channel();
        drop(Reply::new(move |a| tx.send(a).unwrap()));
        assert_eq!(rx.recv().unwrap(), Answer::Deny);
    }

    #[test]
    fn a_reply_answers_once() {
        let (tx, rx) = mpsc::channel();
        Reply::new(move |a| tx.send(a).unwrap()).answer(Answer::Allow);
        assert_eq!(rx.recv().unwrap(), Answer::Allow);
        assert!(rx.try_recv().is_err());
    }
}
