//! `connections`: the road to a million connections, for one server stack at a time.
//!
//! Starts a `redis-server` and `--servers` server processes (wsfleet, or the seed's Node.js
//! `ws` + `ioredis` baseline), then steps the number of held connections up through `--steps`,
//! adding `hold` client processes (each bound to its own loopback source addresses). At every
//! step it records: connections held and failed, time to establish them, server resident memory
//! per connection, kernel memory per connection, server CPU while idle, then the time until one
//! broadcast reaches every connection, the fan-out throughput of a burst of broadcasts
//! (deliveries per second until the last connection has the last message), and
//! publish-to-deliver latency under a steady broadcast rate. It stops at the last step, or
//! earlier when connections fail or memory runs low, and says why. Prints one JSON document.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{self, Message};

use wsfleet_testkit::process::{proc_bytes, rss_bytes as rss};
use wsfleet_testkit::{free_port, http_get, metric_in, wait_port};

use crate::hist::Histogram;
use crate::now_micros;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    Wsfleet,
    Node,
}

#[derive(clap::Args)]
pub struct ScenarioArgs {
    /// Server stack to measure.
    #[arg(long, value_enum)]
    stack: Stack,
    /// Server processes (each holds at most ~19,000 connections: its open-file limit).
    #[arg(long, default_value_t = 16)]
    servers: usize,
    /// Cumulative connection counts to measure at.
    #[arg(long, value_delimiter = ',', default_value = "10000,50000,100000,200000,250000")]
    steps: Vec<usize>,
    /// Most connections per client process.
    #[arg(long, default_value_t = 15_000)]
    per_client: usize,
    /// Client processes each step adds at least (fewer connections each when the step is
    /// small): one process reads on one core, and at 10,000 connections a single one would
    /// leave its reading for after the servers' fan-out and time itself, not the servers.
    #[arg(long, default_value_t = 4)]
    min_new_clients: usize,
    /// Client source addresses: 127.0.0.2 up to 127.0.0.(1 + N). Each gives about 64,000
    /// ephemeral ports, so a million connections need at least 16.
    #[arg(long, default_value_t = 48)]
    sources: usize,
    /// New connections per second per client process.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// The wsfleet-server binary.
    #[arg(long, default_value = "target/release/wsfleet-server")]
    server_bin: PathBuf,
    /// The baseline server script (run with `node`).
    #[arg(long, default_value = "bench/baseline/server.js")]
    node_server: PathBuf,
    /// Single broadcasts timed per step.
    #[arg(long, default_value_t = 3)]
    broadcasts: u64,
    /// Broadcasts in the burst phase: published at once (one connection per server, each
    /// sending its share in one write) and timed until every connection has every one.
    #[arg(long, default_value_t = 20)]
    burst_messages: u64,
    /// Bursts per step; the median one stands for the step (they vary with how publishes and
    /// fan-out rounds happen to interleave).
    #[arg(long, default_value_t = 5)]
    bursts: u64,
    /// Deliveries per second during the latency phase (its broadcasts are spaced so that every
    /// connection gets one each `connections / this` seconds, at least 0.2 s apart).
    #[arg(long, default_value_t = 40_000)]
    sustained_deliveries: u64,
    /// Broadcasts in the latency phase (fewer when they would take more than a minute).
    #[arg(long, default_value_t = 8)]
    sustained_messages: u64,
    /// wsfleet servers' `--ping-interval` and `--ping-timeout` (seconds). The baseline sends no
    /// keepalive at all; at a million connections the default 25 s would mean 40,000 pings a
    /// second on two cores.
    #[arg(long, default_value_t = 300)]
    ping_interval: u64,
    /// Stop before a step when the machine has less memory available than this (MiB).
    #[arg(long, default_value_t = 3072)]
    min_free_mib: u64,
}

/// Child processes killed (by pid) when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
        }
        for c in &mut self.0 {
            let _ = c.wait();
        }
    }
}

struct Client {
    stdin: ChildStdin,
    connections: usize,
}

fn meminfo(field: &str) -> u64 {
    proc_bytes("/proc/meminfo", field)
}

/// utime + stime in clock ticks (100 per second).
fn cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// Frames written to clients and write syscalls, summed over the wsfleet servers' metrics.
fn write_counts(ports: &[u16]) -> (f64, f64) {
    let mut totals = (0.0, 0.0);
    for port in ports {
        let body = http_get(([127, 0, 0, 1], *port).into(), "/metrics").1;
        totals.0 += metric_in(&body, "wsfleet_messages_out_total").unwrap_or(0.0);
        totals.1 += metric_in(&body, "wsfleet_socket_writes_total").unwrap_or(0.0);
    }
    totals
}

/// Sends one raw-mode broadcast through server `addr` on a short-lived connection.
fn broadcast(addr: SocketAddr, seq: u64) -> anyhow::Result<()> {
    let mut ws = publisher(addr)?;
    send(&mut ws, &[seq])?;
    close(vec![ws]);
    Ok(())
}

type Publisher = tungstenite::WebSocket<TcpStream>;

/// A raw-mode connection to server `addr`, upgraded and ready to publish.
fn publisher(addr: SocketAddr) -> anyhow::Result<Publisher> {
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    let (ws, _) = tungstenite::client(format!("ws://{addr}/ws/bench"), stream).context("publisher handshake")?;
    Ok(ws)
}

/// Sends broadcasts `seqs` back to back: one write.
fn send(ws: &mut Publisher, seqs: &[u64]) -> anyhow::Result<()> {
    for seq in seqs {
        ws.write(Message::text(json!({"t": now_micros(), "seq": seq}).to_string()))?;
    }
    ws.flush()?;
    Ok(())
}

/// Closes politely: sends every close frame first, then waits for each server's close (or its
/// end of the stream), so that no reset can overtake messages a server has not read yet.
fn close(publishers: Vec<Publisher>) {
    let mut closing = Vec::new();
    for mut ws in publishers {
        if ws.get_ref().set_read_timeout(Some(Duration::from_secs(30))).is_ok() && ws.close(None).is_ok() {
            closing.push(ws);
        }
    }
    for mut ws in closing {
        while ws.read().is_ok() {}
    }
}

pub fn run(args: ScenarioArgs) -> anyhow::Result<()> {
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let mut procs = Procs(Vec::new());
    let redis_port = free_port();
    procs.0.push(
        Command::new("redis-server")
            .args(["--port", &redis_port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--client-output-buffer-limit", "pubsub 256mb 64mb 60"])
            .stdout(Stdio::null())
            .spawn()
            .context("redis-server")?,
    );
    wait_port(redis_port, Duration::from_secs(10));

    let mut servers = Vec::new();
    let mut server_pids = Vec::new();
    let mut metrics_ports = Vec::new();
    for i in 0..args.servers {
        let port = free_port();
        let http_port = free_port();
        let child = match args.stack {
            Stack::Wsfleet => Command::new(&args.server_bin)
                .args(["--listen", &format!("127.0.0.1:{port}"), "--http-listen", &format!("127.0.0.1:{http_port}")])
                .args(["--redis-url", &format!("redis://127.0.0.1:{redis_port}"), "--pod-name", &format!("s{i}")])
                .args(["--max-connections", "19500", "--worker-threads", "1"])
                .args(["--ping-interval", &args.ping_interval.to_string()])
                .args(["--ping-timeout", &args.ping_interval.to_string()])
                .env("WSFLEET_LOG", "warn")
                .stdout(Stdio::null())
                .spawn()
                .context("wsfleet-server")?,
            Stack::Node => Command::new("node")
                .arg(&args.node_server)
                .args([port.to_string(), redis_port.to_string()])
                .stdout(Stdio::null())
                .spawn()
                .context("node baseline server")?,
        };
        server_pids.push(child.id());
        if args.stack == Stack::Wsfleet {
            metrics_ports.push(http_port);
        }
        procs.0.push(child);
        wait_port(port, Duration::from_secs(15));
        servers.push(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    std::thread::sleep(Duration::from_secs(1));
    let base_rss: u64 = server_pids.iter().map(|p| rss(*p)).sum();
    let base_slab = meminfo("Slab:");
    let urls: Vec<String> = servers.iter().map(|a| format!("ws://{a}/ws/bench")).collect();

    let (tx, events) = mpsc::channel::<(usize, Value)>();
    let mut clients: Vec<Client> = Vec::new();
    let mut client_procs = Procs(Vec::new());
    let mut held = 0usize;
    let mut seq = 0u64;
    let mut steps = Vec::new();
    let mut stopped = None;
    let me = std::env::current_exe()?;

    for &target in &args.steps {
        let available = meminfo("MemAvailable:");
        if available < args.min_free_mib * 1024 * 1024 {
            stopped = Some(format!("memory: {} MiB available before the {target} step", available >> 20));
            break;
        }
        if target > args.servers * 19_000 {
            stopped = Some(format!("{target} connections need more than {} server processes", args.servers));
            break;
        }
        // Add client processes up to the target.
        let ramp_start = Instant::now();
        let mut new = Vec::new();
        let chunk = args.per_client.min(target.saturating_sub(held).div_ceil(args.min_new_clients.max(1))).max(1);
        while held + new.iter().sum::<usize>() < target {
            let n = chunk.min(target - held - new.iter().sum::<usize>());
            let index = clients.len();
            let sources: Vec<String> =
                (0..args.sources).map(|s| format!("127.0.0.{}", 2 + (index + s) % args.sources)).collect();
            let mut child = Command::new(&me)
                .args(["hold", "--urls", &urls.join(","), "--connections", &n.to_string()])
                .args(["--sources", &sources.join(","), "--rate", &args.rate.to_string(), "--hold-seconds", "1800"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .context("hold client")?;
            let out = child.stdout.take().context("client stdout")?;
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<Value>(&line)
                        && tx.send((index, v)).is_err()
                    {
                        break;
                    }
                }
            });
            let stdin = child.stdin.take().context("client stdin")?;
            client_procs.0.push(child);
            new.push(n);
            clients.push(Client { stdin, connections: 0 });
        }
        // Wait for every new client's ready line.
        let mut failed = 0u64;
        let mut first_error = Value::Null;
        let mut waiting = new.len();
        while waiting > 0 {
            let (i, v) = events.recv_timeout(Duration::from_secs(300)).context("a client never became ready")?;
            if v["event"] == "ready" {
                clients[i].connections = v["connections"].as_u64().unwrap_or(0) as usize;
                failed += v["failed"].as_u64().unwrap_or(0);
                if first_error.is_null() && !v["first_error"].is_null() {
                    first_error = v["first_error"].clone();
                }
                waiting -= 1;
            }
        }
        let establish = ramp_start.elapsed().as_secs_f64();
        held = clients.iter().map(|c| c.connections).sum();
        std::thread::sleep(Duration::from_secs(2));

        let server_rss: u64 = server_pids.iter().map(|p| rss(*p)).sum();
        let client_rss: u64 = client_procs.0.iter().map(|c| rss(c.id())).sum();
        let slab = meminfo("Slab:");
        let ticks0: u64 = server_pids.iter().map(|p| cpu_ticks(*p)).sum();
        std::thread::sleep(Duration::from_secs(3));
        let ticks1: u64 = server_pids.iter().map(|p| cpu_ticks(*p)).sum();
        let idle_cpu = (ticks1 - ticks0) as f64 / 3.0; // percent of one core (100 ticks/s)

        // Single broadcasts: time until the last connection has it.
        let mut fanout = Vec::new();
        for _ in 0..args.broadcasts {
            seq += 1;
            broadcast(servers[0], seq)?;
            let Delivered { received, slowest_us, .. } = collect_seqs(&events, seq..=seq, clients.len())?;
            fanout.push(json!({"seq": seq, "received": received, "last_ms": slowest_us as f64 / 1000.0,
                "deliveries_per_s": (received as f64 / (slowest_us.max(1) as f64 / 1e6)).round()}));
            std::thread::sleep(Duration::from_millis(300));
        }
        // A burst: fan-out throughput when messages come faster than one write per message.
        let burst_messages = args.burst_messages.max(1);
        let client_pids: Vec<u32> = client_procs.0.iter().map(|c| c.id()).collect();
        let cpu = |pids: &[u32]| pids.iter().map(|p| cpu_ticks(*p)).sum::<u64>();
        let mut bursts = Vec::new();
        for _ in 0..args.bursts.max(1) {
            let first_burst = seq + 1;
            seq += burst_messages;
            // Published the way a fleet's traffic arrives: from one connection per server, each
            // sending its share back to back. The publishers connect (and their servers set them
            // up) before the clock starts: connection set-up is not fan-out.
            let mut publishers = servers.iter().map(|a| publisher(*a)).collect::<anyhow::Result<Vec<_>>>()?;
            std::thread::sleep(Duration::from_millis(500));
            let (server_ticks, client_ticks) = (cpu(&server_pids), cpu(&client_pids));
            let (frames0, writes0) = write_counts(&metrics_ports);
            let burst_start = now_micros();
            // One thread writes every publisher's share in turn (one write each, microseconds
            // apart): threads started one by one would reach a CPU already busy with the first
            // messages' fan-out, and spread the burst over hundreds of milliseconds.
            for (i, ws) in publishers.iter_mut().enumerate() {
                let mine: Vec<u64> = (first_burst..=seq).filter(|s| s % servers.len() as u64 == i as u64).collect();
                send(ws, &mine).with_context(|| format!("publisher {i}"))?;
            }
            close(publishers);
            let delivered = collect_seqs(&events, first_burst..=seq, clients.len())?;
            let burst_received = delivered.received;
            let burst_seconds = delivered.last_at_us.saturating_sub(burst_start).max(1) as f64 / 1e6;
            // CPU seconds spent by the servers and by the clients while the burst was delivered
            // (sampled after the last report, so slightly over).
            let (frames1, writes1) = write_counts(&metrics_ports);
            let frames_per_write = (writes1 > writes0).then(|| (frames1 - frames0) / (writes1 - writes0));
            let burst_cpu = json!({"servers": (cpu(&server_pids) - server_ticks) as f64 / 100.0,
                                   "clients": (cpu(&client_pids) - client_ticks) as f64 / 100.0});
            bursts.push(json!({"messages": burst_messages, "deliveries": burst_received,
                "expected": burst_messages * held as u64, "seconds": burst_seconds,
                "deliveries_per_s": (burst_received as f64 / burst_seconds).round(), "cpu_seconds": burst_cpu,
                "frames_per_write": frames_per_write,
                "first_delivery_ms": delivered.first_at_us.saturating_sub(burst_start) as f64 / 1000.0,
                "arrival_spread_ms": delivered.arrival_spread_us as f64 / 1000.0}));
            std::thread::sleep(Duration::from_millis(500));
        }
        // The median burst stands for the step; all of them are kept.
        let mut by_rate = bursts.clone();
        by_rate.sort_by(|a, b| a["deliveries_per_s"].as_f64().partial_cmp(&b["deliveries_per_s"].as_f64()).unwrap());
        let burst = by_rate[by_rate.len() / 2].clone();
        std::thread::sleep(Duration::from_millis(500));
        // Steady broadcasts: latency percentiles.
        for c in &mut clients {
            let _ = writeln!(c.stdin, "report");
        }
        drain_latency(&events, clients.len())?;
        let period = Duration::from_secs_f64((held as f64 / args.sustained_deliveries.max(1) as f64).max(0.2));
        let sustained_messages = args.sustained_messages.min((60.0 / period.as_secs_f64()) as u64).max(2);
        let sustained_start = Instant::now();
        let first_sustained = seq + 1;
        for k in 0..sustained_messages {
            seq += 1;
            broadcast(servers[(k as usize) % servers.len()], seq)?;
            let next = sustained_start + period * (k as u32 + 1);
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
        let sustained_received = collect_seqs(&events, first_sustained..=seq, clients.len())?.received;
        for c in &mut clients {
            let _ = writeln!(c.stdin, "report");
        }
        let latency = drain_latency(&events, clients.len())?;

        let step = json!({
            "target": target,
            "held": held,
            "failed": failed,
            "first_error": first_error,
            "establish_seconds": establish,
            "server_rss_bytes": server_rss,
            "server_bytes_per_connection": (server_rss.saturating_sub(base_rss)) as f64 / held.max(1) as f64,
            "client_bytes_per_connection": client_rss as f64 / held.max(1) as f64,
            "memory_available_bytes": meminfo("MemAvailable:"),
            "kernel_slab_bytes_per_connection": (slab.saturating_sub(base_slab)) as f64 / held.max(1) as f64,
            "idle_cpu_percent_of_a_core": idle_cpu,
            "broadcast": fanout,
            "burst": burst,
            "bursts": bursts,
            "sustained": {"messages": sustained_messages, "every_seconds": period.as_secs_f64(),
                          "deliveries_per_s": held as f64 / period.as_secs_f64(),
                          "deliveries": sustained_received, "latency_ms": latency},
        });
        eprintln!("{step}");
        steps.push(step);
        if (failed as f64) > 0.005 * target as f64 {
            stopped = Some(format!("{failed} connections failed at the {target} step: {first_error}"));
            break;
        }
    }
    for c in &mut clients {
        let _ = writeln!(c.stdin, "exit");
    }
    let doc = json!({
        "stack": format!("{:?}", args.stack).to_lowercase(),
        "servers": args.servers,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "steps": steps,
        "stopped": stopped.unwrap_or_else(|| "all steps done".into()),
    });
    println!("{doc}");
    drop(client_procs);
    drop(procs);
    Ok(())
}

/// What the clients reported of a range of broadcasts.
struct Delivered {
    /// Deliveries, summed over the broadcasts.
    received: u64,
    /// Slowest publish-to-deliver latency (µs).
    slowest_us: u64,
    /// Wall clock (µs) of the first and of the last delivery of any of them.
    first_at_us: u64,
    last_at_us: u64,
    /// From the first broadcast's first delivery to the last one's first delivery (µs): how
    /// spread out the broadcasts reached the fleet.
    arrival_spread_us: u64,
}

/// Waits (at most 90 s) for every client's report of each broadcast in `seqs`. A client that
/// never saw a message does not report it; its connections count as not delivered.
fn collect_seqs(
    events: &mpsc::Receiver<(usize, Value)>,
    seqs: std::ops::RangeInclusive<u64>,
    clients: usize,
) -> anyhow::Result<Delivered> {
    let wanted = (seqs.end() + 1 - seqs.start()) as usize * clients;
    let (mut reported, mut received, mut last, mut last_at) = (0, 0, 0, 0);
    // The earliest first delivery of each broadcast, over the clients.
    let mut first_at = std::collections::BTreeMap::<u64, u64>::new();
    let mut reports = std::collections::BTreeMap::<u64, usize>::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    while reported < wanted {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok((_, v)) = events.recv_timeout(left) else {
            let missing: Vec<u64> = seqs.clone().filter(|s| reports.get(s).copied().unwrap_or(0) < clients).collect();
            eprintln!("broadcasts {seqs:?}: {reported} of {wanted} reports from client processes; missing {missing:?}");
            break;
        };
        if let Some(seq) = v["seq"].as_u64().filter(|s| v["event"] == "seq" && seqs.contains(s)) {
            *reports.entry(seq).or_default() += 1;
            reported += 1;
            received += v["received"].as_u64().unwrap_or(0);
            last = last.max(v["last_us"].as_u64().unwrap_or(0));
            last_at = last_at.max(v["last_at_us"].as_u64().unwrap_or(0));
            if let Some(first) = v["first_at_us"].as_u64() {
                let earliest = first_at.entry(seq).or_insert(first);
                *earliest = (*earliest).min(first);
            }
        }
    }
    let first_at_us = first_at.values().copied().min().unwrap_or(0);
    let arrival_spread_us = first_at.values().copied().max().map_or(0, |last_first| last_first - first_at_us);
    Ok(Delivered { received, slowest_us: last, first_at_us, last_at_us: last_at, arrival_spread_us })
}

/// Collects one `latency` line from every client and merges their histograms: the fleet's
/// p50, p99 and p99.9 publish-to-deliver latency (ms, within 3 %: see [`crate::hist`]).
fn drain_latency(events: &mpsc::Receiver<(usize, Value)>, clients: usize) -> anyhow::Result<Value> {
    let mut all = Histogram::default();
    let mut n = 0;
    while n < clients {
        let (_, v) = events.recv_timeout(Duration::from_secs(30)).context("latency report")?;
        if v["event"] == "latency" {
            n += 1;
            all.merge_json(&v["histogram_us"]);
        }
    }
    let ms = |q: f64| all.quantile(q) as f64 / 1000.0;
    Ok(json!({"count": all.count(), "p50": ms(0.5), "p99": ms(0.99), "p999": ms(0.999), "max": ms(1.0)}))
}
