//! Appending a batch of record lines on two cores: the records' canonical forms
//! (`canon`) are made on a second thread while the appending thread chains them (the
//! entry's SHA-256, the Merkle tree, `prev`), in order, as they become ready.
//!
//! The chain is sequential; a record's canonical form is not. The batch is cut into pieces
//! of whole lines; the second thread takes pieces from the front, one at a time, and so
//! does the appending thread whenever the next piece in line is not yet taken. A piece the
//! second thread holds but has not finished is waited for briefly ([`WAIT`]), then made
//! again by the appending thread, so a second thread that does not get a core never stalls
//! the batch: the batch costs at most what it costs on one thread plus one such wait.
//! What is written is the same whichever thread made a piece (the canonical form is a
//! function of the line).
//!
//! On a machine whose other cores are busy the second thread competes with the appending
//! one for a core and its pieces come late; a batch in which it made fewer than half the
//! pieces sends the next batches ([`Pipeline`]'s back-off, doubling up to [`MAX_BACKOFF`])
//! through the appending thread alone, as small batches are, then tries again.
use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        mpsc, Arc, OnceLock,
    },
    thread,
    time::{Duration, Instant},
};

use crate::canon::{canonicalize, CanonError};

/// Batches of at least this many bytes of lines are shared with the second thread; smaller
/// ones (a held action's record, written before its answer) are appended as they arrive by
/// the calling thread alone, as before.
pub const PIPELINE_MIN_BYTES: usize = 16 << 10;

/// Bytes of lines per piece (whole lines; a longer line is a piece of its own).
const PIECE_BYTES: usize = 4 << 10;

/// How long the appending thread waits for a piece the second thread is making before it
/// makes the piece itself (under the time a piece takes).
const WAIT: Duration = Duration::from_micros(4);

/// The most batches appended alone after one in which the second thread fell behind.
const MAX_BACKOFF: u32 = 1024;

/// The non-empty lines of `bytes` (the last one may lack its newline).
pub(crate) fn lines(bytes: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = bytes;
    std::iter::from_fn(move || loop {
        if rest.is_empty() {
            return None;
        }
        let (line, next) = match memchr::memchr(b'\n', rest) {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = next;
        if !line.is_empty() {
            return Some(line);
        }
    })
}

/// The canonical records of a piece's lines, back to back.
#[derive(Debug, Default)]
pub(crate) struct Canonical {
    pub(crate) bytes: Vec<u8>,
    /// For each non-empty line in order: where its canonical record ends in `bytes`, or why
    /// it is not JSON (the lines after a bad one are not made: the chain stops there).
    pub(crate) ends: Vec<Result<usize, CanonError>>,
}

impl Canonical {
    /// Makes the canonical records of `piece`'s lines, replacing what was held.
    pub(crate) fn make(&mut self, piece: &[u8]) {
        self.bytes.clear();
        self.ends.clear();
        for line in lines(piece) {
            match canonicalize(line, &mut self.bytes) {
                Ok(()) => self.ends.push(Ok(self.bytes.len())),
                Err(err) => {
                    self.ends.push(Err(err));
                    return;
                }
            }
        }
    }
}

/// A batch shared by the appending thread and the second thread.
pub(crate) struct Batch {
    input: Vec<u8>,
    /// Where each piece ends in `input` (the next begins there).
    cuts: Vec<usize>,
    /// The first piece nobody has taken.
    next: AtomicUsize,
    /// The pieces the second thread has made.
    made: Vec<OnceLock<Canonical>>,
}

impl Batch {
    /// A copy of `lines` cut into pieces at line ends.
    pub(crate) fn new(lines: &[u8]) -> Batch {
        let mut cuts = Vec::with_capacity(lines.len() / PIECE_BYTES + 1);
        let mut at = 0;
        while at < lines.len() {
            let from = (at + PIECE_BYTES).min(lines.len());
            at = memchr::memchr(b'\n', &lines[from..]).map_or(lines.len(), |n| from + n + 1);
            cuts.push(at);
        }
        let made = cuts.iter().map(|_| OnceLock::new()).collect();
        Batch { input: lines.to_vec(), cuts, next: AtomicUsize::new(0), made }
    }

    pub(crate) fn pieces(&self) -> usize {
        self.cuts.len()
    }

    pub(crate) fn piece(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.cuts[i - 1] };
        &self.input[start..self.cuts[i]]
    }

    /// The second thread's next piece, if any is left.
    fn take(&self) -> Option<usize> {
        let i = self.next.fetch_add(1, Ordering::AcqRel);
        (i < self.pieces()).then_some(i)
    }

    /// Piece `i` as the second thread made it, or `None` when the appending thread is to
    /// make it itself (nobody had taken it, or it was not ready within [`WAIT`]).
    /// Pieces are asked for in order.
    pub(crate) fn made(&self, i: usize) -> Option<&Canonical> {
        if let Some(made) = self.made[i].get() {
            return Some(made);
        }
        // Every piece before `i` was taken, so `next` is `i` (untaken) or beyond.
        if self.next.compare_exchange(i, i + 1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            return None;
        }
        let deadline = Instant::now() + WAIT;
        loop {
            for _ in 0..32 {
                std::hint::spin_loop();
                if let Some(made) = self.made[i].get() {
                    return Some(made);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
        }
    }

    /// The appending thread is done with the batch: the second thread takes no more of it.
    fn finish(&self) {
        self.next.fetch_max(self.pieces(), Ordering::AcqRel);
    }
}

/// Whether a batch is shared with the second thread (started on the first large batch).
#[derive(Default)]
pub(crate) struct Pipeline {
    helper: Option<Helper>,
    started: bool,
    /// Batches still to append alone, and how many the next fall-behind sets.
    skip: u32,
    backoff: u32,
}

impl Pipeline {
    /// `lines` as a batch handed to the second thread, or `None` when the batch is small,
    /// there is no second thread, or the back-off says to append alone.
    pub(crate) fn share(&mut self, lines: &[u8]) -> Option<Arc<Batch>> {
        if lines.len() < PIPELINE_MIN_BYTES {
            return None;
        }
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        if !self.started {
            self.started = true;
            self.helper = Helper::start();
        }
        let batch = Arc::new(Batch::new(lines));
        if self.helper.as_ref()?.give(&batch) {
            return Some(batch);
        }
        // The thread has gone (it cannot fail, but a thread can be killed): append alone.
        self.helper = None;
        None
    }

    /// The appending thread is done with `batch`, of which the second thread made
    /// `by_helper` pieces.
    pub(crate) fn done(&mut self, batch: &Batch, by_helper: usize) {
        batch.finish();
        // The first piece is the appending thread's (the second one is waking up).
        if by_helper * 2 >= batch.pieces().saturating_sub(1) {
            self.backoff = 0;
        } else {
            self.backoff = (self.backoff * 2).clamp(1, MAX_BACKOFF);
            self.skip = self.backoff;
        }
    }
}

/// The second thread: makes the pieces of the batches it is given until dropped.
pub(crate) struct Helper {
    batches: Option<mpsc::Sender<Arc<Batch>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Helper {
    /// `None` with a single CPU (nothing to gain) or when no thread can be started (the
    /// caller then appends on its own, as it does small batches).
    pub(crate) fn start() -> Option<Helper> {
        if thread::available_parallelism().map_or(1, usize::from) < 2 {
            return None;
        }
        let (batches, received) = mpsc::channel::<Arc<Batch>>();
        let thread = thread::Builder::new()
            .name("audit-canonical".into())
            .spawn(move || {
                while let Ok(batch) = received.recv() {
                    while let Some(i) = batch.take() {
                        let mut made = Canonical::default();
                        made.make(batch.piece(i));
                        // Only this thread sets a piece it took.
                        let _ = batch.made[i].set(made);
                    }
                }
            })
            .ok()?;
        Some(Helper { batches: Some(batches), thread: Some(thread) })
    }

    /// Hands `batch` to the second thread; false if it has gone.
    pub(crate) fn give(&self, batch: &Arc<Batch>) -> bool {
        self.batches.as_ref().is_some_and(|b| b.send(Arc::clone(batch)).is_ok())
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        drop(self.batches.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn lines_skip_empty_ones_and_keep_a_last_line_without_newline() {
        let got: Vec<&[u8]> = lines(b"\na\n\nbc\nd").collect();
        assert_eq!(got, [&b"a"[..], b"bc", b"d"]);
        assert_eq!(lines(b"").count(), 0);
        assert_eq!(lines(b"\n\n").count(), 0);
    }

    #[test]
    fn pieces_are_whole_lines_and_cover_the_batch() {
        let mut text = Vec::new();
        for i in 0..500 {
            text.extend_from_slice(format!("{{\"i\":{i},\"pad\":\"{}\"}}\n", "x".repeat(i % 97)).as_bytes());
        }
        // A line longer than a piece.
        text.extend_from_slice(format!("{{\"long\":\"{}\"}}\n", "y".repeat(3 * PIECE_BYTES)).as_bytes());
        text.extend_from_slice(b"{\"last\":true}");
        let batch = Batch::new(&text);
        assert!(batch.pieces() > 5);
        let mut joined = Vec::new();
        for i in 0..batch.pieces() {
            let piece = batch.piece(i);
            assert!(i + 1 == batch.pieces() || piece.ends_with(b"\n"), "piece {i} ends inside a line");
            joined.extend_from_slice(piece);
        }
        assert_eq!(joined, text);
    }

    #[test]
    fn a_piece_is_made_once_by_whoever_takes_it() {
        let text = b"{\"b\":1,\"a\":2}\n".repeat(2000);
        let batch = Batch::new(&text);
        // Nobody took piece 0: the appending thread takes it.
        assert!(batch.made(0).is_none());
        // The second thread takes piece 1 and makes it.
        assert_eq!(batch.take(), Some(1));
        let mut made = Canonical::default();
        made.make(batch.piece(1));
        batch.made[1].set(made).unwrap();
        let made = batch.made(1).unwrap();
        assert_eq!(&made.bytes[..13], b"{\"a\":2,\"b\":1}");
        // Taken and never made (a second thread without a core): the appending thread
        // makes it after the wait.
        assert_eq!(batch.take(), Some(2));
        assert!(batch.made(2).is_none());
        Pipeline::default().done(&batch, 1);
        assert_eq!(batch.take(), None);
    }

    #[test]
    fn a_second_thread_that_falls_behind_is_left_alone_for_longer_each_time() {
        let text = b"{\"a\":1}\n".repeat(PIPELINE_MIN_BYTES / 8 + 1);
        let mut p = Pipeline::default();
        assert!(p.share(&text[..100]).is_none(), "a small batch is appended alone");
        let Some(batch) = p.share(&text) else {
            // One CPU: there is no second thread to share with.
            assert!(thread::available_parallelism().map_or(1, usize::from) < 2);
            return;
        };
        let pieces = batch.pieces();
        assert!(pieces > 2);
        for skipped in [1, 2, 4] {
            p.done(&batch, 0);
            for _ in 0..skipped {
                assert!(p.share(&text).is_none());
            }
            let again = p.share(&text).unwrap();
            again.finish();
        }
        p.done(&batch, pieces / 2);
        assert!(p.share(&text).is_some(), "a second thread that keeps up is used again at once");
    }

    #[test]
    fn a_bad_line_ends_the_piece_with_its_error() {
        let mut made = Canonical::default();
        made.make(b"{\"a\":1}\n{\"a\":\n{\"b\":2}\n");
        assert_eq!(made.ends.len(), 2);
        assert_eq!(made.ends[0], Ok(7));
        assert!(made.ends[1].is_err());
    }
}
