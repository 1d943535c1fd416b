//! Writing an audit log: entries chained and appended in batches, checkpoints signed
//! every N records, every T seconds and at close, files rotated by size.
use std::{
    fs::{File, OpenOptions},
    io::{self, Write},
    path::{Path, PathBuf},
    str::FromStr,
    sync::{mpsc, Arc, Mutex, MutexGuard},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use ed25519_dalek::SigningKey;

use crate::{
    canon::{canonicalize, CanonError},
    entry::{self, OpenFields, Reason, SignedHead, TreeHead, FORMAT},
    key::key_id,
    merkle::{leaf_hash, sha256, CompactTree, Hash},
    pipeline::{self, Batch, Canonical, Pipeline},
    AuditError,
};

/// When the log's file reaches the disk (see docs/audit.md, "Durability").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// fdatasync at every flush: each group of records is on disk before the answer.
    Always,
    /// write(2) at every flush (survives the death of agt-jail), fdatasync at every
    /// checkpoint and at close (survives a crash of the host up to the last checkpoint).
    Batch,
    /// write(2) at every flush, never fdatasync.
    None,
}

impl SyncPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncPolicy::Always => "always",
            SyncPolicy::Batch => "batch",
            SyncPolicy::None => "none",
        }
    }
}

impl FromStr for SyncPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(SyncPolicy::Always),
            "batch" => Ok(SyncPolicy::Batch),
            "none" => Ok(SyncPolicy::None),
            _ => Err(format!("{s:?} is not a sync policy (always, batch or none)")),
        }
    }
}

/// How a log is written.
#[derive(Debug, Clone)]
pub struct LogOptions {
    /// A checkpoint after this many entries (at least 1).
    pub checkpoint_every: u64,
    /// A checkpoint when records have waited this long unsigned.
    pub checkpoint_interval: Duration,
    pub sync: SyncPolicy,
    /// Start a new file when the current one would grow beyond this many bytes.
    pub rotate_bytes: Option<u64>,
    /// Milliseconds since the Unix epoch, for the entries' `time_ms` (a test passes a
    /// fixed clock to write the same log twice).
    pub clock: fn() -> u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            checkpoint_every: 1000,
            checkpoint_interval: Duration::from_secs(10),
            sync: SyncPolicy::Batch,
            rotate_bytes: None,
            clock: now_ms,
        }
    }
}

/// The file of rotation `index`: `PATH` first, then `PATH.1`, `PATH.2`, ...
pub fn rotated_path(base: &Path, index: u32) -> PathBuf {
    if index == 0 {
        return base.to_path_buf();
    }
    let mut name = base.as_os_str().to_owned();
    name.push(format!(".{index}"));
    PathBuf::from(name)
}

/// Longest record line accepted from the record sink.
pub const MAX_LINE: usize = 16 << 20;

/// An audit log being written. Not shared by itself: wrap it in [`SharedLog`].
pub struct AuditLog {
    base: PathBuf,
    key: SigningKey,
    key_id: String,
    opts: LogOptions,
    file: File,
    file_index: u32,
    file_bytes: u64,
    /// Entries not yet written to the file.
    pending: Vec<u8>,
    /// The second thread that makes large batches' canonical records.
    pipeline: Pipeline,
    /// The canonical records of a piece the appending thread makes itself.
    own_piece: Canonical,
    /// The DID and policy of the last record, and the start of their entries' lines
    /// (a writer's records share them: escaped once, not per record).
    line_start: (String, String, Vec<u8>),
    seq: u64,
    prev: Hash,
    tree: CompactTree,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    /// A checkpoint is in `pending` or written but not yet synced (batch policy).
    sync_due: bool,
    closed: bool,
}

/// The system clock in milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)).unwrap_or(0)
}

fn open_new(path: &Path, first: bool) -> Result<File, AuditError> {
    let mut options = OpenOptions::new();
    options.append(true);
    if first {
        // An existing empty file may be given (a mktemp name); one with entries may not:
        // a second chain in one file would not verify.
        options.create(true);
    } else {
        options.create_new(true);
    }
    let file = options.open(path).map_err(|e| AuditError::io(path, e))?;
    let len = file.metadata().map_err(|e| AuditError::io(path, e))?.len();
    if len > 0 {
        return Err(AuditError::Exists(path.to_path_buf()));
    }
    Ok(file)
}

impl AuditLog {
    /// Starts a log at `path` (which must be absent or empty) with its `open` entry.
    pub fn create(path: &Path, key: SigningKey, opts: LogOptions) -> Result<AuditLog, AuditError> {
        // A rotated file of an earlier log would be mistaken for this log's next one.
        if rotated_path(path, 1).exists() {
            return Err(AuditError::Exists(rotated_path(path, 1)));
        }
        let file = open_new(path, true)?;
        let key_id = key_id(&key.verifying_key());
        let mut opts = opts;
        opts.checkpoint_every = opts.checkpoint_every.max(1);
        let mut log = AuditLog {
            base: path.to_path_buf(),
            key,
            key_id,
            opts,
            file,
            file_index: 0,
            file_bytes: 0,
            pending: Vec::new(),
            pipeline: Pipeline::default(),
            own_piece: Canonical::default(),
            line_start: (String::new(), String::new(), Vec::new()),
            seq: 0,
            prev: entry::GENESIS,
            tree: CompactTree::default(),
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
            sync_due: false,
            closed: false,
        };
        let fields = OpenFields {
            checkpoint_every: log.opts.checkpoint_every,
            checkpoint_secs: log.opts.checkpoint_interval.as_secs(),
            format: FORMAT.into(),
            key_id: log.key_id.clone(),
            sync: log.opts.sync.as_str().into(),
            time_ms: (log.opts.clock)(),
        };
        let line = entry::open_line(&fields);
        log.push_line(line)?;
        log.flush()?;
        Ok(log)
    }

    /// Entries written so far (the next entry's `seq`).
    pub fn len(&self) -> u64 {
        self.seq
    }

    pub fn is_empty(&self) -> bool {
        self.seq == 0
    }

    /// Appends one record (the events file's record, one JSON text) for the agent `did`
    /// under the policy whose hash is `policy`.
    pub fn append_line(&mut self, did: &str, policy: &str, record: &[u8]) -> Result<(), AuditError> {
        self.use_line_start(did, policy);
        self.push_record(|out| canonicalize(record, out))
    }

    /// Appends the records of `lines` (JSON texts, one a line; empty lines are skipped; the
    /// last line may lack its newline), as [`AuditLog::append_line`] each in order. A large
    /// batch has its canonical records made on a second core while this thread chains
    /// them (`pipeline`); the entries are the same. On an error, the records before the
    /// bad one are appended and the rest are not.
    pub fn append_lines(&mut self, did: &str, policy: &str, lines: &[u8]) -> Result<(), AuditError> {
        self.use_line_start(did, policy);
        if let Some(batch) = self.pipeline.share(lines) {
            let (result, by_helper) = self.append_batch(&batch);
            self.pipeline.done(&batch, by_helper);
            return result;
        }
        for line in pipeline::lines(lines) {
            self.push_record(|out| canonicalize(line, out))?;
        }
        Ok(())
    }

    /// Chains the records of `batch`, its pieces made by the second thread or, when not
    /// ready, by this one; and how many the second thread made.
    fn append_batch(&mut self, batch: &Batch) -> (Result<(), AuditError>, usize) {
        let mut own = std::mem::take(&mut self.own_piece);
        let mut result = Ok(());
        let mut by_helper = 0;
        'pieces: for i in 0..batch.pieces() {
            let made = match batch.made(i) {
                Some(made) => {
                    by_helper += 1;
                    made
                }
                None => {
                    own.make(batch.piece(i));
                    &own
                }
            };
            let mut start = 0;
            for end in &made.ends {
                let end = match end {
                    Ok(end) => *end,
                    Err(err) => {
                        result = Err(self.not_json(err));
                        break 'pieces;
                    }
                };
                result = self.push_record(|out| {
                    out.extend_from_slice(&made.bytes[start..end]);
                    Ok(())
                });
                if result.is_err() {
                    break 'pieces;
                }
                start = end;
            }
        }
        self.own_piece = own;
        (result, by_helper)
    }

    /// The start of the entries of `did`'s records under `policy`, escaped once.
    fn use_line_start(&mut self, did: &str, policy: &str) {
        if self.line_start.2.is_empty() || self.line_start.0 != did || self.line_start.1 != policy {
            self.line_start = (did.to_string(), policy.to_string(), entry::record_line_start(did, policy));
        }
    }

    fn not_json(&self, err: &CanonError) -> AuditError {
        AuditError::Record { seq: self.seq, reason: format!("not JSON: {err}") }
    }

    /// Appends the next record entry (of the DID and policy [`AuditLog::use_line_start`]
    /// set), its canonical record written by `record`, straight into the pending bytes.
    fn push_record(&mut self, record: impl FnOnce(&mut Vec<u8>) -> Result<(), CanonError>) -> Result<(), AuditError> {
        if self.closed {
            return Err(AuditError::Closed(self.base.clone()));
        }
        let mark = self.pending.len();
        entry::write_record_head(&mut self.pending, &self.line_start.2, &self.prev);
        if let Err(err) = record(&mut self.pending) {
            self.pending.truncate(mark);
            return Err(self.not_json(&err));
        }
        entry::write_record_tail(&mut self.pending, self.seq);
        let adding = (self.pending.len() - mark + 1) as u64;
        if self.rotation_due(mark as u64, adding) {
            // The entries before this one go to the full file; this one starts the next.
            let line = self.pending.split_off(mark);
            self.rotate()?;
            self.pending.extend_from_slice(&line);
        }
        let start = self.pending.len() - (adding as usize - 1);
        let hash = sha256(&self.pending[start..]);
        self.pending.push(b'\n');
        self.chained(hash);
        self.since_checkpoint += 1;
        if self.since_checkpoint >= self.opts.checkpoint_every {
            self.checkpoint(Reason::Count)?;
        }
        Ok(())
    }

    /// The entry whose line hashes to `hash` is the last one.
    fn chained(&mut self, hash: Hash) {
        self.prev = hash;
        self.tree.push(leaf_hash(&hash));
        self.seq += 1;
    }

    fn push_line(&mut self, line: Vec<u8>) -> Result<(), AuditError> {
        if self.closed {
            return Err(AuditError::Closed(self.base.clone()));
        }
        let adding = line.len() as u64 + 1;
        if self.rotation_due(self.pending.len() as u64, adding) {
            self.rotate()?;
        }
        let hash = sha256(&line);
        self.pending.extend_from_slice(&line);
        self.pending.push(b'\n');
        self.chained(hash);
        Ok(())
    }

    /// Whether an entry of `adding` bytes, after `pending` bytes not yet written, would
    /// grow the file beyond the rotation size (a file holds at least one entry).
    fn rotation_due(&self, pending: u64, adding: u64) -> bool {
        let Some(max) = self.opts.rotate_bytes else { return false };
        let used = self.file_bytes + pending;
        used != 0 && used + adding > max
    }

    /// Writes the pending entries to the current file, syncs it, and starts the next.
    fn rotate(&mut self) -> Result<(), AuditError> {
        self.write_out()?;
        if self.opts.sync != SyncPolicy::None {
            self.file.sync_data().map_err(|e| AuditError::io(&self.path(), e))?;
        }
        let next = rotated_path(&self.base, self.file_index + 1);
        self.file = open_new(&next, false)?;
        self.file_index += 1;
        self.file_bytes = 0;
        Ok(())
    }

    /// The file being written.
    pub fn path(&self) -> PathBuf {
        rotated_path(&self.base, self.file_index)
    }

    /// Signs the tree of every entry so far and appends the checkpoint.
    pub fn checkpoint(&mut self, reason: Reason) -> Result<SignedHead, AuditError> {
        let head = TreeHead {
            key_id: self.key_id.clone(),
            log: FORMAT.into(),
            reason: reason.as_str().into(),
            root: hex::encode(self.tree.root()),
            time_ms: (self.opts.clock)(),
            tree_size: self.tree.size(),
        };
        let signed = SignedHead::sign(head, &self.key);
        let line = entry::checkpoint_line(self.seq, &self.prev, signed.clone());
        self.push_line(line)?;
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
        self.sync_due = true;
        Ok(signed)
    }

    /// A checkpoint when records have waited unsigned for the interval.
    pub fn tick(&mut self) -> Result<(), AuditError> {
        if !self.closed && self.since_checkpoint > 0 && self.last_checkpoint.elapsed() >= self.opts.checkpoint_interval
        {
            self.checkpoint(Reason::Time)?;
        }
        Ok(())
    }

    /// Writes the entries appended so far (one write) and syncs as the policy says.
    pub fn flush(&mut self) -> Result<(), AuditError> {
        self.tick()?;
        self.write_out()?;
        let sync = match self.opts.sync {
            SyncPolicy::Always => true,
            SyncPolicy::Batch => self.sync_due,
            SyncPolicy::None => false,
        };
        if sync {
            self.file.sync_data().map_err(|e| AuditError::io(&self.path(), e))?;
            self.sync_due = false;
        }
        Ok(())
    }

    fn write_out(&mut self) -> Result<(), AuditError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let path = self.path();
        let result = self.file.write_all(&self.pending);
        self.file_bytes += self.pending.len() as u64;
        self.pending.clear();
        result.map_err(|e| AuditError::io(&path, e))
    }

    /// The final checkpoint, written and synced (unless the policy is `none`). Nothing
    /// can be appended after it.
    pub fn close(&mut self) -> Result<(), AuditError> {
        if self.closed {
            return Ok(());
        }
        self.checkpoint(Reason::Close)?;
        self.closed = true;
        self.write_out()?;
        if self.opts.sync != SyncPolicy::None {
            self.file.sync_data().map_err(|e| AuditError::io(&self.path(), e))?;
        }
        Ok(())
    }
}

/// A log shared by the record sink and the checkpoint timer.
pub type SharedLog = Arc<Mutex<AuditLog>>;

fn lock(log: &SharedLog) -> MutexGuard<'_, AuditLog> {
    log.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The record sink's side of a log: whole JSON lines in, entries out; `flush` is the
/// group commit. Records are those of one agent (`did`) under one policy (`policy`).
pub struct LineWriter {
    log: SharedLog,
    did: String,
    policy: String,
    partial: Vec<u8>,
}

impl LineWriter {
    pub fn new(log: SharedLog, did: String, policy: String) -> LineWriter {
        LineWriter { log, did, policy, partial: Vec::new() }
    }
}

impl Write for LineWriter {
    /// Appends the complete lines of `buf` (with a line begun by the previous call) as
    /// one batch; keeps an incomplete last line for the next call.
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut log = lock(&self.log);
        let mut rest = buf;
        let first_end = if self.partial.is_empty() { None } else { memchr::memchr(b'\n', rest) };
        if let Some(pos) = first_end {
            self.partial.extend_from_slice(&rest[..pos]);
            let line = std::mem::take(&mut self.partial);
            let appended = log.append_line(&self.did, &self.policy, &line);
            self.partial = line;
            self.partial.clear();
            appended.map_err(io::Error::other)?;
            rest = &rest[pos + 1..];
        }
        if let Some(last) = memchr::memrchr(b'\n', rest) {
            log.append_lines(&self.did, &self.policy, &rest[..last]).map_err(io::Error::other)?;
            rest = &rest[last + 1..];
        }
        drop(log);
        if self.partial.len() + rest.len() > MAX_LINE {
            self.partial.clear();
            return Err(io::Error::other(format!("a record line longer than {MAX_LINE} bytes")));
        }
        self.partial.extend_from_slice(rest);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        lock(&self.log).flush().map_err(io::Error::other)
    }
}

/// Writes time checkpoints while records wait unsigned; stops when dropped.
pub struct Ticker {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Ticker {
    pub fn start(log: SharedLog, interval: Duration) -> io::Result<Ticker> {
        let (stop, stopped) = mpsc::channel::<()>();
        let period = (interval / 2).max(Duration::from_millis(10));
        let thread = thread::Builder::new().name("audit-checkpoint".into()).spawn(move || {
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(period) {
                let mut log = lock(&log);
                let due = log.since_checkpoint > 0 && log.last_checkpoint.elapsed() >= log.opts.checkpoint_interval;
                if due {
                    if let Err(err) = log.flush() {
                        // Not eprintln!: a closed stderr must not end the checkpoint thread.
                        let line = format!("agt-jail: warning: audit checkpoint: {err}\n");
                        let _ = io::stderr().lock().write_all(line.as_bytes());
                    }
                }
            }
        })?;
        Ok(Ticker { stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
