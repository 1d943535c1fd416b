//! Reading a log back: every entry's place in the chain, every checkpoint's signature
//! and root. The first entry that does not fit is reported by its number and why.
use std::{
    fmt,
    fs::File,
    io::{self, BufRead, BufReader, Read},
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use ed25519_dalek::VerifyingKey;

use crate::{
    entry::{record_head, CheckpointEntry, Head, Kind, SignedHead, GENESIS},
    merkle::{hex32, leaf_hash, sha256, CompactTree, Hash},
    writer::MAX_LINE,
    AuditError,
};

/// The first entry of a log that does not fit, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tamper {
    /// The entry's number (`seq`).
    pub seq: u64,
    pub file: PathBuf,
    /// 1-based line in `file`.
    pub line: u64,
    pub why: String,
}

impl fmt::Display for Tamper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: record {}: {}", self.file.display(), self.line, self.seq, self.why)
    }
}

/// Why a log could not be verified.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Io(#[from] AuditError),
    #[error("{0}")]
    Tampered(Tamper),
}

/// What an intact log holds.
#[derive(Debug, Clone, Default)]
pub struct Verified {
    /// Entries of every kind (the next entry would be number `entries`).
    pub entries: u64,
    pub records: u64,
    pub checkpoints: u64,
    /// Entries after the last checkpoint (not covered by a signature).
    pub unsigned: u64,
    /// The log ends with its closing checkpoint.
    pub closed: bool,
    /// The last file ended inside an entry (agt-jail stopped while writing it): the file
    /// and the line the partial entry starts on.
    pub partial_tail: Option<(PathBuf, u64)>,
    pub last_head: Option<SignedHead>,
}

impl Verified {
    /// Warnings an intact log can still carry (not tampering).
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some((file, line)) = &self.partial_tail {
            out.push(format!(
                "{}:{line}: a partial entry at the end was left out (written as agt-jail stopped)",
                file.display()
            ));
        }
        if self.unsigned > 0 {
            out.push(format!("{} records after the last checkpoint are unsigned", self.unsigned));
        }
        if !self.closed {
            out.push(
                "the log has no closing checkpoint (agt-jail stopped before closing it, or it is still being written)"
                    .into(),
            );
        }
        out
    }
}

/// One entry as the walk sees it.
pub struct EntryRef<'a> {
    pub seq: u64,
    pub kind: Kind,
    /// The line, without its newline.
    pub line: &'a [u8],
    /// SHA-256 of `line` (the Merkle leaf and the next entry's `prev`).
    pub hash: Hash,
}

struct Walk<'k> {
    keys: Option<&'k [VerifyingKey]>,
    expected: u64,
    prev: Hash,
    prev_at: (PathBuf, u64),
    tree: CompactTree,
    out: Verified,
    signed_size: u64,
    /// A broken link, held one entry to tell an edited predecessor from an inserted entry.
    suspect: Option<(Tamper, u64)>,
}

/// Bytes of whole lines read before they are hashed and checked together.
const BATCH_BYTES: usize = 4 << 20;

/// Checks the log in `files` (in order, the first one starting the log). With `keys`,
/// every checkpoint's signature is checked; without, only the chain and the roots.
/// `visit` sees every entry that fits. The lines are hashed on as many threads as the
/// machine has cores (at most 8); see [`walk_with`].
pub fn walk(
    files: &[PathBuf],
    keys: Option<&[VerifyingKey]>,
    visit: impl FnMut(&EntryRef<'_>),
) -> Result<Verified, VerifyError> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    walk_with(files, keys, threads, visit)
}

/// [`walk`] hashing the lines on `threads` threads. Hashing each line is most of the
/// work and needs nothing from the entries before it, so batches of lines are hashed
/// in parallel, then checked in order on this thread (the same checks and the same
/// first tamper whatever the number of threads).
pub fn walk_with(
    files: &[PathBuf],
    keys: Option<&[VerifyingKey]>,
    threads: usize,
    mut visit: impl FnMut(&EntryRef<'_>),
) -> Result<Verified, VerifyError> {
    let mut w = Walk {
        keys,
        expected: 0,
        prev: GENESIS,
        prev_at: (PathBuf::new(), 0),
        tree: CompactTree::default(),
        out: Verified::default(),
        signed_size: 0,
        suspect: None,
    };
    let mut batch = Batch::default();
    for (index, path) in files.iter().enumerate() {
        let last_file = index + 1 == files.len();
        let file = File::open(path).map_err(|e| AuditError::io(path, e))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut line_no = 0u64;
        loop {
            let partial = batch.fill(&mut reader).map_err(|e| AuditError::io(path, e))?;
            batch.hash(threads);
            for (i, line) in batch.lines().enumerate() {
                line_no += 1;
                w.entry(line, batch.hashes[i], path, line_no, line_no == 1, &mut visit)?;
            }
            let Some(partial) = partial else {
                if batch.ends.is_empty() {
                    break;
                }
                continue;
            };
            if partial == 0 {
                break;
            }
            line_no += 1;
            let at = Tamper { seq: w.expected, file: path.clone(), line: line_no, why: String::new() };
            if partial > MAX_LINE {
                return Err(VerifyError::Tampered(Tamper { why: format!("longer than {MAX_LINE} bytes"), ..at }));
            }
            if !last_file {
                return Err(VerifyError::Tampered(Tamper {
                    why: "the file ends inside an entry, and another file follows".into(),
                    ..at
                }));
            }
            w.out.partial_tail = Some((path.clone(), line_no));
            break;
        }
    }
    if let Some((suspect, _)) = w.suspect.take() {
        return Err(VerifyError::Tampered(suspect));
    }
    w.out.entries = w.expected;
    w.out.unsigned = w.expected - w.signed_size;
    Ok(w.out)
}

/// Whole lines read from a file, with their hashes.
#[derive(Default)]
struct Batch {
    bytes: Vec<u8>,
    /// Where each line ends (at its newline).
    ends: Vec<usize>,
    /// SHA-256 of each line without its newline.
    hashes: Vec<Hash>,
}

impl Batch {
    /// Reads whole lines until the batch is full. `Some(n)`: the file ended, after a
    /// line of `n` bytes without a newline (0: at a line's start); `None`: more may follow.
    /// A line longer than [`MAX_LINE`] is reported as a partial line of that length.
    fn fill(&mut self, reader: &mut impl BufRead) -> io::Result<Option<usize>> {
        self.bytes.clear();
        self.ends.clear();
        while self.bytes.len() < BATCH_BYTES {
            let start = self.bytes.len();
            let n = reader.take(MAX_LINE as u64 + 1).read_until(b'\n', &mut self.bytes)?;
            if self.bytes.last() != Some(&b'\n') || n == 0 {
                self.bytes.truncate(start);
                return Ok(Some(n));
            }
            self.ends.push(self.bytes.len() - 1);
        }
        Ok(None)
    }

    fn lines(&self) -> impl Iterator<Item = &[u8]> {
        lines_of(&self.bytes, &self.ends)
    }

    fn hash(&mut self, threads: usize) {
        self.hashes.clear();
        self.hashes.resize(self.ends.len(), [0; 32]);
        let lines: Vec<&[u8]> = lines_of(&self.bytes, &self.ends).collect();
        if threads <= 1 || lines.len() < 2 * PIECE {
            hash_lines(&mut self.hashes, &lines);
            return;
        }
        // Pieces taken in turn by whoever is free: a helper that gets no core (the
        // machine is busy) leaves its share to this thread instead of holding it up.
        let pieces = Mutex::new(self.hashes.chunks_mut(PIECE).zip(lines.chunks(PIECE)));
        let work = || loop {
            let next = pieces.lock().unwrap_or_else(PoisonError::into_inner).next();
            let Some((hashes, lines)) = next else { break };
            hash_lines(hashes, lines);
        };
        std::thread::scope(|scope| {
            for _ in 1..threads {
                scope.spawn(work);
            }
            work();
        });
    }
}

/// Lines hashed per piece of a batch shared between threads.
const PIECE: usize = 128;

fn hash_lines(hashes: &mut [Hash], lines: &[&[u8]]) {
    for (hash, line) in hashes.iter_mut().zip(lines) {
        *hash = sha256(line);
    }
}

/// The lines of `bytes` that end (at their newlines) at `ends`.
fn lines_of<'a>(bytes: &'a [u8], ends: &'a [usize]) -> impl Iterator<Item = &'a [u8]> {
    let starts = std::iter::once(0).chain(ends.iter().map(|e| e + 1));
    starts.zip(ends).map(|(start, &end)| &bytes[start..end])
}

impl Walk<'_> {
    fn entry(
        &mut self,
        line: &[u8],
        hash: Hash,
        path: &Path,
        line_no: u64,
        first_in_file: bool,
        visit: &mut impl FnMut(&EntryRef<'_>),
    ) -> Result<(), VerifyError> {
        let expected = self.expected;
        let tamper =
            |seq: u64, why: String| VerifyError::Tampered(Tamper { seq, file: path.to_path_buf(), line: line_no, why });
        let (kind, seq, prev_hex) = match record_head(line) {
            Some((seq, prev)) => (Kind::Record, seq, prev),
            None => {
                let head: Head<'_> = serde_json::from_slice(line)
                    .map_err(|e| tamper(expected, format!("not an audit entry ({e}): edited")))?;
                let Some(kind) = Kind::parse(head.kind) else {
                    return Err(tamper(expected, format!("unknown entry kind {:?}: edited", head.kind)));
                };
                (kind, head.seq, head.prev.as_bytes())
            }
        };
        if let Some((suspect, suspect_seq)) = self.suspect.take() {
            if seq == suspect_seq {
                return Err(tamper(seq, format!("record {seq} appears twice: a record was inserted")));
            }
            return Err(VerifyError::Tampered(suspect));
        }
        if seq != expected {
            return Err(self.misplaced(seq, path, line_no, first_in_file));
        }
        if prev_hex != hex32(&self.prev) {
            if expected == 0 {
                return Err(tamper(0, "the first entry's prev is not zero: edited".into()));
            }
            let (file, line) = self.prev_at.clone();
            self.suspect = Some((
                Tamper {
                    seq: expected - 1,
                    file,
                    line,
                    why: format!(
                        "it does not hash to the prev that record {expected} holds: record {} was edited \
                         (or the link in record {expected})",
                        expected - 1
                    ),
                },
                expected,
            ));
        }
        if self.out.closed {
            return Err(tamper(expected, "an entry after the closing checkpoint: appended".into()));
        }
        if kind == Kind::Checkpoint {
            if let Some((suspect, _)) = self.suspect.take() {
                // The checkpoint's root would fail on the same change: name the entry.
                return Err(VerifyError::Tampered(suspect));
            }
        }
        match kind {
            Kind::Open if expected != 0 => return Err(tamper(expected, "a second open entry: inserted".into())),
            Kind::Record => self.out.records += 1,
            Kind::Checkpoint => self.checkpoint(line).map_err(|why| tamper(expected, why))?,
            Kind::Open => {}
        }
        if expected == 0 && kind != Kind::Open {
            return Err(tamper(0, "the log does not start with its open entry".into()));
        }
        visit(&EntryRef { seq: expected, kind, line, hash });
        self.tree.push(leaf_hash(&hash));
        self.prev = hash;
        self.prev_at = (path.to_path_buf(), line_no);
        self.expected += 1;
        Ok(())
    }

    /// An entry whose number is not the next one.
    fn misplaced(&self, seq: u64, path: &Path, line_no: u64, first_in_file: bool) -> VerifyError {
        let expected = self.expected;
        let why = if first_in_file && expected == 0 {
            format!("the first file starts at record {seq}: give every file of the log, from the first")
        } else if first_in_file {
            format!(
                "this file starts at record {seq}, but record {expected} comes next: the files are out of order \
                 or one is missing"
            )
        } else if seq + 1 == expected {
            format!("record {seq} appears twice: a record was inserted")
        } else if seq < expected {
            format!("record {seq} appears again after record {}: records were reordered or inserted", expected - 1)
        } else {
            format!("record {expected} is missing here (found record {seq}): records were deleted or reordered")
        };
        let at = if seq < expected && !first_in_file { seq } else { expected };
        VerifyError::Tampered(Tamper { seq: at, file: path.to_path_buf(), line: line_no, why })
    }

    fn checkpoint(&mut self, line: &[u8]) -> Result<(), String> {
        let entry: CheckpointEntry =
            serde_json::from_slice(line).map_err(|e| format!("not a checkpoint ({e}): edited"))?;
        let head = entry.head();
        let tree = &head.checkpoint;
        if tree.tree_size != self.expected {
            return Err(format!(
                "the checkpoint covers {} entries, but {} come before it: edited",
                tree.tree_size, self.expected
            ));
        }
        if let Some(keys) = self.keys {
            head.verify(keys)?;
        }
        if tree.root_hash() != Some(self.tree.root()) {
            return Err(
                "the signed root is not the root of the entries before it: an earlier entry was rewritten".into()
            );
        }
        self.out.checkpoints += 1;
        self.out.closed = tree.reason == "close";
        self.signed_size = self.expected + 1;
        self.out.last_head = Some(head);
        Ok(())
    }
}
