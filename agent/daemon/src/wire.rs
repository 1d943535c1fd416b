//! Framing: every message is prefixed by its length as a varint (prost's
//! length-delimited form). Requests are at most [`MAX_FRAME`] bytes.
use std::io::{self, Read};

use prost::Message;

/// Longest message accepted (a launch carries the command line and the environment).
pub const MAX_FRAME: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("message of {0} bytes is over the limit of {MAX_FRAME}")]
    TooLong(usize),
    #[error("malformed message: its length prefix is not a varint")]
    BadPrefix,
    #[error("malformed message: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// `msg` with its length prefix.
pub fn frame<M: Message>(msg: &M) -> Vec<u8> {
    msg.encode_length_delimited_to_vec()
}

/// The length prefix at the start of `buf`, once whole: (its size, the message's size).
pub fn prefix(buf: &[u8]) -> Result<Option<(usize, usize)>, WireError> {
    let mut len: u64 = 0;
    for (i, byte) in buf.iter().enumerate().take(10) {
        len |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let len = usize::try_from(len).map_err(|_| WireError::TooLong(usize::MAX))?;
            if len > MAX_FRAME {
                return Err(WireError::TooLong(len));
            }
            return Ok(Some((i + 1, len)));
        }
    }
    if buf.len() >= 10 {
        return Err(WireError::BadPrefix);
    }
    Ok(None)
}

/// If `buf` starts with a whole frame: the message's range in it.
pub fn complete(buf: &[u8]) -> Result<Option<std::ops::Range<usize>>, WireError> {
    Ok(prefix(buf)?.and_then(|(start, len)| (buf.len() >= start + len).then(|| start..start + len)))
}

/// Reads one message from a blocking stream.
pub fn read_blocking<M: Message + Default, R: Read>(reader: &mut R) -> Result<M, WireError> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let len = loop {
        match reader.read(&mut byte) {
            Ok(0) => return Err(WireError::Closed),
            Ok(_) => head.push(byte[0]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err.into()),
        }
        if let Some((_, len)) = prefix(&head)? {
            break len;
        }
    };
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => WireError::Closed,
        _ => WireError::Io(e),
    })?;
    Ok(M::decode(&body[..])?)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::proto::{request::Op, AgentRef, Request};

    #[test]
    fn frames_round_trip_and_partial_frames_wait() {
        let req = Request { op: Some(Op::Kill(AgentRef { agent: "a".repeat(300) })) };
        let bytes = frame(&req);
        for cut in 0..bytes.len() {
            assert_eq!(complete(&bytes[..cut]).unwrap(), None, "cut at {cut}");
        }
        let range = complete(&bytes).unwrap().unwrap();
        assert_eq!(Request::decode(&bytes[range]).unwrap(), req);
        let back: Request = read_blocking(&mut &bytes[..]).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn oversized_and_garbage_prefixes_are_errors_not_allocations() {
        let mut prefix = Vec::new();
        prost::encoding::encode_varint((MAX_FRAME + 1) as u64, &mut prefix);
        assert!(matches!(complete(&prefix), Err(WireError::TooLong(_))));
        assert!(complete(&[0xff; 10]).is_err());
        assert!(matches!(read_blocking::<Request, _>(&mut &[][..]), Err(WireError::Closed)));
    }
}
