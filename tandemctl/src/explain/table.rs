//! The text report: facts as `Key: value` lines, policies one per block, the decision last.

use std::fmt::Write as _;

use super::report::{
    AppliedPolicy, ConditionFacts, ConfigStateName, DecidedByFacts, DecisionFacts, Explanation,
    StatusFacts, TrustDomainSource, UnappliedPolicy,
};
use super::summary;

/// Width of the key column.
const KEY: usize = 16;

/// The report as text, newline-terminated.
pub fn render(e: &Explanation) -> String {
    let mut out = String::new();
    let pod = &e.pod;
    line(&mut out, "Pod", &format!("{}/{}", pod.namespace, pod.name));
    line(
        &mut out,
        "ServiceAccount",
        &format!("{} ({})", pod.service_account, pod.identity),
    );
    line(
        &mut out,
        "Services",
        &list_or(&pod.services, "none select it"),
    );
    line(&mut out, "Proxy", &proxy(e));
    line(&mut out, "Config", &config(e));
    line(&mut out, "Default policy", &default_policy(e));
    line(&mut out, "Probes", &probes(e));
    out.push('\n');
    policies(&mut out, &e.policies);
    not_applied(&mut out, &e.not_applied);
    if let Some(d) = &e.decision {
        decision(&mut out, d);
    }
    if !e.warnings.is_empty() {
        out.push_str("Warnings:\n");
        for w in &e.warnings {
            let _ = writeln!(out, "  {w}");
        }
    }
    out
}

fn line(out: &mut String, key: &str, value: &str) {
    let _ = writeln!(out, "{:<KEY$}{value}", format!("{key}:"));
}

fn list_or(items: &[String], empty: &str) -> String {
    if items.is_empty() {
        return format!("({empty})");
    }
    items.join(", ")
}

fn proxy(e: &Explanation) -> String {
    match (&e.pod.injected, &e.pod.proxy_version) {
        (true, Some(version)) => format!("injected (tandem-proxy {version})"),
        (true, None) => "injected".to_owned(),
        (false, _) => "not injected: no proxy, nothing enforces authorization".to_owned(),
    }
}

fn config(e: &Explanation) -> String {
    let c = &e.config;
    let domain = match c.trust_domain_from {
        TrustDomainSource::EndpointIdentities => {
            format!("trust domain {} (from endpoint identities)", c.trust_domain)
        }
        TrustDomainSource::Default => format!("trust domain {} (default)", c.trust_domain),
    };
    match c.state {
        ConfigStateName::Loaded => {
            let version = c
                .version
                .as_deref()
                .filter(|v| !v.is_empty())
                .unwrap_or("-");
            let mtls = c.mtls.map_or("-", |m| m.as_str());
            format!(
                "ConfigMap {}, version {version}, mTLS {mtls}, {domain}",
                c.config_map
            )
        }
        ConfigStateName::Missing => format!("ConfigMap {} does not exist", c.config_map),
        ConfigStateName::Invalid => format!(
            "ConfigMap {} is invalid: {}",
            c.config_map,
            c.error.as_deref().unwrap_or("")
        ),
    }
}

fn default_policy(e: &Explanation) -> String {
    let d = &e.default_policy;
    match d.policy {
        Some(p) => format!("{p} ({})", d.detail),
        None => format!("unknown without a config ({})", d.detail),
    }
}

fn probes(e: &Explanation) -> String {
    if e.probes.is_empty() {
        return "(none declared)".to_owned();
    }
    let list: Vec<String> = e
        .probes
        .iter()
        .map(|p| format!("{} {}", p.port, p.path))
        .collect();
    format!(
        "GET/HEAD {}: the kubelet's probes are always let through",
        list.join(", ")
    )
}

fn policies(out: &mut String, policies: &[AppliedPolicy]) {
    let _ = writeln!(
        out,
        "Authorization policies in the config ({}):",
        policies.len()
    );
    if policies.is_empty() {
        out.push_str("  (none: the default policy decides on every port)\n");
    }
    let width = policies.iter().map(|p| p.name.len()).max().unwrap_or(0);
    for p in policies {
        let status = p.status.as_ref().map_or(
            "(no such AuthorizationPolicy object any more)".to_owned(),
            status,
        );
        let ports = format!("ports {}", summary::ports(&p.ports));
        let _ = writeln!(
            out,
            "  {:<width$}  {:<5}  {ports:<12}  {status}",
            p.name,
            p.action.as_str(),
        );
        for r in &p.rules {
            let _ = writeln!(out, "    rule {}: {}", r.index, r.summary);
        }
    }
    out.push('\n');
}

/// `Accepted=True Programmed=True`; a condition that does not hold shows its reason.
fn status(s: &StatusFacts) -> String {
    let show = |kind: &str, c: &Option<ConditionFacts>| match c {
        Some(c) if c.status == "True" => format!("{kind}=True"),
        Some(c) => format!("{kind}={} ({})", c.status, c.reason),
        None => format!("{kind}=?"),
    };
    format!(
        "{} {}",
        show("Accepted", &s.accepted),
        show("Programmed", &s.programmed)
    )
}

fn not_applied(out: &mut String, policies: &[UnappliedPolicy]) {
    if policies.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "Targeting this pod but not in its config ({}):",
        policies.len()
    );
    for p in policies {
        let action = match p.action {
            tandem_crds::v1alpha1::AuthorizationAction::Allow => "Allow",
            tandem_crds::v1alpha1::AuthorizationAction::Deny => "Deny",
        };
        let _ = writeln!(out, "  {}  {}  {action}", p.name, p.target);
        let _ = writeln!(out, "    why: {}", p.why);
    }
    out.push('\n');
}

fn decision(out: &mut String, d: &DecisionFacts) {
    out.push_str("Decision:\n");
    let caller = match &d.caller.identity {
        Some(id) => format!("{id} (mutual TLS)"),
        None => "unauthenticated (no mesh identity)".to_owned(),
    };
    let caller = match d.caller.address {
        Some(ip) => format!("{caller} from {ip}"),
        None => caller,
    };
    sub(out, "Caller", &caller);
    let r = &d.request;
    let request = match (&r.method, &r.path) {
        (Some(m), Some(p)) => {
            let headers: Vec<String> = r.headers.iter().map(|(n, v)| format!("{n}: {v}")).collect();
            let headers = if headers.is_empty() {
                String::new()
            } else {
                format!(" [{}]", headers.join(", "))
            };
            format!("HTTP {m} {p}{headers} on port {}", r.port)
        }
        _ => format!("TCP connection to port {}", r.port),
    };
    sub(out, "Request", &request);
    let verdict = if d.allowed { "ALLOWED" } else { "DENIED" };
    sub(
        out,
        "Result",
        &format!("{verdict} {}", decided_by(&d.decided_by, r.port)),
    );
    sub(out, "Proxy", &d.response);
    for note in &d.notes {
        sub(out, "Note", note);
    }
    out.push('\n');
}

fn sub(out: &mut String, key: &str, value: &str) {
    let _ = writeln!(out, "  {:<10}{value}", format!("{key}:"));
}

/// Follows ALLOWED or DENIED.
fn decided_by(by: &DecidedByFacts, port: u16) -> String {
    match by {
        DecidedByFacts::Rule {
            policy,
            action,
            rule,
            summary,
        } => format!("by {policy} ({}) rule {rule}: {summary}", action.as_str()),
        DecidedByFacts::NoAllowMatched { policies } => format!(
            "by {}: Allow policies cover port {port} and none of their rules matched",
            policies.join(", ")
        ),
        DecidedByFacts::Default { policy } => format!("by the default policy {policy}"),
        DecidedByFacts::Probe { port, path } => {
            format!("as the kubelet probe {port} {path}, let through before any policy")
        }
        DecidedByFacts::ForeignTrustDomain { trust_domain } => {
            format!("at the handshake: the caller's trust domain {trust_domain} is not the mesh's")
        }
        DecidedByFacts::StrictMtls => {
            "by strict mutual TLS: plaintext is refused before any policy".to_owned()
        }
        DecidedByFacts::NotInjected => {
            "by nobody: the pod has no proxy, nothing enforces authorization".to_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use tandem_crds::contract::{AuthorizationAction, DefaultPolicy};

    use super::*;

    #[test]
    fn every_decider_reads_as_a_sentence_after_allowed_or_denied() {
        let cases = [
            (
                DecidedByFacts::Rule {
                    policy: "shop/a".into(),
                    action: AuthorizationAction::Deny,
                    rule: 2,
                    summary: "from any caller; to any request".into(),
                },
                "by shop/a (Deny) rule 2: from any caller; to any request",
            ),
            (
                DecidedByFacts::NoAllowMatched {
                    policies: vec!["shop/a".into(), "shop/b".into()],
                },
                "by shop/a, shop/b: Allow policies cover port 8080 and none of their rules matched",
            ),
            (
                DecidedByFacts::Default {
                    policy: DefaultPolicy::AllAuthenticated,
                },
                "by the default policy all-authenticated",
            ),
            (
                DecidedByFacts::Probe {
                    port: 8080,
                    path: "/ready".into(),
                },
                "as the kubelet probe 8080 /ready, let through before any policy",
            ),
            (
                DecidedByFacts::StrictMtls,
                "by strict mutual TLS: plaintext is refused before any policy",
            ),
            (
                DecidedByFacts::ForeignTrustDomain {
                    trust_domain: "other.example".into(),
                },
                "at the handshake: the caller's trust domain other.example is not the mesh's",
            ),
            (
                DecidedByFacts::NotInjected,
                "by nobody: the pod has no proxy, nothing enforces authorization",
            ),
        ];
        for (by, expected) in cases {
            assert_eq!(decided_by(&by, 8080), expected);
        }
    }
}
