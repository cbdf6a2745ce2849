//! [`Server`]: a real `wsfleet-server` on loopback ports it chose itself (`127.0.0.1:0`, read
//! back from its `listening` line), on a [`Redis`] or on its in-process bus. Stopped (SIGKILL)
//! when it drops.
//!
//! Which binary: `WSFLEET_SERVER_BIN` if set, else the one cargo built beside the running test
//! (`target/<profile>/wsfleet-server`); [`Server::spawn`] takes any path (the load tool's fault
//! run passes a release build).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::process::Proc;
use crate::redis::Redis;

/// How long waits on a server (ready, bus up, a log line) take at most.
pub const SERVER_WAIT: Duration = Duration::from_secs(10);

/// The `wsfleet-server` binary the tests run.
pub fn server_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("WSFLEET_SERVER_BIN") {
        return bin.into();
    }
    // A test runs as target/<profile>/deps/<test>-<hash>; the binaries are one folder up.
    let exe = std::env::current_exe().expect("the running executable's path");
    let bin = exe.parent().and_then(Path::parent).map(|dir| dir.join("wsfleet-server"));
    match bin {
        Some(bin) if bin.exists() => bin,
        _ => panic!(
            "no wsfleet-server beside {}: build it (cargo build --bins) or set WSFLEET_SERVER_BIN",
            exe.display()
        ),
    }
}

pub struct Server {
    pub ws: SocketAddr,
    pub http: SocketAddr,
    proc: Proc,
}

impl Server {
    /// A server on `redis` (with its password, if it has one), ready; without Redis, the
    /// in-process bus.
    pub fn start(redis: Option<&Redis>, extra: &[&str]) -> Server {
        Server::start_logging(redis, extra, "info")
    }

    /// [`Server::start`] with this `WSFLEET_LOG` filter (e.g. `debug`); [`Server::log`] has
    /// every line.
    pub fn start_logging(redis: Option<&Redis>, extra: &[&str], filter: &str) -> Server {
        let mut args = Vec::new();
        if let Some(r) = redis {
            args.extend(["--redis-url".to_owned(), r.url()]);
            if let Some(password) = r.password.as_ref().filter(|_| !extra.contains(&"--redis-password")) {
                args.extend(["--redis-password".to_owned(), password.clone()]);
            }
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        let server = Server::spawn(&server_binary(), &args, filter, "server");
        if redis.is_some() {
            server.wait_ready();
        }
        server
    }

    /// A server on `redis` (or on the `--redis-url` in `extra`) with exactly the Redis
    /// credentials in `extra`, none of the Redis's own; not waited for: it may never be ready.
    pub fn start_on(redis: &Redis, extra: &[&str]) -> Server {
        let mut args = Vec::new();
        if !extra.contains(&"--redis-url") {
            args.extend(["--redis-url".to_owned(), redis.url()]);
        }
        args.extend(extra.iter().map(|a| a.to_string()));
        Server::spawn(&server_binary(), &args, "info", "server")
    }

    /// `bin` with `args`, on ports of its choosing, logging at `filter` (`label` echoes its
    /// log; empty keeps it quiet). A `--pod-name` unique in this process unless `args` has one
    /// (presence counts connections per pod name). Returns once it listens; not waited for
    /// beyond that.
    pub fn spawn(bin: &Path, args: &[String], filter: &str, label: &str) -> Server {
        static SERVERS: AtomicUsize = AtomicUsize::new(0);
        let n = SERVERS.fetch_add(1, Ordering::Relaxed);
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"]);
        if !args.iter().any(|a| a == "--pod-name") {
            cmd.args(["--pod-name", &format!("test-{}-{n}", std::process::id())]);
        }
        cmd.args(args)
            .env("WSFLEET_LOG", filter)
            .env_remove("WSFLEET_REDIS_PASSWORD")
            .env_remove("WSFLEET_REDIS_USERNAME");
        let proc = Proc::spawn(label, cmd, true);
        Server { ws: proc.addr("websocket"), http: proc.addr("http"), proc }
    }

    /// What the server has logged so far (its first lines, up to a cap).
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// Waits until a log line contains `text`; returns that line.
    pub fn wait_for_log(&self, text: &str) -> String {
        self.proc.wait_for_log(text, SERVER_WAIT)
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.ws, path)
    }

    /// Whether its bus is connected now.
    pub fn bus_up(&self) -> bool {
        self.metric("wsfleet_bus_up") == 1.0
    }

    /// Waits until the server's bus is connected (`/readyz` stays 200 through a bus outage
    /// that the whole fleet shares, so readiness does not say it).
    pub fn wait_bus_up(&self) {
        crate::wait_until("the server's bus is up", SERVER_WAIT, || {
            if self.bus_up() { Ok(()) } else { Err("wsfleet_bus_up is not 1".into()) }
        });
    }

    /// Sends `sig` (`-STOP`, `-CONT`, ...) to the process.
    pub fn signal(&self, sig: &str) {
        self.proc.signal(sig);
    }

    pub fn wait_ready(&self) {
        crate::wait_until("server /readyz is 200", SERVER_WAIT, || {
            let (status, body) = crate::http_get(self.http, "/readyz");
            if status == 200 { Ok(()) } else { Err(format!("{status} {body}")) }
        });
    }

    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    pub fn sigkill(&mut self) {
        self.proc.kill();
    }

    /// Waits for the process to exit; `None` if it did not within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.proc.wait_exit(limit)
    }

    /// The value of one sample of its `/metrics` (a name, or a name with its whole label
    /// set); 0 if absent.
    pub fn metric(&self, name: &str) -> f64 {
        crate::metric(self.http, name)
    }

    pub fn rss_bytes(&self) -> u64 {
        self.proc.rss_bytes()
    }
}

/// One real redis-server and `n` servers on it.
pub fn fleet(n: usize, extra: &[&str]) -> (Redis, Vec<Server>) {
    let redis = Redis::start();
    let servers = (0..n).map(|_| Server::start(Some(&redis), extra)).collect();
    (redis, servers)
}
