//! `wsfleet-server`: parse settings, raise limits, bind, serve until SIGTERM/SIGINT, drain.
//! Subcommands: `fleet-stats` (the live connection count of every server of a fleet).

use std::net::SocketAddr;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};
use wsfleet_contract::process::{self, LogFormat};
use wsfleet_server::config::{Cli, Command, Config, FleetStatsArgs, TuneArgs};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::FleetStats(args)) => return fleet_stats(args),
        Some(Command::Tune(args)) => return tune(args),
        None => {}
    }
    let config = cli.serve;
    config.log_format.init_tracing();
    raise_open_files_limit();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.worker_threads > 0 {
        builder.worker_threads(config.worker_threads as usize);
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let ws = bind(config.listen, config.listen_backlog)
        .with_context(|| format!("cannot listen on --listen {}", config.listen))?;
    let http = TcpListener::bind(config.http_listen)
        .await
        .with_context(|| format!("cannot listen on --http-listen {}", config.http_listen))?;
    info!(websocket = %ws.local_addr()?, http = %http.local_addr()?, "listening");
    let shutdown = CancellationToken::new();
    tokio::spawn(process::cancel_on_signal(shutdown.clone()));
    wsfleet_server::server::run(ws, http, config, shutdown).await?;
    Ok(())
}

fn tune(args: TuneArgs) -> ExitCode {
    LogFormat::Text.init_tracing();
    let report = wsfleet_server::tune::apply(&args.sysctls, &args.proc_sys);
    let mut failed = 0;
    for r in &report {
        match &r.after {
            Ok(after) => info!(key = %r.key, before = r.before.as_deref().unwrap_or("?"), after = %after, "tuned"),
            Err(e) => {
                failed += 1;
                error!(key = %r.key, error = %e, "not tuned");
            }
        }
    }
    info!(applied = report.len() - failed, failed, "node tuning done");
    if failed > 0 {
        // Exit non-zero so the DaemonSet pod is not Ready and the failure shows in its status.
        return ExitCode::FAILURE;
    }
    if args.once {
        return ExitCode::SUCCESS;
    }
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => {
            rt.block_on(process::wait_for_signal());
        }
        Err(e) => error!(error = %e, "cannot start the runtime"),
    }
    ExitCode::SUCCESS
}

fn fleet_stats(args: FleetStatsArgs) -> ExitCode {
    let run = async {
        let client = wsfleet_server::messaging::redis::client(args.redis_auth.target(&args.redis_url))?;
        let stats = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            wsfleet_server::messaging::redis::fleet_stats(&client, &args.redis_prefix),
        )
        .await
        .context("Redis did not answer in 10 s")?
        .context("cannot read fleet presence from Redis")?;
        anyhow::Ok(stats)
    };
    let stats = match tokio::runtime::Builder::new_current_thread().enable_all().build().map(|rt| rt.block_on(run)) {
        Ok(Ok(stats)) => stats,
        Ok(Err(e)) => {
            eprintln!("fleet-stats: {e:#}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("fleet-stats: {e}");
            return ExitCode::FAILURE;
        }
    };
    let total: u64 = stats.values().sum();
    if args.json {
        println!("{}", serde_json::json!({"pods": stats, "total": total}));
    } else {
        println!("{:<40} {:>12}", "POD", "CONNECTIONS");
        for (pod, n) in &stats {
            println!("{pod:<40} {n:>12}");
        }
        println!("{:<40} {total:>12}", "TOTAL");
    }
    ExitCode::SUCCESS
}

/// Binds with a listen backlog far above tokio's default of 128, so connection bursts queue in
/// the kernel instead of being dropped.
fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// Every connection is a file descriptor: use all the kernel allows this process.
fn raise_open_files_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => info!(limit, "open-file limit"),
        Err(e) => warn!(error = %e, "cannot raise the open-file limit"),
    }
}
