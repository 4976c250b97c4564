//! The operator's config stream, from the proxy's side (contract:
//! [`tandem_crds::contract::stream`]).
//!
//! With identity on (the signer's address is configured) and `--config-stream on`, [`start`]
//! spawns three tasks that talk to the operator's HTTPS signer port, over the same connector,
//! trust anchors and server-name check as the certify call, each call carrying the projected
//! ServiceAccount token read afresh:
//!
//! - the watch ([`watch`]): `GET` the watch with the version held, apply each snapshot or delta
//!   to the stream's own last full config and hand the result to the [`ConfigStore`], which
//!   keeps whichever of file and stream is newer. Reconnects with jittered exponential backoff;
//!   while the operator is away the proxy runs on what it has.
//! - the reporter ([`report`]): posts every change of the active version (latest only).
//! - discovery ([`discover`]): the connection path hands unknown destinations over without
//!   waiting ([`Discovery::ask`]); the task asks the operator which Service each is, once.

pub mod discover;
mod operator;
pub mod report;
pub mod watch;

pub use discover::Discovery;
pub use operator::{Operator, StreamError};
pub use watch::{StreamState, StreamStatus};

use std::sync::Arc;

use tracing::Instrument;

use crate::cli::{RunArgs, Switch};
use crate::config::ConfigStore;
use crate::identity::IdentityState;
use crate::metrics::Metrics;

/// The running stream client: what `/config` shows and where unknown destinations go.
pub struct StreamClient {
    /// The watch's state.
    pub state: Arc<StreamState>,
    /// The discovery queue.
    pub discovery: Discovery,
}

/// Starts the stream client when identity is on and the stream is not switched off.
pub fn start(
    args: &RunArgs,
    store: Arc<ConfigStore>,
    identity: Arc<IdentityState>,
    metrics: Arc<Metrics>,
) -> Option<StreamClient> {
    if args.config_stream == Switch::Off {
        return None;
    }
    let addr = args.identity.identity_addr.0.clone()?;
    let operator = Arc::new(Operator {
        addr,
        server_name: args.identity.identity_name.0.clone(),
        token: args.identity.identity_token.clone(),
        identity,
    });
    let state = Arc::new(StreamState::new(operator.addr.to_string()));
    let connected = Arc::new(tokio::sync::Notify::new());
    let watch = watch::Watch::new(
        operator.clone(),
        store.clone(),
        state.clone(),
        metrics.clone(),
        connected.clone(),
    );
    tokio::spawn(watch.run().instrument(tracing::info_span!("config_stream")));
    tokio::spawn(
        report::run(operator.clone(), store.applied(), connected)
            .instrument(tracing::info_span!("config_applied")),
    );
    let (discovery, queue) = Discovery::new(&metrics);
    tokio::spawn(
        discover::run(operator, queue, metrics).instrument(tracing::info_span!("discovery")),
    );
    Some(StreamClient { state, discovery })
}
