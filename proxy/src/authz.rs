//! Inbound authorization: the contract's evaluator, compiled per config, with its counters.
//!
//! The operator renders the workload's `AuthorizationPolicy` objects and its default policy
//! into the config's `authorization` section; each config version compiles them once into an
//! [`Authz`] (the shared [`Authorizer`] — the same evaluator `tandemctl explain` runs — plus a
//! metric handle per series a decision can land in), kept in the active snapshot. Enforcement
//! happens on the inbound listener only:
//!
//! - per HTTP request (HTTP/1 and HTTP/2, plaintext or mutual TLS), in
//!   `MeshHttp::request_filter` ([`crate::http`]), with the request's method, path and headers;
//! - per opaque TCP connection (after detection, server-first, and mutual TLS with ALPN
//!   `tandem/1`), in [`crate::connection`], before a byte is relayed, with no HTTP facts.
//!
//! The caller is the SPIFFE ID of the peer's certificate when Tandem's mutual TLS was
//! terminated (else unauthenticated), and the client's address (for `cluster-authenticated`).
//! The port is the connection's original destination port, the one the request is forwarded
//! to. The kubelet's probes of the pod ([`crate::tls::probes`]) are always let through.
//!
//! Deciding borrows everything ([`RequestFacts`] reads Pingora's request header in place) and
//! counting is an atomic add on a handle created at compile time: the allow path allocates
//! nothing and takes no lock. Only a denial builds strings (its header, body and log line).

use std::borrow::Cow;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use pingora::http::RequestHeader;
use tandem_crds::contract::{
    AuthorizationAction, Authorizer, Caller, CallerIdentity, CompileError, DecidedBy, Decision,
    DefaultPolicy, HttpFacts, ProxyConfig, Request,
};

use crate::metrics::{AuthzDecision, AuthzMetrics, AuthzProtocol, ByProtocol};
use crate::tls::PeerIdentity;

pub use crate::metrics::{NO_ALLOW_MATCH, PROBE};

/// One config version's authorization, ready for the request path.
#[derive(Debug)]
pub struct Authz {
    authorizer: Authorizer,
    trust_domain: String,
    /// `<namespace>/<name>` of each policy, by index (what [`DecidedBy::Rule`] points at).
    names: Vec<Arc<str>>,
    counters: Counters,
}

/// The series each outcome counts into, resolved at compile time.
#[derive(Debug)]
struct Counters {
    /// By policy index; the decision is the policy's action.
    policies: Vec<ByProtocol>,
    default_allow: ByProtocol,
    default_deny: ByProtocol,
    no_allow_match: ByProtocol,
    probe: ByProtocol,
}

/// What decided a request, as metrics and the access log name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyLabel {
    /// `default:<policy>`, `no-allow-match` or `probe`.
    Fixed(&'static str),
    /// A policy's `<namespace>/<name>` (shared with the compiled config: cloning it is an
    /// atomic increment, not an allocation).
    Named(Arc<str>),
}

impl PolicyLabel {
    /// The label's text.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Fixed(label) => label,
            Self::Named(name) => name,
        }
    }
}

/// An authorization outcome, kept in the request's context for the access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Whether it may proceed.
    pub allowed: bool,
    /// What decided.
    pub policy: PolicyLabel,
}

impl Verdict {
    /// A kubelet probe: always allowed.
    pub fn probe() -> Self {
        Self {
            allowed: true,
            policy: PolicyLabel::Fixed(PROBE),
        }
    }

    /// `allow` or `deny`.
    pub fn decision(&self) -> &'static str {
        AuthzDecision::of(self.allowed).as_str()
    }
}

impl Authz {
    /// Compiles `config`'s authorization; `trust_domain` is the mesh's (for namespace rules).
    /// Looks up every series a decision can count into (the family's lock, once per config).
    pub fn compile(
        config: &ProxyConfig,
        trust_domain: &str,
        metrics: &AuthzMetrics,
    ) -> Result<Self, CompileError> {
        let authorization = &config.authorization;
        let authorizer = config.authorizer(trust_domain)?;
        let names: Vec<Arc<str>> = authorization
            .policies
            .iter()
            .map(|p| Arc::from(p.name.as_str()))
            .collect();
        let policies = authorization
            .policies
            .iter()
            .map(|p| {
                let decision = match p.action {
                    AuthorizationAction::Allow => AuthzDecision::Allow,
                    AuthorizationAction::Deny => AuthzDecision::Deny,
                };
                metrics.series(decision, &p.name)
            })
            .collect();
        let default = authorization.default_policy;
        // A series is created only for an outcome this config can produce: a `deny` default
        // never allows, `all-unauthenticated` never denies, and without an Allow policy nothing
        // is denied for matching no Allow rule. The others count into detached counters.
        let any_allow = authorization
            .policies
            .iter()
            .any(|p| p.action == AuthorizationAction::Allow);
        let counters = Counters {
            policies,
            default_allow: if default == DefaultPolicy::Deny {
                ByProtocol::default()
            } else {
                metrics.series(AuthzDecision::Allow, default.label())
            },
            default_deny: if default == DefaultPolicy::AllUnauthenticated {
                ByProtocol::default()
            } else {
                metrics.series(AuthzDecision::Deny, default.label())
            },
            no_allow_match: if any_allow {
                metrics.series(AuthzDecision::Deny, NO_ALLOW_MATCH)
            } else {
                ByProtocol::default()
            },
            probe: metrics.probe.clone(),
        };
        Ok(Self {
            authorizer,
            trust_domain: trust_domain.to_owned(),
            names,
            counters,
        })
    }

    /// The trust domain the policies were compiled for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Whether every request is allowed whatever it is (no policy, default
    /// `all-unauthenticated`): the caller may skip gathering the request's facts.
    pub fn allows_everything(&self) -> bool {
        self.authorizer.allows_everything()
    }

    /// The default policy in force.
    pub fn default_policy(&self) -> DefaultPolicy {
        self.authorizer.default_policy()
    }

    /// Decides `request` and counts the decision as `protocol`.
    pub fn authorize(&self, request: &Request<'_>, protocol: AuthzProtocol) -> (Decision, Verdict) {
        let decision = self.authorizer.decide(request);
        (decision, self.record(decision, protocol))
    }

    /// Counts a kubelet probe, let through whatever the policies say.
    pub fn record_probe(&self) -> Verdict {
        self.counters.probe.inc(AuthzProtocol::Http);
        Verdict::probe()
    }

    /// Counts `decision` as `protocol` and names what made it.
    fn record(&self, decision: Decision, protocol: AuthzProtocol) -> Verdict {
        let counters = &self.counters;
        let series = match decision.by {
            DecidedBy::Rule { policy, .. } => counters.policies.get(policy),
            DecidedBy::NoAllowMatched => Some(&counters.no_allow_match),
            DecidedBy::Default(_) if decision.allowed => Some(&counters.default_allow),
            DecidedBy::Default(_) => Some(&counters.default_deny),
        };
        if let Some(series) = series {
            series.inc(protocol);
        }
        Verdict {
            allowed: decision.allowed,
            policy: self.label(decision.by),
        }
    }

    /// The metric label of what decided.
    pub fn label(&self, by: DecidedBy) -> PolicyLabel {
        match by {
            DecidedBy::Rule { policy, .. } => self
                .names
                .get(policy)
                .map_or(PolicyLabel::Fixed("unknown-policy"), |name| {
                    PolicyLabel::Named(name.clone())
                }),
            DecidedBy::NoAllowMatched => PolicyLabel::Fixed(NO_ALLOW_MATCH),
            DecidedBy::Default(policy) => PolicyLabel::Fixed(policy.label()),
        }
    }

    /// What a denial on `port` names in its `tandem-denied-by` header, body and log: the Deny
    /// policy; for "no Allow rule matched", the Allow policies covering the port (the ones the
    /// caller would have to be added to); for a default, `default:<policy>`.
    pub fn denied_by(&self, by: DecidedBy, port: u16) -> Cow<'_, str> {
        match by {
            DecidedBy::NoAllowMatched => {
                let mut joined = String::new();
                for index in self.authorizer.allow_policies_for(port) {
                    if let Some(name) = self.names.get(index) {
                        if !joined.is_empty() {
                            joined.push_str(", ");
                        }
                        joined.push_str(name);
                    }
                }
                Cow::Owned(joined)
            }
            DecidedBy::Rule { policy, .. } => match self.names.get(policy) {
                Some(name) => Cow::Borrowed(name),
                None => Cow::Borrowed("unknown-policy"),
            },
            DecidedBy::Default(policy) => Cow::Borrowed(policy.label()),
        }
    }
}

/// An HTTP request's facts, read in place from Pingora's request header.
pub struct RequestFacts<'a>(pub &'a RequestHeader);

impl HttpFacts for RequestFacts<'_> {
    fn method(&self) -> &str {
        self.0.method.as_str()
    }

    fn path(&self) -> &str {
        self.0.uri.path()
    }

    fn header(&self, name: &str) -> Option<&str> {
        // `HeaderMap::get(&str)` lower-cases into a stack buffer: no allocation.
        self.0.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The caller as the evaluator sees it: the verified peer identity (when the connection was
/// Tandem's mutual TLS) and the client's address.
pub fn caller(peer: Option<&PeerIdentity>, address: Option<IpAddr>) -> Caller<'_> {
    Caller {
        identity: peer.map(|p| CallerIdentity {
            uri: &p.uri,
            trust_domain: &p.id.trust_domain,
            namespace: &p.id.namespace,
        }),
        address,
    }
}

/// Whether a request is a gRPC call (`content-type: application/grpc`, `application/grpc+…`).
pub fn is_grpc(req: &RequestHeader) -> bool {
    req.headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// What the caller is called in a denial: its SPIFFE ID, or `unauthenticated`.
pub fn caller_name(peer: Option<&PeerIdentity>) -> &str {
    peer.map_or("unauthenticated", |p| &p.uri)
}

/// The text body of an HTTP denial.
pub fn denial_body(denied_by: &str, caller: &str, method: &str, path: &str, port: u16) -> String {
    format!("denied by {denied_by}: {caller} may not {method} {path} on port {port}\n")
}

/// The `grpc-message` of a gRPC denial, percent-encoded as the gRPC HTTP/2 protocol requires
/// (every byte outside printable ASCII, and `%` itself).
pub fn grpc_message(denied_by: &str, caller: &str, path: &str, port: u16) -> String {
    let text = format!("denied by {denied_by}: {caller} may not call {path} on port {port}");
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..=0x7e).contains(&byte) && byte != b'%' {
            encoded.push(char::from(byte));
        } else {
            // Writing into a String cannot fail.
            let _ = write!(encoded, "%{byte:02X}");
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_crds::contract::{
        Authorization, AuthorizationPolicy, AuthorizationRule, Callers, Operations, PathMatch,
        Workload,
    };
    use tandem_crds::identity::SpiffeId;

    fn allow(name: &str, principal: &str, ports: Vec<u16>) -> AuthorizationPolicy {
        AuthorizationPolicy {
            name: name.into(),
            action: AuthorizationAction::Allow,
            ports,
            rules: vec![AuthorizationRule {
                from: Some(Callers {
                    principals: vec![principal.into()],
                    ..Callers::default()
                }),
                to: None,
            }],
        }
    }

    fn config(default_policy: DefaultPolicy, policies: Vec<AuthorizationPolicy>) -> ProxyConfig {
        let mut config = ProxyConfig::new(Workload {
            namespace: "shop".into(),
            service_account: "web".into(),
            ..Workload::default()
        });
        config.authorization = Authorization {
            default_policy,
            cluster_networks: vec![],
            policies,
        };
        config.validate().unwrap();
        config
    }

    fn metrics() -> (prometheus_client::registry::Registry, AuthzMetrics) {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = AuthzMetrics::register(&mut registry);
        (registry, metrics)
    }

    fn encode(registry: &prometheus_client::registry::Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text
    }

    fn request<'a>(
        port: u16,
        peer: Option<&'a PeerIdentity>,
        http: Option<&'a dyn HttpFacts>,
    ) -> Request<'a> {
        Request {
            port,
            caller: caller(peer, Some("10.0.0.9".parse().unwrap())),
            http,
        }
    }

    fn peer(ns: &str, sa: &str) -> PeerIdentity {
        PeerIdentity::new(SpiffeId::new("cluster.local", ns, sa))
    }

    #[test]
    fn decisions_are_counted_in_series_created_at_compile_time() {
        let (registry, metrics) = metrics();
        let config = config(
            DefaultPolicy::Deny,
            vec![allow(
                "shop/allow-web",
                "spiffe://cluster.local/ns/shop/sa/web",
                vec![8080],
            )],
        );
        let authz = Authz::compile(&config, "cluster.local", &metrics).unwrap();
        let before = encode(&registry);
        // Every possible outcome has its series at 0 before any request; impossible ones none.
        for line in [
            r#"tandem_authz_decisions_total{decision="allow",policy="shop/allow-web",protocol="http"} 0"#,
            r#"tandem_authz_decisions_total{decision="deny",policy="no-allow-match",protocol="tcp"} 0"#,
            r#"tandem_authz_decisions_total{decision="deny",policy="default:deny",protocol="grpc"} 0"#,
        ] {
            assert!(before.contains(line), "{line}\n{before}");
        }
        assert!(!before.contains(r#"decision="allow",policy="default:deny""#));

        let web = peer("shop", "web");
        let (decision, verdict) =
            authz.authorize(&request(8080, Some(&web), None), AuthzProtocol::Tcp);
        assert!(decision.allowed);
        assert_eq!(verdict.policy.as_str(), "shop/allow-web");
        assert_eq!(verdict.decision(), "allow");
        let (decision, verdict) = authz.authorize(&request(8080, None, None), AuthzProtocol::Http);
        assert_eq!(decision.by, DecidedBy::NoAllowMatched);
        assert_eq!(verdict.policy.as_str(), NO_ALLOW_MATCH);
        assert_eq!(authz.denied_by(decision.by, 8080), "shop/allow-web");
        let (decision, verdict) =
            authz.authorize(&request(9090, Some(&web), None), AuthzProtocol::Grpc);
        assert_eq!(decision.by, DecidedBy::Default(DefaultPolicy::Deny));
        assert_eq!(verdict.policy.as_str(), "default:deny");
        assert_eq!(authz.denied_by(decision.by, 9090), "default:deny");
        assert_eq!(authz.record_probe(), Verdict::probe());

        let after = encode(&registry);
        for line in [
            r#"tandem_authz_decisions_total{decision="allow",policy="shop/allow-web",protocol="tcp"} 1"#,
            r#"tandem_authz_decisions_total{decision="deny",policy="no-allow-match",protocol="http"} 1"#,
            r#"tandem_authz_decisions_total{decision="deny",policy="default:deny",protocol="grpc"} 1"#,
            r#"tandem_authz_decisions_total{decision="allow",policy="probe",protocol="http"} 1"#,
        ] {
            assert!(after.contains(line), "{line}\n{after}");
        }
    }

    #[test]
    fn a_no_allow_match_denial_names_every_allow_policy_covering_the_port() {
        let (_registry, metrics) = metrics();
        let config = config(
            DefaultPolicy::AllUnauthenticated,
            vec![
                allow("shop/a", "spiffe://cluster.local/ns/shop/sa/a", vec![]),
                allow("shop/b", "spiffe://cluster.local/ns/shop/sa/b", vec![8080]),
                allow("shop/c", "spiffe://cluster.local/ns/shop/sa/c", vec![9090]),
            ],
        );
        let authz = Authz::compile(&config, "cluster.local", &metrics).unwrap();
        assert_eq!(
            authz.denied_by(DecidedBy::NoAllowMatched, 8080),
            "shop/a, shop/b"
        );
        assert_eq!(
            authz.denied_by(DecidedBy::NoAllowMatched, 9090),
            "shop/a, shop/c"
        );
    }

    #[test]
    fn no_policy_allows_everything_and_counts_the_open_default() {
        let (registry, metrics) = metrics();
        let authz = Authz::compile(
            &config(DefaultPolicy::AllUnauthenticated, vec![]),
            "cluster.local",
            &metrics,
        )
        .unwrap();
        assert!(authz.allows_everything());
        let (decision, verdict) = authz.authorize(&request(1, None, None), AuthzProtocol::Http);
        assert!(decision.allowed);
        assert_eq!(verdict.policy.as_str(), "default:all-unauthenticated");
        assert!(encode(&registry).contains(
            r#"tandem_authz_decisions_total{decision="allow",policy="default:all-unauthenticated",protocol="http"} 1"#
        ));
    }

    #[test]
    fn request_facts_read_pingoras_header_in_place() {
        let mut req = RequestHeader::build("POST", b"/api/items?page=2", None).unwrap();
        req.insert_header("X-Team", "blue").unwrap();
        req.insert_header("content-type", "application/grpc+proto")
            .unwrap();
        let facts = RequestFacts(&req);
        assert_eq!(facts.method(), "POST");
        assert_eq!(facts.path(), "/api/items");
        assert_eq!(facts.header("x-team"), Some("blue"));
        assert_eq!(facts.header("x-absent"), None);
        assert!(is_grpc(&req));

        let (_registry, metrics) = metrics();
        let mut policy = allow("shop/api", "spiffe://cluster.local/ns/shop/*", vec![]);
        policy.rules[0].to = Some(Operations {
            paths: vec![PathMatch::Prefix("/api".into())],
            methods: vec!["GET".into()],
            ..Operations::default()
        });
        let authz = Authz::compile(
            &config(DefaultPolicy::AllUnauthenticated, vec![policy]),
            "cluster.local",
            &metrics,
        )
        .unwrap();
        let web = peer("shop", "web");
        let post = authz.authorize(&request(80, Some(&web), Some(&facts)), AuthzProtocol::Grpc);
        assert!(!post.0.allowed, "POST is not GET");
        let get = RequestHeader::build("GET", b"/api/items", None).unwrap();
        let get = RequestFacts(&get);
        assert!(
            authz
                .authorize(&request(80, Some(&web), Some(&get)), AuthzProtocol::Http)
                .0
                .allowed
        );
    }

    #[test]
    fn an_unvalidated_bad_regex_does_not_compile_and_names_its_policy() {
        let (_registry, metrics) = metrics();
        let mut bad = allow("shop/broken", "spiffe://cluster.local/ns/shop/sa/a", vec![]);
        bad.rules[0].to = Some(Operations {
            paths: vec![PathMatch::Regex("(".into())],
            ..Operations::default()
        });
        let mut config = ProxyConfig::new(Workload::default());
        config.authorization.policies = vec![bad];
        let err = Authz::compile(&config, "cluster.local", &metrics).unwrap_err();
        assert_eq!(err.policy, "shop/broken");
    }

    #[test]
    fn denial_texts_name_the_policy_the_caller_and_the_request() {
        assert_eq!(
            denial_body("shop/allow-web", "unauthenticated", "GET", "/admin", 8080),
            "denied by shop/allow-web: unauthenticated may not GET /admin on port 8080\n"
        );
        let web = peer("shop", "web");
        assert_eq!(
            caller_name(Some(&web)),
            "spiffe://cluster.local/ns/shop/sa/web"
        );
        assert_eq!(caller_name(None), "unauthenticated");
        assert_eq!(
            grpc_message("default:deny", "unauthenticated", "/pkg.Svc/100%é", 50051),
            "denied by default:deny: unauthenticated may not call /pkg.Svc/100%25%C3%A9 on port 50051"
        );
    }
}
