//! Helpers for the Helm chart tests (`tests/chart.rs`): run `helm`, render `charts/wsfleet`, run
//! the operator binary the way the chart's Deployment runs it but with a ServiceAccount token
//! from the local control plane, and drive a WebSocketCluster through a fixed scenario.
//!
//! The scenario is what a user of a fleet relies on; every step needs some of the operator's
//! permissions: the sample becomes Ready, events are recorded, a JWT Secret is checked and
//! taken, two scales are acted on (the
//! second repeats an event, which is counted), an edit of each kind of child is repaired, optional
//! children are removed when the spec drops them, and the leader keeps renewing its Lease.
//! Several runs (one operator each) share one polling loop, so that many can run side by side on
//! two cores: one `kubectl get` per tick serves them all.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::processes::workspace_binary;
use crate::{is_loopback_server, kubectl, kubectl_run, unique_name};

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The chart under test.
pub fn chart_dir() -> PathBuf {
    repo_root().join("charts").join("wsfleet")
}

/// The helm binary: `$HELM`, else the one `tests/cluster/build-helm.sh` built into the cache (the
/// script builds it when it is missing, which takes minutes; `make test-cluster` runs it first).
fn helm_program() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        if let Some(helm) = std::env::var_os("HELM").filter(|h| !h.is_empty()) {
            return PathBuf::from(helm);
        }
        let script = repo_root().join("tests/cluster/build-helm.sh");
        let out = Command::new(&script)
            .stderr(Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(out.status.success(), "{} failed: helm cannot be built", script.display());
        let stdout = String::from_utf8_lossy(&out.stdout);
        PathBuf::from(stdout.lines().last().expect("build-helm.sh prints the helm path").trim())
    })
}

/// Runs helm with `args`; returns (success, stdout, stderr). Helm never talks to a cluster here.
pub fn helm_run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(helm_program())
        .args(args)
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", helm_program().display()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `helm template RELEASE charts/wsfleet -n NAMESPACE --set ...`: the manifests as YAML.
pub fn render(release: &str, namespace: &str, sets: &[&str]) -> String {
    let chart = chart_dir();
    let mut args = vec!["template", release, chart.to_str().expect("UTF-8 path"), "--namespace", namespace];
    for set in sets {
        args.extend_from_slice(&["--set", set]);
    }
    let (ok, stdout, stderr) = helm_run(&args);
    assert!(ok, "helm {} failed:\n{stderr}", args.join(" "));
    stdout
}

/// The YAML documents of a rendered chart, without empty ones.
pub fn documents(yaml: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in yaml.lines() {
        if line == "---" {
            docs.push(String::new());
        } else {
            let doc = docs.last_mut().expect("one document");
            doc.push_str(line);
            doc.push('\n');
        }
    }
    docs.retain(|d| d.lines().any(|l| l.starts_with("kind: ")));
    docs
}

/// The top-level `kind:` of one YAML document.
pub fn kind_of(doc: &str) -> &str {
    doc.lines().find_map(|l| l.strip_prefix("kind: ")).map(str::trim).unwrap_or_default()
}

/// The objects of `yaml` as the API server would store them (`kubectl apply --dry-run=server`):
/// validated by the real API server and its admission, returned as JSON. Panics on a refusal;
/// returns the objects and kubectl's stderr (warnings, e.g. from Pod Security admission). Every
/// namespaced object of the chart names its namespace (the release's, or the tuning namespace).
pub fn server_dry_run(yaml: &str) -> (Vec<Value>, String) {
    let run = kubectl_run(&["apply", "--dry-run=server", "-o", "json", "-f", "-"], Some(yaml));
    let stderr = run.stderr.clone();
    (objects_of(&run.ok()), stderr)
}

/// The objects of `yaml` as JSON, converted locally (`kubectl create --dry-run=client`).
pub fn to_json(yaml: &str) -> Vec<Value> {
    objects_of(&kubectl_run(&["create", "--dry-run=client", "-o", "json", "-f", "-"], Some(yaml)).ok())
}

/// The objects kubectl printed with `-o json`: one object, a `List`, or several objects in a row.
fn objects_of(printed: &str) -> Vec<Value> {
    let mut objects = Vec::new();
    for value in serde_json::Deserializer::from_str(printed).into_iter::<Value>() {
        let value = value.unwrap_or_else(|e| panic!("kubectl printed invalid JSON ({e}):\n{printed}"));
        match value["kind"].as_str() {
            Some("List") => objects.extend(value["items"].as_array().cloned().unwrap_or_default()),
            _ => objects.push(value),
        }
    }
    objects
}

/// The operator Deployment of a rendered chart, as JSON.
pub fn rendered_deployment(yaml: &str) -> Value {
    let doc = documents(yaml).into_iter().find(|d| kind_of(d) == "Deployment").expect("no Deployment in the chart");
    to_json(&doc).remove(0)
}

/// The first object of `kind` in `objects`.
pub fn find<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    objects.iter().find(|o| o["kind"] == kind).unwrap_or_else(|| panic!("no {kind} in the rendered chart"))
}

/// Cluster-scoped objects (ClusterRole, ClusterRoleBinding, the tuning Namespace) of one test
/// release, deleted when dropped; namespaced objects go with the test's namespace.
pub struct ClusterScoped {
    pub refs: Vec<String>,
}

impl Drop for ClusterScoped {
    fn drop(&mut self) {
        let mut args = vec!["delete", "--ignore-not-found", "--wait=false"];
        args.extend(self.refs.iter().map(String::as_str));
        let _ = kubectl_run(&args, None);
    }
}

/// Applies a rendered release without its operator Deployment (kwok would only fake its pods;
/// the tests run the operator binary instead). Returns the objects as applied.
pub fn install_without_deployment(yaml: &str) -> (Vec<Value>, ClusterScoped) {
    let docs: Vec<String> = documents(yaml).into_iter().filter(|d| kind_of(d) != "Deployment").collect();
    let manifest = docs.join("---\n");
    let run = kubectl_run(&["apply", "-o", "json", "-f", "-"], Some(&manifest));
    let objects = objects_of(&run.ok());
    let refs = objects
        .iter()
        .filter(|o| matches!(o["kind"].as_str(), Some("ClusterRole" | "ClusterRoleBinding" | "Namespace")))
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or_default().to_lowercase(),
                o["metadata"]["name"].as_str().unwrap_or_default()
            )
        })
        .collect();
    (objects, ClusterScoped { refs })
}

/// A kubeconfig that authenticates as a ServiceAccount (a token minted with `kubectl create
/// token`) against the same loopback API server as `KUBECONFIG`; removed when dropped.
pub struct ServiceAccountKubeconfig {
    pub path: PathBuf,
    dir: PathBuf,
}

impl ServiceAccountKubeconfig {
    pub fn new(namespace: &str, service_account: &str) -> Self {
        let token = kubectl(&["-n", namespace, "create", "token", service_account, "--duration=2h"]);
        let admin: Value =
            serde_json::from_str(&kubectl(&["config", "view", "--minify", "--raw", "--flatten", "-o", "json"]))
                .expect("kubeconfig as JSON");
        let cluster = &admin["clusters"][0]["cluster"];
        let server = cluster["server"].as_str().expect("the API server's address");
        assert!(is_loopback_server(server), "{server} is not on loopback");
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "local", "cluster": {
                "server": server,
                "certificate-authority-data": cluster["certificate-authority-data"],
            }}],
            "users": [{"name": service_account, "user": {"token": token.trim()}}],
            "contexts": [{"name": service_account, "context": {"cluster": "local", "user": service_account}}],
            "current-context": service_account,
        });
        let dir = std::env::temp_dir().join(unique_name("wsfleet-chart-kubeconfig"));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        let path = dir.join("kubeconfig");
        std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).expect("write the kubeconfig");
        ServiceAccountKubeconfig { path, dir }
    }
}

impl Drop for ServiceAccountKubeconfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The operator binary run as the chart's Deployment runs it: the container's arguments and
/// environment from the rendered Deployment (`POD_NAMESPACE` and `POD_NAME` filled in as the
/// downward API would), except `--http-listen` on loopback port 0, plus `extra` arguments and
/// `env` overrides. Its log is kept; it is killed (by pid) when dropped.
pub struct ChartOperator {
    child: Mutex<Child>,
    log: Arc<Mutex<Vec<String>>>,
    /// The pod name it runs as: its identity in the Lease.
    pub identity: String,
}

pub struct OperatorLaunch<'a> {
    pub deployment: &'a Value,
    pub namespace: &'a str,
    pub kubeconfig: &'a Path,
    pub extra: &'a [&'a str],
    pub env: &'a [(&'a str, &'a str)],
}

impl ChartOperator {
    pub fn start(launch: OperatorLaunch) -> ChartOperator {
        let container = &launch.deployment["spec"]["template"]["spec"]["containers"][0];
        let identity = format!("{}-0", launch.deployment["metadata"]["name"].as_str().expect("Deployment name"));
        let mut cmd = Command::new(workspace_binary("wsfleet-operator"));
        // Only what the container would have: no variable of the test's environment leaks in.
        cmd.env_clear();
        for arg in container["args"].as_array().expect("container args") {
            let arg = arg.as_str().expect("string arg");
            if arg.starts_with("--http-listen") {
                cmd.arg("--http-listen=127.0.0.1:0");
            } else {
                cmd.arg(arg);
            }
        }
        cmd.args(launch.extra);
        for var in container["env"].as_array().into_iter().flatten() {
            let name = var["name"].as_str().expect("env name");
            let value = match var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.namespace") => launch.namespace.to_owned(),
                Some("metadata.name") => identity.clone(),
                Some(other) => panic!("env {name}: fieldRef {other} is not simulated"),
                None => var["value"].as_str().unwrap_or_default().to_owned(),
            };
            cmd.env(name, value);
        }
        cmd.envs(launch.env.iter().copied()).env("KUBECONFIG", launch.kubeconfig);
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start wsfleet-operator");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        ChartOperator { child: Mutex::new(child), log, identity }
    }

    /// Its exit status, once it has exited.
    pub fn exited(&self) -> Option<std::process::ExitStatus> {
        self.child.lock().unwrap_or_else(|p| p.into_inner()).try_wait().ok().flatten()
    }

    /// Its log so far, with JSON and Debug escaping removed (`\"` -> `"`), so that the API
    /// server's messages read as they were sent.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|l| l.replace('\\', "")).collect()
    }

    /// The last `n` lines of its log, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let log = self.log();
        log[log.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for ChartOperator {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|p| p.into_inner());
        if child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill").args(["-KILL", &child.id().to_string()]).status();
        }
        let _ = child.wait();
    }
}

/// One look at the cluster, shared by every run in a tick.
pub struct Snapshot {
    objects: Vec<Value>,
    events: Vec<Value>,
}

impl Snapshot {
    fn take(with_events: bool) -> Snapshot {
        let list = |args: &[&str]| -> Vec<Value> {
            let out: Value = serde_json::from_str(&kubectl(args)).expect("kubectl printed JSON");
            out["items"].as_array().cloned().unwrap_or_default()
        };
        let objects = list(&[
            "get",
            "websocketclusters,deployments,services,poddisruptionbudgets,daemonsets,networkpolicies,leases",
            "--all-namespaces",
            "-o",
            "json",
        ]);
        let events = if with_events {
            list(&[
                "get",
                "events.events.k8s.io",
                "--all-namespaces",
                "--field-selector",
                "reportingController=wsfleet-operator",
                "-o",
                "json",
            ])
        } else {
            Vec::new()
        };
        Snapshot { objects, events }
    }

    fn get(&self, namespace: &str, kind: &str, name: &str) -> Option<&Value> {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["namespace"] == namespace && o["metadata"]["name"] == name)
    }

    fn events_in<'a>(&'a self, namespace: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.events.iter().filter(move |e| e["metadata"]["namespace"] == namespace)
    }
}

/// The sample every run reconciles (`operator/examples/chat.yaml`).
pub const SAMPLE: &str = "chat";

/// The scenario's steps, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Ready,
    EventsRecorded,
    JwtSecretChecked,
    ScaleTo4,
    ScaleTo5AndEventCounted,
    RepairDeployment,
    RepairService,
    RepairPodDisruptionBudget,
    RepairDaemonSet,
    RemoveOptionalChildren,
    RenewLease,
}

const STEPS: [Step; 11] = [
    Step::Ready,
    Step::EventsRecorded,
    Step::JwtSecretChecked,
    Step::ScaleTo4,
    Step::ScaleTo5AndEventCounted,
    Step::RepairDeployment,
    Step::RepairService,
    Step::RepairPodDisruptionBudget,
    Step::RepairDaemonSet,
    Step::RemoveOptionalChildren,
    Step::RenewLease,
];

const COMPONENT: &str = "app.kubernetes.io/component";

impl Step {
    pub fn what(self) -> &'static str {
        match self {
            Step::Ready => "the sample becomes Ready",
            Step::EventsRecorded => "events record the children it created",
            Step::JwtSecretChecked => "a JWT Secret is checked and reaches the servers",
            Step::ScaleTo4 => "a scale to 4 reaches the Deployment and the status",
            Step::ScaleTo5AndEventCounted => "a scale to 5 does too, and its repeated event is counted (series)",
            Step::RepairDeployment => "an edited Deployment is repaired",
            Step::RepairService => "an edited Service is repaired",
            Step::RepairPodDisruptionBudget => "an edited PodDisruptionBudget is repaired",
            Step::RepairDaemonSet => "an edited DaemonSet is repaired",
            Step::RemoveOptionalChildren => "children the spec drops (managed Redis, tuning) are removed",
            Step::RenewLease => "the leader renews its Lease",
        }
    }

    fn deadline(self, lease: Duration) -> Duration {
        match self {
            // A rollout of every server pod (the JWT Secret changes the pod template) and scales.
            Step::Ready | Step::JwtSecretChecked | Step::ScaleTo4 | Step::ScaleTo5AndEventCounted => {
                Duration::from_secs(45)
            }
            Step::EventsRecorded => Duration::from_secs(10),
            Step::RenewLease => lease * 2,
            _ => Duration::from_secs(20),
        }
    }

    /// The child whose edit this step repairs, as (resource, kind, name); the DaemonSet is in
    /// the tuning namespace ([`Run::tuning`]), the others in the sample's.
    fn repaired(self, run: &Run) -> Option<(&'static str, &'static str, String)> {
        match self {
            Step::RepairDeployment => Some(("deployment", "Deployment", format!("{SAMPLE}-server"))),
            Step::RepairService => Some(("service", "Service", SAMPLE.to_owned())),
            Step::RepairPodDisruptionBudget => {
                Some(("poddisruptionbudget", "PodDisruptionBudget", format!("{SAMPLE}-server")))
            }
            Step::RepairDaemonSet => Some(("daemonset", "DaemonSet", run.tuning().1)),
            _ => None,
        }
    }
}

/// One operator driving the sample in its namespace through the steps.
pub struct Run {
    pub label: String,
    /// Where the sample lives.
    pub namespace: String,
    /// Where the operator's Lease lives (the release namespace).
    pub lease_namespace: String,
    pub lease_name: String,
    pub lease_duration: Duration,
    pub operator: ChartOperator,
    step: usize,
    entered: Instant,
    /// What the current step remembers from when it began (a label value, a renew time).
    memo: String,
    pub outcome: Option<Outcome>,
}

/// How a run ended: every step passed, or the first one that did not.
#[derive(Debug, Clone)]
pub enum Outcome {
    Passed { took: Duration },
    Failed { step: Step, why: String, after: Duration },
}

enum Check {
    Pass,
    Fail(String),
    Pending(String),
}

impl Run {
    pub fn new(label: String, namespace: String, lease: (String, String, Duration), operator: ChartOperator) -> Run {
        Run {
            label,
            namespace,
            lease_namespace: lease.0,
            lease_name: lease.1,
            lease_duration: lease.2,
            operator,
            step: 0,
            entered: Instant::now(),
            memo: String::new(),
            outcome: None,
        }
    }

    fn current(&self) -> Step {
        STEPS[self.step]
    }

    /// Where the sample's tuning DaemonSet is: the chart's default tuning namespace of the
    /// release, and the name the operator gives it.
    pub fn tuning(&self) -> (String, String) {
        (format!("{}-tuning", self.lease_namespace), format!("{}-{SAMPLE}", self.namespace))
    }

    /// The namespace a repaired child lives in.
    fn namespace_of(&self, kind: &str) -> String {
        if kind == "DaemonSet" { self.tuning().0 } else { self.namespace.clone() }
    }

    fn wsc<'a>(&self, s: &'a Snapshot) -> Option<&'a Value> {
        s.get(&self.namespace, "WebSocketCluster", SAMPLE)
    }

    /// Starts the current step: the user's action, if it has one.
    fn enter(&mut self, s: &Snapshot) {
        self.entered = Instant::now();
        self.memo.clear();
        let ns = self.namespace.clone();
        let patch = |body: &str| {
            kubectl(&["-n", &ns, "patch", "websocketcluster", SAMPLE, "--type", "merge", "-p", body]);
        };
        match self.current() {
            Step::JwtSecretChecked => {
                let secret = format!("--from-literal=secret={}", "s".repeat(40));
                kubectl(&["-n", &ns, "create", "secret", "generic", "chat-jwt", &secret]);
                patch(r#"{"spec":{"auth":{"jwtSecretRef":{"name":"chat-jwt","key":"secret"}}}}"#);
            }
            Step::ScaleTo4 => patch(r#"{"spec":{"replicas":4}}"#),
            Step::ScaleTo5AndEventCounted => patch(r#"{"spec":{"replicas":5}}"#),
            step @ (Step::RepairDeployment
            | Step::RepairService
            | Step::RepairPodDisruptionBudget
            | Step::RepairDaemonSet) => {
                let (resource, kind, name) = step.repaired(self).expect("a repair step");
                let child_ns = self.namespace_of(kind);
                self.memo = s
                    .get(&child_ns, kind, &name)
                    .and_then(|o| o["metadata"]["labels"][COMPONENT].as_str())
                    .unwrap_or("(absent)")
                    .to_owned();
                kubectl(&[
                    "-n",
                    &child_ns,
                    "label",
                    resource,
                    &name,
                    &format!("{COMPONENT}=edited-by-a-user"),
                    "--overwrite",
                ]);
            }
            Step::RemoveOptionalChildren => patch(
                r#"{"spec":{"redis":{"managed":null,"external":{"urlSecretRef":{"name":"redis","key":"url"}}},"nodeTuning":{"enabled":false}}}"#,
            ),
            Step::RenewLease => {
                self.memo = s
                    .get(&self.lease_namespace, "Lease", &self.lease_name)
                    .and_then(|l| l["spec"]["renewTime"].as_str())
                    .unwrap_or_default()
                    .to_owned();
            }
            Step::Ready | Step::EventsRecorded => {}
        }
    }

    fn check(&self, s: &Snapshot) -> Check {
        if let Some(status) = self.operator.exited() {
            return Check::Fail(format!("the operator exited ({status})"));
        }
        let Some(wsc) = self.wsc(s) else { return Check::Fail("the sample WebSocketCluster is gone".into()) };
        let condition = |type_: &str| -> Option<&Value> {
            wsc["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)
        };
        if let Some(d) = condition("Degraded")
            && d["status"] == "True"
            && d["reason"] == "ApplyFailed"
        {
            return Check::Fail(format!("Degraded ApplyFailed: {}", d["message"]));
        }
        let ready = condition("Ready").map(|c| format!("Ready={} {}", c["status"], c["reason"]));
        let ready = ready.unwrap_or_else(|| "no status".into());
        let is_ready = condition("Ready").is_some_and(|c| c["status"] == "True");
        let scaled = |n: i64| {
            let deployment = s.get(&self.namespace, "Deployment", &format!("{SAMPLE}-server"));
            let d = deployment.and_then(|d| d["spec"]["replicas"].as_i64());
            let seen = format!(
                "Deployment replicas {d:?}, status {}/{} ready, generation {} observed {}, {ready}",
                wsc["status"]["readyReplicas"],
                wsc["status"]["replicas"],
                wsc["metadata"]["generation"],
                wsc["status"]["observedGeneration"]
            );
            let done = d == Some(n)
                && wsc["status"]["readyReplicas"] == n
                && wsc["status"]["observedGeneration"] == wsc["metadata"]["generation"]
                && is_ready;
            if done { Check::Pass } else { Check::Pending(seen) }
        };
        let events: Vec<&Value> = s
            .events_in(&self.namespace)
            .filter(|e| e["regarding"]["kind"] == "WebSocketCluster" && e["regarding"]["name"] == SAMPLE)
            .collect();
        match self.current() {
            Step::Ready => {
                if is_ready {
                    Check::Pass
                } else {
                    Check::Pending(ready)
                }
            }
            Step::EventsRecorded => {
                let created = format!("Deployment {SAMPLE}-server created");
                if events.iter().any(|e| e["reason"] == "Created" && e["note"] == created.as_str()) {
                    Check::Pass
                } else {
                    Check::Pending(format!("{} events about the sample, none saying {created:?}", events.len()))
                }
            }
            Step::JwtSecretChecked => {
                let deployment = s.get(&self.namespace, "Deployment", &format!("{SAMPLE}-server"));
                let env = deployment.map(|d| d["spec"]["template"]["spec"]["containers"][0]["env"].to_string());
                let taken = env.as_deref().is_some_and(|e| e.contains("WSFLEET_JWT_SECRET"));
                let caught_up = wsc["status"]["observedGeneration"] == wsc["metadata"]["generation"];
                if taken && caught_up && is_ready {
                    Check::Pass
                } else {
                    Check::Pending(format!("JWT secret in the Deployment: {taken}, caught up: {caught_up}, {ready}"))
                }
            }
            Step::ScaleTo4 => scaled(4),
            Step::ScaleTo5AndEventCounted => match scaled(5) {
                Check::Pass => {
                    let updated = events.iter().find(|e| {
                        e["reason"] == "Updated"
                            && e["related"]["kind"] == "Deployment"
                            && e["related"]["name"] == format!("{SAMPLE}-server").as_str()
                    });
                    let count = updated.and_then(|e| e["series"]["count"].as_i64()).unwrap_or(1);
                    if count >= 2 {
                        Check::Pass
                    } else {
                        Check::Pending(format!("the Deployment's Updated event was seen {count} time(s)"))
                    }
                }
                other => other,
            },
            step @ (Step::RepairDeployment
            | Step::RepairService
            | Step::RepairPodDisruptionBudget
            | Step::RepairDaemonSet) => {
                let (_, kind, name) = step.repaired(self).expect("a repair step");
                let label = s
                    .get(&self.namespace_of(kind), kind, &name)
                    .map(|o| o["metadata"]["labels"][COMPONENT].as_str().unwrap_or("(absent)").to_owned());
                match label {
                    Some(l) if l == self.memo => Check::Pass,
                    other => Check::Pending(format!("{kind} {name} label {COMPONENT}={other:?}")),
                }
            }
            Step::RemoveOptionalChildren => {
                let redis = format!("{SAMPLE}-redis");
                let (tuning_ns, tuning) = self.tuning();
                let ns = self.namespace.as_str();
                let left: Vec<&str> = [
                    (ns, "Deployment", &redis),
                    (ns, "Service", &redis),
                    (ns, "NetworkPolicy", &redis),
                    (tuning_ns.as_str(), "DaemonSet", &tuning),
                ]
                .into_iter()
                .filter(|(ns, kind, name)| s.get(ns, kind, name).is_some())
                .map(|(_, kind, _)| kind)
                .collect();
                let caught_up = wsc["status"]["observedGeneration"] == wsc["metadata"]["generation"];
                if left.is_empty() && caught_up {
                    Check::Pass
                } else {
                    Check::Pending(format!("still there: {left:?}; observedGeneration caught up: {caught_up}"))
                }
            }
            Step::RenewLease => {
                let lease = s.get(&self.lease_namespace, "Lease", &self.lease_name);
                let holder = lease.and_then(|l| l["spec"]["holderIdentity"].as_str()).unwrap_or_default();
                let renewed = lease.and_then(|l| l["spec"]["renewTime"].as_str()).unwrap_or_default();
                if holder == self.operator.identity && renewed != self.memo {
                    Check::Pass
                } else {
                    Check::Pending(format!("Lease holder {holder:?}, renewTime {renewed:?} (was {:?})", self.memo))
                }
            }
        }
    }
}

/// Drives every run through the steps until each has passed them all or failed one; runs are
/// independent (each has its own namespace and operator). Returns how long it took.
pub fn drive(runs: &mut [&mut Run]) -> Duration {
    let start = Instant::now();
    let first = Snapshot::take(false);
    for run in runs.iter_mut() {
        run.enter(&first);
    }
    while runs.iter().any(|r| r.outcome.is_none()) {
        let with_events = runs.iter().any(|r| {
            r.outcome.is_none() && matches!(r.current(), Step::EventsRecorded | Step::ScaleTo5AndEventCounted)
        });
        let snapshot = Snapshot::take(with_events);
        std::thread::scope(|scope| {
            for run in runs.iter_mut().filter(|r| r.outcome.is_none()) {
                let snapshot = &snapshot;
                scope.spawn(move || advance(run, snapshot, start));
            }
        });
        std::thread::sleep(Duration::from_millis(500));
    }
    start.elapsed()
}

/// One tick of one run: check its step, then move on, fail, or wait.
fn advance(run: &mut Run, snapshot: &Snapshot, start: Instant) {
    match run.check(snapshot) {
        Check::Pass if run.step + 1 == STEPS.len() => run.outcome = Some(Outcome::Passed { took: start.elapsed() }),
        Check::Pass => {
            run.step += 1;
            run.enter(snapshot);
        }
        Check::Fail(why) => {
            run.outcome = Some(Outcome::Failed { step: run.current(), why, after: start.elapsed() });
        }
        Check::Pending(seen) if run.entered.elapsed() >= run.current().deadline(run.lease_duration) => {
            let why = format!("not within {:?}; last seen: {seen}", run.current().deadline(run.lease_duration));
            run.outcome = Some(Outcome::Failed { step: run.current(), why, after: start.elapsed() });
        }
        Check::Pending(_) => {}
    }
}

/// One permission: a verb on a resource (with its subresource, `websocketclusters/status`) of an
/// API group, as RBAC rules and the API server's refusals name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permission {
    pub group: String,
    pub resource: String,
    pub verb: String,
    /// `resourceNames` of the rule it comes from (empty: any name).
    pub names: Vec<String>,
}

impl Permission {
    /// Every (group, resource, verb) an RBAC rule list grants.
    pub fn all(rules: &Value) -> Vec<Permission> {
        let strings = |v: &Value| -> Vec<String> {
            v.as_array().into_iter().flatten().filter_map(|s| s.as_str()).map(String::from).collect()
        };
        let mut out = Vec::new();
        for rule in rules.as_array().into_iter().flatten() {
            for group in strings(&rule["apiGroups"]) {
                for resource in strings(&rule["resources"]) {
                    for verb in strings(&rule["verbs"]) {
                        out.push(Permission {
                            group: group.clone(),
                            resource: resource.clone(),
                            verb,
                            names: strings(&rule["resourceNames"]),
                        });
                    }
                }
            }
        }
        out
    }

    /// The same verb on the same resource, whatever names it is limited to.
    pub fn same_grant(&self, other: &Permission) -> bool {
        (&self.group, &self.resource, &self.verb) == (&other.group, &other.resource, &other.verb)
    }

    /// `rules` without this one permission (a rule granting more is split so the rest stays).
    pub fn remove_from(&self, rules: &Value) -> Value {
        let mut kept = Vec::new();
        for p in Permission::all(rules).into_iter().filter(|p| p != self) {
            let mut rule = json!({"apiGroups": [p.group], "resources": [p.resource], "verbs": [p.verb]});
            if !p.names.is_empty() {
                rule["resourceNames"] = json!(p.names);
            }
            kept.push(rule);
        }
        Value::Array(kept)
    }

    /// What the API server says when it refuses this permission (in a 403's message).
    pub fn refusal(&self) -> String {
        format!("cannot {} resource \"{}\" in API group \"{}\"", self.verb, self.resource, self.group)
    }

    /// The resource argument of `kubectl auth can-i`.
    pub fn can_i_args(&self) -> Vec<String> {
        let (resource, sub) = match self.resource.split_once('/') {
            Some((r, s)) => (r.to_owned(), Some(s.to_owned())),
            None => (self.resource.clone(), None),
        };
        let mut target = if self.group.is_empty() { resource } else { format!("{resource}.{}", self.group) };
        if let Some(name) = self.names.first() {
            target = format!("{target}/{name}");
        }
        let mut args = vec![self.verb.clone(), target];
        if let Some(sub) = sub {
            args.push(format!("--subresource={sub}"));
        }
        args
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let group = if self.group.is_empty() { "core" } else { &self.group };
        write!(f, "{} {} ({group})", self.verb, self.resource)
    }
}
