//! wsfleet-server: the data plane of a wsfleet fleet.
//!
//! Every server pod accepts WebSocket clients and shares channels with every other pod through
//! a message bus (Redis pub/sub, or an in-process bus when no Redis is configured), so a message
//! published on any pod reaches the channel's subscribers on all pods, in one order.
//!
//! # Layout
//!
//! | module | job |
//! |---|---|
//! | [`config`] | command line and `WSFLEET_*` environment, parsed once into typed settings |
//! | [`protocol`] | pure: channel names, the JSON frames of protocol mode, error codes |
//! | [`envelope`] | pure: how a published message travels on the bus |
//! | [`history`] | per-channel offsets, epochs and history (Redis scripts, or in-process) |
//! | [`frame`] | the WebSocket wire format: frames encoded once, a client's messages reassembled |
//! | [`upgrade`] | the HTTP upgrade request and its answers |
//! | [`outbox`] | one client's bounded outbound queue; where slow clients are caught |
//! | [`hub`] | channel -> local subscribers; encodes each message once and fans it out |
//! | [`bus`] | Redis pub/sub or in-process; subscribe on demand, reconnect, health |
//! | [`auth`] | optional JWT check at the handshake |
//! | [`connection`] | one WebSocket client: admission, read loop, write loop, keepalive |
//! | [`presence`] | heartbeats of each server's connection count; the fleet total |
//! | [`tune`] | the node-tuning subcommand: allow-listed sysctls, written and reported |
//! | [`server`] | accept loop, connection limits, drain on shutdown |
//! | [`http`] | `/livez`, `/readyz`, `/metrics` |
//! | [`metrics`] | the Prometheus metrics every other module updates |
//!
//! Library entry points take their listeners and their shutdown trigger as arguments
//! ([`server::run`]); the binary binds ports, raises limits and listens for signals.

pub mod auth;
pub mod bus;
pub mod config;
pub mod connection;
pub mod envelope;
pub mod frame;
pub mod history;
pub mod http;
pub mod hub;
pub mod metrics;
pub mod outbox;
pub mod presence;
pub mod protocol;
pub mod server;
pub mod tune;
pub mod upgrade;
