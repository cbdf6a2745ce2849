//! Settings of one server process, parsed once at start from flags and `WSFLEET_<NAME>`
//! environment variables. Invalid settings end the process with a message before anything binds.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use wsfleet_contract::env;
pub use wsfleet_contract::process::LogFormat;

/// A wsfleet server: WebSocket broadcast whose channels span every server on the same Redis.
///
/// Clients connect to `/ws/<channel>` (raw mode: every frame sent is published to the channel,
/// every message on the channel is sent as-is) or to `/ws` (protocol mode: JSON frames to
/// subscribe, unsubscribe and publish, with per-channel offsets and resume). Health and metrics
/// are served on `--http-listen`. Every flag can also be set as `WSFLEET_<FLAG>`.
#[derive(Parser, Debug, Clone)]
#[command(name = "wsfleet-server", version, about, long_about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: Config,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// Print the live connection count of every server of a fleet, and the total.
    FleetStats(FleetStatsArgs),
    /// Write allow-listed kernel settings of this node, report them, then sleep until stopped
    /// (the node-tuning DaemonSet runs this, privileged, on the host network).
    Tune(TuneArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct TuneArgs {
    /// A setting to write, as KEY=VALUE (repeat for several); only allow-listed keys are taken.
    #[arg(long = "sysctl", value_name = "KEY=VALUE")]
    pub sysctls: Vec<crate::tune::Sysctl>,
    /// Where the kernel settings are (for tests).
    #[arg(long, default_value = "/proc/sys")]
    pub proc_sys: std::path::PathBuf,
    /// Exit after applying instead of sleeping.
    #[arg(long)]
    pub once: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct FleetStatsArgs {
    /// Redis URL of the fleet's message bus.
    #[arg(long, env = env::REDIS_URL)]
    pub redis_url: String,
    /// Key prefix of the fleet (its servers' `--redis-prefix`).
    #[arg(long, env = env::REDIS_PREFIX, default_value = "wsfleet", value_parser = parse_prefix)]
    pub redis_prefix: String,
    /// Print JSON: `{"pods": {"<pod>": <connections>, ...}, "total": <connections>}`.
    #[arg(long)]
    pub json: bool,
}

/// Settings of the server itself.
#[derive(clap::Args, Debug, Clone)]
pub struct Config {
    /// Address for WebSocket clients.
    #[arg(long, env = env::LISTEN, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,

    /// Address for `/livez`, `/readyz` and `/metrics`.
    #[arg(long, env = env::HTTP_LISTEN, default_value = "0.0.0.0:9090")]
    pub http_listen: SocketAddr,

    /// Redis URL of the fleet's message bus (e.g. `redis://127.0.0.1:6379`). Without it the
    /// server uses an in-process bus and is a single-node broadcast server.
    #[arg(long, env = env::REDIS_URL)]
    pub redis_url: Option<String>,

    /// Password of that Redis (AUTH), when the URL has none.
    #[arg(long, env = env::REDIS_PASSWORD, hide_env_values = true)]
    pub redis_password: Option<String>,

    /// Prefix of every Redis key and pub/sub channel this fleet uses, so fleets can share a Redis.
    #[arg(long, env = env::REDIS_PREFIX, default_value = "wsfleet", value_parser = parse_prefix)]
    pub redis_prefix: String,

    /// Name of this server in logs and fleet statistics (the pod name on Kubernetes).
    #[arg(long, env = env::POD_NAME, default_value = "wsfleet-server")]
    pub pod_name: String,

    /// Most concurrent WebSocket connections; past it, upgrades get HTTP 503 with Retry-After.
    #[arg(long, env = env::MAX_CONNECTIONS, default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_connections: u32,

    /// Largest message (and frame) a client may send, in bytes; larger ones close with 1009.
    #[arg(long, env = "WSFLEET_MAX_MESSAGE_SIZE", default_value_t = 65_536,
          value_parser = clap::value_parser!(u32).range(64..=16 * 1024 * 1024))]
    pub max_message_size: u32,

    /// Messages kept per channel so clients can resume (`since`) and servers can refill a gap
    /// after a Redis blip; 0 keeps none (offsets and epochs still work).
    #[arg(long, env = env::HISTORY_SIZE, default_value_t = 1000,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    pub history_size: u64,

    /// Seconds a channel's order and history outlive its last publish; after that it starts a
    /// new epoch.
    #[arg(long, env = env::HISTORY_TTL, default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=30 * 24 * 3600))]
    pub history_ttl: u64,

    /// Seconds over which a draining server (SIGTERM) spreads the closes of its clients (1012).
    #[arg(long, env = env::DRAIN_TIMEOUT, default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub drain_timeout: u64,

    /// Seconds a client has to complete the WebSocket handshake after connecting.
    #[arg(long, env = "WSFLEET_HANDSHAKE_TIMEOUT", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub handshake_timeout: u64,

    /// Seconds between keepalive pings to each client.
    #[arg(long, env = "WSFLEET_PING_INTERVAL", default_value_t = 25,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ping_interval: u64,

    /// Seconds a client may stay silent (no frame, no pong) after a ping before it is dropped.
    #[arg(long, env = "WSFLEET_PING_TIMEOUT", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub ping_timeout: u64,

    /// Most channels one protocol-mode connection may subscribe to.
    #[arg(long, env = "WSFLEET_MAX_SUBSCRIPTIONS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_subscriptions: u32,

    /// Messages queued for one client before it counts as too slow and is closed with 1013.
    #[arg(long, env = "WSFLEET_CLIENT_QUEUE", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub client_queue: u32,

    /// Comma-separated `Origin` values allowed to connect (exact match); empty allows any.
    /// Clients that send no Origin header (non-browser clients) are always allowed.
    #[arg(long, env = env::ALLOWED_ORIGINS, value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// HS256 secret: when set, every upgrade needs a JWT signed with it and not expired
    /// (`Authorization: Bearer <jwt>` or `?access_token=<jwt>`), else HTTP 401.
    #[arg(long, env = env::JWT_SECRET, hide_env_values = true, value_parser = parse_jwt_secret)]
    pub jwt_secret: Option<String>,

    /// Bytes taken from a socket per read. The buffer belongs to the worker thread, not to the
    /// connection: an idle connection holds no read buffer, and a message larger than this still
    /// arrives whole.
    #[arg(long, env = "WSFLEET_READ_BUFFER_SIZE", default_value_t = 16_384,
          value_parser = clap::value_parser!(u32).range(256..=1024 * 1024))]
    pub read_buffer_size: u32,

    /// Listen backlog of the WebSocket port (the kernel caps it at net.core.somaxconn).
    #[arg(long, env = "WSFLEET_LISTEN_BACKLOG", default_value_t = 65_535,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub listen_backlog: u32,

    /// Worker threads of the runtime (0: one per core). Several server processes on one host
    /// do better with 1 each than with one per core each.
    #[arg(long, env = "WSFLEET_WORKER_THREADS", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub worker_threads: u16,

    /// Log format.
    #[arg(long, env = env::LOG_FORMAT, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl Config {
    /// `--redis-url` with `--redis-password` in it (percent-encoded), unless the URL has its own.
    pub fn redis_url_with_password(&self) -> Option<String> {
        let url = self.redis_url.clone()?;
        let (Some(password), Some(rest)) = (&self.redis_password, url.strip_prefix("redis://")) else {
            return Some(url);
        };
        if rest.split('/').next().is_some_and(|authority| authority.contains('@')) {
            return Some(url);
        }
        let encoded: String = password
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        Some(format!("redis://:{encoded}@{rest}"))
    }

    pub fn history(&self) -> crate::messaging::history::HistoryConfig {
        crate::messaging::history::HistoryConfig {
            size: self.history_size,
            ttl: Duration::from_secs(self.history_ttl),
            // Room in the client's queue for the `subscribed` reply and live messages.
            max_replay: (self.client_queue as u64 * 3 / 4).max(1),
        }
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout)
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout)
    }
    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.ping_interval)
    }
    pub fn ping_timeout(&self) -> Duration {
        Duration::from_secs(self.ping_timeout)
    }
}

fn parse_jwt_secret(s: &str) -> Result<String, String> {
    if s.len() >= crate::auth::MIN_SECRET_LEN {
        Ok(s.to_owned())
    } else {
        Err(format!("must be at least {} bytes", crate::auth::MIN_SECRET_LEN))
    }
}

fn parse_prefix(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        Ok(s.to_owned())
    } else {
        Err("must be 1-64 characters of A-Z a-z 0-9 - _ .".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_public_interface() {
        let c = Cli::parse_from(["wsfleet-server"]).serve;
        assert_eq!(c.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.http_listen.to_string(), "0.0.0.0:9090");
        assert!(c.redis_url.is_none());
        assert!(c.allowed_origins.is_empty());
    }

    #[test]
    fn out_of_range_values_are_refused_with_the_flag_named() {
        let err = Cli::try_parse_from(["wsfleet-server", "--max-connections", "0"]).unwrap_err();
        assert!(err.to_string().contains("--max-connections"), "{err}");
        let err = Cli::try_parse_from(["wsfleet-server", "--redis-prefix", "a b"]).unwrap_err();
        assert!(err.to_string().contains("--redis-prefix"), "{err}");
    }

    #[test]
    fn fleet_stats_is_a_subcommand() {
        let cli = Cli::parse_from(["wsfleet-server", "fleet-stats", "--redis-url", "redis://127.0.0.1:1", "--json"]);
        let Some(Command::FleetStats(args)) = cli.command else { panic!("no subcommand") };
        assert!(args.json);
    }

    /// The operator sets only names of `wsfleet_contract::env::ALL` (its own test checks that);
    /// this one checks the server takes every one of them.
    #[test]
    fn every_variable_the_operator_may_set_is_a_setting() {
        use clap::CommandFactory;
        let command = Cli::command();
        let accepted: Vec<String> =
            command.get_arguments().filter_map(|a| a.get_env()).map(|e| e.to_string_lossy().into_owned()).collect();
        for name in env::ALL {
            assert!(accepted.iter().any(|a| a == name), "{name} is not a server setting; accepted: {accepted:?}");
        }
    }

    #[test]
    fn the_tuning_command_the_operator_runs_parses() {
        use wsfleet_contract::tune::{SUBCOMMAND, SYSCTL_FLAG};
        let cli = Cli::parse_from(["wsfleet-server", SUBCOMMAND, SYSCTL_FLAG, "net.core.somaxconn=65535"]);
        let Some(Command::Tune(args)) = cli.command else { panic!("no tune subcommand") };
        assert_eq!(args.sysctls.len(), 1);
    }

    #[test]
    fn origins_are_comma_separated() {
        let c = Cli::parse_from(["wsfleet-server", "--allowed-origins", "https://a.example,https://b.example"]).serve;
        assert_eq!(c.allowed_origins, ["https://a.example", "https://b.example"]);
    }

    #[test]
    fn the_redis_password_goes_into_the_url() {
        let parse = |args: &[&str]| Cli::parse_from([&["wsfleet-server"], args].concat()).serve;
        let c = parse(&["--redis-url", "redis://r:6379/0", "--redis-password", "p@ss word"]);
        assert_eq!(c.redis_url_with_password().as_deref(), Some("redis://:p%40ss%20word@r:6379/0"));
        let c = parse(&["--redis-url", "redis://:own@r:6379", "--redis-password", "x"]);
        assert_eq!(c.redis_url_with_password().as_deref(), Some("redis://:own@r:6379"));
        assert_eq!(parse(&["--redis-url", "redis://r"]).redis_url_with_password().as_deref(), Some("redis://r"));
    }
}
