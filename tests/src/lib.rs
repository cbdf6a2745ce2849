//! Helpers for tests against the local Kubernetes control plane (see `tests/cluster/`).
//!
//! The tests drive the cluster the way a user does, with `kubectl`, using the kubeconfig named by
//! `KUBECONFIG`. Start the cluster with `make cluster-up` and `eval "$(make -s cluster-env)"`, or
//! let `make test-cluster` start and stop it around the tests.
//!
//! Every helper panics with a message that says what failed: these are test helpers.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub use wsfleet_testkit::wait_until;

/// The kubeconfig from `KUBECONFIG`. Panics with instructions when it is unset or missing, so a
/// test can never pass without a control plane.
pub fn kubeconfig() -> PathBuf {
    let Some(value) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) else {
        panic!(
            "KUBECONFIG is not set: these tests need the local control plane. Run `make test-cluster`, \
             or `make cluster-up` then `eval \"$(make -s cluster-env)\"` before `cargo test -p wsfleet-e2e`."
        );
    };
    let path = PathBuf::from(value);
    assert!(
        path.is_file(),
        "KUBECONFIG={} does not exist: is the local control plane up? (`make cluster-up`)",
        path.display()
    );
    path
}

/// The host of an API server URL (`https://HOST:port/...`), without brackets.
fn server_host(server: &str) -> &str {
    let rest = server.split_once("://").map_or(server, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or_default();
    if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        authority.rsplit_once(':').map_or(authority, |(h, _)| h)
    }
}

/// True for an API server URL on this machine's loopback: `https://127.x.y.z:port`,
/// `https://localhost:port` or `https://[::1]:port`.
pub fn is_loopback_server(server: &str) -> bool {
    let host = server_host(server);
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// True for an API server URL on this machine: loopback, or an IP address that one of this
/// machine's own interfaces holds (the node profile's API server is on its bridge's address).
/// A socket can be bound only to a local address, which is the test.
pub fn is_local_server(server: &str) -> bool {
    is_loopback_server(server)
        || server_host(server).parse::<std::net::IpAddr>().is_ok_and(|ip| std::net::UdpSocket::bind((ip, 0)).is_ok())
}

/// Panics unless the kubeconfig's current API server is on this machine: these tests create and
/// delete objects, and must never touch a real cluster that `KUBECONFIG` happens to name.
fn assert_loopback_cluster() {
    static CHECKED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    CHECKED.get_or_init(|| {
        let out = Command::new(kubectl_program())
            .arg("--kubeconfig")
            .arg(kubeconfig())
            .args(["config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}"])
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", kubectl_program()));
        let server = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        assert!(
            out.status.success() && is_local_server(&server),
            "KUBECONFIG names the API server {server:?}, which is not on this machine; these tests only \
             run against the local control plane (`make cluster-up` or `make node-up`)"
        );
    });
}

/// The kubectl to run: `$KUBECTL`, else `kubectl` from `PATH` (tests/cluster puts the one that
/// matches the API server's version first).
fn kubectl_program() -> String {
    std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".to_owned())
}

/// The result of one kubectl run.
#[derive(Debug)]
pub struct Run {
    pub args: Vec<String>,
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from_output(args: &[&str], out: Output) -> Self {
        Self {
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics, showing the command and its output, unless it succeeded; returns stdout.
    pub fn ok(self) -> String {
        assert!(
            self.success,
            "kubectl {} failed\nstdout: {}\nstderr: {}",
            self.args.join(" "),
            self.stdout,
            self.stderr
        );
        self.stdout
    }

    /// Panics unless it failed; returns stderr (the API server's refusal).
    pub fn refused(self) -> String {
        assert!(
            !self.success,
            "kubectl {} succeeded but should have been refused\nstdout: {}",
            self.args.join(" "),
            self.stdout
        );
        self.stderr
    }
}

/// Runs kubectl against the cluster in `KUBECONFIG`, with `stdin` fed to it when given.
pub fn kubectl_run(args: &[&str], stdin: Option<&str>) -> Run {
    assert_loopback_cluster();
    let program = kubectl_program();
    let mut cmd = Command::new(&program);
    cmd.arg("--kubeconfig")
        .arg(kubeconfig())
        .arg("--request-timeout=30s")
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e} (is it on PATH? `make cluster-env` prints the PATH)"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        pipe.write_all(input.as_bytes()).expect("write kubectl stdin");
    }
    let out = child.wait_with_output().expect("wait for kubectl");
    Run::from_output(args, out)
}

/// Runs kubectl and returns its stdout; panics if it fails.
pub fn kubectl(args: &[&str]) -> String {
    kubectl_run(args, None).ok()
}

/// `kubectl apply -f -` with `manifest`, returning the full result (for refusals).
pub fn apply(manifest: &str) -> Run {
    kubectl_run(&["apply", "-f", "-"], Some(manifest))
}

/// `kubectl get ... -o json`, parsed.
pub fn get_json(args: &[&str]) -> serde_json::Value {
    let mut all = vec!["get"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-o", "json"]);
    let out = kubectl(&all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl {} printed invalid JSON: {e}", all.join(" ")))
}

/// One `kubectl get websocketcluster` read.
pub fn wsc(ns: &str, name: &str) -> serde_json::Value {
    get_json(&["-n", ns, "websocketcluster", name])
}

/// The condition of `type_` in an object's status, if it has one.
pub fn condition(obj: &serde_json::Value, type_: &str) -> Option<serde_json::Value> {
    obj["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_).cloned()
}

/// A name unique to this test process and call, usable as a namespace or object name.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    format!("{prefix}-{}-{:x}-{}", std::process::id(), nanos, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A namespace created for one test and deleted (without waiting) when dropped, also when the
/// test fails.
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    /// Creates a fresh namespace and waits until its `default` service account exists (pods
    /// are refused before the controller-manager creates it).
    pub fn new(prefix: &str) -> Self {
        let name = unique_name(&format!("e2e-{prefix}"));
        kubectl(&["create", "namespace", &name]);
        let ns = Self { name };
        wait_until("the namespace's default service account", Duration::from_secs(60), || {
            let run = kubectl_run(&["-n", &ns.name, "get", "serviceaccount", "default", "-o", "name"], None);
            if run.success { Ok(()) } else { Err(run.stderr) }
        });
        ns
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let _ = kubectl_run(&["delete", "namespace", &self.name, "--wait=false", "--ignore-not-found"], None);
    }
}

/// Creates namespace `name` unless it exists (kept: for namespaces tests share).
pub fn ensure_namespace(name: &str) {
    let manifest = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n");
    kubectl_run(&["apply", "-f", "-"], Some(&manifest)).ok();
}

/// Applies a CustomResourceDefinition and waits until the API server serves it. Safe to call
/// from tests running at once, in this process or others: one call at a time per process,
/// server-side apply (creating twice is no conflict), and a wait that tolerates a CRD whose
/// status is not written yet.
pub fn install_crd(manifest: &str, name: &str) {
    static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    kubectl_run(
        &["apply", "--server-side", "--force-conflicts", "--field-manager=wsfleet-e2e", "-f", "-"],
        Some(manifest),
    )
    .ok();
    wait_until(&format!("CRD {name} to be established"), Duration::from_secs(60), || {
        let run = kubectl_run(
            &["get", "crd", name, "-o", "jsonpath={.status.conditions[?(@.type==\"Established\")].status}"],
            None,
        );
        if run.success && run.stdout.trim() == "True" { Ok(()) } else { Err(format!("{}{}", run.stdout, run.stderr)) }
    });
}

/// Reads a file from `tests/fixtures/`.
pub fn fixture(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read fixture {}: {e}", path.display()))
}

pub mod chart;
pub mod clients;
pub mod node;
pub mod processes;

#[cfg(test)]
mod tests {
    use super::{is_local_server, is_loopback_server};

    /// The node profile records and restores every setting the tuning DaemonSet may write: its
    /// list of host settings holds the whole allow-list.
    #[test]
    fn the_node_restores_every_setting_the_tuner_may_write() {
        let common = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/cluster/node/common.sh")).unwrap();
        let start = common.find("NODE_SYSCTLS=(").expect("NODE_SYSCTLS in common.sh");
        let list = &common[start..start + common[start..].find(')').expect("closing parenthesis")];
        let recorded: Vec<&str> = list.split_whitespace().collect();
        for key in wsfleet_contract::tune::ALLOWED_SYSCTLS {
            assert!(recorded.contains(key), "{key} is on the allow-list but not in NODE_SYSCTLS");
        }
    }

    #[test]
    fn loopback_servers() {
        assert!(is_loopback_server("https://127.0.0.1:32764"));
        assert!(is_loopback_server("https://127.3.4.5:6443/"));
        assert!(is_loopback_server("https://localhost:6443"));
        assert!(is_loopback_server("https://[::1]:6443"));
        assert!(!is_loopback_server("https://10.0.0.1:6443"));
        assert!(!is_loopback_server("https://kubernetes.example.com"));
        assert!(!is_loopback_server("https://[2001:db8::1]:6443"));
        // Loopback is local; a documentation address (TEST-NET-1) is held by no machine.
        assert!(is_local_server("https://127.0.0.1:6443"));
        assert!(!is_local_server("https://198.51.100.1:6443"));
        assert!(!is_local_server("https://kubernetes.example.com"));
    }
}
