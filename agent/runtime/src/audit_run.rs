//! `exec --audit FILE`: the run's audit log. Every record the events sink writes (the
//! evaluator's decisions and observations, or the kernel's events without a policy) goes
//! to the log too, as whole lines; the sink's flush, which comes before every answer to a
//! held action, is the log's group commit.
use std::{
    io::{self, Write},
    sync::{Arc, Mutex},
    time::Duration,
};

use agt_jail_audit::{key, AuditLog, LineWriter, LogOptions, SharedLog, SyncPolicy, Ticker};
use anyhow::{anyhow, Context, Result};

use crate::AuditOptions;

/// An open audit log, closed (final checkpoint) by [`AuditRun::close`] or when dropped.
pub struct AuditRun {
    log: SharedLog,
    ticker: Option<Ticker>,
    did: String,
    policy: String,
    /// The policy the entries written from now on name (a reload replaces it).
    in_force: Arc<Mutex<String>>,
    closed: bool,
}

impl AuditRun {
    /// Opens the log `args` names, if any: the key loads (or is created) and the file is
    /// started before anything of the run exists, so a bad flag fails the run at once.
    /// `did` and `policy` name the agent and the policy in force (`policy_hash`) in every entry.
    pub fn open(args: &AuditOptions, did: &str, policy: &str) -> Result<Option<AuditRun>> {
        let Some(path) = args.file.as_deref() else { return Ok(None) };
        let signing = key::load_or_create(&args.key).map_err(|e| anyhow!("{e}"))?;
        let opts = LogOptions {
            checkpoint_every: args.checkpoint_every,
            checkpoint_interval: Duration::from_secs(args.checkpoint_secs),
            sync: args.sync.parse::<SyncPolicy>().map_err(|e| anyhow!("--audit-sync: {e}"))?,
            rotate_bytes: args.rotate,
            ..LogOptions::default()
        };
        let interval = opts.checkpoint_interval;
        let log = Arc::new(Mutex::new(AuditLog::create(path, signing, opts).map_err(|e| anyhow!("{e}"))?));
        let ticker = Ticker::start(Arc::clone(&log), interval).context("cannot start the audit checkpoint timer")?;
        Ok(Some(AuditRun {
            log,
            ticker: Some(ticker),
            did: did.to_string(),
            policy: policy.to_string(),
            in_force: Arc::new(Mutex::new(policy.to_string())),
            closed: false,
        }))
    }

    /// A writer of record lines into the log.
    pub fn writer(&self) -> AuditLines {
        let current = lock(&self.in_force).clone();
        AuditLines {
            writer: LineWriter::new(Arc::clone(&self.log), self.did.clone(), current.clone()),
            log: Arc::clone(&self.log),
            did: self.did.clone(),
            in_force: Arc::clone(&self.in_force),
            current,
        }
    }

    /// The DID every entry names.
    pub fn did(&self) -> &str {
        &self.did
    }

    /// The policy hash the run started under.
    pub fn policy(&self) -> &str {
        &self.policy
    }

    /// Leaves the log open (no closing checkpoint), for `agt-jail audit recover` to
    /// continue: what the run's pinned rings still hold belongs in it.
    pub fn abandon(&mut self) {
        self.closed = true;
        drop(self.ticker.take());
        let mut log = self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(err) = log.flush() {
            agt_jail_jail::stderr_line!("agt-jail: warning: cannot write the audit log: {err}");
        }
    }

    /// Writes the closing checkpoint.
    pub fn close(&mut self) -> Result<()> {
        self.closed = true;
        drop(self.ticker.take());
        let mut log = self.log.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        log.close().map_err(|e| anyhow!("cannot close the audit log: {e}"))
    }
}

impl Drop for AuditRun {
    fn drop(&mut self) {
        if !self.closed {
            if let Err(err) = self.close() {
                agt_jail_jail::stderr_line!("agt-jail: warning: {err}");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Record lines into the log, as entries of the agent under the policy in force when they
/// are written: a reload sets [`AuditLines::policy_in_force`] at its switch, after the
/// lines recorded before it have been written.
pub struct AuditLines {
    log: SharedLog,
    did: String,
    in_force: Arc<Mutex<String>>,
    current: String,
    writer: LineWriter,
}

impl AuditLines {
    /// The policy hash the entries written from now on name.
    pub fn policy_in_force(&self) -> Arc<Mutex<String>> {
        Arc::clone(&self.in_force)
    }
}

impl Write for AuditLines {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let next = {
            let in_force = lock(&self.in_force);
            (*in_force != self.current).then(|| in_force.clone())
        };
        if let Some(next) = next {
            // The sink writes whole lines only: nothing of a line is left in the old writer.
            self.writer.flush()?;
            self.writer = LineWriter::new(Arc::clone(&self.log), self.did.clone(), next.clone());
            self.current = next;
        }
        self.writer.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.writer.flush()
    }
}

/// The events file's writer and the audit log's, as one: both get every line.
pub fn tee(events: Option<Box<dyn Write + Send>>, audit: Option<AuditLines>) -> Option<Box<dyn Write + Send>> {
    match (events, audit) {
        (events, None) => events,
        (events, Some(audit)) => Some(Box::new(Tee { events, audit })),
    }
}

struct Tee {
    events: Option<Box<dyn Write + Send>>,
    audit: AuditLines,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Both get the lines even when one fails; the first error is the one reported.
        let events = self.events.as_mut().map_or(Ok(()), |out| out.write_all(buf));
        let audit = self.audit.write_all(buf);
        events.and(audit).map(|()| buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let events = self.events.as_mut().map_or(Ok(()), |out| out.flush());
        let audit = self.audit.flush();
        events.and(audit)
    }
}
