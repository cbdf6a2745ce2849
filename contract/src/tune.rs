//! The node-tuning contract: the operator's DaemonSet runs the operator's tuner image as
//! `<SUBCOMMAND> <SYSCTL_FLAG> KEY=VALUE ...`, and both sides hold keys to [`ALLOWED_SYSCTLS`]
//! (the CRD refuses any other key; the subcommand refuses to write one).
//!
//! [`SYSCTL_BOUNDS`] is the one place that says which values a tenant may ask for: the CRD's CEL
//! rules are generated from it (the API server refuses a value out of bounds with the key named)
//! and the operator checks every value with [`check`] again before it builds anything. A value
//! that would starve a node (`fs.file-max=1`, a tiny conntrack table, a backlog of 1) is not a
//! tuning, so the floors sit at or near the kernel's own defaults.

/// The server subcommand that tunes a node.
pub const SUBCOMMAND: &str = "tune";
/// The flag that names one setting, as `KEY=VALUE` (repeated).
pub const SYSCTL_FLAG: &str = "--sysctl";

/// Kernel settings a `WebSocketCluster` may tune on its nodes: connection backlog, ephemeral
/// ports, socket buffers, file handles and connection tracking — what a node holding hundreds
/// of thousands of WebSocket connections runs out of first. The keys of [`SYSCTL_BOUNDS`], in
/// its order.
pub const ALLOWED_SYSCTLS: &[&str] = &KEYS;

const KEYS: [&str; SYSCTL_BOUNDS.len()] = {
    let mut keys = [""; SYSCTL_BOUNDS.len()];
    let mut i = 0;
    while i < keys.len() {
        keys[i] = SYSCTL_BOUNDS[i].key;
        i += 1;
    }
    keys
};

/// How the numbers of a value with several fields must be ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    /// One field, or fields in any order.
    Any,
    /// Each field at least the one before (`tcp_rmem`: min <= default <= max).
    Rising,
    /// Each field above the one before (a port range of at least two ports).
    StrictlyRising,
}

/// What one setting may be set to: `fields` whole numbers separated by one space, each within
/// `min..=max`, in `order`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub key: &'static str,
    pub fields: usize,
    pub min: i64,
    pub max: i64,
    pub order: Order,
}

const fn one(key: &'static str, min: i64, max: i64) -> Bound {
    Bound { key, fields: 1, min, max, order: Order::Any }
}

const fn three(key: &'static str, min: i64, max: i64) -> Bound {
    Bound { key, fields: 3, min, max, order: Order::Rising }
}

const GIB: i64 = 1 << 30;

/// The bounds of every allow-listed setting.
pub const SYSCTL_BOUNDS: &[Bound] = &[
    // Handles: never below what a busy node already has by default.
    one("fs.file-max", 1 << 20, i64::MAX),
    one("fs.nr_open", 1 << 20, 1_073_741_816),
    one("net.core.netdev_max_backlog", 1000, 1 << 20),
    one("net.core.rmem_max", 212_992, GIB),
    one("net.core.somaxconn", 1024, 65_535),
    one("net.core.wmem_max", 212_992, GIB),
    // Ephemeral ports: above the privileged range, at least two.
    Bound { key: "net.ipv4.ip_local_port_range", fields: 2, min: 1024, max: 65_535, order: Order::StrictlyRising },
    one("net.ipv4.tcp_fin_timeout", 5, 120),
    one("net.ipv4.tcp_keepalive_time", 30, 7200),
    one("net.ipv4.tcp_max_syn_backlog", 1024, 1 << 20),
    one("net.ipv4.tcp_max_tw_buckets", 4096, 1 << 24),
    // Pages (4 KiB): low, pressure, high.
    three("net.ipv4.tcp_mem", 4096, 1 << 28),
    // Bytes: min, default, max.
    three("net.ipv4.tcp_rmem", 4096, GIB),
    one("net.ipv4.tcp_tw_reuse", 0, 2),
    three("net.ipv4.tcp_wmem", 4096, GIB),
    // Connection tracking: a table smaller than this drops new connections node-wide.
    one("net.netfilter.nf_conntrack_max", 131_072, 1 << 26),
];

impl Bound {
    /// What a valid value looks like, for messages.
    pub fn describe(&self) -> String {
        let range = format!("{}..={}", self.min, self.max);
        match (self.fields, self.order) {
            (1, _) => format!("{} must be a whole number in {range}", self.key),
            (n, Order::StrictlyRising) => format!("{} must be {n} rising whole numbers in {range}", self.key),
            (n, _) => format!("{} must be {n} non-decreasing whole numbers in {range}", self.key),
        }
    }

    /// The CEL rule that holds a map of settings (`self`) to this bound when it has the key.
    pub fn cel_rule(&self) -> String {
        let (k, min, max) = (self.key, self.min, self.max);
        let v = format!("self['{k}'].split(' ')");
        let each = format!("{v}.all(x, x.matches('^[0-9]{{1,19}}$') && int(x) >= {min} && int(x) <= {max})");
        let cmp = match self.order {
            Order::Any => None,
            Order::Rising => Some("<="),
            Order::StrictlyRising => Some("<"),
        };
        let order: String = cmp
            .map(|cmp| (1..self.fields).map(|i| format!(" && int({v}[{}]) {cmp} int({v}[{i}])", i - 1)).collect())
            .unwrap_or_default();
        format!("!('{k}' in self) || ({v}.size() == {} && {each}{order})", self.fields)
    }
}

/// The bound of `key`, if it is allow-listed.
pub fn bound(key: &str) -> Option<&'static Bound> {
    SYSCTL_BOUNDS.iter().find(|b| b.key == key)
}

/// Whether `key=value` may be written: the key is allow-listed and the value within its bound.
pub fn check(key: &str, value: &str) -> Result<(), String> {
    let b = bound(key).ok_or_else(|| format!("{key} is not on the allow-list: {}", ALLOWED_SYSCTLS.join(", ")))?;
    let fields: Vec<&str> = value.split(' ').collect();
    let numbers: Vec<i64> = fields
        .iter()
        .map(|f| f.parse::<i64>().ok().filter(|n| f.bytes().all(|c| c.is_ascii_digit()) && (b.min..=b.max).contains(n)))
        .collect::<Option<_>>()
        .ok_or_else(|| format!("{key}={value:?}: {}", b.describe()))?;
    let ordered = numbers.windows(2).all(|w| match b.order {
        Order::Any => true,
        Order::Rising => w[0] <= w[1],
        Order::StrictlyRising => w[0] < w[1],
    });
    if numbers.len() != b.fields || !ordered {
        return Err(format!("{key}={value:?}: {}", b.describe()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_setting_is_bounded_once() {
        let mut keys = ALLOWED_SYSCTLS.to_vec();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), SYSCTL_BOUNDS.len(), "a key has two bounds");
        assert!(keys.iter().all(|k| k.contains('.') && !k.contains(' ')), "{keys:?}");
    }

    #[test]
    fn values_are_checked_against_their_bounds() {
        for (key, value) in [
            ("net.core.somaxconn", "65535"),
            ("fs.file-max", "2097152"),
            ("net.ipv4.ip_local_port_range", "1024 65535"),
            ("net.ipv4.tcp_rmem", "4096 131072 6291456"),
            ("net.netfilter.nf_conntrack_max", "1048576"),
            ("net.ipv4.tcp_tw_reuse", "0"),
        ] {
            assert_eq!(check(key, value), Ok(()), "{key}={value}");
        }
        for (key, value, says) in [
            ("fs.file-max", "1", "fs.file-max must be a whole number in 1048576"),
            ("net.netfilter.nf_conntrack_max", "1000", "131072"),
            ("net.core.somaxconn", "1000000", "1024..=65535"),
            ("net.ipv4.ip_local_port_range", "2000 2000", "rising"),
            ("net.ipv4.ip_local_port_range", "80 65535", "1024"),
            ("net.ipv4.ip_local_port_range", "1024", "2 rising"),
            ("net.ipv4.tcp_rmem", "6291456 131072 4096", "non-decreasing"),
            ("net.core.somaxconn", "-5", "whole number"),
            ("net.core.somaxconn", "+5000", "whole number"),
            ("kernel.panic", "1", "not on the allow-list"),
        ] {
            let e = check(key, value).expect_err(value);
            assert!(e.contains(says), "{key}={value}: {e}");
        }
    }

    #[test]
    fn cel_rules_name_their_key_and_bounds() {
        let rule = bound("net.ipv4.ip_local_port_range").unwrap().cel_rule();
        assert!(rule.starts_with("!('net.ipv4.ip_local_port_range' in self) || "), "{rule}");
        assert!(rule.contains("split(' ').size() == 2") && rule.contains(">= 1024"), "{rule}");
        assert!(rule.contains("split(' ')[0]) < int(self['net.ipv4.ip_local_port_range'].split(' ')[1])"), "{rule}");
    }
}
