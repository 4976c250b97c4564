//! Logs: tracing to stdout (JSON in the cluster), with Pingora's `log` records bridged in, and
//! the access log ([`crate::access_log`]) beside them.
//!
//! Every line goes through one non-blocking writer (tracing-appender): a bounded channel and a
//! thread that writes stdout. A request's task never waits for the log reader; when it falls
//! behind, lines are dropped and counted (`tandem_log_lines_dropped_total`).

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_log::AsLog as _;
use tracing_subscriber::EnvFilter;

use crate::access_log::AccessLog;
use crate::cli::{AccessLogFormat, LogFormat};
use crate::error::{Error, Result};

/// Environment variable holding the log filter (`info` by default).
pub const LOG_ENV: &str = "TANDEM_LOG";

/// Lines waiting for stdout at most; beyond this they are dropped (about 4 MiB of JSON;
/// the channel's slots, 256 KiB, are allocated up front).
const BUFFERED_LINES: usize = 8_192;

/// The running log: keep it alive until exit (dropping it flushes what is buffered).
pub struct Logs {
    /// Where request lines go.
    pub access: AccessLog,
    /// Lines dropped because stdout could not keep up.
    pub dropped: ErrorCounter,
    _writer: WorkerGuard,
}

/// Installs the global subscriber and the `log` bridge (tracing-log), so Pingora's own records
/// come out in the same format, and returns the access log writing beside them.
pub fn init(format: LogFormat, access: AccessLogFormat) -> Result<Logs> {
    let filter = EnvFilter::try_from_env(LOG_ENV).unwrap_or_else(|_| EnvFilter::new("info"));
    // Pingora's `log` records above the filter's most verbose level are not even formatted.
    let bridged = filter
        .max_level_hint()
        .map_or(tracing_log::log::LevelFilter::Trace, |level| level.as_log());
    let (out, guard) = NonBlockingBuilder::default()
        .buffered_lines_limit(BUFFERED_LINES)
        .thread_name("tandem-log")
        // Buffered: the writer thread flushes after each batch it takes off the channel, so
        // under load many lines share one write(2) (stdout alone would write each line).
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stdout(),
        ));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(out.clone());
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
        dropped: out.error_counter(),
        access: match access {
            AccessLogFormat::Json => AccessLog::to(out),
            AccessLogFormat::Off => AccessLog::off(),
        },
        _writer: guard,
    })
}
