//! Per-channel order and lossless resume, with real processes: offsets fleet-wide, resuming on
//! another server after a drain or a crash, Redis losing its data, Redis connections cut.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::*;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

async fn subscribe_since(ws: &mut Ws, channel: &str, since: Option<(&str, u64)>) -> Value {
    let mut op = json!({"op": "subscribe", "channel": channel});
    if let Some((epoch, offset)) = since {
        op["since"] = json!({"epoch": epoch, "offset": offset});
    }
    send_json(ws, op).await;
    let reply = next_json(ws).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_three_servers_get_consecutive_offsets_everywhere() {
    const PER_PUBLISHER: u64 = 200;
    let (_redis, servers) = fleet(3, &[]);
    let mut subs = Vec::new();
    for s in &servers {
        subs.push(subscriber(s, "seq").await);
    }
    let publishers: Vec<_> = servers
        .iter()
        .enumerate()
        .map(|(p, s)| {
            let url = s.url("/ws");
            tokio::spawn(async move {
                let mut ws = connect(&url).await;
                for n in 0..PER_PUBLISHER {
                    publish(&mut ws, "seq", json!({"p": p, "n": n})).await;
                }
                ws
            })
        })
        .collect();
    let mut seen = Vec::new();
    for mut ws in subs {
        let mut got = Vec::new();
        for _ in 0..3 * PER_PUBLISHER {
            let m = next_json(&mut ws).await;
            got.push((m["epoch"].as_str().unwrap().to_owned(), m["offset"].as_u64().unwrap(), m["data"].clone()));
        }
        seen.push(got);
    }
    for p in publishers {
        p.await.unwrap();
    }
    let offsets: Vec<u64> = seen[0].iter().map(|(_, o, _)| *o).collect();
    assert_eq!(offsets, (1..=3 * PER_PUBLISHER).collect::<Vec<_>>(), "offsets must rise by one, from 1");
    for s in &seen {
        assert_eq!(s, &seen[0], "every subscriber sees the same (epoch, offset, data) sequence");
    }
}

/// A client that keeps one subscription alive across servers: on any close or failure it moves
/// to the next server and resumes with `since`. Returns the offsets it received, in order.
async fn resilient_subscriber(
    urls: Vec<String>,
    channel: &'static str,
    until: u64,
    ready: watch::Sender<bool>,
) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut got: Vec<u64> = Vec::new();
    let mut position: Option<(String, u64)> = None;
    let mut i = 0;
    while got.last().copied() != Some(until) {
        assert!(Instant::now() < deadline, "gave up at {:?}", got.last());
        let url = &urls[i % urls.len()];
        i += 1;
        let Ok(mut ws) = try_connect(url).await else { continue };
        let mut op = json!({"op": "subscribe", "channel": channel});
        if let Some((epoch, offset)) = &position {
            op["since"] = json!({"epoch": epoch, "offset": offset});
        }
        if futures_util::SinkExt::send(&mut ws, Message::text(op.to_string())).await.is_err() {
            continue;
        }
        loop {
            let frame = match tokio::time::timeout(TIMEOUT, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Value>(&t).unwrap(),
                Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => break,
                Ok(Some(Ok(_))) => continue,
                Err(_) => panic!("no frame for {TIMEOUT:?} from {url}"),
            };
            match frame["type"].as_str() {
                Some("subscribed") => {
                    if position.is_some() {
                        assert_eq!(frame["recovered"], true, "resume refused: {frame}");
                    }
                    let _ = ready.send(true);
                }
                Some("message") => {
                    let offset = frame["offset"].as_u64().unwrap();
                    position = Some((frame["epoch"].as_str().unwrap().to_owned(), offset));
                    got.push(offset);
                    if offset == until {
                        break;
                    }
                }
                Some("error") => break, // e.g. bus_unavailable on a dying server: move on
                _ => panic!("unexpected frame {frame}"),
            }
        }
    }
    got
}

async fn resume_across_a_lost_server(kill: bool) {
    const MESSAGES: u64 = 400;
    const CLIENTS: usize = 8;
    let (_redis, mut servers) = fleet(3, &["--drain-timeout", "2"]);
    let urls: Vec<String> = servers.iter().map(|s| s.url("/ws")).collect();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (tx, mut rx) = watch::channel(false);
        // Every client starts on server 0, the one that goes away, then tries 1 and 2.
        let mut order = urls.clone();
        if c % 2 == 1 {
            order.swap(1, 2);
        }
        clients.push(tokio::spawn(resilient_subscriber(order, "stream", MESSAGES, tx)));
        rx.wait_for(|r| *r).await.unwrap();
    }
    let publisher = {
        let url = servers[1].url("/ws");
        tokio::spawn(async move {
            let mut ws = connect(&url).await;
            for n in 1..=MESSAGES {
                publish(&mut ws, "stream", json!(n)).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ws
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    if kill {
        servers[0].sigkill();
    } else {
        servers[0].sigterm();
    }
    let _publisher = publisher.await.unwrap();
    for c in clients {
        let got = c.await.unwrap();
        assert_eq!(got, (1..=MESSAGES).collect::<Vec<_>>(), "each message exactly once, in order");
    }
    if !kill {
        let status = servers[0].wait_exit(Duration::from_secs(4)).expect("drained server did not exit");
        assert!(status.success());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_drained_server_resume_elsewhere_and_miss_nothing() {
    resume_across_a_lost_server(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_server_resume_elsewhere_and_miss_nothing() {
    resume_across_a_lost_server(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_losing_its_data_is_reported_as_a_new_epoch_not_a_silent_gap() {
    let (mut redis, servers) = fleet(1, &[]);
    let mut ws = subscriber(&servers[0], "news").await;
    publish(&mut ws, "news", json!("one")).await;
    let m = next_json(&mut ws).await;
    let (old_epoch, offset) = (m["epoch"].as_str().unwrap().to_owned(), m["offset"].as_u64().unwrap());
    drop(ws);

    redis.kill();
    redis.restart(); // empty: the test Redis keeps nothing on disk
    servers[0].wait_bus_up();
    let mut ws = connect(&servers[0].url("/ws")).await;
    let reply = subscribe_since(&mut ws, "news", Some((&old_epoch, offset))).await;
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(reply["reason"], "epoch_changed", "{reply}");
    assert_ne!(reply["epoch"], old_epoch.as_str(), "a new epoch after the data loss");
    publish(&mut ws, "news", json!("two")).await;
    let m = next_json(&mut ws).await;
    assert_eq!((&m["epoch"], &m["offset"]), (&reply["epoch"], &json!(1)), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_redis_connections_lose_no_message() {
    let (redis, servers) = fleet(3, &[]);
    let mut subs = Vec::new();
    for s in &servers {
        subs.push(subscriber(s, "feed").await);
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let publisher = {
        let url = servers[0].url("/ws");
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut ws = connect(&url).await;
            let mut n = 0u64;
            while !stop.is_cancelled() && n < 5000 {
                n += 1;
                publish(&mut ws, "feed", json!(n)).await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            ws
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Cut every subscription connection (the data stays); publishing goes on meanwhile.
    for _ in 0..3 {
        let killed = redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        assert!(killed.trim().parse::<u32>().unwrap_or(0) >= 1, "no pub/sub connection was cut: {killed}");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    stop.cancel();
    let mut publisher_ws = publisher.await.unwrap();
    // The channel's head, as a fresh subscriber sees it.
    let head = subscribe_since(&mut publisher_ws, "feed", None).await["offset"].as_u64().unwrap();
    for ws in &mut subs {
        let mut offsets = Vec::new();
        while offsets.last().copied() != Some(head) {
            offsets.push(next_json(ws).await["offset"].as_u64().unwrap());
        }
        assert_eq!(offsets, (1..=head).collect::<Vec<_>>(), "a subscriber lost or repeated messages");
    }
    let refilled: f64 = servers.iter().map(|s| s.metric("wsfleet_bus_refilled_total")).sum();
    let reconnects: f64 = servers.iter().map(|s| s.metric("wsfleet_bus_reconnects_total")).sum();
    eprintln!("{head} messages; {reconnects} reconnects; {refilled} refilled from history");
    assert!(reconnects >= 9.0, "every server reconnected three times");
    assert!(refilled >= 1.0, "the gaps were refilled from history");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_since_values_get_a_clear_answer_never_a_wrong_replay() {
    let redis = Redis::start();
    let server = Server::start(Some(&redis), &["--history-size", "5"]);
    let mut ws = subscriber(&server, "h").await;
    for n in 1..=10 {
        publish(&mut ws, "h", json!(n)).await;
    }
    let mut epoch = String::new();
    for _ in 1..=10 {
        epoch = next_json(&mut ws).await["epoch"].as_str().unwrap().to_owned();
    }
    let mut c = connect(&server.url("/ws")).await;
    // Within history: replayed exactly.
    let reply = subscribe_since(&mut c, "h", Some((&epoch, 7))).await;
    assert_eq!((reply["recovered"].as_bool(), reply["offset"].as_u64()), (Some(true), Some(10)), "{reply}");
    for expect in 8..=10 {
        let m = next_json(&mut c).await;
        assert_eq!((m["offset"].as_u64(), m["data"].as_u64()), (Some(expect), Some(expect)), "{m}");
    }
    send_json(&mut c, json!({"op":"unsubscribe","channel":"h"})).await;
    assert_eq!(next_json(&mut c).await["type"], "unsubscribed");

    for (since, reason) in [
        ((epoch.as_str(), 2), "history_gap"), // trimmed: only the last 5 are kept
        ((epoch.as_str(), 99), "offset_ahead"),
        (("0-unknown", 3), "epoch_changed"),
    ] {
        let reply = subscribe_since(&mut c, "h", Some(since)).await;
        assert_eq!(reply["recovered"], false, "{reply}");
        assert_eq!(reply["reason"], reason, "{reply}");
        assert_eq!(reply["offset"], 10);
        send_json(&mut c, json!({"op":"unsubscribe","channel":"h"})).await;
        assert_eq!(next_json(&mut c).await["type"], "unsubscribed", "no replay after a refused resume");
    }
    for since in [json!("yesterday"), json!({"epoch": epoch, "offset": -1}), json!({"epoch": 1, "offset": 1})] {
        send_json(&mut c, json!({"op":"subscribe","channel":"h","since": since})).await;
        let reply = next_json(&mut c).await;
        assert_eq!((reply["type"].as_str(), reply["code"].as_str()), (Some("error"), Some("invalid_field")), "{reply}");
    }
    // The connection is still fine.
    let reply = subscribe_since(&mut c, "h", None).await;
    assert_eq!(reply["offset"], 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_stats_reports_each_server_and_the_total() {
    let redis = Redis::start();
    let a = Server::start(Some(&redis), &["--pod-name", "pod-a"]);
    let b = Server::start(Some(&redis), &["--pod-name", "pod-b"]);
    let (url_a, url_b) = (a.url("/ws"), b.url("/ws"));
    let _ca: Vec<Ws> = futures_util::future::join_all((0..3).map(|_| connect(&url_a))).await;
    let _cb: Vec<Ws> = futures_util::future::join_all((0..2).map(|_| connect(&url_b))).await;
    let stats = wait_until("both pods report their connections", || {
        let v = fleet_stats_json(&redis)?;
        (v["total"] == 5).then_some(v)
    });
    assert_eq!(stats, json!({"pods": {"pod-a": 3, "pod-b": 2}, "total": 5}));
    let table = std::process::Command::new(env!("CARGO_BIN_EXE_wsfleet-server"))
        .args(["fleet-stats", "--redis-url", &redis.url()])
        .output()
        .unwrap();
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.lines().any(|l| l.starts_with("TOTAL") && l.trim_end().ends_with('5')), "{table}");
}

/// `wsfleet-server fleet-stats --json` against `redis`.
fn fleet_stats_json(redis: &Redis) -> Option<Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsfleet-server"))
        .args(["fleet-stats", "--redis-url", &redis.url(), "--json"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_stats_skips_dead_servers_and_forgets_drained_ones() {
    let redis = Redis::start();
    // A server that crashed long ago: its entry expired at the epoch.
    redis.cli(&["HSET", "wsfleet:presence", "crashed-pod", "7 1"]);
    let _a = Server::start(Some(&redis), &["--pod-name", "pod-a"]);
    let mut b = Server::start(Some(&redis), &["--pod-name", "pod-b", "--drain-timeout", "1"]);
    wait_until("both live pods are listed, the dead one is not", || {
        (fleet_stats_json(&redis)?["pods"] == json!({"pod-a": 0, "pod-b": 0})).then_some(())
    });
    assert!(!redis.cli(&["HKEYS", "wsfleet:presence"]).contains("crashed-pod"), "a refresh prunes expired entries");
    b.sigterm();
    assert!(b.wait_exit(Duration::from_secs(10)).is_some(), "pod-b drains and exits");
    wait_until("the drained pod is gone", || (fleet_stats_json(&redis)?["pods"] == json!({"pod-a": 0})).then_some(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_back_in_a_channels_order_is_a_new_epoch_not_a_silent_loss() {
    let (redis, servers) = fleet(2, &[]);
    let mut sub = subscriber(&servers[0], "news").await;
    let mut publisher = connect(&servers[1].url("/ws")).await;
    for n in 1..=5 {
        publish(&mut publisher, "news", json!(n)).await;
    }
    let mut old_epoch = String::new();
    for n in 1..=5 {
        let m = next_json(&mut sub).await;
        assert_eq!((&m["data"], &m["offset"]), (&json!(n), &json!(n)), "{m}");
        old_epoch = m["epoch"].as_str().unwrap().to_owned();
    }
    // Redis goes back to offset 2 of the same epoch, as after a restore from an older snapshot or
    // a failover to a replica that lagged; the servers' links drop, as they do then.
    let meta = redis
        .cli(&["--scan", "--pattern", "*news*"])
        .lines()
        .map(str::to_owned)
        .find(|k| redis.cli(&["TYPE", k]).trim() == "hash")
        .expect("the channel's meta hash");
    assert_eq!(redis.cli(&["HGET", &meta, "epoch"]).trim(), old_epoch);
    redis.cli(&["HSET", &meta, "offset", "2"]);
    redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    wait_until("the subscriber's server reconnected", || {
        (servers[0].metric("wsfleet_bus_reconnects_total") >= 1.0).then_some(())
    });
    servers[0].wait_bus_up();

    // The next publish is not dropped as one already delivered: it opens a new epoch, which the
    // subscriber sees (and a resume from the old position is told `epoch_changed`).
    publish(&mut publisher, "news", json!("after")).await;
    let gap = next_json(&mut sub).await;
    assert_eq!(
        gap,
        json!({"type": "gap", "channel": "news", "epoch": old_epoch, "from": 3, "reason": "offset_ahead"}),
        "Redis handed out offsets from 3 again: whatever it published there is announced as lost"
    );
    let m = next_json(&mut sub).await;
    assert_eq!(m["data"], "after", "{m}");
    assert_ne!(m["epoch"], old_epoch.as_str(), "a new epoch: {m}");
    assert_eq!(m["offset"], 1, "{m}");
    let mut resumed = connect(&servers[1].url("/ws")).await;
    let reply = subscribe_since(&mut resumed, "news", Some((&old_epoch, 5))).await;
    assert_eq!((&reply["recovered"], &reply["reason"]), (&json!(false), &json!("epoch_changed")), "{reply}");
}
