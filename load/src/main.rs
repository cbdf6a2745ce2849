//! `wsfleet-load`: drives WebSocket servers on loopback and prints what it measured as JSON.
//!
//! * `publish` — timestamped messages into one channel of a fleet; throughput and latency.
//! * `hold` — one client process: opens and holds many raw-mode connections from several
//!   loopback source addresses, reports broadcast deliveries (see [`hold`]).
//! * `connections` — the road-to-a-million scenario: servers, Redis and many `hold` processes,
//!   stepping the connection count up and measuring each step (see [`scenario`]).
//! * `chaos` — the fault run: Redis killed, paused, cut and restored under traffic, clients that
//!   never read, a flood of channels; what was lost and what the servers held (see [`chaos`]).
//!
//! Every loop is bounded by a count and a deadline, every target is a loopback address, and
//! every process started is stopped by its pid.

use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand};

mod chaos;
mod hist;
mod hold;
mod publish;
mod scenario;

#[derive(Parser)]
#[command(name = "wsfleet-load", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Publish timestamped messages into one channel and measure their delivery.
    Publish(publish::PublishArgs),
    /// Open and hold raw-mode connections; report broadcast deliveries (one client process).
    Hold(hold::HoldArgs),
    /// Step a fleet (wsfleet or the Node.js baseline) up to many connections and measure.
    Connections(scenario::ScenarioArgs),
    /// Faults under traffic: what was lost (silently or announced), memory, time to recover.
    Chaos(chaos::ChaosArgs),
}

pub(crate) fn now_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

pub(crate) fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Publish(args) => {
            let rt = tokio::runtime::Runtime::new()?;
            println!("{}", rt.block_on(publish::run(args))?);
        }
        Cmd::Hold(args) => hold::run(args)?,
        Cmd::Connections(args) => scenario::run(args)?,
        Cmd::Chaos(args) => chaos::run(args)?,
    }
    Ok(())
}
