//! Authorization counters: `tandem_authz_decisions_total{decision, policy, protocol}`.
//!
//! `policy` is what decided: a policy's `<namespace>/<name>`, `default:<default-policy>`,
//! `no-allow-match` (Allow policies cover the port and none matched) or `probe` (one of the
//! pod's kubelet probes). The series a config can produce are looked up in the family when that
//! config compiles ([`crate::authz::Authz`]) and kept as handles, so deciding a request costs
//! one atomic add; the ones that need no config (`probe`, and the open default a proxy without
//! a config applies) are created here, once.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tandem_crds::contract::DefaultPolicy;

/// The `decision` label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum AuthzDecision {
    /// Let through.
    Allow,
    /// Refused.
    Deny,
}

lower_case_label!(AuthzDecision, Allow => "allow", Deny => "deny");

impl AuthzDecision {
    /// The decision of `allowed`.
    pub fn of(allowed: bool) -> Self {
        if allowed { Self::Allow } else { Self::Deny }
    }
}

/// The `protocol` label: what was authorized.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
#[repr(usize)]
pub enum AuthzProtocol {
    /// One HTTP request (HTTP/1 or HTTP/2).
    Http,
    /// One gRPC call (`content-type: application/grpc…`).
    Grpc,
    /// One opaque TCP connection.
    Tcp,
}

lower_case_label!(AuthzProtocol, Http => "http", Grpc => "grpc", Tcp => "tcp");

impl AuthzProtocol {
    /// Every protocol, in index order.
    pub const ALL: [Self; 3] = [Self::Http, Self::Grpc, Self::Tcp];
}

/// One series per protocol for one `(decision, policy)` pair, indexed by [`AuthzProtocol`].
#[derive(Clone, Debug, Default)]
pub struct ByProtocol([Counter; 3]);

impl ByProtocol {
    /// Counts one decision over `protocol`.
    pub fn inc(&self, protocol: AuthzProtocol) {
        // `ALL` lists the variants in declaration order, so the discriminant is the index.
        if let Some(counter) = self.0.get(protocol as usize) {
            counter.inc();
        }
    }
}

/// Labels of `tandem_authz_decisions_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    /// `allow` or `deny`.
    pub decision: AuthzDecision,
    /// What decided.
    pub policy: String,
    /// `http`, `grpc` or `tcp`.
    pub protocol: AuthzProtocol,
}

/// The family and the series every proxy has.
pub struct AuthzMetrics {
    family: Family<AuthzLabels, Counter>,
    /// `decision="allow",policy="probe"`: the kubelet's probes, always let through.
    pub probe: ByProtocol,
    /// `decision="allow",policy="default:all-unauthenticated"`: no policy at all.
    pub open: ByProtocol,
}

impl std::fmt::Debug for AuthzMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthzMetrics").finish_non_exhaustive()
    }
}

/// The `policy` label of a probe.
pub const PROBE: &str = "probe";
/// The `policy` label of a denial because no Allow rule matched.
pub const NO_ALLOW_MATCH: &str = "no-allow-match";

impl AuthzMetrics {
    /// Creates the family and registers it in `registry`.
    pub(crate) fn register(registry: &mut Registry) -> Self {
        let family: Family<AuthzLabels, Counter> = Family::default();
        registry.register(
            "tandem_authz_decisions",
            "Inbound authorization decisions (HTTP requests, gRPC calls, TCP connections) by what decided",
            family.clone(),
        );
        let mut metrics = Self {
            family,
            probe: ByProtocol::default(),
            open: ByProtocol::default(),
        };
        metrics.probe = metrics.series(AuthzDecision::Allow, PROBE);
        metrics.open = metrics.series(
            AuthzDecision::Allow,
            DefaultPolicy::AllUnauthenticated.label(),
        );
        metrics
    }

    /// The three series (one per protocol) of `(decision, policy)`, created at 0 if new.
    /// Takes the family's lock: for config compilation, never for a request.
    pub fn series(&self, decision: AuthzDecision, policy: &str) -> ByProtocol {
        ByProtocol(AuthzProtocol::ALL.map(|protocol| {
            self.family
                .get_or_create(&AuthzLabels {
                    decision,
                    policy: policy.to_owned(),
                    protocol,
                })
                .clone()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_shared_handles_labelled_by_decision_policy_and_protocol() {
        let mut registry = Registry::default();
        let authz = AuthzMetrics::register(&mut registry);
        let named = authz.series(AuthzDecision::Deny, "shop/no-batch");
        named.inc(AuthzProtocol::Grpc);
        // Compiling the same policy again (a reload) continues the same series.
        authz
            .series(AuthzDecision::Deny, "shop/no-batch")
            .inc(AuthzProtocol::Grpc);
        authz.probe.inc(AuthzProtocol::Http);
        authz.open.inc(AuthzProtocol::Tcp);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        for line in [
            r#"tandem_authz_decisions_total{decision="deny",policy="shop/no-batch",protocol="grpc"} 2"#,
            r#"tandem_authz_decisions_total{decision="deny",policy="shop/no-batch",protocol="http"} 0"#,
            r#"tandem_authz_decisions_total{decision="allow",policy="probe",protocol="http"} 1"#,
            r#"tandem_authz_decisions_total{decision="allow",policy="default:all-unauthenticated",protocol="tcp"} 1"#,
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
    }
}
