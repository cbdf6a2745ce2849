//! Reconcile one `WebSocketCluster`: build (pure) -> apply (server-side apply, one field manager)
//! -> observe -> status (pure) -> patch status. Events for every child created, changed or
//! removed and for every failure. Only this module and [`crate::leader`] use the API server.
//!
//! Error policy: an invalid spec waits for the user to change it (long requeue; the API server's
//! validation makes this rare); anything else is transient and retried with backoff.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ObjectReference, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};
use wsfleet_contract::presence;
use wsfleet_contract::sync::lock;

use crate::FIELD_MANAGER;
use crate::children;
use crate::crd::{WebSocketCluster, condition};
use crate::status::{self, Observed};
use crate::telemetry::Metrics;

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

/// A fleet total (or why it is unknown) and when it was read.
type ConnectionsRead = (std::time::Instant, Result<i64, String>);

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// How often a healthy cluster is looked at again (connections, child status).
    pub resync: Duration,
    /// The last fleet total read per cluster, and when: Redis is read at most once per resync,
    /// so the status patches a changing total causes cannot drive a reconcile loop.
    connections: std::sync::Mutex<std::collections::HashMap<String, ConnectionsRead>>,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, resync: Duration, instance: String) -> Self {
        let reporter = Reporter { controller: FIELD_MANAGER.into(), instance: Some(instance) };
        Context {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            resync,
            connections: Default::default(),
        }
    }

    async fn connections(&self, wsc: &WebSocketCluster) -> Result<i64, String> {
        let key = format!("{}/{}", wsc.namespace().unwrap_or_default(), wsc.name_any());
        if let Some((at, value)) = lock(&self.connections).get(&key)
            && at.elapsed() < self.resync
        {
            return value.clone();
        }
        let value = read_connections(wsc).await;
        lock(&self.connections).insert(key, (std::time::Instant::now(), value.clone()));
        value
    }
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
    let client = ctx.client.clone();
    // Only the children this operator labelled are watched (and cached).
    let owned = watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));
    Controller::new(api::<WebSocketCluster>(&client, &namespace), watcher::Config::default())
        .owns(api::<Deployment>(&client, &namespace), owned.clone())
        .owns(api::<Service>(&client, &namespace), owned.clone())
        .owns(api::<PodDisruptionBudget>(&client, &namespace), owned.clone())
        .owns(api::<DaemonSet>(&client, &namespace), owned)
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
        let timer = std::time::Instant::now();
        ctx.metrics.reconciles.inc();
        let result = reconcile_inner(&wsc, &ctx).await;
        ctx.metrics.reconcile_duration.observe(timer.elapsed().as_secs_f64());
        if let Err(e) = &result {
            ctx.metrics.reconcile_error(e.metric_label());
            warn!(error = %e, "reconcile failed");
        }
        result
    }
    .instrument(span)
    .await
}

async fn reconcile_inner(wsc: &WebSocketCluster, ctx: &Context) -> Result<Action, Error> {
    let ns = wsc.namespace().ok_or_else(|| Error::InvalidSpec("WebSocketCluster must be namespaced".into()))?;
    if wsc.metadata.deletion_timestamp.is_some() {
        // Garbage collection removes the children; applying them now would bring them back.
        return Ok(Action::await_change());
    }
    let client = &ctx.client;
    let mut seen = Observed::default();

    // Build (pure) and apply, one line per child.
    let applied: Result<(), Error> = async {
        seen.server = Some(apply(ctx, wsc, &ns, children::build_server_deployment(wsc)).await?);
        apply(ctx, wsc, &ns, children::build_client_service(wsc)).await?;
        apply(ctx, wsc, &ns, children::build_pdb(wsc)).await?;
        seen.redis = apply_or_remove::<Deployment>(
            ctx,
            wsc,
            &ns,
            children::build_redis_deployment(wsc),
            children::redis_name(wsc),
        )
        .await?;
        apply_or_remove::<Service>(ctx, wsc, &ns, children::build_redis_service(wsc), children::redis_name(wsc))
            .await?;
        seen.tuning = apply_or_remove::<DaemonSet>(
            ctx,
            wsc,
            &ns,
            children::build_tuning_daemonset(wsc),
            children::tuning_name(wsc),
        )
        .await?;
        Ok(())
    }
    .await;
    if let Err(e) = &applied {
        seen.apply_error = Some(e.to_string());
        publish(ctx, wsc, EventType::Warning, "ApplyFailed", "Apply", e.to_string(), None).await;
        // Still report what exists.
        let deployments = Api::<Deployment>::namespaced(client.clone(), &ns);
        seen.server = deployments.get_opt(&children::server_name(wsc)).await.ok().flatten();
        seen.redis = deployments.get_opt(&children::redis_name(wsc)).await.ok().flatten();
        let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), &ns);
        seen.tuning = daemonsets.get_opt(&children::tuning_name(wsc)).await.ok().flatten();
    }
    seen.connections = Some(ctx.connections(wsc).await);

    // Status (pure), then one patch of the status subresource.
    let status = status::compute(wsc, &seen, &Time(k8s_openapi::jiff::Timestamp::now()));
    let previous_ready = wsc.status.as_ref().and_then(|s| status::find(s, condition::READY)).map(|c| c.status.clone());
    let ready = status::find(&status, condition::READY).cloned();
    if wsc.status.as_ref() != Some(&status) {
        let api = Api::<WebSocketCluster>::namespaced(client.clone(), &ns);
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
    applied?;
    Ok(Action::requeue(ctx.resync))
}

pub fn error_policy(_wsc: Arc<WebSocketCluster>, error: &Error, _ctx: Arc<Context>) -> Action {
    if error.is_invalid_spec() {
        // Retrying cannot help; a change of the spec triggers the next reconcile.
        Action::requeue(Duration::from_secs(300))
    } else {
        Action::requeue(Duration::from_secs(5))
    }
}

/// Server-side applies one child (force: this operator owns these fields) and publishes an event
/// when the child was created or changed. Returns the child as the API server has it now.
async fn apply<K>(ctx: &Context, wsc: &WebSocketCluster, ns: &str, child: K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + k8s_openapi::Resource
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api = Api::<K>::namespaced(ctx.client.clone(), ns);
    let name = child.meta().name.clone().unwrap_or_default();
    let kind = <K as k8s_openapi::Resource>::KIND;
    let err = |source| Error::Apply { kind, name: name.clone(), source };
    let before = api.get_opt(&name).await.map_err(err)?.map(|o| revision(o.meta()));
    let after =
        api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&child)).await.map_err(err)?;
    let (reason, verb) = match before {
        None => ("Created", "created"),
        Some(b) if b != revision(after.meta()) => ("Updated", "updated"),
        Some(_) => return Ok(after),
    };
    info!(kind, %name, "{verb}");
    let related = after.object_ref(&());
    publish(ctx, wsc, EventType::Normal, reason, "Apply", format!("{kind} {name} {verb}"), Some(related)).await;
    Ok(after)
}

/// What changes when a child's spec changes: its generation where it has one (status updates
/// bump the resourceVersion too, and are no change of ours), else its resourceVersion.
fn revision(meta: &kube::core::ObjectMeta) -> String {
    match meta.generation {
        Some(g) => g.to_string(),
        None => meta.resource_version.clone().unwrap_or_default(),
    }
}

/// Applies an optional child, or deletes it when the spec no longer asks for it.
async fn apply_or_remove<K>(
    ctx: &Context,
    wsc: &WebSocketCluster,
    ns: &str,
    child: Option<K>,
    name: String,
) -> Result<Option<K>, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + k8s_openapi::Resource
        + Clone
        + Serialize
        + DeserializeOwned
        + std::fmt::Debug,
{
    if let Some(child) = child {
        return apply(ctx, wsc, ns, child).await.map(Some);
    }
    let api = Api::<K>::namespaced(ctx.client.clone(), ns);
    let kind = <K as k8s_openapi::Resource>::KIND;
    let owned = api
        .get_opt(&name)
        .await
        .map_err(|source| Error::Apply { kind, name: name.clone(), source })?
        .is_some_and(|o| {
            o.owner_references().iter().any(|r| r.uid == wsc.uid().unwrap_or_default() && r.controller == Some(true))
        });
    if owned {
        match api.delete(&name, &DeleteParams::background()).await {
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

/// The fleet's live connection total from the servers' heartbeats in Redis, when the operator
/// can reach that Redis.
async fn read_connections(wsc: &WebSocketCluster) -> Result<i64, String> {
    let Some(url) = children::redis_url(wsc) else {
        return Err("the Redis URL is in a Secret, which the operator does not read".into());
    };
    // A managed Redis is a cluster Service: only reachable (and resolvable) from inside the
    // cluster. Outside it, say so instead of asking the host's resolver about a cluster name.
    if wsc.spec.redis.managed.is_some() && std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
        return Err("the operator runs outside the cluster and cannot reach the managed Redis Service".into());
    }
    let read = async {
        let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
        let mut conn = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
        presence::fleet_stats(&mut conn, &children::redis_prefix(wsc)).await.map_err(|e| e.to_string())
    };
    match tokio::time::timeout(Duration::from_secs(2), read).await {
        Ok(Ok(pods)) => Ok(pods.values().sum::<u64>() as i64),
        Ok(Err(e)) => Err(format!("Redis not reachable from the operator: {e}")),
        Err(_) => Err("Redis not reachable from the operator: timed out".into()),
    }
}
