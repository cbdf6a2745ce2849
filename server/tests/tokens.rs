//! Tokens mean something: with `--jwt-secret`, a token's `channels` claim says which channels a
//! connection may subscribe to (history included) and publish on, the connection ends with 4001
//! when the token expires unless a `refresh` replaced it, and the token never shows in a log.
//! Real server processes (and a real redis-server where history matters), real clients.

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::SinkExt;
use serde_json::{Value, json};
use support::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

const SECRET: &str = "a-test-secret-of-more-than-32-bytes";

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn sign(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()).unwrap(),
    )
    .unwrap()
}

/// A token for user `u1`, valid until `exp`, with these channel lists.
fn token(exp: u64, subscribe: &[&str], publish: &[&str]) -> String {
    sign(&json!({"sub": "u1", "exp": exp, "channels": {"subscribe": subscribe, "publish": publish}}))
}

async fn connect_with(server: &Server, path: &str, token: &str) -> Ws {
    connect(&server.url(&format!("{path}?access_token={token}"))).await
}

async fn expect_forbidden(ws: &mut Ws, channel: &str) -> Value {
    let reply = next_json(ws).await;
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], "forbidden", "{reply}");
    assert_eq!(reply["channel"], channel, "{reply}");
    reply
}

async fn expect_subscribed(ws: &mut Ws, channel: &str) -> Value {
    let reply = next_json(ws).await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    assert_eq!(reply["channel"], channel, "{reply}");
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_for_one_room_is_refused_on_another_and_the_connection_stays_usable() {
    let (_redis, servers) = fleet(1, &["--jwt-secret", SECRET]);
    let server = &servers[0];
    let exp = unix_now() + 600;
    // Someone allowed everywhere fills room:b's history, so a resume there would have something.
    let mut admin = connect_with(server, "/ws", &token(exp, &["*"], &["*"])).await;
    publish(&mut admin, "room:b", json!("secret b")).await;
    send_json(&mut admin, json!({"op": "subscribe", "channel": "room:b"})).await;
    let b = expect_subscribed(&mut admin, "room:b").await;
    assert!(b["offset"].as_u64().unwrap() >= 1, "{b}");

    let mut ws = connect_with(server, "/ws", &token(exp, &["room:a"], &["room:a"])).await;
    send_json(&mut ws, json!({"op": "subscribe", "channel": "room:b"})).await;
    let refused = expect_forbidden(&mut ws, "room:b").await;
    assert!(refused["message"].as_str().unwrap().contains("subscribing to \"room:b\""), "{refused}");
    let since = json!({"epoch": b["epoch"], "offset": 0});
    send_json(&mut ws, json!({"op": "subscribe", "channel": "room:b", "since": since})).await;
    expect_forbidden(&mut ws, "room:b").await;
    publish(&mut ws, "room:b", json!("intruder")).await;
    let refused = expect_forbidden(&mut ws, "room:b").await;
    assert!(refused["message"].as_str().unwrap().contains("publishing on \"room:b\""), "{refused}");

    // The same connection still works where its token allows.
    send_json(&mut ws, json!({"op": "subscribe", "channel": "room:a"})).await;
    expect_subscribed(&mut ws, "room:a").await;
    publish(&mut ws, "room:a", json!("hello a")).await;
    let msg = next_json(&mut ws).await;
    assert_eq!((msg["type"].as_str(), msg["data"].as_str()), (Some("message"), Some("hello a")), "{msg}");
    // Nothing of the refused publish reached room:b.
    publish(&mut admin, "room:b", json!("after")).await;
    let msg = next_json(&mut admin).await;
    assert_eq!(msg["data"], "after", "the refused publish went through: {msg}");
    assert_eq!(server.metric("wsfleet_protocol_errors_total{code=\"forbidden\"}"), 3.0);

    // A token without a `channels` claim may do nothing on channels.
    let bare = sign(&json!({"sub": "u1", "exp": exp}));
    let mut ws = connect_with(server, "/ws", &bare).await;
    send_json(&mut ws, json!({"op": "subscribe", "channel": "room:a"})).await;
    let refused = expect_forbidden(&mut ws, "room:a").await;
    assert!(refused["message"].as_str().unwrap().contains("no `channels` claim"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_only_token_cannot_subscribe() {
    let server = Server::start(None, &["--jwt-secret", SECRET]);
    let exp = unix_now() + 600;
    let mut listener = connect_with(&server, "/ws", &token(exp, &["news"], &[])).await;
    send_json(&mut listener, json!({"op": "subscribe", "channel": "news"})).await;
    expect_subscribed(&mut listener, "news").await;
    let mut publisher = connect_with(&server, "/ws", &token(exp, &[], &["news"])).await;
    send_json(&mut publisher, json!({"op": "subscribe", "channel": "news"})).await;
    expect_forbidden(&mut publisher, "news").await;
    publish(&mut publisher, "news", json!("extra")).await;
    assert_eq!(next_json(&mut listener).await["data"], "extra");
    // ... and a subscribe-only token cannot publish.
    publish(&mut listener, "news", json!("from a reader")).await;
    expect_forbidden(&mut listener, "news").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_mode_needs_subscribe_to_connect_and_publish_to_send() {
    let server = Server::start(None, &["--jwt-secret", SECRET]);
    let exp = unix_now() + 600;
    let reader = token(exp, &["room:*"], &[]);
    let answer = upgrade_answer(server.ws, &format!("/ws/lobby?access_token={reader}"), "").await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("subscribing to \"lobby\""), "{answer}");
    wait_until("the refusal counted", || {
        (server.metric("wsfleet_upgrades_total{result=\"forbidden_channel\"}") == 1.0).then_some(())
    });
    // Allowed to listen: it hears the room; its first frame closes it with 1008.
    let mut raw = connect_with(&server, "/ws/room:a", &reader).await;
    let mut writer = connect_with(&server, "/ws", &token(exp, &[], &["room:a"])).await;
    wait_until("the raw client joined", || (server.metric("wsfleet_connections") == 2.0).then_some(()));
    publish(&mut writer, "room:a", json!("to the room")).await;
    assert_eq!(next_text(&mut raw).await, "to the room");
    raw.send(tokio_tungstenite::tungstenite::Message::text("let me talk")).await.unwrap();
    assert_eq!(close_code(&mut raw).await, Some(CloseCode::Policy));
    // A raw client allowed to publish is served as before.
    let mut talker = connect_with(&server, "/ws/room:b", &token(exp, &["room:b"], &["room:b"])).await;
    talker.send(tokio_tungstenite::tungstenite::Message::text("echo")).await.unwrap();
    assert_eq!(next_text(&mut talker).await, "echo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_ends_with_4001_when_its_token_expires() {
    let server = Server::start(None, &["--jwt-secret", SECRET]);
    let exp = unix_now() + 2;
    let mut ws = connect_with(&server, "/ws", &token(exp, &["a"], &["a"])).await;
    send_json(&mut ws, json!({"op": "subscribe", "channel": "a"})).await;
    expect_subscribed(&mut ws, "a").await;
    let code = close_code(&mut ws).await;
    let closed_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    assert_eq!(code, Some(CloseCode::Library(4001)));
    assert!(closed_at >= Duration::from_secs(exp), "closed at {closed_at:?}, before exp {exp}");
    assert!(closed_at < Duration::from_secs(exp + 3), "closed at {closed_at:?}, long after exp {exp}");
    drop(ws);
    wait_until("the connection is gone", || (server.metric("wsfleet_connections") == 0.0).then_some(()));
    // A raw connection ends the same way.
    let exp = unix_now() + 1;
    let mut raw = connect_with(&server, "/ws/a", &token(exp, &["a"], &[])).await;
    assert_eq!(close_code(&mut raw).await, Some(CloseCode::Library(4001)));
    // A refresh can bring the end closer too.
    let mut ws = connect_with(&server, "/ws", &token(unix_now() + 600, &["a"], &["a"])).await;
    let sooner = unix_now() + 2;
    send_json(&mut ws, json!({"op": "refresh", "token": token(sooner, &["a"], &["a"])})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "refreshed", "exp": sooner}));
    assert_eq!(close_code(&mut ws).await, Some(CloseCode::Library(4001)));
    let closed_at = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    assert!(closed_at >= Duration::from_secs(sooner) && closed_at < Duration::from_secs(sooner + 3), "{closed_at:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refreshed_token_keeps_the_connection_open_past_the_first_expiry() {
    let server = Server::start(None, &["--jwt-secret", SECRET]);
    let started = Instant::now();
    let first_exp = unix_now() + 3;
    let mut ws = connect_with(&server, "/ws", &token(first_exp, &["room:*"], &["room:*"])).await;
    for channel in ["room:a", "room:b"] {
        send_json(&mut ws, json!({"op": "subscribe", "channel": channel})).await;
        expect_subscribed(&mut ws, channel).await;
    }
    // Refusals leave the old token in force: a bad signature, another subject, an expired one.
    let forged = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": "u1", "exp": first_exp + 600, "channels": {"subscribe": ["*"]}}),
        &jsonwebtoken::EncodingKey::from_secret(b"not-the-server-secret-but-32-bytes-long").unwrap(),
    )
    .unwrap();
    let other_user = sign(&json!({"sub": "u2", "exp": first_exp + 600, "channels": {"subscribe": ["*"]}}));
    let expired = token(unix_now() - 10, &["*"], &["*"]);
    for (bad, why) in [(forged, "bad signature"), (other_user, "`sub`"), (expired, "expired")] {
        send_json(&mut ws, json!({"op": "refresh", "token": bad})).await;
        let reply = next_json(&mut ws).await;
        assert_eq!(reply["code"], "invalid_token", "{reply}");
        assert!(reply["message"].as_str().unwrap().contains(why), "{reply} should say {why}");
    }
    // The good refresh narrows the token to room:a: room:b's subscription ends.
    let second_exp = unix_now() + 600;
    send_json(&mut ws, json!({"op": "refresh", "token": token(second_exp, &["room:a"], &["room:a"])})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type": "refreshed", "exp": second_exp}));
    assert_eq!(next_json(&mut ws).await, json!({"type": "unsubscribed", "channel": "room:b", "reason": "forbidden"}));
    // Past the first token's expiry, the connection is open and served under the second token.
    let past_first =
        Duration::from_secs(first_exp + 1).saturating_sub(SystemTime::now().duration_since(UNIX_EPOCH).unwrap());
    tokio::time::sleep(past_first.min(Duration::from_secs(6))).await;
    assert!(started.elapsed() > Duration::from_secs(2));
    publish(&mut ws, "room:a", json!("still here")).await;
    let msg = next_json(&mut ws).await;
    assert_eq!(msg["data"], "still here", "{msg}");
    publish(&mut ws, "room:b", json!("no longer")).await;
    expect_forbidden(&mut ws, "room:b").await;
    assert_eq!(server.metric("wsfleet_connections"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audience_issuer_and_the_bearer_scheme_in_any_case() {
    let server =
        Server::start(None, &["--jwt-secret", SECRET, "--jwt-audience", "chat", "--jwt-issuer", "auth.example"]);
    let exp = unix_now() + 600;
    let claims = |extra: Value| {
        let mut c = json!({"exp": exp, "channels": {"subscribe": ["a"]}});
        c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        sign(&c)
    };
    for (token, why) in [
        (claims(json!({"iss": "auth.example"})), "missing claim `aud`"),
        (claims(json!({"aud": "other", "iss": "auth.example"})), "`aud`"),
        (claims(json!({"aud": "chat", "iss": "evil.example"})), "`iss`"),
        (claims(json!({"aud": "chat", "iss": "auth.example", "nbf": exp})), "`nbf`"),
    ] {
        let answer = upgrade_answer(server.ws, "/ws", &format!("Authorization: Bearer {token}\r\n")).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(answer.contains(why), "{answer} should say {why}");
    }
    let good = claims(json!({"aud": "chat", "iss": "auth.example"}));
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let answer = upgrade_answer(server.ws, "/ws", &format!("Authorization: {scheme} {good}\r\n")).await;
        assert!(answer.starts_with("HTTP/1.1 101"), "{scheme}: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_never_shows_in_the_log() {
    let server = Server::start_logging(None, &["--jwt-secret", SECRET], "debug");
    let exp = unix_now() + 600;
    let good = token(exp, &["a"], &["a"]);
    let expired = token(unix_now() - 60, &["a"], &["a"]);
    let answer = upgrade_answer(server.ws, &format!("/ws?access_token={expired}"), "").await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    let answer = upgrade_answer(server.ws, &format!("/nowhere?access_token={good}"), "").await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let mut ws = connect_with(&server, "/ws", &good).await;
    send_json(&mut ws, json!({"op": "refresh", "token": token(exp + 60, &["a"], &[])})).await;
    assert_eq!(next_json(&mut ws).await["type"], "refreshed");
    send_json(&mut ws, json!({"op": "subscribe", "channel": "b"})).await;
    expect_forbidden(&mut ws, "b").await;
    drop(ws);
    wait_until("the client is gone", || (server.metric("wsfleet_connections") == 0.0).then_some(()));
    let log = server.log();
    assert!(log.contains("upgraded"), "the debug log was not captured: {log}");
    // The signature is the part of a JWT that is never the same twice.
    for t in [&good, &expired] {
        let signature = t.rsplit('.').next().unwrap();
        assert!(!log.contains(signature), "a token is in the log:\n{log}");
    }
    assert!(!log.contains(SECRET), "the secret is in the log");
}

#[test]
fn a_secret_shorter_than_32_bytes_stops_the_server_naming_the_flag() {
    let short = "thirty-one-bytes-is-not-enough!";
    assert_eq!(short.len(), 31);
    let by_flag = std::process::Command::new(env!("CARGO_BIN_EXE_wsfleet-server"))
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--jwt-secret", short])
        .output()
        .unwrap();
    let by_env = std::process::Command::new(env!("CARGO_BIN_EXE_wsfleet-server"))
        .args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .env("WSFLEET_JWT_SECRET", short)
        .output()
        .unwrap();
    for out in [by_flag, by_env] {
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("--jwt-secret") && stderr.contains("32 bytes"), "{stderr}");
        assert!(!stderr.contains(short), "the secret is echoed: {stderr}");
        assert!(!stderr.contains("listening"), "the server started: {stderr}");
    }
}
