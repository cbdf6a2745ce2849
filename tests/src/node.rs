//! Helpers for the end-to-end tests on the node profile (`tests/cluster/node`, `make test-node`):
//! fleets applied as a user applies them, read back through the API, and the node's own facts
//! read where they live: containers in containerd, processes and sysctls on this machine.
//!
//! Everything here needs the real node: pods are containers, their addresses answer on the
//! node's bridge, and `ctr` reaches the node's containerd (`CONTAINERD_ADDRESS`, which
//! `with-node.sh` exports).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{condition, get_json, kubectl, wait_until, wsc};

/// A `WebSocketCluster` manifest for the node tests: a managed Redis (a real pod), clients spread
/// over the pods (no session affinity), a short drain so rollouts take seconds, and history deep
/// enough that a test can read a channel's whole order back. `extra` is appended to `spec`
/// (indented two spaces).
pub fn fleet_manifest(name: &str, replicas: u32, extra: &str) -> String {
    format!(
        "apiVersion: wsfleet.dev/v1alpha1
kind: WebSocketCluster
metadata:
  name: {name}
spec:
  replicas: {replicas}
  service:
    sessionAffinity: None
  redis:
    managed: {{}}
  history:
    size: 10000
    ttlSeconds: 600
  drain:
    timeoutSeconds: 6
{extra}"
    )
}

/// Waits until the fleet is Ready with `replicas` ready and up-to-date pods, every pod of the
/// old template gone, and the status written for the current generation. Returns the object.
pub fn wait_fleet_ready(ns: &str, name: &str, replicas: usize, limit: Duration) -> Value {
    wait_until(&format!("{name} Ready with {replicas} pods"), limit, || {
        let obj = wsc(ns, name);
        let ready = condition(&obj, "Ready").is_some_and(|c| c["status"] == "True");
        let s = &obj["status"];
        let pods = server_pods(ns, &obj);
        let settled = s["observedGeneration"] == obj["metadata"]["generation"]
            && s["readyReplicas"] == replicas
            && s["updatedReplicas"] == replicas
            && pods.len() == replicas
            && pods.iter().all(|p| p.ready && !p.terminating);
        if ready && settled { Ok(obj) } else { Err(format!("status {s}, pods {pods:?}")) }
    })
}

/// Applies the fleet and waits for it; returns the object and how long it took to be Ready.
pub fn apply_fleet(ns: &str, manifest: &str, replicas: usize) -> (Value, Duration) {
    let start = Instant::now();
    crate::kubectl_run(&["-n", ns, "apply", "-f", "-"], Some(manifest)).ok();
    let name = manifest.lines().find_map(|l| l.strip_prefix("  name: ")).expect("manifest has a name");
    let obj = wait_fleet_ready(ns, name, replicas, Duration::from_secs(180));
    (obj, start.elapsed())
}

/// A server pod as the API shows it.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub ip: String,
    pub ready: bool,
    pub terminating: bool,
    pub restarts: u64,
    /// The server container's id in containerd (without the `containerd://` scheme).
    pub container_id: Option<String>,
}

impl Pod {
    /// Protocol mode on this pod's address, straight over the node's bridge.
    pub fn ws_url(&self) -> String {
        format!("ws://{}:8080/ws", self.ip)
    }

    pub fn http_addr(&self) -> SocketAddr {
        format!("{}:9090", self.ip).parse().expect("pod IP")
    }
}

/// The fleet's server pods (by the selector its status reports), oldest first.
pub fn server_pods(ns: &str, wsc: &Value) -> Vec<Pod> {
    let Some(selector) = wsc["status"]["selector"].as_str().filter(|s| !s.is_empty()) else { return Vec::new() };
    let list = get_json(&["-n", ns, "pods", "-l", selector, "--sort-by=.metadata.creationTimestamp"]);
    list["items"].as_array().into_iter().flatten().map(pod_of).collect()
}

pub fn pod_of(p: &Value) -> Pod {
    let status = &p["status"];
    let container = status["containerStatuses"].as_array().and_then(|c| c.first()).cloned().unwrap_or_default();
    Pod {
        name: p["metadata"]["name"].as_str().unwrap_or_default().to_owned(),
        ip: status["podIP"].as_str().unwrap_or_default().to_owned(),
        ready: status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True"),
        terminating: !p["metadata"]["deletionTimestamp"].is_null(),
        restarts: container["restartCount"].as_u64().unwrap_or_default(),
        container_id: container["containerID"]
            .as_str()
            .and_then(|id| id.strip_prefix("containerd://"))
            .map(str::to_owned),
    }
}

/// The pods of one component (`redis`, `tuning`) of a fleet.
pub fn component_pods(ns: &str, component: &str) -> Vec<Pod> {
    let list = get_json(&["-n", ns, "pods", "-l", &format!("app.kubernetes.io/component={component}")]);
    list["items"].as_array().into_iter().flatten().map(pod_of).collect()
}

/// The tuning namespace of the chart installed on the node (its default for the release
/// namespace `wsfleet-system`).
pub const TUNING_NAMESPACE: &str = "wsfleet-system-tuning";

/// The tuner pods of the clusters in tenant namespace `ns` (they run in [`TUNING_NAMESPACE`]).
pub fn tuning_pods(ns: &str) -> Vec<Pod> {
    let selector = format!("app.kubernetes.io/component=tuning,wsfleet.dev/cluster-namespace={ns}");
    let list = get_json(&["-n", TUNING_NAMESPACE, "pods", "-l", &selector]);
    list["items"].as_array().into_iter().flatten().map(pod_of).collect()
}

/// What a Redis at `addr` answers a `PING` sent without authenticating (one line).
pub fn redis_ping(addr: &str) -> String {
    let addr: SocketAddr = addr.parse().expect("a socket address");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("a read timeout");
    s.write_all(b"PING\r\n").expect("send PING");
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).trim().to_owned()
}

/// `ws://CLUSTER-IP:PORT/ws` of the fleet's client Service.
pub fn service_url(ns: &str, name: &str) -> String {
    let svc = get_json(&["-n", ns, "service", name]);
    format!("ws://{}:{}/ws", svc["spec"]["clusterIP"].as_str().expect("clusterIP"), svc["spec"]["ports"][0]["port"])
}

/// A plain HTTP GET from this machine: (status, body), or why nothing answered.
pub use wsfleet_testkit::http::get as http_get;

/// A gauge or counter from a pod's `/metrics` (the sum over its label sets).
pub fn pod_metric(pod: &Pod, name: &str) -> f64 {
    let (_, body) = http_get(pod.http_addr(), "/metrics").unwrap_or_else(|e| panic!("metrics of {}: {e}", pod.name));
    body.lines()
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs `ctr -n k8s.io ARGS` against the node's containerd.
pub fn ctr(args: &[&str]) -> String {
    let out = Command::new("ctr").arg("--namespace").arg("k8s.io").args(args).output().expect("run ctr");
    assert!(out.status.success(), "ctr {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The host pid of a running container's main process (containerd's task list).
pub fn container_pid(container_id: &str) -> Option<u32> {
    ctr(&["tasks", "ls"]).lines().skip(1).find_map(|l| {
        let mut f = l.split_whitespace();
        (f.next()? == container_id).then(|| f.next()?.parse().ok()).flatten()
    })
}

/// Ids of the containers (pod sandboxes included) containerd holds for namespace `ns`.
pub fn containers_of_namespace(ns: &str) -> Vec<String> {
    ctr(&["containers", "ls", "-q", &format!("labels.\"io.kubernetes.pod.namespace\"=={ns}")])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Where a host setting lives: `net.core.somaxconn` is `/proc/sys/net/core/somaxconn`.
fn sysctl_path(key: &str) -> String {
    format!("/proc/sys/{}", key.replace('.', "/"))
}

/// A host setting under /proc/sys, e.g. `net.core.somaxconn`.
pub fn host_sysctl(key: &str) -> String {
    let path = sysctl_path(key);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}")).trim().to_owned()
}

/// Restores a host setting when dropped, whatever the test did to it.
pub struct RestoreSysctl {
    key: String,
    value: String,
}

impl RestoreSysctl {
    pub fn new(key: &str) -> Self {
        Self { key: key.to_owned(), value: host_sysctl(key) }
    }
}

impl Drop for RestoreSysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(sysctl_path(&self.key), &self.value);
    }
}

/// `kubectl describe` of the fleet, as a user reads it.
pub fn describe(ns: &str, name: &str) -> String {
    kubectl(&["-n", ns, "describe", "websocketcluster", name])
}

/// Merges `patch` into the fleet's spec.
pub fn patch_spec(ns: &str, name: &str, patch: &str) {
    kubectl(&["-n", ns, "patch", "websocketcluster", name, "--type", "merge", "-p", &format!("{{\"spec\":{patch}}}")]);
}
