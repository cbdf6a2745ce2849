//! Draining servers share one reconnect budget: real redis-server, two real servers draining at
//! the same time, hundreds of real WebSocket clients that record when and how they were closed.
//! What a client author and an operator check: every client gets 1012 with a parseable
//! `reconnect_after_ms`, the hints are spread, the fleet-wide close rate stays under
//! `--drain-max-reconnects-per-second`, and the drain window still ends the drain.

mod support;

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;

const CLIENTS_PER_SERVER: usize = 300;
const BUDGET: usize = 100;
/// How far over the budget a one-second window of close times may go: the bucket holds a tenth
/// of a second's worth (10%), and close frames reach clients with scheduling jitter.
const MARGIN: f64 = 0.25;

/// When a client saw its close, with what code and reason.
struct Closed {
    at: Duration,
    code: Option<u16>,
    reason: String,
}

async fn connect_all(servers: &[Server], per_server: usize) -> Vec<Ws> {
    let mut clients = Vec::new();
    for server in servers {
        for _ in 0..per_server {
            clients.push(connect(&server.url("/ws/room")).await);
        }
    }
    clients
}

/// Waits (at most `limit`) for each client's close frame, timed from `start`.
fn await_closes(clients: Vec<Ws>, start: Instant, limit: Duration) -> Vec<tokio::task::JoinHandle<Closed>> {
    clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let read = async {
                    while let Some(frame) = ws.next().await {
                        match frame {
                            Ok(Message::Close(close)) => {
                                let at = start.elapsed();
                                return match close {
                                    Some(f) => Closed { at, code: Some(f.code.into()), reason: f.reason.to_string() },
                                    None => Closed { at, code: None, reason: String::new() },
                                };
                            }
                            Ok(_) => continue,
                            Err(_) => break,
                        }
                    }
                    Closed { at: start.elapsed(), code: None, reason: "no close frame".into() }
                };
                tokio::time::timeout(limit, read).await.unwrap_or(Closed {
                    at: limit,
                    code: None,
                    reason: "timed out".into(),
                })
            })
        })
        .collect()
}

/// The hint as the JS client reads it: the digits after `reconnect_after_ms=` ending the reason.
fn hint(reason: &str) -> Option<u64> {
    let digits = reason.strip_suffix(|c: char| c.is_whitespace()).unwrap_or(reason);
    let (_, n) = digits.rsplit_once("reconnect_after_ms=")?;
    n.parse().ok()
}

/// The most closes in any one-second window (windows start every 50 ms), among closes before `until`.
fn peak_per_second(times: &[Duration], until: Duration) -> usize {
    let mut peak = 0;
    let mut from = Duration::ZERO;
    while from < until {
        let n = times.iter().filter(|&&t| t >= from && t < from + Duration::from_secs(1) && t < until).count();
        peak = peak.max(n);
        from += Duration::from_millis(50);
    }
    peak
}

/// The number after `key=` in the server's last log line that has it.
fn logged(server: &Server, key: &str) -> Option<u64> {
    let log = server.log();
    let line = log.lines().rev().find(|l| l.contains("drain") && l.contains(&format!("{key}=")))?;
    let rest = &line[line.find(&format!("{key}="))? + key.len() + 1..];
    rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

/// Two servers on one Redis with a drain window of `drain_secs` and a fleet-wide budget of 100
/// reconnects a second, [`CLIENTS_PER_SERVER`] clients each, sent SIGTERM together; with the
/// clients' closes (awaited for the window and 5 s more, timed from the SIGTERMs).
async fn drain_two_at_100_per_second(drain_secs: u64) -> (Redis, Vec<Server>, Vec<tokio::task::JoinHandle<Closed>>) {
    let window = drain_secs.to_string();
    let flags = ["--drain-timeout", &window, "--drain-max-reconnects-per-second", "100"];
    let (redis, servers) = fleet(2, &flags);
    let clients = connect_all(&servers, CLIENTS_PER_SERVER).await;
    let start = Instant::now();
    for s in &servers {
        s.sigterm();
    }
    let closes = await_closes(clients, start, Duration::from_secs(drain_secs + 5));
    (redis, servers, closes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_draining_together_stay_under_one_fleet_wide_budget() {
    const DRAIN_SECS: u64 = 12;
    let (_redis, mut servers, closes) = drain_two_at_100_per_second(DRAIN_SECS).await;
    // Halfway, each server's metrics show closes sent and closes the budget held back.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let addrs: Vec<_> = servers.iter().map(|s| s.http).collect();
    let midway = tokio::task::spawn_blocking(move || {
        let read = |name| addrs.iter().map(|&a| wsfleet_testkit::metric(a, name)).sum::<f64>();
        let names =
            ["wsfleet_drain_closes_total", "wsfleet_drain_closes_delayed_total", "wsfleet_drain_closes_forced_total"];
        names.map(read)
    })
    .await
    .unwrap();
    eprintln!("after 3 s: closes, delayed, forced = {midway:?}");
    let [sent, delayed, forced] = midway;
    assert!((200.0..=400.0).contains(&sent), "about 300 closes sent after 3 s at 100/s: {sent}");
    assert!(delayed >= 300.0 && forced == 0.0, "delayed {delayed}, forced {forced}");
    let mut results = Vec::new();
    for c in closes {
        results.push(c.await.unwrap());
    }

    for r in &results {
        assert_eq!(r.code, Some(1012), "every client is closed with 1012: {:?} at {:?}", r.reason, r.at);
        assert!(r.reason.len() <= 123, "{}", r.reason);
        assert!(hint(&r.reason).is_some(), "no parseable hint: {:?}", r.reason);
    }
    let hints: Vec<u64> = results.iter().filter_map(|r| hint(&r.reason)).collect();
    let distinct: std::collections::BTreeSet<_> = hints.iter().collect();
    let (low, high) = (**distinct.first().unwrap(), **distinct.last().unwrap());
    eprintln!("hints: {} distinct, {low}..{high} ms", distinct.len());
    assert!(
        distinct.len() >= 100 && high - low >= 500,
        "hints are not spread: {} distinct, {low}..{high}",
        distinct.len()
    );
    assert!(high < 1000, "a budgeted close hints within a second: {high}");

    let mut times: Vec<Duration> = results.iter().map(|r| r.at).collect();
    times.sort();
    let last = *times.last().unwrap();
    let peak = peak_per_second(&times, last + Duration::from_secs(1));
    eprintln!("{} closes from {:?} to {last:?}; peak {peak} in one second (budget {BUDGET})", times.len(), times[0]);
    assert!(
        peak as f64 <= BUDGET as f64 * (1.0 + MARGIN),
        "the fleet closed {peak} clients in one second; budget {BUDGET} + {:.0}%",
        MARGIN * 100.0
    );
    // Paced by the budget, not the window: 600 clients at 100/s take about 6 s of the 9 s window.
    let paced = (2 * CLIENTS_PER_SERVER / BUDGET) as f64;
    assert!(last.as_secs_f64() >= paced * 0.8, "the budget did not pace the drain: done after {last:?}");
    assert!(last < Duration::from_secs(DRAIN_SECS * 3 / 4), "the drain outlasted its window: {last:?}");

    for s in &mut servers {
        let status = s.wait_exit(Duration::from_secs(DRAIN_SECS + 2)).expect("server did not exit after its drain");
        assert!(status.success(), "drained server exited with {status}");
        assert_eq!(logged(s, "forced"), Some(0), "{}", s.log());
    }
    let delayed: u64 = servers.iter().filter_map(|s| logged(s, "delayed")).sum();
    assert!(delayed >= CLIENTS_PER_SERVER as u64, "closes delayed by the budget: {delayed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_window_wins_over_the_budget() {
    const DRAIN_SECS: u64 = 4;
    let (_redis, mut servers, closes) = drain_two_at_100_per_second(DRAIN_SECS).await;
    let mut results = Vec::new();
    for c in closes {
        results.push(c.await.unwrap());
    }
    let window = Duration::from_secs(DRAIN_SECS) * 3 / 4;
    for r in &results {
        assert_eq!(r.code, Some(1012), "every client is closed with 1012, forced or not: {:?}", r.reason);
        assert!(hint(&r.reason).is_some(), "no parseable hint: {:?}", r.reason);
        assert!(r.at < window + Duration::from_millis(500), "a client was closed after the window: {:?}", r.at);
    }
    let mut times: Vec<Duration> = results.iter().map(|r| r.at).collect();
    times.sort();
    // Within the window the budget held; at its end the rest went at once.
    let before_end = window - Duration::from_millis(100);
    let peak = peak_per_second(&times, before_end);
    let at_end = times.iter().filter(|&&t| t >= before_end).count();
    eprintln!("peak {peak}/s within the window, {at_end} closed at its end");
    assert!(peak as f64 <= BUDGET as f64 * (1.0 + MARGIN), "peak {peak} within the window");
    // The budget lets about 100/s go in the 3 s window; the rest (about 290) go at its end.
    let most_budgeted = (BUDGET as f64 * window.as_secs_f64() * (1.0 + MARGIN)) as usize;
    let least_forced = 2 * CLIENTS_PER_SERVER - most_budgeted;
    assert!(at_end >= least_forced, "the window's end closed only {at_end}");

    for s in &mut servers {
        let status = s.wait_exit(Duration::from_secs(DRAIN_SECS + 2)).expect("server did not exit after its drain");
        assert!(status.success(), "drained server exited with {status}");
    }
    // Forced clients are told to come back at the budget's pace, fleet-wide: the second
    // server's forced clients queue behind the first's, so the returns they were hinted (close
    // time + hint) stay near the budget's rate, not two servers' worth at once.
    let forced: u64 = servers.iter().filter_map(|s| logged(s, "forced")).sum();
    let mut returns: Vec<Duration> = results
        .iter()
        .filter(|r| r.at >= before_end)
        .filter_map(|r| Some(r.at + Duration::from_millis(hint(&r.reason)?)))
        .collect();
    returns.sort();
    let (first, last) = (returns[0], *returns.last().unwrap());
    let peak_returns = peak_per_second(&returns, last + Duration::from_secs(1));
    eprintln!("{forced} forced clients hinted to return from {first:?} to {last:?}, peak {peak_returns} in one second");
    let spread = Duration::from_secs_f64(forced as f64 / BUDGET as f64);
    assert!(last - first >= spread * 8 / 10, "forced returns are not spread at the budget's rate: {:?}", last - first);
    assert!(
        peak_returns as f64 <= BUDGET as f64 * (1.0 + MARGIN),
        "forced returns peak at {peak_returns} in one second"
    );
    let closed: u64 = servers.iter().filter_map(|s| logged(s, "closed")).sum();
    assert_eq!(closed, 2 * CLIENTS_PER_SERVER as u64);
    assert!(forced as usize >= least_forced && forced as usize <= at_end, "forced closes counted: {forced}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_budget_holds_for_each_server_alone() {
    const CLIENTS: usize = 150;
    const OWN_BUDGET: usize = 50;
    let mut server = Server::start(None, &["--drain-timeout", "8", "--drain-max-reconnects-per-second", "50"]);
    let clients = connect_all(std::slice::from_ref(&server), CLIENTS).await;
    let start = Instant::now();
    server.sigterm();
    let mut results = Vec::new();
    for c in await_closes(clients, start, Duration::from_secs(12)) {
        results.push(c.await.unwrap());
    }
    assert!(results.iter().all(|r| r.code == Some(1012) && hint(&r.reason).is_some()));
    let mut times: Vec<Duration> = results.iter().map(|r| r.at).collect();
    times.sort();
    let last = *times.last().unwrap();
    let peak = peak_per_second(&times, last + Duration::from_secs(1));
    eprintln!("in-process bus: {CLIENTS} closes by {last:?}, peak {peak} in one second (budget {OWN_BUDGET})");
    assert!(peak as f64 <= OWN_BUDGET as f64 * (1.0 + MARGIN), "peak {peak}");
    assert!(last >= Duration::from_millis(2400), "150 clients at 50/s take about 3 s: {last:?}");
    server.wait_exit(Duration::from_secs(10)).expect("server did not exit after its drain");
    assert_eq!(logged(&server, "forced"), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_loses_redis_holds_to_the_budget_on_its_own() {
    const CLIENTS: usize = 100;
    const OWN_BUDGET: usize = 50;
    let (mut redis, mut servers) = fleet(1, &["--drain-timeout", "8", "--drain-max-reconnects-per-second", "50"]);
    // Protocol-mode clients, each subscribe confirmed, so none is waiting on the bus (a raw-mode
    // client whose subscribe the dead bus cannot take is closed with 1013, before any drain).
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(subscriber(&servers[0], "room").await);
    }
    redis.kill();
    let start = Instant::now();
    servers[0].sigterm();
    let mut results = Vec::new();
    for c in await_closes(clients, start, Duration::from_secs(12)) {
        results.push(c.await.unwrap());
    }
    for r in &results {
        assert!(r.code == Some(1012) && hint(&r.reason).is_some(), "{:?} {:?} at {:?}", r.code, r.reason, r.at);
    }
    let mut times: Vec<Duration> = results.iter().map(|r| r.at).collect();
    times.sort();
    let last = *times.last().unwrap();
    let peak = peak_per_second(&times, last + Duration::from_secs(1));
    eprintln!("Redis gone: {CLIENTS} closes by {last:?}, peak {peak} in one second (budget {OWN_BUDGET})");
    assert!(peak as f64 <= OWN_BUDGET as f64 * (1.0 + MARGIN), "peak {peak}");
    servers[0].wait_exit(Duration::from_secs(10)).expect("server did not exit after its drain");
    let log = servers[0].log();
    assert_eq!(log.matches("reconnect budget is unreachable").count(), 1, "warned once: {log}");
}
