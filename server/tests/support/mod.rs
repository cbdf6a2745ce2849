//! Real processes for the black-box tests: `redis-server` (optionally with a password) and
//! `wsfleet-server` on loopback ports chosen at run time, WebSocket clients over TCP, and plain
//! HTTP probes. Every process is stopped by its pid when its handle drops.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

pub type Ws = WebSocketStream<TcpStream>;

pub const TIMEOUT: Duration = Duration::from_secs(10);

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

/// A port that was free a moment ago (for processes that cannot report the port they bound).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub struct Redis {
    pub port: u16,
    /// Set: Redis runs with `--requirepass`, and servers started on it get `--redis-password`.
    pub password: Option<String>,
    child: Option<Child>,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(None)
    }

    /// A Redis that refuses every client without this password.
    pub fn start_with_password(password: &str) -> Redis {
        Redis::start_with(Some(password))
    }

    fn start_with(password: Option<&str>) -> Redis {
        let mut r = Redis { port: free_port(), password: password.map(str::to_owned), child: None };
        r.restart();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts (again) on the same port, with no data.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "redis is already running");
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]);
        if let Some(password) = &self.password {
            cmd.args(["--requirepass", password]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (apt-get install redis-server)");
        self.child = Some(child);
        wait_until("redis answers", || {
            // Without the password a protected Redis answers -NOAUTH: it is up all the same.
            let mut s = StdStream::connect(("127.0.0.1", self.port)).ok()?;
            s.write_all(b"PING\r\n").ok()?;
            let mut buf = [0u8; 7];
            s.read_exact(&mut buf).ok()?;
            (&buf == b"+PONG\r\n" || &buf == b"-NOAUTH").then_some(())
        });
    }

    /// Runs `redis-cli` against this server, with its password if it has one; returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        self.cli_as(self.password.as_deref(), args)
    }

    /// Runs `redis-cli` with `password` (none: as a client that does not know it); returns its
    /// output, errors included.
    pub fn cli_as(&self, password: Option<&str>, args: &[&str]) -> String {
        let mut cmd = Command::new("redis-cli");
        cmd.args(["-p", &self.port.to_string()]).args(args).env_remove("REDISCLI_AUTH");
        if let Some(password) = password {
            // From the environment, so it is not on a command line.
            cmd.env("REDISCLI_AUTH", password);
        }
        let out = cmd.output().expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "-KILL");
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Log lines a server process keeps for the test, at most (the rest are only printed).
const LOG_LINES_KEPT: usize = 10_000;

pub struct Server {
    pub ws: SocketAddr,
    pub http: SocketAddr,
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// A server on `redis` (with its password, if it has one), ready; without Redis, the
    /// in-process bus.
    pub fn start(redis: Option<&Redis>, extra: &[&str]) -> Server {
        Server::start_logging(redis, extra, "info")
    }

    /// [`Server::start`] with this `WSFLEET_LOG` filter (e.g. `debug`); [`Server::log`] has
    /// every line.
    pub fn start_logging(redis: Option<&Redis>, extra: &[&str], filter: &str) -> Server {
        let mut args = Vec::new();
        if let Some(r) = redis {
            args.extend(["--redis-url".to_owned(), r.url()]);
            if let Some(password) = r.password.as_ref().filter(|_| !extra.contains(&"--redis-password")) {
                args.extend(["--redis-password".to_owned(), password.clone()]);
            }
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let server = Server::spawn(&args, filter);
        if redis.is_some() {
            server.wait_ready();
        }
        server
    }

    /// A server on `redis` (or on the `--redis-url` in `extra`) with exactly the Redis
    /// credentials in `extra`, none of the Redis's own; not waited for: it may never be ready.
    pub fn start_on(redis: &Redis, extra: &[&str]) -> Server {
        let mut args = Vec::new();
        if !extra.contains(&"--redis-url") {
            args.extend(["--redis-url".to_owned(), redis.url()]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        Server::spawn(&args, "info")
    }

    fn spawn(args: &[String], filter: &str) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wsfleet-server"));
        static SERVERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SERVERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        cmd.args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]);
        if !args.iter().any(|a| a == "--pod-name") {
            cmd.args(["--pod-name", &format!("test-{n}")]);
        }
        cmd.args(args)
            .env("WSFLEET_LOG", filter)
            .env_remove("WSFLEET_REDIS_PASSWORD")
            .env_remove("WSFLEET_REDIS_USERNAME")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start wsfleet-server");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std_mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let kept = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening") {
                    let _ = tx.send(line.clone());
                }
                eprintln!("[server] {line}");
                let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
                if kept.len() < LOG_LINES_KEPT {
                    kept.push(line);
                }
            }
        });
        let line = rx.recv_timeout(TIMEOUT).expect("server did not report its addresses");
        let field = |name: &str| -> SocketAddr {
            let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
            line[start..].split_whitespace().next().unwrap().parse().unwrap()
        };
        Server { ws: field("websocket"), http: field("http"), child: Some(child), log }
    }

    /// What the server has logged so far (its first lines, up to a cap).
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
    }

    /// Waits until a log line contains `text`; returns that line.
    pub fn wait_for_log(&self, text: &str) -> String {
        wait_until(&format!("the server logs {text:?}"), || {
            self.log.lock().unwrap_or_else(|e| e.into_inner()).iter().find(|l| l.contains(text)).cloned()
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.ws, path)
    }

    /// Waits until the server's bus is connected (`/readyz` stays 200 through a bus outage
    /// that the whole fleet shares, so readiness does not say it).
    pub fn wait_bus_up(&self) {
        wait_until("the server's bus is up", || (self.metric("wsfleet_bus_up") == 1.0).then_some(()));
    }

    /// Sends `sig` (`-STOP`, `-CONT`, ...) to the process.
    pub fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    pub fn wait_ready(&self) {
        wait_until("server /readyz is 200", || (http_get(self.http, "/readyz").0 == 200).then_some(()));
    }

    pub fn sigterm(&self) {
        signal(self.pid(), "-TERM");
    }

    pub fn sigkill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "-KILL");
            let _ = child.wait();
        }
    }

    /// Waits for the process to exit; `None` if it did not within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut()?;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().ok()? {
                self.child = None;
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The value of one metric line (first match of `prefix`), 0 if absent.
    pub fn metric(&self, prefix: &str) -> f64 {
        let (_, body) = http_get(self.http, "/metrics");
        body.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap();
        kb * 1024
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "-KILL");
            let _ = child.wait();
        }
    }
}

/// One real redis-server and `n` servers on it.
pub fn fleet(n: usize, extra: &[&str]) -> (Redis, Vec<Server>) {
    let redis = Redis::start();
    let servers = (0..n).map(|_| Server::start(Some(&redis), extra)).collect();
    (redis, servers)
}

pub fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A blocking HTTP/1.0 GET: (status, body). Status 0 when nothing answered.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let Ok(mut s) = StdStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return (0, String::new());
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let status = resp.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
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
