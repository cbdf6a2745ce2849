//! Memory is bounded in bytes: a client's queue by `--client-queue-bytes`, a client whose
//! socket takes nothing by `--write-stall-timeout`, a resume by the part of the budget a replay
//! may take. Real Redis, real servers; the misbehaving clients are raw TCP sockets with a small
//! receive buffer, and a well-behaved reader on the same channel must get everything.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

/// A protocol-mode client that upgrades and subscribes by hand, with a receive buffer of a few
/// KiB, so the server's writes to it block as soon as it stops reading.
async fn stalling_client(server: &Server, channel: &str) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut s = socket.connect(server.ws).await.unwrap();
    s.write_all(upgrade_request("/ws", "").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        head.push(s.read_u8().await.unwrap());
    }
    assert!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    let subscribe = json!({"op": "subscribe", "channel": channel}).to_string();
    s.write_all(&masked_frame(true, 0, 0x1, subscribe.as_bytes(), [1, 2, 3, 4])).await.unwrap();
    let (opcode, reply) = read_frame(&mut s).await.expect("no subscribed reply");
    assert_eq!(opcode, 0x1);
    assert_eq!(serde_json::from_slice::<Value>(&reply).unwrap()["type"], "subscribed");
    s
}

/// One server frame (unmasked, unfragmented): its opcode and payload; `None` once the server
/// hung up.
async fn read_frame(s: &mut (impl AsyncRead + Unpin)) -> Option<(u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.ok()?;
    let len = match h[1] & 0x7f {
        126 => s.read_u16().await.ok()? as usize,
        127 => s.read_u64().await.ok()? as usize,
        n => n as usize,
    };
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.ok()?;
    Some((h[0] & 0x0f, payload))
}

/// Reads everything the server still sends until its close frame: the data frames read before
/// it, and the close's code and reason (`None` when the server hung up without one).
async fn drain_to_close(s: &mut (impl AsyncRead + Unpin)) -> (usize, Option<(u16, String)>) {
    let read = async {
        let mut frames = 0;
        while let Some((opcode, payload)) = read_frame(s).await {
            match opcode {
                0x8 => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    return (frames, Some((code, String::from_utf8_lossy(&payload[2..]).into_owned())));
                }
                0x1 | 0x2 => frames += 1,
                _ => {}
            }
        }
        (frames, None)
    };
    tokio::time::timeout(TIMEOUT, read).await.expect("the server neither closed nor hung up")
}

/// Sends a masked ping every 200 ms until told to stop (at most for `limit`) or the socket fails;
/// hands the socket's write half back, still open.
fn keep_pinging(mut w: OwnedWriteHalf, stop: Arc<AtomicBool>, limit: Duration) -> JoinHandle<OwnedWriteHalf> {
    tokio::spawn(async move {
        let started = Instant::now();
        while !stop.load(Ordering::Relaxed) && started.elapsed() < limit {
            if w.write_all(&masked_frame(true, 0, 0x9, b"still here", [5, 6, 7, 8])).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        w
    })
}

/// A reader that checks it gets `count` messages in order (`data.i` counting up from 0), and
/// says in `done` how many it got.
fn reader_of(mut ws: Ws, count: usize, done: Arc<AtomicUsize>) -> JoinHandle<Ws> {
    tokio::spawn(async move {
        for i in 0..count {
            let m = next_json(&mut ws).await;
            assert_eq!(m["data"]["i"], i, "the reader lost or reordered a message");
            done.store(i + 1, Ordering::Release);
        }
        ws
    })
}

/// Publishes `count` messages `{"i": i, "filler": ...}` of about `size` bytes to `channel`, at
/// most `ahead` messages ahead of what the normal reader reported in `done`: a busy machine
/// must not make the normal reader slow, only the client that does not read.
async fn publish_paced(publisher: &mut Ws, channel: &str, count: usize, size: usize, done: &AtomicUsize, ahead: usize) {
    let filler = "f".repeat(size);
    for i in 0..count {
        let behind = Instant::now();
        while done.load(Ordering::Acquire) + ahead <= i {
            assert!(behind.elapsed() < TIMEOUT, "the normal reader stopped reading at message {i}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        publish(publisher, channel, json!({"i": i, "filler": filler})).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_but_pings_is_closed_when_its_writes_stall() {
    // Its queue could take everything (64 MiB, 100,000 frames): only the stall can close it,
    // and its pings keep it heard, so silence never would.
    let redis = Redis::start();
    let server = Server::start(
        Some(&redis),
        &["--write-stall-timeout", "2", "--client-queue", "100000", "--client-queue-bytes", "67108864"],
    );
    const MESSAGES: usize = 1000;
    let stalled = stalling_client(&server, "flood").await;
    let (mut stalled_read, stalled_write) = stalled.into_split();
    let stop = Arc::new(AtomicBool::new(false));
    let pinger = keep_pinging(stalled_write, stop.clone(), Duration::from_secs(20));
    let done = Arc::new(AtomicUsize::new(0));
    let reader = reader_of(subscriber(&server, "flood").await, MESSAGES, done.clone());
    let mut publisher = connect(&server.url("/ws")).await;
    // 8 MB: more than the loopback socket buffers of the stalled client take.
    publish_paced(&mut publisher, "flood", MESSAGES, 8000, &done, 64).await;
    let published = Instant::now();
    let mut normal = tokio::time::timeout(TIMEOUT, reader).await.expect("the normal reader fell behind").unwrap();
    wait_until("the stalled client is closed", || {
        (server.metric("wsfleet_write_stall_closes_total") == 1.0).then_some(())
    });
    let after = published.elapsed();
    assert!(after < Duration::from_secs(5), "closed {after:?} after the last publish; the stall timeout is 2 s");
    assert_eq!(server.metric("wsfleet_slow_client_closes_total"), 0.0, "the queue never passed its budget");

    // When it reads again it finds the documented close after what was under way.
    stop.store(true, Ordering::Relaxed);
    let _write_half = pinger.await.unwrap();
    let (frames, close) = drain_to_close(&mut stalled_read).await;
    assert_eq!(close, Some((1013, "client not reading".to_owned())), "after {frames} frames");
    assert!(frames < MESSAGES, "the stalled client got everything ({frames}): it was not stalled");
    eprintln!("stalled client closed {after:?} after the last publish, having received {frames} of {MESSAGES}");

    // The normal reader is still served, and the stalled client is gone.
    publish(&mut publisher, "flood", json!({"i": 0, "after": true})).await;
    assert_eq!(next_json(&mut normal).await["data"]["after"], true);
    wait_until("only the normal reader and the publisher remain", || {
        (server.metric("wsfleet_connections") == 2.0).then_some(())
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_past_its_byte_budget_is_closed_with_1013_under_the_frame_cap() {
    // 256 KiB, and the default 1024 frames: 150 messages of 60 KB pass the bytes long before
    // the count. No stall within the test (30 s).
    let redis = Redis::start();
    let server = Server::start(Some(&redis), &["--client-queue-bytes", "262144"]);
    const MESSAGES: usize = 150;
    let mut slow = stalling_client(&server, "big").await;
    let done = Arc::new(AtomicUsize::new(0));
    let reader = reader_of(subscriber(&server, "big").await, MESSAGES, done.clone());
    let mut publisher = connect(&server.url("/ws")).await;
    // 9 MB: more than the loopback socket buffers take, then more than 256 KiB queued; the
    // normal reader is never more than two messages (120 KB) behind.
    publish_paced(&mut publisher, "big", MESSAGES, 60_000, &done, 2).await;
    let mut normal = tokio::time::timeout(TIMEOUT, reader).await.expect("the normal reader fell behind").unwrap();
    wait_until("the slow client is closed", || {
        (server.metric("wsfleet_slow_client_closes_total") == 1.0).then_some(())
    });
    let (frames, close) = drain_to_close(&mut slow).await;
    assert_eq!(close, Some((1013, "client too slow".to_owned())), "after {frames} frames");
    assert!(frames < MESSAGES, "the slow client got everything ({frames})");
    assert_eq!(server.metric("wsfleet_write_stall_closes_total"), 0.0);
    eprintln!("slow client received {frames} of {MESSAGES} messages of 60 KB before its 1013");
    publish(&mut publisher, "big", json!({"i": 0, "after": true})).await;
    assert_eq!(next_json(&mut normal).await["data"]["after"], true);
}

/// A subscriber of `channel` and the channel's epoch.
async fn watch(server: &Server, channel: &str) -> (String, Ws) {
    let mut ws = connect(&server.url("/ws")).await;
    send_json(&mut ws, json!({"op": "subscribe", "channel": channel})).await;
    let reply = next_json(&mut ws).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    (reply["epoch"].as_str().unwrap().to_owned(), ws)
}

/// Subscribes `ws` to `channel` from `since` and returns the `subscribed` reply and the
/// messages replayed after it (read until one more live message, `{"live": true}`, arrives).
async fn resume(ws: &mut Ws, publisher: &mut Ws, channel: &str, since: Value) -> (Value, Vec<u64>) {
    send_json(ws, json!({"op": "subscribe", "channel": channel, "since": since})).await;
    let reply = next_json(ws).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    publish(publisher, channel, json!({"live": true})).await;
    let mut replayed = Vec::new();
    loop {
        let m = next_json(ws).await;
        if m["data"]["live"] == true {
            return (reply, replayed);
        }
        replayed.push(m["offset"].as_u64().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_larger_than_its_share_of_the_budget_is_a_history_gap() {
    // 64 KiB: a replay may take 48 KiB of it, counted as stored in Redis and as rendered.
    let redis = Redis::start();
    let server = Server::start(Some(&redis), &["--client-queue-bytes", "65536"]);
    let mut publisher = connect(&server.url("/ws")).await;

    // Ten messages of 8 KB: 80 KB as stored, too much to replay from the start (Redis's cap).
    let (log_epoch, mut watcher) = watch(&server, "log").await;
    let filler = "l".repeat(8000);
    for i in 0..10 {
        // One at a time: the watcher's own budget is 64 KiB too.
        publish(&mut publisher, "log", json!({"i": i, "filler": filler})).await;
        next_json(&mut watcher).await;
    }
    let mut ws = connect(&server.url("/ws")).await;
    let (reply, replayed) = resume(&mut ws, &mut publisher, "log", json!({"epoch": log_epoch, "offset": 0})).await;
    assert_eq!((reply["recovered"].clone(), reply["reason"].clone()), (json!(false), json!("history_gap")), "{reply}");
    assert!(replayed.is_empty(), "{replayed:?}");
    // The last four (32 KB) fit, and come whole.
    let mut ws = connect(&server.url("/ws")).await;
    let (reply, replayed) = resume(&mut ws, &mut publisher, "log", json!({"epoch": log_epoch, "offset": 6})).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(replayed, [7, 8, 9, 10]);

    // Raw-mode text of control characters: 2 KB each as stored, 12 KB each once escaped as a
    // JSON string. Five are 10 KB in Redis but 60 KB rendered: the rendering decides.
    let (esc_epoch, mut watcher) = watch(&server, "esc").await;
    let mut raw = connect(&server.url("/ws/esc")).await;
    for _ in 0..5 {
        raw.send(Message::text("\u{1}".repeat(2000))).await.unwrap();
        next_json(&mut watcher).await;
    }
    let mut ws = connect(&server.url("/ws")).await;
    let (reply, replayed) = resume(&mut ws, &mut publisher, "esc", json!({"epoch": esc_epoch, "offset": 0})).await;
    assert_eq!((reply["recovered"].clone(), reply["reason"].clone()), (json!(false), json!("history_gap")), "{reply}");
    assert!(replayed.is_empty(), "{replayed:?}");
    let mut ws = connect(&server.url("/ws")).await;
    let (reply, replayed) = resume(&mut ws, &mut publisher, "esc", json!({"epoch": esc_epoch, "offset": 2})).await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(replayed, [3, 4, 5]);
    // Nobody was closed for it.
    assert_eq!(server.metric("wsfleet_slow_client_closes_total"), 0.0);
}

/// The server's peak resident memory so far (`VmHWM`), in bytes.
fn peak_rss(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    let kib: u64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_never_read_cost_the_server_no_more_than_their_budget() {
    // Each client on a channel of its own (no frame shared), 75 messages of 60 KB each: 4.5 MB,
    // more than its socket buffers (about 2.8 MB on loopback) and its 256 KiB budget together,
    // yet far below the 1024-frame cap. No history, so the in-process bus keeps nothing.
    const CLIENTS: usize = 40;
    const BUDGET: u64 = 256 * 1024;
    let server = Server::start(None, &["--client-queue-bytes", &BUDGET.to_string(), "--history-size", "0"]);
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        clients.push(stalling_client(&server, &format!("own-{c}")).await);
    }
    let before = server.rss_bytes();
    let mut publisher = connect(&server.url("/ws")).await;
    let filler = "m".repeat(60_000);
    for i in 0..75 {
        for c in 0..CLIENTS {
            publish(&mut publisher, &format!("own-{c}"), json!({"i": i, "filler": filler})).await;
        }
    }
    wait_until("every client is closed as too slow", || {
        (server.metric("wsfleet_slow_client_closes_total") == CLIENTS as f64).then_some(())
    });
    let grown = peak_rss(&server).saturating_sub(before);
    eprintln!(
        "{CLIENTS} clients that never read, {} KiB budget each: peak RSS grew {:.1} MiB ({:.0} KiB per client)",
        BUDGET / 1024,
        grown as f64 / 1048576.0,
        grown as f64 / 1024.0 / CLIENTS as f64
    );
    // Their queues (up to one budget each) and what the publisher's frames cost on the way; a
    // count cap alone let each hold every message past its socket buffers (1.7 MB).
    assert!(grown < CLIENTS as u64 * 2 * BUDGET, "peak RSS grew {grown} bytes for {CLIENTS} budgets of {BUDGET}");
    drop(clients);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stops_a_history_read_at_its_byte_cap() {
    use wsfleet_server::messaging::envelope::Payload;
    use wsfleet_server::messaging::history::{HistoryConfig, Lost, Since};
    use wsfleet_server::messaging::redis::{keys::Keys, scripts::RedisHistory};
    let redis = Redis::start();
    let server = Server::start(Some(&redis), &[]);
    let (epoch, mut watcher) = watch(&server, "capped").await;
    let mut publisher = connect(&server.url("/ws")).await;
    let filler = "r".repeat(8000);
    for i in 0..10 {
        publish(&mut publisher, "capped", json!({"i": i, "filler": filler})).await;
        next_json(&mut watcher).await;
    }
    let conn = redis::Client::open(redis.url()).unwrap().get_connection_manager().await.unwrap();
    // What the server reads from the start of `channel`'s epoch with a budget whose replay
    // share is `bytes`.
    let since_epoch = std::sync::Mutex::new(epoch);
    let read = |channel: &'static str, bytes: u64| {
        let config =
            HistoryConfig { size: 1000, ttl: Duration::from_secs(300), max_replay: 768, max_replay_bytes: bytes };
        let history = RedisHistory::new(conn.clone(), Keys::new("wsfleet"), config);
        let since = Since { epoch: since_epoch.lock().unwrap().clone(), offset: 0 };
        async move { history.read(channel, Some(&since)).await.unwrap() }
    };
    // Ten entries of about 8 KB: 80 KB is too much for 48 KiB, not for 96 KiB.
    let capped = read("capped", 49_152).await;
    assert_eq!((capped.recovery, capped.entries.len()), (Some(Err(Lost::HistoryGap)), 0));
    let whole = read("capped", 98_304).await;
    assert_eq!((whole.recovery, whole.entries.len()), (Some(Ok(())), 10));

    // 150 entries of about 1 KB: read in pages, whole and in order when they fit.
    let (epoch, mut watcher) = watch(&server, "paged").await;
    let filler = "p".repeat(1000);
    for i in 0..150 {
        publish(&mut publisher, "paged", json!({"i": i, "filler": filler})).await;
        next_json(&mut watcher).await;
    }
    *since_epoch.lock().unwrap() = epoch;
    assert_eq!(read("paged", 120_000).await.recovery, Some(Err(Lost::HistoryGap)));
    let whole = read("paged", 200_000).await;
    assert_eq!(whole.recovery, Some(Ok(())));
    let order: Vec<(u64, Value)> = whole
        .entries
        .iter()
        .map(|e| {
            let Payload::Json(json) = &e.envelope.payload else { panic!("not JSON: {:?}", e.envelope.payload) };
            (e.offset, serde_json::from_slice::<Value>(json).unwrap()["i"].clone())
        })
        .collect();
    let expected: Vec<(u64, Value)> = (0..150u64).map(|i| (i + 1, json!(i))).collect();
    assert_eq!(order, expected);
}
