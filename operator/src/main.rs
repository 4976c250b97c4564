//! `tandem-operator`: parse settings, start JSON logs, run until SIGTERM.

use std::process::ExitCode;

use clap::Parser;
use tandem_operator::Settings;
use tandem_operator::run::LogFormat;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// mimalloc, as in the proxy: the operator holds one long-lived connection per watching proxy
/// (10,000 at the benchmark's scale) beside short-lived rendering buffers; mimalloc segregates
/// allocations by size, so the passes' garbage does not fragment the heap around the
/// connections, and it returns freed memory (glibc's arenas kept the operator's peak high).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let settings = Settings::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    match settings.log_format {
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("Shutting down");
        stop_tx.send_replace(true);
    });
    match tandem_operator::run(settings, stop_rx).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error @ tandem_operator::Error::Settings(_)) => {
            eprintln!("tandem-operator: {error}");
            ExitCode::from(64)
        }
        Err(error) => {
            tracing::error!(%error, "tandem-operator failed");
            ExitCode::FAILURE
        }
    }
}

async fn wait_for_signal() {
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
