//! Bad input and hostile clients get a clear answer and harm nobody else: every test keeps a
//! bystander subscribed on the same server and checks it is still served afterwards.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Checks that a bystander on `server` still receives what a fresh client publishes.
async fn bystander_still_served(server: &Server, bystander: &mut Ws) {
    let mut p = connect(&server.url("/ws")).await;
    publish(&mut p, "calm", json!("still here")).await;
    assert_eq!(next_json(bystander).await["data"], "still here");
}

async fn expect_error(ws: &mut Ws, frame: &str, code: &str, mentions: &str) {
    ws.send(Message::text(frame)).await.unwrap();
    let reply = next_json(ws).await;
    assert_eq!(reply["type"], "error", "{frame} -> {reply}");
    assert_eq!(reply["code"], code, "{frame} -> {reply}");
    let message = reply["message"].as_str().unwrap();
    assert!(message.contains(mentions), "{frame} -> {message:?} should mention {mentions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_get_error_frames_and_the_connection_stays_usable() {
    let server = Server::start(None, &["--max-subscriptions", "3"]);
    let mut bystander = subscriber(&server, "calm").await;
    let mut ws = connect(&server.url("/ws")).await;

    expect_error(&mut ws, "this is not json", "invalid_json", "JSON").await;
    expect_error(&mut ws, "[1,2,3]", "invalid_json", "object").await;
    expect_error(&mut ws, r#"{"op":"dance","channel":"c"}"#, "unknown_op", "dance").await;
    expect_error(&mut ws, r#"{"channel":"c"}"#, "unknown_op", "op").await;
    expect_error(&mut ws, r#"{"op":"subscribe"}"#, "invalid_field", "channel").await;
    expect_error(&mut ws, r#"{"op":"subscribe","channel":42}"#, "invalid_field", "channel").await;
    expect_error(&mut ws, r#"{"op":"subscribe","channel":"no spaces"}"#, "invalid_channel", "allowed").await;
    expect_error(&mut ws, r#"{"op":"publish","channel":"c"}"#, "invalid_field", "data").await;
    expect_error(&mut ws, r#"{"op":"unsubscribe","channel":"never"}"#, "not_subscribed", "never").await;
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    let reply = next_json(&mut ws).await;
    assert_eq!(reply["code"], "binary_not_supported", "{reply}");

    // Too many subscriptions: the first three work, the fourth is refused, nothing else changes.
    for ch in ["a", "b", "c"] {
        send_json(&mut ws, json!({"op":"subscribe","channel":ch})).await;
        assert_eq!(next_json(&mut ws).await["type"], "subscribed");
    }
    expect_error(&mut ws, r#"{"op":"subscribe","channel":"d"}"#, "subscription_limit", "3").await;
    send_json(&mut ws, json!({"op":"unsubscribe","channel":"a"})).await;
    assert_eq!(next_json(&mut ws).await, json!({"type":"unsubscribed","channel":"a"}));
    send_json(&mut ws, json!({"op":"subscribe","channel":"d"})).await;
    assert_eq!(next_json(&mut ws).await["type"], "subscribed");

    // After all that the same connection still publishes and receives.
    publish(&mut ws, "d", json!({"ok": true})).await;
    assert_eq!(next_json(&mut ws).await["data"], json!({"ok": true}));
    bystander_still_served(&server, &mut bystander).await;
    assert!(server.metric("wsfleet_protocol_errors_total{code=\"invalid_json\"}") >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_message_is_closed_with_1009() {
    let server = Server::start(None, &["--max-message-size", "1024"]);
    let mut bystander = subscriber(&server, "calm").await;
    for path in ["/ws", "/ws/big"] {
        let mut ws = connect(&server.url(path)).await;
        ws.send(Message::text("x".repeat(1025))).await.unwrap();
        assert_eq!(close_code(&mut ws).await, Some(CloseCode::Size), "{path}");
    }
    // A message at the limit is fine.
    let mut ws = subscriber(&server, "edge").await;
    let data = "y".repeat(1024 - r#"{"op":"publish","channel":"edge","data":""}"#.len());
    publish(&mut ws, "edge", json!(data)).await;
    assert_eq!(next_json(&mut ws).await["data"], json!(data));
    bystander_still_served(&server, &mut bystander).await;
}

/// A masked client frame.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    masked_frame(true, 0, opcode, payload, [0x12, 0x34, 0x56, 0x78])
}

/// Reads server frames until a close frame and returns its code.
async fn read_close_code(s: &mut TcpStream) -> u16 {
    let read = async {
        loop {
            let mut h = [0u8; 2];
            s.read_exact(&mut h).await.unwrap();
            let len = (h[1] & 0x7f) as usize;
            assert!(len < 126, "unexpected long frame");
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.unwrap();
            if h[0] & 0x0f == 0x8 {
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
    };
    tokio::time::timeout(TIMEOUT, read).await.expect("no close frame")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_a_text_frame_is_closed_with_1007() {
    let server = Server::start(None, &[]);
    let mut bystander = subscriber(&server, "calm").await;
    for path in ["/ws", "/ws/calm"] {
        let mut s = raw_socket(&server, path).await;
        s.write_all(&client_frame(0x1, &[b'o', b'k', 0xff, 0xfe])).await.unwrap();
        assert_eq!(read_close_code(&mut s).await, 1007, "{path}");
    }
    // The invalid bytes were published nowhere.
    bystander_still_served(&server, &mut bystander).await;
}

/// Sends `request` as is and returns everything the server answers before hanging up.
async fn http_answer(server: &Server, request: &str) -> String {
    let mut s = TcpStream::connect(server.ws).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, s.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_are_not_upgrades_get_a_clear_http_answer_and_pipelined_frames_count() {
    let server = Server::start(None, &[]);
    let good = upgrade_request("/ws", "");
    let cases = [
        (good.replacen("GET", "POST", 1), "HTTP/1.1 405", "takes GET"),
        (good.replace("Version: 13", "Version: 8"), "HTTP/1.1 426", "Sec-WebSocket-Version: 13"),
        (good.replace("Upgrade: websocket\r\n", ""), "HTTP/1.1 400", "Upgrade: websocket"),
        ("GET /ws HTTP/1.1\r\nHost: x\r\n\r\n".to_owned(), "HTTP/1.1 400", "WebSocket endpoint"),
        (format!("GET /ws HTTP/1.1\r\nX-Big: {}\r\n\r\n", "a".repeat(9000)), "HTTP/1.1 431", "larger than"),
    ];
    for (request, status, mentions) in cases {
        let answer = http_answer(&server, &request).await;
        assert!(answer.starts_with(status), "{answer}");
        assert!(answer.contains(mentions), "{mentions:?} not in {answer}");
    }
    // Frames sent right behind the request head, before the 101 arrived, are not lost.
    let mut s = TcpStream::connect(server.ws).await.unwrap();
    let mut wire = good.into_bytes();
    wire.extend(client_frame(0x1, br#"{"op":"subscribe","channel":"eager"}"#));
    s.write_all(&wire).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let mut got = Vec::new();
    let read = async {
        while !String::from_utf8_lossy(&got).contains(r#""type":"subscribed""#) {
            let n = s.read(&mut answer).await.unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&answer[..n]);
        }
    };
    tokio::time::timeout(TIMEOUT, read).await.expect("no subscribed reply to a pipelined frame");
    assert_eq!(server.metric("wsfleet_upgrades_total{result=\"bad_request\"}"), 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_never_completes_is_cut_off() {
    let server = Server::start(None, &["--handshake-timeout", "1"]);
    let mut bystander = subscriber(&server, "calm").await;
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(server.ws).await.unwrap();
        s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        stalled.push(s);
    }
    let started = Instant::now();
    bystander_still_served(&server, &mut bystander).await;
    for s in &mut stalled {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(TIMEOUT, s.read(&mut buf)).await.expect("server kept a stalled handshake open");
        assert!(matches!(n, Ok(0) | Err(_)), "expected the server to hang up");
    }
    assert!(started.elapsed() < Duration::from_secs(4), "took {:?}", started.elapsed());
    // The count follows the hang-up by a moment.
    wait_until("20 handshake timeouts counted", || {
        (server.metric("wsfleet_upgrades_total{result=\"timeout\"}") == 20.0).then_some(())
    });
    bystander_still_served(&server, &mut bystander).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_server_answers_503_with_retry_after_and_forbidden_origins_get_403() {
    let server = Server::start(None, &["--max-connections", "2", "--allowed-origins", "https://app.example"]);
    let mut bystander = subscriber(&server, "calm").await;
    let second = connect(&server.url("/ws")).await;
    let answer = upgrade_answer(server.ws, "/ws", "").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 5"), "{answer}");
    // Counted just after the refused socket is closed.
    wait_until("the refusals counted", || {
        (server.metric("wsfleet_upgrades_total{result=\"full\"}") == 1.0).then_some(())
    });
    // A slot frees up when a client leaves.
    drop(second);
    wait_until("the connection count drops", || (server.metric("wsfleet_connections") == 1.0).then_some(()));
    let mut p = connect(&server.url("/ws")).await;
    publish(&mut p, "calm", json!("room again")).await;
    assert_eq!(next_json(&mut bystander).await["data"], "room again");
    drop(p);
    wait_until("the connection count drops", || (server.metric("wsfleet_connections") == 1.0).then_some(()));

    let answer = upgrade_answer(server.ws, "/ws", "Origin: https://evil.example\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(answer.contains("evil.example"), "{answer}");
    let answer = upgrade_answer(server.ws, "/nowhere", "").await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let answer = upgrade_answer(server.ws, "/ws", "Origin: https://app.example\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_closed_with_1013_while_fast_readers_get_everything() {
    const MESSAGES: usize = 2000;
    let redis = Redis::start();
    let server = Server::start(Some(&redis), &["--client-queue", "64"]);
    // The slow client keeps a tiny receive buffer and does not read until the end.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.ws).await.unwrap();
    let (mut slow, _) =
        tokio_tungstenite::client_async_with_config(server.url("/ws"), tcp, Some(client_config())).await.unwrap();
    send_json(&mut slow, json!({"op":"subscribe","channel":"firehose"})).await;
    assert_eq!(next_json(&mut slow).await["type"], "subscribed");
    let fast: Vec<_> = futures_util::future::join_all((0..2).map(|_| subscriber(&server, "firehose"))).await;

    // Each fast reader says how far it got; the publisher keeps at most a few messages ahead
    // of the slower of them, so a fast reader that a busy machine starves for a moment never
    // has a full queue, while the slow client, which reads nothing, fills its queue for sure.
    let progress: Vec<_> = (0..fast.len()).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let readers: Vec<_> = fast
        .into_iter()
        .zip(progress.clone())
        .map(|(mut ws, done)| {
            tokio::spawn(async move {
                for i in 0..MESSAGES {
                    let m = next_json(&mut ws).await;
                    assert_eq!(m["data"]["i"], i, "fast reader lost or reordered a message");
                    done.store(i + 1, Ordering::Release);
                }
            })
        })
        .collect();
    let mut publisher = connect(&server.url("/ws")).await;
    let filler = "z".repeat(8000);
    const AHEAD: usize = 16;
    for i in 0..MESSAGES {
        let behind = Instant::now();
        while progress.iter().any(|p| p.load(Ordering::Acquire) + AHEAD <= i) {
            assert!(behind.elapsed() < TIMEOUT, "a fast reader stopped reading at message {i}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        publish(&mut publisher, "firehose", json!({"i": i, "filler": filler})).await;
    }
    for r in readers {
        r.await.unwrap();
    }
    // Now the slow client reads: what was buffered, then the 1013 close.
    let mut received = 0;
    let code = loop {
        match tokio::time::timeout(TIMEOUT, slow.next()).await.expect("slow client got no close") {
            Some(Ok(Message::Close(f))) => break f.map(|f| f.code),
            Some(Ok(_)) => received += 1,
            other => panic!("slow client: {other:?}"),
        }
    };
    assert_eq!(code, Some(CloseCode::Again));
    assert!(received < MESSAGES, "the slow client was not cut off ({received} messages)");
    assert_eq!(server.metric("wsfleet_slow_client_closes_total"), 1.0);
    eprintln!("slow client received {received} of {MESSAGES} messages before its 1013");
}

fn jwt(secret: &[u8], exp_in: i64) -> String {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    jsonwebtoken::encode(
        &header,
        &json!({"sub": "e2e", "exp": now + exp_in, "channels": {"subscribe": ["room"], "publish": ["room"]}}),
        &jsonwebtoken::EncodingKey::from_secret(secret).unwrap(),
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_jwt_secret_only_valid_tokens_get_in() {
    const SECRET: &str = "a-secret-of-at-least-32-bytes-long";
    let server = Server::start(None, &["--jwt-secret", SECRET]);
    for (headers, path, why) in [
        (String::new(), "/ws".to_owned(), "missing token"),
        (format!("Authorization: Bearer {}\r\n", jwt(SECRET.as_bytes(), -120)), "/ws".to_owned(), "expired"),
        (
            format!("Authorization: Bearer {}\r\n", jwt(b"another-secret-of-32-bytes-or-more", 60)),
            "/ws".to_owned(),
            "invalid token",
        ),
        (String::new(), "/ws?access_token=garbage".to_owned(), "invalid token"),
    ] {
        let answer = upgrade_answer(server.ws, &path, &headers).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
        assert!(answer.contains(why), "{answer} should say {why}");
        assert!(answer.to_ascii_lowercase().contains("www-authenticate: bearer"), "{answer}");
    }
    let good = jwt(SECRET.as_bytes(), 60);
    let answer = upgrade_answer(server.ws, "/ws", &format!("Authorization: Bearer {good}\r\n")).await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    let answer = upgrade_answer(server.ws, &format!("/ws/room?access_token={good}"), "").await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    // Counted just after the refused socket is closed.
    wait_until("the refusals counted", || {
        (server.metric("wsfleet_upgrades_total{result=\"unauthorized\"}") == 4.0).then_some(())
    });
    // A secret too short is refused before the server starts.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_wsfleet-server"))
        .args(["--jwt-secret", "short"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--jwt-secret"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_stops_answering_pings_is_dropped_and_a_live_one_is_not() {
    let server = Server::start(None, &["--ping-interval", "1", "--ping-timeout", "1"]);
    // The library client answers pings while it is being read; the raw socket never answers.
    let mut live = subscriber(&server, "calm").await;
    let mut mute = raw_socket(&server, "/ws").await;
    let started = Instant::now();
    // Pings arrive (0x89), then the server hangs up about 2 s after the last thing it heard.
    let reader = tokio::spawn(async move {
        let (mut bytes, mut buf) = (Vec::new(), [0u8; 256]);
        loop {
            match mute.read(&mut buf).await {
                Ok(0) | Err(_) => return bytes,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
        }
    });
    let live_reader = tokio::spawn(async move {
        // Reading keeps the library client answering pings for longer than the mute one lasts.
        let _ =
            tokio::time::timeout(Duration::from_secs(4), async { while let Some(Ok(_)) = live.next().await {} }).await;
        live
    });
    let bytes = tokio::time::timeout(TIMEOUT, reader).await.expect("the mute peer was never dropped").unwrap();
    let after = started.elapsed();
    assert!(bytes.starts_with(&[0x89, 0x00]), "no ping before the drop: {bytes:?}");
    assert!(after >= Duration::from_millis(1500) && after < Duration::from_secs(5), "dropped after {after:?}");
    let mut live = live_reader.await.unwrap();
    bystander_still_served(&server, &mut live).await;
    // The live client is the only one left (the check's publisher leaves too).
    wait_until("only the live client remains", || (server.metric("wsfleet_connections") == 1.0).then_some(()));
}
