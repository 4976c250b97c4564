//! The proxy's error type.

use std::net::SocketAddr;
use std::path::PathBuf;

/// `Result` with the proxy's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why the proxy could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what})")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Which listener (outbound, inbound, admin).
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The config file could not be read (other than being absent).
    #[error("cannot read config file {path}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The config file was read but refused.
    #[error("config file {path} refused")]
    InvalidConfig {
        /// The file.
        path: PathBuf,
        /// Why it was refused.
        #[source]
        source: tandem_crds::contract::ConfigError,
    },
    /// The config was valid but its policies could not be compiled (a regular expression the
    /// validation let through, a backend that does not resolve).
    #[error("config file {path} refused: its policies do not compile")]
    CompilePolicy {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::policy::PolicyError,
    },
    /// The config's authorization section does not compile (a regular expression the
    /// validation let through).
    #[error("config file {path} refused: its authorization policies do not compile")]
    CompileAuthorization {
        /// The file.
        path: PathBuf,
        /// Which policy, and why.
        #[source]
        source: tandem_crds::contract::CompileError,
    },
    /// An endpoint's identity is not a workload SPIFFE ID.
    #[error("config file {path} refused: an endpoint identity is malformed")]
    EndpointIdentity {
        /// The file.
        path: PathBuf,
        /// Which endpoint, and why.
        #[source]
        source: crate::tls::BadEndpointIdentity,
    },
    /// The config's tracing collector is not a URL the exporter can use.
    #[error("config file {path} refused: its tracing collector is not a usable URL")]
    TracingCollector {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::trace::export::BadCollector,
    },
    /// A config version from the operator's stream was refused (the last good config stays).
    #[error("config version {version:?} from the operator's stream refused")]
    StreamConfig {
        /// Its version stamp.
        version: String,
        /// Why.
        #[source]
        source: crate::config::StreamConfigError,
    },
    /// The inbound TLS acceptor could not be built.
    #[error("cannot build the inbound TLS acceptor")]
    Tls(#[source] rustls::Error),
    /// Installing a signal handler failed.
    #[error("cannot install the {signal} handler")]
    Signal {
        /// The signal.
        signal: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Logging could not be initialised.
    #[error("cannot initialise logging: {0}")]
    Logging(String),
}

/// The error, with its cause chain, on one line.
pub(crate) fn chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
