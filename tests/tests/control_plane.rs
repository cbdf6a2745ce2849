//! The local control plane works: the API server is ready, the fake nodes are Ready, and a
//! Deployment goes all the way to ready pods (controller-manager, scheduler and kwok at work).

use std::time::Duration;

use wsfleet_e2e::{TestNamespace, apply, get_json, is_loopback_server, kubectl, wait_until};

#[test]
fn api_server_is_ready() {
    assert_eq!(kubectl(&["get", "--raw", "/readyz"]).trim(), "ok");
    let server = kubectl(&["config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}"]);
    assert!(is_loopback_server(server.trim()), "API server {server:?} is not on loopback");
}

#[test]
fn fake_nodes_are_ready() {
    let nodes = get_json(&["nodes"]);
    let items = nodes["items"].as_array().expect("node list");
    let expected = std::env::var("WSFLEET_CLUSTER_NODES").ok().and_then(|n| n.parse().ok()).unwrap_or(3);
    assert_eq!(items.len(), expected, "fake nodes (WSFLEET_CLUSTER_NODES, default 3)");
    for node in items {
        let name = node["metadata"]["name"].as_str().unwrap_or("?");
        assert_eq!(node["metadata"]["annotations"]["kwok.x-k8s.io/node"], "fake", "node {name} is a kwok node");
        let ready = node["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        assert!(ready, "node {name} is not Ready: {}", node["status"]["conditions"]);
        for address in node["status"]["addresses"].as_array().into_iter().flatten() {
            if address["type"] == "InternalIP" {
                let ip: std::net::IpAddr = address["address"].as_str().unwrap_or("").parse().expect("node IP");
                assert!(ip.is_loopback(), "node {name} has a non-loopback InternalIP {ip}");
            }
        }
    }
}

#[test]
fn deployment_reaches_three_ready_replicas() {
    let ns = TestNamespace::new("deploy");
    let manifest = format!(
        r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: {ns}
spec:
  replicas: 3
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      containers:
      - name: web
        image: registry.invalid/web:1
"#,
        ns = ns.name
    );
    apply(&manifest).ok();

    wait_until("3 ready replicas", Duration::from_secs(90), || {
        let d = get_json(&["-n", &ns.name, "deployment", "web"]);
        let ready = d["status"]["readyReplicas"].as_u64().unwrap_or(0);
        if ready == 3 { Ok(()) } else { Err(format!("status {}", d["status"])) }
    });

    let pods = get_json(&["-n", &ns.name, "pods", "-l", "app=web"]);
    let pods = pods["items"].as_array().expect("pod list");
    assert_eq!(pods.len(), 3);
    for pod in pods {
        let name = pod["metadata"]["name"].as_str().unwrap_or("?");
        assert!(pod["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty()), "pod {name} was not scheduled");
        assert_eq!(pod["status"]["phase"], "Running", "pod {name}");
    }
}
