//! The WebSocket wire format (RFC 6455 section 5), as much of it as a server needs.
//!
//! * Outbound: a server frame is never masked, so a message is encoded once — header and
//!   payload in one [`Bytes`] — and the same allocation is written to every subscriber's socket.
//!   A connection's writes are vectored over whatever frames are queued: one syscall per batch,
//!   no copy per recipient.
//! * Inbound: [`Reader`] turns the bytes a client sent into whole messages, checking what a
//!   server must check (masking, reserved bits, opcodes, control frame rules, continuation order,
//!   `--max-message-size`, UTF-8 of text). It keeps bytes only while a frame is incomplete, so an
//!   idle connection holds no read buffer at all.

use bytes::{Bytes, BytesMut};
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// A whole encoded server frame, shared by reference count.
pub type Frame = Bytes;

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// Control frames carry at most this many payload bytes.
const MAX_CONTROL_PAYLOAD: usize = 125;

fn encode(opcode: u8, payload: &[u8]) -> Frame {
    let len = payload.len();
    let mut out = BytesMut::with_capacity(len + 10);
    out.extend_from_slice(&[0x80 | opcode]);
    if len < 126 {
        out.extend_from_slice(&[len as u8]);
    } else if len <= u16::MAX as usize {
        out.extend_from_slice(&[126]);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.extend_from_slice(&[127]);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(payload);
    out.freeze()
}

/// A text frame; `payload` must be UTF-8 (every caller holds a `str` or checked bytes).
pub fn text(payload: &[u8]) -> Frame {
    encode(OP_TEXT, payload)
}

pub fn binary(payload: &[u8]) -> Frame {
    encode(OP_BINARY, payload)
}

/// An empty ping: the keepalive.
pub fn ping() -> Frame {
    Bytes::from_static(&[0x80 | OP_PING, 0])
}

/// The answer to a client's ping, echoing its payload (at most 125 bytes by construction).
pub fn pong(payload: &[u8]) -> Frame {
    encode(OP_PONG, &payload[..payload.len().min(MAX_CONTROL_PAYLOAD)])
}

/// A close frame with a status code and a short reason; `None` sends an empty close (the reply
/// to a peer's close that carried no code).
pub fn close(code: Option<u16>, reason: &str) -> Frame {
    let Some(code) = code else { return encode(OP_CLOSE, &[]) };
    let mut payload = code.to_be_bytes().to_vec();
    // Cut to fit a control frame, never inside a character: the reason must stay UTF-8.
    let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..end]);
    encode(OP_CLOSE, &payload)
}

/// One complete message from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Incoming {
    /// Checked once, here: the type says so, so nobody checks again.
    Text(Utf8Bytes),
    Binary(Bytes),
    Ping(Bytes),
    Pong,
    /// The peer's close, with its status code if it gave one.
    Close(Option<u16>),
}

/// Why the bytes a client sent cannot be read; each maps to a close code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// 1009.
    #[error("message larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// 1007.
    #[error("text message is not valid UTF-8")]
    InvalidUtf8,
    /// 1002.
    #[error("protocol violation: {0}")]
    Protocol(&'static str),
}

/// Reassembles a client's messages from whatever the socket hands over.
#[derive(Debug)]
pub struct Reader {
    max_message: usize,
    /// Bytes of a frame that has not fully arrived yet; empty (unallocated) otherwise.
    pending: Vec<u8>,
    /// A fragmented data message under way: (is text, payload so far).
    fragments: Option<(bool, Vec<u8>)>,
}

impl Reader {
    pub fn new(max_message: usize) -> Self {
        Reader { max_message, pending: Vec::new(), fragments: None }
    }

    /// Bytes this reader holds between reads (for tests and accounting).
    pub fn buffered(&self) -> usize {
        self.pending.capacity() + self.fragments.as_ref().map_or(0, |(_, f)| f.capacity())
    }

    /// Takes `data` (just read from the socket) and appends every message it completes to `out`.
    /// After an error the connection must be closed; nothing more should be fed.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<Incoming>) -> Result<(), FrameError> {
        if self.pending.is_empty() {
            let used = self.parse(data, out)?;
            self.pending.extend_from_slice(&data[used..]);
        } else {
            self.pending.extend_from_slice(data);
            let pending = std::mem::take(&mut self.pending);
            let used = self.parse(&pending, out)?;
            if used < pending.len() {
                self.pending = pending;
                self.pending.drain(..used);
            }
        }
        Ok(())
    }

    /// Parses whole frames from the front of `buf`; returns how many bytes they took.
    fn parse(&mut self, buf: &[u8], out: &mut Vec<Incoming>) -> Result<usize, FrameError> {
        let mut at = 0;
        while let Some(used) = self.parse_one(&buf[at..], out)? {
            at += used;
        }
        Ok(at)
    }

    fn parse_one(&mut self, buf: &[u8], out: &mut Vec<Incoming>) -> Result<Option<usize>, FrameError> {
        let [b0, b1, ..] = *buf else { return Ok(None) };
        let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0F);
        if b0 & 0x70 != 0 {
            return Err(FrameError::Protocol("reserved bits set (no extension was negotiated)"));
        }
        if b1 & 0x80 == 0 {
            return Err(FrameError::Protocol("client frame is not masked"));
        }
        let control = opcode & 0x8 != 0;
        if !matches!(opcode, OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG) {
            return Err(FrameError::Protocol("unknown opcode"));
        }
        let (len, header) = match b1 & 0x7F {
            126 => match buf.get(2..4) {
                Some(b) => (u16::from_be_bytes([b[0], b[1]]) as u64, 4),
                None => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(b) if b[0] & 0x80 != 0 => {
                    return Err(FrameError::Protocol("64-bit length with its most significant bit set"));
                }
                Some(b) => (u64::from_be_bytes(b.try_into().expect("8 bytes")), 10),
                None => return Ok(None),
            },
            n => (n as u64, 2),
        };
        if control && (len > MAX_CONTROL_PAYLOAD as u64 || !fin) {
            return Err(FrameError::Protocol("control frame fragmented or longer than 125 bytes"));
        }
        let so_far = self.fragments.as_ref().map_or(0, |(_, f)| f.len() as u64);
        if !control && len.saturating_add(so_far) > self.max_message as u64 {
            return Err(FrameError::TooLarge { limit: self.max_message });
        }
        let len = len as usize;
        let Some(mask) = buf.get(header..header + 4) else { return Ok(None) };
        let Some(body) = buf.get(header + 4..header + 4 + len) else { return Ok(None) };
        let mask: [u8; 4] = mask.try_into().expect("4 bytes");
        let mut payload = body.to_vec();
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i & 3];
        }
        let used = header + 4 + len;
        match opcode {
            OP_PING => out.push(Incoming::Ping(payload.into())),
            OP_PONG => out.push(Incoming::Pong),
            OP_CLOSE => out.push(close_of(&payload)?),
            OP_TEXT | OP_BINARY => {
                if self.fragments.is_some() {
                    return Err(FrameError::Protocol("new data frame before the fragmented one finished"));
                }
                let text = opcode == OP_TEXT;
                if fin {
                    out.push(message(text, payload)?);
                } else {
                    self.fragments = Some((text, payload));
                }
            }
            _ => {
                let Some((text, mut so_far)) = self.fragments.take() else {
                    return Err(FrameError::Protocol("continuation frame with nothing to continue"));
                };
                so_far.extend_from_slice(&payload);
                if fin {
                    out.push(message(text, so_far)?);
                } else {
                    self.fragments = Some((text, so_far));
                }
            }
        }
        Ok(Some(used))
    }
}

fn message(text: bool, payload: Vec<u8>) -> Result<Incoming, FrameError> {
    if !text {
        return Ok(Incoming::Binary(payload.into()));
    }
    Ok(Incoming::Text(Utf8Bytes::try_from(payload).map_err(|_| FrameError::InvalidUtf8)?))
}

fn close_of(payload: &[u8]) -> Result<Incoming, FrameError> {
    match payload {
        [] => Ok(Incoming::Close(None)),
        [_] => Err(FrameError::Protocol("close frame with a one-byte body")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !is_valid_close_code(code) {
                return Err(FrameError::Protocol("close code not allowed on the wire"));
            }
            std::str::from_utf8(reason).map_err(|_| FrameError::InvalidUtf8)?;
            Ok(Incoming::Close(Some(code)))
        }
    }
}

/// Codes an endpoint may send in a close frame (RFC 6455 section 7.4).
pub fn is_valid_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// The payload of a frame this module encoded, with its opcode (tests and tools).
pub fn decode_server_frame(frame: &[u8]) -> Option<(u8, &[u8])> {
    let [b0, b1, ..] = *frame else { return None };
    let (len, header) = match b1 & 0x7F {
        126 => (u16::from_be_bytes(frame.get(2..4)?.try_into().ok()?) as usize, 4),
        127 => (u64::from_be_bytes(frame.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    Some((b0 & 0x0F, frame.get(header..header + len)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client frame: masked with a fixed key.
    fn client(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut f = vec![first];
        match payload.len() {
            n if n < 126 => f.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        f
    }

    fn feed_all(r: &mut Reader, data: &[u8]) -> Result<Vec<Incoming>, FrameError> {
        let mut out = Vec::new();
        r.feed(data, &mut out)?;
        Ok(out)
    }

    #[test]
    fn encodes_every_length_form() {
        for len in [0, 125, 126, 65535, 65536] {
            let payload = vec![b'x'; len];
            let f = text(&payload);
            assert_eq!(decode_server_frame(&f), Some((OP_TEXT, &payload[..])), "{len}");
            assert_eq!(f[0], 0x81);
            assert_eq!(f[1] & 0x80, 0, "server frames are not masked");
        }
        assert_eq!(&close(Some(1012), "bye")[..], b"\x88\x05\x03\xf4bye");
        assert_eq!(&close(None, "")[..], b"\x88\x00");
    }

    #[test]
    fn reads_messages_split_anywhere_and_holds_nothing_when_idle() {
        let mut wire = client(0x81, b"hello");
        wire.extend(client(0x82, &[1, 2, 3]));
        wire.extend(client(0x89, b"p"));
        wire.extend(client(0x81, &vec![b'y'; 70_000]));
        for split in [1, 2, 3, 7, 11, 200, wire.len()] {
            let mut r = Reader::new(100_000);
            let mut out = Vec::new();
            for chunk in wire.chunks(split) {
                r.feed(chunk, &mut out).unwrap();
            }
            assert_eq!(out.len(), 4, "split {split}");
            assert_eq!(out[0], Incoming::Text(Utf8Bytes::from_static("hello")));
            assert_eq!(out[1], Incoming::Binary(Bytes::from_static(&[1, 2, 3])));
            assert_eq!(out[2], Incoming::Ping(Bytes::from_static(b"p")));
            assert!(matches!(&out[3], Incoming::Text(t) if t.len() == 70_000));
            assert_eq!(r.buffered(), 0, "split {split}");
        }
    }

    #[test]
    fn reassembles_fragments_with_control_frames_between() {
        let mut wire = client(0x01, b"hel");
        wire.extend(client(0x89, b""));
        wire.extend(client(0x00, b"lo "));
        wire.extend(client(0x80, "wörld".as_bytes()));
        let out = feed_all(&mut Reader::new(100), &wire).unwrap();
        assert_eq!(out, [Incoming::Ping(Bytes::new()), Incoming::Text(Utf8Bytes::from("hello wörld"))]);
    }

    #[test]
    fn refuses_what_a_server_must_refuse() {
        let protocol = |wire: &[u8]| match feed_all(&mut Reader::new(1000), wire) {
            Err(FrameError::Protocol(why)) => why,
            other => panic!("{other:?}"),
        };
        assert!(protocol(b"\x81\x05hello").contains("not masked"));
        assert!(protocol(&client(0xC1, b"x")).contains("reserved"));
        assert!(protocol(&client(0x83, b"x")).contains("opcode"));
        assert!(protocol(&client(0x09, b"x")).contains("control"));
        assert!(protocol(&client(0x89, &[0; 126])).contains("control"));
        assert!(protocol(&client(0x80, b"x")).contains("continuation"));
        let mut two = client(0x01, b"a");
        two.extend(client(0x81, b"b"));
        assert!(protocol(&two).contains("fragmented"));
        assert!(protocol(&client(0x88, &[3])).contains("one-byte"));
        assert!(protocol(&client(0x88, &1005u16.to_be_bytes())).contains("close code"));
        assert!(protocol(&client(0x88, &999u16.to_be_bytes())).contains("close code"));
        assert!(protocol(b"\x82\xff\x80\0\0\0\0\0\0\x01").contains("most significant"));
        assert_eq!(feed_all(&mut Reader::new(1000), &client(0x81, &[0xFF, 0xFE])), Err(FrameError::InvalidUtf8));
    }

    #[test]
    fn size_limit_counts_whole_messages_and_is_checked_from_the_header() {
        assert!(feed_all(&mut Reader::new(10), &client(0x81, &[b'a'; 10])).is_ok());
        assert_eq!(feed_all(&mut Reader::new(10), &client(0x81, &[b'a'; 11])), Err(FrameError::TooLarge { limit: 10 }));
        // Refused from the first header bytes, before the body arrives.
        assert_eq!(
            feed_all(&mut Reader::new(10), &client(0x82, &[0; 70_000])[..10]),
            Err(FrameError::TooLarge { limit: 10 })
        );
        let mut parts = client(0x01, &[b'a'; 6]);
        parts.extend(client(0x80, &[b'a'; 6]));
        assert_eq!(feed_all(&mut Reader::new(10), &parts), Err(FrameError::TooLarge { limit: 10 }));
    }

    #[test]
    fn a_long_close_reason_is_cut_at_a_character_boundary() {
        let reason = "κ".repeat(100);
        let frame = close(Some(1008), &reason);
        let (op, payload) = decode_server_frame(&frame).unwrap();
        assert_eq!(op, OP_CLOSE);
        assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
        assert_eq!(std::str::from_utf8(&payload[2..]).unwrap(), "κ".repeat(61));
    }

    #[test]
    fn close_codes() {
        assert_eq!(feed_all(&mut Reader::new(10), &client(0x88, b"")).unwrap(), [Incoming::Close(None)]);
        assert_eq!(
            feed_all(&mut Reader::new(10), &client(0x88, b"\x03\xe8bye")).unwrap(),
            [Incoming::Close(Some(1000))]
        );
    }
}
