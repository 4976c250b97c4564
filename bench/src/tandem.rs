//! tandem-proxy in the benchmark, without iptables: the ports each instance listens on and the
//! config files that make one or two hops.
//!
//! A connection that iptables did not redirect reaches the outbound listener with the
//! destination only in its Host header; the proxy matches that against the config's services
//! (cluster IP and port) and balances over the service's endpoints. The inbound listener sends
//! such a connection to 127.0.0.1:<port of the Host header>. So:
//! - one hop: client → A outbound (service = the upstream's address, endpoint = the upstream);
//! - two hops: client → A outbound (endpoint = B's inbound) → B inbound → 127.0.0.1:upstream.

use std::net::SocketAddr;

use serde_json::json;

use crate::topology::{TopologyError, free_port};

/// Errors building a tandem-proxy config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
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

/// Config of the client-side proxy: one HTTP service at `cluster` with one ready endpoint.
pub fn client_config(cluster: SocketAddr, endpoint: SocketAddr) -> Result<String, ConfigError> {
    let config = json!({
        "apiVersion": "tandem.dev/proxy-config/v1",
        "workload": { "namespace": "bench", "serviceAccount": "client" },
        "services": [{
            "name": "upstream",
            "namespace": "bench",
            "clusterIPs": [cluster.ip().to_string()],
            "ports": [{ "port": cluster.port(), "protocol": "http" }],
            "endpoints": [{ "ip": endpoint.ip().to_string(), "port": endpoint.port() }],
        }],
    });
    Ok(serde_json::to_string_pretty(&config)?)
}

/// Config of the server-side proxy: no services (its inbound side needs none).
pub fn server_config() -> Result<String, ConfigError> {
    let config = json!({
        "apiVersion": "tandem.dev/proxy-config/v1",
        "workload": { "namespace": "bench", "serviceAccount": "server" },
        "services": [],
    });
    Ok(serde_json::to_string_pretty(&config)?)
}
