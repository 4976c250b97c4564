//! Tandem's API.
//!
//! - [`names`]: the fixed names, ports and identifiers every crate shares.
//! - [`contract`]: the proxy config contract (`tandem.dev/proxy-config/v1`), the JSON the
//!   operator renders and the proxy loads. It compiles without kube, so the proxy can use it.
//! - [`identity`]: workload identity (SPIFFE IDs), the signer's wire contract, mTLS modes.
//! - [`dependencies`]: the `tandem.dev/dependencies` annotation, parsed.
//! - [`duration`]: the duration strings the CRDs use (`"250ms"`).
//! - [`pods`] (feature `kube`): a Pod's injection, ServiceAccount and Service selection.
//! - [`v1alpha1`] (feature `kube`): the `TrafficPolicy`, `CircuitBreakerPolicy` and
//!   `AuthorizationPolicy` CRDs.

pub mod contract;
pub mod dependencies;
pub mod duration;
pub mod identity;
pub mod names;
#[cfg(feature = "kube")]
pub mod pods;
#[cfg(feature = "kube")]
pub mod v1alpha1;
