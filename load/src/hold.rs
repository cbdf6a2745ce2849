//! `hold`: one client process of the connections scenario. Opens `--connections` raw-mode
//! WebSocket connections (round-robin over `--urls`, each bound to one of `--sources`, loopback
//! addresses, so ephemeral ports are not the limit), at most `--rate` new ones per second, and
//! holds them. Every text frame received is a broadcast `{"t": <publish µs>, "seq": N}`.
//!
//! The client is lean so that it measures the servers, not itself: a plain HTTP upgrade, then
//! frames parsed straight from the thread's read buffer (many per read when a server batches
//! them); a connection keeps bytes only while a frame is incomplete. Pings are answered.
//!
//! Protocol on stdout, one JSON object per line:
//! `{"event":"ready",...}` once the ramp is over; `{"event":"seq","seq":N,"received":R,
//! "last_us":L,"first_at_us":F,"last_at_us":A}` when every connection got broadcast N (or
//! `--seq-timeout` seconds after its first copy): L is the slowest publish-to-deliver latency, F
//! and A the wall clock of the first and the last delivery.
//! On stdin: `report` prints `{"event":"latency",...}` (the latency histogram since the last
//! report) and resets; `exit` ends the process. It also ends by itself after `--hold-seconds`.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;

use crate::hist::Histogram;
use crate::now_micros;

#[derive(clap::Args)]
pub struct HoldArgs {
    /// Raw-mode URLs (`ws://127.0.0.1:PORT/ws/<channel>`), used round-robin.
    #[arg(long, value_delimiter = ',', required = true)]
    urls: Vec<String>,
    /// Connections to open (one process can hold about 19,000: its open-file limit).
    #[arg(long)]
    connections: usize,
    /// Loopback source addresses, used round-robin.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1")]
    sources: Vec<IpAddr>,
    /// New connections per second, at most.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Handshakes in flight, at most.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Exit after this many seconds whatever happens.
    #[arg(long, default_value_t = 600)]
    hold_seconds: u64,
    /// Report a broadcast this many seconds after its first copy even if some connections
    /// have not received it.
    #[arg(long, default_value_t = 60)]
    seq_timeout: u64,
}

/// Deliveries per broadcast, and publish-to-deliver latencies (µs) since the last report.
#[derive(Default)]
struct Stats {
    per_seq: BTreeMap<u64, SeqStats>,
    latency: Histogram,
}

struct SeqStats {
    received: usize,
    last_us: u64,
    last_at_us: u64,
    /// Wall clock (µs) of the first copy: when the broadcast reached the fleet, near enough.
    first_at_us: u64,
    first_at: Instant,
    reported: bool,
}

impl Stats {
    fn record(&mut self, seq: u64, latency_us: u64, now_us: u64) {
        let s = self.per_seq.entry(seq).or_insert(SeqStats {
            received: 0,
            last_us: 0,
            last_at_us: 0,
            first_at_us: now_us,
            first_at: Instant::now(),
            reported: false,
        });
        s.received += 1;
        s.last_us = s.last_us.max(latency_us);
        s.last_at_us = s.last_at_us.max(now_us);
        self.latency.record(latency_us);
    }
}

pub fn run(args: HoldArgs) -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(hold(args))
}

async fn hold(args: HoldArgs) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(args.hold_seconds);
    let stats = Arc::new(std::sync::Mutex::new(Stats::default()));
    let open = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let first_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let handshakes = Arc::new(Semaphore::new(args.concurrency));
    let started = Instant::now();
    let mut pace = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate.max(1) as f64));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut ramp = tokio::task::JoinSet::new();
    for i in 0..args.connections {
        pace.tick().await;
        let permit = handshakes.clone().acquire_owned().await?;
        let url = args.urls[i % args.urls.len()].clone();
        let source = args.sources[i % args.sources.len()];
        let (stats, open, failed, first_error) = (stats.clone(), open.clone(), failed.clone(), first_error.clone());
        ramp.spawn(async move {
            let connected = tokio::time::timeout(Duration::from_secs(20), connect(&url, source)).await;
            drop(permit);
            let (stream, leftover) = match connected {
                Ok(Ok(ws)) => ws,
                Ok(Err(e)) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().unwrap().get_or_insert(e.to_string());
                    return;
                }
                Err(_) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    first_error.lock().unwrap().get_or_insert("connect timed out".into());
                    return;
                }
            };
            open.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let _ = receive(stream, leftover, &stats).await;
                open.fetch_sub(1, Ordering::Relaxed);
            });
        });
    }
    while ramp.join_next().await.is_some() {}
    let ready = json!({
        "event": "ready",
        "connections": open.load(Ordering::Relaxed),
        "failed": failed.load(Ordering::Relaxed),
        "seconds": started.elapsed().as_secs_f64(),
        "first_error": *first_error.lock().unwrap(),
    });
    println!("{ready}");

    // stdin commands, read on a blocking thread.
    let (tx, mut commands) = tokio::sync::mpsc::channel::<String>(16);
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines().map_while(Result::ok) {
            if tx.blocking_send(line).is_err() {
                break;
            }
        }
    });
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => return Ok(()),
            cmd = commands.recv() => match cmd.as_deref() {
                Some("report") => {
                    let mut s = stats.lock().unwrap();
                    println!("{}", json!({
                        "event": "latency", "count": s.latency.count(), "histogram_us": s.latency.to_json(),
                    }));
                    s.latency.clear();
                }
                Some("exit") | None => return Ok(()),
                Some(_) => {}
            },
            _ = tick.tick() => {
                let holding = open.load(Ordering::Relaxed);
                let mut s = stats.lock().unwrap();
                for (seq, st) in s.per_seq.iter_mut().filter(|(_, st)| !st.reported) {
                    if st.received >= holding || st.first_at.elapsed() > Duration::from_secs(args.seq_timeout) {
                        st.reported = true;
                        println!("{}", json!({"event": "seq", "seq": seq, "received": st.received,
                            "last_us": st.last_us, "first_at_us": st.first_at_us, "last_at_us": st.last_at_us}));
                    }
                }
            }
        }
    }
}

/// The unsigned number right after `key` in `text` (the client's hot path: no JSON parse).
fn number_after(text: &[u8], key: &[u8]) -> Option<u64> {
    let at = text.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = text[at..].iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&text[at..at + digits]).ok()?.parse().ok()
}

/// Opens a raw TCP connection from `source` and upgrades it. Returns the stream and any bytes
/// that arrived after the 101 answer.
async fn connect(url: &str, source: IpAddr) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let rest = url.strip_prefix("ws://").ok_or_else(|| anyhow::anyhow!("{url}: only ws:// URLs"))?;
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let addr: SocketAddr = authority.parse()?;
    anyhow::ensure!(addr.ip().is_loopback() && source.is_loopback(), "only loopback targets and sources");
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let mut tcp = socket.connect(addr).await?;
    tcp.set_nodelay(true)?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut head = Vec::with_capacity(256);
    let end = loop {
        anyhow::ensure!(tcp.read_buf(&mut head).await? > 0, "closed during the upgrade");
        if let Some(i) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        anyhow::ensure!(head.len() < 8192, "upgrade answer too long");
    };
    if !head.starts_with(b"HTTP/1.1 101") {
        let status = String::from_utf8_lossy(&head[..head.iter().position(|b| *b == b'\r').unwrap_or(0)]).into_owned();
        anyhow::bail!("upgrade refused: {status}");
    }
    Ok((tcp, head.split_off(end)))
}

/// Reads frames until the connection ends, recording every broadcast and answering pings.
async fn receive(mut stream: TcpStream, leftover: Vec<u8>, stats: &std::sync::Mutex<Stats>) -> std::io::Result<()> {
    thread_local! {
        static BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 64 * 1024]);
    }
    let mut pongs = Vec::new();
    let mut pending = consume(&leftover, stats, &mut pongs);
    loop {
        for payload in pongs.drain(..) {
            stream.write_all(&masked(0xA, &payload)).await?;
        }
        // `poll_read`, not readiness + `try_read` until it would block: a read that leaves the
        // buffer partly empty shows the socket drained, which spares one failing read syscall
        // per batch the server wrote. The buffer is the thread's, borrowed only while polled.
        let n = std::future::poll_fn(|cx| {
            BUFFER.with(|buffer| {
                let mut buffer = buffer.borrow_mut();
                let mut read = tokio::io::ReadBuf::new(&mut buffer);
                std::task::ready!(std::pin::Pin::new(&mut stream).poll_read(cx, &mut read))?;
                let data = read.filled();
                if pending.is_empty() {
                    pending = consume(data, stats, &mut pongs);
                } else {
                    pending.extend_from_slice(data);
                    pending = consume(&pending, stats, &mut pongs);
                }
                std::task::Poll::Ready(std::io::Result::Ok(data.len()))
            })
        })
        .await?;
        if n == 0 {
            return Ok(());
        }
    }
}

/// Records every whole frame of `data`; returns the bytes of an incomplete last frame.
fn consume(data: &[u8], stats: &std::sync::Mutex<Stats>, pongs: &mut Vec<Vec<u8>>) -> Vec<u8> {
    let mut at = 0;
    let now = now_micros();
    let mut stats = stats.lock().unwrap();
    while let Some((opcode, payload, used)) = server_frame(&data[at..]) {
        match opcode {
            0x1 => {
                if let (Some(sent), Some(seq)) = (number_after(payload, b"\"t\":"), number_after(payload, b"\"seq\":"))
                {
                    stats.record(seq, now.saturating_sub(sent), now);
                }
            }
            0x9 => pongs.push(payload.to_vec()),
            _ => {}
        }
        at += used;
    }
    data[at..].to_vec()
}

/// One whole unmasked server frame at the front of `buf`: (opcode, payload, bytes used).
fn server_frame(buf: &[u8]) -> Option<(u8, &[u8], usize)> {
    let [b0, b1, ..] = *buf else { return None };
    let (len, header) = match b1 & 0x7F {
        126 => (u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    Some((b0 & 0x0F, buf.get(header..header + len)?, header + len))
}

/// A masked client frame (clients must mask; the key need not be secret here).
fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x5A, 0x17, 0xC3, 0x2E];
    let mut f = vec![0x80 | opcode, 0x80 | payload.len().min(125) as u8];
    f.extend_from_slice(&mask);
    f.extend(payload.iter().take(125).enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_across_reads_are_all_counted() {
        let stats = std::sync::Mutex::new(Stats::default());
        let mut wire = Vec::new();
        for seq in 1..=3u64 {
            let text = format!(r#"{{"t":1,"seq":{seq}}}"#);
            wire.extend_from_slice(&[0x81, text.len() as u8]);
            wire.extend_from_slice(text.as_bytes());
        }
        wire.extend_from_slice(&[0x89, 1, b'p']);
        let mut pongs = Vec::new();
        let mut pending = Vec::new();
        for chunk in wire.chunks(5) {
            pending.extend_from_slice(chunk);
            pending = consume(&pending, &stats, &mut pongs);
        }
        assert!(pending.is_empty());
        let stats = stats.lock().unwrap();
        assert_eq!(stats.latency.count(), 3);
        assert_eq!(stats.per_seq.keys().copied().collect::<Vec<_>>(), [1, 2, 3]);
        assert_eq!(pongs, [b"p".to_vec()]);
        assert_eq!(number_after(br#"{"t":123,"seq":9}"#, b"\"t\":"), Some(123));
    }
}
