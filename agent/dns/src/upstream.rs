//! Asking the upstream resolver.
use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use hickory_proto::op::{Edns, Message, MessageType, OpCode};

use crate::answer::EDNS_PAYLOAD;

/// Asks `upstream` the question of `query` with a fresh random id over UDP (over TCP
/// when the UDP answer is truncated), within `timeout` in all.
pub(crate) fn exchange(upstream: SocketAddr, query: &Message, timeout: Duration) -> Result<Message, String> {
    let deadline = Instant::now() + timeout;
    let id = Message::query().metadata.id;
    let mut ask = Message::new(id, MessageType::Query, OpCode::Query);
    ask.metadata.recursion_desired = true;
    ask.queries = query.queries.clone();
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    ask.set_edns(edns);
    let bytes = ask.to_vec().map_err(|err| format!("cannot encode the upstream query: {err}"))?;
    let answer = exchange_udp(upstream, &bytes, id, deadline)?;
    if !answer.metadata.truncation {
        return Ok(answer);
    }
    exchange_tcp(upstream, &bytes, id, deadline)
}

fn remaining(upstream: SocketAddr, deadline: Instant) -> Result<Duration, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(format!("no answer from {upstream} in time"));
    }
    Ok(left)
}

fn exchange_udp(upstream: SocketAddr, bytes: &[u8], id: u16, deadline: Instant) -> Result<Message, String> {
    let io_err = |err: io::Error| format!("upstream {upstream}: {err}");
    let local: SocketAddr = if upstream.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
    let socket = UdpSocket::bind(local).map_err(io_err)?;
    socket.connect(upstream).map_err(io_err)?;
    socket.send(bytes).map_err(io_err)?;
    let mut buf = vec![0u8; 65_535];
    loop {
        socket.set_read_timeout(Some(remaining(upstream, deadline)?)).map_err(io_err)?;
        let len = match socket.recv(&mut buf) {
            Ok(len) => len,
            Err(err) if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(err) => return Err(io_err(err)),
        };
        // Anything else on this connected socket (a late answer, garbage) is skipped.
        if let Ok(answer) = Message::from_vec(&buf[..len]) {
            if answer.metadata.id == id && answer.metadata.message_type == MessageType::Response {
                return Ok(answer);
            }
        }
    }
}

fn exchange_tcp(upstream: SocketAddr, bytes: &[u8], id: u16, deadline: Instant) -> Result<Message, String> {
    let io_err = |err: io::Error| format!("upstream {upstream} (tcp): {err}");
    let mut stream = TcpStream::connect_timeout(&upstream, remaining(upstream, deadline)?).map_err(io_err)?;
    let len = u16::try_from(bytes.len()).map_err(|_| "upstream query too long".to_string())?;
    stream.set_write_timeout(Some(remaining(upstream, deadline)?)).map_err(io_err)?;
    stream.write_all(&[&len.to_be_bytes()[..], bytes].concat()).map_err(io_err)?;
    let mut read = |buf: &mut [u8]| -> Result<(), String> {
        stream.set_read_timeout(Some(remaining(upstream, deadline)?)).map_err(io_err)?;
        stream.read_exact(buf).map_err(io_err)
    };
    let mut head = [0u8; 2];
    read(&mut head)?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(head))];
    read(&mut body)?;
    let answer = Message::from_vec(&body).map_err(|err| format!("upstream {upstream} (tcp): bad answer: {err}"))?;
    if answer.metadata.id != id {
        return Err(format!("upstream {upstream} (tcp): answer to another query"));
    }
    Ok(answer)
}
