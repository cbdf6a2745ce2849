//! Pure: the objects a `WebSocketCluster` owns, one `build_<kind>` per child. Every child has a
//! deterministic name, the cluster's labels and a controller owner reference, so garbage
//! collection removes it with the cluster and the controller sees its changes.
//!
//! | child | name | when |
//! |---|---|---|
//! | server Deployment | `<name>-server` | always |
//! | client Service | `<name>` | always |
//! | PodDisruptionBudget | `<name>-server` | always |
//! | Redis Deployment and Service | `<name>-redis` | `redis.managed` |
//! | node-tuning DaemonSet | `<name>-tuning` | `nodeTuning.enabled` |
//!
//! No client here; [`crate::controller`] applies what these return.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction, HTTPGetAction, Lifecycle,
    LifecycleHandler, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, ResourceRequirements,
    SecurityContext, Service, ServicePort, ServiceSpec as K8sServiceSpec, SleepAction, Sysctl,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

use wsfleet_contract::{env as server_env, tune};

use crate::crd::WebSocketCluster;

/// Health and metrics port of the servers (fixed; the spec's `port` may not take it).
pub const HTTP_PORT: i32 = 9090;
pub const REDIS_PORT: i32 = 6379;
/// Seconds the pod keeps serving after it is marked terminating, so endpoints drop it before
/// its clients are closed.
pub const PRE_STOP_SECONDS: i64 = 5;
/// Seconds of grace beyond pre-stop and drain, before the kubelet kills the server.
pub const GRACE_MARGIN_SECONDS: i64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Server,
    Redis,
    Tuning,
}

impl Component {
    fn as_str(self) -> &'static str {
        match self {
            Component::Server => "server",
            Component::Redis => "redis",
            Component::Tuning => "tuning",
        }
    }
}

/// Labels that select one component's pods.
pub fn selector_labels(wsc: &WebSocketCluster, component: Component) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "wsfleet".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), wsc.name_any()),
        ("app.kubernetes.io/component".to_owned(), component.as_str().to_owned()),
    ])
}

fn labels(wsc: &WebSocketCluster, component: Component) -> BTreeMap<String, String> {
    let mut l = selector_labels(wsc, component);
    l.insert("app.kubernetes.io/managed-by".into(), crate::FIELD_MANAGER.into());
    l
}

/// The server pods' selector as a string, for the scale subresource.
pub fn selector_string(wsc: &WebSocketCluster) -> String {
    selector_labels(wsc, Component::Server).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

pub fn server_name(wsc: &WebSocketCluster) -> String {
    format!("{}-server", wsc.name_any())
}
pub fn redis_name(wsc: &WebSocketCluster) -> String {
    format!("{}-redis", wsc.name_any())
}
pub fn tuning_name(wsc: &WebSocketCluster) -> String {
    format!("{}-tuning", wsc.name_any())
}

/// The key prefix of this fleet in Redis, so several fleets can share one (external) Redis.
pub fn redis_prefix(wsc: &WebSocketCluster) -> String {
    let full = format!("{}.{}", wsc.namespace().unwrap_or_default(), wsc.name_any());
    if full.len() <= 64 {
        return full;
    }
    // Deterministic and short: FNV-1a of the full name.
    let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    format!("wsc-{hash:016x}")
}

/// Where the servers reach Redis: a URL, or `None` when it comes from a Secret.
pub fn redis_url(wsc: &WebSocketCluster) -> Option<String> {
    match (&wsc.spec.redis.managed, &wsc.spec.redis.external) {
        (Some(_), _) => {
            Some(format!("redis://{}.{}.svc:{REDIS_PORT}", redis_name(wsc), wsc.namespace().unwrap_or_default()))
        }
        (None, Some(ext)) => ext.url.clone(),
        (None, None) => None,
    }
}

fn meta(wsc: &WebSocketCluster, name: String, component: Component) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: wsc.namespace(),
        labels: Some(labels(wsc, component)),
        owner_references: Some(vec![owner_reference(wsc)]),
        ..Default::default()
    }
}

pub fn owner_reference(wsc: &WebSocketCluster) -> OwnerReference {
    OwnerReference {
        api_version: WebSocketCluster::api_version(&()).into_owned(),
        kind: WebSocketCluster::kind(&()).into_owned(),
        name: wsc.name_any(),
        uid: wsc.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

fn int_or_percent(s: &str) -> IntOrString {
    s.parse::<i32>().map(IntOrString::Int).unwrap_or_else(|_| IntOrString::String(s.to_owned()))
}

fn env(name: &str, value: impl ToString) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.to_string()), ..Default::default() }
}

fn server_env(wsc: &WebSocketCluster) -> Vec<EnvVar> {
    let spec = &wsc.spec;
    let mut vars = vec![
        env(server_env::LISTEN, format!("0.0.0.0:{}", spec.port)),
        env(server_env::HTTP_LISTEN, format!("0.0.0.0:{HTTP_PORT}")),
        EnvVar {
            name: server_env::POD_NAME.into(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector { field_path: "metadata.name".into(), ..Default::default() }),
                ..Default::default()
            }),
            ..Default::default()
        },
        env(server_env::REDIS_PREFIX, redis_prefix(wsc)),
        env(server_env::MAX_CONNECTIONS, spec.max_connections_per_pod),
        env(server_env::DRAIN_TIMEOUT, spec.drain.timeout_seconds),
        env(server_env::HISTORY_SIZE, spec.history.size),
        env(server_env::HISTORY_TTL, spec.history.ttl_seconds),
        env(server_env::LOG_FORMAT, server_env::LOG_FORMAT_JSON),
    ];
    match (redis_url(wsc), spec.redis.external.as_ref().and_then(|e| e.url_secret_ref.clone())) {
        (Some(url), _) => vars.push(env(server_env::REDIS_URL, url)),
        (None, Some(secret)) => vars.push(EnvVar {
            name: server_env::REDIS_URL.into(),
            value_from: Some(EnvVarSource { secret_key_ref: Some(secret), ..Default::default() }),
            ..Default::default()
        }),
        (None, None) => {}
    }
    if let Some(auth) = &spec.auth {
        if !auth.allowed_origins.is_empty() {
            vars.push(env(server_env::ALLOWED_ORIGINS, auth.allowed_origins.join(",")));
        }
        if let Some(secret) = &auth.jwt_secret_ref {
            vars.push(EnvVar {
                name: server_env::JWT_SECRET.into(),
                value_from: Some(EnvVarSource { secret_key_ref: Some(secret.clone()), ..Default::default() }),
                ..Default::default()
            });
        }
    }
    vars
}

fn http_probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("http".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
        ..Default::default()
    }
}

/// The server Deployment: probes on the health port, a pre-stop pause and a grace period that
/// covers the drain, rollout surge from the spec, and a safe pod sysctl.
pub fn build_server_deployment(wsc: &WebSocketCluster) -> Deployment {
    let spec = &wsc.spec;
    let selector = selector_labels(wsc, Component::Server);
    let container = Container {
        name: "server".into(),
        image: Some(spec.image.clone()),
        image_pull_policy: spec.image_pull_policy.map(|p| p.as_str().to_owned()),
        env: Some(server_env(wsc)),
        ports: Some(vec![
            ContainerPort { name: Some("ws".into()), container_port: spec.port, ..Default::default() },
            ContainerPort { name: Some("http".into()), container_port: HTTP_PORT, ..Default::default() },
        ]),
        // Readiness drops within ~2 s when the server drains or loses its bus.
        readiness_probe: Some(http_probe("/readyz", 2, 1)),
        liveness_probe: Some(http_probe("/livez", 10, 3)),
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction { seconds: PRE_STOP_SECONDS }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        resources: spec.resources.clone(),
        security_context: Some(restricted_container_security()),
        ..Default::default()
    };
    let mut annotations = spec.pod_annotations.clone().unwrap_or_default();
    annotations.entry("kubectl.kubernetes.io/default-container".into()).or_insert_with(|| "server".into());
    Deployment {
        metadata: meta(wsc, server_name(wsc), Component::Server),
        spec: Some(DeploymentSpec {
            replicas: Some(spec.replicas),
            selector: LabelSelector { match_labels: Some(selector.clone()), ..Default::default() },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(int_or_percent(&spec.rollout.max_surge)),
                    max_unavailable: Some(int_or_percent(&spec.rollout.max_unavailable)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(wsc, Component::Server)),
                    annotations: Some(annotations),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    termination_grace_period_seconds: Some(
                        PRE_STOP_SECONDS + spec.drain.timeout_seconds + GRACE_MARGIN_SECONDS,
                    ),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        sysctls: Some(vec![Sysctl {
                            name: "net.ipv4.ip_local_port_range".into(),
                            value: "1024 65535".into(),
                        }]),
                        ..Default::default()
                    }),
                    node_selector: spec.node_selector.clone(),
                    tolerations: spec.tolerations.clone(),
                    affinity: spec.affinity.clone(),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// The Service clients connect to, with the chosen type and session affinity.
pub fn build_client_service(wsc: &WebSocketCluster) -> Service {
    let s = &wsc.spec.service;
    let mut metadata = meta(wsc, wsc.name_any(), Component::Server);
    metadata.annotations = s.annotations.clone();
    Service {
        metadata,
        spec: Some(K8sServiceSpec {
            type_: Some(format!("{:?}", s.type_)),
            session_affinity: Some(format!("{:?}", s.session_affinity)),
            selector: Some(selector_labels(wsc, Component::Server)),
            ports: Some(vec![ServicePort {
                name: Some("ws".into()),
                port: wsc.spec.port,
                target_port: Some(IntOrString::String("ws".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
}

/// At most one server pod disrupted at a time, so voluntary evictions drain pods one by one.
pub fn build_pdb(wsc: &WebSocketCluster) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(wsc, server_name(wsc), Component::Server),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(wsc, Component::Server)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

/// Managed Redis as a pub/sub bus: no persistence, no eviction of history, output buffers sized
/// for subscribers that each serve a whole pod.
pub fn build_redis_deployment(wsc: &WebSocketCluster) -> Option<Deployment> {
    let managed = wsc.spec.redis.managed.as_ref()?;
    let container = Container {
        name: "redis".into(),
        image: Some(managed.image.clone()),
        args: Some(
            [
                "redis-server",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--maxmemory-policy",
                "noeviction",
                "--client-output-buffer-limit",
            ]
            .into_iter()
            .map(String::from)
            .chain([format!("pubsub {}", managed.pubsub_buffer_limit)])
            .collect(),
        ),
        ports: Some(vec![ContainerPort {
            name: Some("redis".into()),
            container_port: REDIS_PORT,
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            exec: Some(ExecAction { command: Some(vec!["redis-cli".into(), "ping".into()]) }),
            period_seconds: Some(5),
            ..Default::default()
        }),
        resources: managed.resources.clone().or_else(|| {
            Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".into(), Quantity("100m".into())),
                    ("memory".into(), Quantity("128Mi".into())),
                ])),
                ..Default::default()
            })
        }),
        ..Default::default()
    };
    Some(Deployment {
        metadata: meta(wsc, redis_name(wsc), Component::Redis),
        spec: Some(DeploymentSpec {
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(selector_labels(wsc, Component::Redis)),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy { type_: Some("Recreate".into()), rolling_update: None }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels(wsc, Component::Redis)), ..Default::default() }),
                spec: Some(PodSpec { containers: vec![container], ..Default::default() }),
            },
            ..Default::default()
        }),
        status: None,
    })
}

pub fn build_redis_service(wsc: &WebSocketCluster) -> Option<Service> {
    wsc.spec.redis.managed.as_ref()?;
    Some(Service {
        metadata: meta(wsc, redis_name(wsc), Component::Redis),
        spec: Some(K8sServiceSpec {
            selector: Some(selector_labels(wsc, Component::Redis)),
            ports: Some(vec![ServicePort {
                name: Some("redis".into()),
                port: REDIS_PORT,
                target_port: Some(IntOrString::String("redis".into())),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    })
}

/// The node-tuning DaemonSet: the server image's `tune` subcommand, privileged on the host
/// network (node sysctls are the host's), writing only the listed keys.
pub fn build_tuning_daemonset(wsc: &WebSocketCluster) -> Option<DaemonSet> {
    let tuning = &wsc.spec.node_tuning;
    if !tuning.enabled {
        return None;
    }
    let mut args = vec![tune::SUBCOMMAND.to_owned()];
    for (k, v) in &tuning.sysctls {
        args.push(tune::SYSCTL_FLAG.into());
        args.push(format!("{k}={v}"));
    }
    let container = Container {
        name: "tune".into(),
        image: Some(wsc.spec.image.clone()),
        image_pull_policy: wsc.spec.image_pull_policy.map(|p| p.as_str().to_owned()),
        args: Some(args),
        // Root and privileged: node sysctls live under the host's /proc/sys. The server image
        // runs as a non-root user otherwise.
        security_context: Some(SecurityContext {
            privileged: Some(true),
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), Quantity("10m".into())),
                ("memory".into(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([("memory".into(), Quantity("32Mi".into()))])),
            ..Default::default()
        }),
        ..Default::default()
    };
    Some(DaemonSet {
        metadata: meta(wsc, tuning_name(wsc), Component::Tuning),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector_labels(wsc, Component::Tuning)),
                ..Default::default()
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels(wsc, Component::Tuning)), ..Default::default() }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    host_network: Some(true),
                    node_selector: tuning.node_selector.clone(),
                    tolerations: wsc.spec.tolerations.clone(),
                    termination_grace_period_seconds: Some(5),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    })
}

/// Every child one cluster wants, built together from the spec: the reconcile's first step.
/// An optional child that is `None` is one the spec no longer asks for (it is removed).
#[derive(Debug, Clone)]
pub struct Children {
    pub server: Deployment,
    pub client_service: Service,
    pub pdb: PodDisruptionBudget,
    pub redis: Option<Deployment>,
    pub redis_service: Option<Service>,
    pub tuning: Option<DaemonSet>,
}

/// Builds every child of `wsc`.
pub fn build_all(wsc: &WebSocketCluster) -> Children {
    Children {
        server: build_server_deployment(wsc),
        client_service: build_client_service(wsc),
        pdb: build_pdb(wsc),
        redis: build_redis_deployment(wsc),
        redis_service: build_redis_service(wsc),
        tuning: build_tuning_daemonset(wsc),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::{ExternalRedis, ManagedRedis, RedisSpec, WebSocketClusterSpec};

    /// A cluster as the API server would hand it over (defaults applied, uid set).
    pub(crate) fn sample(name: &str) -> WebSocketCluster {
        let spec: WebSocketClusterSpec = serde_json::from_value(serde_json::json!({
            "redis": {"managed": {}},
        }))
        .unwrap();
        let mut wsc = WebSocketCluster::new(name, spec);
        wsc.metadata.namespace = Some("team-a".into());
        wsc.metadata.uid = Some("uid-1".into());
        wsc.metadata.generation = Some(1);
        wsc
    }

    #[test]
    fn spec_defaults_match_the_documentation() {
        let s = sample("chat").spec;
        assert_eq!((s.replicas, s.port, s.max_connections_per_pod), (3, 8080, 100_000));
        assert_eq!((s.history.size, s.history.ttl_seconds, s.drain.timeout_seconds), (1000, 300, 30));
        assert_eq!((s.rollout.max_surge.as_str(), s.rollout.max_unavailable.as_str()), ("25%", "0"));
        assert_eq!(
            s.redis.managed,
            Some(ManagedRedis {
                image: "redis:7.2-alpine".into(),
                resources: None,
                pubsub_buffer_limit: "256mb 64mb 60".into()
            })
        );
        assert!(!s.node_tuning.enabled);
    }

    #[test]
    fn server_deployment_carries_the_spec() {
        let mut wsc = sample("chat");
        wsc.spec.replicas = 5;
        wsc.spec.drain.timeout_seconds = 45;
        wsc.spec.rollout.max_surge = "2".into();
        let d = build_server_deployment(&wsc);
        assert_eq!(d.metadata.name.as_deref(), Some("chat-server"));
        assert_eq!(d.metadata.owner_references.as_ref().unwrap()[0].uid, "uid-1");
        assert_eq!(d.metadata.owner_references.as_ref().unwrap()[0].controller, Some(true));
        let spec = d.spec.unwrap();
        assert_eq!(spec.replicas, Some(5));
        let ru = spec.strategy.unwrap().rolling_update.unwrap();
        assert_eq!((ru.max_surge, ru.max_unavailable), (Some(IntOrString::Int(2)), Some(IntOrString::Int(0))));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.termination_grace_period_seconds, Some(5 + 45 + 10));
        assert_eq!(pod.security_context.unwrap().sysctls.unwrap()[0].name, "net.ipv4.ip_local_port_range");
        let c = &pod.containers[0];
        let env: BTreeMap<_, _> = c.env.as_ref().unwrap().iter().map(|e| (e.name.as_str(), e)).collect();
        assert_eq!(env["WSFLEET_REDIS_URL"].value.as_deref(), Some("redis://chat-redis.team-a.svc:6379"));
        assert_eq!(env["WSFLEET_DRAIN_TIMEOUT"].value.as_deref(), Some("45"));
        assert_eq!(env["WSFLEET_LISTEN"].value.as_deref(), Some("0.0.0.0:8080"));
        assert_eq!(env["WSFLEET_REDIS_PREFIX"].value.as_deref(), Some("team-a.chat"));
        assert!(env["WSFLEET_POD_NAME"].value_from.is_some());
        assert_eq!(c.readiness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/readyz"));
        assert_eq!(c.liveness_probe.as_ref().unwrap().http_get.as_ref().unwrap().path.as_deref(), Some("/livez"));
        assert_eq!(c.lifecycle.as_ref().unwrap().pre_stop.as_ref().unwrap().sleep.as_ref().unwrap().seconds, 5);
        // The pods match the selector the status reports.
        let pod_labels = spec.template.metadata.unwrap().labels.unwrap();
        for kv in selector_string(&wsc).split(',') {
            let (k, v) = kv.split_once('=').unwrap();
            assert_eq!(pod_labels.get(k).map(String::as_str), Some(v));
        }
    }

    #[test]
    fn external_redis_from_a_secret() {
        let mut wsc = sample("chat");
        wsc.spec.redis = RedisSpec {
            managed: None,
            external: Some(ExternalRedis {
                url: None,
                url_secret_ref: Some(k8s_openapi::api::core::v1::SecretKeySelector {
                    name: "redis-auth".into(),
                    key: "url".into(),
                    optional: None,
                }),
            }),
        };
        let d = build_server_deployment(&wsc);
        let env = d.spec.unwrap().template.spec.unwrap().containers[0].env.clone().unwrap();
        let url = env.iter().find(|e| e.name == "WSFLEET_REDIS_URL").unwrap();
        assert_eq!(url.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap().name, "redis-auth");
        assert!(build_redis_deployment(&wsc).is_none() && build_redis_service(&wsc).is_none());
    }

    #[test]
    fn auth_reaches_the_servers_environment() {
        let mut wsc = sample("chat");
        wsc.spec.auth = Some(
            serde_json::from_value(serde_json::json!({
                "allowedOrigins": ["https://a.example", "https://b.example"],
                "jwtSecretRef": {"name": "chat-jwt", "key": "secret"},
            }))
            .unwrap(),
        );
        let env = build_server_deployment(&wsc).spec.unwrap().template.spec.unwrap().containers[0].env.clone().unwrap();
        let get = |n: &str| env.iter().find(|e| e.name == n).cloned().unwrap();
        assert_eq!(get("WSFLEET_ALLOWED_ORIGINS").value.as_deref(), Some("https://a.example,https://b.example"));
        let secret = get("WSFLEET_JWT_SECRET").value_from.unwrap().secret_key_ref.unwrap();
        assert_eq!((secret.name.as_str(), secret.key.as_str()), ("chat-jwt", "secret"));
    }

    /// The server's own test checks that it accepts every name of the contract; this one checks
    /// that the operator sets no other, with every optional variable present.
    #[test]
    fn every_variable_set_on_the_server_is_in_the_contract() {
        let mut wsc = sample("chat");
        wsc.spec.auth = Some(
            serde_json::from_value(serde_json::json!({
                "allowedOrigins": ["https://a.example"],
                "jwtSecretRef": {"name": "chat-jwt", "key": "secret"},
            }))
            .unwrap(),
        );
        let env = build_server_deployment(&wsc).spec.unwrap().template.spec.unwrap().containers[0].env.clone().unwrap();
        assert!(env.len() >= 12, "{} variables: not every optional one is set", env.len());
        for var in &env {
            assert!(server_env::ALL.contains(&var.name.as_str()), "{} is not in the contract", var.name);
        }
    }

    #[test]
    fn service_pdb_and_redis() {
        let mut wsc = sample("chat");
        wsc.spec.service.session_affinity = crate::crd::SessionAffinity::ClientIP;
        wsc.spec.service.type_ = crate::crd::ServiceType::LoadBalancer;
        let svc = build_client_service(&wsc).spec.unwrap();
        assert_eq!((svc.type_.as_deref(), svc.session_affinity.as_deref()), (Some("LoadBalancer"), Some("ClientIP")));
        assert_eq!(svc.ports.unwrap()[0].port, 8080);
        assert_eq!(build_pdb(&wsc).spec.unwrap().max_unavailable, Some(IntOrString::Int(1)));
        let redis = build_redis_deployment(&wsc).unwrap().spec.unwrap().template.spec.unwrap();
        let args = redis.containers[0].args.clone().unwrap();
        assert!(args.windows(2).any(|w| w == ["--client-output-buffer-limit", "pubsub 256mb 64mb 60"]), "{args:?}");
        assert!(args.windows(2).any(|w| w == ["--save", ""]), "{args:?}");
        assert_eq!(build_redis_service(&wsc).unwrap().metadata.name.as_deref(), Some("chat-redis"));
    }

    #[test]
    fn tuning_daemonset_only_when_enabled() {
        let mut wsc = sample("chat");
        assert!(build_tuning_daemonset(&wsc).is_none());
        wsc.spec.node_tuning.enabled = true;
        wsc.spec.node_tuning.sysctls = BTreeMap::from([("net.core.somaxconn".into(), "65535".into())]);
        let ds = build_tuning_daemonset(&wsc).unwrap();
        assert_eq!(ds.metadata.name.as_deref(), Some("chat-tuning"));
        let pod = ds.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.host_network, Some(true));
        assert_eq!(pod.containers[0].args.clone().unwrap(), ["tune", "--sysctl", "net.core.somaxconn=65535"]);
        let security = pod.containers[0].security_context.as_ref().unwrap();
        assert_eq!((security.privileged, security.run_as_user), (Some(true), Some(0)));
    }

    #[test]
    fn build_all_follows_the_optional_parts_of_the_spec() {
        let mut wsc = sample("chat");
        let all = build_all(&wsc);
        assert!(all.redis.is_some() && all.redis_service.is_some() && all.tuning.is_none());
        assert_eq!(all.server.metadata.name.as_deref(), Some("chat-server"));
        wsc.spec.redis = RedisSpec {
            managed: None,
            external: Some(ExternalRedis { url: Some("redis://r:6379".into()), url_secret_ref: None }),
        };
        wsc.spec.node_tuning.enabled = true;
        let all = build_all(&wsc);
        assert!(all.redis.is_none() && all.redis_service.is_none() && all.tuning.is_some());
    }

    #[test]
    fn long_names_get_a_short_stable_prefix() {
        let mut wsc = sample(&"x".repeat(70));
        let p = redis_prefix(&wsc);
        assert!(p.starts_with("wsc-") && p.len() <= 64, "{p}");
        assert_eq!(p, redis_prefix(&wsc));
        wsc.metadata.name = Some("y".repeat(70));
        assert_ne!(p, redis_prefix(&wsc));
    }
}
