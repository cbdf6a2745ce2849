//! What one client can make a server hold, capped: publishes per second, new channels per
//! second, channels per server, handshakes in progress, time per subscribe. Each test drives
//! real clients against real servers on a real redis-server, and checks that the refused client
//! gets a clear answer, nothing it was refused is delivered or held, and others are served.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::*;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Replies until the `not_subscribed` answer to a marker unsubscribe sent now: everything the
/// server answered to what was sent before it.
async fn replies_until_marker(ws: &mut Ws) -> Vec<Value> {
    send_json(ws, json!({"op": "unsubscribe", "channel": "marker"})).await;
    let mut replies = Vec::new();
    for _ in 0..10_000 {
        let reply = next_json(ws).await;
        if reply["code"] == "not_subscribed" && reply["message"].as_str().unwrap_or("").contains("marker") {
            return replies;
        }
        replies.push(reply);
    }
    panic!("no marker reply among 10,000 frames");
}

/// The `data` of every message on `ws` until one whose data is `last`, inclusive.
async fn messages_until(ws: &mut Ws, last: &Value) -> Vec<Value> {
    let mut got = Vec::new();
    for _ in 0..10_000 {
        let msg = next_json(ws).await;
        assert_eq!(msg["type"], "message", "{msg}");
        got.push(msg["data"].clone());
        if &msg["data"] == last {
            return got;
        }
    }
    panic!("{last} never came");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_over_its_publish_rate_is_refused_and_its_excess_never_delivered() {
    let redis = Redis::start();
    let server = Server::start(Some(&redis), &["--publish-rate", "5", "--publish-burst", "10"]);
    let mut watcher = subscriber(&server, "rl").await;

    // 30 publishes at once: the burst (10) goes out, the rest is refused but for what the
    // bucket regains meanwhile (5 a second).
    let mut greedy = connect(&server.url("/ws")).await;
    let started = Instant::now();
    for n in 0..30 {
        publish(&mut greedy, "rl", json!({"n": n})).await;
    }
    let replies = replies_until_marker(&mut greedy).await;
    let refill = (started.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    for reply in &replies {
        assert_eq!(reply["code"], "rate_limited", "{reply}");
        assert_eq!(reply["channel"], "rl", "{reply}");
        assert!(reply["message"].as_str().unwrap().contains("--publish-rate"), "{reply}");
    }
    let refused = replies.len();
    assert!((20 - refill.min(20)..=20).contains(&refused), "{refused} refused, {refill} regained");

    // A second client on the same server and channel is not affected.
    let mut calm = connect(&server.url("/ws")).await;
    for n in 0..5 {
        publish(&mut calm, "rl", json!({"calm": n})).await;
    }
    assert!(replies_until_marker(&mut calm).await.is_empty(), "the calm client was refused");

    // The watcher got exactly the accepted messages, in order, then the calm client's five.
    let got = messages_until(&mut watcher, &json!({"calm": 4})).await;
    let greedy_got: Vec<u64> = got.iter().filter_map(|d| d["n"].as_u64()).collect();
    assert_eq!(greedy_got.len(), 30 - refused, "delivered: {greedy_got:?}");
    assert_eq!(&greedy_got[..10], &(0..10).collect::<Vec<_>>()[..], "the burst goes out whole");
    assert!(greedy_got.windows(2).all(|w| w[0] < w[1]), "{greedy_got:?}");
    assert_eq!(got.len() - greedy_got.len(), 5);
    assert_eq!(server.metric("wsfleet_limit_refusals_total{limit=\"publish_rate\"}"), refused as f64);
    assert_eq!(server.metric("wsfleet_protocol_errors_total{code=\"rate_limited\"}"), refused as f64);

    // Raw mode has no error frame: past its burst the publisher is closed with 1008, and what it
    // sent before that is delivered.
    let mut raw_watcher = connect(&server.url("/ws/rawrl")).await;
    let mut raw = connect(&server.url("/ws/rawrl")).await;
    for n in 0..30 {
        if raw.send(Message::text(format!("r{n}"))).await.is_err() {
            break;
        }
    }
    assert_eq!(close_code(&mut raw).await, Some(CloseCode::Policy));
    let first = next_text(&mut raw_watcher).await;
    assert_eq!(first, "r0");
    let mut seen = 1;
    while let Ok(Some(Ok(Message::Text(_)))) =
        tokio::time::timeout(Duration::from_millis(500), raw_watcher.next()).await
    {
        seen += 1;
    }
    assert!((10..30).contains(&seen), "the raw watcher got {seen} of 30");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_flood_is_refused_by_rate_then_by_the_server_channel_cap() {
    let redis = Redis::start();
    let server = Server::start(
        Some(&redis),
        &["--subscribe-rate", "2", "--subscribe-burst", "5", "--max-channels", "8", "--max-subscriptions", "100"],
    );
    let mut bystander = subscriber(&server, "calm").await;

    // 20 new channels at once: the burst is subscribed, the rest refused by rate, each naming
    // its channel.
    let mut flood = connect(&server.url("/ws")).await;
    for c in 0..20 {
        send_json(&mut flood, json!({"op": "subscribe", "channel": format!("f-{c}")})).await;
    }
    let replies = replies_until_marker(&mut flood).await;
    assert_eq!(replies.len(), 20);
    let subscribed: Vec<&Value> = replies.iter().filter(|r| r["type"] == "subscribed").collect();
    assert!((5..=6).contains(&subscribed.len()), "{replies:?}");
    for (c, reply) in replies.iter().enumerate() {
        assert_eq!(reply["channel"], format!("f-{c}"), "{reply}");
        if reply["type"] != "subscribed" {
            assert_eq!(reply["code"], "rate_limited", "{reply}");
            assert!(reply["message"].as_str().unwrap().contains("--subscribe-rate"), "{reply}");
        }
    }
    let rate_refused = 20 - subscribed.len();
    assert_eq!(server.metric("wsfleet_limit_refusals_total{limit=\"subscribe_rate\"}"), rate_refused as f64);

    // Another client (its own bucket) meets the server's cap: 8 channels in all.
    let held = 1 + subscribed.len();
    let mut late = connect(&server.url("/ws")).await;
    for c in 0..3 {
        send_json(&mut late, json!({"op": "subscribe", "channel": format!("g-{c}")})).await;
    }
    send_json(&mut late, json!({"op": "subscribe", "channel": "calm"})).await;
    let replies = replies_until_marker(&mut late).await;
    assert_eq!(replies.len(), 4, "{replies:?}");
    let room = 8 - held;
    for (c, reply) in replies[..3].iter().enumerate() {
        assert_eq!(reply["channel"], format!("g-{c}"), "{reply}");
        if c < room {
            assert_eq!(reply["type"], "subscribed", "{reply}");
        } else {
            assert_eq!(reply["code"], "channel_limit", "{reply}");
            assert!(reply["message"].as_str().unwrap().contains("--max-channels"), "{reply}");
        }
    }
    assert_eq!(replies[3]["type"], "subscribed", "a channel the server holds still takes subscribers: {replies:?}");
    assert_eq!(server.metric("wsfleet_limit_refusals_total{limit=\"max_channels\"}"), (3 - room) as f64);
    assert_eq!(server.metric("wsfleet_bus_channels"), 8.0);

    // Nothing half-applied: the refused subscription does not exist, and is not on the bus.
    send_json(&mut late, json!({"op": "unsubscribe", "channel": "g-2"})).await;
    assert_eq!(next_json(&mut late).await["code"], "not_subscribed");
    let on_redis = redis.cli(&["PUBSUB", "CHANNELS", "*g-2*"]);
    assert!(on_redis.trim().is_empty(), "{on_redis}");

    // Raw mode at the cap: 1013.
    let mut raw = connect(&server.url("/ws/beyond")).await;
    assert_eq!(close_code(&mut raw).await, Some(CloseCode::Again));

    // The server keeps serving: messages flow on held channels, and a channel freed makes room.
    let mut p = connect(&server.url("/ws")).await;
    publish(&mut p, "calm", json!("still here")).await;
    assert_eq!(next_json(&mut bystander).await["data"], "still here");
    drop(flood);
    wait_until("the flood's channels are gone", || (server.metric("wsfleet_bus_channels") < 8.0).then_some(()));
    send_json(&mut late, json!({"op": "subscribe", "channel": "g-2"})).await;
    assert_eq!(next_json(&mut late).await["data"], "still here", "the late client is on calm too");
    assert_eq!(next_json(&mut late).await["type"], "subscribed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_connects_beyond_the_handshake_budget_keep_no_one_out() {
    let redis = Redis::start();
    // Fewer connections than bare sockets: when handshakes took places among connections, these
    // 40 sockets made every upgrade a 503 for the whole handshake timeout.
    let server = Server::start(
        Some(&redis),
        &["--max-handshakes", "20", "--max-connections", "30", "--handshake-timeout", "60"],
    );
    let mut bystander = subscriber(&server, "calm").await;
    let mut bare = Vec::new();
    for _ in 0..40 {
        bare.push(TcpStream::connect(server.ws).await.unwrap());
    }
    wait_until("the oldest 20 evicted", || {
        (server.metric("wsfleet_upgrades_total{result=\"evicted\"}") >= 20.0).then_some(())
    });
    assert!(server.metric("wsfleet_handshakes") <= 20.0);
    let (status, body) = http_get(server.http, "/readyz");
    assert_eq!(status, 200, "{body}");

    let started = Instant::now();
    let mut real = try_connect(&server.url("/ws")).await.expect("a real client connects");
    assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    send_json(&mut real, json!({"op": "subscribe", "channel": "calm"})).await;
    assert_eq!(next_json(&mut real).await["type"], "subscribed");
    publish(&mut real, "calm", json!("through")).await;
    assert_eq!(next_json(&mut bystander).await["data"], "through");
    assert_eq!(http_get(server.http, "/readyz").0, 200);
    assert_eq!(server.metric("wsfleet_upgrades_total{result=\"full\"}"), 0.0);
    drop(bare);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_says_full_from_the_places_upgrades_take() {
    let server = Server::start(None, &["--max-connections", "2"]);
    let _a = connect(&server.url("/ws")).await;
    assert_eq!(http_get(server.http, "/readyz").0, 200);
    let b = connect(&server.url("/ws")).await;
    let (status, body) = http_get(server.http, "/readyz");
    assert_eq!((status, body.contains("--max-connections")), (503, true), "{body}");
    assert!(upgrade_answer(server.ws, "/ws", "").await.starts_with("HTTP/1.1 503"));
    drop(b);
    wait_until("ready again once a client leaves", || (http_get(server.http, "/readyz").0 == 200).then_some(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_slower_than_its_bound_answers_timeout_and_leaves_nothing() {
    let redis = Redis::start();
    let server = Server::start(Some(&redis), &["--subscribe-timeout", "1"]);
    let mut ws = connect(&server.url("/ws")).await;
    // Redis answers nobody for 3 s: the bus cannot confirm the subscription.
    redis.cli(&["CLIENT", "PAUSE", "3000", "ALL"]);
    let started = Instant::now();
    send_json(&mut ws, json!({"op": "subscribe", "channel": "slow"})).await;
    let reply = next_json(&mut ws).await;
    let took = started.elapsed();
    assert_eq!(reply["code"], "timeout", "{reply}");
    assert_eq!(reply["channel"], "slow", "{reply}");
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(2500), "{took:?}");
    assert_eq!(server.metric("wsfleet_bus_channels"), 0.0, "the timed-out subscribe left its channel behind");
    assert_eq!(server.metric("wsfleet_limit_refusals_total{limit=\"subscribe_timeout\"}"), 1.0);

    // Once Redis answers again, the same subscribe works.
    std::thread::sleep(Duration::from_secs(3).saturating_sub(started.elapsed()));
    server.wait_bus_up();
    send_json(&mut ws, json!({"op": "subscribe", "channel": "slow"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "subscribed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_s_subscribes_do_not_hold_up_another_s() {
    let redis = Redis::start();
    let server = Server::start(
        Some(&redis),
        &["--subscribe-burst", "1000", "--max-subscriptions", "1000", "--max-channels", "2000"],
    );
    const MANY: usize = 1000;
    let mut busy = connect(&server.url("/ws")).await;
    for c in 0..MANY {
        send_json(&mut busy, json!({"op": "subscribe", "channel": format!("busy-{c}")})).await;
    }
    let answered = Arc::new(AtomicUsize::new(0));
    let counting = {
        let answered = answered.clone();
        tokio::spawn(async move {
            for _ in 0..MANY {
                assert_eq!(next_json(&mut busy).await["type"], "subscribed");
                answered.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // Another client, arriving while the busy one's subscribes are queued, waits for one turn,
    // not for all of them.
    let started = Instant::now();
    let _other = subscriber(&server, "other").await;
    let waited = started.elapsed();
    let busy_done = answered.load(Ordering::Relaxed);
    tokio::time::timeout(TIMEOUT, counting).await.expect("the busy client's subscribes all complete").unwrap();
    assert!(busy_done < MANY, "the other client waited for all {MANY} of the busy one's subscribes ({waited:?})");
}
