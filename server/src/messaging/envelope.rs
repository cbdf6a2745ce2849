//! Pure: the bytes of one published message on the bus.
//!
//! ```text
//! +---------+------+-----------------------+---------------+
//! | version | kind | published_at (µs, BE) | payload ...   |
//! |  1 byte | 1 B  |        8 bytes        |               |
//! +---------+------+-----------------------+---------------+
//! ```
//!
//! `kind` is `t` (text), `b` (binary) or `j` (JSON). `published_at` is the publishing server's
//! wall clock, used for the publish-to-deliver latency histogram. A server drops (and counts)
//! envelopes it cannot read rather than guessing: what came over the bus is checked as if a
//! client had sent it (text is UTF-8, JSON is one JSON value, since protocol mode splices it into
//! its frames unparsed; offsets start at 1), because anyone who reaches Redis can publish.
//!
//! The publish script (see [`crate::messaging::redis`]) gives each envelope its channel's next offset and
//! current epoch and sends it on as a [`Sequenced`] message: `<offset>:<epoch>:<envelope>`. The
//! history stream keeps the bare envelope under the entry id `<offset>-0`.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

/// A published message's body, as it travels on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// A raw-mode text frame (UTF-8 guaranteed).
    Text(Bytes),
    /// A raw-mode binary frame.
    Binary(Bytes),
    /// A protocol-mode `data` value: JSON text as the client sent it.
    Json(Bytes),
}

const VERSION: u8 = 1;
const HEADER: usize = 10;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub published_at_micros: u64,
    pub payload: Payload,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("envelope is {0} bytes, shorter than its header")]
    Short(usize),
    #[error("envelope version {0} is not understood")]
    Version(u8),
    #[error("envelope kind {0:#x} is not understood")]
    Kind(u8),
    #[error("text payload is not UTF-8")]
    NotUtf8,
    #[error("JSON payload is not one JSON value")]
    NotJson,
    #[error("sequenced message lacks a valid `<offset>:<epoch>:` prefix")]
    Sequence,
}

pub fn now_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

impl Envelope {
    pub fn new(payload: Payload) -> Self {
        Envelope { published_at_micros: now_micros(), payload }
    }

    pub fn encode(&self) -> Bytes {
        let (kind, body) = match &self.payload {
            Payload::Text(b) => (b't', b),
            Payload::Binary(b) => (b'b', b),
            Payload::Json(b) => (b'j', b),
        };
        let mut out = BytesMut::with_capacity(HEADER + body.len());
        out.put_u8(VERSION);
        out.put_u8(kind);
        out.put_u64(self.published_at_micros);
        out.put_slice(body);
        out.freeze()
    }

    pub fn decode(bytes: Bytes) -> Result<Self, EnvelopeError> {
        if bytes.len() < HEADER {
            return Err(EnvelopeError::Short(bytes.len()));
        }
        if bytes[0] != VERSION {
            return Err(EnvelopeError::Version(bytes[0]));
        }
        let published_at_micros = u64::from_be_bytes(bytes[2..HEADER].try_into().unwrap_or_default());
        let body = bytes.slice(HEADER..);
        let payload = match bytes[1] {
            b't' | b'j' if std::str::from_utf8(&body).is_err() => {
                return Err(EnvelopeError::NotUtf8);
            }
            b't' => Payload::Text(body),
            b'j' if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err() => {
                return Err(EnvelopeError::NotJson);
            }
            b'j' => Payload::Json(body),
            b'b' => Payload::Binary(body),
            k => return Err(EnvelopeError::Kind(k)),
        };
        Ok(Envelope { published_at_micros, payload })
    }
}

/// An envelope with its place in the channel's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sequenced {
    pub epoch: Arc<str>,
    pub offset: u64,
    pub envelope: Envelope,
}

impl Sequenced {
    /// The bus form: `<offset>:<epoch>:<envelope>`.
    pub fn encode(&self) -> Bytes {
        let mut out = BytesMut::new();
        out.put_slice(format!("{}:{}:", self.offset, self.epoch).as_bytes());
        out.put_slice(&self.envelope.encode());
        out.freeze()
    }

    pub fn decode(bytes: Bytes) -> Result<Self, EnvelopeError> {
        let mut parts = bytes.splitn(3, |b| *b == b':');
        let (Some(offset), Some(epoch), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(EnvelopeError::Sequence);
        };
        let offset = std::str::from_utf8(offset)
            .ok()
            .and_then(|o| o.parse().ok())
            .filter(|o| *o > 0)
            .ok_or(EnvelopeError::Sequence)?;
        let epoch = std::str::from_utf8(epoch).map_err(|_| EnvelopeError::Sequence)?;
        if !valid_epoch(epoch) {
            return Err(EnvelopeError::Sequence);
        }
        let header = format!("{offset}:{epoch}:").len();
        let envelope = Envelope::decode(bytes.slice(header..))?;
        Ok(Sequenced { epoch: Arc::from(epoch), offset, envelope })
    }
}

/// Epochs are 1-64 characters of `A-Z a-z 0-9 -`.
pub fn valid_epoch(epoch: &str) -> bool {
    !epoch.is_empty() && epoch.len() <= 64 && epoch.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// A fresh epoch: unique across restarts and servers (wall clock in nanoseconds, pid, counter).
pub fn new_epoch() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{nanos:x}-{:x}{n:x}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequenced_round_trip_and_rejects() {
        let s = Sequenced {
            epoch: Arc::from("18f2a-1c3"),
            offset: 42,
            envelope: Envelope { published_at_micros: 7, payload: Payload::Text(Bytes::from_static(b"a:b:c")) },
        };
        assert_eq!(Sequenced::decode(s.encode()), Ok(s));
        for bad in [&b"x:e:"[..], b"1:e", b"1:bad epoch:\x01t12345678", b"-1:e:", b"0:e:\x01t12345678"] {
            assert!(Sequenced::decode(Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn epochs_are_fresh_and_valid() {
        let (a, b) = (new_epoch(), new_epoch());
        assert_ne!(a, b);
        assert!(valid_epoch(&a), "{a}");
    }

    #[test]
    fn round_trips_every_kind() {
        for payload in [
            Payload::Text(Bytes::from_static("héllo".as_bytes())),
            Payload::Binary(Bytes::from_static(&[0, 1, 2, 255])),
            Payload::Json(Bytes::from_static(br#"{"a":[1,2]}"#)),
            Payload::Text(Bytes::new()),
        ] {
            let e = Envelope { published_at_micros: 1_700_000_000_123_456, payload };
            assert_eq!(Envelope::decode(e.encode()), Ok(e));
        }
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert_eq!(Envelope::decode(Bytes::from_static(b"\x01t")), Err(EnvelopeError::Short(2)));
        assert_eq!(Envelope::decode(Bytes::from_static(b"\x02t12345678")), Err(EnvelopeError::Version(2)));
        assert_eq!(Envelope::decode(Bytes::from_static(b"\x01x12345678")), Err(EnvelopeError::Kind(b'x')));
        assert_eq!(Envelope::decode(Bytes::from_static(b"\x01t12345678\xff")), Err(EnvelopeError::NotUtf8));
        // Protocol mode splices JSON into its frames: a forged one must not add fields or frames.
        for bad in [&b"\x01j12345678"[..], b"\x01j12345678\"x\"},{\"type\":\"subscribed\"", b"\x01j12345678{\"a\":1"] {
            assert_eq!(Envelope::decode(Bytes::from_static(bad)), Err(EnvelopeError::NotJson), "{bad:?}");
        }
    }
}
