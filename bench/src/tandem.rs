//! tandem-proxy in the benchmark: the ports each instance listens on, the config files (the
//! `tandem.dev/proxy-config/v1` contract) that make one or two hops, and the request counters
//! that prove a run went through them.
//!
//! The loopback run uses no iptables (the capture run, [`crate::capture`], adds them):
//! A connection that iptables did not redirect reaches the outbound listener with the
//! destination only in its Host header; the proxy matches that against the config's services
//! (cluster IP and port) and balances over the service's endpoints. The inbound listener sends
//! such a connection to 127.0.0.1:<port of the Host header>. So:
//! - one hop: client → A outbound (service = the upstream's address, endpoint = the upstream);
//! - two hops: client → A outbound (endpoint = B's inbound) → B inbound → 127.0.0.1:upstream.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use tandem_crds::contract::{
    Authorization, AuthorizationAction, AuthorizationPolicy, AuthorizationRule, Callers,
    DefaultPolicy, Endpoint, MtlsMode, Operations, PROXY_CONFIG_API_VERSION, PathMatch, Protocol,
    ProxyConfig, Service, ServicePort, Telemetry, Tracing, Workload,
};
use tandem_crds::identity::SpiffeId;

use serde::{Deserialize, Serialize};

use crate::admin::{self, Probe};
use crate::otlp_sink::{STATS_PATH, SinkStats};
use crate::topology::{TopologyError, free_port};

/// The `dst_service` label of the benchmark's service in the client proxy's metrics.
pub const SERVICE: &str = "bench/upstream";

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

    /// A sidecar's standard ports (15001, 15006, 15020) on every address of its pod.
    pub fn standard() -> Self {
        use tandem_crds::names::{ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT};
        let any = |port| SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        Self {
            outbound: any(OUTBOUND_PORT),
            inbound: any(INBOUND_PORT),
            admin: any(ADMIN_PORT),
        }
    }
}

/// The client sidecar's count of requests it routed to the benchmark's service (a request it
/// passed through unrouted does not count). `netns`: where its admin listener is.
pub fn outbound_probe(netns: Option<PathBuf>, admin: SocketAddr) -> Probe {
    Probe {
        label: "client sidecar (outbound, service bench/upstream)".into(),
        netns,
        admin: loopback(admin),
        direction: "outbound",
        service: SERVICE.into(),
    }
}

/// The server sidecar's count of inbound requests.
pub fn inbound_probe(netns: Option<PathBuf>, admin: SocketAddr) -> Probe {
    Probe {
        label: "server sidecar (inbound)".into(),
        netns,
        admin: loopback(admin),
        direction: "inbound",
        service: "inbound".into(),
    }
}

/// A listener on every address is reached on loopback.
fn loopback(addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
    } else {
        addr
    }
}

fn workload(service_account: &str, mtls: MtlsMode) -> Workload {
    Workload {
        namespace: crate::signer::NAMESPACE.into(),
        service_account: service_account.into(),
        mtls,
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
    service_config(
        cluster.ip(),
        &[("http", cluster.port(), Protocol::Http)],
        endpoint,
        meshed,
    )
}

/// The client-side proxy's config for the mutual-TLS two hops: as [`client_config`] with a
/// meshed endpoint, which also names the server sidecar's identity, so the client sidecar
/// opens mutual TLS to it and accepts only a certificate for `server`.
pub fn mtls_client_config(
    cluster: SocketAddr,
    endpoint: SocketAddr,
    server: &SpiffeId,
) -> Result<String, ConfigError> {
    render(&client_proxy_config(
        cluster.ip(),
        &[("http", cluster.port(), Protocol::Http)],
        Endpoint {
            address: endpoint,
            meshed: true,
            identity: Some(server.uri()),
            workload: None,
        },
    ))
}

/// The client-side proxy's config: one service at `cluster_ip` with `ports` (name, port,
/// declared protocol), each sent to the one ready `endpoint`.
pub fn service_config(
    cluster_ip: IpAddr,
    ports: &[(&str, u16, Protocol)],
    endpoint: SocketAddr,
    meshed: bool,
) -> Result<String, ConfigError> {
    render(&client_proxy_config(
        cluster_ip,
        ports,
        Endpoint {
            address: endpoint,
            meshed,
            identity: None,
            workload: None,
        },
    ))
}

fn client_proxy_config(
    cluster_ip: IpAddr,
    ports: &[(&str, u16, Protocol)],
    endpoint: Endpoint,
) -> ProxyConfig {
    ProxyConfig {
        api_version: PROXY_CONFIG_API_VERSION.into(),
        version: "bench".into(),
        workload: workload("client", MtlsMode::Permissive),
        services: vec![Service {
            name: "upstream".into(),
            namespace: "bench".into(),
            cluster_ips: vec![cluster_ip],
            ports: ports
                .iter()
                .map(|&(name, port, protocol)| ServicePort {
                    name: name.into(),
                    port,
                    protocol,
                    endpoints: vec![endpoint.clone()],
                })
                .collect(),
            ..Service::default()
        }],
        ..ProxyConfig::default()
    }
}

/// The server-side proxy's config: no services (its inbound side needs none).
pub fn server_config() -> Result<String, ConfigError> {
    render(&server_proxy_config(MtlsMode::Permissive))
}

/// The traced two hops' client-side config: [`client_config`] with a meshed endpoint and
/// tracing on, exporting to `collector` and starting a trace for `sampling_percent` % of the
/// requests that arrive without one (the load generator sends no trace context).
pub fn traced_client_config(
    cluster: SocketAddr,
    endpoint: SocketAddr,
    collector: &str,
    sampling_percent: f64,
) -> Result<String, ConfigError> {
    let mut config = client_proxy_config(
        cluster.ip(),
        &[("http", cluster.port(), Protocol::Http)],
        Endpoint {
            address: endpoint,
            meshed: true,
            identity: None,
            workload: None,
        },
    );
    config.telemetry = traced(collector, sampling_percent);
    render(&config)
}

/// The traced two hops' server-side config: [`server_config`] with the same tracing. Its
/// inbound follows the client sidecar's decision (the `traceparent` it adds), so the
/// percentage only matters for a request that reaches it without one.
pub fn traced_server_config(collector: &str, sampling_percent: f64) -> Result<String, ConfigError> {
    let mut config = server_proxy_config(MtlsMode::Permissive);
    config.telemetry = traced(collector, sampling_percent);
    render(&config)
}

fn traced(collector: &str, sampling_percent: f64) -> Telemetry {
    Telemetry {
        tracing: Some(Tracing {
            collector: collector.to_owned(),
            sampling_percent,
        }),
        ..Telemetry::default()
    }
}

/// A proxy's span export counters, from its `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpanCounts {
    /// `tandem_trace_spans_exported_total`: spans the collector accepted.
    pub exported: u64,
    /// `tandem_trace_spans_dropped_total`, every reason (queue full, export failed).
    pub dropped: u64,
}

impl SpanCounts {
    /// The counters in a `/metrics` text; `None` when the proxy has no span export counter
    /// (a build without tracing: a traced topology must not be measured on it).
    pub fn parse(text: &str) -> Option<Self> {
        const EXPORTED: &str = "tandem_trace_spans_exported_total";
        let has_exported = text.lines().any(|line| {
            line.strip_prefix(EXPORTED)
                .is_some_and(|rest| rest.starts_with([' ', '{']))
        });
        has_exported.then(|| Self {
            exported: admin::counter_sum(text, EXPORTED, &[]),
            dropped: admin::counter_sum(text, "tandem_trace_spans_dropped_total", &[]),
        })
    }

    /// Both proxies' counts added up.
    pub fn plus(&self, other: SpanCounts) -> SpanCounts {
        SpanCounts {
            exported: self.exported + other.exported,
            dropped: self.dropped + other.dropped,
        }
    }
}

/// A tracing topology's export path: the proxies whose span counters are read, and the sink
/// they export to.
#[derive(Debug, Clone)]
pub struct Traced {
    /// The OTLP load sink.
    pub sink: SocketAddr,
    /// The admin listeners of the proxies that trace.
    pub admins: Vec<SocketAddr>,
    /// The configs' `samplingPercent`.
    pub sampling_percent: f64,
}

/// What a tracing topology exported during one round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct TraceReading {
    /// Both proxies' span counters added up.
    pub spans: SpanCounts,
    /// What the sink received.
    pub sink_posts: u64,
    /// The bytes of those POSTs.
    pub sink_bytes: u64,
}

impl Traced {
    /// Every proxy's span counters added up and the sink's counts, now. A proxy without the
    /// span counters fails the reading: it was not tracing, whatever its config said.
    pub async fn read(&self) -> Result<TraceReading, String> {
        let mut spans = SpanCounts::default();
        for &admin in &self.admins {
            let text = admin::get(admin, "/metrics")
                .await
                .map_err(|e| e.to_string())?;
            let counts = SpanCounts::parse(&text).ok_or_else(|| {
                format!(
                    "the proxy at {admin} has no tandem_trace_spans_exported_total: a build \
                     without tracing cannot be measured as a tracing topology"
                )
            })?;
            spans = spans.plus(counts);
        }
        let text = admin::get(self.sink, STATS_PATH)
            .await
            .map_err(|e| format!("OTLP sink: {e}"))?;
        let sink = SinkStats::parse(&text)
            .ok_or_else(|| format!("OTLP sink {}: unreadable stats {text:?}", self.sink))?;
        Ok(TraceReading {
            spans,
            sink_posts: sink.posts,
            sink_bytes: sink.bytes,
        })
    }
}

/// The server-side proxy's config for the mutual-TLS two hops: `strict`, so plaintext to its
/// inbound listener is refused (the benchmark checks that it is, to know the hop is TLS).
pub fn mtls_server_config() -> Result<String, ConfigError> {
    render(&server_proxy_config(MtlsMode::Strict))
}

/// The server-side proxy's config for the authorization cost runs: `strict`, default policy
/// `deny`, and one Allow policy of `rules` rules, of which only the last names the client
/// (`client`, its SPIFFE ID) — every request scans them all, the worst case.
pub fn authz_server_config(rules: usize, client: &str) -> Result<String, ConfigError> {
    let mut config = server_proxy_config(MtlsMode::Strict);
    config.authorization = authz_fixture(rules, client);
    render(&config)
}

/// The authorization of [`authz_server_config`]: rules that each name another workload and a
/// path and a method, then the one that lets the client `GET` anything.
fn authz_fixture(rules: usize, client: &str) -> Authorization {
    let other = |i: usize| AuthorizationRule {
        from: Some(Callers {
            principals: vec![format!(
                "spiffe://cluster.local/ns/{}/sa/other-{i}",
                crate::signer::NAMESPACE
            )],
            ..Callers::default()
        }),
        to: Some(Operations {
            paths: vec![PathMatch::Prefix(format!("/other-{i}"))],
            methods: vec!["GET".into()],
            ..Operations::default()
        }),
    };
    let mut all: Vec<AuthorizationRule> = (0..rules.saturating_sub(1)).map(other).collect();
    all.push(AuthorizationRule {
        from: Some(Callers {
            principals: vec![client.to_owned()],
            ..Callers::default()
        }),
        to: Some(Operations {
            paths: vec![PathMatch::Prefix("/".into())],
            methods: vec!["GET".into()],
            ..Operations::default()
        }),
    });
    Authorization {
        default_policy: DefaultPolicy::Deny,
        cluster_networks: Vec::new(),
        policies: vec![AuthorizationPolicy {
            name: format!("{}/allow-client", crate::signer::NAMESPACE),
            action: AuthorizationAction::Allow,
            ports: Vec::new(),
            rules: all,
        }],
    }
}

fn server_proxy_config(mtls: MtlsMode) -> ProxyConfig {
    ProxyConfig {
        api_version: PROXY_CONFIG_API_VERSION.into(),
        version: "bench".into(),
        workload: workload("server", mtls),
        ..ProxyConfig::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authz_fixture_validates_and_only_its_last_rule_allows_the_client() {
        use tandem_crds::contract::{Authorizer, Caller, CallerIdentity, DecidedBy, Request};
        let client = "spiffe://cluster.local/ns/bench/sa/client";
        for rules in [1, 10, 100] {
            let authz = authz_fixture(rules, client);
            authz.validate().unwrap();
            assert_eq!(authz.policies[0].rules.len(), rules);
            let authorizer = Authorizer::new(&authz, "cluster.local").unwrap();
            let caller = Caller {
                identity: Some(CallerIdentity {
                    uri: client,
                    trust_domain: "cluster.local",
                    namespace: "bench",
                }),
                address: None,
            };
            let decision = authorizer.decide(&Request {
                port: 8080,
                caller,
                http: None,
            });
            // An opaque connection cannot match a rule with a method: denied.
            assert!(!decision.allowed);
            assert_eq!(decision.by, DecidedBy::NoAllowMatched);
        }
        assert!(authz_server_config(10, client).is_ok());
    }

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

    #[test]
    fn the_mtls_configs_name_the_server_s_identity_and_make_the_server_strict() {
        let upstream: SocketAddr = "127.0.0.1:2000".parse().unwrap();
        let inbound: SocketAddr = "127.0.0.1:3000".parse().unwrap();
        let server_id = SpiffeId::new("cluster.local", "bench", "server");
        let client: ProxyConfig =
            serde_json::from_str(&mtls_client_config(upstream, inbound, &server_id).unwrap())
                .unwrap();
        let endpoint = &client.services[0].ports[0].endpoints[0];
        assert_eq!(endpoint.address, inbound);
        assert!(endpoint.meshed);
        assert_eq!(
            endpoint.identity.as_deref(),
            Some("spiffe://cluster.local/ns/bench/sa/server")
        );
        assert_eq!(client.workload.service_account, "client");
        let server: ProxyConfig = serde_json::from_str(&mtls_server_config().unwrap()).unwrap();
        assert_eq!(server.workload.mtls, MtlsMode::Strict);
        assert_eq!(server.workload.service_account, "server");
        // The plaintext two hops stay as they were.
        let plain: ProxyConfig =
            serde_json::from_str(&client_config(upstream, inbound, true).unwrap()).unwrap();
        assert_eq!(plain.services[0].ports[0].endpoints[0].identity, None);
        let plain_server: ProxyConfig = serde_json::from_str(&server_config().unwrap()).unwrap();
        assert_eq!(plain_server.workload.mtls, MtlsMode::Permissive);
    }

    #[test]
    fn the_traced_configs_carry_the_collector_and_the_percentage_on_both_proxies() {
        let upstream: SocketAddr = "127.0.0.1:2000".parse().unwrap();
        let inbound: SocketAddr = "127.0.0.1:3000".parse().unwrap();
        let sink = "http://127.0.0.1:4000";
        let json = traced_client_config(upstream, inbound, sink, 100.0).unwrap();
        // The contract's camelCase names, as the proxy reads them.
        assert!(json.contains("\"samplingPercent\": 100.0"), "{json}");
        let client: ProxyConfig = serde_json::from_str(&json).unwrap();
        let tracing = client.telemetry.tracing.unwrap();
        assert_eq!(tracing.collector, sink);
        assert_eq!(tracing.sampling_percent, 100.0);
        assert_eq!(client.services[0].ports[0].endpoints[0].address, inbound);
        assert!(client.services[0].ports[0].endpoints[0].meshed);
        let server: ProxyConfig =
            serde_json::from_str(&traced_server_config(sink, 1.0).unwrap()).unwrap();
        assert_eq!(server.telemetry.tracing.unwrap().sampling_percent, 1.0);
        assert!(server.services.is_empty());
        // The untraced two hops carry no telemetry section at all.
        assert!(
            !client_config(upstream, inbound, true)
                .unwrap()
                .contains("telemetry")
        );
        // The contract refuses a percentage outside 0–100: the bench cannot ask for one.
        assert!(traced_server_config(sink, 101.0).is_err());
    }

    #[test]
    fn span_counts_add_every_drop_reason_and_need_the_export_counter() {
        let text = "\
# HELP tandem_trace_spans_exported Spans the trace collector accepted
# TYPE tandem_trace_spans_exported counter
tandem_trace_spans_exported_total 1500
tandem_trace_spans_dropped_total{reason=\"queue-full\"} 20
tandem_trace_spans_dropped_total{reason=\"export-failed\"} 3
tandem_trace_spans_dropped_total{reason=\"disabled\"} 0
tandem_trace_export_errors_total 1
";
        let counts = SpanCounts::parse(text).unwrap();
        assert_eq!(
            counts,
            SpanCounts {
                exported: 1500,
                dropped: 23
            }
        );
        let before = SpanCounts {
            exported: 500,
            dropped: 3,
        };
        assert_eq!(
            counts.plus(before),
            SpanCounts {
                exported: 2000,
                dropped: 26
            }
        );
        // A proxy without tracing's counters (HELP lines alone do not count).
        assert_eq!(
            SpanCounts::parse("# HELP tandem_trace_spans_exported x\ntandem_requests_total 3\n"),
            None
        );
    }

    #[test]
    fn probes_of_standard_ports_read_the_admin_port_on_loopback() {
        let ports = Ports::standard();
        assert_eq!(ports.outbound.to_string(), "0.0.0.0:15001");
        let probe = inbound_probe(None, ports.admin);
        assert_eq!(probe.admin.to_string(), "127.0.0.1:15020");
        assert_eq!(probe.service, "inbound");
        assert_eq!(outbound_probe(None, ports.admin).service, SERVICE);
    }
}
