//! The messaging half of the server: what a published message is, how it is ordered and
//! recorded, how it reaches every server of the fleet and, on each, every local subscriber.
//!
//! | module | job |
//! |---|---|
//! | [`envelope`] | pure: a published message's bytes on the bus, with its place in the order |
//! | [`history`] | pure: offsets, epochs, resume and why one fails — every backend's contract |
//! | [`hub`] | channel -> local subscribers; encodes each message once and fans it out |
//! | [`bus`] | the bus the server uses, and the [`bus::Backend`] seam behind it |
//! | [`local`] | the in-process backend: one server alone |
//! | [`redis`] | the Redis backend: keys, scripts, subscriber, presence |
//! | [`presence`] | each server's connection count, heartbeated into the backend |
//!
//! Dependencies point one way: backends depend on the hub and the pure modules, never the
//! reverse; nothing here knows a connection, only the [`crate::transport::outbox`] it pushes to.

pub mod bus;
pub mod envelope;
pub mod history;
pub mod hub;
pub mod local;
pub mod presence;
pub mod redis;
