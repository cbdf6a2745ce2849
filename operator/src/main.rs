//! `wsfleet-operator`: connect, elect a leader, reconcile `WebSocketCluster`s until SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use kube::api::{Api, ListParams};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use wsfleet_contract::process::{self, LogFormat};
use wsfleet_operator::children::Settings;
use wsfleet_operator::controller::{self, Context};
use wsfleet_operator::crd::WebSocketCluster;
use wsfleet_operator::leader::{Elector, LeaseConfig};
use wsfleet_operator::telemetry::{self, Metrics};

/// The wsfleet operator: turns each WebSocketCluster into server Deployments, a Redis bus and
/// node tuning, and keeps them that way. Connects with KUBECONFIG or the in-cluster service
/// account.
#[derive(Parser, Debug)]
#[command(name = "wsfleet-operator", version, about, long_about)]
struct Args {
    /// Address for `/healthz`, `/readyz` and `/metrics`.
    #[arg(long, env = "WSFLEET_OPERATOR_HTTP_LISTEN", default_value = "0.0.0.0:8080")]
    http_listen: SocketAddr,
    /// Name of the leader-election Lease.
    #[arg(long, env = "WSFLEET_OPERATOR_LEASE_NAME", default_value = "wsfleet-operator")]
    lease_name: String,
    /// Namespace of the leader-election Lease (the operator's own namespace in a cluster).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease (default: host name and process id).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a leader's Lease stays valid without renewal; a standby takes over after that.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(3..=300))]
    lease_duration: u64,
    /// Watch only this namespace (default: every namespace).
    #[arg(long, env = "WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Reconcile without leader election (one replica only, e.g. local development).
    #[arg(long)]
    no_leader_election: bool,
    /// Seconds between looks at a healthy cluster (refreshes connections and child status).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    resync_seconds: u64,
    /// Image of the node tuner (it must have the `tune` subcommand): the operator's choice,
    /// never a WebSocketCluster's. Default: the server image of this release.
    #[arg(long, env = "WSFLEET_OPERATOR_TUNER_IMAGE", default_value_t = Settings::default_tuner_image())]
    tuner_image: String,
    /// Namespace of the node-tuning DaemonSets (privileged pods; not a tenant's namespace). The
    /// chart creates it with the `privileged` Pod Security level.
    #[arg(long, env = "WSFLEET_OPERATOR_TUNING_NAMESPACE", default_value = "wsfleet-tuning")]
    tuning_namespace: String,
    /// Log format (level from WSFLEET_LOG, default info).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    args.log_format.init_tracing();
    match run(args).await {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let metrics = Arc::new(Metrics::new());
    let http = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("cannot listen on --http-listen {}", args.http_listen))?;
    info!(http = %http.local_addr()?, "listening");
    let shutdown = CancellationToken::new();
    tokio::spawn(process::cancel_on_signal(shutdown.clone()));
    let app = telemetry::router(metrics.clone());
    let http_stop = shutdown.clone();
    tokio::spawn(async move { axum::serve(http, app).with_graceful_shutdown(http_stop.cancelled_owned()).await });

    let client =
        kube::Client::try_default().await.context("cannot build a Kubernetes client (KUBECONFIG or in-cluster)")?;
    let probe: Api<WebSocketCluster> = match &args.watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    probe.list(&ListParams::default().limit(1)).await.context(
        "cannot list WebSocketClusters: is the CRD installed (kubectl apply -f crds/) and may this account list them?",
    )?;
    metrics.ready.store(true, Ordering::Release);

    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        Duration::from_secs(args.resync_seconds),
        identity.clone(),
        Settings {
            tuner_image: args.tuner_image.clone(),
            tuning_namespace: args.tuning_namespace.clone(),
            // In the cluster, the operator's pods read presence from managed Redis.
            operator_namespace: std::env::var_os("KUBERNETES_SERVICE_HOST").map(|_| args.lease_namespace.clone()),
        },
    ));
    if args.no_leader_election {
        warn!("leader election is off: run only one replica like this");
        metrics.leader.set(1);
        controller::run(ctx, args.watch_namespace.clone(), shutdown.clone()).await;
        info!("stopped");
        return Ok(ExitCode::SUCCESS);
    }

    let elector = Elector::new(
        client,
        LeaseConfig {
            name: args.lease_name,
            namespace: args.lease_namespace,
            identity,
            duration: Duration::from_secs(args.lease_duration),
        },
    );
    if !elector.acquire(&shutdown).await {
        info!("stopped while standing by");
        return Ok(ExitCode::SUCCESS);
    }
    metrics.leader.set(1);
    let lost = CancellationToken::new();
    let stop_controller = CancellationToken::new();
    let controller = tokio::spawn(controller::run(ctx, args.watch_namespace.clone(), stop_controller.clone()));
    elector.keep(&shutdown, &lost).await;
    stop_controller.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), controller).await;
    metrics.leader.set(0);
    if !lost.is_cancelled() {
        // Only now that no reconcile of ours can run does a standby get the Lease.
        elector.release().await;
    }
    if lost.is_cancelled() {
        // Exit so that no reconcile of this replica can overlap the new leader's; the pod restarts
        // as a standby.
        error!("lost the leadership; exiting");
        return Ok(ExitCode::FAILURE);
    }
    info!("stopped; leadership released");
    Ok(ExitCode::SUCCESS)
}

fn default_identity() -> String {
    let host =
        std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_owned()).unwrap_or_else(|_| "operator".into());
    format!("{host}-{}", std::process::id())
}
