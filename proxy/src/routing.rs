//! Destinations: which service a connection or request is for, and which endpoint serves it.
//!
//! [`Destinations::compile`] turns a config into a lookup table once per config version, so the
//! request path does one hash lookup and one atomic increment. Endpoint choice is round-robin
//! over the ready endpoints ([`ServiceTarget::pick`]), for the connections the resilience
//! engine (`crate::policy`, routes, splits, retries, balancers, outlier detection) does not
//! balance: opaque TCP, and the eager connect while a connection's protocol is detected.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tandem_crds::contract::{Protocol, ProxyConfig};

use crate::metrics::{Direction, Metrics, Peer, ServiceTelemetry, Sym};
use crate::telemetry;

/// One port of one service, ready to be balanced over.
#[derive(Debug)]
pub struct ServiceTarget {
    /// Its metric series; `telemetry.label()` is `namespace/name`, the `dst_service` label in
    /// metrics and logs.
    pub telemetry: Arc<ServiceTelemetry>,
    /// The port clients connect to.
    pub port: u16,
    /// The declared protocol; anything but `detect` turns detection off.
    pub protocol: Protocol,
    /// Ready endpoints.
    pub endpoints: Vec<SocketAddr>,
    next: AtomicUsize,
}

impl ServiceTarget {
    /// The next endpoint in turn, or `None` when the service has no ready endpoint.
    pub fn pick(&self) -> Option<SocketAddr> {
        if self.endpoints.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        self.endpoints.get(turn % self.endpoints.len()).copied()
    }
}

/// The services of one config version, by cluster IP and port.
#[derive(Debug, Default)]
pub struct Destinations {
    by_addr: HashMap<SocketAddr, Arc<ServiceTarget>>,
}

impl Destinations {
    /// Builds the lookup table for a config, with each service's metric handles.
    pub fn compile(config: &ProxyConfig, metrics: &Metrics) -> Self {
        let mut by_addr = HashMap::new();
        let interner = &metrics.mesh.interner;
        let own = Peer {
            workload: metrics.mesh.workload(),
            namespace: interner.intern(&config.workload.namespace),
            principal: Sym::unknown(),
        };
        for service in &config.services {
            let labels = telemetry::service_labels(&service.name, &service.namespace, interner);
            let telemetry = metrics.service(
                Direction::Outbound,
                Arc::from(service.key().to_string()),
                labels,
                telemetry::peer_header(&own, &labels),
            );
            for port in &service.ports {
                let target = Arc::new(ServiceTarget {
                    telemetry: telemetry.clone(),
                    port: port.port,
                    protocol: port.protocol,
                    endpoints: port.endpoints.iter().map(|e| e.address).collect(),
                    next: AtomicUsize::new(0),
                });
                for ip in &service.cluster_ips {
                    // First service wins on a duplicate address, as `ProxyConfig::service_for`.
                    by_addr
                        .entry(SocketAddr::new(*ip, port.port))
                        .or_insert_with(|| target.clone());
                }
            }
        }
        Self { by_addr }
    }

    /// The service port a connection to `dst` is meant for.
    pub fn lookup(&self, dst: SocketAddr) -> Option<&Arc<ServiceTarget>> {
        self.by_addr.get(&dst)
    }

    /// Number of (cluster IP, port) pairs known.
    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    /// Whether no service is known (everything passes through).
    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }
}

/// Configs the unit tests of the tables compiled from a config share.
#[cfg(test)]
pub(crate) mod fixtures {
    use tandem_crds::contract::{Endpoint, Protocol, ProxyConfig, Service, ServicePort, Workload};

    /// One endpoint.
    pub(crate) fn endpoint(address: &str, meshed: bool, identity: Option<&str>) -> Endpoint {
        Endpoint {
            address: address.parse().unwrap(),
            meshed,
            identity: identity.map(str::to_owned),
            workload: None,
        }
    }

    /// A config with one service, `shop/web` on 10.96.0.10:80 (HTTP), with these endpoints.
    pub(crate) fn web(endpoints: Vec<Endpoint>) -> ProxyConfig {
        let mut c = ProxyConfig::new(Workload::default());
        c.services.push(Service {
            name: "web".into(),
            namespace: "shop".into(),
            cluster_ips: vec!["10.96.0.10".parse().unwrap()],
            ports: vec![ServicePort {
                name: "http".into(),
                port: 80,
                protocol: Protocol::Http,
                endpoints,
            }],
            ..Service::default()
        });
        c
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{endpoint, web};
    use super::*;

    fn config() -> ProxyConfig {
        web(vec![
            endpoint("10.0.0.1:8080", true, None),
            endpoint("10.0.0.2:8080", true, None),
        ])
    }

    #[test]
    fn endpoints_are_taken_in_turn() {
        let d = Destinations::compile(&config(), &Metrics::new());
        let t = d.lookup("10.96.0.10:80".parse().unwrap()).unwrap();
        let picks: Vec<_> = (0..4).map(|_| t.pick().unwrap().to_string()).collect();
        assert_eq!(
            picks,
            [
                "10.0.0.1:8080",
                "10.0.0.2:8080",
                "10.0.0.1:8080",
                "10.0.0.2:8080"
            ]
        );
        assert_eq!(t.telemetry.label(), "shop/web");
    }

    #[test]
    fn unknown_addresses_and_ports_are_not_services() {
        let d = Destinations::compile(&config(), &Metrics::new());
        assert!(d.lookup("10.96.0.10:81".parse().unwrap()).is_none());
        assert!(d.lookup("10.96.0.11:80".parse().unwrap()).is_none());
    }

    #[test]
    fn a_service_without_endpoints_picks_none() {
        let mut c = config();
        c.services[0].ports[0].endpoints.clear();
        let d = Destinations::compile(&c, &Metrics::new());
        assert!(
            d.lookup("10.96.0.10:80".parse().unwrap())
                .unwrap()
                .pick()
                .is_none()
        );
    }
}
