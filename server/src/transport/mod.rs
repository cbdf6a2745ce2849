//! The WebSocket half of the server: bytes on a socket in, frames on a socket out.
//!
//! | module | job |
//! |---|---|
//! | [`upgrade`] | the HTTP upgrade request and its answers |
//! | [`frame`] | the WebSocket wire format: frames encoded once, a client's messages reassembled |
//! | [`outbox`] | one client's bounded outbound queue; where slow clients are caught and counted |
//! | [`connection`] | one client: admission, handshake, reading and ops, writing |
//!
//! The transport reaches the rest of the fleet only through [`crate::messaging::bus::Bus`] and
//! its hub; the hub reaches a client only through its [`outbox::Outbox`].

pub mod connection;
pub mod frame;
pub mod outbox;
pub mod upgrade;
