//! The node-tuning contract: the operator's DaemonSet runs the server image as
//! `<SUBCOMMAND> <SYSCTL_FLAG> KEY=VALUE ...`, and both sides hold keys to [`ALLOWED_SYSCTLS`]
//! (the CRD refuses any other key; the subcommand refuses to write one).

/// The server subcommand that tunes a node.
pub const SUBCOMMAND: &str = "tune";
/// The flag that names one setting, as `KEY=VALUE` (repeated).
pub const SYSCTL_FLAG: &str = "--sysctl";

/// Kernel settings a `WebSocketCluster` may tune on its nodes: connection backlog, ephemeral
/// ports, socket buffers, file handles and connection tracking — what a node holding hundreds
/// of thousands of WebSocket connections runs out of first.
pub const ALLOWED_SYSCTLS: &[&str] = &[
    "fs.file-max",
    "fs.nr_open",
    "net.core.netdev_max_backlog",
    "net.core.rmem_max",
    "net.core.somaxconn",
    "net.core.wmem_max",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_max_syn_backlog",
    "net.ipv4.tcp_max_tw_buckets",
    "net.ipv4.tcp_mem",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_tw_reuse",
    "net.ipv4.tcp_wmem",
    "net.netfilter.nf_conntrack_max",
];
