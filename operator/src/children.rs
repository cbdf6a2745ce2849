//! Pure: the objects a `WebSocketCluster` owns, one `build_<kind>` per child. Every child has a
//! deterministic name and the cluster's labels; every child in the cluster's namespace has a
//! controller owner reference, so garbage collection removes it with the cluster and the
//! controller sees its changes.
//!
//! | child | name | when |
//! |---|---|---|
//! | server Deployment | `<name>-server` | always |
//! | client Service | `<name>` | always |
//! | PodDisruptionBudget | `<name>-server` | always |
//! | Redis Deployment, Service and NetworkPolicy | `<name>-redis` | `redis.managed` |
//! | Redis password Secret | `<name>-redis-auth` | `redis.managed` (created once, never applied) |
//! | node-tuning DaemonSet | `<namespace>-<name>` in the operator's tuning namespace | `nodeTuning.enabled` |
//!
//! The tuning DaemonSet is the one child outside the tenant's namespace: it is privileged, so it
//! runs the operator's tuner image ([`Settings`]) with the tuner's own tolerations, in a
//! namespace the tenant cannot write to. Owner references cannot cross namespaces, so it carries
//! its cluster's namespace, name and uid as labels instead ([`TUNING_OWNER_LABELS`]), and the
//! controller removes one whose cluster is gone.
//!
//! No client here; [`crate::controller`] applies what these return.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource, ExecAction, HTTPGetAction,
    Lifecycle, LifecycleHandler, ObjectFieldSelector, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SeccompProfile, Secret, SecretKeySelector, SecretVolumeSource, SecurityContext, Service,
    ServicePort, ServiceSpec as K8sServiceSpec, SleepAction, Sysctl, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec,
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
/// The user the Redis image runs as (the upstream image's `redis` user, and the local one's).
pub const REDIS_UID: i64 = 999;
/// Keys of the Redis password Secret: the password itself (servers, probe, operator) and a
/// Redis configuration file that sets it (`requirepass`), read by `redis-server` at start.
pub const REDIS_PASSWORD_KEY: &str = "password";
pub const REDIS_CONF_KEY: &str = "redis.conf";
const REDIS_CONF_DIR: &str = "/etc/wsfleet-redis";

/// Pod-template annotation of the servers and the managed Redis: the uid of the password Secret
/// they start with. A recreated Secret (a new password) rolls both together, so they agree.
pub const REDIS_AUTH_ANNOTATION: &str = "wsfleet.dev/redis-auth-secret-uid";

/// Labels that tie a tuning DaemonSet to its cluster: namespace, name, uid.
pub const TUNING_OWNER_LABELS: [&str; 3] =
    ["wsfleet.dev/cluster-namespace", "wsfleet.dev/cluster-name", "wsfleet.dev/cluster-uid"];

/// What the operator (its flags, the chart's values), not the tenant, decides about children.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Image of the node tuner; it must have the `tune` subcommand (the server image does).
    pub tuner_image: String,
    /// Namespace of the tuning DaemonSets (allowed to run privileged pods; no tenant's).
    pub tuning_namespace: String,
    /// The operator's own namespace when it runs in the cluster: its pods may reach managed
    /// Redis (they read the fleet's connection total there).
    pub operator_namespace: Option<String>,
}

impl Settings {
    /// The server image of this operator's release: what `--tuner-image` defaults to.
    pub fn default_tuner_image() -> String {
        format!("ghcr.io/wsfleet/wsfleet-server:{}", env!("CARGO_PKG_VERSION"))
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            tuner_image: Self::default_tuner_image(),
            tuning_namespace: "wsfleet-tuning".into(),
            operator_namespace: None,
        }
    }
}

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
pub fn redis_secret_name(wsc: &WebSocketCluster) -> String {
    format!("{}-redis-auth", wsc.name_any())
}
/// `<namespace>-<name>` (it shares the tuning namespace with every tenant's), or a hash of it
/// when that is longer than a label value may be.
pub fn tuning_name(wsc: &WebSocketCluster) -> String {
    let full = format!("{}-{}", wsc.namespace().unwrap_or_default(), wsc.name_any());
    if full.len() <= 63 { full } else { format!("wsc-{:016x}", fnv(&full)) }
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// The key prefix of this fleet in Redis, so several fleets can share one (external) Redis.
pub fn redis_prefix(wsc: &WebSocketCluster) -> String {
    let full = format!("{}.{}", wsc.namespace().unwrap_or_default(), wsc.name_any());
    if full.len() <= 64 {
        return full;
    }
    // Deterministic and short: FNV-1a of the full name.
    format!("wsc-{:016x}", fnv(&full))
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

fn env_from_secret(name: &str, secret: SecretKeySelector) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource { secret_key_ref: Some(secret), ..Default::default() }),
        ..Default::default()
    }
}

/// Where the managed Redis password is: the Secret the operator creates.
pub fn redis_password_ref(wsc: &WebSocketCluster) -> SecretKeySelector {
    SecretKeySelector { name: redis_secret_name(wsc), key: REDIS_PASSWORD_KEY.into(), optional: None }
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
    if let Some(budget) = spec.drain.max_reconnects_per_second {
        vars.push(env(server_env::DRAIN_MAX_RECONNECTS_PER_SECOND, budget));
    }
    match (redis_url(wsc), spec.redis.external.as_ref().and_then(|e| e.url_secret_ref.clone())) {
        (Some(url), _) => vars.push(env(server_env::REDIS_URL, url)),
        (None, Some(secret)) => vars.push(env_from_secret(server_env::REDIS_URL, secret)),
        (None, None) => {}
    }
    let password = match (&spec.redis.managed, &spec.redis.external) {
        (Some(_), _) => Some(redis_password_ref(wsc)),
        (None, Some(ext)) => ext.password_secret_ref.clone(),
        (None, None) => None,
    };
    if let Some(password) = password {
        vars.push(env_from_secret(server_env::REDIS_PASSWORD, password));
    }
    if let Some(auth) = &spec.auth {
        if !auth.allowed_origins.is_empty() {
            vars.push(env(server_env::ALLOWED_ORIGINS, auth.allowed_origins.join(",")));
        }
        if let Some(secret) = &auth.jwt_secret_ref {
            vars.push(env_from_secret(server_env::JWT_SECRET, secret.clone()));
            // The server refuses an audience or issuer without a secret, so they go only with it.
            if let Some(audience) = &auth.audience {
                vars.push(env(server_env::JWT_AUDIENCE, audience));
            }
            if let Some(issuer) = &auth.issuer {
                vars.push(env(server_env::JWT_ISSUER, issuer));
            }
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

fn runtime_default_seccomp() -> Option<SeccompProfile> {
    Some(SeccompProfile { type_: "RuntimeDefault".into(), localhost_profile: None })
}

/// A container that meets the `restricted` Pod Security level.
fn restricted_container_security() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
        seccomp_profile: runtime_default_seccomp(),
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
                        seccomp_profile: runtime_default_seccomp(),
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

/// Managed Redis as a pub/sub bus: no persistence, no eviction of history, `maxmemory` from the
/// spec, output buffers sized for subscribers that each serve a whole pod. It requires the
/// password of the cluster's Secret: `redis-server` reads `requirepass` from the Secret mounted
/// as a configuration file, so the password is neither in the pod spec nor on the process's
/// command line (which `ps` shows to anyone on the node); protected mode stays on. The readiness
/// probe's `redis-cli` authenticates with `REDISCLI_AUTH`, a reference to the same Secret.
pub fn build_redis_deployment(wsc: &WebSocketCluster) -> Option<Deployment> {
    let managed = wsc.spec.redis.managed.as_ref()?;
    let max_memory = crate::validate::quantity_bytes(&managed.max_memory).unwrap_or(256 << 20);
    let container = Container {
        name: "redis".into(),
        image: Some(managed.image.clone()),
        args: Some(
            [
                "redis-server".to_owned(),
                format!("{REDIS_CONF_DIR}/{REDIS_CONF_KEY}"),
                "--save".into(),
                "".into(),
                "--appendonly".into(),
                "no".into(),
                "--protected-mode".into(),
                "yes".into(),
                "--maxmemory".into(),
                max_memory.to_string(),
                "--maxmemory-policy".into(),
                "noeviction".into(),
                "--client-output-buffer-limit".into(),
                format!("pubsub {}", managed.pubsub_buffer_limit),
            ]
            .into(),
        ),
        env: Some(vec![env_from_secret("REDISCLI_AUTH", redis_password_ref(wsc))]),
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
            // Headroom over maxmemory: client buffers and allocator fragmentation.
            let limit = max_memory + max_memory / 4 + (64 << 20);
            Some(ResourceRequirements {
                requests: Some(BTreeMap::from([
                    ("cpu".into(), Quantity("100m".into())),
                    ("memory".into(), Quantity(max_memory.to_string())),
                ])),
                limits: Some(BTreeMap::from([("memory".into(), Quantity(limit.to_string()))])),
                ..Default::default()
            })
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "auth".into(),
                mount_path: REDIS_CONF_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount { name: "data".into(), mount_path: "/data".into(), ..Default::default() },
        ]),
        security_context: Some(restricted_container_security()),
        ..Default::default()
    };
    let volumes = vec![
        Volume {
            name: "auth".into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(redis_secret_name(wsc)),
                items: Some(vec![k8s_openapi::api::core::v1::KeyToPath {
                    key: REDIS_CONF_KEY.into(),
                    path: REDIS_CONF_KEY.into(),
                    mode: None,
                }]),
                // Readable by the Redis group only (fsGroup below).
                default_mode: Some(0o440),
                ..Default::default()
            }),
            ..Default::default()
        },
        // The working directory; nothing is persisted, the root filesystem stays read-only.
        Volume { name: "data".into(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Default::default() },
    ];
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
                spec: Some(PodSpec {
                    containers: vec![container],
                    volumes: Some(volumes),
                    automount_service_account_token: Some(false),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(REDIS_UID),
                        run_as_group: Some(REDIS_UID),
                        fs_group: Some(REDIS_UID),
                        seccomp_profile: runtime_default_seccomp(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    })
}

/// The managed Redis password Secret, holding `password` and a Redis configuration file that
/// sets it. Created once by the controller with a random password (see
/// [`crate::controller`]): an apply would regenerate it.
pub fn build_redis_secret(wsc: &WebSocketCluster, password: &str) -> Secret {
    let mut metadata = meta(wsc, redis_secret_name(wsc), Component::Redis);
    // Not one of the watched children: nothing caches Secrets.
    if let Some(l) = metadata.labels.as_mut() {
        l.remove("app.kubernetes.io/managed-by");
    }
    Secret {
        metadata,
        type_: Some("Opaque".into()),
        string_data: Some(BTreeMap::from([
            (REDIS_PASSWORD_KEY.to_owned(), password.to_owned()),
            (REDIS_CONF_KEY.to_owned(), format!("requirepass {password}\n")),
        ])),
        ..Default::default()
    }
}

/// Ingress to the managed Redis only from this cluster's server pods (and from the operator's
/// namespace when the operator runs in the cluster: it reads the fleet's connection total).
/// Enforced only where the network plugin implements NetworkPolicy.
pub fn build_redis_network_policy(wsc: &WebSocketCluster, settings: &Settings) -> Option<NetworkPolicy> {
    wsc.spec.redis.managed.as_ref()?;
    let mut from = vec![NetworkPolicyPeer {
        pod_selector: Some(LabelSelector {
            match_labels: Some(selector_labels(wsc, Component::Server)),
            ..Default::default()
        }),
        ..Default::default()
    }];
    if let Some(ns) = &settings.operator_namespace {
        from.push(NetworkPolicyPeer {
            namespace_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), ns.clone())])),
                ..Default::default()
            }),
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([("app.kubernetes.io/component".to_owned(), "operator".to_owned())])),
                ..Default::default()
            }),
            ..Default::default()
        });
    }
    Some(NetworkPolicy {
        metadata: meta(wsc, redis_name(wsc), Component::Redis),
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(selector_labels(wsc, Component::Redis)),
                ..Default::default()
            }),
            policy_types: Some(vec!["Ingress".into()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                from: Some(from),
                ports: Some(vec![NetworkPolicyPort {
                    port: Some(IntOrString::Int(REDIS_PORT)),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
            }]),
            ..Default::default()
        }),
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

/// Labels of a tuning DaemonSet and its pods: the tuning component's, plus the owning cluster's
/// namespace (so two tenants' clusters of one name do not select each other's pods), name and uid.
fn tuning_labels(wsc: &WebSocketCluster) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    let mut selector = selector_labels(wsc, Component::Tuning);
    selector.insert(TUNING_OWNER_LABELS[0].into(), wsc.namespace().unwrap_or_default());
    let mut all = labels(wsc, Component::Tuning);
    all.extend(selector.clone());
    all.insert(TUNING_OWNER_LABELS[1].into(), wsc.name_any());
    all.insert(TUNING_OWNER_LABELS[2].into(), wsc.uid().unwrap_or_default());
    (selector, all)
}

/// The node-tuning DaemonSet, in the operator's tuning namespace: the operator's tuner image and
/// its `tune` subcommand, privileged on the host network (node sysctls are the host's), writing
/// only the listed keys. The tenant chooses the settings (bounded), the nodes (selector) and the
/// tolerations of the tuner; never what runs privileged.
pub fn build_tuning_daemonset(wsc: &WebSocketCluster, settings: &Settings) -> Option<DaemonSet> {
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
        image: Some(settings.tuner_image.clone()),
        args: Some(args),
        // Root and privileged: node sysctls live under the host's /proc/sys.
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
    let (selector, labels) = tuning_labels(wsc);
    Some(DaemonSet {
        metadata: ObjectMeta {
            name: Some(tuning_name(wsc)),
            namespace: Some(settings.tuning_namespace.clone()),
            labels: Some(labels.clone()),
            // No owner reference: it cannot point across namespaces (see the module doc).
            ..Default::default()
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector { match_labels: Some(selector), ..Default::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..Default::default() }),
                spec: Some(PodSpec {
                    containers: vec![container],
                    host_network: Some(true),
                    // The tuner needs no API access.
                    automount_service_account_token: Some(false),
                    node_selector: tuning.node_selector.clone(),
                    tolerations: tuning.tolerations.clone(),
                    termination_grace_period_seconds: Some(5),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    })
}

/// The cluster a tuning DaemonSet belongs to, from its labels: (namespace, name, uid).
pub fn tuning_owner(ds: &DaemonSet) -> Option<(String, String, String)> {
    let labels = ds.metadata.labels.as_ref()?;
    let [ns, name, uid] = TUNING_OWNER_LABELS.map(|k| labels.get(k).cloned());
    Some((ns?, name?, uid?))
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
    pub redis_network_policy: Option<NetworkPolicy>,
    /// In [`Settings::tuning_namespace`], not the cluster's.
    pub tuning: Option<DaemonSet>,
}

/// Builds every child of `wsc` (the Redis password Secret aside: it is created once; its uid,
/// when there is one, is stamped on the server and Redis pod templates).
pub fn build_all(wsc: &WebSocketCluster, settings: &Settings, redis_auth_uid: Option<&str>) -> Children {
    let mut server = build_server_deployment(wsc);
    let mut redis = build_redis_deployment(wsc);
    if let (Some(uid), Some(redis)) = (redis_auth_uid, redis.as_mut()) {
        for d in [&mut server, redis] {
            let template = d.spec.as_mut().map(|s| s.template.metadata.get_or_insert_with(Default::default));
            if let Some(meta) = template {
                meta.annotations.get_or_insert_with(Default::default).insert(REDIS_AUTH_ANNOTATION.into(), uid.into());
            }
        }
    }
    Children {
        server,
        client_service: build_client_service(wsc),
        pdb: build_pdb(wsc),
        redis,
        redis_service: build_redis_service(wsc),
        redis_network_policy: build_redis_network_policy(wsc, settings),
        tuning: build_tuning_daemonset(wsc, settings),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crd::{ExternalRedis, ManagedRedis, RedisSpec, WebSocketClusterSpec};
    use k8s_openapi::api::core::v1::Toleration;

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
                pubsub_buffer_limit: "256mb 64mb 60".into(),
                max_memory: "256Mi".into(),
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
                password_secret_ref: None,
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
        assert!(env.iter().all(|e| e.name != "WSFLEET_JWT_AUDIENCE"), "no audience unless the spec names one");
        wsc.spec.auth.as_mut().unwrap().audience = Some("chat".into());
        wsc.spec.auth.as_mut().unwrap().issuer = Some("https://login.example".into());
        let env = build_server_deployment(&wsc).spec.unwrap().template.spec.unwrap().containers[0].env.clone().unwrap();
        let get = |n: &str| env.iter().find(|e| e.name == n).and_then(|e| e.value.clone());
        assert_eq!(get("WSFLEET_JWT_AUDIENCE").as_deref(), Some("chat"));
        assert_eq!(get("WSFLEET_JWT_ISSUER").as_deref(), Some("https://login.example"));
    }

    #[test]
    fn the_reconnect_budget_reaches_the_servers_only_when_set() {
        let mut wsc = sample("chat");
        let env_of = |wsc: &WebSocketCluster| {
            build_server_deployment(wsc).spec.unwrap().template.spec.unwrap().containers[0].env.clone().unwrap()
        };
        let budget = |env: &[EnvVar]| {
            env.iter().find(|e| e.name == "WSFLEET_DRAIN_MAX_RECONNECTS_PER_SECOND").and_then(|e| e.value.clone())
        };
        assert_eq!(budget(&env_of(&wsc)), None, "no budget unless the spec sets one");
        wsc.spec.drain =
            serde_json::from_value(serde_json::json!({"timeoutSeconds": 60, "maxReconnectsPerSecond": 250})).unwrap();
        assert_eq!(budget(&env_of(&wsc)).as_deref(), Some("250"));
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
                "audience": "chat",
                "issuer": "https://login.example",
            }))
            .unwrap(),
        );
        wsc.spec.drain.max_reconnects_per_second = Some(200);
        let env = build_server_deployment(&wsc).spec.unwrap().template.spec.unwrap().containers[0].env.clone().unwrap();
        assert!(env.len() >= 13, "{} variables: not every optional one is set", env.len());
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

    fn tuner_settings() -> Settings {
        Settings {
            tuner_image: "registry.example/wsfleet-tuner:1".into(),
            tuning_namespace: "wsfleet-system-tuning".into(),
            operator_namespace: Some("wsfleet-system".into()),
        }
    }

    #[test]
    fn tuning_daemonset_only_when_enabled() {
        let mut wsc = sample("chat");
        assert!(build_tuning_daemonset(&wsc, &tuner_settings()).is_none());
        wsc.spec.node_tuning.enabled = true;
        wsc.spec.node_tuning.sysctls = BTreeMap::from([("net.core.somaxconn".into(), "65535".into())]);
        let ds = build_tuning_daemonset(&wsc, &tuner_settings()).unwrap();
        assert_eq!(ds.metadata.name.as_deref(), Some("team-a-chat"));
        let pod = ds.spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.host_network, Some(true));
        assert_eq!(pod.automount_service_account_token, Some(false));
        assert_eq!(pod.containers[0].args.clone().unwrap(), ["tune", "--sysctl", "net.core.somaxconn=65535"]);
        let security = pod.containers[0].security_context.as_ref().unwrap();
        assert_eq!((security.privileged, security.run_as_user), (Some(true), Some(0)));
    }

    #[test]
    fn the_tuner_is_the_operators_not_the_tenants() {
        let mut wsc = sample("chat");
        wsc.spec.image = "evil.example/root-shell:latest".into();
        wsc.spec.image_pull_policy = Some(crate::crd::PullPolicy::Always);
        let everywhere = Toleration { operator: Some("Exists".into()), ..Default::default() };
        wsc.spec.tolerations = Some(vec![everywhere]);
        wsc.spec.node_tuning.enabled = true;
        let ds = build_tuning_daemonset(&wsc, &tuner_settings()).unwrap();
        // In the operator's tuning namespace, tied to its cluster by labels, not owner references.
        assert_eq!(ds.metadata.namespace.as_deref(), Some("wsfleet-system-tuning"));
        assert!(ds.metadata.owner_references.is_none());
        assert_eq!(tuning_owner(&ds), Some(("team-a".into(), "chat".into(), "uid-1".into())));
        let pod = ds.spec.as_ref().unwrap().template.spec.clone().unwrap();
        assert_eq!(pod.containers[0].image.as_deref(), Some("registry.example/wsfleet-tuner:1"));
        assert_eq!(pod.containers[0].image_pull_policy, None);
        assert_eq!(pod.tolerations, None, "the servers' tolerations reach the tuner");
        // The tuner's own tolerations do.
        let control_plane = Toleration {
            key: Some("node-role.kubernetes.io/control-plane".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        };
        wsc.spec.node_tuning.tolerations = Some(vec![control_plane.clone()]);
        let pod = build_tuning_daemonset(&wsc, &tuner_settings()).unwrap().spec.unwrap().template.spec.unwrap();
        assert_eq!(pod.tolerations, Some(vec![control_plane]));
        // Two tenants' clusters of one name select different pods.
        let mut other = sample("chat");
        other.metadata.namespace = Some("team-b".into());
        other.spec.node_tuning.enabled = true;
        let other = build_tuning_daemonset(&other, &tuner_settings()).unwrap();
        assert_ne!(other.metadata.name, ds.metadata.name);
        assert_ne!(other.spec.unwrap().selector, ds.spec.unwrap().selector);
        let long = sample(&"x".repeat(63));
        assert!(tuning_name(&long).len() <= 63);
    }

    /// What the `restricted` Pod Security level checks, on a pod spec.
    fn assert_restricted(pod: &PodSpec) {
        let pod_sc = pod.security_context.clone().unwrap_or_default();
        for c in &pod.containers {
            let sc = c.security_context.clone().unwrap_or_default();
            let seccomp = sc.seccomp_profile.or(pod_sc.seccomp_profile.clone()).map(|p| p.type_);
            assert_eq!(seccomp.as_deref(), Some("RuntimeDefault"), "{}", c.name);
            assert_eq!(sc.run_as_non_root.or(pod_sc.run_as_non_root), Some(true), "{}", c.name);
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
            assert_eq!(sc.capabilities.and_then(|c| c.drop), Some(vec!["ALL".to_owned()]), "{}", c.name);
            assert_ne!(sc.privileged, Some(true));
        }
        assert_ne!(pod.host_network, Some(true));
    }

    #[test]
    fn server_and_redis_pods_meet_the_restricted_level() {
        let wsc = sample("chat");
        assert_restricted(&build_server_deployment(&wsc).spec.unwrap().template.spec.unwrap());
        let redis = build_redis_deployment(&wsc).unwrap().spec.unwrap().template.spec.unwrap();
        assert_restricted(&redis);
        assert_eq!(redis.security_context.unwrap().run_as_user, Some(REDIS_UID));
    }

    #[test]
    fn redis_requires_the_password_of_the_clusters_secret() {
        let wsc = sample("chat");
        let secret = build_redis_secret(&wsc, "s3cret");
        assert_eq!(secret.metadata.name.as_deref(), Some("chat-redis-auth"));
        assert_eq!(secret.metadata.owner_references.as_ref().unwrap()[0].uid, "uid-1");
        let data = secret.string_data.unwrap();
        assert_eq!((data["password"].as_str(), data["redis.conf"].as_str()), ("s3cret", "requirepass s3cret\n"));

        let redis = build_redis_deployment(&wsc).unwrap();
        let yaml = serde_json::to_string(&redis).unwrap();
        assert!(!yaml.contains("s3cret"), "the password is not in the pod spec");
        let pod = redis.spec.unwrap().template.spec.unwrap();
        let c = &pod.containers[0];
        let args = c.args.clone().unwrap();
        assert_eq!(&args[..2], ["redis-server", "/etc/wsfleet-redis/redis.conf"]);
        assert!(args.windows(2).any(|w| w == ["--protected-mode", "yes"]), "{args:?}");
        assert!(args.windows(2).any(|w| w == ["--maxmemory", "268435456"]), "{args:?}");
        assert!(args.windows(2).any(|w| w == ["--maxmemory-policy", "noeviction"]), "{args:?}");
        let auth = pod.volumes.unwrap().into_iter().find(|v| v.name == "auth").unwrap().secret.unwrap();
        assert_eq!(auth.secret_name.as_deref(), Some("chat-redis-auth"));
        let probe_auth = c.env.clone().unwrap().into_iter().find(|e| e.name == "REDISCLI_AUTH").unwrap();
        assert_eq!(probe_auth.value_from.unwrap().secret_key_ref, Some(redis_password_ref(&wsc)));
        let limits = c.resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits["memory"].0, ((256u64 << 20) * 5 / 4 + (64 << 20)).to_string(), "headroom over maxmemory");

        let env = build_server_deployment(&wsc).spec.unwrap().template.spec.unwrap().containers[0].env.clone();
        let password = env.unwrap().into_iter().find(|e| e.name == "WSFLEET_REDIS_PASSWORD").unwrap();
        assert_eq!(password.value, None);
        assert_eq!(password.value_from.unwrap().secret_key_ref, Some(redis_password_ref(&wsc)));
    }

    #[test]
    fn only_the_clusters_servers_and_the_operator_reach_its_redis() {
        let wsc = sample("chat");
        let policy = build_redis_network_policy(&wsc, &tuner_settings()).unwrap();
        let spec = policy.spec.unwrap();
        assert_eq!(spec.pod_selector.unwrap().match_labels, Some(selector_labels(&wsc, Component::Redis)));
        assert_eq!(spec.policy_types, Some(vec!["Ingress".to_owned()]));
        let rule = &spec.ingress.unwrap()[0];
        assert_eq!(rule.ports.as_ref().unwrap()[0].port, Some(IntOrString::Int(6379)));
        let from = rule.from.clone().unwrap();
        assert_eq!(from[0].pod_selector.as_ref().unwrap().match_labels, Some(selector_labels(&wsc, Component::Server)));
        assert!(from[0].namespace_selector.is_none(), "servers of this namespace only");
        let operator = from[1].namespace_selector.as_ref().unwrap().match_labels.clone().unwrap();
        assert_eq!(operator["kubernetes.io/metadata.name"], "wsfleet-system");
        assert_eq!(from.len(), 2);
        let outside = Settings { operator_namespace: None, ..tuner_settings() };
        assert_eq!(
            build_redis_network_policy(&wsc, &outside).unwrap().spec.unwrap().ingress.unwrap()[0]
                .from
                .as_ref()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn build_all_follows_the_optional_parts_of_the_spec() {
        let mut wsc = sample("chat");
        let all = build_all(&wsc, &Settings::default(), Some("secret-uid-1"));
        assert!(all.redis.is_some() && all.redis_service.is_some() && all.tuning.is_none());
        assert!(all.redis_network_policy.is_some());
        // Servers and Redis start with the same password Secret, and roll together on a new one.
        for d in [&all.server, all.redis.as_ref().unwrap()] {
            let template = d.spec.as_ref().unwrap().template.metadata.clone().unwrap();
            assert_eq!(template.annotations.unwrap()[REDIS_AUTH_ANNOTATION], "secret-uid-1");
        }
        assert_eq!(all.server.metadata.name.as_deref(), Some("chat-server"));
        wsc.spec.redis = RedisSpec {
            managed: None,
            external: Some(ExternalRedis {
                url: Some("redis://r:6379".into()),
                url_secret_ref: None,
                password_secret_ref: Some(SecretKeySelector { name: "r".into(), key: "pw".into(), optional: None }),
            }),
        };
        wsc.spec.node_tuning.enabled = true;
        let all = build_all(&wsc, &Settings::default(), None);
        assert!(all.redis.is_none() && all.redis_service.is_none() && all.tuning.is_some());
        assert!(all.redis_network_policy.is_none());
        let env = all.server.spec.unwrap().template.spec.unwrap().containers[0].env.clone().unwrap();
        let password = env.iter().find(|e| e.name == "WSFLEET_REDIS_PASSWORD").unwrap();
        assert_eq!(password.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap().key, "pw");
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
