//! Readiness never takes the whole fleet down: real redis-server, three real servers, real
//! clients. A Redis that is paused or restarted is everyone's outage and keeps every server
//! ready; one server's own broken link takes that server alone out; a server stopped for longer
//! than the bus's ping timeout does not take the late answer for a dead bus.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::json;
use support::*;

/// Polls every server's `/readyz` every `every` until `until`; returns the 503 count per server.
fn unready_counts(servers: &[Server], every: Duration, until: Instant) -> Vec<usize> {
    let mut counts = vec![0; servers.len()];
    while Instant::now() < until {
        for (i, s) in servers.iter().enumerate() {
            if http_get(s.http, "/readyz").0 == 503 {
                counts[i] += 1;
            }
        }
        std::thread::sleep(every);
    }
    counts
}

/// Whether Redis answers a PING within 200 ms.
fn redis_answers(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok()
}

/// The ids of the pub/sub connections Redis holds now.
fn pubsub_ids(redis: &Redis) -> BTreeSet<String> {
    redis
        .cli(&["CLIENT", "LIST", "TYPE", "pubsub"])
        .lines()
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")).map(str::to_owned))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_redis_is_the_fleets_outage_and_no_server_leaves_its_service() {
    let (redis, servers) = fleet(3, &[]);
    let mut before = subscriber(&servers[0], "news").await;

    // CLIENT PAUSE ALL holds every client's commands for longer than a server's bus ping may go
    // unanswered (15 s).
    let pause = Duration::from_secs(20);
    assert_eq!(redis.cli(&["CLIENT", "PAUSE", "20000", "ALL"]).trim(), "OK");
    wait_until("Redis is paused", || (!redis_answers(redis.port)).then_some(()));
    // A client that arrives meanwhile is taken (the server is ready) and told the truth.
    let mut during = connect(&servers[1].url("/ws")).await;
    send_json(&mut during, json!({"op": "subscribe", "channel": "news"})).await;
    let answer = next_json(&mut during).await;
    assert_eq!(answer["code"], "bus_unavailable", "a subscribe while the bus is paused: {answer}");

    let unready = unready_counts(&servers, Duration::from_millis(200), Instant::now() + pause);
    assert_eq!(unready, vec![0, 0, 0], "503s per server while Redis was paused");
    let lost = servers.iter().filter(|s| s.metric("wsfleet_bus_reconnects_total") >= 1.0).count();
    assert!(lost >= 1, "the pause was long enough to be taken for an outage by the servers");

    // The bus is back: the client that came during the pause is served.
    for s in &servers {
        s.wait_bus_up();
    }
    send_json(&mut during, json!({"op": "subscribe", "channel": "news"})).await;
    assert_eq!(next_json(&mut during).await["type"], "subscribed");
    let mut publisher = connect(&servers[2].url("/ws")).await;
    publish(&mut publisher, "news", json!("after the pause")).await;
    for ws in [&mut before, &mut during] {
        let msg = next_json(ws).await;
        assert_eq!(msg["data"], "after the pause", "{msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_strict_policy_still_takes_servers_out_while_the_bus_is_down() {
    let (mut redis, servers) = fleet(2, &["--readiness", "bus"]);
    redis.kill();
    for s in &servers {
        wait_until("503 while the bus is down", || {
            let (status, body) = http_get(s.http, "/readyz");
            (status == 503 && body.contains("bus down")).then_some(())
        });
    }
    redis.restart();
    for s in &servers {
        s.wait_ready();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_servers_broken_link_takes_that_server_alone_out_until_it_reconnects() {
    // A server's bus connection is in pub/sub mode once a client subscribes through it.
    let redis = Redis::start();
    let victim = Server::start(Some(&redis), &[]);
    let _on_victim = subscriber(&victim, "news").await;
    let victims_first = pubsub_ids(&redis);
    let others = [Server::start(Some(&redis), &[]), Server::start(Some(&redis), &[])];
    let _on_others = [subscriber(&others[0], "news").await, subscriber(&others[1], "news").await];
    let others_ids: BTreeSet<String> = pubsub_ids(&redis).difference(&victims_first).cloned().collect();
    assert_eq!((victims_first.len(), others_ids.len()), (1, 2), "one pub/sub connection per server");

    // Cut the victim's link again and again; the others keep theirs.
    let mut kills = 0;
    let mut victim_unready = 0;
    let mut others_unready = 0;
    let end = Instant::now() + Duration::from_secs(8);
    while Instant::now() < end && kills < 40 {
        let Some(id) = pubsub_ids(&redis).difference(&others_ids).next().cloned() else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        redis.cli(&["CLIENT", "KILL", "ID", &id]);
        kills += 1;
        let seen = Instant::now() + Duration::from_millis(150);
        while Instant::now() < seen {
            victim_unready += usize::from(http_get(victim.http, "/readyz").0 == 503);
            others_unready += others.iter().filter(|s| http_get(s.http, "/readyz").0 == 503).count();
        }
        victim.wait_ready();
    }
    assert!(kills >= 5, "the victim's link was cut {kills} times");
    assert!(victim_unready > 0, "the server whose link was cut was taken out while it reconnected");
    assert_eq!(others_unready, 0, "the servers whose links were fine stayed ready");
    assert!(victim.metric("wsfleet_bus_reconnects_total") >= kills as f64 - 1.0);
    for s in &others {
        assert_eq!(s.metric("wsfleet_bus_reconnects_total"), 0.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_stopped_longer_than_the_ping_timeout_does_not_report_the_bus_down() {
    let (_redis, servers) = fleet(1, &[]);
    let server = &servers[0];
    let mut sub = subscriber(server, "news").await;
    // Past the first ping (every 5 s), then stopped for longer than a ping may go unanswered.
    tokio::time::sleep(Duration::from_secs(6)).await;
    server.signal("-STOP");
    tokio::time::sleep(Duration::from_secs(20)).await;
    server.signal("-CONT");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(server.metric("wsfleet_bus_reconnects_total"), 0.0, "the late answer was not taken for a dead bus");
    assert_eq!(server.metric("wsfleet_bus_up"), 1.0);
    let mut publisher = connect(&server.url("/ws")).await;
    publish(&mut publisher, "news", json!("still here")).await;
    assert_eq!(next_json(&mut sub).await["data"], "still here");
}
