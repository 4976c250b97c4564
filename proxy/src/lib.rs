//! `tandem-proxy`: Tandem's sidecar data plane, built on Pingora.
//!
//! The proxy listens on three ports (see [`tandem_crds::names`]):
//!
//! - **outbound** (15001): the application's outgoing TCP, redirected by iptables. The original
//!   destination (`SO_ORIGINAL_DST`) picks the service in the config; its traffic is balanced
//!   over the service's ready endpoints. Any other destination is relayed unchanged.
//! - **inbound** (15006): TCP arriving at the pod, forwarded to the application on the port it
//!   was sent to.
//! - **admin** (15020): `/live`, `/ready`, `/metrics`, `/config`.
//!
//! Module map: [`cli`] (flags), [`server`] (start, listeners, drain), [`connection`] (one
//! accepted connection: destination, protocol, hand-off), [`detect`] (the pure protocol
//! classifier), [`relay`] (opaque TCP), [`http`] (the Pingora HTTP path), [`routing`] (services
//! and endpoint choice), [`policy`] (the resilience engine: routes, splits, retries, budgets,
//! balancers, circuit breaking), [`config`] (load, watch, swap), [`identity`] (the proxy's
//! certificate and trust anchors: certify, renew, reload), [`metrics`], [`admin`],
//! [`logging`], [`log_writer`] and [`access_log`]; [`tls`] (mutual TLS between sidecars:
//! inbound termination and the mTLS mode, outbound origination) reads [`identity`];
//! [`authz`] (inbound authorization: the config's policies compiled per version, enforced per
//! HTTP request in [`http`] and per opaque TCP connection in [`connection`]); [`stream`] (the
//! operator's config stream, applied beside the file, the report of applied versions, and
//! on-demand discovery of unknown destinations); [`telemetry`] (who talks to whom: the labels
//! of the standard metrics and the access log, and the peer header between proxies);
//! [`trace`] (distributed tracing: W3C/B3 propagation, sampling, SERVER and CLIENT spans,
//! OTLP/HTTP export off the request path).

pub mod access_log;
pub mod admin;
pub mod authz;
pub mod cli;
pub mod config;
pub mod connection;
pub mod detect;
pub mod error;
mod file_watch;
pub mod http;
pub mod identity;
pub mod log_writer;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod relay;
pub mod routing;
pub mod server;
pub mod stream;
pub mod telemetry;
pub mod tls;
pub mod trace;

pub use cli::{Cli, Command, RunArgs};
pub use error::{Error, Result};
pub use server::run;
