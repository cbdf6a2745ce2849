//! The bus never lies and never buffers without bound, with real processes: a publish whose
//! outcome is unknown (Redis paused past the command timeout) says so, and its retry with the
//! same id is delivered once; messages that history can no longer repair reach subscribers as a
//! `gap` frame (and a long gap that history holds is refilled page by page; a channel Redis
//! refuses to refill is announced without holding up the others); a server whose delivery falls
//! behind its `--bus-buffer` drops its pub/sub connection and repairs from history, losing
//! nothing.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// Text frames that arrive within `quiet` of each other (none expected after the last).
async fn frames_until_quiet(ws: &mut Ws, quiet: Duration) -> Vec<Value> {
    let mut frames = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(quiet, ws.next()).await {
        if let Message::Text(t) = m {
            frames.push(serde_json::from_str(&t).unwrap());
        }
    }
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_retried_with_its_id_after_an_unknown_outcome_is_delivered_once() {
    let redis = Redis::start();
    let server = Server::start(Some(&redis), &[]);
    let mut sub = subscriber(&server, "orders").await;
    let mut publisher = connect(&server.url("/ws")).await;
    let op = |data: &str, id: &str| json!({"op": "publish", "channel": "orders", "data": data, "id": id});

    send_json(&mut publisher, op("first", "order-1")).await;
    let ack = next_json(&mut publisher).await;
    assert_eq!(
        (ack["type"].as_str(), ack["id"].as_str(), ack["offset"].as_u64()),
        (Some("published"), Some("order-1"), Some(1)),
        "{ack}"
    );
    assert_eq!(ack["duplicate"], false);
    assert_eq!(next_json(&mut sub).await["data"], "first");

    // Redis takes commands but runs none for 7 s: the publish times out (5 s) and runs later.
    assert!(redis.cli(&["CLIENT", "PAUSE", "7000", "ALL"]).contains("OK"));
    let sent = Instant::now();
    send_json(&mut publisher, op("second", "order-2")).await;
    let unknown = next_json(&mut publisher).await;
    assert_eq!(unknown["type"], "error", "{unknown}");
    assert_eq!(unknown["code"], "outcome_unknown", "not `bus_unavailable`: it may well run: {unknown}");
    assert_eq!((unknown["id"].as_str(), unknown["channel"].as_str()), (Some("order-2"), Some("orders")));
    assert!(sent.elapsed() < Duration::from_secs(7), "answered before Redis resumed");

    // The retry the README tells a client to make: same id.
    send_json(&mut publisher, op("second", "order-2")).await;
    let ack = next_json(&mut publisher).await;
    assert_eq!((ack["type"].as_str(), ack["id"].as_str()), (Some("published"), Some("order-2")), "{ack}");
    let offset = ack["offset"].as_u64().unwrap();

    let delivered = next_json(&mut sub).await;
    assert_eq!(
        (delivered["data"].as_str(), delivered["offset"].as_u64()),
        (Some("second"), Some(offset)),
        "{delivered}"
    );
    // Nothing else: the next message the subscriber gets is the next one published.
    send_json(&mut publisher, op("third", "order-3")).await;
    assert_eq!(next_json(&mut publisher).await["offset"], offset + 1);
    let next = next_json(&mut sub).await;
    assert_eq!(
        (next["data"].as_str(), next["offset"].as_u64()),
        (Some("third"), Some(offset + 1)),
        "a duplicate: {next}"
    );
    assert_eq!(server.metric("wsfleet_publish_outcomes_unknown_total"), 1.0);
    assert_eq!(server.metric("wsfleet_publish_retries_deduplicated_total"), f64::from(ack["duplicate"] == true));
}

/// Runs `publishing` while `server`'s pub/sub connection is cut and cannot subscribe again
/// (every pub/sub connection is killed and SUBSCRIBE is taken from Redis's default user), then
/// lets it back.
async fn while_cut_off<F: Future<Output = ()>>(redis: &Redis, server: &Server, publishing: impl FnOnce() -> F) {
    assert!(redis.cli(&["ACL", "SETUSER", "default", "-subscribe"]).contains("OK"));
    assert!(!redis.cli(&["CLIENT", "KILL", "TYPE", "pubsub"]).contains("ERR"));
    server.wait_for_log("redis bus down");
    publishing().await;
    assert!(redis.cli(&["ACL", "SETUSER", "default", "+subscribe"]).contains("OK"));
}

/// Publishes `numbers` on `channel` with ids, and waits for each acknowledgement (offsets
/// `numbers`, on a channel that had `numbers.start() - 1` messages).
async fn publish_acknowledged(ws: &mut Ws, channel: &str, numbers: std::ops::RangeInclusive<u64>) {
    for n in numbers.clone() {
        ws.feed(Message::text(
            json!({"op": "publish", "channel": channel, "data": n, "id": format!("m{n}")}).to_string(),
        ))
        .await
        .unwrap();
    }
    ws.flush().await.unwrap();
    for n in numbers {
        assert_eq!(next_json(ws).await["offset"], n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_longer_than_one_replay_is_refilled_from_history_page_by_page() {
    let redis = Redis::start();
    // One replay is at most 150 messages here (3/4 of the client queue); history holds 1,000.
    let a = Server::start(Some(&redis), &["--client-queue", "200"]);
    let b = Server::start(Some(&redis), &[]);
    let mut sub = subscriber(&a, "long").await;
    let mut publisher = connect(&b.url("/ws")).await;
    publish_acknowledged(&mut publisher, "long", 1..=1).await;
    assert_eq!(next_json(&mut sub).await["offset"], 1);
    while_cut_off(&redis, &a, || async {
        for start in (2..=401).step_by(50) {
            publish_acknowledged(&mut publisher, "long", start..=start + 49).await;
        }
    })
    .await;
    for n in 2..=401u64 {
        let m = next_json(&mut sub).await;
        assert_eq!(
            (m["type"].as_str(), m["offset"].as_u64(), m["data"].as_u64()),
            (Some("message"), Some(n), Some(n)),
            "{m}"
        );
    }
    assert_eq!(a.metric("wsfleet_bus_gap_notices_total"), 0.0, "nothing was lost");
    assert!(a.metric("wsfleet_bus_refilled_total") >= 400.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_redis_cannot_refill_is_announced_and_the_others_are_refilled() {
    let redis = Redis::start();
    let (a, b) = (Server::start(Some(&redis), &[]), Server::start(Some(&redis), &[]));
    let mut good = subscriber(&a, "good").await;
    let mut bad = subscriber(&a, "bad").await;
    let mut publisher = connect(&b.url("/ws")).await;
    while_cut_off(&redis, &a, || async {
        publish_acknowledged(&mut publisher, "good", 1..=5).await;
        // The channel's order in Redis now holds something else: its refill is refused.
        redis.cli(&["DEL", "wsfleet:meta:bad"]);
        redis.cli(&["SET", "wsfleet:meta:bad", "not a hash"]);
    })
    .await;
    for n in 1..=5u64 {
        assert_eq!(next_json(&mut good).await["offset"], n, "the other channel is refilled");
    }
    let gap = next_json(&mut bad).await;
    assert_eq!((gap["type"].as_str(), gap["from"].as_u64(), gap.get("to")), (Some("gap"), Some(1), None), "{gap}");
    a.wait_bus_up();
    assert!(!a.log().contains("refilling bad failed"), "the bad channel ended a session");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_history_can_no_longer_repair_reach_subscribers_as_a_gap_frame() {
    let redis = Redis::start();
    let (a, b) =
        (Server::start(Some(&redis), &["--history-size", "3"]), Server::start(Some(&redis), &["--history-size", "3"]));
    let mut sub = subscriber(&a, "feed").await;
    let mut publisher = connect(&b.url("/ws")).await;
    publish(&mut publisher, "feed", json!(1)).await;
    let first = next_json(&mut sub).await;
    let epoch = first["epoch"].as_str().unwrap().to_owned();

    // Server A misses ten messages, and history keeps only the last three.
    while_cut_off(&redis, &a, || publish_acknowledged(&mut publisher, "feed", 2..=11)).await;

    let gap = next_json(&mut sub).await;
    assert_eq!(
        gap,
        json!({"type": "gap", "channel": "feed", "epoch": epoch, "from": 2, "to": 8, "reason": "history_gap"}),
        "what history still holds (9-11) is delivered, the rest announced"
    );
    for n in 9..=11u64 {
        let m = next_json(&mut sub).await;
        assert_eq!((m["type"].as_str(), m["offset"].as_u64()), (Some("message"), Some(n)), "{m}");
    }
    publish(&mut publisher, "feed", json!(12)).await;
    assert_eq!(next_json(&mut sub).await["offset"], 12);
    assert_eq!(a.metric("wsfleet_bus_gap_notices_total"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_falls_behind_the_bus_resubscribes_and_repairs_from_history() {
    const BURSTS: u64 = 6;
    const PER_BURST: u64 = 64;
    let redis = Redis::start();
    // One worker thread and a 4 KiB backlog: a burst of 64 messages of 200 bytes outruns the
    // delivery loop.
    let slow = Server::start(Some(&redis), &["--bus-buffer", "4096", "--worker-threads", "1"]);
    let other = Server::start(Some(&redis), &[]);
    let mut subs = [subscriber(&slow, "burst").await, subscriber(&slow, "burst").await];
    let mut publisher = connect(&other.url("/ws")).await;
    let body = "x".repeat(200);
    for burst in 0..BURSTS {
        for n in 0..PER_BURST {
            let op =
                json!({"op": "publish", "channel": "burst", "data": {"n": burst * PER_BURST + n + 1, "pad": body}});
            publisher.feed(Message::text(op.to_string())).await.unwrap();
        }
        publisher.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for sub in &mut subs {
        let mut offsets = Vec::new();
        while offsets.len() < (BURSTS * PER_BURST) as usize {
            let m = next_json(sub).await;
            assert_eq!(m["type"], "message", "{m}");
            assert_eq!(m["data"]["n"], m["offset"]);
            offsets.push(m["offset"].as_u64().unwrap());
        }
        assert_eq!(offsets, (1..=BURSTS * PER_BURST).collect::<Vec<_>>(), "every message once, in order");
        assert!(frames_until_quiet(sub, Duration::from_millis(500)).await.is_empty(), "nothing more");
    }
    let overflows = slow.metric("wsfleet_bus_overflows_total");
    assert!(overflows >= 1.0, "the backlog never overflowed; the test proves nothing");
    assert!(slow.log().contains("fell behind the bus"), "the overflow is logged");
    assert!(slow.metric("wsfleet_bus_refilled_total") >= 1.0);
    let (status, body) = http_get(slow.http, "/readyz");
    assert_eq!(status, 200, "{body}");
    eprintln!("overflows: {overflows}");
}
