//! End to end on the real node (`make test-node`): the operator, installed by the chart, runs as
//! a pod; the fleets it makes are containers that pass real probes, hold real WebSocket clients
//! from this machine, drain on scale-in and rollouts, tune the host's kernel, and recover from a
//! killed process and a lost Redis, while clients that resume with `since` lose nothing.
//!
//! Each test has its own namespace and fleet. Figures a person would want (time to Ready, a
//! rollout's duration, where clients went) are printed: `make test-node` hides them, so run
//! `cargo test -p wsfleet-e2e --features node-profile --test node -- --nocapture` to see them.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::watch;
use wsfleet_e2e::clients::{self, Clients, PublisherLog, Received, SubscriberLog};
use wsfleet_e2e::node::*;
use wsfleet_e2e::{TestNamespace, condition, get_json, kubectl, wait_until, wsc};

const WAIT: Duration = Duration::from_secs(180);

/// Clients on a fleet while something happens to it: subscribers start on the given pods (then
/// come back through the Service), one publisher goes through the Service.
struct Traffic {
    clients: Clients,
    service: String,
    channel: String,
    subs: Vec<tokio::task::JoinHandle<SubscriberLog>>,
    until: watch::Sender<clients::Until>,
    stop: watch::Sender<bool>,
    publisher: Option<tokio::task::JoinHandle<PublisherLog>>,
}

/// What the clients saw, and the channel's order as the bus holds it.
struct Seen {
    subs: Vec<SubscriberLog>,
    publisher: PublisherLog,
    history: Vec<Received>,
}

impl Traffic {
    /// `per_pod` subscribers on each of `pods`, all subscribed before this returns.
    fn start(service: String, pods: &[Pod], per_pod: usize) -> Self {
        eprintln!("[traffic] {} subscribers on {} pods, then through {service}", per_pod * pods.len(), pods.len());
        let clients = Clients::new();
        let (until, until_rx) = watch::channel(None);
        let (stop, _) = watch::channel(false);
        let channel = "news".to_owned();
        let mut subs = Vec::new();
        let mut ready = Vec::new();
        for pod in pods {
            for _ in 0..per_pod {
                let (tx, rx) = watch::channel(false);
                ready.push(rx);
                subs.push(clients.rt.spawn(clients::resilient_subscriber(
                    pod.ws_url(),
                    service.clone(),
                    channel.clone(),
                    tx,
                    until_rx.clone(),
                    SUBSCRIBER_LIMIT,
                )));
            }
        }
        clients.run(async {
            for mut rx in ready {
                tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|r| *r))
                    .await
                    .expect("every subscriber subscribed within 60 s")
                    .expect("subscriber alive");
            }
        });
        Self { clients, service, channel, subs, until, stop, publisher: None }
    }

    /// Starts the publisher: one message every `interval`.
    fn publish_every(&mut self, interval: Duration) {
        let task = clients::publisher(self.service.clone(), self.channel.clone(), interval, self.stop.subscribe());
        self.publisher = Some(self.clients.rt.spawn(task));
    }

    /// The channel's head (epoch, offset) as a fresh client through the Service sees it.
    fn head(&self) -> (String, u64) {
        self.clients.run(within("a subscribe through the Service", Duration::from_secs(60), async {
            let (_ws, reply) = clients::subscribe_fresh(&self.service, &self.channel, None).await;
            let epoch = reply["epoch"].as_str().unwrap_or_else(|| panic!("an epoch in {reply}"));
            (epoch.to_owned(), reply["offset"].as_u64().unwrap_or_else(|| panic!("an offset in {reply}")))
        }))
    }

    /// Stops the publisher, tells the subscribers where the channel ends, and collects it all.
    /// Every step is bounded: a client that hangs fails the test with the step it hung in.
    fn finish(mut self) -> Seen {
        let _ = self.stop.send(true);
        let publisher = self.publisher.take().expect("publisher started");
        let publisher = self.clients.run(within("the publisher to stop", Duration::from_secs(30), publisher));
        let publisher = publisher.expect("publisher task");
        eprintln!("[traffic] publisher stopped after {} publishes", publisher.sent.len());
        // Where every subscriber must get to: the channel's position, read by fresh clients
        // until it stays put (the last publishes may still be on their way to the bus).
        let mut last = self.head();
        let (epoch, end) = wait_until("the channel's position to settle", Duration::from_secs(60), || {
            let now = self.head();
            if now == last { Ok(now) } else { Err(format!("{:?}", std::mem::replace(&mut last, now))) }
        });
        eprintln!("[traffic] the channel ends at offset {end} of epoch {epoch}");
        let _ = self.until.send(Some((epoch.clone(), end)));
        let subs = self.clients.run(async {
            let mut out = Vec::new();
            for (i, s) in self.subs.into_iter().enumerate() {
                // A subscriber gives up by itself after its limit; this bound is the backstop.
                let what = format!("subscriber {i} to reach the channel's end");
                out.push(within(&what, SUBSCRIBER_LIMIT + Duration::from_secs(60), s).await.expect("subscriber task"));
            }
            out
        });
        eprintln!("[traffic] every subscriber stopped; reading the channel back");
        let history = self.clients.run(within(
            "the channel's read-back",
            Duration::from_secs(60),
            clients::channel_history(&self.service, &self.channel, &epoch),
        ));
        Seen { subs, publisher, history }
    }
}

/// How long a subscriber keeps going before it gives up and returns what it has.
const SUBSCRIBER_LIMIT: Duration = Duration::from_secs(300);

/// Awaits `f`, failing the test with `what` if it takes longer than `limit`.
async fn within<F: std::future::Future>(what: &str, limit: Duration, f: F) -> F::Output {
    match tokio::time::timeout(limit, f).await {
        Ok(out) => out,
        Err(_) => panic!("waited {limit:?} for {what}"),
    }
}

impl Seen {
    /// The zero-loss check: the bus's order is offsets 1..=N of one epoch; every subscriber got
    /// exactly that sequence (nothing lost, nothing twice, same order); and it holds the
    /// publisher's messages in the order sent, missing at most one per connection the
    /// publisher lost (a publish in flight when a server closed it has an unknown outcome).
    fn assert_no_loss(&self) {
        let offsets: Vec<u64> = self.history.iter().map(|m| m.offset).collect();
        assert_eq!(offsets, (1..=self.history.len() as u64).collect::<Vec<_>>(), "the bus's order has no hole");
        assert!(self.history.len() > 20, "the publisher published: {} messages", self.history.len());
        for (i, s) in self.subs.iter().enumerate() {
            if s.messages != self.history {
                let first_difference = s.messages.iter().zip(&self.history).position(|(a, b)| a != b);
                panic!(
                    "subscriber {i} did not get the channel exactly once, in order: {} messages against {}, first \
                     difference at index {first_difference:?}, sessions {:?}",
                    s.messages.len(),
                    self.history.len(),
                    s.sessions
                );
            }
        }
        let ns: Vec<u64> = self.history.iter().map(|m| m.data["n"].as_u64().expect("n")).collect();
        assert!(ns.windows(2).all(|w| w[0] < w[1]), "the publisher's order is kept");
        assert_eq!(self.publisher.refused, 0, "no publish was refused");
        let missing: Vec<u64> = self.publisher.sent.iter().copied().filter(|n| ns.binary_search(n).is_err()).collect();
        assert!(
            missing.iter().all(|n| self.publisher.unknown.contains(n)),
            "publishes lost on a healthy connection: {missing:?} (outcome unknown only for {:?})",
            self.publisher.unknown
        );
    }

    fn closes(&self, code: u16) -> usize {
        self.subs.iter().map(|s| s.closes(code)).sum()
    }

    /// Every resume the subscribers made that the server answered was a full recovery (a
    /// subscribe cut off before its answer has none, and the client simply tries again).
    fn assert_every_resume_recovered(&self) {
        let answered: Vec<&clients::Session> =
            self.subs.iter().flat_map(|s| &s.sessions).filter(|s| s.recovered.is_some()).collect();
        for session in &answered {
            assert_eq!(session.recovered, Some(true), "a resume that did not recover: {session:?}");
        }
        let reconnected = self.subs.iter().filter(|s| s.sessions.len() > 1).count();
        assert!(answered.len() >= reconnected, "every client that reconnected resumed");
    }

    /// Subscribers that started on one of `pods` and whose first connection that pod closed with
    /// `code`.
    fn first_closed_by(&self, pods: &[&Pod], code: u16) -> usize {
        let want = format!("close {code}");
        self.subs
            .iter()
            .filter_map(|s| s.sessions.first())
            .filter(|first| pods.iter().any(|p| first.url == p.ws_url()) && first.ended.as_deref() == Some(&want))
            .count()
    }
}

/// How many endpoints of the Service `name` are ready.
fn ready_endpoints(ns: &str, name: &str) -> usize {
    let slices = get_json(&["-n", ns, "endpointslices", "-l", &format!("kubernetes.io/service-name={name}")]);
    slices["items"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
        .filter(|e| e["conditions"]["ready"] == true)
        .count()
}

fn print_figure(what: &str, value: impl std::fmt::Display) {
    println!("[figure] {what}: {value}");
}

#[test]
fn the_charts_operator_runs_a_fleet_whose_pods_serve_and_count_real_clients() {
    // The operator is the chart's: a Deployment in a namespace that enforces `restricted`.
    let system = get_json(&["namespace", "wsfleet-system"]);
    assert_eq!(system["metadata"]["labels"]["pod-security.kubernetes.io/enforce"], "restricted");
    let operator = get_json(&["-n", "wsfleet-system", "deployment", "wsfleet"]);
    assert_eq!(operator["status"]["readyReplicas"], operator["spec"]["replicas"], "{}", operator["status"]);
    let image = operator["spec"]["template"]["spec"]["containers"][0]["image"].as_str().unwrap();
    assert_eq!(image, format!("ghcr.io/wsfleet/wsfleet-operator:{}", env!("CARGO_PKG_VERSION")));

    let ns = TestNamespace::new("node-serve");
    // The tenant's namespace enforces `restricted`: the server and Redis pods pass it as built.
    kubectl(&["label", "namespace", &ns.name, "pod-security.kubernetes.io/enforce=restricted"]);
    let (obj, took) = apply_fleet(&ns.name, &fleet_manifest("chat", 3, ""), 3);
    print_figure("kubectl apply to Ready (3 server pods + Redis)", format!("{:.1} s", took.as_secs_f64()));

    // Redis and the servers are Ready by their real probes: Redis answers `redis-cli ping` in its
    // container, and each server's /readyz answers this machine over the bridge.
    let redis = component_pods(&ns.name, "redis");
    assert!(redis.len() == 1 && redis[0].ready, "{redis:?}");
    // Its readiness probe authenticates; a client without the password is refused.
    let answer = redis_ping(&format!("{}:6379", redis[0].ip));
    assert!(answer.starts_with("-NOAUTH"), "Redis answered an unauthenticated PING with {answer:?}");
    let pods = server_pods(&ns.name, &obj);
    for pod in &pods {
        assert_eq!(http_get(pod.http_addr(), "/readyz").unwrap().0, 200, "{pod:?}");
        assert!(container_pid(pod.container_id.as_deref().unwrap()).is_some(), "a running process for {}", pod.name);
    }

    // Two subscribers on each pod and three through the Service, one publisher on each pod:
    // the three publishers' messages reach every subscriber, on every pod, in one order.
    let clients = Clients::new();
    let service = service_url(&ns.name, "chat");
    let (subs, pubs) = clients.run(async {
        let mut subs = Vec::new();
        let urls = pods.iter().flat_map(|p| [p.ws_url(), p.ws_url()]).chain([
            service.clone(),
            service.clone(),
            service.clone(),
        ]);
        for url in urls {
            subs.push(clients::subscribe_fresh(&url, "room", None).await.0);
        }
        let mut pubs = Vec::new();
        for (p, pod) in pods.iter().enumerate() {
            let mut ws = clients::connect(&pod.ws_url()).await.unwrap();
            for n in 0..20 {
                clients::send(&mut ws, json!({"op": "publish", "channel": "room", "data": {"pod": p, "n": n}}))
                    .await
                    .unwrap();
            }
            pubs.push(ws);
        }
        let mut seen = Vec::new();
        for ws in &mut subs {
            let mut got = Vec::new();
            for _ in 0..60 {
                let m = clients::next_json(ws).await.unwrap();
                got.push((m["offset"].as_u64().unwrap(), m["data"].clone()));
            }
            seen.push(got);
        }
        for got in &seen {
            assert_eq!(got, &seen[0], "every subscriber, on every pod, sees one order");
        }
        assert_eq!(seen[0].iter().map(|(o, _)| *o).collect::<Vec<_>>(), (1..=60).collect::<Vec<_>>());
        (subs, pubs)
    });
    let open = subs.len() + pubs.len();

    // The fleet's total comes from the servers' heartbeats in the managed Redis, which the
    // operator (a pod) reaches through the cluster's DNS and Service.
    wait_until("the Connections column to count the clients", Duration::from_secs(90), || {
        let c = wsc(&ns.name, "chat")["status"]["connections"].clone();
        if c == open { Ok(()) } else { Err(format!("connections {c}, want {open}")) }
    });
    let table = kubectl(&["-n", &ns.name, "get", "wsc", "chat"]);
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(&row[..5], ["chat", "3", "3", &open.to_string(), "AllReplicasReady"], "{table}");
    let described = describe(&ns.name, "chat");
    for needle in ["ManagedRedisAvailable", "AllReplicasReady", "Connections:"] {
        assert!(described.contains(needle), "describe lacks {needle}:\n{described}");
    }
    drop((subs, pubs));

    // Deleting the cluster leaves no pod, container or process behind.
    let mut pids: Vec<u32> = pods.iter().filter_map(|p| container_pid(p.container_id.as_deref()?)).collect();
    pids.extend(redis.iter().filter_map(|p| container_pid(p.container_id.as_deref()?)));
    assert_eq!(pids.len(), 4, "a process for each server and for Redis");
    kubectl(&["-n", &ns.name, "delete", "wsc", "chat", "--wait=true", "--timeout=60s"]);
    wait_until("every pod, container and process of the fleet to be gone", Duration::from_secs(90), || {
        let pods = kubectl(&["-n", &ns.name, "get", "pods", "-o", "name"]);
        let containers = containers_of_namespace(&ns.name);
        let alive: Vec<u32> =
            pids.iter().copied().filter(|p| std::path::Path::new(&format!("/proc/{p}")).exists()).collect();
        if pods.trim().is_empty() && containers.is_empty() && alive.is_empty() {
            Ok(())
        } else {
            Err(format!("pods {pods:?}, containers {containers:?}, processes {alive:?}"))
        }
    });
}

#[test]
fn scaling_out_then_in_drains_the_removed_pods_and_resumed_clients_lose_nothing() {
    let ns = TestNamespace::new("node-scale");
    apply_fleet(&ns.name, &fleet_manifest("chat", 2, ""), 2);
    let t = Instant::now();
    kubectl(&["-n", &ns.name, "scale", "wsc/chat", "--replicas=5"]);
    let obj = wait_fleet_ready(&ns.name, "chat", 5, WAIT);
    print_figure("scale 2 -> 5 to Ready", format!("{:.1} s", t.elapsed().as_secs_f64()));
    let pods = server_pods(&ns.name, &obj);
    assert_eq!(pods.len(), 5);

    let mut traffic = Traffic::start(service_url(&ns.name, "chat"), &pods, 3);
    traffic.publish_every(Duration::from_millis(50));
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    kubectl(&["-n", &ns.name, "scale", "wsc/chat", "--replicas=2"]);
    let obj = wait_fleet_ready(&ns.name, "chat", 2, WAIT);
    print_figure("scale 5 -> 2 until the removed pods are gone", format!("{:.1} s", t.elapsed().as_secs_f64()));
    std::thread::sleep(Duration::from_secs(1));
    let seen = traffic.finish();

    seen.assert_no_loss();
    seen.assert_every_resume_recovered();
    // The three removed pods closed their nine subscribers with 1012 (going away, come back).
    let survivors: Vec<String> = server_pods(&ns.name, &obj).into_iter().map(|p| p.name).collect();
    let removed: Vec<&Pod> = pods.iter().filter(|p| !survivors.contains(&p.name)).collect();
    assert_eq!(removed.len(), 3);
    assert_eq!(seen.first_closed_by(&removed, 1012), 9, "each removed pod closed its three clients with 1012");
    print_figure("messages each subscriber got (scale-in)", seen.history.len());
}

#[test]
fn a_rolling_update_with_1000_clients_drains_every_old_pod_and_loses_nothing() {
    const CLIENTS_PER_POD: usize = 334;
    rlimit::increase_nofile_limit(20_000).expect("raise the open-file limit");
    let ns = TestNamespace::new("node-roll");
    let (obj, _) = apply_fleet(&ns.name, &fleet_manifest("chat", 3, ""), 3);
    let old = server_pods(&ns.name, &obj);
    let mut traffic = Traffic::start(service_url(&ns.name, "chat"), &old, CLIENTS_PER_POD);
    // 10 a second: the whole channel (read back for the check) must stay within what one resume
    // may replay (three quarters of the server's 1,024-frame client queue) for a slow rollout too.
    traffic.publish_every(Duration::from_millis(100));
    std::thread::sleep(Duration::from_secs(1));

    // A change of the pod template (an annotation) rolls every pod.
    let t = Instant::now();
    patch_spec(&ns.name, "chat", r#"{"podAnnotations":{"example.com/rollout":"2"}}"#);
    wait_until("Progressing=True (RollingOut)", Duration::from_secs(60), || {
        let c = condition(&wsc(&ns.name, "chat"), "Progressing");
        match &c {
            Some(c) if c["status"] == "True" && c["reason"] == "RollingOut" => Ok(()),
            _ => Err(format!("{c:?}")),
        }
    });
    let obj = wait_fleet_ready(&ns.name, "chat", 3, WAIT);
    let rollout = t.elapsed();
    assert_eq!(condition(&obj, "Progressing").unwrap()["reason"], "RolloutComplete");
    std::thread::sleep(Duration::from_secs(1));
    let new = server_pods(&ns.name, &obj);
    assert!(new.iter().all(|p| !old.iter().any(|o| o.name == p.name)), "every pod replaced");
    // Where the clients went: the new pods' own connection gauges, while the clients are on.
    let by_pod = wait_until("every client on the new pods", Duration::from_secs(30), || {
        let by_pod: BTreeMap<String, f64> =
            new.iter().map(|p| (p.name.clone(), pod_metric(p, "wsfleet_connections"))).collect();
        let total = by_pod.values().sum::<f64>() as usize;
        if total == 3 * CLIENTS_PER_POD + 1 { Ok(by_pod) } else { Err(format!("{by_pod:?}")) }
    });
    let seen = traffic.finish();

    seen.assert_no_loss();
    seen.assert_every_resume_recovered();
    let old_pods: Vec<&Pod> = old.iter().collect();
    assert_eq!(
        seen.first_closed_by(&old_pods, 1012),
        3 * CLIENTS_PER_POD,
        "every client of an old pod was closed with 1012"
    );
    print_figure(
        "3-pod rolling update with 1,002 subscribers + 1 publisher",
        format!("{:.1} s", rollout.as_secs_f64()),
    );
    print_figure("1012 closes", seen.closes(1012));
    let reconnects: usize = seen.subs.iter().map(|s| s.sessions.len() - 1).sum();
    print_figure("subscriber reconnects (each resumed with since)", reconnects);
    print_figure("connections per new pod after the rollout", format!("{by_pod:?}"));
    print_figure("messages each subscriber got", seen.history.len());
}

#[test]
fn node_tuning_writes_the_hosts_sysctls_and_reports_node_tuned() {
    let _restore = RestoreSysctl::new("net.core.somaxconn");
    let before: u64 = host_sysctl("net.core.somaxconn").parse().unwrap();
    // Within the bounds the API admits (1024..=65535).
    let want = if before >= 65_535 { 65_534 } else { (before + 1).max(1024) };
    let ns = TestNamespace::new("node-tune");
    // Node tuning no longer needs the tenant's namespace to allow privileged pods: the tuner runs
    // in the operator's tuning namespace.
    kubectl(&["label", "namespace", &ns.name, "pod-security.kubernetes.io/enforce=restricted"]);
    let extra = format!("  nodeTuning:\n    enabled: true\n    sysctls:\n      net.core.somaxconn: \"{want}\"\n");
    apply_fleet(&ns.name, &fleet_manifest("chat", 1, &extra), 1);
    wait_until("NodeTuned=True", WAIT, || {
        let c = condition(&wsc(&ns.name, "chat"), "NodeTuned");
        match &c {
            Some(c) if c["status"] == "True" && c["reason"] == "NodesTuned" => Ok(()),
            _ => Err(format!("{c:?}")),
        }
    });
    // The DaemonSet's pod wrote the host's own setting, read back here on the host.
    assert_eq!(host_sysctl("net.core.somaxconn"), want.to_string());
    let tuner = tuning_pods(&ns.name);
    assert_eq!(tuner.len(), 1, "{tuner:?}");
    assert!(component_pods(&ns.name, "tuning").is_empty(), "a tuner in the tenant's namespace");
    let logs = kubectl(&["-n", TUNING_NAMESPACE, "logs", &tuner[0].name]);
    assert!(logs.contains("net.core.somaxconn"), "the tuner logs what it wrote:\n{logs}");
}

#[test]
fn a_killed_server_process_is_restarted_and_its_clients_resume_without_loss() {
    let ns = TestNamespace::new("node-kill");
    let (obj, _) = apply_fleet(&ns.name, &fleet_manifest("chat", 2, ""), 2);
    let pods = server_pods(&ns.name, &obj);
    let victim = pods[0].clone();
    let mut traffic = Traffic::start(service_url(&ns.name, "chat"), &pods, 4);
    traffic.publish_every(Duration::from_millis(50));
    std::thread::sleep(Duration::from_secs(1));

    let pid = container_pid(victim.container_id.as_deref().unwrap()).expect("the server's process");
    let status = std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    assert!(status.success());
    let restarted = wait_until("the killed server to be restarted and Ready", WAIT, || {
        let pods = server_pods(&ns.name, &wsc(&ns.name, "chat"));
        match pods.iter().find(|p| p.name == victim.name) {
            Some(p) if p.restarts >= 1 && p.ready => Ok(p.clone()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_ne!(container_pid(restarted.container_id.as_deref().unwrap()), Some(pid), "a new process");
    std::thread::sleep(Duration::from_secs(1));
    let seen = traffic.finish();
    seen.assert_no_loss();
    seen.assert_every_resume_recovered();
    let cut = seen.subs.iter().filter(|s| s.sessions.len() > 1).count();
    assert!(cut >= 4, "the killed server's clients reconnected: {cut}");
}

#[test]
fn a_deleted_redis_pod_keeps_every_server_in_the_service_and_recovers_as_a_new_epoch() {
    let ns = TestNamespace::new("node-redis");
    let (obj, _) = apply_fleet(&ns.name, &fleet_manifest("chat", 2, ""), 2);
    let pods = server_pods(&ns.name, &obj);
    let mut traffic = Traffic::start(service_url(&ns.name, "chat"), &pods, 2);
    traffic.publish_every(Duration::from_millis(50));
    // The old epoch holds messages before Redis goes: the test is about what happens to them.
    let started = Instant::now();
    let (old_epoch, _) = wait_until("10 messages in the first epoch", WAIT, || {
        let (epoch, offset) = traffic.head();
        if offset >= 10 { Ok((epoch, offset)) } else { Err(format!("head {epoch}/{offset}")) }
    });
    eprintln!("[node-redis] 10 messages published in {:?}", started.elapsed());

    let redis = component_pods(&ns.name, "redis");
    eprintln!("[node-redis] deleting {}", redis[0].name);
    kubectl(&["-n", &ns.name, "delete", "pod", &redis[0].name, "--wait=false"]);
    // The outage is the whole fleet's: every server stays ready, so the Service keeps its
    // endpoints and new clients still reach a server, and the fleet's status says the bus is down.
    let mut saw_bus_down = false;
    let mut saw_reason = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && !(saw_bus_down && saw_reason) {
        for p in &pods {
            let (status, body) = http_get(p.http_addr(), "/readyz").unwrap_or_else(|e| panic!("{}: {e}", p.name));
            assert_eq!(status, 200, "{} stays ready while the bus is down for everyone: {body}", p.name);
            saw_bus_down |= body.contains("degraded");
        }
        assert_eq!(ready_endpoints(&ns.name, "chat"), pods.len(), "the Service keeps every server");
        let d = describe(&ns.name, "chat");
        saw_reason |= d.contains("ManagedRedisUnavailable") && d.contains("BusUnavailable");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(saw_bus_down, "a server's /readyz said the bus was down for the fleet");
    assert!(saw_reason, "kubectl describe wsc said the bus was down and the fleet degraded");
    eprintln!("[node-redis] the outage was seen; waiting for the fleet to be Ready again");
    wait_fleet_ready(&ns.name, "chat", 2, WAIT);
    // The publisher's messages fill the new epoch.
    let (epoch, offset) = wait_until("20 messages in a new epoch, read through the Service", WAIT, || {
        let (epoch, offset) = traffic.head();
        if epoch != old_epoch && offset >= 20 { Ok((epoch, offset)) } else { Err(format!("head {epoch}/{offset}")) }
    });
    eprintln!("[node-redis] the new epoch {epoch} is at offset {offset}; collecting what the clients saw");
    let seen = traffic.finish();

    // Redis came back empty: a new epoch. No subscriber saw a silent gap: within each epoch
    // its offsets rise by one, and the new epoch is delivered from its first message.
    let new_epoch = &seen.history[0].epoch;
    for s in &seen.subs {
        let epochs: Vec<&str> = s.messages.iter().map(|m| m.epoch.as_str()).collect();
        let switch = epochs.iter().position(|e| e == new_epoch).expect("the new epoch reached every subscriber");
        assert!(
            epochs[..switch].iter().all(|e| *e == epochs[0]) && epochs[0] != new_epoch,
            "one old epoch, then the new"
        );
        let (old, new) = s.messages.split_at(switch);
        let old_offsets: Vec<u64> = old.iter().map(|m| m.offset).collect();
        assert_eq!(old_offsets, (1..=old.len() as u64).collect::<Vec<_>>(), "no gap in the old epoch");
        assert_eq!(new, &seen.history[..], "the new epoch from its first message, exactly once");
    }
}
