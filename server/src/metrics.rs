//! The server's Prometheus metrics, registered once and shared by every module.
//!
//! Hot paths (per message, per recipient) touch only plain atomic counters, and the per-recipient
//! ones are added in batches by the write loop, never once per frame.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    pub limit: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub upgrades: Family<ResultLabel, Counter>,
    pub messages_in: Counter,
    pub bytes_in: Counter,
    pub messages_out: Counter,
    pub socket_writes: Counter,
    pub bytes_out: Counter,
    pub slow_client_closes: Counter,
    pub write_stall_closes: Counter,
    pub protocol_errors: Family<CodeLabel, Counter>,
    pub publish_failures: Counter,
    pub subscribe_failures: Counter,
    pub bus_up: Gauge,
    pub bus_link_broken: Gauge,
    pub bus_reconnects: Counter,
    pub bus_channels: Gauge,
    pub bus_messages: Counter,
    pub bus_envelopes_refused: Family<ReasonLabel, Counter>,
    pub bus_auth_failures: Family<CodeLabel, Counter>,
    pub bus_refilled: Counter,
    pub bus_gaps_lost: Counter,
    pub deliver_latency: Histogram,
    pub draining: Gauge,
    pub limit_refusals: Family<LimitLabel, Counter>,
    pub handshakes: Gauge,
    pub publish_outcomes_unknown: Counter,
    pub publish_retries_deduplicated: Counter,
    pub bus_queue_messages: Gauge,
    pub bus_queue_bytes: Gauge,
    pub bus_lag_seconds: Gauge<f64, AtomicU64>,
    pub bus_overflows: Counter,
    pub bus_gap_notices: Counter,
    pub drain_closes: Counter,
    pub drain_closes_delayed: Counter,
    pub drain_closes_forced: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("wsfleet");
        macro_rules! reg {
            ($name:literal, $help:literal, $metric:expr) => {{
                let m = $metric;
                registry.register($name, $help, m.clone());
                m
            }};
        }
        Metrics {
            connections: reg!("connections", "Open WebSocket connections", Gauge::default()),
            upgrades: reg!(
                "upgrades",
                "WebSocket upgrade attempts by result (accepted, full, draining, forbidden_origin, not_found, failed, timeout, evicted)",
                Family::<ResultLabel, Counter>::default()
            ),
            messages_in: reg!("messages_in", "Data frames received from clients", Counter::default()),
            bytes_in: reg!("bytes_in", "Payload bytes received from clients", Counter::default()),
            messages_out: reg!(
                "messages_out",
                "Frames written to clients (keepalive pings and pongs included)",
                Counter::default()
            ),
            socket_writes: reg!(
                "socket_writes",
                "Write syscalls to client sockets (frames per write = messages_out / this)",
                Counter::default()
            ),
            bytes_out: reg!("bytes_out", "Bytes written to clients, frame headers included", Counter::default()),
            slow_client_closes: reg!(
                "slow_client_closes",
                "Clients closed with 1013 because their outbound queue passed --client-queue or --client-queue-bytes",
                Counter::default()
            ),
            write_stall_closes: reg!(
                "write_stall_closes",
                "Clients closed with 1013 because their socket took no byte for --write-stall-timeout",
                Counter::default()
            ),
            protocol_errors: reg!(
                "protocol_errors",
                "Error frames and error closes sent to clients, by code",
                Family::<CodeLabel, Counter>::default()
            ),
            publish_failures: reg!("publish_failures", "Client publishes the bus did not accept", Counter::default()),
            subscribe_failures: reg!(
                "subscribe_failures",
                "Subscriptions (raw-mode connections included) refused because the bus did not answer in time",
                Counter::default()
            ),
            bus_up: reg!("bus_up", "1 while the message bus is connected", Gauge::default()),
            bus_link_broken: reg!(
                "bus_link_broken",
                "1 while this server's own link to the bus is broken and the bus answers a fresh connection",
                Gauge::default()
            ),
            bus_reconnects: reg!(
                "bus_reconnects",
                "Times the bus subscription connection was re-established",
                Counter::default()
            ),
            bus_channels: reg!("bus_channels", "Channels this server is subscribed to on the bus", Gauge::default()),
            bus_messages: reg!("bus_messages", "Messages received from the bus", Counter::default()),
            bus_envelopes_refused: reg!(
                "bus_envelopes_refused",
                "Bus messages dropped because they cannot be right, by reason (undecodable, unknown_epoch, offset_ahead)",
                Family::<ReasonLabel, Counter>::default()
            ),
            bus_auth_failures: reg!(
                "bus_auth_failures",
                "Connections to Redis refused for this server's credentials, by Redis's reply code (NOAUTH, WRONGPASS, NOPERM)",
                Family::<CodeLabel, Counter>::default()
            ),
            bus_refilled: reg!(
                "bus_refilled",
                "Messages refilled from history after a bus reconnect",
                Counter::default()
            ),
            bus_gaps_lost: reg!(
                "bus_gaps_lost",
                "Bus reconnects after which a channel's missed messages were no longer in history",
                Counter::default()
            ),
            deliver_latency: reg!(
                "deliver_latency_seconds",
                "Seconds from publish (on any server) to hand-off to this server's local subscribers",
                Histogram::new(exponential_buckets(0.000_05, 2.0, 18))
            ),
            draining: reg!("draining", "1 while the server drains", Gauge::default()),
            limit_refusals: reg!(
                "limit_refusals",
                "Client operations refused by a limit, by limit (publish_rate, subscribe_rate, max_channels, subscribe_timeout)",
                Family::<LimitLabel, Counter>::default()
            ),
            handshakes: reg!(
                "handshakes",
                "Connections in their handshake (at most --max-handshakes; not yet connections)",
                Gauge::default()
            ),
            publish_outcomes_unknown: reg!(
                "publish_outcomes_unknown",
                "Client publishes answered outcome_unknown: sent to the bus, answer lost (they may have been published)",
                Counter::default()
            ),
            publish_retries_deduplicated: reg!(
                "publish_retries_deduplicated",
                "Client publishes not published again because the channel remembered their id (retries)",
                Counter::default()
            ),
            bus_queue_messages: reg!(
                "bus_queue_messages",
                "Messages received from the bus and not yet handed to local subscribers",
                Gauge::default()
            ),
            bus_queue_bytes: reg!(
                "bus_queue_bytes",
                "Bytes of messages received from the bus and not yet handed to local subscribers (bounded by --bus-buffer)",
                Gauge::default()
            ),
            bus_lag_seconds: reg!(
                "bus_lag_seconds",
                "How long the oldest message received from the bus has waited for delivery (0 when none waits)",
                Gauge::<f64, AtomicU64>::default()
            ),
            bus_overflows: reg!(
                "bus_overflows",
                "Times the messages waiting from the bus passed --bus-buffer and the server resubscribed to catch up from history",
                Counter::default()
            ),
            bus_gap_notices: reg!(
                "bus_gap_notices",
                "Gap frames sent to subscribers: messages published while this server's bus link was down that history no longer held",
                Counter::default()
            ),
            drain_closes: reg!(
                "drain_closes",
                "Clients a drain closed with 1012 and a reconnect hint (forced ones included)",
                Counter::default()
            ),
            drain_closes_delayed: reg!(
                "drain_closes_delayed",
                "Drain closes that waited past their turn for the reconnect budget (each client once)",
                Counter::default()
            ),
            drain_closes_forced: reg!(
                "drain_closes_forced",
                "Clients closed at the end of the drain window without the budget's leave",
                Counter::default()
            ),
            registry,
        }
    }

    pub fn upgrade(&self, result: &'static str) {
        self.upgrades.get_or_create(&ResultLabel { result }).inc();
    }

    pub fn bus_refused(&self, reason: &'static str) {
        self.bus_envelopes_refused.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn limit_refused(&self, limit: &'static str) {
        self.limit_refusals.get_or_create(&LimitLabel { limit }).inc();
    }

    pub fn protocol_error(&self, code: &'static str) {
        self.protocol_errors.get_or_create(&CodeLabel { code }).inc();
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
