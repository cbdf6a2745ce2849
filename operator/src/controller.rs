//! Reconcile one `WebSocketCluster` as a pipeline of named steps:
//!
//! 0. **check** the spec ([`validate::spec`]) and the JWT Secret it names (a GET, at most
//!    once per half resync period once it passed: Secrets are not watched, so the operator
//!    caches none); a refusal is a condition and an event, and nothing is applied;
//! 1. **build** every child from the spec (pure, [`children::build_all`]);
//! 2. **apply** them (server-side apply, one field manager), removing the optional ones the spec
//!    no longer asks for; the managed Redis password Secret is created once, before them;
//! 3. **observe** what exists: the apply's results, else the controller's caches, and the fleet's
//!    connection total from Redis;
//! 4. **status**: compute it (pure, [`status::compute`]) and patch it only when it changed.
//!
//! Events for every child created, changed or removed and for every failure. Only this module
//! and [`crate::leader`] use the API server, and this module reads children only through the
//! controller's watches: they come from the caches those watches fill ([`Stores`]), never from
//! a GET. The two Secrets it touches are the exception: the JWT Secret is read (GET) to check
//! it, and the Redis password Secret is created (POST, kept if it exists) and read back only
//! when it already existed.
//!
//! Tuning DaemonSets live in the operator's tuning namespace, where owner references to a
//! tenant's cluster cannot point (and the garbage collector would delete a dependent whose
//! owner it cannot find in the dependent's namespace). They carry their cluster's namespace,
//! name and uid as labels, and [`sweep_tuning`] deletes, every few seconds from the caches, one
//! whose cluster is gone. A sweep, not a finalizer: a finalizer would block the deletion of a
//! cluster (and of its namespace) whenever the operator is down or uninstalled, while the sweep
//! also catches what was deleted while it was away; both are the operator's state outside
//! what garbage collection can see (STYLE, habit 4).
//!
//! At scale: a resync of a cluster whose children are as last applied writes nothing (the apply
//! of an unchanged child is skipped, the status patched only when it changed); at most
//! [`MAX_CONCURRENT_RECONCILES`] reconciles run at once; an invalid spec waits
//! for a change, any other failure is retried with exponential backoff and jitter; every
//! distinct Redis gets one pooled connection; every per-cluster cache forgets a cluster that
//! has not been reconciled for a few resync periods (it was deleted).

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ObjectReference, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};
use wsfleet_contract::presence;
use wsfleet_contract::sync::lock;

use crate::FIELD_MANAGER;
use crate::children::{self, Children, Settings};
use crate::crd::{WebSocketCluster, condition, reason};
use crate::events::Events;
use crate::status::{self, Observed};
use crate::telemetry::Metrics;
use crate::validate;

/// Reconciles running at once, at most (never two of one cluster).
pub const MAX_CONCURRENT_RECONCILES: u16 = 16;
/// The first retry of a failed reconcile; each further failure doubles it, up to
/// [`BACKOFF_MAX`], and every delay is spread by ±50 % so failed clusters do not retry in step.
const BACKOFF_MIN: Duration = Duration::from_secs(5);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A cluster whose per-cluster cache entries were not refreshed for this many resync periods is
/// gone (every live cluster is reconciled at least once a period).
const FORGET_AFTER_RESYNCS: u32 = 3;
/// How long a reconcile waits for the children's caches at start-up, at most.
const CACHE_WAIT: Duration = Duration::from_secs(30);
/// How long reading a fleet's connection total may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// How often tuning DaemonSets whose cluster is gone are looked for (in the caches).
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// Resync periods a known Redis password Secret is trusted to exist before it is created (or
/// found) again: how late a deleted one is made anew.
const SECRET_RECREATE_RESYNCS: u32 = 10;
/// When a cluster waits for its JWT Secret to be fixed, how often it looks again (Secrets are
/// not watched).
const SECRET_RECHECK: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{kind} {name}: {source}")]
    Apply {
        kind: &'static str,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("status update: {0}")]
    Status(#[source] kube::Error),
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("no randomness for a password: {0}")]
    Randomness(String),
}

impl Error {
    /// The spec itself is at fault (the API server refused a child as invalid), not the moment.
    pub fn is_invalid_spec(&self) -> bool {
        match self {
            Error::InvalidSpec(_) => true,
            Error::Apply { source: kube::Error::Api(status), .. } => status.code == 422 || status.code == 400,
            _ => false,
        }
    }

    /// Label of the reconcile-errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Apply { .. } => "apply",
            Error::Status(_) => "status",
            Error::InvalidSpec(_) => "invalid_spec",
            Error::Randomness(_) => "randomness",
        }
    }
}

/// The children this operator manages, as its watches last saw them (labelled
/// `app.kubernetes.io/managed-by`), trimmed to save memory ([`Cached::trim`]: no managed
/// fields, no pod templates).
#[derive(Clone)]
pub struct Stores {
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    pub pdbs: Store<PodDisruptionBudget>,
    pub network_policies: Store<NetworkPolicy>,
    /// Only those of the tuning namespace.
    pub daemonsets: Store<DaemonSet>,
}

/// The kinds [`Stores`] holds, each with its store.
pub trait Cached: Resource<DynamicType = ()> + Clone + 'static {
    fn store(stores: &Stores) -> &Store<Self>;

    /// Drops what no reader of the cache needs, before the object is stored: its managed fields
    /// always, and more where a kind overrides this. The cache answers "does it exist, is it as
    /// applied, who owns it, how is it doing": metadata and status.
    fn trim(&mut self) {
        self.managed_fields_mut().clear();
    }
}

macro_rules! cached {
    ($($kind:ty => $field:ident),* $(,)?) => {
        $(impl Cached for $kind {
            fn store(stores: &Stores) -> &Store<Self> {
                &stores.$field
            }
        })*
    };
}
cached!(Service => services, PodDisruptionBudget => pdbs, NetworkPolicy => network_policies);

/// Workloads: the pod template is most of the object and nobody reads it from the cache (the
/// apply's skip compares generations, the status reads `status`).
macro_rules! cached_workload {
    ($($kind:ty => $field:ident),* $(,)?) => {
        $(impl Cached for $kind {
            fn store(stores: &Stores) -> &Store<Self> {
                &stores.$field
            }

            fn trim(&mut self) {
                self.managed_fields_mut().clear();
                if let Some(spec) = self.spec.as_mut() {
                    spec.template = Default::default();
                }
            }
        })*
    };
}
cached_workload!(Deployment => deployments, DaemonSet => daemonsets);

impl Stores {
    /// Resolves once every store holds its watch's first complete listing, so that "not cached"
    /// means "does not exist" (an event reason, a removal, depend on it).
    /// Bounded by [`CACHE_WAIT`]: a watch that cannot list (RBAC) must not stall every reconcile.
    pub async fn ready(&self) {
        let all = async {
            tokio::join!(
                self.deployments.wait_until_ready(),
                self.services.wait_until_ready(),
                self.pdbs.wait_until_ready(),
                self.network_policies.wait_until_ready(),
                self.daemonsets.wait_until_ready(),
            )
        };
        if tokio::time::timeout(CACHE_WAIT, all).await.is_err() {
            warn!("the children's caches are not filled after {CACHE_WAIT:?}; reconciling anyway");
        }
    }

    /// The cached child `name` in `ns`.
    pub fn get<K: Cached>(&self, ns: &str, name: &str) -> Option<Arc<K>> {
        K::store(self).get(&ObjectRef::new(name).within(ns))
    }
}

/// A namespaced child kind this operator applies: cached, serializable for the apply, readable
/// from its answer.
pub trait Child:
    Cached
    + Resource<Scope = k8s_openapi::NamespaceResourceScope>
    + k8s_openapi::Resource
    + Serialize
    + DeserializeOwned
    + std::fmt::Debug
{
}

impl<K> Child for K where
    K: Cached
        + Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + k8s_openapi::Resource
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug
{
}

/// The writing ends of [`Stores`], fed by the controller's watches in [`run`].
struct Writers {
    deployments: reflector::store::Writer<Deployment>,
    services: reflector::store::Writer<Service>,
    pdbs: reflector::store::Writer<PodDisruptionBudget>,
    network_policies: reflector::store::Writer<NetworkPolicy>,
    daemonsets: reflector::store::Writer<DaemonSet>,
}

fn stores() -> (Stores, Writers) {
    let (deployments, deployments_w) = reflector::store();
    let (services, services_w) = reflector::store();
    let (pdbs, pdbs_w) = reflector::store();
    let (network_policies, network_policies_w) = reflector::store();
    let (daemonsets, daemonsets_w) = reflector::store();
    (
        Stores { deployments, services, pdbs, network_policies, daemonsets },
        Writers {
            deployments: deployments_w,
            services: services_w,
            pdbs: pdbs_w,
            network_policies: network_policies_w,
            daemonsets: daemonsets_w,
        },
    )
}

/// A value remembered per cluster (or per child, or per Redis), and when it was last refreshed.
struct Remembered<T> {
    at: Instant,
    value: T,
}

/// Per-key memory that forgets keys not refreshed within its `ttl` (swept at most once per
/// `ttl`, so a key lives at most twice as long).
struct Memory<T> {
    ttl: Duration,
    entries: Mutex<(HashMap<String, Remembered<T>>, Instant)>,
}

impl<T: Clone> Memory<T> {
    fn new(ttl: Duration) -> Self {
        Memory { ttl, entries: Mutex::new((HashMap::new(), Instant::now())) }
    }

    /// The value of `key` if it was refreshed within `fresh`.
    fn get(&self, key: &str, fresh: Duration) -> Option<T> {
        lock(&self.entries).0.get(key).filter(|e| e.at.elapsed() < fresh.min(self.ttl)).map(|e| e.value.clone())
    }

    /// Sets (and refreshes) `key`; now and then forgets every key not refreshed within the ttl.
    fn set(&self, key: &str, value: T) {
        let mut guard = lock(&self.entries);
        let (entries, swept) = &mut *guard;
        if swept.elapsed() >= self.ttl {
            entries.retain(|_, e| e.at.elapsed() < self.ttl);
            *swept = Instant::now();
        }
        entries.insert(key.to_owned(), Remembered { at: Instant::now(), value });
    }

    fn remove(&self, key: &str) -> Option<T> {
        lock(&self.entries).0.remove(key).map(|e| e.value)
    }
}

/// A fleet total, or why it is unknown.
type Connections = Result<i64, String>;

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub events: Events,
    pub metrics: Arc<Metrics>,
    /// How often a healthy cluster is looked at again (connections, child status).
    pub resync: Duration,
    /// What the operator decides for every cluster (tuner image, tuning namespace).
    pub settings: Settings,
    /// The children as the controller's watches see them.
    pub stores: Stores,
    writers: Mutex<Option<Writers>>,
    /// Set once reconciles no longer wait for [`Stores::ready`].
    caches_filled: AtomicBool,
    /// The last fleet total read per cluster: Redis is read at most once per resync, so the
    /// status patches a changing total causes cannot drive a reconcile loop.
    connections: Memory<Connections>,
    /// One connection per distinct Redis URL, shared by every cluster on that Redis.
    redis: Memory<ConnectionManager>,
    /// Consecutive failed reconciles per cluster, for the backoff.
    failures: Memory<u32>,
    /// Per child: the hash of what was last applied, and the child's uid and [`revision`] the
    /// apply returned. While all three still hold, the child is as applied and the apply is
    /// skipped: a resync of an unchanged cluster writes nothing. (The uid: a child deleted and
    /// made anew by someone else starts again at generation 1.)
    applied: Memory<(u64, String, String)>,
    /// Per cluster uid: the password of its managed Redis, its Secret's uid, and when the
    /// Secret was last created or read.
    redis_passwords: Memory<(String, String, Instant)>,
    /// JWT Secrets that passed [`check`], per cluster uid, Secret name and key.
    jwt_secrets_passed: Memory<()>,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, resync: Duration, instance: String, settings: Settings) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: Some(instance) };
        let (stores, writers) = stores();
        let forget_after = resync * FORGET_AFTER_RESYNCS;
        Context {
            events: Events::start(Recorder::new(client.clone(), reporter), metrics.events_dropped.clone()),
            client,
            metrics,
            resync,
            settings,
            stores,
            writers: Mutex::new(Some(writers)),
            caches_filled: AtomicBool::new(false),
            connections: Memory::new(forget_after),
            redis: Memory::new(forget_after),
            failures: Memory::new(forget_after),
            applied: Memory::new(forget_after),
            redis_passwords: Memory::new(forget_after),
            jwt_secrets_passed: Memory::new(forget_after),
        }
    }

    /// The fleet total of `wsc`, read from Redis at most once per half resync period: a burst of
    /// reconciles (child events) shares one read, and every periodic resync reads afresh (a
    /// whole period would let a read made just after the last resync stand for a second one).
    async fn connections(&self, wsc: &WebSocketCluster) -> Connections {
        let key = cluster_key(wsc);
        if let Some(value) = self.connections.get(&key, self.resync / 2) {
            return value;
        }
        let value = self.read_connections(wsc).await;
        self.connections.set(&key, value.clone());
        value
    }

    /// The fleet's live connection total from the servers' heartbeats in Redis, when the
    /// operator can reach that Redis.
    async fn read_connections(&self, wsc: &WebSocketCluster) -> Connections {
        let Some(mut url) = children::redis_url(wsc) else {
            return Err("the Redis URL is in a Secret, which the operator does not read".into());
        };
        if wsc.spec.redis.external.as_ref().is_some_and(|e| e.password_secret_ref.is_some()) {
            return Err("the Redis password is in a Secret, which the operator does not read".into());
        }
        // A managed Redis is a cluster Service: only reachable (and resolvable) from inside the
        // cluster. Outside it, say so instead of asking the host's resolver about a cluster name.
        if wsc.spec.redis.managed.is_some() && std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
            return Err("the operator runs outside the cluster and cannot reach the managed Redis Service".into());
        }
        if wsc.spec.redis.managed.is_some() {
            let known = self.redis_passwords.get(&wsc.uid().unwrap_or_default(), Duration::MAX);
            let (password, _, _) = known.ok_or("the managed Redis password is not known yet")?;
            url = url.replacen("redis://", &format!("redis://:{password}@"), 1);
        }
        let mut conn = self.redis_connection(&url)?;
        let prefix = children::redis_prefix(wsc);
        let read = presence::fleet_stats(&mut conn, &prefix);
        let failed = match tokio::time::timeout(REDIS_TIMEOUT, read).await {
            Ok(Ok(pods)) => return Ok(pods.values().sum::<u64>() as i64),
            Ok(Err(e)) => format!("Redis not reachable from the operator: {e}"),
            Err(_) => "Redis not reachable from the operator: timed out".to_owned(),
        };
        // A connection that failed is not kept: the next read dials afresh (a managed Redis is
        // often not up yet at a cluster's first reconcile, and its name not yet resolvable).
        self.redis.remove(&url);
        Err(failed)
    }

    /// The pooled connection to `url` (made on first use; it reconnects by itself).
    fn redis_connection(&self, url: &str) -> Result<ConnectionManager, String> {
        let conn = match self.redis.get(url, Duration::MAX) {
            Some(conn) => conn,
            None => {
                let client = redis::Client::open(url).map_err(|e| format!("invalid Redis URL: {e}"))?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(REDIS_TIMEOUT))
                    .set_response_timeout(Some(REDIS_TIMEOUT))
                    .set_number_of_retries(1);
                ConnectionManager::new_lazy_with_config(client, config).map_err(|e| e.to_string())?
            }
        };
        // Refreshed on every use; a Redis no cluster uses any more is forgotten.
        self.redis.set(url, conn.clone());
        Ok(conn)
    }
}

/// `namespace/name`: the key of every per-cluster cache.
fn cluster_key(wsc: &WebSocketCluster) -> String {
    format!("{}/{}", wsc.namespace().unwrap_or_default(), wsc.name_any())
}

/// Runs the controller until `shutdown`, over every namespace or only `namespace`.
pub async fn run(ctx: Arc<Context>, namespace: Option<String>, shutdown: CancellationToken) {
    fn api<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    /// The watch of one child kind: fills its store and triggers the owner's reconcile.
    fn watch<K>(
        api: Api<K>,
        writer: reflector::store::Writer<K>,
    ) -> impl futures_util::Stream<Item = Result<K, watcher::Error>> + Send + 'static
    where
        K: Cached + DeserializeOwned + std::fmt::Debug + Send + Sync,
    {
        // Only the children this operator labelled are watched (and cached).
        let owned = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));
        watcher(api, owned).default_backoff().modify(K::trim).reflect(writer).touched_objects()
    }
    let Some(writers) = lock(&ctx.writers).take() else {
        error!("the controller of this context already ran");
        return;
    };
    let client = ctx.client.clone();
    let config = controller::Config::default().concurrency(MAX_CONCURRENT_RECONCILES);
    let tuning = Api::<DaemonSet>::namespaced(client.clone(), &ctx.settings.tuning_namespace);
    // The clusters' own cache holds them without managed fields (they are read, never merged).
    let (clusters, clusters_writer) = reflector::store();
    let cluster_events = watcher(api::<WebSocketCluster>(&client, &namespace), watcher::Config::default())
        .default_backoff()
        .modify(|wsc| wsc.managed_fields_mut().clear())
        .reflect(clusters_writer)
        .touched_objects();
    let controller = Controller::for_stream(cluster_events, clusters);
    let sweeper = tokio::spawn(sweep_tuning(ctx.clone(), controller.store(), namespace.clone(), shutdown.clone()));
    controller
        .with_config(config)
        .owns_stream(watch(api::<Deployment>(&client, &namespace), writers.deployments))
        .owns_stream(watch(api::<Service>(&client, &namespace), writers.services))
        .owns_stream(watch(api::<PodDisruptionBudget>(&client, &namespace), writers.pdbs))
        .owns_stream(watch(api::<NetworkPolicy>(&client, &namespace), writers.network_policies))
        // Not owned (no owner reference across namespaces): mapped to their cluster by label.
        .watches_stream(watch(tuning, writers.daemonsets), |ds: DaemonSet| {
            children::tuning_owner(&ds).map(|(ns, name, _)| ObjectRef::new(&name).within(&ns))
        })
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(name = %obj.name, namespace = ?obj.namespace, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile failed"),
            }
        })
        .await;
    sweeper.abort();
}

/// Every [`SWEEP_EVERY`] until `shutdown`: deletes the tuning DaemonSets (of clusters this
/// operator watches) whose cluster is gone or is another cluster of the same name, judged from
/// the caches once both are filled. The delete is conditioned on the DaemonSet's uid.
async fn sweep_tuning(
    ctx: Arc<Context>,
    clusters: Store<WebSocketCluster>,
    namespace: Option<String>,
    shutdown: CancellationToken,
) {
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = async { tokio::join!(clusters.wait_until_ready(), ctx.stores.daemonsets.wait_until_ready()) } => {}
    }
    let api = Api::<DaemonSet>::namespaced(ctx.client.clone(), &ctx.settings.tuning_namespace);
    loop {
        for ds in ctx.stores.daemonsets.state() {
            let Some((ns, name, uid)) = children::tuning_owner(&ds) else { continue };
            if namespace.as_ref().is_some_and(|watched| *watched != ns) {
                continue;
            }
            let alive =
                clusters.get(&ObjectRef::new(&name).within(&ns)).is_some_and(|c| c.uid().as_deref() == Some(&uid));
            if alive || ds.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let ds_name = ds.name_any();
            let params = DeleteParams {
                preconditions: Some(Preconditions { uid: ds.uid(), resource_version: None }),
                ..DeleteParams::background()
            };
            match api.delete(&ds_name, &params).await {
                Ok(_) => info!(daemonset = %ds_name, cluster = %format!("{ns}/{name}"), "removed: its cluster is gone"),
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => warn!(daemonset = %ds_name, error = %e, "could not remove a tuning DaemonSet"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SWEEP_EVERY) => {}
        }
    }
}

pub async fn reconcile(wsc: Arc<WebSocketCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let span = info_span!("reconcile", name = %wsc.name_any(), namespace = ?wsc.namespace());
    async move {
        let timer = Instant::now();
        ctx.metrics.reconciles.inc();
        let result = reconcile_steps(&wsc, &ctx).await;
        ctx.metrics.reconcile_duration.observe(timer.elapsed().as_secs_f64());
        match &result {
            Ok(_) => {
                ctx.failures.remove(&cluster_key(&wsc));
            }
            Err(e) => {
                ctx.metrics.reconcile_error(e.metric_label());
                warn!(error = %e, "reconcile failed");
            }
        }
        result
    }
    .instrument(span)
    .await
}

/// build -> apply -> observe -> status.
async fn reconcile_steps(wsc: &WebSocketCluster, ctx: &Context) -> Result<Action, Error> {
    let ns = wsc.namespace().ok_or_else(|| Error::InvalidSpec("WebSocketCluster must be namespaced".into()))?;
    if wsc.metadata.deletion_timestamp.is_some() {
        // Garbage collection removes the children; applying them now would bring them back.
        return Ok(Action::await_change());
    }
    // At start-up only: the first reconciles wait for the caches to be filled.
    if !ctx.caches_filled.load(Ordering::Acquire) {
        ctx.stores.ready().await;
        ctx.caches_filled.store(true, Ordering::Release);
    }
    if let Some((why, message)) = check(ctx, wsc, &ns).await {
        return refuse(ctx, wsc, &ns, why, message).await;
    }
    let applied = async {
        let redis_auth = ensure_redis_secret(ctx, wsc, &ns).await?;
        let desired = children::build_all(wsc, &ctx.settings, redis_auth.as_deref());
        apply_all(ctx, wsc, &ns, desired).await
    }
    .await;
    if let Err(e) = &applied {
        publish(ctx, wsc, EventType::Warning, "ApplyFailed", "Apply", e.to_string(), None);
    }
    let seen = observe(ctx, wsc, &ns, &applied).await;
    update_status(ctx, wsc, &ns, &seen).await?;
    applied?;
    Ok(Action::requeue(ctx.resync))
}

/// Step 0: what the operator refuses to build, as (reason, message): an invalid spec, or a JWT
/// Secret the servers could not start with.
async fn check(ctx: &Context, wsc: &WebSocketCluster, ns: &str) -> Option<(&'static str, String)> {
    if let Err(message) = validate::spec(wsc) {
        return Some((reason::INVALID_SPEC, message));
    }
    let selector = wsc.spec.auth.as_ref()?.jwt_secret_ref.as_ref()?;
    // A Secret that passed is trusted for half a resync period: the reconciles a rollout's child
    // events cause share one GET, and every periodic resync looks again.
    let checked = format!("{}/{}/{}", wsc.uid().unwrap_or_default(), selector.name, selector.key);
    if ctx.jwt_secrets_passed.get(&checked, ctx.resync / 2).is_some() {
        return None;
    }
    let secret = match Api::<Secret>::namespaced(ctx.client.clone(), ns).get_opt(&selector.name).await {
        Ok(secret) => secret,
        Err(e) => {
            let message = format!("cannot read Secret {} (auth.jwtSecretRef): {}", selector.name, short_error(&e));
            return Some((reason::JWT_SECRET_INVALID, message));
        }
    };
    match validate::jwt_secret(selector, secret.as_ref()) {
        Ok(()) => {
            ctx.jwt_secrets_passed.set(&checked, ());
            None
        }
        Err(message) => Some((reason::JWT_SECRET_INVALID, message)),
    }
}

/// The API server's message of an error, without the Debug dump of its Status.
fn short_error(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => status.message.clone(),
        other => other.to_string(),
    }
}

/// A refused cluster: a condition and a warning event say why; nothing is applied. An invalid
/// spec waits for a change; a bad JWT Secret is looked at again (Secrets are not watched).
async fn refuse(
    ctx: &Context,
    wsc: &WebSocketCluster,
    ns: &str,
    why: &'static str,
    message: String,
) -> Result<Action, Error> {
    warn!(reason = why, %message, "refused: nothing applied");
    publish(ctx, wsc, EventType::Warning, why, "Validate", message.clone(), None);
    let seen = Observed { refused: Some((why, message.clone())), ..cached_children(ctx, wsc, ns) };
    update_status(ctx, wsc, ns, &seen).await?;
    if why == reason::INVALID_SPEC {
        return Err(Error::InvalidSpec(message));
    }
    Ok(Action::requeue(SECRET_RECHECK))
}

/// The managed Redis password Secret: created with a random password and never applied (an
/// apply would have to carry the password, and a new one would lock the running servers out).
/// If it already exists it is kept and read once, for the operator's own reads of the fleet's
/// total. Returns the Secret's uid, which the pod templates carry: a Secret deleted and made
/// anew rolls Redis and the servers onto the new password together. A known Secret is not
/// looked at again for [`SECRET_RECREATE_RESYNCS`] resync periods, so a resync of a healthy
/// cluster writes nothing. The password is never logged.
async fn ensure_redis_secret(ctx: &Context, wsc: &WebSocketCluster, ns: &str) -> Result<Option<String>, Error> {
    if wsc.spec.redis.managed.is_none() {
        return Ok(None);
    }
    let uid = wsc.uid().unwrap_or_default();
    if let Some(known) = ctx.redis_passwords.get(&uid, Duration::MAX)
        && known.2.elapsed() < ctx.resync * SECRET_RECREATE_RESYNCS
    {
        let secret_uid = known.1.clone();
        ctx.redis_passwords.set(&uid, known);
        return Ok(Some(secret_uid));
    }
    let name = children::redis_secret_name(wsc);
    let api = Api::<Secret>::namespaced(ctx.client.clone(), ns);
    let password = random_password()?;
    let params = PostParams { field_manager: Some(FIELD_MANAGER.into()), ..Default::default() };
    let failed = |source| Error::Apply { kind: "Secret", name: name.clone(), source };
    let (password, secret_uid) = match api.create(&params, &children::build_redis_secret(wsc, &password)).await {
        Ok(created) => {
            info!(kind = "Secret", %name, "created");
            let note = format!("Secret {name} created (the managed Redis password)");
            publish(ctx, wsc, EventType::Normal, "Created", "Apply", note, Some(created.object_ref(&())));
            (password, created.uid().unwrap_or_default())
        }
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let existing = api.get(&name).await.map_err(failed)?;
            let password = existing
                .data
                .as_ref()
                .and_then(|d| d.get(children::REDIS_PASSWORD_KEY))
                .and_then(|v| String::from_utf8(v.0.clone()).ok())
                .unwrap_or_default();
            (password, existing.uid().unwrap_or_default())
        }
        Err(e) => return Err(failed(e)),
    };
    ctx.redis_passwords.set(&uid, (password, secret_uid.clone(), Instant::now()));
    Ok(Some(secret_uid))
}

/// 32 random bytes from the operating system, as 64 hex digits (safe in a URL and a Redis
/// configuration file).
fn random_password() -> Result<String, Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| Error::Randomness(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// What applying every child returned: the children whose status feeds the cluster's.
struct Applied {
    server: Deployment,
    redis: Option<Deployment>,
    tuning: Option<DaemonSet>,
}

/// Step 2: applies every child, one line per child, and removes the optional ones the spec no
/// longer asks for. The children do not depend on one another, so their requests go out
/// together: a cluster's first reconcile waits for one round trip, not seven in a row. The
/// first failure (in the order of the lines) is the step's error; the others still ran.
async fn apply_all(ctx: &Context, wsc: &WebSocketCluster, ns: &str, desired: Children) -> Result<Applied, Error> {
    let redis_name = children::redis_name(wsc);
    let tuning_ns = ctx.settings.tuning_namespace.as_str();
    // Every apply runs to its end (a failed one does not cancel the others, whose requests may
    // have reached the API server: their results and events must be recorded).
    let (server, client_service, pdb, redis, redis_service, redis_network_policy, tuning) = tokio::join!(
        apply(ctx, wsc, ns, desired.server),
        apply(ctx, wsc, ns, desired.client_service),
        apply(ctx, wsc, ns, desired.pdb),
        apply_or_remove(ctx, wsc, ns, desired.redis, redis_name.clone()),
        apply_or_remove(ctx, wsc, ns, desired.redis_service, redis_name.clone()),
        apply_or_remove(ctx, wsc, ns, desired.redis_network_policy, redis_name),
        apply_or_remove(ctx, wsc, tuning_ns, desired.tuning, children::tuning_name(wsc)),
    );
    let server = server?;
    client_service?;
    pdb?;
    let redis = redis?;
    redis_service?;
    redis_network_policy?;
    Ok(Applied { server, redis, tuning: tuning? })
}

/// Step 3: what exists now. The apply's results when it went through; else what the caches
/// hold, so the status still reports it.
async fn observe(ctx: &Context, wsc: &WebSocketCluster, ns: &str, applied: &Result<Applied, Error>) -> Observed {
    let mut seen = match applied {
        Ok(a) => Observed {
            server: Some(a.server.clone()),
            redis: a.redis.clone(),
            tuning: a.tuning.clone(),
            ..Default::default()
        },
        Err(e) => Observed { apply_error: Some(e.to_string()), ..cached_children(ctx, wsc, ns) },
    };
    seen.connections = Some(ctx.connections(wsc).await);
    seen
}

/// The children whose status feeds the cluster's, as the caches hold them (when no apply
/// result is at hand).
fn cached_children(ctx: &Context, wsc: &WebSocketCluster, ns: &str) -> Observed {
    let cached = |name: String| ctx.stores.get::<Deployment>(ns, &name).map(|d| (*d).clone());
    Observed {
        server: cached(children::server_name(wsc)),
        redis: cached(children::redis_name(wsc)),
        tuning: ctx
            .stores
            .get::<DaemonSet>(&ctx.settings.tuning_namespace, &children::tuning_name(wsc))
            .map(|d| (*d).clone()),
        ..Default::default()
    }
}

/// Step 4: computes the status (pure) and patches it when it changed; an event when readiness
/// flips.
async fn update_status(ctx: &Context, wsc: &WebSocketCluster, ns: &str, seen: &Observed) -> Result<(), Error> {
    let status = status::compute(wsc, seen, &Time(k8s_openapi::jiff::Timestamp::now()));
    let previous_ready = wsc.status.as_ref().and_then(|s| status::find(s, condition::READY)).map(|c| c.status.clone());
    let ready = status::find(&status, condition::READY).cloned();
    if wsc.status.as_ref() != Some(&status) {
        let api = Api::<WebSocketCluster>::namespaced(ctx.client.clone(), ns);
        let patch = serde_json::json!({
            "apiVersion": WebSocketCluster::api_version(&()),
            "kind": WebSocketCluster::kind(&()),
            "status": status,
        });
        api.patch_status(&wsc.name_any(), &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&patch))
            .await
            .map_err(Error::Status)?;
    }
    if let Some(ready) = ready
        && previous_ready.as_deref() != Some(ready.status.as_str())
    {
        let kind = if ready.status == "True" { EventType::Normal } else { EventType::Warning };
        let reason = if ready.status == "True" { "Ready" } else { "NotReady" };
        publish(ctx, wsc, kind, reason, "Observe", format!("{}: {}", ready.reason, ready.message), None);
    }
    Ok(())
}

/// An invalid spec waits for the user to change it (the change triggers the next reconcile);
/// anything else is retried with exponential backoff and jitter.
pub fn error_policy(wsc: Arc<WebSocketCluster>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_invalid_spec() {
        return Action::await_change();
    }
    let key = cluster_key(&wsc);
    let failures = ctx.failures.get(&key, Duration::MAX).unwrap_or(0) + 1;
    ctx.failures.set(&key, failures);
    Action::requeue(backoff(failures, jitter(&key)))
}

/// The delay before retry number `failures` (1, 2, ...): [`BACKOFF_MIN`] doubled per earlier
/// failure, at most [`BACKOFF_MAX`], scaled by `jitter` (0.5 to 1.5).
pub fn backoff(failures: u32, jitter: f64) -> Duration {
    let exponential = BACKOFF_MIN.saturating_mul(1 << failures.saturating_sub(1).min(16));
    exponential.min(BACKOFF_MAX).mul_f64(jitter.clamp(0.5, 1.5))
}

/// A factor between 0.5 and 1.5, different per cluster and per call.
fn jitter(key: &str) -> f64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    key.hash(&mut hasher);
    Instant::now().hash(&mut hasher);
    0.5 + (hasher.finish() % 1000) as f64 / 1000.0
}

/// A digest of a desired child, to tell whether it changed since it was last applied (in this
/// process only: the hasher's keys are fixed, not its stability across releases).
fn hash_of<K: Serialize>(child: &K) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    serde_json::to_vec(child).unwrap_or_default().hash(&mut hasher);
    hasher.finish()
}

/// What changes when a child's spec changes: its generation where it has one (status updates
/// bump the resourceVersion too, and are no change of ours), else its resourceVersion.
fn revision(meta: &kube::core::ObjectMeta) -> String {
    match meta.generation {
        Some(g) => g.to_string(),
        None => meta.resource_version.clone().unwrap_or_default(),
    }
}

/// What [`Context::applied`] remembers of a child: the desired hash, its uid and revision.
fn as_applied(desired: u64, meta: &kube::core::ObjectMeta) -> (u64, String, String) {
    (desired, meta.uid.clone().unwrap_or_default(), revision(meta))
}

/// Whether `cached` still carries the labels, annotations and owner references of `desired`:
/// what an edit of a child's metadata changes without a new generation.
fn metadata_holds(desired: &kube::core::ObjectMeta, cached: &kube::core::ObjectMeta) -> bool {
    let holds = |want: &Option<std::collections::BTreeMap<String, String>>,
                 have: &Option<std::collections::BTreeMap<String, String>>| {
        want.iter().flatten().all(|(k, v)| have.as_ref().and_then(|h| h.get(k)) == Some(v))
    };
    let owners = cached.owner_references.iter().flatten();
    holds(&desired.labels, &cached.labels)
        && holds(&desired.annotations, &cached.annotations)
        && desired.owner_references.iter().flatten().all(|r| owners.clone().any(|o| o.uid == r.uid))
}

/// Server-side applies one child (force: this operator owns these fields) and publishes an event
/// when the child was created or changed, judged against the cached copy. Returns the child as
/// the API server has it now. Skipped when the cached child is still at the [`revision`] this
/// operator's last apply returned, still carries the labels, annotations and owners it was
/// given, and the desired child has not changed since: anyone's change to the child's spec (a
/// new generation; for kinds without one, any new resourceVersion) or to that metadata brings
/// the apply back, so drift is corrected. Status updates (a Deployment's, while it rolls out) do
/// not: comparing resourceVersions instead re-applied most children two or three times in their
/// first seconds, each apply a no-op.
async fn apply<K: Child>(ctx: &Context, wsc: &WebSocketCluster, ns: &str, child: K) -> Result<K, Error> {
    let name = child.meta().name.clone().unwrap_or_default();
    let kind = <K as k8s_openapi::Resource>::KIND;
    let key = format!("{kind}/{ns}/{name}");
    let desired = hash_of(&child);
    let cached = ctx.stores.get::<K>(ns, &name);
    if let Some(cached) = &cached
        && ctx.applied.get(&key, Duration::MAX) == Some(as_applied(desired, cached.meta()))
        && metadata_holds(child.meta(), cached.meta())
    {
        // Nobody changed it since our apply, and we want the same: nothing to write.
        ctx.applied.set(&key, as_applied(desired, cached.meta()));
        return Ok(K::clone(cached));
    }
    let before = cached.map(|o| revision(o.meta()));
    let after = Api::<K>::namespaced(ctx.client.clone(), ns)
        .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&child))
        .await
        .map_err(|source| Error::Apply { kind, name: name.clone(), source })?;
    ctx.applied.set(&key, as_applied(desired, after.meta()));
    let (reason, verb) = match before {
        // Not cached yet: new, unless it already has a history (the cache lags behind a create
        // of a moment ago).
        None if after.meta().generation.unwrap_or(1) <= 1 => ("Created", "created"),
        Some(b) if b != revision(after.meta()) => ("Updated", "updated"),
        _ => return Ok(after),
    };
    info!(kind, %name, "{verb}");
    let related = after.object_ref(&());
    publish(ctx, wsc, EventType::Normal, reason, "Apply", format!("{kind} {name} {verb}"), Some(related));
    Ok(after)
}

/// Applies an optional child, or deletes it (when this cluster owns it) once the spec no
/// longer asks for it.
async fn apply_or_remove<K: Child>(
    ctx: &Context,
    wsc: &WebSocketCluster,
    ns: &str,
    child: Option<K>,
    name: String,
) -> Result<Option<K>, Error> {
    if let Some(child) = child {
        return apply(ctx, wsc, ns, child).await.map(Some);
    }
    // Owned: by owner reference, or (a tuning DaemonSet) by the cluster-uid label.
    let uid = wsc.uid().unwrap_or_default();
    let owned = ctx.stores.get::<K>(ns, &name).is_some_and(|o| {
        o.owner_references().iter().any(|r| r.uid == uid && r.controller == Some(true))
            || o.labels().get(children::TUNING_OWNER_LABELS[2]) == Some(&uid)
    });
    if owned {
        let kind = <K as k8s_openapi::Resource>::KIND;
        match Api::<K>::namespaced(ctx.client.clone(), ns).delete(&name, &DeleteParams::background()).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(source) => return Err(Error::Apply { kind, name, source }),
        }
        info!(kind, %name, "removed: no longer in the spec");
        let related = ObjectReference {
            kind: Some(kind.into()),
            name: Some(name.clone()),
            namespace: Some(ns.into()),
            api_version: Some(K::api_version(&()).into_owned()),
            ..Default::default()
        };
        let note = format!("{kind} {name} removed: no longer in the spec");
        publish(ctx, wsc, EventType::Normal, "Deleted", "Delete", note, Some(related));
    }
    Ok(None)
}

/// Publishes an event about `wsc` (queued: the reconcile does not wait for it); `related` is the
/// child it concerns (events about different children are separate series, not one aggregated
/// line).
fn publish(
    ctx: &Context,
    wsc: &WebSocketCluster,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
    related: Option<ObjectReference>,
) {
    let reference: ObjectReference = wsc.object_ref(&());
    let event = Event { type_, reason: reason.into(), note: Some(note), action: action.into(), secondary: related };
    ctx.events.publish(event, reference);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_jitter_spreads_it() {
        assert_eq!(backoff(1, 1.0), BACKOFF_MIN);
        assert_eq!(backoff(2, 1.0), BACKOFF_MIN * 2);
        assert_eq!(backoff(40, 1.0), BACKOFF_MAX);
        assert_eq!(backoff(1, 0.5), BACKOFF_MIN / 2);
        assert_eq!(backoff(1, 9.0), BACKOFF_MIN * 3 / 2, "jitter is clamped");
        let spread: Vec<f64> = (0..50).map(|i| jitter(&format!("ns/c{i}"))).collect();
        assert!(spread.iter().all(|j| (0.5..=1.5).contains(j)), "{spread:?}");
        assert!(spread.iter().any(|j| (j - spread[0]).abs() > 0.01), "jitter varies: {spread:?}");
    }

    #[test]
    fn memory_forgets_what_is_not_refreshed() {
        let memory = Memory::new(Duration::from_millis(20));
        memory.set("ns/a", 1);
        assert_eq!(memory.get("ns/a", Duration::MAX), Some(1));
        assert_eq!(memory.get("ns/a", Duration::ZERO), None, "stale for a reader wanting it fresher");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(memory.get("ns/a", Duration::MAX), None, "past the ttl");
        // The next set sweeps it out.
        memory.set("ns/b", 2);
        assert!(!lock(&memory.entries).0.contains_key("ns/a"), "forgotten, not just stale");
        assert_eq!(memory.get("ns/b", Duration::MAX), Some(2));
    }

    #[test]
    fn a_child_whose_labels_or_owners_were_edited_is_applied_again() {
        let meta = |labels: &[(&str, &str)], owner: Option<&str>| kube::core::ObjectMeta {
            labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            owner_references: owner.map(|uid| {
                vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    uid: uid.into(),
                    ..Default::default()
                }]
            }),
            ..Default::default()
        };
        let desired = meta(&[("app", "chat"), ("component", "server")], Some("u1"));
        let extra = meta(&[("app", "chat"), ("component", "server"), ("team", "a")], Some("u1"));
        assert!(metadata_holds(&desired, &extra), "labels added by others are theirs");
        assert!(!metadata_holds(&desired, &meta(&[("app", "chat"), ("component", "edited")], Some("u1"))));
        assert!(!metadata_holds(&desired, &meta(&[("app", "chat")], Some("u1"))), "a label removed");
        assert!(!metadata_holds(&desired, &meta(&[("app", "chat"), ("component", "server")], None)), "owner gone");
    }

    #[test]
    fn passwords_are_random_hex() {
        let (a, b) = (random_password().unwrap(), random_password().unwrap());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn invalid_specs_wait_for_a_change() {
        let e = Error::InvalidSpec("x".into());
        assert!(e.is_invalid_spec());
        assert_eq!(e.metric_label(), "invalid_spec");
    }
}
