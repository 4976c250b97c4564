//! Tandem's test harness.
//!
//! - [`cluster`]: a real control plane (etcd, kube-apiserver, kube-controller-manager) on
//!   loopback, built from the pinned release in `tests/k8s/`.
//! - [`install`]: Tandem installed from `manifests/` as a user would, its webhook running as a
//!   local process with its own ServiceAccount's credentials.
//! - [`demo`]: the measurements and the table of `make demo` (binary `tandem-demo`).
//! - [`schema_bounds`]: each bound of a CRD schema, and an object just outside it.
//! - [`pki`], [`kubeconfig`], [`process`]: what the control plane is made of.
//!
//! The scenarios live in `tests/tests/*.rs`.

pub mod binaries;
pub mod cluster;
pub mod demo;
pub mod install;
pub mod kubeconfig;
pub mod node;
pub mod pki;
pub mod process;
pub mod schema_bounds;

pub use cluster::{ControlPlane, ControlPlaneOptions};

/// What can go wrong while running the harness.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Generating a key or certificate failed.
    #[error("generate test PKI: {0}")]
    Pki(#[source] rcgen::Error),
    /// A YAML document could not be written or read.
    #[error("YAML: {0}")]
    Yaml(#[source] serde_yaml::Error),
    /// The control-plane binaries could not be built or found.
    #[error("control-plane binaries: {0}")]
    Binaries(String),
    /// A child process exited while it should have been running.
    #[error("{name} exited ({status}); end of its log:\n{log_tail}")]
    Exited {
        /// Which process.
        name: String,
        /// How it ended.
        status: String,
        /// The end of its log file.
        log_tail: String,
    },
    /// Something did not become ready in time.
    #[error("timed out after {seconds}s waiting for {what}{}", detail.as_deref().map(|d| format!("; last: {d}")).unwrap_or_default())]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long we waited.
        seconds: u64,
        /// The last error seen while polling, if any.
        detail: Option<String>,
    },
    /// A JSON document could not be written or read.
    #[error("JSON: {0}")]
    Json(#[source] serde_json::Error),
    /// The apiserver answered, but not with what the harness needs.
    #[error("{0}")]
    Unexpected(String),
    /// A kubeconfig could not be loaded.
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[source] kube::config::KubeconfigError),
    /// An API call failed.
    #[error("{what}: {source}")]
    Kube {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: kube::Error,
    },
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn kube(what: impl Into<String>, source: kube::Error) -> Self {
        Self::Kube {
            what: what.into(),
            source,
        }
    }
}

/// The harness's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
