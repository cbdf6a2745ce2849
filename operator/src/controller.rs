//! Reconcile one `WebSocketCluster` as a pipeline of named steps:
//!
//! 1. **build** every child from the spec (pure, [`children::build_all`]);
//! 2. **apply** them (server-side apply, one field manager), removing the optional ones the spec
//!    no longer asks for;
//! 3. **observe** what exists: the apply's results, else the controller's caches, and the fleet's
//!    connection total from Redis;
//! 4. **status**: compute it (pure, [`status::compute`]) and patch it only when it changed.
//!
//! Events for every child created, changed or removed and for every failure. Only this module
//! and [`crate::leader`] use the API server, and this module reads only through the
//! controller's watches: children come from the caches those watches fill ([`Stores`]), never
//! from a GET.
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
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
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
use crate::children::{self, Children};
use crate::crd::{WebSocketCluster, condition};
use crate::status::{self, Observed};
use crate::telemetry::Metrics;

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
        }
    }
}

/// The children this operator manages, as its watches last saw them (labelled
/// `app.kubernetes.io/managed-by`; managed fields stripped to save memory).
#[derive(Clone)]
pub struct Stores {
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    pub pdbs: Store<PodDisruptionBudget>,
    pub daemonsets: Store<DaemonSet>,
}

/// The kinds [`Stores`] holds, each with its store.
pub trait Cached: Resource<DynamicType = ()> + Clone + 'static {
    fn store(stores: &Stores) -> &Store<Self>;
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
cached!(Deployment => deployments, Service => services, PodDisruptionBudget => pdbs, DaemonSet => daemonsets);

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

/// The writing ends of [`Stores`], fed by the controller's watches in [`run`].
struct Writers {
    deployments: reflector::store::Writer<Deployment>,
    services: reflector::store::Writer<Service>,
    pdbs: reflector::store::Writer<PodDisruptionBudget>,
    daemonsets: reflector::store::Writer<DaemonSet>,
}

fn stores() -> (Stores, Writers) {
    let (deployments, deployments_w) = reflector::store();
    let (services, services_w) = reflector::store();
    let (pdbs, pdbs_w) = reflector::store();
    let (daemonsets, daemonsets_w) = reflector::store();
    (
        Stores { deployments, services, pdbs, daemonsets },
        Writers { deployments: deployments_w, services: services_w, pdbs: pdbs_w, daemonsets: daemonsets_w },
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
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// How often a healthy cluster is looked at again (connections, child status).
    pub resync: Duration,
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
    /// Per child: the hash of what was last applied and the resourceVersion the apply returned.
    /// While both still hold, the child is as applied and the apply is skipped: a resync of an
    /// unchanged cluster writes nothing.
    applied: Memory<(u64, Option<String>)>,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, resync: Duration, instance: String) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: Some(instance) };
        let (stores, writers) = stores();
        let forget_after = resync * FORGET_AFTER_RESYNCS;
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            resync,
            stores,
            writers: Mutex::new(Some(writers)),
            caches_filled: AtomicBool::new(false),
            connections: Memory::new(forget_after),
            redis: Memory::new(forget_after),
            failures: Memory::new(forget_after),
            applied: Memory::new(forget_after),
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
        let Some(url) = children::redis_url(wsc) else {
            return Err("the Redis URL is in a Secret, which the operator does not read".into());
        };
        // A managed Redis is a cluster Service: only reachable (and resolvable) from inside the
        // cluster. Outside it, say so instead of asking the host's resolver about a cluster name.
        if wsc.spec.redis.managed.is_some() && std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
            return Err("the operator runs outside the cluster and cannot reach the managed Redis Service".into());
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
        K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    {
        // Only the children this operator labelled are watched (and cached).
        let owned = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));
        watcher(api, owned)
            .default_backoff()
            .modify(|child| child.managed_fields_mut().clear())
            .reflect(writer)
            .touched_objects()
    }
    let Some(writers) = lock(&ctx.writers).take() else {
        error!("the controller of this context already ran");
        return;
    };
    let client = ctx.client.clone();
    let config = controller::Config::default().concurrency(MAX_CONCURRENT_RECONCILES);
    Controller::new(api::<WebSocketCluster>(&client, &namespace), watcher::Config::default())
        .with_config(config)
        .owns_stream(watch(api::<Deployment>(&client, &namespace), writers.deployments))
        .owns_stream(watch(api::<Service>(&client, &namespace), writers.services))
        .owns_stream(watch(api::<PodDisruptionBudget>(&client, &namespace), writers.pdbs))
        .owns_stream(watch(api::<DaemonSet>(&client, &namespace), writers.daemonsets))
        .graceful_shutdown_on(shutdown.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((obj, _)) => debug!(name = %obj.name, namespace = ?obj.namespace, "reconciled"),
                Err(e) => debug!(error = %e, "reconcile failed"),
            }
        })
        .await;
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
    let desired = children::build_all(wsc);
    let applied = apply_all(ctx, wsc, &ns, desired).await;
    if let Err(e) = &applied {
        publish(ctx, wsc, EventType::Warning, "ApplyFailed", "Apply", e.to_string(), None).await;
    }
    let seen = observe(ctx, wsc, &ns, &applied).await;
    update_status(ctx, wsc, &ns, &seen).await?;
    applied?;
    Ok(Action::requeue(ctx.resync))
}

/// What applying every child returned: the children whose status feeds the cluster's.
struct Applied {
    server: Deployment,
    redis: Option<Deployment>,
    tuning: Option<DaemonSet>,
}

/// Step 2: applies every child, one line per child, and removes the optional ones the spec no
/// longer asks for. Stops at the first failure.
async fn apply_all(ctx: &Context, wsc: &WebSocketCluster, ns: &str, desired: Children) -> Result<Applied, Error> {
    let server = apply(ctx, wsc, ns, desired.server).await?;
    apply(ctx, wsc, ns, desired.client_service).await?;
    apply(ctx, wsc, ns, desired.pdb).await?;
    let redis = apply_or_remove(ctx, wsc, ns, desired.redis, children::redis_name(wsc)).await?;
    apply_or_remove(ctx, wsc, ns, desired.redis_service, children::redis_name(wsc)).await?;
    let tuning = apply_or_remove(ctx, wsc, ns, desired.tuning, children::tuning_name(wsc)).await?;
    Ok(Applied { server, redis, tuning })
}

/// Step 3: what exists now. The apply's results when it went through; else what the caches
/// hold, so the status still reports it.
async fn observe(ctx: &Context, wsc: &WebSocketCluster, ns: &str, applied: &Result<Applied, Error>) -> Observed {
    let cached = |name: String| ctx.stores.get::<Deployment>(ns, &name).map(|d| (*d).clone());
    let mut seen = match applied {
        Ok(a) => Observed {
            server: Some(a.server.clone()),
            redis: a.redis.clone(),
            tuning: a.tuning.clone(),
            ..Default::default()
        },
        Err(e) => Observed {
            server: cached(children::server_name(wsc)),
            redis: cached(children::redis_name(wsc)),
            tuning: ctx.stores.get::<DaemonSet>(ns, &children::tuning_name(wsc)).map(|d| (*d).clone()),
            apply_error: Some(e.to_string()),
            ..Default::default()
        },
    };
    seen.connections = Some(ctx.connections(wsc).await);
    seen
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
        publish(ctx, wsc, kind, reason, "Observe", format!("{}: {}", ready.reason, ready.message), None).await;
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

/// Server-side applies one child (force: this operator owns these fields) and publishes an event
/// when the child was created or changed, judged against the cached copy. Returns the child as
/// the API server has it now. Skipped when the cached child is still the one this operator last
/// applied (same resourceVersion) and the desired child has not changed since: anyone's change to
/// the child (a new resourceVersion) brings the apply back, so drift is still corrected.
async fn apply<K>(ctx: &Context, wsc: &WebSocketCluster, ns: &str, child: K) -> Result<K, Error>
where
    K: Cached
        + Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + k8s_openapi::Resource
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let name = child.meta().name.clone().unwrap_or_default();
    let kind = <K as k8s_openapi::Resource>::KIND;
    let key = format!("{kind}/{ns}/{name}");
    let desired = hash_of(&child);
    let cached = ctx.stores.get::<K>(ns, &name);
    if let Some(cached) = &cached
        && ctx.applied.get(&key, Duration::MAX) == Some((desired, cached.meta().resource_version.clone()))
    {
        // Nobody changed it since our apply, and we want the same: nothing to write.
        ctx.applied.set(&key, (desired, cached.meta().resource_version.clone()));
        return Ok(K::clone(cached));
    }
    let before = cached.map(|o| revision(o.meta()));
    let after = Api::<K>::namespaced(ctx.client.clone(), ns)
        .patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&child))
        .await
        .map_err(|source| Error::Apply { kind, name: name.clone(), source })?;
    ctx.applied.set(&key, (desired, after.meta().resource_version.clone()));
    let (reason, verb) = match before {
        // Not cached yet: new, unless it already has a history (the cache lags behind a create
        // of a moment ago).
        None if after.meta().generation.unwrap_or(1) <= 1 => ("Created", "created"),
        Some(b) if b != revision(after.meta()) => ("Updated", "updated"),
        _ => return Ok(after),
    };
    info!(kind, %name, "{verb}");
    let related = after.object_ref(&());
    publish(ctx, wsc, EventType::Normal, reason, "Apply", format!("{kind} {name} {verb}"), Some(related)).await;
    Ok(after)
}

/// Applies an optional child, or deletes it (when this cluster owns it) once the spec no
/// longer asks for it.
async fn apply_or_remove<K>(
    ctx: &Context,
    wsc: &WebSocketCluster,
    ns: &str,
    child: Option<K>,
    name: String,
) -> Result<Option<K>, Error>
where
    K: Cached
        + Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + k8s_openapi::Resource
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    if let Some(child) = child {
        return apply(ctx, wsc, ns, child).await.map(Some);
    }
    let owned = ctx.stores.get::<K>(ns, &name).is_some_and(|o| {
        o.owner_references().iter().any(|r| r.uid == wsc.uid().unwrap_or_default() && r.controller == Some(true))
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
        publish(ctx, wsc, EventType::Normal, "Deleted", "Delete", note, Some(related)).await;
    }
    Ok(None)
}

/// Publishes an event about `wsc`; `related` is the child it concerns (events about different
/// children are separate series, not one aggregated line).
async fn publish(
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
    if let Err(e) = ctx.recorder.publish(&event, &reference).await {
        warn!(error = %e, "could not publish an event");
    }
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
    fn invalid_specs_wait_for_a_change() {
        let e = Error::InvalidSpec("x".into());
        assert!(e.is_invalid_spec());
        assert_eq!(e.metric_label(), "invalid_spec");
    }
}
