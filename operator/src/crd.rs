//! The `WebSocketCluster` API (`wsfleet.dev/v1alpha1`): spec (intent), status (observation),
//! the condition types and reasons the operator reports, and the validation the API server
//! enforces (OpenAPI bounds and defaults, CEL rules), so a bad spec is refused at `kubectl
//! apply` with the field named instead of being accepted and then crash-looping.
//!
//! Pure data: no client here.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, ResourceRequirements, SecretKeySelector, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A fleet of wsfleet WebSocket servers sharing channels through Redis.
// Each printcolumn repeats `type_ = ...`; clippy takes those for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "wsfleet.dev",
    version = "v1alpha1",
    doc = "A WebSocketCluster is a fleet of wsfleet WebSocket servers sharing channels through Redis: server pods, a client Service, a disruption budget, a managed or external Redis bus and optional node tuning.",
    kind = "WebSocketCluster",
    namespaced,
    shortname = "wsc",
    category = "wsfleet",
    status = "WebSocketClusterStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas", description = "Server pods wanted"),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyReplicas",
        description = "Server pods ready"
    ),
    printcolumn(
        name = "Connections",
        type_ = "integer",
        json_path = ".status.connections",
        description = "Live connections across the fleet (empty when unknown)"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Reason of the Ready condition"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct WebSocketClusterSpec {
    /// Number of server pods. The scale subresource points here, so `kubectl scale` and a
    /// HorizontalPodAutoscaler work.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// Container image of the servers. (The node-tuning DaemonSet runs the operator's tuner image,
    /// never this one.)
    #[serde(default = "default_image")]
    #[schemars(length(min = 1))]
    pub image: String,

    /// Image pull policy of the server pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,

    /// Compute resources of each server container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    /// WebSocket port of the servers and of the client Service (1024 or above: the servers run
    /// without privileges).
    #[serde(default = "default_port")]
    #[schemars(range(min = 1024, max = 65535))]
    #[x_kube(validation = Rule::new("self != 9090").message("port 9090 is the servers' health and metrics port"))]
    pub port: i32,

    /// Node selector of the server pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// Tolerations of the server pods (not of the node tuner: see `nodeTuning.tolerations`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    /// Affinity of the server pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    /// Extra annotations on the server pods (e.g. for a metrics scraper).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_annotations: Option<BTreeMap<String, String>>,

    /// Most WebSocket connections per pod; a full pod answers new upgrades with 503 and
    /// Retry-After, so clients move to another pod.
    #[serde(default = "default_max_connections")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub max_connections_per_pod: i64,

    /// The Service clients connect to.
    #[serde(default)]
    pub service: ServiceSpec,

    /// The message bus: exactly one of `managed` (the operator runs Redis) or `external`.
    pub redis: RedisSpec,

    /// Per-channel history that lets clients resume without loss.
    #[serde(default)]
    pub history: HistorySpec,

    /// How a terminating server pod closes its clients.
    #[serde(default)]
    pub drain: DrainSpec,

    /// Rolling update settings of the server Deployment.
    #[serde(default)]
    pub rollout: RolloutSpec,

    /// Kernel tuning of the nodes that run servers.
    #[serde(default)]
    pub node_tuning: NodeTuningSpec,

    /// Who may connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<AuthSpec>,
}

fn default_replicas() -> i32 {
    3
}
fn default_image() -> String {
    format!("ghcr.io/wsfleet/wsfleet-server:{}", env!("CARGO_PKG_VERSION"))
}
fn default_port() -> i32 {
    8080
}
fn default_max_connections() -> i64 {
    100_000
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Service type.
    #[serde(default, rename = "type")]
    pub type_: ServiceType,
    /// `ClientIP` keeps a client on the same pod across reconnects (connection affinity).
    #[serde(default)]
    pub session_affinity: SessionAffinity,
    /// Annotations of the Service (e.g. for a cloud load balancer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema, Default)]
pub enum ServiceType {
    #[default]
    ClusterIP,
    NodePort,
    LoadBalancer,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, schemars::JsonSchema, Default)]
pub enum SessionAffinity {
    #[default]
    None,
    ClientIP,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.managed) != has(self.external)").message("set exactly one of redis.managed or redis.external"))]
pub struct RedisSpec {
    /// The operator runs a Redis Deployment and Service (`<name>-redis`) configured as a
    /// pub/sub bus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed: Option<ManagedRedis>,
    /// A Redis the fleet uses as it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalRedis>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct ManagedRedis {
    /// Redis image.
    #[serde(default = "default_redis_image")]
    pub image: String,
    /// Compute resources of the Redis container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// Pub/sub output buffer limit per subscriber connection (each server pod holds one):
    /// `<hard> <soft> <soft seconds>`, e.g. `256mb 64mb 60`.
    #[serde(default = "default_pubsub_limit")]
    #[schemars(regex(pattern = r"^[0-9]+[kmg]?b? [0-9]+[kmg]?b? [0-9]+$"))]
    pub pubsub_buffer_limit: String,
    /// Redis `maxmemory` (16Mi to 1024Gi, e.g. `256Mi`, `2Gi`). With the `noeviction` policy a
    /// full Redis refuses new publishes (the publisher is told) instead of evicting history
    /// silently. Without `resources`, the container asks for this much memory and is limited to
    /// a quarter more plus 64Mi (buffers, fragmentation).
    #[serde(default = "default_max_memory")]
    #[schemars(regex(pattern = r"^[1-9][0-9]{0,6}(Ki|Mi|Gi)$"))]
    pub max_memory: String,
}

fn default_redis_image() -> String {
    "redis:7.2-alpine".into()
}
fn default_pubsub_limit() -> String {
    "256mb 64mb 60".into()
}
fn default_max_memory() -> String {
    "256Mi".into()
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.url) != has(self.urlSecretRef)").message("set exactly one of redis.external.url or redis.external.urlSecretRef"))]
pub struct ExternalRedis {
    /// Redis URL, e.g. `redis://redis.example:6379` (TLS, `rediss://`, is not supported yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^redis://"))]
    pub url: Option<String>,
    /// A Secret key holding the Redis URL (for URLs with a password).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_secret_ref: Option<SecretKeySelector>,
    /// A Secret key holding the Redis password (AUTH), for a `url` without one. It reaches the
    /// servers by reference; the operator does not read it (the fleet's connection total is then
    /// unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeySelector>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct HistorySpec {
    /// Messages kept per channel; 0 turns recovery off (offsets and epochs still work).
    #[serde(default = "default_history_size")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub size: i64,
    /// Seconds a channel's order and history outlive its last publish.
    #[serde(default = "default_history_ttl")]
    #[schemars(range(min = 1, max = 2_592_000))]
    pub ttl_seconds: i64,
}

impl Default for HistorySpec {
    fn default() -> Self {
        HistorySpec { size: default_history_size(), ttl_seconds: default_history_ttl() }
    }
}
fn default_history_size() -> i64 {
    1000
}
fn default_history_ttl() -> i64 {
    300
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainSpec {
    /// Seconds over which a terminating pod spreads the closes (code 1012) of its clients.
    #[serde(default = "default_drain")]
    #[schemars(range(min = 1, max = 3600))]
    pub timeout_seconds: i64,

    /// Most clients the whole fleet's terminating pods may close (1012) per second, together:
    /// pods that drain at the same time (a rolling update with `maxUnavailable` above 1, a
    /// scale-down by several replicas) share this budget through the cluster's Redis, so the
    /// rate at which clients come back to the remaining pods stays under it. With a budget, a
    /// pod closes its clients as fast as the budget allows instead of spreading them over the
    /// drain window. The drain window wins when the two conflict: clients still open when
    /// three quarters of `timeoutSeconds` are over are closed anyway (counted in
    /// `wsfleet_drain_closes_forced_total`), because the pod is killed at the end of its grace
    /// period and a killed pod's clients get no close and no reconnect hint at all. Unset: no
    /// budget (each pod spreads its closes evenly over three quarters of `timeoutSeconds`).
    /// There is no default: the right rate is what the remaining pods can absorb (handshakes
    /// and resumes per second), which the operator cannot know, and a rate derived from the
    /// fleet's size alone either never binds or forces closes at the window's end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10_000_000))]
    pub max_reconnects_per_second: Option<i64>,
}

impl Default for DrainSpec {
    fn default() -> Self {
        DrainSpec { timeout_seconds: default_drain(), max_reconnects_per_second: None }
    }
}
fn default_drain() -> i64 {
    30
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(self.maxSurge in ['0', '0%'] && self.maxUnavailable in ['0', '0%'])").message("rollout.maxSurge and rollout.maxUnavailable cannot both be zero"))]
pub struct RolloutSpec {
    /// Extra pods during a rollout: a number or a percentage of replicas.
    #[serde(default = "default_surge")]
    #[schemars(regex(pattern = r"^([0-9]+|[0-9]{1,3}%)$"))]
    pub max_surge: String,
    /// Pods that may be unavailable during a rollout: a number or a percentage of replicas.
    #[serde(default = "default_unavailable")]
    #[schemars(regex(pattern = r"^([0-9]+|[0-9]{1,3}%)$"))]
    pub max_unavailable: String,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        RolloutSpec { max_surge: default_surge(), max_unavailable: default_unavailable() }
    }
}
fn default_surge() -> String {
    "25%".into()
}
fn default_unavailable() -> String {
    "0".into()
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeTuningSpec {
    /// Ask the operator to tune the nodes: it runs a DaemonSet of its own tuner image,
    /// privileged on the host network, in the operator's tuning namespace (never in this one),
    /// which writes only the settings below.
    #[serde(default)]
    pub enabled: bool,
    /// Kernel settings to write on each node, e.g. `net.core.somaxconn: "65535"`. Keys must be
    /// on the allow-list and values within each key's bounds (whole numbers separated by one
    /// space); the API server and the operator both refuse anything else.
    #[serde(default)]
    #[schemars(schema_with = "sysctls_schema")]
    pub sysctls: BTreeMap<String, String>,
    /// Nodes to tune (default: every node the tolerations admit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// Tolerations of the tuner pods (default: none, so tainted nodes such as control-plane
    /// nodes are not tuned). The servers' `tolerations` do not apply to the tuner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
}

/// The map's shape: at most one entry per allow-listed key (which also bounds the CEL rules'
/// cost, as the API server requires), values of whole numbers; then one CEL rule for the keys
/// and one per key for its value, generated from the contract's bounds.
fn sysctls_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let mut rules = vec![serde_json::json!({"rule": sysctl_keys_rule(), "message": sysctl_keys_message()})];
    rules.extend(
        wsfleet_contract::tune::SYSCTL_BOUNDS
            .iter()
            .map(|b| serde_json::json!({"rule": b.cel_rule(), "message": b.describe()})),
    );
    schemars::json_schema!({
        "type": "object",
        "maxProperties": wsfleet_contract::tune::ALLOWED_SYSCTLS.len(),
        "additionalProperties": {
            "type": "string",
            "maxLength": 64,
            "pattern": "^[0-9]+( [0-9]+)*$"
        },
        "default": {},
        "x-kubernetes-validations": rules
    })
}

/// CEL: every key is allow-listed (the same list the server's `tune` subcommand enforces).
pub fn sysctl_keys_rule() -> String {
    let list = wsfleet_contract::tune::ALLOWED_SYSCTLS.iter().map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", ");
    format!("self.all(k, k in [{list}])")
}

pub fn sysctl_keys_message() -> String {
    format!("sysctl keys must be one of: {}", wsfleet_contract::tune::ALLOWED_SYSCTLS.join(", "))
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// `Origin` values browsers may connect from (exact match); empty allows any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowed_origins: Vec<String>,
    /// A Secret key holding an HS256 secret (32 bytes or more, checked by the operator before it
    /// rolls out servers). When set, every upgrade needs an unexpired JWT signed with it
    /// (`Authorization: Bearer <jwt>` or `?access_token=<jwt>`), else the server answers 401.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret_ref: Option<SecretKeySelector>,
    /// With `jwtSecretRef`: tokens must name this audience (`aud`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub audience: Option<String>,
    /// With `jwtSecretRef`: tokens must come from this issuer (`iss`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub issuer: Option<String>,
}

/// What the operator observed, written only through the status subresource.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct WebSocketClusterStatus {
    /// The generation of the spec this status describes; advanced only after every child was
    /// applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Server pods that exist (from the server Deployment).
    #[serde(default)]
    pub replicas: i32,
    /// Server pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Server pods running the current spec.
    #[serde(default)]
    pub updated_replicas: i32,
    /// Label selector of the server pods, for the scale subresource.
    #[serde(default)]
    pub selector: String,
    /// Live connections across the fleet, from the servers' heartbeats in Redis. Absent when
    /// the operator cannot read them; `connectionsUnknownReason` then says why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<i64>,
    /// Why `connections` is absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections_unknown_reason: Option<String>,
    /// The message bus.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RedisStatus>,
    /// Ready, Progressing, Degraded, RedisReady and NodeTuned.
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema, Default)]
#[serde(rename_all = "camelCase")]
pub struct RedisStatus {
    /// Where the servers reach Redis (host:port, or "from Secret <name>").
    pub endpoint: String,
    /// Whether the bus is ready (managed: its Deployment is available).
    pub ready: bool,
}

/// Condition types. Part of the API.
pub mod condition {
    pub const READY: &str = "Ready";
    pub const PROGRESSING: &str = "Progressing";
    pub const DEGRADED: &str = "Degraded";
    pub const REDIS_READY: &str = "RedisReady";
    pub const NODE_TUNED: &str = "NodeTuned";
}

/// Condition reasons (CamelCase, as Kubernetes expects). Part of the API.
pub mod reason {
    pub const ALL_REPLICAS_READY: &str = "AllReplicasReady";
    pub const REPLICAS_NOT_READY: &str = "ReplicasNotReady";
    pub const SCALED_TO_ZERO: &str = "ScaledToZero";
    pub const REDIS_NOT_READY: &str = "RedisNotReady";
    pub const ROLLING_OUT: &str = "RollingOut";
    pub const ROLLOUT_COMPLETE: &str = "RolloutComplete";
    pub const PROGRESS_DEADLINE_EXCEEDED: &str = "ProgressDeadlineExceeded";
    pub const APPLY_FAILED: &str = "ApplyFailed";
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const JWT_SECRET_INVALID: &str = "JwtSecretInvalid";
    pub const AS_EXPECTED: &str = "AsExpected";
    pub const BUS_UNAVAILABLE: &str = "BusUnavailable";
    pub const MANAGED_REDIS_AVAILABLE: &str = "ManagedRedisAvailable";
    pub const MANAGED_REDIS_UNAVAILABLE: &str = "ManagedRedisUnavailable";
    pub const EXTERNAL_REDIS: &str = "ExternalRedis";
    pub const TUNING_DISABLED: &str = "TuningDisabled";
    pub const NODES_TUNED: &str = "NodesTuned";
    pub const TUNING_IN_PROGRESS: &str = "TuningInProgress";
    pub const NO_NODES_MATCH: &str = "NoNodesMatch";
}
