//! `hold`: one client process of the connections scenario. Opens `--connections` raw-mode
//! WebSocket connections (round-robin over `--urls`, each bound to one of `--sources`, loopback
//! addresses, so ephemeral ports are not the limit), at most `--rate` new ones per second, and
//! holds them. Every text frame received is a broadcast `{"t": <publish µs>, "seq": N}`.
//!
//! Protocol on stdout, one JSON object per line:
//! `{"event":"ready",...}` once the ramp is over; `{"event":"seq","seq":N,"received":R,
//! "last_us":L}` when every connection got broadcast N (or 10 s after its first copy).
//! On stdin: `report` prints `{"event":"latency",...}` (percentiles since the last report) and
//! resets; `exit` ends the process. It also ends by itself after `--hold-seconds`.

use std::collections::BTreeMap;
use std::io::BufRead;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::json;
use tokio::net::TcpSocket;
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

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
}

/// Latencies in log2 buckets of microseconds (bucket i holds [2^i, 2^(i+1)) µs).
#[derive(Default)]
struct Stats {
    per_seq: BTreeMap<u64, SeqStats>,
    buckets: [u64; 32],
    count: u64,
}

struct SeqStats {
    received: usize,
    last_us: u64,
    first_at: Instant,
    reported: bool,
}

impl Stats {
    fn record(&mut self, seq: u64, latency_us: u64) {
        let s = self.per_seq.entry(seq).or_insert(SeqStats {
            received: 0,
            last_us: 0,
            first_at: Instant::now(),
            reported: false,
        });
        s.received += 1;
        s.last_us = s.last_us.max(latency_us);
        self.buckets[(64 - latency_us.max(1).leading_zeros() as usize - 1).min(31)] += 1;
        self.count += 1;
    }

    /// The upper bound (µs) of the bucket holding quantile `q`.
    fn quantile(&self, q: f64) -> u64 {
        let target = (self.count as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= target.max(1) {
                return 1 << (i + 1);
            }
        }
        0
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
    let config = WebSocketConfig::default().read_buffer_size(1024);
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
            let connected = tokio::time::timeout(Duration::from_secs(20), connect(&url, source, config)).await;
            drop(permit);
            let mut ws = match connected {
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
                while let Some(Ok(msg)) = ws.next().await {
                    if let Message::Text(t) = msg {
                        let now = now_micros();
                        if let (Some(sent), Some(seq)) = (number_after(&t, "\"t\":"), number_after(&t, "\"seq\":")) {
                            stats.lock().unwrap().record(seq, now.saturating_sub(sent));
                        }
                    }
                }
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
                        "event": "latency", "count": s.count,
                        "p50_us": s.quantile(0.5), "p99_us": s.quantile(0.99), "p999_us": s.quantile(0.999),
                    }));
                    s.buckets = [0; 32];
                    s.count = 0;
                }
                Some("exit") | None => return Ok(()),
                Some(_) => {}
            },
            _ = tick.tick() => {
                let holding = open.load(Ordering::Relaxed);
                let mut s = stats.lock().unwrap();
                for (seq, st) in s.per_seq.iter_mut().filter(|(_, st)| !st.reported) {
                    if st.received >= holding || st.first_at.elapsed() > Duration::from_secs(10) {
                        st.reported = true;
                        println!("{}", json!({"event": "seq", "seq": seq, "received": st.received, "last_us": st.last_us}));
                    }
                }
            }
        }
    }
}

/// The unsigned number right after `key` in `text` (the client's hot path: no JSON parse).
fn number_after(text: &str, key: &str) -> Option<u64> {
    let rest = &text[text.find(key)? + key.len()..];
    let end = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

async fn connect(
    url: &str,
    source: IpAddr,
    config: WebSocketConfig,
) -> anyhow::Result<tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>> {
    let authority = url.trim_start_matches("ws://").split('/').next().unwrap_or_default();
    let addr: SocketAddr = authority.parse()?;
    anyhow::ensure!(addr.ip().is_loopback() && source.is_loopback(), "only loopback targets and sources");
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let tcp = socket.connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config)).await?;
    Ok(ws)
}
