//! On-demand discovery: the proxy saw a connection to an address no config entry knows.
//!
//! The connection itself passes through at once, as any unknown destination does; the
//! connection path only offers the address to a small bounded queue ([`Discovery::ask`]: a
//! `try_send`, no lock, no wait; a full queue drops it). One task asks the operator, one
//! address at a time, remembering what it asked (a bounded map): an address is asked again only
//! after [`REMEMBER`] (an address no Service has, [`RETRY_ERROR`] after a failed call). A found
//! Service needs nothing more here: the operator adds it to the workload's view, so it arrives
//! on the stream.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tandem_crds::contract::stream::DISCOVER_PATH;
use tandem_crds::contract::{DiscoverRequest, DiscoverResponse};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::operator::Operator;
use crate::error::chain;
use crate::metrics::{DiscoveryLabels, Metrics};

/// Addresses waiting to be asked; more are dropped (asked again by a later connection).
const QUEUE: usize = 64;
/// Addresses remembered at most.
const REMEMBERED: usize = 4_096;
/// How long an answered address is not asked again.
pub const REMEMBER: Duration = Duration::from_secs(60);
/// How long an address whose call failed is not asked again.
pub const RETRY_ERROR: Duration = Duration::from_secs(5);

/// The connection path's end of the queue.
#[derive(Clone)]
pub struct Discovery {
    queue: mpsc::Sender<SocketAddr>,
    /// `tandem_proxy_discovery_requests_total{result="dropped"}`, resolved once so the
    /// connection path never looks a series up.
    dropped: Counter,
}

impl Discovery {
    /// The queue and its receiving end (for [`run`]).
    pub fn new(metrics: &Metrics) -> (Self, mpsc::Receiver<SocketAddr>) {
        let (queue, rx) = mpsc::channel(QUEUE);
        let dropped = metrics
            .stream
            .discoveries
            .get_or_create(&DiscoveryLabels { result: "dropped" })
            .clone();
        (Self { queue, dropped }, rx)
    }

    /// Offers `addr` for discovery without waiting.
    pub fn ask(&self, addr: SocketAddr) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.queue.try_send(addr) {
            self.dropped.inc();
        }
    }
}

/// Asks the operator for each queued address not asked recently, until the queue closes.
pub async fn run(
    operator: Arc<Operator>,
    mut queue: mpsc::Receiver<SocketAddr>,
    metrics: Arc<Metrics>,
) {
    let mut asked: HashMap<SocketAddr, Instant> = HashMap::new();
    while let Some(address) = queue.recv().await {
        let now = Instant::now();
        if asked.get(&address).is_some_and(|until| now < *until) {
            continue;
        }
        if asked.len() >= REMEMBERED {
            asked.retain(|_, until| now < *until);
            if asked.len() >= REMEMBERED {
                metrics.stream.discovered("dropped");
                continue;
            }
        }
        let request = DiscoverRequest { address };
        let answer = operator
            .post::<_, DiscoverResponse>(DISCOVER_PATH, &request)
            .await;
        let (result, wait) = match answer {
            Ok(DiscoverResponse {
                service: Some(service),
            }) => {
                tracing::info!(%address, %service, "Discovered; the Service joins this workload's view");
                ("found", REMEMBER)
            }
            Ok(DiscoverResponse { service: None }) => {
                tracing::debug!(%address, "No Service has this address");
                ("unknown", REMEMBER)
            }
            Err(error) => {
                tracing::warn!(%address, error = %chain(&error), "Discovery failed");
                ("error", RETRY_ERROR)
            }
        };
        metrics.stream.discovered(result);
        asked.insert(address, Instant::now() + wait);
    }
}
