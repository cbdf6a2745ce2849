//! wsfleet-contract: what the operator and the server must agree on, said once.
//!
//! The operator configures server pods and reads what they report; the server accepts that
//! configuration and reports it. Every name both sides spell lives here, so a rename is one edit
//! and a test on each side proves the two still fit (the operator sets only names in [`env`](mod@env),
//! and the server's command line accepts every one of them).
//!
//! # Layout
//!
//! | module | job |
//! |---|---|
//! | [`env`](mod@env) | the `WSFLEET_*` environment variables the operator sets on server containers |
//! | [`tune`] | the node-tuning subcommand and flag, the sysctl keys it may write and their bounds |
//! | [`presence`] | where servers heartbeat their connection counts in Redis, and how to read them |
//! | [`process`] | what both binaries do alike: log setup and waiting for SIGTERM/SIGINT |
//! | [`sync`] | the poison-tolerant lock helpers every crate uses |
//!
//! No Kubernetes types here, and nothing of the server's internals: the crate stays small so the
//! operator does not build the data plane.

pub mod env;
pub mod presence;
pub mod process;
pub mod sync;
pub mod tune;
