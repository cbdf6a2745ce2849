//! The HTTP side of a WebSocket connection: reading the upgrade request and answering it.
//!
//! The request head is read into a buffer that is dropped once the connection is upgraded (at
//! most [`MAX_HEAD`] bytes: 431 beyond). Bytes a client sent after the head are handed to the
//! frame reader, not lost. Answers are plain HTTP/1.1 with `Connection: close` for refusals.

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// The largest request head accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Headers in one request, at most (proxies and meshes add a good dozen to a browser's).
const MAX_HEADERS: usize = 96;

/// What the server uses of an upgrade request (and what admission looks at). Its `Debug` hides
/// the credentials: the `Authorization` header and the `access_token` query parameter.
#[derive(Default, Clone, PartialEq, Eq)]
pub struct Head {
    pub path: String,
    pub query: Option<String>,
    pub origin: Option<String>,
    pub authorization: Option<String>,
    /// `Sec-WebSocket-Key`.
    pub key: String,
}

impl std::fmt::Debug for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Head")
            .field("path", &self.path)
            .field("query", &self.query.as_deref().map(redact_query))
            .field("origin", &self.origin)
            .field("authorization", &self.authorization.as_ref().map(|_| "<redacted>"))
            .field("key", &self.key)
            .finish()
    }
}

/// A query string fit for a log line: the value of `access_token` replaced.
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some(("access_token", _)) => "access_token=<redacted>",
            _ => kv,
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Why a request is not a WebSocket upgrade this server takes, with the status to answer.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    #[error("connection closed or failed before the request was complete")]
    Closed,
    #[error("request head larger than {MAX_HEAD} bytes")]
    TooLarge,
    #[error("more than {MAX_HEADERS} request headers")]
    TooManyHeaders,
    #[error("{0}")]
    BadRequest(String),
    #[error("unsupported Sec-WebSocket-Version (this server speaks 13)")]
    WrongVersion,
    #[error("{0} is not allowed; the WebSocket endpoint takes GET")]
    Method(String),
}

impl HeadError {
    /// The HTTP answer, or `None` when there is nobody to answer.
    pub fn response(&self) -> Option<Vec<u8>> {
        let body = format!("{self}\n");
        Some(match self {
            HeadError::Closed => return None,
            HeadError::TooLarge | HeadError::TooManyHeaders => {
                response(431, "Request Header Fields Too Large", &[], &body)
            }
            HeadError::BadRequest(_) => response(400, "Bad Request", &[], &body),
            HeadError::WrongVersion => response(426, "Upgrade Required", &[("Sec-WebSocket-Version", "13")], &body),
            HeadError::Method(_) => response(405, "Method Not Allowed", &[("Allow", "GET")], &body),
        })
    }
}

/// Reads the request head from `stream`. Returns it with the bytes that followed it.
pub async fn read_head(stream: &mut TcpStream) -> Result<(Head, Vec<u8>), HeadError> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        let n = stream.read_buf(&mut buf).await.map_err(|_| HeadError::Closed)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        if let Some((head, used)) = parse_head(&buf)? {
            return Ok((head, buf.split_off(used)));
        }
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        buf.reserve(1024.min(MAX_HEAD - buf.len()));
    }
}

/// Parses a complete request head from the front of `buf`: `Ok(None)` while incomplete.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let used = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(e) => return Err(HeadError::BadRequest(format!("malformed HTTP request: {e}"))),
    };
    let method = req.method.unwrap_or_default();
    if method != "GET" {
        return Err(HeadError::Method(method.to_owned()));
    }
    if req.version != Some(1) {
        return Err(HeadError::BadRequest("WebSocket upgrades need HTTP/1.1".into()));
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if !has_token("Upgrade", "websocket") {
        return Err(HeadError::BadRequest("missing `Upgrade: websocket`; this is a WebSocket endpoint".into()));
    }
    if !has_token("Connection", "upgrade") {
        return Err(HeadError::BadRequest("missing `Connection: Upgrade`".into()));
    }
    if header("Sec-WebSocket-Version") != Some("13") {
        return Err(HeadError::WrongVersion);
    }
    let key = match header("Sec-WebSocket-Key") {
        Some(k) if !k.is_empty() => k.to_owned(),
        _ => return Err(HeadError::BadRequest("missing Sec-WebSocket-Key".into())),
    };
    let target = req.path.unwrap_or_default();
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (target, None),
    };
    let head = Head {
        path: path.to_owned(),
        query,
        origin: header("Origin").map(str::to_owned),
        authorization: header("Authorization").map(str::to_owned),
        key,
    };
    Ok(Some((head, used)))
}

/// The 101 answer that completes the upgrade.
pub fn switching_protocols(key: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        derive_accept_key(key.as_bytes())
    )
    .into_bytes()
}

/// A plain-text HTTP answer that ends the connection.
pub fn response(status: u16, phrase: &str, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /ws/news?token=abc HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\n\
        Connection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: https://a.example\r\n\r\n";

    #[test]
    fn parses_an_upgrade_and_keeps_what_follows() {
        let mut wire = GOOD.as_bytes().to_vec();
        wire.extend_from_slice(b"\x81\x80");
        let (head, used) = parse_head(&wire).unwrap().unwrap();
        assert_eq!(&wire[used..], b"\x81\x80");
        assert_eq!(head.path, "/ws/news");
        assert_eq!(head.query.as_deref(), Some("token=abc"));
        assert_eq!(head.origin.as_deref(), Some("https://a.example"));
        assert!(parse_head(&wire[..40]).unwrap().is_none(), "incomplete");
        let answer = String::from_utf8(switching_protocols(&head.key)).unwrap();
        // The example of RFC 6455 section 1.3.
        assert!(answer.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"), "{answer}");
    }

    #[test]
    fn debug_hides_the_token() {
        let req = GOOD
            .replace("?token=abc", "?a=1&access_token=secret.jwt.value")
            .replace("Host: x\r\n", "Host: x\r\nAuthorization: Bearer other.jwt.value\r\n");
        let (head, _) = parse_head(req.as_bytes()).unwrap().unwrap();
        assert_eq!(head.query.as_deref(), Some("a=1&access_token=secret.jwt.value"));
        let shown = format!("{head:?}");
        assert!(!shown.contains("jwt.value"), "{shown}");
        assert!(shown.contains("a=1&access_token=<redacted>"), "{shown}");
    }

    #[test]
    fn refuses_what_is_not_an_upgrade() {
        let status = |req: &str| {
            let e = parse_head(req.as_bytes()).unwrap_err();
            String::from_utf8(e.response().unwrap()).unwrap().lines().next().unwrap().to_owned()
        };
        assert_eq!(status(&GOOD.replace("GET", "POST")), "HTTP/1.1 405 Method Not Allowed");
        assert_eq!(status(&GOOD.replace("Upgrade: WebSocket\r\n", "")), "HTTP/1.1 400 Bad Request");
        assert_eq!(status(&GOOD.replace("keep-alive, Upgrade", "keep-alive")), "HTTP/1.1 400 Bad Request");
        assert_eq!(status(&GOOD.replace("Version: 13", "Version: 8")), "HTTP/1.1 426 Upgrade Required");
        assert_eq!(status(&GOOD.replace("Sec-WebSocket-Key", "X-Key")), "HTTP/1.1 400 Bad Request");
        assert_eq!(status("GARBAGE\x01\r\n\r\n"), "HTTP/1.1 400 Bad Request");
        let crowded: String = (0..100).map(|i| format!("X-H{i}: v\r\n")).collect();
        assert_eq!(status(&GOOD.replace("Host: x\r\n", &crowded)), "HTTP/1.1 431 Request Header Fields Too Large");
        let mut many: String = (0..60).map(|i| format!("X-H{i}: v\r\n")).collect();
        many.push_str("Host: x\r\n");
        assert!(parse_head(GOOD.replace("Host: x\r\n", &many).as_bytes()).unwrap().is_some(), "60 headers pass");
    }
}
