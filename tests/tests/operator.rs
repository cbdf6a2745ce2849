//! The operator against the real local control plane: a sample manifest becomes a Ready fleet
//! with every child, scaling and image changes flow through, deleted children come back,
//! deletion collects everything, bad manifests (hostile node tuning included) are refused with
//! the field named, the tuner is the operator's whatever the tenant asks, a bad JWT Secret is
//! reported instead of rolled out, the Redis password Secret is made once and kept, the fleet
//! total comes from real servers' heartbeats, and only the Lease holder reconciles.

use std::time::{Duration, Instant};

use serde_json::Value;
use wsfleet_e2e::processes::{Proc, TUNING_NAMESPACE, metric, operator, workspace_binary};
use wsfleet_e2e::{TestNamespace, apply, condition, get_json, kubectl, kubectl_run, wait_until, wsc};
use wsfleet_testkit::{Redis, Server};

const WAIT: Duration = Duration::from_secs(60);

/// `kubectl patch` with a JSON merge patch.
fn patch(ns: &str, kind: &str, name: &str, merge: &str) {
    kubectl(&["-n", ns, "patch", kind, name, "--type", "merge", "-p", merge]);
}

fn install_crd() {
    let crd = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../crds/websocketcluster.yaml")).unwrap();
    wsfleet_e2e::install_crd(&crd, "websocketclusters.wsfleet.dev");
}

fn sample() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../operator/examples/chat.yaml")).unwrap()
}

/// A fresh namespace with its own operator (no leader election) and the sample fleet in it,
/// once Ready. Keep the namespace and the operator alive for the test.
fn ready_sample(label: &str) -> (TestNamespace, Proc, Value) {
    install_crd();
    let ns = TestNamespace::new(label);
    let op = operator(&ns.name, &["--no-leader-election"]);
    kubectl_run(&["-n", &ns.name, "apply", "-f", "-"], Some(&sample())).ok();
    let obj = wait_ready(&ns.name, "chat");
    (ns, op, obj)
}

fn wait_ready(ns: &str, name: &str) -> Value {
    wait_until("the WebSocketCluster to be Ready", WAIT, || {
        let obj = wsc(ns, name);
        match condition(&obj, "Ready") {
            Some(c) if c["status"] == "True" => Ok(obj),
            other => Err(format!("{other:?}")),
        }
    })
}

fn owned_by(child: &Value, owner: &Value) -> bool {
    child["metadata"]["ownerReferences"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r["uid"] == owner["metadata"]["uid"] && r["kind"] == "WebSocketCluster" && r["controller"] == true)
}

#[test]
fn a_sample_manifest_becomes_a_ready_fleet_with_every_child() {
    let (ns, _op, obj) = ready_sample("sample");

    let deploy = get_json(&["-n", &ns.name, "deployment", "chat-server"]);
    assert!(owned_by(&deploy, &obj));
    assert_eq!(deploy["spec"]["replicas"], 3);
    let pod = &deploy["spec"]["template"]["spec"];
    assert_eq!(pod["terminationGracePeriodSeconds"], 5 + 30 + 10);
    assert_eq!(pod["containers"][0]["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"], 5);
    assert_eq!(deploy["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
    let svc = get_json(&["-n", &ns.name, "service", "chat"]);
    assert!(owned_by(&svc, &obj));
    assert_eq!(svc["spec"]["sessionAffinity"], "ClientIP");
    assert!(owned_by(&get_json(&["-n", &ns.name, "poddisruptionbudget", "chat-server"]), &obj));
    assert!(owned_by(&get_json(&["-n", &ns.name, "deployment", "chat-redis"]), &obj));
    assert!(owned_by(&get_json(&["-n", &ns.name, "service", "chat-redis"]), &obj));
    // The tuner: in the operator's tuning namespace, tied to the cluster by labels.
    let tuner = format!("{}-chat", ns.name);
    let ds = get_json(&["-n", TUNING_NAMESPACE, "daemonset", &tuner]);
    assert_eq!(ds["metadata"]["labels"]["wsfleet.dev/cluster-uid"], obj["metadata"]["uid"]);
    let args = ds["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains("net.core.somaxconn=65535"), "{args}");
    let in_tenant_ns = kubectl(&["-n", &ns.name, "get", "daemonsets", "-o", "name"]);
    assert!(in_tenant_ns.trim().is_empty(), "a DaemonSet in the tenant's namespace: {in_tenant_ns}");
    // Redis: a password Secret the cluster owns, given to the servers by reference, and a
    // NetworkPolicy that admits only this cluster's servers.
    assert!(owned_by(&get_json(&["-n", &ns.name, "secret", "chat-redis-auth"]), &obj));
    let env = pod["containers"][0]["env"].as_array().unwrap();
    let password = env.iter().find(|e| e["name"] == "WSFLEET_REDIS_PASSWORD").expect("a Redis password");
    assert_eq!(password["valueFrom"]["secretKeyRef"]["name"], "chat-redis-auth");
    let policy = get_json(&["-n", &ns.name, "networkpolicy", "chat-redis"]);
    assert!(owned_by(&policy, &obj));
    assert_eq!(policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "redis");
    let from = &policy["spec"]["ingress"][0]["from"];
    assert_eq!(from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"], "server");
    assert_eq!(from[0]["podSelector"]["matchLabels"]["app.kubernetes.io/instance"], "chat");
    assert_eq!(from.as_array().unwrap().len(), 1, "the operator runs outside the cluster here: {from}");

    // Status and printer columns, as a user reads them (the tuner's pods may be scheduled after
    // the servers are ready: NodeTuned follows).
    assert_eq!(obj["status"]["readyReplicas"], 3);
    assert_eq!(obj["status"]["observedGeneration"], obj["metadata"]["generation"]);
    wait_until("RedisReady, NodeTuned and not Degraded", WAIT, || {
        let obj = wsc(&ns.name, "chat");
        let seen: Vec<String> = ["RedisReady", "NodeTuned", "Degraded"]
            .iter()
            .map(|t| condition(&obj, t).map(|c| c["status"].to_string()).unwrap_or_default())
            .collect();
        if seen == ["\"True\"", "\"True\"", "\"False\""] { Ok(()) } else { Err(format!("{seen:?}")) }
    });
    let table = kubectl(&["-n", &ns.name, "get", "wsc", "chat"]);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["NAME", "DESIRED", "READY", "CONNECTIONS", "STATUS", "AGE"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..3], ["chat", "3", "3"], "{table}");
    assert!(row.contains(&"AllReplicasReady"), "{table}");
    let described = kubectl(&["-n", &ns.name, "describe", "wsc", "chat"]);
    let tuner_created = format!("DaemonSet {tuner} created");
    for needle in [
        "Conditions:",
        "AllReplicasReady",
        "Events:",
        "Deployment chat-server created",
        "Secret chat-redis-auth created",
        &tuner_created,
    ] {
        assert!(described.contains(needle), "describe lacks {needle:?}:\n{described}");
    }

    // A deleted child comes back.
    for (namespace, kind, name) in
        [(ns.name.as_str(), "service", "chat"), (TUNING_NAMESPACE, "daemonset", tuner.as_str())]
    {
        let old_uid = get_json(&["-n", namespace, kind, name])["metadata"]["uid"].clone();
        kubectl(&["-n", namespace, "delete", kind, name, "--wait=true"]);
        wait_until(&format!("{kind} {name} to be restored"), WAIT, || {
            let run = kubectl_run(&["-n", namespace, "get", kind, name, "-o", "jsonpath={.metadata.uid}"], None);
            if run.success && run.stdout != old_uid.as_str().unwrap_or_default() { Ok(()) } else { Err(run.stderr) }
        });
    }
    // An edited child is put back.
    patch(&ns.name, "service", "chat", r#"{"spec":{"sessionAffinity":"None"}}"#);
    kubectl(&["-n", &ns.name, "annotate", "wsc", "chat", "e2e/poke=1"]);
    wait_until("the Service's affinity to be restored", WAIT, || {
        let a = get_json(&["-n", &ns.name, "service", "chat"])["spec"]["sessionAffinity"].clone();
        if a == "ClientIP" { Ok(()) } else { Err(a.to_string()) }
    });
}

#[test]
fn scaling_reaches_the_deployment_and_the_status() {
    let (ns, _op, _) = ready_sample("scale");

    kubectl(&["-n", &ns.name, "scale", "wsc/chat", "--replicas=5"]);
    for (how, replicas) in [("kubectl scale", 5), ("editing spec.replicas", 2)] {
        if replicas == 2 {
            patch(&ns.name, "wsc", "chat", r#"{"spec":{"replicas":2}}"#);
        }
        wait_until(&format!("{how} to reach the Deployment and the status"), WAIT, || {
            let d = get_json(&["-n", &ns.name, "deployment", "chat-server"]);
            let w = wsc(&ns.name, "chat");
            let seen =
                (d["spec"]["replicas"].clone(), w["status"]["replicas"].clone(), w["status"]["readyReplicas"].clone());
            if seen == (replicas.into(), replicas.into(), replicas.into())
                && condition(&w, "Ready").unwrap()["status"] == "True"
            {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        });
    }
    // The scale subresource reads the same numbers and the selector.
    let scale = get_json(&["-n", &ns.name, "--subresource=scale", "wsc", "chat"]);
    assert_eq!(scale["spec"]["replicas"], 2);
    assert_eq!(
        scale["status"]["selector"],
        "app.kubernetes.io/component=server,app.kubernetes.io/instance=chat,app.kubernetes.io/name=wsfleet"
    );
}

#[test]
fn an_image_change_rolls_the_servers_and_progressing_reports_it() {
    let (ns, _op, before) = ready_sample("roll");
    let progressing = condition(&before, "Progressing").unwrap();
    assert_eq!(progressing["status"], "False");
    let edited_at = Instant::now();
    std::thread::sleep(Duration::from_millis(1100)); // transition times have 1 s resolution
    patch(&ns.name, "wsc", "chat", r#"{"spec":{"image":"ghcr.io/wsfleet/wsfleet-server:0.1.1"}}"#);

    let mut saw_rolling = false;
    let after = wait_until("the rollout to finish", WAIT, || {
        let w = wsc(&ns.name, "chat");
        let p = condition(&w, "Progressing").unwrap();
        saw_rolling |= p["status"] == "True" && p["reason"] == "RollingOut";
        let d = get_json(&["-n", &ns.name, "deployment", "chat-server"]);
        let image = d["spec"]["template"]["spec"]["containers"][0]["image"].clone();
        let done = image == "ghcr.io/wsfleet/wsfleet-server:0.1.1"
            && p["status"] == "False"
            && w["status"]["observedGeneration"] == w["metadata"]["generation"]
            && w["status"]["updatedReplicas"] == 3;
        if done { Ok(w) } else { Err(format!("image {image}, Progressing {p}")) }
    });
    // Progressing went True and back: either seen directly, or its transition time moved.
    let p = condition(&after, "Progressing").unwrap();
    assert!(
        saw_rolling || p["lastTransitionTime"] != progressing["lastTransitionTime"],
        "Progressing never reported the rollout (edited {:?} ago): {p}",
        edited_at.elapsed()
    );
    let events = kubectl(&[
        "-n",
        &ns.name,
        "get",
        "events",
        "--field-selector",
        "involvedObject.kind=WebSocketCluster",
        "-o",
        "jsonpath={.items[*].message}",
    ]);
    assert!(events.contains("Deployment chat-server updated"), "{events}");
}

#[test]
fn deleting_the_cluster_collects_every_child() {
    let (ns, _op, _) = ready_sample("gc");
    let tuner = format!("{}-chat", ns.name);
    get_json(&["-n", TUNING_NAMESPACE, "daemonset", &tuner]);
    kubectl(&["-n", &ns.name, "delete", "wsc", "chat", "--wait=true"]);
    wait_until("garbage collection of every child, and the tuner's removal", WAIT, || {
        let kinds = "deployment,service,poddisruptionbudget,daemonset,networkpolicy,secret";
        let left = kubectl(&["-n", &ns.name, "get", kinds, "-o", "name"]);
        let tuner = kubectl(&["-n", TUNING_NAMESPACE, "get", "daemonset", &tuner, "--ignore-not-found", "-o", "name"]);
        if left.trim().is_empty() && tuner.trim().is_empty() { Ok(()) } else { Err(format!("{left}{tuner}")) }
    });
}

#[test]
fn bad_manifests_are_refused_with_the_field_named() {
    install_crd();
    let ns = TestNamespace::new("bad");
    let manifest = |spec: &str| {
        format!(
            "apiVersion: wsfleet.dev/v1alpha1\nkind: WebSocketCluster\nmetadata:\n  name: bad\n  namespace: {}\nspec:\n{spec}",
            ns.name
        )
    };
    for (spec, field, why) in [
        ("  replicas: -1\n  redis: {managed: {}}\n", "spec.replicas", "greater than or equal to 0"),
        (
            "  redis: {managed: {}, external: {url: 'redis://r:6379'}}\n",
            "spec.redis",
            "exactly one of redis.managed or redis.external",
        ),
        ("  redis: {}\n", "spec.redis", "exactly one of redis.managed or redis.external"),
        (
            "  redis: {managed: {}}\n  nodeTuning: {enabled: true, sysctls: {kernel.panic: '1'}}\n",
            "spec.nodeTuning.sysctls",
            "sysctl keys must be one of",
        ),
        (
            "  redis: {managed: {}}\n  nodeTuning: {sysctls: {net.core.somaxconn: 'lots'}}\n",
            "spec.nodeTuning.sysctls",
            "should match",
        ),
        (
            "  redis: {managed: {}}\n  nodeTuning: {enabled: true, sysctls: {fs.file-max: '1'}}\n",
            "spec.nodeTuning.sysctls",
            "fs.file-max must be a whole number in 1048576..",
        ),
        (
            "  redis: {managed: {}}\n  nodeTuning: {enabled: true, sysctls: {net.netfilter.nf_conntrack_max: '1024'}}\n",
            "spec.nodeTuning.sysctls",
            "net.netfilter.nf_conntrack_max must be a whole number in 131072..",
        ),
        (
            "  redis: {managed: {}}\n  nodeTuning: {enabled: true, sysctls: {net.core.somaxconn: '1000000'}}\n",
            "spec.nodeTuning.sysctls",
            "net.core.somaxconn must be a whole number in 1024..=65535",
        ),
        (
            "  redis: {managed: {}}\n  nodeTuning: {enabled: true, sysctls: {net.ipv4.ip_local_port_range: '40000 30000'}}\n",
            "spec.nodeTuning.sysctls",
            "net.ipv4.ip_local_port_range must be 2 rising whole numbers in 1024..=65535",
        ),
        ("  redis: {managed: {maxMemory: 'lots'}}\n", "spec.redis.managed.maxMemory", "should match"),
        (
            "  redis: {managed: {}}\n  drain: {timeoutSeconds: 0}\n",
            "spec.drain.timeoutSeconds",
            "greater than or equal to 1",
        ),
        (
            "  redis: {managed: {}}\n  drain: {timeoutSeconds: 7200}\n",
            "spec.drain.timeoutSeconds",
            "less than or equal to 3600",
        ),
        ("  redis: {managed: {}}\n  port: 9090\n", "spec.port", "health and metrics port"),
        ("  redis: {managed: {}}\n  port: 80\n", "spec.port", "greater than or equal to 1024"),
        ("  redis: {external: {url: 'rediss://r:6379'}}\n", "spec.redis.external.url", "should match"),
        (
            "  redis: {managed: {}}\n  rollout: {maxSurge: '0', maxUnavailable: '0%'}\n",
            "spec.rollout",
            "cannot both be zero",
        ),
    ] {
        let refusal = apply(&manifest(spec)).refused();
        assert!(refusal.contains(field), "refusal of\n{spec}does not name {field}: {refusal}");
        assert!(refusal.contains(why), "refusal of\n{spec}does not say {why:?}: {refusal}");
    }
    let left = kubectl(&["-n", &ns.name, "get", "wsc", "-o", "name"]);
    assert!(left.trim().is_empty(), "nothing was half-applied: {left}");
}

#[test]
fn the_tuner_is_the_operators_whatever_the_tenant_asks() {
    install_crd();
    let ns = TestNamespace::new("tuner");
    let _op = operator(&ns.name, &["--no-leader-election"]);
    // A tenant that asks for its own image everywhere, tainted nodes included.
    let manifest = format!(
        "apiVersion: wsfleet.dev/v1alpha1\nkind: WebSocketCluster\nmetadata:\n  name: chat\n  namespace: {}\nspec:
  replicas: 1
  image: evil.example/root-shell:latest
  imagePullPolicy: Always
  tolerations: [{{operator: Exists}}]
  redis: {{managed: {{}}}}
  nodeTuning: {{enabled: true, sysctls: {{net.core.somaxconn: '65535'}}}}\n",
        ns.name
    );
    apply(&manifest).ok();
    let tuner = format!("{}-chat", ns.name);
    let ds = wait_until("the tuning DaemonSet", WAIT, || {
        let run = kubectl_run(&["-n", TUNING_NAMESPACE, "get", "daemonset", &tuner, "-o", "json"], None);
        if run.success { Ok(serde_json::from_str::<Value>(&run.stdout).unwrap()) } else { Err(run.stderr) }
    });
    let pod = &ds["spec"]["template"]["spec"];
    let operators_tuner = format!("ghcr.io/wsfleet/wsfleet-server:{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(pod["containers"][0]["image"], operators_tuner.as_str(), "the tenant's image reached the tuner");
    assert_ne!(pod["containers"][0]["imagePullPolicy"], "Always");
    assert!(pod["tolerations"].is_null(), "the servers' tolerations reached the tuner: {}", pod["tolerations"]);
    // The servers do run what the tenant asked for, in the tenant's namespace.
    let server = get_json(&["-n", &ns.name, "deployment", "chat-server"]);
    assert_eq!(server["spec"]["template"]["spec"]["containers"][0]["image"], "evil.example/root-shell:latest");
    // The tuner's own tolerations, and only those, reach it.
    patch(
        &ns.name,
        "wsc",
        "chat",
        r#"{"spec":{"nodeTuning":{"tolerations":[{"key":"dedicated","value":"ws","effect":"NoSchedule"}]}}}"#,
    );
    wait_until("the tuner's tolerations", WAIT, || {
        let t =
            get_json(&["-n", TUNING_NAMESPACE, "daemonset", &tuner])["spec"]["template"]["spec"]["tolerations"].clone();
        if t[0]["key"] == "dedicated" && t.as_array().map(Vec::len) == Some(1) { Ok(()) } else { Err(t.to_string()) }
    });
    // Turning tuning off removes it.
    patch(&ns.name, "wsc", "chat", r#"{"spec":{"nodeTuning":{"enabled":false}}}"#);
    wait_until("the tuner's removal", WAIT, || {
        let left = kubectl(&["-n", TUNING_NAMESPACE, "get", "daemonset", &tuner, "--ignore-not-found", "-o", "name"]);
        if left.trim().is_empty() { Ok(()) } else { Err(left) }
    });
}

#[test]
fn a_missing_or_short_jwt_secret_is_reported_and_nothing_is_rolled_out() {
    install_crd();
    let ns = TestNamespace::new("jwt");
    let _op = operator(&ns.name, &["--no-leader-election"]);
    let manifest = format!(
        "apiVersion: wsfleet.dev/v1alpha1\nkind: WebSocketCluster\nmetadata:\n  name: chat\n  namespace: {}\nspec:
  replicas: 2
  redis: {{managed: {{}}}}
  auth: {{jwtSecretRef: {{name: chat-jwt, key: secret}}}}\n",
        ns.name
    );
    apply(&manifest).ok();
    let refused = |says: &'static str| {
        wait_until(&format!("Ready=False JwtSecretInvalid saying {says:?}"), WAIT, || {
            let c = condition(&wsc(&ns.name, "chat"), "Ready");
            match &c {
                Some(c) if c["reason"] == "JwtSecretInvalid" && c["message"].as_str().unwrap().contains(says) => {
                    Ok(c["message"].as_str().unwrap().to_owned())
                }
                _ => Err(format!("{c:?}")),
            }
        })
    };
    let message = refused("Secret chat-jwt (auth.jwtSecretRef) does not exist");
    eprintln!("missing: {message}");
    let servers = kubectl(&["-n", &ns.name, "get", "deployments", "-o", "name"]);
    assert!(servers.trim().is_empty(), "nothing is rolled out while the secret is bad: {servers}");
    let short = "a-twenty-byte-secret";
    kubectl(&["-n", &ns.name, "create", "secret", "generic", "chat-jwt", &format!("--from-literal=secret={short}")]);
    let message = refused("holds 20 bytes; a JWT secret needs at least 32");
    assert!(!message.contains(short), "the value is never shown: {message}");
    // Events are published beside the reconcile: a refusal's may follow its condition. (A
    // second refusal of the same reason is the first event's series, which keeps its note.)
    let events = wait_until("the refusal's event", WAIT, || {
        let events = kubectl(&["-n", &ns.name, "get", "events", "-o", "jsonpath={.items[*].message}"]);
        if events.contains("Secret chat-jwt") { Ok(events) } else { Err(events) }
    });
    assert!(!events.contains(short), "{events}");
    let w = wsc(&ns.name, "chat");
    assert!(w["status"]["observedGeneration"].is_null(), "{}", w["status"]);
    // Fixed: the fleet rolls out.
    kubectl(&["-n", &ns.name, "delete", "secret", "chat-jwt"]);
    kubectl(&[
        "-n",
        &ns.name,
        "create",
        "secret",
        "generic",
        "chat-jwt",
        &format!("--from-literal=secret={}", "k".repeat(40)),
    ]);
    wait_ready(&ns.name, "chat");
    let env =
        get_json(&["-n", &ns.name, "deployment", "chat-server"])["spec"]["template"]["spec"]["containers"][0]["env"]
            .to_string();
    assert!(env.contains("WSFLEET_JWT_SECRET") && env.contains("chat-jwt"), "{env}");
}

#[test]
fn the_redis_password_secret_is_created_once_and_kept() {
    let (ns, mut op, _) = ready_sample("redis-auth");
    let read = || {
        let s = get_json(&["-n", &ns.name, "secret", "chat-redis-auth"]);
        (s["metadata"]["uid"].clone(), s["metadata"]["resourceVersion"].clone(), s["data"].clone())
    };
    let first = read();
    let password = kubectl(&[
        "-n",
        &ns.name,
        "get",
        "secret",
        "chat-redis-auth",
        "-o",
        "go-template={{.data.password | base64decode}}",
    ]);
    assert_eq!(password.trim().len(), 64, "32 random bytes, hex");
    let conf = kubectl(&[
        "-n",
        &ns.name,
        "get",
        "secret",
        "chat-redis-auth",
        "-o",
        "go-template={{index .data \"redis.conf\" | base64decode}}",
    ]);
    assert_eq!(conf.trim(), format!("requirepass {}", password.trim()));
    // Reconciles (edits, resyncs every 2 s, a new operator process) leave it as it is.
    kubectl(&["-n", &ns.name, "scale", "wsc/chat", "--replicas=4"]);
    kubectl(&["-n", &ns.name, "annotate", "wsc", "chat", "e2e/poke=1"]);
    std::thread::sleep(Duration::from_secs(5));
    op.kill();
    let _op = operator(&ns.name, &["--no-leader-election"]);
    kubectl(&["-n", &ns.name, "scale", "wsc/chat", "--replicas=2"]);
    wait_until("the new operator to act", WAIT, || {
        let r = get_json(&["-n", &ns.name, "deployment", "chat-server"])["spec"]["replicas"].clone();
        if r == 2 { Ok(()) } else { Err(r.to_string()) }
    });
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(read(), first, "the Secret changed");
    // The password is in no status and no event.
    let status = wsc(&ns.name, "chat").to_string();
    let events = kubectl(&["-n", &ns.name, "get", "events", "-o", "json"]);
    for (what, text) in [("status", &status), ("events", &events)] {
        assert!(!text.contains(password.trim()), "the password is in the {what}");
    }
}

#[test]
fn the_fleet_total_comes_from_the_servers_heartbeats() {
    install_crd();
    let ns = TestNamespace::new("conns");
    // A real Redis and a real server on loopback, keyed like the fleet's pods would be.
    let redis = Redis::start();
    let url = redis.url();
    let args = ["--redis-url", &url, "--redis-prefix", &format!("{}.live", ns.name), "--pod-name", "live-server-0"];
    let server = Server::spawn(&workspace_binary("wsfleet-server"), &args.map(String::from), "info", "server");
    let ws = server.ws;
    let mut clients = Vec::new();
    for _ in 0..3 {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(ws).unwrap();
        s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").unwrap();
        let mut head = [0u8; 12];
        s.read_exact(&mut head).unwrap();
        assert_eq!(&head, b"HTTP/1.1 101");
        clients.push(s);
    }

    let _op = operator(&ns.name, &["--no-leader-election"]);
    let manifest = format!(
        "apiVersion: wsfleet.dev/v1alpha1\nkind: WebSocketCluster\nmetadata:\n  name: live\n  namespace: {}\nspec:\n  replicas: 1\n  redis:\n    external:\n      url: {url}\n",
        ns.name
    );
    apply(&manifest).ok();
    let obj = wait_until("the fleet total in the status", WAIT, || {
        let w = wsc(&ns.name, "live");
        if w["status"]["connections"] == 3 { Ok(w) } else { Err(w["status"].to_string()) }
    });
    assert_eq!(condition(&obj, "RedisReady").unwrap()["status"], "True");
    let table = kubectl(&["-n", &ns.name, "get", "wsc", "live"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[3], "3", "Connections column: {table}");
    drop(clients);
}

#[test]
fn only_the_leader_reconciles_and_a_standby_takes_over() {
    install_crd();
    let ns = TestNamespace::new("leader");
    let lease = ["--lease-duration", "6", "--lease-name", "wsfleet-e2e"];
    let mut ops = [operator(&ns.name, &lease), operator(&ns.name, &lease)];
    let http = [ops[0].addr("http"), ops[1].addr("http")];
    let leader = wait_until("exactly one leader", WAIT, || {
        let l = [metric(http[0], "wsfleet_operator_leader"), metric(http[1], "wsfleet_operator_leader")];
        match l {
            [1.0, 0.0] => Ok(0),
            [0.0, 1.0] => Ok(1),
            _ => Err(format!("{l:?}")),
        }
    });
    let standby = 1 - leader;
    kubectl_run(&["-n", &ns.name, "apply", "-f", "-"], Some(&sample())).ok();
    wait_ready(&ns.name, "chat");
    assert!(metric(http[leader], "wsfleet_operator_reconciles_total") >= 1.0, "the leader reconciled");
    assert_eq!(metric(http[standby], "wsfleet_operator_reconciles_total"), 0.0, "the standby reconciled");

    let killed = Instant::now();
    ops[leader].kill();
    wait_until("the standby to take over", Duration::from_secs(20), || {
        if metric(http[standby], "wsfleet_operator_leader") == 1.0 { Ok(()) } else { Err("standing by".into()) }
    });
    let took = killed.elapsed();
    eprintln!("standby took over {took:?} after the leader was killed (lease 6 s)");
    assert!(took <= Duration::from_secs(6 + 4), "takeover took {took:?}");
    kubectl(&["-n", &ns.name, "scale", "wsc/chat", "--replicas=4"]);
    wait_until("the new leader to reconcile", WAIT, || {
        let r = get_json(&["-n", &ns.name, "deployment", "chat-server"])["spec"]["replicas"].clone();
        if r == 4 { Ok(()) } else { Err(r.to_string()) }
    });
}
