//! Logs: tracing to stdout (JSON in the cluster), with Pingora's `log` records bridged in, and
//! the access log ([`crate::access_log`]) beside them.
//!
//! Every line goes through one writer ([`crate::log_writer`]): a bounded queue and a thread
//! that writes stdout in batches. A request's task never waits for the log reader; when it
//! falls behind, lines are dropped and counted (`tandem_log_lines_dropped_total`).

use tracing_log::AsLog as _;
use tracing_subscriber::EnvFilter;

use crate::access_log::AccessLog;
use crate::cli::{AccessLogFormat, LogFormat};
use crate::error::{Error, Result};
use crate::log_writer::{self, LogWriter, WriterThread};

/// Environment variable holding the log filter (`info` by default).
pub const LOG_ENV: &str = "TANDEM_LOG";

/// The running log: keep it alive until exit (dropping it writes what is queued).
pub struct Logs {
    /// Where request lines go.
    pub access: AccessLog,
    /// The writer every line goes through (it counts the lines it dropped).
    pub writer: LogWriter,
    _thread: WriterThread,
}

/// Installs the global subscriber and the `log` bridge (tracing-log), so Pingora's own records
/// come out in the same format, and returns the access log writing beside them.
pub fn init(format: LogFormat, access: AccessLogFormat) -> Result<Logs> {
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    // Pingora's `log` records above the filter's most verbose level are not even formatted.
    let bridged = filter
        .max_level_hint()
        .map_or(tracing_log::log::LevelFilter::Trace, |level| level.as_log());
    let (writer, thread) = log_writer::spawn(std::io::stdout())
        .map_err(|e| Error::Logging(format!("cannot start the log writer: {e}")))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer.clone());
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
    tracing_log::LogTracer::builder()
        .with_max_level(bridged)
        .init()
        .map_err(|e| Error::Logging(e.to_string()))?;
    Ok(Logs {
        access: match access {
            AccessLogFormat::Json => AccessLog::to(writer.clone()),
            AccessLogFormat::Off => AccessLog::off(),
        },
        writer,
        _thread: thread,
    })
}
