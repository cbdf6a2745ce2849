//! The environment variables the operator sets on a server container. The server's
//! configuration (`wsfleet-server`'s `config`) reads each one with clap's `env = ...`; a test
//! there checks that it accepts every name in [`ALL`], and a test in the operator checks that it
//! sets no name outside [`ALL`].

pub const LISTEN: &str = "WSFLEET_LISTEN";
pub const HTTP_LISTEN: &str = "WSFLEET_HTTP_LISTEN";
pub const POD_NAME: &str = "WSFLEET_POD_NAME";
pub const REDIS_URL: &str = "WSFLEET_REDIS_URL";
pub const REDIS_PREFIX: &str = "WSFLEET_REDIS_PREFIX";
/// Set from a Secret by reference, never as a literal value.
pub const REDIS_PASSWORD: &str = "WSFLEET_REDIS_PASSWORD";
pub const REDIS_USERNAME: &str = "WSFLEET_REDIS_USERNAME";
pub const MAX_CONNECTIONS: &str = "WSFLEET_MAX_CONNECTIONS";
pub const DRAIN_TIMEOUT: &str = "WSFLEET_DRAIN_TIMEOUT";
/// Set only when the cluster's spec sets `drain.maxReconnectsPerSecond`.
pub const DRAIN_MAX_RECONNECTS_PER_SECOND: &str = "WSFLEET_DRAIN_MAX_RECONNECTS_PER_SECOND";
pub const HISTORY_SIZE: &str = "WSFLEET_HISTORY_SIZE";
pub const HISTORY_TTL: &str = "WSFLEET_HISTORY_TTL";
pub const ALLOWED_ORIGINS: &str = "WSFLEET_ALLOWED_ORIGINS";
pub const JWT_SECRET: &str = "WSFLEET_JWT_SECRET";
pub const JWT_AUDIENCE: &str = "WSFLEET_JWT_AUDIENCE";
pub const JWT_ISSUER: &str = "WSFLEET_JWT_ISSUER";
pub const LOG_FORMAT: &str = "WSFLEET_LOG_FORMAT";

/// The log filter both binaries read (`info` when unset); not a flag.
pub const LOG_FILTER: &str = "WSFLEET_LOG";

/// Every variable the operator may set on a server container.
pub const ALL: &[&str] = &[
    LISTEN,
    HTTP_LISTEN,
    POD_NAME,
    REDIS_URL,
    REDIS_PREFIX,
    REDIS_PASSWORD,
    REDIS_USERNAME,
    MAX_CONNECTIONS,
    DRAIN_TIMEOUT,
    DRAIN_MAX_RECONNECTS_PER_SECOND,
    HISTORY_SIZE,
    HISTORY_TTL,
    ALLOWED_ORIGINS,
    JWT_SECRET,
    JWT_AUDIENCE,
    JWT_ISSUER,
    LOG_FORMAT,
];

/// The value of [`LOG_FORMAT`] the operator sets: structured logs for the cluster's collector.
pub const LOG_FORMAT_JSON: &str = "json";
