//! The black-box tests' kit: the real processes come from the workspace's test kit
//! (`wsfleet-testkit`: `redis-server` and `wsfleet-server` on loopback ports chosen at run time,
//! stopped by their pid when their handle drops, and plain HTTP probes); this module adds
//! WebSocket clients over TCP, well-behaved and hand-built.
#![allow(dead_code, unused_imports)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

pub type Ws = WebSocketStream<TcpStream>;

pub const TIMEOUT: Duration = Duration::from_secs(10);

pub use wsfleet_testkit::{Redis, Server, fleet, free_port, http_get};

/// Calls `f` until it returns `Some`, for at most [`TIMEOUT`].
pub fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    wsfleet_testkit::wait_until(what, TIMEOUT, || f().ok_or_else(|| "not yet".to_owned()))
}

/// Opens a WebSocket by hand (upgrade on `path`, 101 checked), so a test can send bytes no
/// well-behaved client library would.
pub async fn raw_socket(server: &Server, path: &str) -> TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(server.ws).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(upgrade_request(path, "").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    s
}

/// A client frame built byte by byte (independently of the server's codec): any flags, reserved
/// bits, opcode and length form, masked with `mask`.
pub fn masked_frame(fin: bool, rsv: u8, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut f = vec![(u8::from(fin) << 7) | (rsv << 4) | opcode];
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

/// Sends a raw request and returns the whole HTTP answer head (for refused upgrades).
pub async fn upgrade_answer(addr: SocketAddr, path: &str, extra_headers: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(upgrade_request(path, extra_headers).as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let read = async {
        let mut byte = [0u8; 1];
        while !buf.ends_with(b"\r\n\r\n") && s.read(&mut byte).await.unwrap_or(0) == 1 {
            buf.push(byte[0]);
        }
        // A refusal carries a body and then the server hangs up; an accepted upgrade stays open.
        if !buf.starts_with(b"HTTP/1.1 101") {
            let _ = s.read_to_end(&mut buf).await;
        }
    };
    let _ = tokio::time::timeout(TIMEOUT, read).await;
    String::from_utf8_lossy(&buf).into_owned()
}

pub fn upgrade_request(path: &str, extra_headers: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    )
}

pub fn client_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096)
}

pub async fn connect(url: &str) -> Ws {
    try_connect(url).await.unwrap_or_else(|e| panic!("connect {url}: {e}"))
}

pub async fn try_connect(url: &str) -> Result<Ws, WsError> {
    let addr = url.trim_start_matches("ws://").split('/').next().unwrap().to_owned();
    let tcp = TcpStream::connect(&addr).await.map_err(WsError::Io)?;
    tcp.set_nodelay(true).ok();
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(client_config())).await?;
    Ok(ws)
}

pub async fn send_json(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next data frame, as it came (text or binary), skipping pings and pongs.
pub async fn next_message(ws: &mut Ws) -> Message {
    loop {
        let msg = tokio::time::timeout(TIMEOUT, ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("connection ended")
            .expect("read failed");
        match msg {
            Message::Ping(_) | Message::Pong(_) => continue,
            m => return m,
        }
    }
}

pub async fn next_json(ws: &mut Ws) -> Value {
    match next_message(ws).await {
        Message::Text(t) => serde_json::from_str(&t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}")),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

pub async fn next_text(ws: &mut Ws) -> String {
    match next_message(ws).await {
        Message::Text(t) => t.to_string(),
        other => panic!("expected a text frame, got {other:?}"),
    }
}

/// A protocol-mode client subscribed to `channel` (the server confirmed it).
pub async fn subscriber(server: &Server, channel: &str) -> Ws {
    let mut ws = connect(&server.url("/ws")).await;
    send_json(&mut ws, serde_json::json!({"op": "subscribe", "channel": channel})).await;
    let reply = next_json(&mut ws).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["channel"], channel);
    ws
}

pub async fn publish(ws: &mut Ws, channel: &str, data: Value) {
    send_json(ws, serde_json::json!({"op": "publish", "channel": channel, "data": data})).await;
}

/// Reads until the server's close frame and returns its code (frames before it are skipped).
pub async fn close_code(ws: &mut Ws) -> Option<CloseCode> {
    loop {
        match tokio::time::timeout(TIMEOUT, ws.next()).await.expect("timed out waiting for a close") {
            Some(Ok(Message::Close(frame))) => return frame.map(|f| f.code),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}
