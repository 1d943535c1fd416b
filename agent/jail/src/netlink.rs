//! Netlink messages, built as bytes and sent on a socket of the caller's namespace: one
//! builder for rtnetlink (links, addresses, routes) and nf_tables (the NAT rule).
//!
//! The builders are pure (tested unprivileged); [`Socket::transact`] sends a batch and
//! waits for the kernel's acknowledgement of every message that asked for one.
use std::{
    io,
    os::fd::{AsRawFd, OwnedFd},
};

use crate::sys;

pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
const NLMSG_ERROR: u16 = 2;
const HEADER_LEN: usize = 16;

fn align(len: usize) -> usize {
    (len + 3) & !3
}

/// One netlink message: header, fixed family header, attributes (nests allowed).
#[derive(Clone, Debug)]
pub struct Message {
    buf: Vec<u8>,
    nests: Vec<usize>,
    flags: u16,
}

impl Message {
    /// A message of `kind` with `flags` (NLM_F_REQUEST is always set) and the family's
    /// fixed header (`ifinfomsg`, `ifaddrmsg`, `rtmsg`, `nfgenmsg`) as bytes.
    pub fn new(kind: u16, flags: u16, family_header: &[u8]) -> Self {
        let flags = flags | NLM_F_REQUEST;
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&0u32.to_ne_bytes());
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&[0; 8]);
        let mut msg = Self { buf, nests: Vec::new(), flags };
        msg.raw(family_header);
        msg
    }

    /// Bytes appended as they are, padded to 4 (a fixed header inside a nest).
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(bytes);
        self.buf.resize(align(self.buf.len()), 0);
        self
    }

    pub fn attr(&mut self, kind: u16, payload: &[u8]) -> &mut Self {
        let len = 4 + payload.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.raw(payload)
    }

    /// A NUL-terminated string attribute.
    pub fn attr_str(&mut self, kind: u16, text: &str) -> &mut Self {
        let mut bytes = text.as_bytes().to_vec();
        bytes.push(0);
        self.attr(kind, &bytes)
    }

    pub fn attr_u32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.attr(kind, &value.to_ne_bytes())
    }

    /// A 32-bit attribute in network byte order (nf_tables' integers).
    pub fn attr_be32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.attr(kind, &value.to_be_bytes())
    }

    /// Opens a nested attribute; [`Message::end`] closes the innermost one.
    pub fn begin(&mut self, kind: u16) -> &mut Self {
        self.nests.push(self.buf.len());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self
    }

    pub fn end(&mut self) -> &mut Self {
        if let Some(start) = self.nests.pop() {
            let len = (self.buf.len() - start) as u16;
            self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        }
        self
    }

    /// The finished bytes with sequence number `seq` (open nests are closed).
    pub fn bytes(&self, seq: u32) -> Vec<u8> {
        let mut msg = self.clone();
        while !msg.nests.is_empty() {
            msg.end();
        }
        let len = msg.buf.len() as u32;
        msg.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        msg.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        msg.buf
    }

    fn wants_ack(&self) -> bool {
        self.flags & NLM_F_ACK != 0
    }
}

/// The errno a kernel reply carries for message `seq`, if the reply is an ack or error.
/// Returns (seq, errno) for each NLMSG_ERROR message in `reply` (errno 0 is an ack).
pub fn acks(reply: &[u8]) -> Vec<(u32, i32)> {
    let mut found = Vec::new();
    let mut at = 0;
    while at + HEADER_LEN <= reply.len() {
        let word = |i: usize| u32::from_ne_bytes([reply[i], reply[i + 1], reply[i + 2], reply[i + 3]]);
        let len = word(at) as usize;
        let kind = u16::from_ne_bytes([reply[at + 4], reply[at + 5]]);
        if len < HEADER_LEN || at + len > reply.len() {
            break;
        }
        if kind == NLMSG_ERROR && len >= HEADER_LEN + 4 {
            let errno = word(at + HEADER_LEN) as i32;
            found.push((word(at + 8), -errno));
        }
        at += align(len);
    }
    found
}

/// A netlink socket bound to the namespace of the thread that opened it.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
}

impl Socket {
    pub fn open(protocol: libc::c_int) -> io::Result<Self> {
        Ok(Self { fd: sys::netlink_socket(protocol)?, seq: 1 })
    }

    /// Sends `messages` in one write (an nf_tables batch is one write) and waits for the
    /// acknowledgement of each that asked for one. The first error is returned, with the
    /// index of the message that caused it.
    pub fn transact(&mut self, messages: &[Message]) -> Result<(), (usize, io::Error)> {
        let first = self.seq;
        let mut bytes = Vec::new();
        let mut waiting = Vec::new();
        for (index, msg) in messages.iter().enumerate() {
            let seq = first + index as u32;
            bytes.extend_from_slice(&msg.bytes(seq));
            if msg.wants_ack() {
                waiting.push(seq);
            }
        }
        self.seq = first + messages.len() as u32;
        sys::write_all_raw(self.fd.as_raw_fd(), &bytes).map_err(|e| (0, e))?;
        let mut buf = vec![0u8; 65536];
        while !waiting.is_empty() {
            let got = sys::read_raw(self.fd.as_raw_fd(), &mut buf).map_err(|e| (0, e))?;
            if got == 0 {
                return Err((0, io::Error::from(io::ErrorKind::UnexpectedEof)));
            }
            for (seq, errno) in acks(&buf[..got]) {
                let index = seq.wrapping_sub(first) as usize;
                if errno != 0 {
                    return Err((index, io::Error::from_raw_os_error(errno)));
                }
                waiting.retain(|s| *s != seq);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn attributes_are_padded_and_nests_measured() {
        let mut msg = Message::new(16, NLM_F_ACK, &[0; 16]);
        msg.attr_str(3, "ab").begin(18).attr_str(1, "veth").end();
        let bytes = msg.bytes(7);
        let len = u32::from_ne_bytes(bytes[0..4].try_into().unwrap()) as usize;
        assert_eq!(len, bytes.len());
        assert_eq!(u16::from_ne_bytes(bytes[6..8].try_into().unwrap()), NLM_F_ACK | NLM_F_REQUEST);
        assert_eq!(u32::from_ne_bytes(bytes[8..12].try_into().unwrap()), 7);
        // "ab\0" takes 4 + 3, padded to 8.
        assert_eq!(&bytes[32..40], &[7, 0, 3, 0, b'a', b'b', 0, 0]);
        // The nest: its header (4) + "veth\0" attribute (4 + 5, padded to 12).
        assert_eq!(u16::from_ne_bytes(bytes[40..42].try_into().unwrap()), 16);
        assert_eq!(u16::from_ne_bytes(bytes[42..44].try_into().unwrap()), 18 | NLA_F_NESTED);
        assert_eq!(bytes.len(), 56);
    }

    #[test]
    fn acks_and_errors_are_read_by_sequence() {
        let mut reply = Vec::new();
        for (seq, errno) in [(4u32, 0i32), (5, -17)] {
            reply.extend_from_slice(&36u32.to_ne_bytes());
            reply.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            reply.extend_from_slice(&[0; 2]);
            reply.extend_from_slice(&seq.to_ne_bytes());
            reply.extend_from_slice(&[0; 4]);
            reply.extend_from_slice(&errno.to_ne_bytes());
            reply.extend_from_slice(&[0; 16]);
        }
        assert_eq!(acks(&reply), vec![(4, 0), (5, 17)]);
        assert!(acks(&reply[..20]).is_empty(), "a truncated reply yields nothing, never a panic");
    }
}
