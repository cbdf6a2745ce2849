//! Real WebSocket clients for the end-to-end tests on the node profile: they connect over TCP
//! from this machine to pod and Service addresses on the node's bridge, speak protocol mode
//! (`/ws`) and behave as the README tells client authors to: on a close or a failure, come back
//! through the Service and resume with `since`.
//!
//! The clients run on a tokio runtime of their own ([`Clients`]), so a test body stays plain
//! blocking code (kubectl, waits) while its clients keep reading.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Longest wait for one frame on a live subscription before a client gives up on it.
const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// A multi-threaded tokio runtime that runs a test's clients in the background.
pub struct Clients {
    pub rt: tokio::runtime::Runtime,
}

impl Default for Clients {
    fn default() -> Self {
        Self::new()
    }
}

impl Clients {
    pub fn new() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
        Self { rt }
    }

    /// Runs `f` to completion on the clients' runtime.
    pub fn run<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }
}

/// Connects to `url` (`ws://IP:PORT/ws`), giving up after 10 s.
pub async fn connect(url: &str) -> Result<Ws, String> {
    match tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(url)).await {
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(e)) => Err(format!("{url}: {e}")),
        Err(_) => Err(format!("{url}: no answer in 10 s")),
    }
}

/// Connects and subscribes to `channel` as a fresh client (no `since`), retrying for up to 30 s
/// as a real client would (a pod that turned unready a moment ago may still get the connection
/// and answer 503, or close it). Returns the connection and the `subscribed` reply.
pub async fn subscribe_fresh(url: &str, channel: &str, since: Option<&(String, u64)>) -> (Ws, Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let mut ws = connect(url).await?;
            let reply = subscribe(&mut ws, channel, since).await?;
            Ok::<_, String>((ws, reply))
        };
        match attempt.await {
            Ok(done) => return done,
            Err(e) if Instant::now() < deadline => {
                eprintln!("retrying a subscribe to {url}: {e}");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => panic!("no subscribe to {channel} on {url} within 30 s: {e}"),
        }
    }
}

/// Sends one protocol-mode operation.
pub async fn send(ws: &mut Ws, op: Value) -> Result<(), String> {
    match tokio::time::timeout(FRAME_TIMEOUT, ws.send(Message::text(op.to_string()))).await {
        Ok(sent) => sent.map_err(|e| e.to_string()),
        Err(_) => Err(format!("a send blocked for {FRAME_TIMEOUT:?}")),
    }
}

/// The next JSON frame; `Err` with the close code (or the error) when the connection ends.
pub async fn next_json(ws: &mut Ws) -> Result<Value, String> {
    // One deadline for the call: the server's pings keep arriving on a silent subscription.
    let deadline = tokio::time::Instant::now() + FRAME_TIMEOUT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                return serde_json::from_str(&t).map_err(|e| format!("bad JSON {t:?}: {e}"));
            }
            Ok(Some(Ok(Message::Close(frame)))) => {
                return Err(format!("close {}", frame.map_or(1005, |f| u16::from(f.code))));
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(None) => return Err("connection ended".into()),
            Err(_) => return Err(format!("no JSON frame for {FRAME_TIMEOUT:?}")),
        }
    }
}

/// Subscribes to `channel` (resuming after `since` when given) and returns the `subscribed` reply.
pub async fn subscribe(ws: &mut Ws, channel: &str, since: Option<&(String, u64)>) -> Result<Value, String> {
    let mut op = json!({"op": "subscribe", "channel": channel});
    if let Some((epoch, offset)) = since {
        op["since"] = json!({"epoch": epoch, "offset": offset});
    }
    send(ws, op).await?;
    let reply = next_json(ws).await?;
    if reply["type"] == "subscribed" { Ok(reply) } else { Err(format!("subscribe answered {reply}")) }
}

/// One message as a subscriber received it.
#[derive(Debug, Clone, PartialEq)]
pub struct Received {
    pub epoch: String,
    pub offset: u64,
    pub data: Value,
}

impl Received {
    /// The fields of a `{"type":"message",...}` frame.
    fn of(m: &Value) -> Self {
        Self {
            epoch: m["epoch"].as_str().unwrap_or_default().to_owned(),
            offset: m["offset"].as_u64().unwrap_or_default(),
            data: m["data"].clone(),
        }
    }
}

/// One connection of a [`resilient_subscriber`]: where it went, how it was answered and how it
/// ended.
#[derive(Debug, Clone, Default)]
pub struct Session {
    pub url: String,
    /// The `subscribed` reply's `recovered` and `reason` (absent on the first subscribe).
    pub recovered: Option<bool>,
    pub reason: Option<String>,
    /// `close 1012`, `connection ended`, ... (None while open or when the client stopped).
    pub ended: Option<String>,
}

#[derive(Debug, Default)]
pub struct SubscriberLog {
    pub messages: Vec<Received>,
    pub sessions: Vec<Session>,
}

impl SubscriberLog {
    /// How many connections the server closed with `code`.
    pub fn closes(&self, code: u16) -> usize {
        let want = format!("close {code}");
        self.sessions.iter().filter(|s| s.ended.as_deref() == Some(&want)).count()
    }
}

/// Where a [`resilient_subscriber`] may stop: the channel's final epoch and offset.
pub type Until = Option<(String, u64)>;

/// A client that keeps one subscription across servers: it starts on `first` (a pod's address),
/// and after any close or failure comes back through `service` and resumes with `since` from
/// the last message it received. It stops once it has the message `until` names, or when
/// `until`'s sender is gone, and gives up (returning what it has) after `limit`.
pub async fn resilient_subscriber(
    first: String,
    service: String,
    channel: String,
    subscribed: watch::Sender<bool>,
    mut until: watch::Receiver<Until>,
    limit: Duration,
) -> SubscriberLog {
    let deadline = Instant::now() + limit;
    let mut log = SubscriberLog::default();
    let mut position: Option<(String, u64)> = None;
    let mut url = first;
    // Where the client is: its last message, or where a resume that could not recover put it.
    let reached = |position: &Option<(String, u64)>, until: &watch::Receiver<Until>| match (&*until.borrow(), position)
    {
        (Some((epoch, end)), Some((at, offset))) => at == epoch && offset >= end,
        _ => false,
    };
    'sessions: while Instant::now() < deadline && !reached(&position, &until) {
        let mut ws = match connect(&url).await {
            Ok(ws) => ws,
            Err(_) => {
                // Refused (a draining pod answers 503) or no endpoint yet: back off, retry.
                tokio::time::sleep(Duration::from_millis(200)).await;
                url = service.clone();
                continue;
            }
        };
        let mut session = Session { url: url.clone(), ..Default::default() };
        url = service.clone();
        match subscribe(&mut ws, &channel, position.as_ref()).await {
            Ok(reply) => {
                let head = (
                    reply["epoch"].as_str().unwrap_or_default().to_owned(),
                    reply["offset"].as_u64().unwrap_or_default(),
                );
                if position.is_some() {
                    session.recovered = reply["recovered"].as_bool();
                    session.reason = reply["reason"].as_str().map(str::to_owned);
                    if session.recovered != Some(true) {
                        // Lost messages are announced; the client goes on from the channel's
                        // position now (a new epoch after Redis lost its data).
                        position = Some(head);
                    }
                } else {
                    // A first subscribe starts at the channel's head.
                    position = Some(head);
                }
                let _ = subscribed.send(true);
            }
            Err(e) => {
                session.ended = Some(e);
                log.sessions.push(session);
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        loop {
            if Instant::now() >= deadline {
                session.ended = Some(format!("gave up: the end was not reached within {limit:?}"));
                break;
            }
            let frame = tokio::select! {
                f = next_json(&mut ws) => f,
                changed = until.changed() => {
                    if changed.is_err() {
                        log.sessions.push(session);
                        break 'sessions;
                    }
                    if reached(&position, &until) { break } else { continue }
                }
            };
            match frame {
                Ok(m) if m["type"] == "message" => {
                    let r = Received::of(&m);
                    position = Some((r.epoch.clone(), r.offset));
                    log.messages.push(r);
                    if reached(&position, &until) {
                        break;
                    }
                }
                // A server that could not serve (bus_unavailable while Redis restarts): go
                // elsewhere and resume.
                Ok(m) if m["type"] == "error" => {
                    session.ended = Some(format!("error {}", m["code"]));
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    session.ended = Some(e);
                    break;
                }
            }
        }
        log.sessions.push(session);
    }
    log
}

#[derive(Debug, Default)]
pub struct PublisherLog {
    /// Every `n` sent, in order.
    pub sent: Vec<u64>,
    /// Publishes whose outcome is unknown: the one whose send failed, or the last one sent on a
    /// connection that then ended. Only these may be missing from the channel.
    pub unknown: Vec<u64>,
    /// Publishes the server refused with an error frame (`bus_unavailable` while Redis is down).
    pub refused: u32,
}

/// Publishes `{"n": 1}`, `{"n": 2}`, ... on `channel` every `interval` through `url` (the
/// Service), reconnecting when its connection ends, until `stop` turns true.
pub async fn publisher(
    url: String,
    channel: String,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) -> PublisherLog {
    let mut log = PublisherLog::default();
    let mut n = 0u64;
    'connections: while !*stop.borrow() {
        let mut ws = match connect(&url).await {
            Ok(ws) => ws,
            Err(e) => {
                eprintln!("[publisher] after {n} publishes: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut tick = tokio::time::interval(interval);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    n += 1;
                    log.sent.push(n);
                    if let Err(e) = send(&mut ws, json!({"op": "publish", "channel": channel, "data": {"n": n}})).await {
                        eprintln!("[publisher] publish {n} failed: {e}");
                        log.unknown.push(n);
                        continue 'connections;
                    }
                }
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(t))) => {
                        let frame: Value = serde_json::from_str(&t).unwrap_or_default();
                        assert_eq!(frame["type"], "error", "a publisher gets nothing but errors: {t}");
                        log.refused += 1;
                    }
                    end @ (Some(Ok(Message::Close(_)) | Err(_)) | None) => {
                        eprintln!("[publisher] connection ended after publish {n}: {end:?}");
                        log.unknown.extend(log.sent.last());
                        continue 'connections;
                    }
                    Some(Ok(_)) => {}
                },
                _ = stop.changed() => {
                    if *stop.borrow() { break 'connections; }
                }
            }
        }
    }
    log
}

/// The channel's whole order as the bus holds it: a fresh client resumes from offset 0 of
/// `epoch` and reads every message up to the channel's current position. History must hold
/// them all, and they must be few enough for one resume (at most three quarters of the
/// server's client queue: 768 with the default 1,024).
pub async fn channel_history(url: &str, channel: &str, epoch: &str) -> Vec<Received> {
    let (mut ws, reply) = subscribe_fresh(url, channel, Some(&(epoch.to_owned(), 0))).await;
    assert_eq!(reply["recovered"], true, "the whole history must still be there: {reply}");
    let end = reply["offset"].as_u64().expect("offset");
    let mut all = Vec::new();
    while all.len() < end as usize {
        let m = next_json(&mut ws).await.expect("history message");
        all.push(Received::of(&m));
    }
    all
}
