//! Tandem's sidecar proxy.
//!
//! - [`policy`]: the pure resilience engine the request path consults: routing and weighted
//!   splits, budgeted retries, load balancing, connection-pool limits and outlier detection.

pub mod policy;
