//! Real processes the operator tests start: the operator itself, and for the connections test a
//! redis-server and a wsfleet-server on loopback (the workspace's test kit, `wsfleet-testkit`).
//! Every one is killed by its pid when dropped.

use std::path::PathBuf;
use std::process::Command;

pub use wsfleet_testkit::{Proc, http_get, metric};

/// A binary of this workspace, built by `make test-cluster` before the tests run.
pub fn workspace_binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("debug").join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --bins` (make test-cluster does)", path.display());
    path
}

/// Where the operators of these tests put tuning DaemonSets (one namespace for all: each
/// DaemonSet is named after its cluster's namespace, and each operator sweeps only its own).
pub const TUNING_NAMESPACE: &str = "e2e-wsfleet-tuning";

/// The operator, watching one namespace, with its Lease in that namespace and its tuning
/// DaemonSets in [`TUNING_NAMESPACE`].
pub fn operator(namespace: &str, extra: &[&str]) -> Proc {
    crate::ensure_namespace(TUNING_NAMESPACE);
    let mut cmd = Command::new(workspace_binary("wsfleet-operator"));
    cmd.args(["--watch-namespace", namespace, "--lease-namespace", namespace, "--http-listen", "127.0.0.1:0"])
        .args(["--resync-seconds", "2", "--tuning-namespace", TUNING_NAMESPACE])
        .args(extra)
        .env("KUBECONFIG", crate::kubeconfig());
    Proc::spawn("operator", cmd, true)
}
