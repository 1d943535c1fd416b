//! DNS over TCP for the agent: where its resolver retries an answer that came back
//! truncated over UDP. Messages are framed by a two-byte length (RFC 1035 4.2.2).
use std::{
    io::{ErrorKind, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::atomic::{AtomicBool, Ordering},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::{
    proxy::{admit, answer, dropped_oversized, Admitted, Shared, Transport, POLL},
    AllowSink,
};

/// A connection with no complete query for this long is closed.
const IDLE: Duration = Duration::from_secs(10);

/// Accepts connections until `stop` is set (then [`wake`] unblocks the accept), one
/// thread each, at most [`crate::Limits::tcp_connections`]; joins them before returning.
pub(crate) fn serve<S: AllowSink + 'static>(
    shared: &std::sync::Arc<Shared<S>>,
    listener: &TcpListener,
    stop: &std::sync::Arc<AtomicBool>,
) {
    let mut connections: Vec<JoinHandle<()>> = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let Ok((stream, _)) = listener.accept() else {
            // Out of descriptors or the like: wait rather than spin.
            thread::sleep(POLL);
            continue;
        };
        if stop.load(Ordering::SeqCst) {
            break;
        }
        connections.retain(|connection| !connection.is_finished());
        if connections.len() >= shared.config.limits.tcp_connections {
            let reason = "too many TCP connections; closed".to_string();
            shared.observe(String::new(), String::new(), crate::Outcome::Failed { rcode: String::new(), reason });
            continue;
        }
        let (shared, stop) = (std::sync::Arc::clone(shared), std::sync::Arc::clone(stop));
        match thread::Builder::new().name("dns-tcp-conn".into()).spawn(move || converse(&shared, stream, &stop)) {
            Ok(connection) => connections.push(connection),
            // No thread, no answer: the stream is closed and the agent retries or fails.
            Err(_) => continue,
        }
    }
    for connection in connections {
        let _ = connection.join();
    }
}

/// Unblocks [`serve`]'s accept after the stop flag was set.
pub(crate) fn wake(addr: SocketAddr) {
    let _ = TcpStream::connect_timeout(&reachable(addr), Duration::from_secs(1));
}

/// Where a socket bound to `addr` can be reached from this host (an unspecified address
/// is reached on loopback).
pub(crate) fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()),
        _ => addr,
    }
}

/// Answers the queries of one connection in turn until it closes, idles, errs or the
/// proxy stops.
fn converse<S: AllowSink>(shared: &Shared<S>, mut stream: TcpStream, stop: &AtomicBool) {
    if stream.set_read_timeout(Some(POLL)).is_err() || stream.set_write_timeout(Some(IDLE)).is_err() {
        return;
    }
    let max = shared.config.limits.max_query_bytes;
    loop {
        let mut head = [0u8; 2];
        if !read_full(&mut stream, &mut head, stop) {
            return;
        }
        let len = usize::from(u16::from_be_bytes(head));
        if len > max {
            shared.observe(String::new(), String::new(), dropped_oversized(max));
            return;
        }
        let mut query = vec![0u8; len];
        if !read_full(&mut stream, &mut query, stop) {
            return;
        }
        let bytes = match admit(shared, &query) {
            Admitted::Drop => return,
            Admitted::Reply(message) => match message.to_vec() {
                Ok(bytes) => bytes,
                Err(_) => return,
            },
            Admitted::Job(job) => answer(shared, job, Transport::Tcp),
        };
        let Ok(len) = u16::try_from(bytes.len()) else { return };
        if stream.write_all(&[&len.to_be_bytes()[..], &bytes].concat()).is_err() {
            return;
        }
    }
}

/// Fills `buf`; false when the peer closed, erred, idled past [`IDLE`] or `stop` was set.
fn read_full(stream: &mut TcpStream, buf: &mut [u8], stop: &AtomicBool) -> bool {
    let deadline = Instant::now() + IDLE;
    let mut filled = 0;
    while filled < buf.len() {
        if stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
            return false;
        }
        match stream.read(&mut buf[filled..]) {
            Ok(0) => return false,
            Ok(read) => filled += read,
            Err(err) if matches!(err.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => return false,
        }
    }
    true
}
