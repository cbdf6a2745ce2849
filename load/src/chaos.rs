//! `chaos`: the fault run. Each fault gets a fresh fleet (one `redis-server`, `--servers`
//! wsfleet servers on loopback) and real clients, and every figure comes from what they saw.
//!
//! Faults that test delivery run under the same traffic: subscribers in protocol mode on every
//! server that resume with `since` after any close (moving to the next server), and one
//! publisher that numbers its messages (`{"n": k}`) at a steady rate. After the fault, the fleet
//! must deliver again; the run then stops the publisher and compares, per subscriber, the
//! numbers it got with every number any subscriber got (what the bus delivered): a number
//! missing is **announced** when the subscriber was told it could not recover (a `subscribed`
//! reply with `recovered: false`, a `gap` frame, or a message in a new epoch), else **silent**. A number that no subscriber got and whose
//! publish was not refused is lost by the bus itself (silently, unless announced). Every publish
//! carries an id (`n<k>`), so every answer names its number: a publish refused as not published
//! (`bus_unavailable`) that was delivered all the same is counted exactly, and one answered
//! `outcome_unknown` is retried with the same id, as the README tells clients to (delivered once
//! either way, or counted as a duplicate). Duplicates and numbers out of order are counted.
//!
//! * `kill` — Redis killed (SIGKILL) and restarted empty after 3 s: the channel's history is
//!   gone, so the loss must be announced as a new epoch.
//! * `pause` — `CLIENT PAUSE 20000 ALL`: longer than a server's bus ping may go unanswered.
//! * `cut` — every pub/sub connection killed (`CLIENT KILL TYPE pubsub`) five times, 2 s apart:
//!   the servers reconnect and refill from history, nothing may be lost.
//! * `restore` — Redis restarted from a snapshot taken 5 s earlier (`BGSAVE`, then more
//!   publishes, then SIGKILL and a restart from the file): the epoch is kept but the offset
//!   rewinds, as after a failover to a lagging replica.
//!
//! Faults that test memory:
//!
//! * `stalled` — `--stalled` raw-mode clients on one channel that never read a byte, and a
//!   publisher that floods that channel with 4 KiB messages for 15 s: the servers' peak
//!   resident memory, and how many of those clients they closed as too slow (1013).
//! * `flood` — one publish on each of `--flood-channels` distinct channels, as fast as the
//!   fleet takes them: the servers' peak memory, Redis's memory before and after, the time.
//!   The servers' `--publish-rate` refuses what one connection sends past its burst
//!   (`rate_limited`, in `refused`), so Redis holds only what the limit lets through.
//!
//! For every fault: the time until every server's bus is up again after the fault ended, and
//! the servers' peak resident memory (sampled every 200 ms). Prints one JSON document.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use wsfleet_testkit::process::rss_bytes as rss;
use wsfleet_testkit::{Redis, Server};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    Kill,
    Pause,
    Sleep,
    Cut,
    Restore,
    Stalled,
    Flood,
}

#[derive(clap::Args)]
pub struct ChaosArgs {
    /// Faults to run, in order.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "kill,pause,sleep,cut,restore,stalled,flood")]
    faults: Vec<Fault>,
    /// Server processes.
    #[arg(long, default_value_t = 3)]
    servers: usize,
    /// Subscribers per server (delivery faults).
    #[arg(long, default_value_t = 3)]
    subscribers: usize,
    /// Publishes per second (delivery faults).
    #[arg(long, default_value_t = 50)]
    rate: u64,
    /// Clients that never read (`stalled`).
    #[arg(long, default_value_t = 10_000)]
    stalled: usize,
    /// Distinct channels published to (`flood`).
    #[arg(long, default_value_t = 50_000)]
    flood_channels: usize,
    /// The wsfleet-server binary.
    #[arg(long, default_value = "target/release/wsfleet-server")]
    server_bin: PathBuf,
}

/// One redis-server (its snapshots in `dir`) and the servers on it; every process is killed
/// when this drops.
struct Fleet {
    redis: Redis,
    dir: PathBuf,
    servers: Vec<Server>,
}

impl Fleet {
    fn start(args: &ChaosArgs, name: &str, server_flags: &[&str]) -> anyhow::Result<Fleet> {
        let dir = std::env::temp_dir().join(format!("wsfleet-chaos-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let redis = Redis::start_in(&dir);
        let mut flags: Vec<String> =
            ["--redis-url", &redis.url(), "--worker-threads", "1", "--ping-interval", "300"].map(String::from).to_vec();
        flags.extend(server_flags.iter().map(|f| f.to_string()));
        let servers = (0..args.servers).map(|_| Server::spawn(&args.server_bin, &flags, "info", "")).collect();
        let fleet = Fleet { redis, dir, servers };
        fleet.wait_bus_up(Duration::from_secs(20))?;
        Ok(fleet)
    }

    /// Kills Redis and starts it again on its port: from the snapshot in its directory if there
    /// is one, else empty.
    fn restart_redis(&mut self) {
        self.redis.kill();
        self.redis.restart();
    }

    fn cli(&self, args: &[&str]) -> String {
        self.redis.cli(args)
    }

    fn urls(&self, path: &str) -> Vec<String> {
        self.servers.iter().map(|s| s.url(path)).collect()
    }

    fn pids(&self) -> Vec<u32> {
        self.servers.iter().map(Server::pid).collect()
    }

    /// A metric summed over the servers.
    fn metric(&self, name: &str) -> f64 {
        self.servers.iter().map(|s| s.metric(name)).sum()
    }

    /// Waits until every server's bus is up; returns how long that took.
    fn wait_bus_up(&self, limit: Duration) -> anyhow::Result<Duration> {
        let start = Instant::now();
        while !self.servers.iter().all(Server::bus_up) {
            if start.elapsed() > limit {
                bail!("the servers' bus was not up {limit:?} after the fault");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(start.elapsed())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.servers.clear();
        self.redis.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Samples the servers' summed resident memory every 200 ms until dropped; keeps the peak.
struct MemoryPeak {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MemoryPeak {
    fn start(pids: Vec<u32>) -> Self {
        let (peak, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let thread = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(pids.iter().map(|p| rss(*p)).sum(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        MemoryPeak { peak, stop, thread: Some(thread) }
    }

    fn mib(mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.peak.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket connection to `url`, or none when it did not open within 5 s.
async fn connect(url: &str) -> Option<Ws> {
    match tokio::time::timeout(Duration::from_secs(5), tokio_tungstenite::connect_async(url)).await {
        Ok(Ok((ws, _))) => Some(ws),
        _ => None,
    }
}

/// What one resuming subscriber saw.
#[derive(Default)]
struct Seen {
    numbers: Vec<u64>,
    /// `subscribed` replies with `recovered: false`, and their reasons.
    announced: Vec<String>,
    /// The epochs its messages came in: a second one tells the client the order started anew.
    epochs: BTreeSet<String>,
    reconnects: u32,
}

/// A protocol-mode subscriber that resumes after every close, moving round-robin over `urls`.
async fn subscriber(urls: Vec<String>, first: usize, stop: watch::Receiver<bool>) -> Seen {
    let mut seen = Seen::default();
    let mut position: Option<(String, u64)> = None;
    let mut at = first;
    let mut after_stop = None::<Instant>;
    loop {
        if *stop.borrow() {
            let since = *after_stop.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(3) {
                return seen;
            }
        }
        let url = &urls[at % urls.len()];
        at += 1;
        let Some(mut ws) = connect(url).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut op = json!({"op": "subscribe", "channel": "chaos"});
        if let Some((epoch, offset)) = &position {
            op["since"] = json!({"epoch": epoch, "offset": offset});
        }
        if ws.send(Message::text(op.to_string())).await.is_err() {
            continue;
        }
        loop {
            let wait = if *stop.borrow() { Duration::from_secs(3) } else { Duration::from_secs(60) };
            let frame = match tokio::time::timeout(wait, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Value>(&t).unwrap_or_default(),
                Ok(Some(Ok(Message::Close(_))) | Some(Err(_)) | None) => break,
                Ok(Some(Ok(_))) => continue,
                Err(_) => {
                    if *stop.borrow() {
                        return seen;
                    }
                    break;
                }
            };
            match frame["type"].as_str() {
                Some("subscribed") => {
                    let head = (frame["epoch"].as_str().unwrap_or_default().to_owned(), frame["offset"].as_u64());
                    if position.is_some() && frame["recovered"] != true {
                        seen.announced.push(frame["reason"].as_str().unwrap_or("unknown").to_owned());
                        position = Some((head.0, head.1.unwrap_or(0)));
                    } else if position.is_none() {
                        position = Some((head.0, head.1.unwrap_or(0)));
                    }
                }
                Some("message") => {
                    let epoch = frame["epoch"].as_str().unwrap_or_default().to_owned();
                    seen.epochs.insert(epoch.clone());
                    position = Some((epoch, frame["offset"].as_u64().unwrap_or(0)));
                    if let Some(n) = frame["data"]["n"].as_u64() {
                        seen.numbers.push(n);
                    }
                }
                Some("gap") => seen.announced.push(format!("gap:{}", frame["reason"].as_str().unwrap_or("unknown"))),
                Some("error") => break,
                _ => {}
            }
        }
        seen.reconnects += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What the numbering publisher did.
#[derive(Default)]
struct Published {
    sent: u64,
    /// Numbers refused as not published (`bus_unavailable`, or any other error frame).
    refused: BTreeSet<u64>,
    /// `published` acknowledgements, and how many of them named an earlier publish (a retry).
    acknowledged: u64,
    acknowledged_duplicate: u64,
    /// `outcome_unknown` answers, each followed by a retry with the same id.
    outcome_unknown: u64,
    reconnects: u64,
}

/// Most retries of one publish whose outcome stays unknown.
const MAX_RETRIES: u32 = 10;

fn publish_op(n: u64) -> Message {
    Message::text(json!({"op": "publish", "channel": "chaos", "data": {"n": n}, "id": format!("n{n}")}).to_string())
}

/// Publishes `{"n": k}` on `chaos` every `interval`, moving round-robin over `urls` on a close.
async fn publisher(urls: Vec<String>, interval: Duration, stop: watch::Receiver<bool>) -> Published {
    let mut out = Published::default();
    let mut at = 0;
    while !*stop.borrow() {
        let url = &urls[at % urls.len()];
        at += 1;
        let Some(mut ws) = connect(url).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let mut tick = tokio::time::interval(interval);
        let mut retries = BTreeMap::<u64, u32>::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if *stop.borrow() {
                        return out;
                    }
                    out.sent += 1;
                    if ws.send(publish_op(out.sent)).await.is_err() {
                        break;
                    }
                }
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(t))) => {
                        let f: Value = serde_json::from_str(&t).unwrap_or_default();
                        let n = f["id"].as_str().and_then(|id| id.strip_prefix('n')).and_then(|n| n.parse::<u64>().ok());
                        match (f["type"].as_str(), f["code"].as_str(), n) {
                            (Some("published"), _, _) => {
                                out.acknowledged += 1;
                                out.acknowledged_duplicate += u64::from(f["duplicate"] == true);
                            }
                            (Some("error"), Some("outcome_unknown"), Some(n)) => {
                                out.outcome_unknown += 1;
                                let tried = retries.entry(n).or_default();
                                *tried += 1;
                                if *tried <= MAX_RETRIES && ws.send(publish_op(n)).await.is_err() {
                                    break;
                                }
                            }
                            (Some("error"), _, Some(n)) => {
                                out.refused.insert(n);
                            }
                            _ => {}
                        }
                    }
                    Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
            }
        }
        out.reconnects += 1;
    }
    out
}

/// Runs one delivery fault under traffic and compares what the subscribers got.
fn delivery_fault(args: &ChaosArgs, fault: Fault) -> anyhow::Result<Value> {
    // Room for the whole run in history and in one resume.
    let roomy = ["--history-size", "20000", "--client-queue", "32768", "--client-queue-bytes", "67108864"];
    let mut fleet = Fleet::start(args, &format!("{fault:?}").to_lowercase(), &roomy)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let (stop_tx, stop) = watch::channel(false);
    let urls = fleet.urls("/ws");
    let subs: Vec<_> =
        (0..args.servers * args.subscribers).map(|i| rt.spawn(subscriber(urls.clone(), i, stop.clone()))).collect();
    std::thread::sleep(Duration::from_secs(2));
    let interval = Duration::from_micros(1_000_000 / args.rate.max(1));
    let publisher = rt.spawn(publisher(urls.clone(), interval, stop.clone()));
    std::thread::sleep(Duration::from_secs(3));
    let memory = MemoryPeak::start(fleet.pids());

    let started = Instant::now();
    match fault {
        Fault::Kill => {
            fleet.redis.kill();
            std::thread::sleep(Duration::from_secs(3));
            let _ = std::fs::remove_file(fleet.dir.join("snapshot.rdb"));
            fleet.redis.restart();
        }
        Fault::Pause => {
            fleet.cli(&["CLIENT", "PAUSE", "20000", "ALL"]);
            std::thread::sleep(Duration::from_secs(20));
        }
        Fault::Sleep => {
            // The whole Redis stops for 20 s (pub/sub, pings and scripts alike), not only its
            // clients' commands: redis-cli returns when it wakes.
            fleet.cli(&["DEBUG", "SLEEP", "20"]);
        }
        Fault::Cut => {
            for _ in 0..5 {
                fleet.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
                std::thread::sleep(Duration::from_secs(2));
            }
        }
        Fault::Restore => {
            fleet.cli(&["BGSAVE"]);
            let saved = Instant::now();
            while !fleet.cli(&["INFO", "persistence"]).contains("rdb_bgsave_in_progress:0")
                || !fleet.dir.join("snapshot.rdb").exists()
            {
                if saved.elapsed() > Duration::from_secs(10) {
                    bail!("BGSAVE did not finish in 10 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_secs(5));
            fleet.restart_redis();
        }
        Fault::Stalled | Fault::Flood => unreachable!("not a delivery fault"),
    }
    let fault_seconds = started.elapsed().as_secs_f64();
    let ready_again = fleet.wait_bus_up(Duration::from_secs(60))?;
    // Traffic after the recovery, then the publisher stops and the subscribers catch up.
    std::thread::sleep(Duration::from_secs(5));
    let _ = stop_tx.send(true);
    let published = rt.block_on(publisher)?;
    let seen: Vec<Seen> = rt.block_on(async {
        let mut out = Vec::new();
        for s in subs {
            out.push(s.await.unwrap_or_default());
        }
        out
    });
    let peak_mib = memory.mib();

    let accepted: BTreeSet<u64> = seen.iter().flat_map(|s| s.numbers.iter().copied()).collect();
    // Numbers nobody got: refused ones (the publisher was told) and ones the bus lost.
    let undelivered = published.sent.saturating_sub(accepted.len() as u64);
    let refused_yet_delivered = published.refused.intersection(&accepted).count() as u64;
    let refused_undelivered = published.refused.len() as u64 - refused_yet_delivered;
    let bus_lost = undelivered.saturating_sub(refused_undelivered);
    let mut per_subscriber = Vec::new();
    let (mut silent, mut announced, mut duplicates, mut out_of_order) = (0u64, 0u64, 0u64, 0u64);
    let told = seen.iter().any(|s| !s.announced.is_empty() || s.epochs.len() > 1);
    if told {
        announced += bus_lost;
    } else {
        silent += bus_lost;
    }
    for s in &seen {
        let got: BTreeSet<u64> = s.numbers.iter().copied().collect();
        let first = s.numbers.first().copied().unwrap_or(u64::MAX);
        let missing = accepted.iter().filter(|n| **n >= first && !got.contains(n)).count() as u64;
        let dup = (s.numbers.len() - got.len()) as u64;
        let disorder = s.numbers.windows(2).filter(|w| w[1] < w[0]).count() as u64;
        if s.announced.is_empty() && s.epochs.len() < 2 {
            silent += missing;
        } else {
            announced += missing;
        }
        duplicates += dup;
        out_of_order += disorder;
        per_subscriber.push(json!({
            "received": s.numbers.len(), "missing": missing, "announced": s.announced, "epochs": s.epochs.len(),
            "reconnects": s.reconnects, "duplicates": dup,
        }));
    }
    Ok(json!({
        "fault": format!("{fault:?}").to_lowercase(),
        "fault_seconds": round(fault_seconds),
        "bus_up_again_seconds": round(ready_again.as_secs_f64()),
        "published": published.sent,
        "refused": published.refused.len(),
        "acknowledged": published.acknowledged,
        "acknowledged_retries": published.acknowledged_duplicate,
        "outcome_unknown": published.outcome_unknown,
        "publisher_reconnects": published.reconnects,
        "delivered": accepted.len(),
        "lost_by_the_bus": bus_lost,
        "refused_yet_delivered": refused_yet_delivered,
        "lost_silently": silent,
        "lost_announced": announced,
        "duplicates": duplicates,
        "out_of_order": out_of_order,
        "servers_peak_rss_mib": round(peak_mib),
        "subscribers": per_subscriber,
    }))
}

/// A raw TCP connection upgraded on `path` that is then never read.
fn stalled_client(addr: SocketAddr, path: &str) -> anyhow::Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    // Small kernel buffers: the server's own queue fills soon after.
    s.write_all(
        format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )?;
    let mut head = Vec::new();
    let mut r = BufReader::new(s.try_clone()?);
    while !head.ends_with(b"\r\n\r\n") {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            bail!("closed during the upgrade");
        }
        head.extend_from_slice(&line);
    }
    if !head.starts_with(b"HTTP/1.1 101") {
        bail!("upgrade refused: {}", String::from_utf8_lossy(&head));
    }
    Ok(s)
}

fn stalled(args: &ChaosArgs) -> anyhow::Result<Value> {
    // The default client queue: a client that does not read is closed once it is full. No
    // publish rate limit: the flood below is this fault's load, not a client to refuse.
    let fleet = Fleet::start(args, "stalled", &["--publish-rate", "0"])?;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let memory = MemoryPeak::start(fleet.pids());
    let mut held = Vec::new();
    let mut refused = 0usize;
    for i in 0..args.stalled {
        match stalled_client(fleet.servers[i % fleet.servers.len()].ws, "/ws/hot") {
            Ok(s) => held.push(s),
            Err(_) => refused += 1,
        }
    }
    let idle_mib = fleet.pids().iter().map(|p| rss(*p)).sum::<u64>() as f64 / (1024.0 * 1024.0);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let payload = "x".repeat(4096);
    let start = Instant::now();
    let sent = rt.block_on(async {
        let mut sent = 0u64;
        let Some(mut ws) = connect(&fleet.urls("/ws/hot")[0]).await else {
            return sent;
        };
        while start.elapsed() < Duration::from_secs(15) && sent < 200_000 {
            if ws.send(Message::text(payload.clone())).await.is_err() {
                break;
            }
            sent += 1;
            // Read (and drop) what comes back to this client, so only the stalled ones stall.
            while let Ok(Some(_)) = tokio::time::timeout(Duration::ZERO, ws.next()).await {}
        }
        sent
    });
    std::thread::sleep(Duration::from_secs(2));
    let closed = fleet.metric("wsfleet_slow_client_closes_total");
    let peak = memory.mib();
    drop(held);
    Ok(json!({
        "fault": "stalled",
        "stalled_clients": args.stalled - refused,
        "refused_at_upgrade": refused,
        "messages_published": sent,
        "payload_bytes": payload.len(),
        "closed_as_too_slow": closed,
        "servers_rss_mib_before_flood": round(idle_mib),
        "servers_peak_rss_mib": round(peak),
    }))
}

fn redis_used_mib(fleet: &Fleet) -> f64 {
    let info = fleet.cli(&["INFO", "memory"]);
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(f64::NAN, |b| b / (1024.0 * 1024.0))
}

fn flood(args: &ChaosArgs) -> anyhow::Result<Value> {
    let fleet = Fleet::start(args, "flood", &[])?;
    let memory = MemoryPeak::start(fleet.pids());
    let redis_before = redis_used_mib(&fleet);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let start = Instant::now();
    let urls = fleet.urls("/ws");
    let per = args.flood_channels.div_ceil(urls.len());
    let refused = Arc::new(Mutex::new(BTreeMap::<String, u64>::new()));
    let tasks: Vec<_> = urls
        .iter()
        .enumerate()
        .map(|(i, url)| {
            let (url, refused) = (url.clone(), refused.clone());
            rt.spawn(async move {
                let Some(ws) = connect(&url).await else {
                    return (0u64, Duration::ZERO);
                };
                let (mut tx, mut rx) = ws.split();
                let reader = tokio::spawn(async move {
                    while let Ok(Some(Ok(Message::Text(t)))) =
                        tokio::time::timeout(Duration::from_secs(5), rx.next()).await
                    {
                        let v: Value = serde_json::from_str(&t).unwrap_or_default();
                        let code = v["code"].as_str().unwrap_or("other").to_owned();
                        *refused.lock().unwrap_or_else(|e| e.into_inner()).entry(code).or_default() += 1;
                    }
                });
                let mut sent = 0u64;
                for c in 0..per {
                    let op = json!({"op": "publish", "channel": format!("flood-{i}-{c}"), "data": c});
                    if tx.send(Message::text(op.to_string())).await.is_err() {
                        break;
                    }
                    sent += 1;
                }
                let done = start.elapsed();
                let _ = reader.await;
                (sent, done)
            })
        })
        .collect();
    let (sent, took) = rt.block_on(async {
        let (mut total, mut last) = (0, Duration::ZERO);
        for t in tasks {
            let (sent, done) = t.await.unwrap_or_default();
            total += sent;
            last = last.max(done);
        }
        (total, last.as_secs_f64())
    });
    // The sends return once the frames are in the socket; the fleet is done when Redis holds
    // every channel (two keys each: the offset and the history), or stops growing.
    let dbsize = || fleet.cli(&["DBSIZE"]).trim().parse::<u64>().unwrap_or(0);
    let (mut keys, mut still) = (dbsize(), Instant::now());
    let mut took = took.max(start.elapsed().as_secs_f64());
    while keys < 2 * sent && still.elapsed() < Duration::from_secs(5) && start.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(100));
        let now = dbsize();
        if now != keys {
            (keys, still, took) = (now, Instant::now(), start.elapsed().as_secs_f64());
        }
    }
    let redis_after = redis_used_mib(&fleet);
    let peak = memory.mib();
    let refused = refused.lock().unwrap_or_else(|e| e.into_inner()).clone();
    Ok(json!({
        "fault": "flood",
        "channels": sent,
        "seconds": round(took),
        "refused": refused,
        "redis_keys_after": keys,
        "redis_used_mib_before": round(redis_before),
        "redis_used_mib_after": round(redis_after),
        "servers_peak_rss_mib": round(peak),
    }))
}

fn round(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

pub fn run(args: ChaosArgs) -> anyhow::Result<()> {
    if !Path::new(&args.server_bin).exists() {
        bail!("{} not found: build it with `cargo build --release -p wsfleet-server`", args.server_bin.display());
    }
    let mut results = Vec::new();
    for fault in &args.faults {
        eprintln!("[chaos] {fault:?}");
        let result = match fault {
            Fault::Stalled => stalled(&args),
            Fault::Flood => flood(&args),
            f => delivery_fault(&args, *f),
        };
        let result =
            result.unwrap_or_else(|e| json!({"fault": format!("{fault:?}").to_lowercase(), "error": e.to_string()}));
        eprintln!("[chaos] {result}");
        results.push(result);
    }
    println!("{}", serde_json::to_string_pretty(&json!({"faults": results}))?);
    Ok(())
}
