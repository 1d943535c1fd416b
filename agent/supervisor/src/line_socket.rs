//! The serving loop of agt-jail's one-line unix sockets (the control socket, the identity
//! socket): one request line in, one JSON line out, a thread that stops when dropped.
use std::{
    io::{self, BufRead, BufReader, Read, Write},
    os::unix::net::{UnixListener, UnixStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::Duration,
};

use serde_json::Value;

/// Serves a listening socket on a thread until dropped.
pub struct LineServer {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl LineServer {
    /// Answers every connection to `listener` with `answer(stream)` as one JSON line. A
    /// connection that sends nothing within 5 s gets the answer to what it sent by then.
    pub fn spawn(
        name: &str,
        listener: UnixListener,
        answer: impl Fn(&UnixStream) -> Value + Send + 'static,
    ) -> io::Result<LineServer> {
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::Builder::new().name(name.into()).spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                // Woken by a connection at once; the timeout only bounds how late a stop is seen.
                if !readable(&listener, 100) {
                    continue;
                }
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                        let reply = answer(&stream);
                        let mut stream = stream;
                        let _ = stream.write_all(format!("{reply}\n").as_bytes());
                    }
                    Err(_) => thread::sleep(Duration::from_millis(20)),
                }
            }
        })?;
        Ok(LineServer { stop, thread: Some(thread) })
    }
}

impl Drop for LineServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether `listener` has a connection waiting, within `timeout_ms`.
fn readable(listener: &UnixListener, timeout_ms: i32) -> bool {
    use std::os::fd::AsRawFd;
    let mut fds = [libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
    // SAFETY: one valid pollfd for the length passed; the listener stays open for the call.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout_ms) };
    n > 0 && fds[0].revents & libc::POLLIN != 0
}

/// Reads one request line of at most `max` bytes, trimmed.
pub fn read_request(stream: &UnixStream, max: u64) -> Result<String, String> {
    let mut line = String::new();
    BufReader::new(stream.take(max)).read_line(&mut line).map_err(|e| format!("cannot read the request: {e}"))?;
    Ok(line.trim().to_string())
}
