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
//! | [`auth`] | optional tokens: the JWT rules, the channels a token grants, its expiry |
//! | [`transport`] | the WebSocket half: upgrade, frames, outboxes, connections |
//! | [`transport::connection`] | one client: admission (pure), handshake, reader and ops, writer |
//! | [`messaging`] | the messaging half: envelope, history, hub, bus and its backends, presence |
//! | [`messaging::bus`] | the bus the server uses, and the backend seam (in-process, Redis) |
//! | [`messaging::redis`] | everything that speaks Redis: keys, scripts, subscriber, presence |
//! | [`server`] | accept loop, connection limits, drain on shutdown |
//! | [`drain`] | the drain's schedule, reconnect hints and reconnect budget |
//! | [`http`] | `/livez`, `/readyz`, `/metrics` |
//! | [`metrics`] | the Prometheus metrics every other module updates |
//! | [`tune`] | the node-tuning subcommand: allow-listed sysctls, written and reported |
//!
//! Dependencies point down this table's halves: transport uses messaging's bus and hub;
//! messaging pushes into transport's outboxes and never sees a connection; [`protocol`] and the
//! pure messaging types (envelope, history) import no backend. What the operator must agree on
//! (environment names, presence keys, sysctls) is in the `wsfleet-contract` crate.
//!
//! Library entry points take their listeners and their shutdown trigger as arguments
//! ([`server::run`]); the binary binds ports, raises limits and listens for signals.

pub mod auth;
pub mod config;
pub mod drain;
pub mod http;
pub mod messaging;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod transport;
pub mod tune;
