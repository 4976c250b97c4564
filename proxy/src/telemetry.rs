//! Who talks to whom: the labels of the standard metrics ([`crate::metrics::mesh`]) and of the
//! access log, from the config and the peer.
//!
//! - **This workload**: its name from `--workload-name` (`TANDEM_WORKLOAD_NAME`, which the
//!   webhook sets with the pod's controller's name), its namespace from the config, its
//!   principal the SPIFFE ID of the config's ServiceAccount.
//! - **Outbound** (`reporter="source"`): the source is this workload; the destination is the
//!   chosen endpoint's `workload` and `identity` as the operator rendered them, and the service
//!   the request was routed to, `<name>.<namespace>.svc.cluster.local` as Istio writes it
//!   (`unknown` for passthrough).
//! - **Inbound** (`reporter="destination"`): the destination is this workload. The source's
//!   principal and namespace come from the peer's mTLS certificate; its workload name (and the
//!   service it addressed) from the [`PEER_HEADER`] the outbound proxy adds to every request to
//!   a meshed endpoint. The inbound proxy reads it and always strips it before the app; it is
//!   used for labels only, never for authorization, and when mTLS gives a principal, the
//!   principal's namespace wins over the header's.
//! - Principals are filled only on a mutual TLS hop (`connection_security_policy="mutual_tls"`);
//!   plaintext hops have `unknown` ones, as in Istio.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderValue;
use pingora::proxy::Session;
use tandem_crds::contract::{ProxyConfig, ServiceRef};
use tandem_crds::identity::SpiffeId;

use crate::config::ActiveConfig;
use crate::metrics::intern::{Interner, Sym};
use crate::metrics::mesh::{GrpcStatus, TcpSeries};
use crate::metrics::{
    Direction, Labels, Peer, Reporter, RequestProtocol, ResponseFlags, SecurityPolicy,
    ServiceLabels, ServiceTelemetry,
};
use crate::server::Shared;
use crate::tls::PeerIdentity;

/// The request header that carries the calling workload to the inbound proxy:
/// `<namespace>/<workload>/<service fqdn>`.
pub const PEER_HEADER: &str = "x-tandem-peer";

/// The cluster domain of `destination_service` (`<svc>.<ns>.svc.cluster.local`).
pub const CLUSTER_DOMAIN: &str = "cluster.local";

/// The destination labels of one endpoint.
#[derive(Clone, Copy, Debug)]
pub struct EndpointLabels {
    /// Its workload, namespace and identity (the principal, used only over mutual TLS).
    pub peer: Peer,
    /// Whether a Tandem proxy runs beside it (so it may be told who calls).
    pub meshed: bool,
}

/// The labels of one config version: this workload and every endpoint and service it knows.
#[derive(Debug)]
pub struct LabelTable {
    /// This workload, with its principal.
    own: Peer,
    endpoints: HashMap<SocketAddr, EndpointLabels, foldhash::fast::RandomState>,
    /// Each service's labels and the peer header of requests to it.
    services: HashMap<ServiceRef, RoutedService, foldhash::fast::RandomState>,
}

/// A service requests are routed to: its labels and what its requests tell the peer.
#[derive(Clone, Debug)]
pub struct RoutedService {
    /// `destination_service*`.
    pub labels: ServiceLabels,
    /// The [`PEER_HEADER`] value of requests to it.
    pub peer_header: Option<HeaderValue>,
}

impl LabelTable {
    /// The labels of `config`: this workload named `workload`, principals in `trust_domain`.
    pub fn compile(
        config: &ProxyConfig,
        workload: Sym,
        trust_domain: &str,
        interner: &Interner,
    ) -> Self {
        let ns = &config.workload.namespace;
        let principal = SpiffeId::new(trust_domain, ns, &config.workload.service_account).uri();
        let own = Peer {
            workload,
            namespace: interner.intern(ns),
            principal: interner.intern(&principal),
        };
        let mut endpoints = HashMap::default();
        let mut services = HashMap::default();
        for service in &config.services {
            let labels = service_labels(&service.name, &service.namespace, interner);
            let peer_header = peer_header(&own, &labels);
            services.insert(
                service.key(),
                RoutedService {
                    labels,
                    peer_header,
                },
            );
            for endpoint in service.ports.iter().flat_map(|p| &p.endpoints) {
                endpoints
                    .entry(endpoint.address)
                    .or_insert_with(|| EndpointLabels {
                        peer: endpoint_peer(endpoint, interner),
                        meshed: endpoint.meshed,
                    });
            }
        }
        Self {
            own,
            endpoints,
            services,
        }
    }

    /// The table when no config is loaded: everything `unknown` but the workload name.
    pub fn empty(workload: Sym) -> Self {
        Self {
            own: Peer {
                workload,
                ..Peer::unknown()
            },
            endpoints: HashMap::default(),
            services: HashMap::default(),
        }
    }

    /// This workload, with its principal when the hop is mutual TLS.
    pub fn own(&self, mtls: bool) -> Peer {
        with_principal(self.own, mtls)
    }

    /// The endpoint at `addr` (`unknown` labels when the config does not list it), with its
    /// principal when the hop is mutual TLS.
    pub fn endpoint(&self, addr: Option<SocketAddr>, mtls: bool) -> Peer {
        addr.and_then(|a| self.endpoints.get(&a))
            .map_or_else(Peer::unknown, |e| with_principal(e.peer, mtls))
    }

    /// Whether the endpoint at `addr` runs a Tandem proxy.
    pub fn meshed(&self, addr: SocketAddr) -> bool {
        self.endpoints.get(&addr).is_some_and(|e| e.meshed)
    }

    /// The labels of a service the config names.
    pub fn service(&self, service: &ServiceRef) -> Option<&RoutedService> {
        self.services.get(service)
    }
}

fn with_principal(peer: Peer, mtls: bool) -> Peer {
    if mtls {
        peer
    } else {
        Peer {
            principal: Sym::unknown(),
            ..peer
        }
    }
}

/// An endpoint's workload and identity; its namespace from the workload, else its identity.
fn endpoint_peer(endpoint: &tandem_crds::contract::Endpoint, interner: &Interner) -> Peer {
    let id = endpoint
        .identity
        .as_deref()
        .and_then(|i| SpiffeId::parse(i).ok());
    let workload = endpoint.workload.as_ref();
    let namespace = workload
        .map(|w| w.namespace.as_str())
        .or(id.as_ref().map(|i| i.namespace.as_str()))
        .unwrap_or("");
    Peer {
        workload: interner.intern(workload.map_or("", |w| w.name.as_str())),
        namespace: interner.intern(namespace),
        principal: interner.intern(endpoint.identity.as_deref().unwrap_or("")),
    }
}

/// `<name>.<namespace>.svc.cluster.local`, its name and namespace.
pub fn service_labels(name: &str, namespace: &str, interner: &Interner) -> ServiceLabels {
    ServiceLabels {
        fqdn: interner.intern(&format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}")),
        name: interner.intern(name),
        namespace: interner.intern(namespace),
    }
}

/// The [`PEER_HEADER`] value an outbound request to `service` carries from `own`.
pub fn peer_header(own: &Peer, service: &ServiceLabels) -> Option<HeaderValue> {
    let value = format!(
        "{}/{}/{}",
        own.namespace.as_str(),
        own.workload.as_str(),
        service.fqdn.as_str()
    );
    HeaderValue::from_str(&value).ok()
}

/// What the [`PEER_HEADER`] of an inbound request says, borrowed from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerHeader<'a> {
    /// The caller's namespace.
    pub namespace: &'a str,
    /// The caller's workload.
    pub workload: &'a str,
    /// The service it addressed (`<svc>.<ns>.svc.<domain>`), "" when none.
    pub service: &'a str,
}

impl<'a> PeerHeader<'a> {
    /// Parses a header value; `None` when it is not `<namespace>/<workload>/<service>` made of
    /// Kubernetes name characters (anything else is not ours, and gets `unknown` labels).
    pub fn parse(value: &'a [u8]) -> Option<Self> {
        let value = std::str::from_utf8(value).ok()?;
        let mut parts = value.splitn(3, '/');
        let header = Self {
            namespace: parts.next()?,
            workload: parts.next()?,
            service: parts.next().unwrap_or(""),
        };
        let name_like = |s: &str| {
            s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        };
        (!header.namespace.is_empty()
            && !header.workload.is_empty()
            && name_like(header.namespace)
            && name_like(header.workload)
            && name_like(header.service))
        .then_some(header)
    }

    /// The service labels it names: `unknown` unless it is `<name>.<namespace>.svc.<domain>`.
    pub fn service_labels(&self, interner: &Interner) -> ServiceLabels {
        let mut parts = self.service.splitn(4, '.');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(name), Some(namespace), Some("svc")) if !name.is_empty() => ServiceLabels {
                fqdn: interner.intern(self.service),
                name: interner.intern(name),
                namespace: interner.intern(namespace),
            },
            _ => ServiceLabels::unknown(),
        }
    }
}

/// The source of an inbound request: the mTLS peer's principal and namespace, the header's
/// workload (and its namespace when there is no certificate).
pub fn inbound_source(
    peer: Option<&PeerIdentity>,
    header: Option<&PeerHeader<'_>>,
    interner: &Interner,
) -> Peer {
    let workload = interner.intern(header.map_or("", |h| h.workload));
    match peer {
        Some(peer) => Peer {
            workload,
            namespace: interner.intern(&peer.id.namespace),
            principal: interner.intern(&peer.uri),
        },
        None => Peer {
            workload,
            namespace: interner.intern(header.map_or("", |h| h.namespace)),
            principal: Sym::unknown(),
        },
    }
}

/// The label table of the active config, or of no config.
pub enum Table {
    /// The active config's.
    Active(Arc<ActiveConfig>),
    /// No config is loaded.
    Empty(LabelTable),
}

impl std::ops::Deref for Table {
    type Target = LabelTable;

    fn deref(&self) -> &LabelTable {
        match self {
            Self::Active(active) => &active.labels,
            Self::Empty(table) => table,
        }
    }
}

impl Shared {
    /// The labels of the active config (one atomic load).
    pub fn label_table(&self) -> Table {
        match self.config.active() {
            Some(active) => Table::Active(active),
            None => Table::Empty(LabelTable::empty(self.metrics.mesh.workload())),
        }
    }

    /// The standard TCP series of a relayed connection to `service` (at endpoint `upstream`
    /// outbound; from `peer` inbound, whose workload a TCP connection does not tell).
    pub fn tcp_series(
        &self,
        direction: Direction,
        service: &ServiceTelemetry,
        upstream: Option<SocketAddr>,
        peer: Option<&PeerIdentity>,
        security: SecurityPolicy,
    ) -> TcpSeries {
        let table = self.label_table();
        let mtls = security == SecurityPolicy::MutualTls;
        let mesh = &self.metrics.mesh;
        let (reporter, source, destination) = match direction {
            Direction::Outbound => (
                Reporter::Source,
                table.own(mtls),
                table.endpoint(upstream, mtls),
            ),
            Direction::Inbound => (
                Reporter::Destination,
                inbound_source(peer, None, &mesh.interner),
                table.own(mtls),
            ),
        };
        mesh.tcp(&Labels {
            reporter,
            source,
            destination,
            service: service.service(),
            protocol: RequestProtocol::Tcp,
            response_code: 0,
            grpc_status: GrpcStatus(None),
            flags: ResponseFlags::NONE,
            security,
            route: None,
        })
    }
}

/// What a request's labels need that is known only while it is proxied.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestFacts {
    /// Inbound: the caller ([`inbound_source`]).
    pub source: Option<Peer>,
    /// Inbound: the service the caller addressed, from its peer header.
    pub service: Option<ServiceLabels>,
    /// `grpc-status` from the response's trailers.
    pub grpc_trailer: Option<u8>,
}

/// Reads an inbound request's caller (the mTLS peer and the [`PEER_HEADER`]) and strips the
/// header, so the application never sees it.
pub fn take_inbound_facts(session: &mut Session, interner: &Interner) -> RequestFacts {
    let peer = crate::tls::inbound::peer_of(session.digest());
    let value = session.req_header().headers.get(PEER_HEADER);
    let header = value.and_then(|v| PeerHeader::parse(v.as_bytes()));
    let facts = RequestFacts {
        source: Some(inbound_source(peer, header.as_ref(), interner)),
        service: header.map(|h| h.service_labels(interner)),
        grpc_trailer: None,
    };
    if value.is_some() {
        // Every copy, should a client send it twice.
        while session
            .req_header_mut()
            .remove_header(PEER_HEADER)
            .is_some()
        {}
    }
    facts
}

/// The gRPC status of a gRPC response: its `grpc-status` (from the trailers, or the headers of
/// a trailers-only response), else the HTTP status mapped as gRPC does
/// (<https://github.com/grpc/grpc/blob/master/doc/http-grpc-status-mapping.md>; no response at
/// all is UNAVAILABLE).
pub fn grpc_status(grpc_status: Option<&[u8]>, http_status: u16) -> u8 {
    if let Some(code) = grpc_status.and_then(|v| std::str::from_utf8(v).ok()?.trim().parse().ok()) {
        return code;
    }
    match http_status {
        400 => 13,                 // INTERNAL
        401 => 16,                 // UNAUTHENTICATED
        403 => 7,                  // PERMISSION_DENIED
        404 => 12,                 // UNIMPLEMENTED
        0 | 429 | 502..=504 => 14, // UNAVAILABLE
        _ => 2,                    // UNKNOWN (a 200 without a status, too)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_crds::contract::{Endpoint, EndpointWorkload};

    #[test]
    fn a_peer_header_is_namespace_workload_and_service() {
        let h = PeerHeader::parse(b"shop/client/server.shop.svc.cluster.local").unwrap();
        assert_eq!(h.namespace, "shop");
        assert_eq!(h.workload, "client");
        let i = Interner::default();
        let s = h.service_labels(&i);
        assert_eq!(s.fqdn.as_str(), "server.shop.svc.cluster.local");
        assert_eq!(s.name.as_str(), "server");
        assert_eq!(s.namespace.as_str(), "shop");
        // Without a service: unknown service labels, the source still known.
        let h = PeerHeader::parse(b"shop/client/").unwrap();
        assert_eq!(h.service_labels(&i), ServiceLabels::unknown());
    }

    #[test]
    fn a_malformed_peer_header_is_ignored() {
        for bad in [
            &b""[..],
            b"shop",
            b"/client/x",
            b"shop//x",
            b"Shop/client/x",
            b"shop/cli ent/x",
            b"shop/client/x\"}",
            b"\xff/a/b",
        ] {
            assert_eq!(PeerHeader::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_certificate_namespace_wins_over_the_header() {
        let i = Interner::default();
        let header = PeerHeader::parse(b"forged/client/").unwrap();
        let peer = PeerIdentity::new(SpiffeId::new("cluster.local", "shop", "client-sa"));
        let source = inbound_source(Some(&peer), Some(&header), &i);
        assert_eq!(source.namespace.as_str(), "shop");
        assert_eq!(source.workload.as_str(), "client");
        assert_eq!(
            source.principal.as_str(),
            "spiffe://cluster.local/ns/shop/sa/client-sa"
        );
        let plaintext = inbound_source(None, Some(&header), &i);
        assert_eq!(plaintext.namespace.as_str(), "forged");
        assert_eq!(plaintext.principal, Sym::unknown());
        assert_eq!(inbound_source(None, None, &i), Peer::unknown());
    }

    #[test]
    fn endpoints_are_labelled_with_their_workload_and_principals_only_over_mtls() {
        let i = Interner::default();
        let mut config = crate::routing::fixtures::web(vec![
            Endpoint {
                workload: Some(EndpointWorkload {
                    name: "web-v1".into(),
                    namespace: "shop".into(),
                }),
                ..crate::routing::fixtures::endpoint(
                    "10.0.0.1:8080",
                    true,
                    Some("spiffe://cluster.local/ns/shop/sa/web"),
                )
            },
            crate::routing::fixtures::endpoint(
                "10.0.0.2:8080",
                true,
                Some("spiffe://cluster.local/ns/other/sa/web"),
            ),
        ]);
        config.workload.namespace = "shop".into();
        config.workload.service_account = "client".into();
        let t = LabelTable::compile(&config, i.intern("client"), "cluster.local", &i);
        let a = t.endpoint("10.0.0.1:8080".parse().ok(), true);
        assert_eq!(a.workload.as_str(), "web-v1");
        assert_eq!(a.namespace.as_str(), "shop");
        assert_eq!(
            a.principal.as_str(),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(
            t.endpoint("10.0.0.1:8080".parse().ok(), false).principal,
            Sym::unknown()
        );
        // No workload rendered: the namespace from the identity, the workload unknown.
        let b = t.endpoint("10.0.0.2:8080".parse().ok(), true);
        assert_eq!(
            (b.workload, b.namespace.as_str()),
            (Sym::unknown(), "other")
        );
        assert_eq!(t.endpoint(None, true), Peer::unknown());
        let own = t.own(true);
        assert_eq!(
            own.principal.as_str(),
            "spiffe://cluster.local/ns/shop/sa/client"
        );
        let web = t
            .service(&ServiceRef {
                name: "web".into(),
                namespace: "shop".into(),
            })
            .unwrap();
        assert_eq!(web.labels.fqdn.as_str(), "web.shop.svc.cluster.local");
        assert_eq!(
            web.peer_header.as_ref().unwrap(),
            "shop/client/web.shop.svc.cluster.local"
        );
    }

    #[test]
    fn grpc_status_comes_from_the_header_else_from_the_http_status() {
        assert_eq!(grpc_status(Some(b"14"), 200), 14);
        assert_eq!(grpc_status(Some(b"0"), 200), 0);
        assert_eq!(grpc_status(None, 503), 14);
        assert_eq!(grpc_status(None, 0), 14);
        assert_eq!(grpc_status(None, 403), 7);
        assert_eq!(grpc_status(Some(b"x"), 404), 12);
    }
}
