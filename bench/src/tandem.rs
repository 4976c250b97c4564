//! tandem-proxy in the benchmark, without iptables: the ports each instance listens on and the
//! config files (the `tandem.dev/proxy-config/v1` contract) that make one or two hops.
//!
//! A connection that iptables did not redirect reaches the outbound listener with the
//! destination only in its Host header; the proxy matches that against the config's services
//! (cluster IP and port) and balances over the service's endpoints. The inbound listener sends
//! such a connection to 127.0.0.1:<port of the Host header>. So:
//! - one hop: client → A outbound (service = the upstream's address, endpoint = the upstream);
//! - two hops: client → A outbound (endpoint = B's inbound) → B inbound → 127.0.0.1:upstream.

use std::net::SocketAddr;

use tandem_crds::contract::{
    Endpoint, PROXY_CONFIG_API_VERSION, Protocol, ProxyConfig, Service, ServicePort, Workload,
};

use crate::topology::{TopologyError, free_port};

/// Errors building a tandem-proxy config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The contract's own validation refused the config.
    #[error("invalid: {0}")]
    Invalid(#[from] tandem_crds::contract::ValidationErrors),
    /// The config did not serialise.
    #[error("serialise: {0}")]
    Serialise(#[from] serde_json::Error),
}

/// The three listeners of one tandem-proxy.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    /// Outbound (client-side) listener.
    pub outbound: SocketAddr,
    /// Inbound (server-side) listener.
    pub inbound: SocketAddr,
    /// Admin listener (`/live`, `/ready`, `/metrics`, `/config`).
    pub admin: SocketAddr,
}

impl Ports {
    /// Three loopback ports free right now.
    pub fn free() -> Result<Self, TopologyError> {
        Ok(Self {
            outbound: free_port()?,
            inbound: free_port()?,
            admin: free_port()?,
        })
    }
}

fn workload(service_account: &str) -> Workload {
    Workload {
        namespace: "bench".into(),
        service_account: service_account.into(),
    }
}

fn render(config: &ProxyConfig) -> Result<String, ConfigError> {
    config.validate()?;
    Ok(serde_json::to_string_pretty(config)?)
}

/// The client-side proxy's config: one HTTP/1.1 service at `cluster` whose one ready endpoint
/// is `endpoint`; `meshed` says whether a tandem-proxy listens there (the two-hop case).
pub fn client_config(
    cluster: SocketAddr,
    endpoint: SocketAddr,
    meshed: bool,
) -> Result<String, ConfigError> {
    render(&ProxyConfig {
        api_version: PROXY_CONFIG_API_VERSION.into(),
        version: "bench".into(),
        workload: workload("client"),
        services: vec![Service {
            name: "upstream".into(),
            namespace: "bench".into(),
            cluster_ips: vec![cluster.ip()],
            ports: vec![ServicePort {
                name: "http".into(),
                port: cluster.port(),
                protocol: Protocol::Http,
                endpoints: vec![Endpoint {
                    address: endpoint,
                    meshed,
                }],
            }],
            ..Service::default()
        }],
        ..ProxyConfig::default()
    })
}

/// The server-side proxy's config: no services (its inbound side needs none).
pub fn server_config() -> Result<String, ConfigError> {
    render(&ProxyConfig {
        api_version: PROXY_CONFIG_API_VERSION.into(),
        version: "bench".into(),
        workload: workload("server"),
        ..ProxyConfig::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_pass_the_contracts_validation_and_name_the_endpoint() {
        let upstream: SocketAddr = "127.0.0.1:2000".parse().unwrap();
        let inbound: SocketAddr = "127.0.0.1:3000".parse().unwrap();
        let client = client_config(upstream, inbound, true).unwrap();
        let parsed: ProxyConfig = serde_json::from_str(&client).unwrap();
        let port = &parsed.services[0].ports[0];
        assert_eq!(port.port, 2000);
        assert_eq!(port.endpoints[0].address, inbound);
        assert!(port.endpoints[0].meshed);
        let server: ProxyConfig = serde_json::from_str(&server_config().unwrap()).unwrap();
        assert!(server.services.is_empty());
    }
}
