//! What both binaries (server and operator) do alike at the edges of the process: how they log,
//! and how they learn that it is time to stop. Library code never calls these; binaries do.

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// Logs to stderr in this format, at the level [`crate::env::LOG_FILTER`] sets (default
    /// `info`), with colours only on a terminal. Both wsfleet binaries start with this.
    pub fn init_tracing(self) {
        let filter = tracing_subscriber::EnvFilter::try_from_env(crate::env::LOG_FILTER)
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
        match self {
            LogFormat::Text => builder.init(),
            LogFormat::Json => builder.json().init(),
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT with the signal's name, or at once with `None` (and
/// a warning) when the handlers cannot be installed.
pub async fn wait_for_signal() -> Option<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        warn!("cannot install signal handlers; SIGTERM will not stop this process gracefully");
        return None;
    };
    Some(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Cancels `shutdown` on the first SIGTERM or SIGINT (never, when the handlers cannot be
/// installed): the "detect" step of detect -> notify -> wait.
pub async fn cancel_on_signal(shutdown: CancellationToken) {
    if let Some(signal) = wait_for_signal().await {
        info!(signal, "shutdown requested");
        shutdown.cancel();
    }
}
