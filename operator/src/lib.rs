//! `tandem-operator`: turns TrafficPolicies, CircuitBreakerPolicies, AuthorizationPolicies,
//! Services and EndpointSlices into one proxy ConfigMap per ServiceAccount with injected pods,
//! and reports each policy's status.
//!
//! - [`render`]: the pure core, `render(&Inputs) -> Rendered` (services and verdicts).
//! - [`authz`]: its AuthorizationPolicy part (targets, ports, rules, contradictions).
//! - [`policy`]: conflicts between policies and verdicts.
//! - [`status`]: the `Accepted` and `Programmed` conditions, computed purely.
//! - [`stores`]: the watches and the in-memory stores they fill.
//! - [`controller`]: the reconcile pass that writes ConfigMaps and status.
//! - [`index`]: what the reconciler keeps across passes: scopes, versions, reverse maps.
//! - [`hub`]: each workload's current view, its watchers, what its proxies run and learned.
//! - [`sync`]: nothing is rendered, written or deleted before every watch has listed once.
//! - [`leader`]: leader election on a Lease.
//! - [`server`] and [`metrics`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`ca`]: the identity CA, pure (a root and an issuer; leaves from CSRs).
//! - [`issuer`]: the issuer Secret, created once, watched, its expiry watched.
//! - [`signer`]: the HTTPS certify call every replica serves (TokenReview, then a leaf).
//! - [`stream`]: the config stream on the same listener (watch, discover, applied), served by
//!   the leader from the [`hub`].
//! - [`run`]: wires it all together for the binary.

pub mod authz;
pub mod ca;
pub mod controller;
pub mod hub;
pub mod index;
pub mod issuer;
pub mod leader;
pub mod metrics;
pub mod policy;
pub mod render;
pub mod run;
pub mod server;
pub mod signer;
pub mod status;
pub mod stores;
pub mod stream;
pub mod sync;

pub use render::{Inputs, Rendered, render};
pub use run::{Settings, run};

/// What can go wrong in the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the apiserver failed.
    #[error("{action}: {source}")]
    Kube {
        /// What was being done.
        action: String,
        /// Why it failed.
        #[source]
        source: kube::Error,
    },
    /// A pass could not write everything; it is retried.
    #[error(
        "reconcile incomplete: {config_maps} ConfigMap write(s), {deletes} delete pass(es) and {statuses} status write(s) failed"
    )]
    Incomplete {
        /// Failed ConfigMap writes.
        config_maps: usize,
        /// Failed delete passes.
        deletes: usize,
        /// Failed status writes.
        statuses: usize,
    },
    /// A watch task ended (only at shutdown).
    #[error("a watch ended")]
    WatchEnded,
    /// No kube client could be configured (no kubeconfig, no in-cluster service account).
    #[error("cannot configure a Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    /// A setting is invalid (the binary exits with code 64).
    #[error("invalid setting: {0}")]
    Settings(String),
    /// rcgen could not make or sign a certificate.
    #[error("could not {action}")]
    Certificate {
        /// What was being done.
        action: &'static str,
        /// rcgen's reason.
        #[source]
        source: rcgen::Error,
    },
    /// The issuer Secret's certificates or key cannot be used.
    #[error("the identity issuer cannot be used: {0}")]
    IssuerMaterial(String),
    /// The signer's TLS configuration could not be built.
    #[error("could not build the signer's TLS configuration")]
    Tls(#[source] rustls::Error),
    /// The HTTP endpoint could not be served.
    #[error("cannot serve HTTP on {addr}: {source}")]
    Http {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod authz_tests;
#[cfg(test)]
mod tests;
