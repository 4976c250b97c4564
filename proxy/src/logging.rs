//! Logs: tracing to stdout (JSON in the cluster), with Pingora's `log` records bridged in.

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;
use crate::error::{Error, Result};

/// Environment variable holding the log filter (`info` by default).
pub const LOG_ENV: &str = "TANDEM_LOG";

/// Installs the global subscriber and the `log` bridge (tracing-log), so Pingora's own records
/// come out in the same format. Access-log lines have the target `tandem::access`.
pub fn init(format: LogFormat) -> Result<()> {
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    let installed = match format {
        LogFormat::Json => tracing::subscriber::set_global_default(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .finish(),
        ),
        LogFormat::Text => tracing::subscriber::set_global_default(builder.finish()),
    };
    installed.map_err(|e| Error::Logging(e.to_string()))?;
    tracing_log::LogTracer::init().map_err(|e| Error::Logging(e.to_string()))
}
