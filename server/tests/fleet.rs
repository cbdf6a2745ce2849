//! A fleet of real server processes on one real redis-server: cluster-wide delivery in both
//! modes, one order for concurrent publishers, surviving a Redis restart, and draining.

mod support;

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::json;
use support::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_on_one_server_reaches_every_server_in_protocol_mode() {
    let (_redis, servers) = fleet(3, &[]);
    let mut subs = Vec::new();
    for s in &servers {
        subs.push(subscriber(s, "news").await);
    }
    let mut publisher = connect(&servers[0].url("/ws")).await;
    publish(&mut publisher, "news", json!({"headline": "hello fleet", "n": 1})).await;
    let mut epochs = Vec::new();
    for sub in &mut subs {
        let msg = next_json(sub).await;
        assert_eq!((&msg["type"], &msg["channel"]), (&json!("message"), &json!("news")), "{msg}");
        assert_eq!(msg["data"], json!({"headline": "hello fleet", "n": 1}));
        assert_eq!(msg["offset"], 1, "the channel's first message has offset 1: {msg}");
        epochs.push(msg["epoch"].clone());
    }
    assert!(epochs.iter().all(|e| e.is_string() && *e == epochs[0]), "one epoch fleet-wide: {epochs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_mode_broadcasts_cluster_wide_and_meets_protocol_mode() {
    let (_redis, servers) = fleet(3, &[]);
    let mut raws = Vec::new();
    for s in &servers {
        raws.push(connect(&s.url("/ws/lobby")).await);
    }
    let mut proto = subscriber(&servers[2], "lobby").await;
    // Raw mode has no subscribe confirmation: publish numbered probes until every raw client
    // has seen one, then check the real messages.
    let mut sender = connect(&servers[0].url("/ws/lobby")).await;
    let mut seen = vec![false; raws.len()];
    for probe in 0..200 {
        sender.send(Message::text(format!("probe {probe}"))).await.unwrap();
        for (i, ws) in raws.iter_mut().enumerate() {
            while let Ok(Some(Ok(m))) =
                tokio::time::timeout(Duration::from_millis(20), futures_util::StreamExt::next(ws)).await
            {
                if m.is_text() {
                    seen[i] = true;
                }
            }
        }
        if seen.iter().all(|s| *s) {
            break;
        }
    }
    assert!(seen.iter().all(|s| *s), "raw subscribers never all received a probe");
    // Drain the protocol client's probes.
    while let Ok(Some(Ok(_))) =
        tokio::time::timeout(Duration::from_millis(200), futures_util::StreamExt::next(&mut proto)).await
    {}
    for ws in raws.iter_mut().chain([&mut sender]) {
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout(Duration::from_millis(100), futures_util::StreamExt::next(ws)).await
        {}
    }

    sender.send(Message::text("plain text, as-is")).await.unwrap();
    sender.send(Message::binary(vec![0u8, 1, 2, 255])).await.unwrap();
    for ws in &mut raws {
        assert_eq!(next_message(ws).await, Message::text("plain text, as-is"));
        assert_eq!(next_message(ws).await, Message::binary(vec![0u8, 1, 2, 255]));
    }
    // The sender is a subscriber of its own channel too, like the seed's broadcast loop.
    assert_eq!(next_message(&mut sender).await, Message::text("plain text, as-is"));
    // Protocol mode sees raw text as a JSON string and binary as base64.
    assert_eq!(next_json(&mut proto).await["data"], "plain text, as-is");
    let bin = next_json(&mut proto).await;
    assert_eq!((bin["data"].as_str(), bin["encoding"].as_str()), (Some("AAEC/w=="), Some("base64")));
    // And a protocol publish reaches raw clients unwrapped.
    publish(&mut proto, "lobby", json!("from protocol mode")).await;
    for ws in &mut raws {
        assert_eq!(next_message(ws).await, Message::text("from protocol mode"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishers_on_different_servers_yield_one_order_for_every_subscriber() {
    const PER_PUBLISHER: usize = 300;
    let (_redis, servers) = fleet(3, &[]);
    let mut subs = Vec::new();
    for s in &servers {
        subs.push(subscriber(s, "ticks").await);
        subs.push(subscriber(s, "ticks").await);
    }
    let mut publishers = Vec::new();
    for (p, s) in servers.iter().enumerate() {
        let mut ws = connect(&s.url("/ws")).await;
        publishers.push(tokio::spawn(async move {
            for n in 0..PER_PUBLISHER {
                publish(&mut ws, "ticks", json!({"p": p, "n": n})).await;
            }
            ws
        }));
    }
    let readers: Vec<_> = subs
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                while got.len() < 3 * PER_PUBLISHER {
                    got.push(next_json(&mut ws).await["data"].clone());
                }
                got
            })
        })
        .collect();
    for p in publishers {
        p.await.unwrap();
    }
    let mut sequences = Vec::new();
    for r in readers {
        sequences.push(r.await.unwrap());
    }
    for seq in &sequences {
        assert_eq!(seq, &sequences[0], "two subscribers saw different orders");
    }
    for p in 0..3 {
        let own: Vec<u64> = sequences[0].iter().filter(|v| v["p"] == p).map(|v| v["n"].as_u64().unwrap()).collect();
        assert_eq!(own, (0..PER_PUBLISHER as u64).collect::<Vec<_>>(), "publisher {p} lost or reordered messages");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_publishes_arrive_complete_and_in_order_with_replies_in_client_order() {
    let (_redis, servers) = fleet(2, &[]);
    let mut sub_a = subscriber(&servers[1], "a").await;
    let mut sub_b = subscriber(&servers[1], "b").await;
    let mut sub_raw = subscriber(&servers[1], "raw").await;

    // One write carrying runs longer than one bus call takes, runs to two channels, a bad frame
    // and an unsubscribe: replies must come in the client's order, messages in theirs.
    let mut ws = subscriber(&servers[0], "mine").await;
    let frame = |channel: &str, n: usize| json!({"op": "publish", "channel": channel, "data": {"n": n}}).to_string();
    let mut sent = (Vec::new(), Vec::new());
    for n in 0..150 {
        ws.feed(Message::text(frame("a", n))).await.unwrap();
        sent.0.push(n);
    }
    ws.feed(Message::text("{not json")).await.unwrap();
    for n in 0..70 {
        let channel = if n % 3 == 0 { "b" } else { "a" };
        ws.feed(Message::text(frame(channel, 1000 + n))).await.unwrap();
        if channel == "a" { &mut sent.0 } else { &mut sent.1 }.push(1000 + n);
    }
    ws.feed(Message::text(json!({"op": "unsubscribe", "channel": "mine"}).to_string())).await.unwrap();
    ws.feed(Message::text(frame("b", 2000))).await.unwrap();
    sent.1.push(2000);
    ws.flush().await.unwrap();

    let error = next_json(&mut ws).await;
    assert_eq!((&error["type"], &error["code"]), (&json!("error"), &json!("invalid_json")), "{error}");
    let unsubscribed = next_json(&mut ws).await;
    assert_eq!(unsubscribed["type"], "unsubscribed", "{unsubscribed}");

    // Raw mode: a burst of frames in one write.
    let mut raw = connect(&servers[0].url("/ws/raw")).await;
    for n in 0..200 {
        raw.feed(Message::text(format!("r{n}"))).await.unwrap();
    }
    raw.flush().await.unwrap();

    for (sub, expected) in [(&mut sub_a, &sent.0), (&mut sub_b, &sent.1)] {
        for (i, n) in expected.iter().enumerate() {
            let msg = next_json(sub).await;
            assert_eq!((&msg["data"]["n"], &msg["offset"]), (&json!(n), &json!(i + 1)), "{msg}");
        }
    }
    for n in 0..200 {
        let msg = next_json(&mut sub_raw).await;
        assert_eq!((&msg["data"], &msg["offset"]), (&json!(format!("r{n}")), &json!(n + 1)), "{msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_rides_out_a_redis_restart_without_restarting_anything() {
    let (mut redis, servers) = fleet(2, &[]);
    let mut sub_a = subscriber(&servers[0], "alerts").await;
    let mut sub_b = subscriber(&servers[1], "alerts").await;
    let mut publisher = connect(&servers[0].url("/ws")).await;

    redis.kill();
    // The outage is the whole fleet's: every server stays in its Service and says so.
    for s in &servers {
        wait_until("readyz reports the bus down for the fleet", || {
            let (status, body) = http_get(s.http, "/readyz");
            (status == 200 && body.contains("degraded")).then_some(())
        });
        assert_eq!(s.metric("wsfleet_bus_up"), 0.0);
    }
    // Publishing while the bus is down is answered with a clear error, never silently dropped:
    // `bus_unavailable` (not published), or `outcome_unknown` for the command that went into the
    // connection as Redis died (it cannot be told whether Redis ran it first).
    publish(&mut publisher, "alerts", json!("lost")).await;
    let err = next_json(&mut publisher).await;
    assert_eq!(err["type"], "error", "{err}");
    assert!(["bus_unavailable", "outcome_unknown"].contains(&err["code"].as_str().unwrap_or_default()), "{err}");
    publish(&mut publisher, "alerts", json!("lost")).await;
    let err = next_json(&mut publisher).await;
    assert_eq!((err["type"].as_str(), err["code"].as_str()), (Some("error"), Some("bus_unavailable")), "{err}");

    redis.restart();
    for s in &servers {
        s.wait_bus_up();
        assert!(s.metric("wsfleet_bus_reconnects_total") >= 1.0);
    }
    publish(&mut publisher, "alerts", json!("after restart")).await;
    for sub in [&mut sub_a, &mut sub_b] {
        // Redis came back empty: whatever the old epoch had after what was delivered is lost,
        // and subscribers are told before the new epoch's messages.
        let gap = next_json(sub).await;
        assert_eq!((gap["type"].as_str(), gap["reason"].as_str()), (Some("gap"), Some("epoch_changed")), "{gap}");
        let msg = next_json(sub).await;
        assert_eq!(msg["data"], "after restart", "{msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_paced_batches_and_the_rest_of_the_fleet_keeps_serving() {
    const CLIENTS: usize = 40;
    const DRAIN_SECS: u64 = 4;
    let (_redis, mut servers) = fleet(3, &["--drain-timeout", "4"]);
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(subscriber(&servers[0], "room").await);
    }
    let mut on_c = subscriber(&servers[2], "room").await;

    let sent = Instant::now();
    servers[0].sigterm();
    let closes: Vec<_> = clients
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { (close_code(&mut ws).await, sent.elapsed()) }))
        .collect();

    // Readiness drops and new upgrades are refused at once.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(http_get(servers[0].http, "/readyz").0, 503);
    let answer = upgrade_answer(servers[0].ws, "/ws", "").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after"), "{answer}");

    let mut times = Vec::new();
    for c in closes {
        let (code, at) = c.await.unwrap();
        assert_eq!(code, Some(CloseCode::Restart), "every client is closed with 1012");
        times.push(at);
    }
    times.sort();
    let spread = *times.last().unwrap() - times[0];
    eprintln!("drain: first close after {:?}, last after {:?}", times[0], times.last().unwrap());
    assert!(spread >= Duration::from_secs(DRAIN_SECS) / 2, "closes were not spread over the window: {spread:?}");

    let status =
        servers[0].wait_exit(Duration::from_secs(DRAIN_SECS + 2)).expect("server did not exit after the drain");
    assert!(status.success(), "drained server exited with {status}");
    assert!(sent.elapsed() <= Duration::from_secs(DRAIN_SECS + 1), "exit came after the drain deadline");

    let mut publisher = connect(&servers[1].url("/ws")).await;
    publish(&mut publisher, "room", json!({"still": "serving"})).await;
    assert_eq!(next_json(&mut on_c).await["data"], json!({"still": "serving"}));
}
