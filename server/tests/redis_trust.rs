//! Redis is not everyone's: servers on a Redis with a password (and the clients of that Redis
//! without it), and servers fed forged pub/sub messages. Real redis-server, real server
//! processes, real WebSocket clients.

mod support;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use support::*;

/// A bus message as a server would publish it: `<offset>:<epoch>:<envelope>`, the envelope a
/// protocol-mode (JSON) one whose timestamp bytes are plain digits.
fn bus_message(offset: &str, epoch: &str, json: &str) -> Vec<u8> {
    let mut m = format!("{offset}:{epoch}:").into_bytes();
    m.extend_from_slice(b"\x01j12345678");
    m.extend_from_slice(json.as_bytes());
    m
}

/// `redis-cli PUBLISH <pubsub> <message>`, the message as bytes; returns the output.
fn publish_raw(redis: &Redis, password: Option<&str>, pubsub: &str, message: &[u8]) -> String {
    let mut cmd = Command::new("redis-cli");
    cmd.args(["-p", &redis.port.to_string(), "PUBLISH", pubsub]).arg(OsStr::from_bytes(message));
    cmd.env_remove("REDISCLI_AUTH");
    if let Some(password) = password {
        cmd.env("REDISCLI_AUTH", password);
    }
    let out = cmd.output().expect("redis-cli");
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// The next frames of `ws` within a short quiet period (none expected).
async fn stray_frames(ws: &mut Ws) -> Vec<String> {
    let mut stray = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_millis(300), ws.next()).await {
        if m.is_text() {
            stray.push(m.to_string());
        }
    }
    stray
}

fn refused(server: &Server, reason: &str) -> f64 {
    server.metric(&format!("wsfleet_bus_envelopes_refused_total{{reason=\"{reason}\"}}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_pub_sub_messages_are_refused_and_the_channel_keeps_delivering() {
    let (redis, servers) = fleet(2, &[]);
    let mut subs = [subscriber(&servers[0], "room").await, subscriber(&servers[1], "room").await];
    let mut publisher = connect(&servers[0].url("/ws")).await;
    publish(&mut publisher, "room", json!({"n": 1})).await;
    let mut epoch = String::new();
    for sub in &mut subs {
        let msg = next_json(sub).await;
        assert_eq!((&msg["offset"], &msg["data"]), (&json!(1), &json!({"n": 1})), "{msg}");
        epoch = msg["epoch"].as_str().unwrap().to_owned();
    }

    // Anyone with network access to an unprotected Redis can publish on the channel's pub/sub
    // name. Each of these reaches both servers.
    let forged: [Vec<u8>; 6] = [
        bus_message("1000000000000", &epoch, r#""far ahead""#),
        bus_message("2", "forged-epoch", r#""another epoch""#),
        b"not a bus message".to_vec(),
        bus_message("2", &epoch, r#""x"},{"type":"subscribed""#),
        bus_message("0", &epoch, r#""offset zero""#),
        bus_message("18446744073709551616", &epoch, r#""past u64""#),
    ];
    for message in &forged {
        assert_eq!(publish_raw(&redis, None, "wsfleet:ch:room", message).trim(), "2", "both servers receive it");
    }

    // The next real publishes, from the other server, reach both subscribers, in order.
    let mut publisher = connect(&servers[1].url("/ws")).await;
    publish(&mut publisher, "room", json!({"n": 2})).await;
    publish(&mut publisher, "room", json!({"n": 3})).await;
    for sub in &mut subs {
        for n in [2, 3] {
            let msg = next_json(sub).await;
            assert_eq!(msg["type"], "message", "{msg}");
            assert_eq!((&msg["offset"], &msg["data"], &msg["epoch"]), (&json!(n), &json!({"n": n}), &json!(epoch)));
        }
        let stray = stray_frames(sub).await;
        assert!(stray.is_empty(), "forged messages reached a client: {stray:?}");
    }
    for server in &servers {
        assert_eq!(refused(server, "offset_ahead"), 1.0);
        assert_eq!(refused(server, "unknown_epoch"), 1.0);
        assert_eq!(refused(server, "undecodable"), 4.0);
        // Counted, not shouted: one line for the lot.
        let lines = server.log().lines().filter(|l| l.contains("refused bus messages")).count();
        assert_eq!(lines, 1, "{}", server.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_with_a_password_serves_only_servers_that_have_it() {
    let password = format!("pw-{}", std::process::id());
    let redis = Redis::start_with_password(&password);
    // The right password, as a flag (support adds it), and inside the URL.
    let with_flag = Server::start(Some(&redis), &[]);
    let url = format!("redis://:{password}@127.0.0.1:{}", redis.port);
    let in_url = Server::start_on(&redis, &["--redis-url", &url]);
    in_url.wait_ready();

    let mut sub = subscriber(&in_url, "room").await;
    let mut publisher = connect(&with_flag.url("/ws")).await;
    publish(&mut publisher, "room", json!("hello")).await;
    let msg = next_json(&mut sub).await;
    assert_eq!((&msg["offset"], &msg["data"]), (&json!(1), &json!("hello")), "{msg}");
    let epoch = msg["epoch"].as_str().unwrap().to_owned();

    // Without the password, or with a wrong one: not ready, and the log and /readyz name what
    // Redis answered, never the password.
    let wrong = "not-the-password";
    let none = Server::start_on(&redis, &[]);
    let bad = Server::start_on(&redis, &["--redis-password", wrong]);
    for (server, code) in [(&none, "NOAUTH"), (&bad, "WRONGPASS")] {
        let line = server.wait_for_log("refused this server's credentials");
        assert!(line.contains(code) && line.contains("ERROR"), "{line}");
        let (status, body) = wait_until("/readyz names the refusal", || {
            let (status, body) = http_get(server.http, "/readyz");
            body.contains(code).then_some((status, body))
        });
        assert_eq!(status, 503, "{body}");
        assert!(server.metric(&format!("wsfleet_bus_auth_failures_total{{code=\"{code}\"}}")) >= 1.0);
        assert_eq!(server.metric("wsfleet_bus_up"), 0.0);
    }
    for server in [&with_flag, &in_url, &none, &bad] {
        let log = server.log();
        assert!(!log.contains(&password) && !log.contains(wrong), "a password in the log:\n{log}");
    }

    // A plain client that reaches Redis but lacks the password cannot publish to anyone.
    let answer = publish_raw(&redis, None, "wsfleet:ch:room", &bus_message("2", &epoch, r#""forged""#));
    assert!(answer.contains("NOAUTH"), "{answer}");
    publish(&mut publisher, "room", json!("real")).await;
    let msg = next_json(&mut sub).await;
    assert_eq!((&msg["offset"], &msg["data"]), (&json!(2), &json!("real")), "{msg}");
    assert_eq!(stray_frames(&mut sub).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_user_and_fleet_stats_work_and_a_password_given_twice_is_refused() {
    let password = format!("pw-{}", std::process::id());
    let redis = Redis::start_with_password(&password);
    let acl = redis.cli(&["ACL", "SETUSER", "fleet", "on", ">fleet-pw", "~wsfleet:*", "&wsfleet:*", "+@all"]);
    assert_eq!(acl.trim(), "OK");
    let user = Server::start_on(&redis, &["--redis-username", "fleet", "--redis-password", "fleet-pw"]);
    user.wait_ready();
    let mut sub = subscriber(&user, "room").await;
    publish(&mut sub, "room", json!({"as": "fleet"})).await;
    let msg: Value = next_json(&mut sub).await;
    assert_eq!(msg["data"], json!({"as": "fleet"}), "{msg}");

    // fleet-stats takes the same credentials.
    let fleet_stats = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_wsfleet-server"))
            .args(["fleet-stats", "--redis-url", &redis.url(), "--json"])
            .args(extra)
            .env_remove("WSFLEET_REDIS_PASSWORD")
            .env_remove("WSFLEET_REDIS_USERNAME")
            .output()
            .expect("run fleet-stats");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let stats = wait_until("fleet-stats counts the server", || {
        let (ok, out) = fleet_stats(&["--redis-password", &password]);
        (ok && out.contains(r#""total":1"#)).then_some(out)
    });
    assert!(stats.contains(r#""pods":{"test-"#), "{stats}");
    let (ok, out) = fleet_stats(&[]);
    assert!(!ok && out.contains("NOAUTH"), "{out}");

    let url = format!("redis://:{password}@127.0.0.1:{}", redis.port);
    let mut twice = Server::start_on(&redis, &["--redis-url", &url, "--redis-password", &password]);
    let status = twice.wait_exit(TIMEOUT).expect("a server with the password given twice keeps running");
    assert!(!status.success());
    let log = twice.log();
    assert!(log.contains("given twice"), "{log}");
    assert!(!log.contains(&password), "a password in the log:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legitimate_jump_is_checked_against_redis_and_delivered() {
    // The channel idles past its TTL, so its next publish starts a new epoch at offset 1: a
    // jump no subscribed server has seen Redis report, which one read confirms.
    let (_redis, servers) = fleet(2, &["--history-ttl", "1"]);
    let mut subs = [subscriber(&servers[0], "room").await, subscriber(&servers[1], "room").await];
    let mut publisher = connect(&servers[0].url("/ws")).await;
    publish(&mut publisher, "room", json!("before")).await;
    let mut first_epoch = Value::Null;
    for sub in &mut subs {
        first_epoch = next_json(sub).await["epoch"].clone();
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    publish(&mut publisher, "room", json!("after")).await;
    publish(&mut publisher, "room", json!("and next")).await;
    for sub in &mut subs {
        for (offset, data) in [(1, "after"), (2, "and next")] {
            let msg = next_json(sub).await;
            assert_eq!((&msg["offset"], &msg["data"]), (&json!(offset), &json!(data)), "{msg}");
            assert_ne!(msg["epoch"], first_epoch, "{msg}");
        }
    }
    for server in &servers {
        let (_, metrics) = http_get(server.http, "/metrics");
        assert!(!metrics.contains("wsfleet_bus_envelopes_refused_total{"), "nothing refused:\n{metrics}");
    }
}
