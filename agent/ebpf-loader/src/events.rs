//! Decoding of ring-buffer records into typed events, and a blocking reader.
//!
//! Decoding is a pure function over bytes so it is tested without a kernel; the
//! reader only adds `poll(2)` on the ring buffer's fd.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd,
    time::Duration,
};

use agt_jail_common::{ConnectEvent, EventHeader, EventKind, ExecEvent, Verdict, AF_INET, AF_INET6, EXEC_FILENAME_LEN};
use aya::maps::{MapData, RingBuf};
use serde::Serialize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("event record of {len} bytes is shorter than the {need}-byte {what}")]
    Short { len: usize, need: usize, what: &'static str },
    #[error("event record has unknown kind {0}")]
    UnknownKind(u32),
    #[error("event record has unknown verdict {0}")]
    UnknownVerdict(u32),
    #[error("connect event has unknown address family {0}")]
    UnknownFamily(u16),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum NetFamily {
    Inet,
    Inet6,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerdictName {
    Allow,
    Deny,
}

/// One event from the kernel side, in the shape written to `--events` files.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// An agent's process completed an exec.
    Exec { pid: u32, tgid: u32, cgroup_id: u64, agent_id: u64, ktime_ns: u64, filename: String, verdict: VerdictName },
    /// An agent's process was checked before an exec (Tier A, BPF LSM).
    ExecCheck {
        pid: u32,
        tgid: u32,
        cgroup_id: u64,
        agent_id: u64,
        ktime_ns: u64,
        filename: String,
        verdict: VerdictName,
    },
    /// An agent's process called connect(2).
    Connect {
        pid: u32,
        tgid: u32,
        cgroup_id: u64,
        agent_id: u64,
        ktime_ns: u64,
        family: NetFamily,
        addr: IpAddr,
        port: u16,
        protocol: String,
        verdict: VerdictName,
    },
}

impl Event {
    pub fn is_deny(&self) -> bool {
        let verdict = match self {
            Event::Exec { verdict, .. } | Event::ExecCheck { verdict, .. } | Event::Connect { verdict, .. } => verdict,
        };
        *verdict == VerdictName::Deny
    }
}

/// Reads a `#[repr(C)]` plain-old-data struct from the front of `bytes`.
fn read_pod<T: Copy>(bytes: &[u8], what: &'static str) -> Result<T, DecodeError> {
    let need = std::mem::size_of::<T>();
    if bytes.len() < need {
        return Err(DecodeError::Short { len: bytes.len(), need, what });
    }
    // SAFETY: `bytes` holds at least size_of::<T>() bytes; read_unaligned has no alignment
    // requirement; T is one of the common crate's #[repr(C)] integer/array structs, for
    // which every bit pattern is a valid value.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn verdict(raw: u32) -> Result<VerdictName, DecodeError> {
    match Verdict::from_u32(raw) {
        Some(Verdict::Allow) => Ok(VerdictName::Allow),
        Some(Verdict::Deny) => Ok(VerdictName::Deny),
        None => Err(DecodeError::UnknownVerdict(raw)),
    }
}

fn protocol_name(protocol: u32) -> String {
    match protocol {
        6 => "tcp".to_string(),
        17 => "udp".to_string(),
        1 => "icmp".to_string(),
        58 => "icmpv6".to_string(),
        other => other.to_string(),
    }
}

/// Decodes one ring-buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let header: EventHeader = read_pod(bytes, "event header")?;
    let kind = EventKind::from_u32(header.kind).ok_or(DecodeError::UnknownKind(header.kind))?;
    let verdict = verdict(header.verdict)?;
    match kind {
        EventKind::Exec | EventKind::ExecCheck => {
            let event: ExecEvent = read_pod(bytes, "exec event")?;
            let len = (event.filename_len as usize).min(EXEC_FILENAME_LEN);
            let raw = &event.filename[..len];
            // The kernel's string helper counts the NUL it copied.
            let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
            let filename = String::from_utf8_lossy(raw).into_owned();
            let (pid, tgid, cgroup_id, agent_id, ktime_ns) =
                (header.pid, header.tgid, header.cgroup_id, header.agent_id, header.ktime_ns);
            Ok(if kind == EventKind::Exec {
                Event::Exec { pid, tgid, cgroup_id, agent_id, ktime_ns, filename, verdict }
            } else {
                Event::ExecCheck { pid, tgid, cgroup_id, agent_id, ktime_ns, filename, verdict }
            })
        }
        EventKind::Connect => {
            let event: ConnectEvent = read_pod(bytes, "connect event")?;
            let (family, addr) = match event.family {
                AF_INET => {
                    let [a, b, c, d, ..] = event.addr;
                    (NetFamily::Inet, IpAddr::V4(Ipv4Addr::new(a, b, c, d)))
                }
                AF_INET6 => (NetFamily::Inet6, IpAddr::V6(Ipv6Addr::from(event.addr))),
                other => return Err(DecodeError::UnknownFamily(other)),
            };
            Ok(Event::Connect {
                pid: header.pid,
                tgid: header.tgid,
                cgroup_id: header.cgroup_id,
                agent_id: header.agent_id,
                ktime_ns: header.ktime_ns,
                family,
                addr,
                port: event.port,
                protocol: protocol_name(event.protocol),
                verdict,
            })
        }
    }
}

/// Blocking reader over the event ring buffer.
pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// Hands every record already in the buffer to `sink`, without waiting.
    pub fn drain(&mut self, sink: &mut dyn FnMut(Result<Event, DecodeError>)) -> usize {
        let mut count = 0;
        while let Some(item) = self.ring.next() {
            sink(decode(&item));
            count += 1;
        }
        count
    }

    /// Waits up to `timeout` for records, then drains them. Returns how many were read.
    pub fn poll(
        &mut self,
        timeout: Duration,
        sink: &mut dyn FnMut(Result<Event, DecodeError>),
    ) -> std::io::Result<usize> {
        let mut pollfd = libc::pollfd { fd: self.ring.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `pollfd` is a valid, initialised pollfd and we pass a count of 1.
        let ready = unsafe { libc::poll(&mut pollfd, 1, millis) };
        if ready < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                return Ok(0);
            }
            return Err(err);
        }
        Ok(self.drain(sink))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn header(kind: EventKind, verdict: Verdict) -> EventHeader {
        EventHeader {
            kind: kind as u32,
            verdict: verdict as u32,
            pid: 11,
            tgid: 10,
            cgroup_id: 77,
            agent_id: 5,
            ktime_ns: 123,
        }
    }

    fn bytes_of<T: Copy>(value: &T) -> Vec<u8> {
        // SAFETY: T is a #[repr(C)] struct without implicit padding (size-asserted in
        // the common crate), so all its bytes are initialised.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>()) }.to_vec()
    }

    #[test]
    fn decodes_exec_with_nul_counted() {
        let mut filename = [0u8; EXEC_FILENAME_LEN];
        filename[..10].copy_from_slice(b"/bin/true\0");
        let event = ExecEvent { header: header(EventKind::Exec, Verdict::Allow), filename_len: 10, _pad: 0, filename };
        let decoded = decode(&bytes_of(&event)).unwrap();
        assert_eq!(
            decoded,
            Event::Exec {
                pid: 11,
                tgid: 10,
                cgroup_id: 77,
                agent_id: 5,
                ktime_ns: 123,
                filename: "/bin/true".into(),
                verdict: VerdictName::Allow
            }
        );
    }

    #[test]
    fn decodes_denied_ipv4_connect() {
        let mut addr = [0u8; 16];
        addr[..4].copy_from_slice(&[127, 0, 0, 1]);
        let event = ConnectEvent {
            header: header(EventKind::Connect, Verdict::Deny),
            family: AF_INET,
            port: 8080,
            protocol: 6,
            addr,
        };
        let decoded = decode(&bytes_of(&event)).unwrap();
        assert!(decoded.is_deny());
        let json = serde_json::to_value(&decoded).unwrap();
        assert_eq!(json["kind"], "connect");
        assert_eq!(json["addr"], "127.0.0.1");
        assert_eq!(json["port"], 8080);
        assert_eq!(json["protocol"], "tcp");
        assert_eq!(json["verdict"], "deny");
    }

    #[test]
    fn decodes_ipv6_connect() {
        let addr = Ipv6Addr::LOCALHOST.octets();
        let event = ConnectEvent {
            header: header(EventKind::Connect, Verdict::Allow),
            family: AF_INET6,
            port: 443,
            protocol: 17,
            addr,
        };
        let json = serde_json::to_value(decode(&bytes_of(&event)).unwrap()).unwrap();
        assert_eq!(json["addr"], "::1");
        assert_eq!(json["family"], "inet6");
        assert_eq!(json["protocol"], "udp");
    }

    #[test]
    fn rejects_short_and_unknown_records_without_panicking() {
        assert!(matches!(decode(&[1, 2, 3]), Err(DecodeError::Short { .. })));
        let bad_kind = EventHeader { kind: 99, ..header(EventKind::Exec, Verdict::Allow) };
        assert_eq!(decode(&bytes_of(&bad_kind)), Err(DecodeError::UnknownKind(99)));
        let bad_verdict = EventHeader { verdict: 7, ..header(EventKind::Exec, Verdict::Allow) };
        assert_eq!(decode(&bytes_of(&bad_verdict)), Err(DecodeError::UnknownVerdict(7)));
        // A header that claims exec but is cut short.
        assert!(matches!(decode(&bytes_of(&header(EventKind::Exec, Verdict::Allow))), Err(DecodeError::Short { .. })));
        let event = ConnectEvent {
            header: header(EventKind::Connect, Verdict::Allow),
            family: 1,
            port: 1,
            protocol: 6,
            addr: [0; 16],
        };
        assert_eq!(decode(&bytes_of(&event)), Err(DecodeError::UnknownFamily(1)));
        for len in 0..400 {
            let _ = decode(&vec![0xff; len]);
        }
    }

    #[test]
    fn filename_length_is_clamped() {
        let event = ExecEvent {
            header: header(EventKind::Exec, Verdict::Allow),
            filename_len: 10_000,
            _pad: 0,
            filename: [b'a'; EXEC_FILENAME_LEN],
        };
        let Event::Exec { filename, .. } = decode(&bytes_of(&event)).unwrap() else { panic!("not exec") };
        assert_eq!(filename.len(), EXEC_FILENAME_LEN);
    }
}
