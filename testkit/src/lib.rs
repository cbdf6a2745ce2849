//! Real processes for wsfleet's tests and benchmarks, in one place: the server's black-box
//! tests, the control-plane tests and the load tool's fault run start `redis-server` and
//! `wsfleet-server` through this crate, and probe them over plain HTTP.
//!
//! Layout:
//! - [`process`]: [`Proc`], a child process stopped by its pid when its handle drops, its stderr
//!   kept (and echoed with a label), its addresses read from its `listening` log line;
//! - [`redis`]: [`Redis`], a `redis-server` on a loopback port chosen at run time;
//! - [`server`]: [`Server`], a `wsfleet-server` on ports it chose itself, and [`fleet`];
//! - [`http`]: a blocking `GET` and the reading of a `/metrics` page.
//!
//! Contract: every wait is bounded and names what it waited for when it gives up; every process
//! started here is killed (SIGKILL, by pid) and reaped when its handle drops. Failing to start a
//! process is a panic with the reason: this is a kit for tests and test harnesses, whose callers
//! have nothing better to do with that error.

use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

pub mod http;
pub mod process;
pub mod redis;
pub mod server;

pub use http::{http_get, metric, metric_in};
pub use process::Proc;
pub use redis::Redis;
pub use server::{Server, fleet};

/// A loopback port that was free a moment ago (for processes that cannot report what they bound).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port").port()
}

/// Calls `check` until it returns `Ok`, for at most `limit` (first every 10 ms, then less often,
/// up to every 250 ms); panics with `what` and the last `Err` otherwise.
pub fn wait_until<T>(what: &str, limit: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    let mut pause = Duration::from_millis(10);
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if start.elapsed() >= limit => {
                panic!("timed out after {limit:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => std::thread::sleep(pause),
        }
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// Waits until something accepts TCP connections on `127.0.0.1:port`, for at most `limit`.
pub fn wait_port(port: u16, limit: Duration) {
    wait_until(&format!("a listener on 127.0.0.1:{port}"), limit, || {
        TcpStream::connect(("127.0.0.1", port)).map(drop).map_err(|e| e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_returns_the_first_success_and_gives_up_at_its_limit() {
        let mut calls = 0;
        let got = wait_until("the third call", Duration::from_secs(5), || {
            calls += 1;
            if calls == 3 { Ok(calls) } else { Err(format!("call {calls}")) }
        });
        assert_eq!(got, 3);
        let gave_up =
            std::panic::catch_unwind(|| wait_until::<()>("never", Duration::from_millis(50), || Err("not yet".into())));
        let message = *gave_up.unwrap_err().downcast::<String>().unwrap();
        assert!(message.contains("waiting for never; last seen: not yet"), "{message}");
    }
}
