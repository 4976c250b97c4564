//! `tandem-webhook`: parse flags, start tracing, run, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser as _;
use tandem_webhook::args::Args;
use tandem_webhook::tls::error_chain;

/// Exit code for bad configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(args.log_json());
    let settings = match args.settings() {
        Ok(settings) => settings,
        Err(message) => {
            tracing::error!(%message, "Invalid configuration");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "Could not start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tandem_webhook::run(settings, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error_chain(&error), "tandem-webhook failed");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_WEBHOOK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init()
    } else {
        builder.init()
    }
}

/// Completes on SIGTERM (the kubelet stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            // Without a SIGTERM handler, Ctrl-C still stops the server.
            Err(error) => {
                tracing::warn!(%error, "Cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("Shutting down");
}
