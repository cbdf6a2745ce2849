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
    #[command(flatten)]
    pub redis_auth: RedisAuth,
    /// Print JSON: `{"pods": {"<pod>": <connections>, ...}, "total": <connections>}`.
    #[arg(long)]
    pub json: bool,
}

/// Credentials for Redis besides `--redis-url`, whose own `user:password@` works too; a
/// credential given both ways is refused at start, so no one wonders which was used.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct RedisAuth {
    /// Redis ACL user to authenticate as (with `--redis-password`); without it, Redis's default user.
    #[arg(long, env = env::REDIS_USERNAME)]
    pub redis_username: Option<String>,

    /// Redis password (`requirepass`, or the ACL user's), used on every Redis connection. Set it
    /// from a Secret through the environment; it is never logged.
    #[arg(long, env = env::REDIS_PASSWORD, hide_env_values = true)]
    pub redis_password: Option<Password>,
}

impl RedisAuth {
    /// The Redis at `url`, with these credentials.
    pub fn target<'a>(&'a self, url: &'a str) -> crate::messaging::redis::Target<'a> {
        crate::messaging::redis::Target {
            url,
            username: self.redis_username.as_deref(),
            password: self.redis_password.as_ref().map(Password::expose),
        }
    }
}

/// A password, kept out of `Debug` output (and so out of logs of the settings).
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl std::str::FromStr for Password {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() { Err("must not be empty".into()) } else { Ok(Password(s.to_owned())) }
    }
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

    /// Prefix of every Redis key and pub/sub channel this fleet uses, so fleets can share a Redis.
    #[arg(long, env = env::REDIS_PREFIX, default_value = "wsfleet", value_parser = parse_prefix)]
    pub redis_prefix: String,

    #[command(flatten)]
    pub redis_auth: RedisAuth,

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

    /// Messages queued for one client before it counts as too slow and is closed with 1013
    /// (see also `--client-queue-bytes`).
    #[arg(long, env = "WSFLEET_CLIENT_QUEUE", default_value_t = 1024,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub client_queue: u32,

    /// Comma-separated `Origin` values allowed to connect (exact match); empty allows any.
    /// Clients that send no Origin header (non-browser clients) are always allowed.
    #[arg(long, env = env::ALLOWED_ORIGINS, value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// HS256 secret (32 bytes or more): when set, every upgrade needs a JWT signed with it and
    /// not expired (`Authorization: Bearer <jwt>` or `?access_token=<jwt>`), else HTTP 401, and
    /// the token's `channels` claim says which channels it may subscribe to and publish on.
    #[arg(long, env = env::JWT_SECRET, hide_env_values = true, value_parser = JwtSecretParser)]
    pub jwt_secret: Option<JwtSecret>,

    /// With `--jwt-secret`: tokens must name this audience in `aud`.
    #[arg(long, env = env::JWT_AUDIENCE, requires = "jwt_secret")]
    pub jwt_audience: Option<String>,

    /// With `--jwt-secret`: tokens must carry this issuer in `iss`.
    #[arg(long, env = env::JWT_ISSUER, requires = "jwt_secret")]
    pub jwt_issuer: Option<String>,

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

    /// Bytes of messages received from Redis pub/sub and not yet delivered to this server's
    /// clients, at most. Past it the server drops its pub/sub connection, counts and logs it, and
    /// catches up from history (what history no longer holds is announced to subscribers as a
    /// `gap`). One message is always taken, whatever its size.
    #[arg(long, env = "WSFLEET_BUS_BUFFER", default_value_t = 64 * 1024 * 1024,
          value_parser = clap::value_parser!(u64).range(1024..=16 * 1024 * 1024 * 1024))]
    pub bus_buffer: u64,

    /// What makes `/readyz` answer 503 besides draining, being full and a bus that never
    /// connected: `pod`, only this server's own broken link to the bus; `bus`, any bus outage,
    /// including one the whole fleet shares (which takes every server out of its Service).
    #[arg(long, env = "WSFLEET_READINESS", value_enum, default_value_t = Readiness::Pod)]
    pub readiness: Readiness,

    /// Bytes one client may have queued and not yet written to its socket (frames as sent, so a
    /// protocol-mode message counts its JSON rendering); past it the client is closed as too
    /// slow with 1013. A resume replays at most three quarters of it (more is a `history_gap`).
    #[arg(long, env = "WSFLEET_CLIENT_QUEUE_BYTES", default_value_t = 1_048_576,
          value_parser = clap::value_parser!(u32).range(1024..=1024 * 1024 * 1024))]
    pub client_queue_bytes: u32,

    /// Seconds a client's socket may take no byte while the server has something to write to it;
    /// then the client is closed with 1013 "client not reading", whatever it still sends.
    #[arg(long, env = "WSFLEET_WRITE_STALL_TIMEOUT", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub write_stall_timeout: u64,

    /// Upgrade requests being read and answered at once (connections not yet upgraded). Past
    /// it, the oldest handshake in progress is dropped for the new one, so sockets that connect
    /// and send nothing cannot keep real clients out; established connections do not count.
    #[arg(long, env = "WSFLEET_MAX_HANDSHAKES", default_value_t = 4096,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_handshakes: u32,

    /// Messages one connection may publish per second, on average (a token bucket refilled at
    /// this rate; 0: no limit). Past it, protocol mode answers `rate_limited` and drops the
    /// message; raw mode closes with 1008.
    #[arg(long, env = "WSFLEET_PUBLISH_RATE", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub publish_rate: u32,

    /// Messages one connection may publish at once above `--publish-rate` (the bucket's size).
    #[arg(long, env = "WSFLEET_PUBLISH_BURST", default_value_t = 5000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub publish_burst: u32,

    /// Channels one protocol-mode connection may newly subscribe to per second, on average (a
    /// token bucket; 0: no limit). Past it, the subscribe is answered `rate_limited`.
    #[arg(long, env = "WSFLEET_SUBSCRIBE_RATE", default_value_t = 10,
          value_parser = clap::value_parser!(u32).range(0..=1_000_000))]
    pub subscribe_rate: u32,

    /// Subscribes one connection may make at once above `--subscribe-rate` (the bucket's size;
    /// keep it at `--max-subscriptions` or above so a reconnecting client resubscribes at once).
    #[arg(long, env = "WSFLEET_SUBSCRIBE_BURST", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub subscribe_burst: u32,

    /// Distinct channels this server holds (with at least one local subscriber). Past it, a
    /// subscribe to a channel it does not hold yet is answered `channel_limit` (raw mode: 1013).
    #[arg(long, env = "WSFLEET_MAX_CHANNELS", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub max_channels: u32,

    /// Seconds a subscribe may take, waiting for its turn, the bus and the replay included; a
    /// slower one is answered `timeout` (raw mode: 1013) and leaves nothing behind.
    #[arg(long, env = "WSFLEET_SUBSCRIBE_TIMEOUT", default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=300))]
    pub subscribe_timeout: u64,

    /// Most clients the draining servers of the fleet may close (1012) per second, all together:
    /// servers draining at the same time share this budget through Redis (without Redis, it is
    /// this server's own); 0: no budget, the drain window alone paces the closes. The window
    /// wins: clients still open when three quarters of `--drain-timeout` are over are closed
    /// anyway.
    #[arg(long, env = env::DRAIN_MAX_RECONNECTS_PER_SECOND, default_value_t = 0,
          value_parser = clap::value_parser!(u32).range(0..=10_000_000))]
    pub drain_max_reconnects_per_second: u32,
}

/// A token bucket's settings: `per_second` tokens added per second up to `burst`; a
/// `per_second` of 0 takes no tokens at all (no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

/// See [`Config::readiness`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Readiness {
    Pod,
    Bus,
}

impl Config {
    pub fn history(&self) -> crate::messaging::history::HistoryConfig {
        let budget = self.client_budget();
        crate::messaging::history::HistoryConfig {
            size: self.history_size,
            ttl: Duration::from_secs(self.history_ttl),
            max_replay: budget.replay_frames() as u64,
            max_replay_bytes: budget.replay_bytes() as u64,
        }
    }
    /// What one client may have waiting: `--client-queue` frames, `--client-queue-bytes` bytes.
    pub fn client_budget(&self) -> crate::transport::outbox::Budget {
        crate::transport::outbox::Budget { frames: self.client_queue as usize, bytes: self.client_queue_bytes as usize }
    }
    pub fn write_stall_timeout(&self) -> Duration {
        Duration::from_secs(self.write_stall_timeout)
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
    pub fn subscribe_timeout(&self) -> Duration {
        Duration::from_secs(self.subscribe_timeout)
    }
    pub fn publish_rate(&self) -> Rate {
        Rate { per_second: self.publish_rate, burst: self.publish_burst }
    }
    pub fn subscribe_rate(&self) -> Rate {
        Rate { per_second: self.subscribe_rate, burst: self.subscribe_burst }
    }
}

/// The JWT secret. Its `Debug` hides it, so no log of the settings shows it.
#[derive(Clone)]
pub struct JwtSecret(String);

impl JwtSecret {
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl std::fmt::Debug for JwtSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwtSecret({} bytes)", self.0.len())
    }
}

/// Parses `--jwt-secret` without ever echoing it: clap's usual error quotes the bad value.
#[derive(Clone)]
struct JwtSecretParser;

impl clap::builder::TypedValueParser for JwtSecretParser {
    type Value = JwtSecret;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<JwtSecret, clap::Error> {
        let min = crate::auth::MIN_SECRET_LEN;
        match value.to_str() {
            Some(s) if s.len() >= min => Ok(JwtSecret(s.to_owned())),
            _ => Err(clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!(
                    "--jwt-secret ({}) must be valid UTF-8 of at least {min} bytes; the value given is \
                     {} bytes long\n",
                    env::JWT_SECRET,
                    value.len()
                ),
            )
            .with_cmd(cmd)),
        }
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
        let err = Cli::try_parse_from(["wsfleet-server", "--client-queue-bytes", "100"]).unwrap_err();
        assert!(err.to_string().contains("--client-queue-bytes"), "{err}");
        let err = Cli::try_parse_from(["wsfleet-server", "--write-stall-timeout", "0"]).unwrap_err();
        assert!(err.to_string().contains("--write-stall-timeout"), "{err}");
    }

    #[test]
    fn a_resume_replays_at_most_three_quarters_of_a_client_budget() {
        let c = Cli::parse_from(["wsfleet-server", "--client-queue", "100", "--client-queue-bytes", "4096"]).serve;
        let h = c.history();
        assert_eq!((h.max_replay, h.max_replay_bytes), (75, 3072));
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
    fn a_short_jwt_secret_is_refused_without_being_echoed() {
        let err = Cli::try_parse_from(["wsfleet-server", "--jwt-secret", "sixteen-bytes-ok"]).unwrap_err().to_string();
        assert!(err.contains("--jwt-secret") && err.contains("32"), "{err}");
        assert!(!err.contains("sixteen-bytes-ok"), "the secret is echoed: {err}");
        let secret = "s".repeat(32);
        let c = Cli::parse_from(["wsfleet-server", "--jwt-secret", &secret]).serve;
        let shown = format!("{c:?}");
        assert!(!shown.contains(&secret), "the secret shows in Debug: {shown}");
    }

    #[test]
    fn audience_and_issuer_need_a_secret() {
        let err = Cli::try_parse_from(["wsfleet-server", "--jwt-audience", "chat"]).unwrap_err().to_string();
        assert!(err.contains("--jwt-secret"), "{err}");
        let secret = "s".repeat(32);
        let c = Cli::parse_from(["wsfleet-server", "--jwt-secret", &secret, "--jwt-issuer", "https://i.example"]).serve;
        assert_eq!(c.jwt_issuer.as_deref(), Some("https://i.example"));
    }

    #[test]
    fn the_redis_password_stays_out_of_debug_output() {
        let c = Cli::parse_from(["wsfleet-server", "--redis-password", "s3cret-pw", "--redis-username", "app"]).serve;
        assert_eq!(c.redis_auth.redis_password.as_ref().map(Password::expose), Some("s3cret-pw"));
        let debug = format!("{c:?}");
        assert!(!debug.contains("s3cret-pw") && debug.contains("app"), "{debug}");
        let err = Cli::try_parse_from(["wsfleet-server", "--redis-password", ""]).unwrap_err();
        assert!(err.to_string().contains("--redis-password"), "{err}");
    }

    #[test]
    fn client_limits_parse_into_rates_and_bad_values_name_their_flag() {
        let c = Cli::parse_from(["wsfleet-server", "--publish-rate", "0", "--subscribe-burst", "7"]).serve;
        assert_eq!(c.publish_rate(), Rate { per_second: 0, burst: 5000 }, "0: no limit");
        assert_eq!(c.subscribe_rate(), Rate { per_second: 10, burst: 7 });
        for (flag, value) in
            [("--max-handshakes", "0"), ("--publish-burst", "0"), ("--max-channels", "0"), ("--subscribe-timeout", "0")]
        {
            let err = Cli::try_parse_from(["wsfleet-server", flag, value]).unwrap_err();
            assert!(err.to_string().contains(flag), "{err}");
        }
    }

    #[test]
    fn the_bus_buffer_is_bytes_within_bounds() {
        assert_eq!(Cli::parse_from(["wsfleet-server"]).serve.bus_buffer, 64 * 1024 * 1024);
        let err = Cli::try_parse_from(["wsfleet-server", "--bus-buffer", "10"]).unwrap_err();
        assert!(err.to_string().contains("--bus-buffer"), "{err}");
    }

    #[test]
    fn the_drain_budget_is_off_by_default_and_checked() {
        assert_eq!(Cli::parse_from(["wsfleet-server"]).serve.drain_max_reconnects_per_second, 0);
        let c = Cli::parse_from(["wsfleet-server", "--drain-max-reconnects-per-second", "250"]).serve;
        assert_eq!(c.drain_max_reconnects_per_second, 250);
        for value in ["ten", "10000001"] {
            let err = Cli::try_parse_from(["wsfleet-server", "--drain-max-reconnects-per-second", value]).unwrap_err();
            assert!(err.to_string().contains("--drain-max-reconnects-per-second"), "{err}");
        }
    }

    #[test]
    fn origins_are_comma_separated() {
        let c = Cli::parse_from(["wsfleet-server", "--allowed-origins", "https://a.example,https://b.example"]).serve;
        assert_eq!(c.allowed_origins, ["https://a.example", "https://b.example"]);
    }
}
