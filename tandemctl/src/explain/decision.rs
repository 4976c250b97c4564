//! The decision for one caller and request: the proxy's own evaluator ([`Authorizer`],
//! compiled from the config exactly as the proxy compiles it), wrapped in what the proxy does
//! before asking it: a pod without a proxy enforces nothing, the kubelet's probes get in
//! whatever the policies say, and a strict workload refuses plaintext.
//!
//! [`Authorizer`]: tandem_crds::contract::Authorizer

use serde::Serialize;
use tandem_crds::contract::{
    self, AuthorizationAction, Caller, CallerIdentity, DecidedBy, MtlsMode, ProxyConfig, Request,
};
use tandem_crds::identity::SpiffeId;
use tandem_crds::names;

use super::gather::ConfigState;
use super::question::{CallerArg, HttpQuestion, Question};
use super::report::{PodFacts, ProbeFacts};
use super::summary;
use crate::{Error, Result};

/// The decision for one caller and request.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DecisionFacts {
    /// Who.
    pub caller: CallerFacts,
    /// What.
    pub request: RequestFacts,
    /// Whether the proxy lets it through.
    pub allowed: bool,
    /// What decided.
    pub decided_by: DecidedByFacts,
    /// What the caller gets, in words.
    pub response: String,
    /// The `tandem-denied-by` header of a refused HTTP request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denied_by_header: Option<String>,
    /// What the reader should know about this decision.
    pub notes: Vec<String>,
}

/// The caller.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CallerFacts {
    /// Its SPIFFE ID; absent: unauthenticated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Its address, if given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address: Option<std::net::IpAddr>,
}

/// The request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestFacts {
    /// The workload port.
    pub port: u16,
    /// `http` or `tcp`.
    pub protocol: &'static str,
    /// HTTP method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// HTTP path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// HTTP headers, `[name, value]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
}

/// What decided.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum DecidedByFacts {
    /// A rule of a policy.
    #[serde(rename_all = "camelCase")]
    Rule {
        /// `<namespace>/<name>`.
        policy: String,
        /// `Allow` or `Deny`.
        action: AuthorizationAction,
        /// The rule's index.
        rule: usize,
        /// The rule in one line.
        summary: String,
    },
    /// Allow policies cover the port and none of their rules matched.
    NoAllowMatched {
        /// Those policies.
        policies: Vec<String>,
    },
    /// No Allow policy covers the port: the default policy.
    Default {
        /// Which.
        policy: contract::DefaultPolicy,
    },
    /// One of the pod's kubelet probes, let through before authorization.
    Probe {
        /// Its port.
        port: u16,
        /// Its path.
        path: String,
    },
    /// A strict workload refuses a plaintext caller before authorization.
    StrictMtls,
    /// The caller's identity is in another trust domain than the mesh's: the proxy refuses its
    /// certificate in the handshake.
    #[serde(rename_all = "camelCase")]
    ForeignTrustDomain {
        /// The caller's trust domain.
        trust_domain: String,
    },
    /// The pod has no proxy: nothing enforces anything.
    NotInjected,
}

/// What the decision needs to know about the pod.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    /// The pod.
    pub pod: &'a PodFacts,
    /// Its first container port (the default `--port`).
    pub default_port: Option<u16>,
    /// Its proxy config.
    pub config: &'a ConfigState,
    /// The mesh's trust domain.
    pub trust_domain: &'a str,
    /// Whether the config showed it (else it is the default, an assumption).
    pub trust_domain_known: bool,
    /// The kubelet's probes.
    pub probes: &'a [ProbeFacts],
}

/// Decides `question` for the pod.
pub fn decide(question: &Question, target: &Target<'_>) -> Result<DecisionFacts> {
    let Target {
        pod,
        default_port,
        config: state,
        trust_domain,
        trust_domain_known,
        probes,
    } = *target;
    let port = question.port.or(default_port).ok_or_else(|| {
        Error::Usage("the pod declares no container port: pass --port".to_owned())
    })?;
    let identity = question.caller.identity(trust_domain);
    let mut decision = DecisionFacts {
        caller: CallerFacts {
            identity: identity.as_ref().map(SpiffeId::uri),
            address: question.address,
        },
        request: request_facts(port, question.http.as_ref()),
        allowed: true,
        decided_by: DecidedByFacts::NotInjected,
        response: "none: the app itself answers".to_owned(),
        denied_by_header: None,
        notes: Vec::new(),
    };
    if !pod.injected {
        return Ok(decision);
    }
    let config = match state {
        ConfigState::Loaded { config, .. } => config,
        ConfigState::Missing { name } => {
            return Err(Error::Undecidable(format!(
                "ConfigMap {name} does not exist: the proxy serves whatever config it loaded \
                 last, or none (passthrough, not ready)"
            )));
        }
        ConfigState::Invalid { name, error } => {
            return Err(Error::Undecidable(format!(
                "ConfigMap {name} holds a config the proxy refuses ({error}): the proxy keeps \
                 serving the last good one, which the apiserver cannot show"
            )));
        }
    };
    if let Some(id) = &identity
        && id.trust_domain != trust_domain
    {
        if trust_domain_known {
            decision.allowed = false;
            decision.decided_by = DecidedByFacts::ForeignTrustDomain {
                trust_domain: id.trust_domain.clone(),
            };
            decision.response = format!(
                "fails the TLS handshake: the proxy accepts only identities of trust domain \
                 {trust_domain}"
            );
            return Ok(decision);
        }
        // The mesh's trust domain is only assumed: decide, and say what would change it.
        decision.notes.push(format!(
            "the config shows no trust domain and {trust_domain} is assumed; if the mesh's is \
             not {}, the proxy refuses this caller's certificate in the handshake",
            id.trust_domain
        ));
    }
    if let Some(probe) = probe_match(question, port, probes) {
        decision.decided_by = DecidedByFacts::Probe {
            port,
            path: probe.path.clone(),
        };
        decision.response = "passes it to the app (a kubelet probe)".to_owned();
        return Ok(decision);
    }
    if identity.is_none() && config.workload.mtls == MtlsMode::Strict {
        decision.allowed = false;
        decision.decided_by = DecidedByFacts::StrictMtls;
        decision.response =
            "closes the plaintext connection (strict mutual TLS), before any policy".to_owned();
        return Ok(decision);
    }
    evaluate(
        &mut decision,
        config,
        identity.as_ref(),
        question,
        port,
        trust_domain,
    )?;
    Ok(decision)
}

fn request_facts(port: u16, http: Option<&HttpQuestion>) -> RequestFacts {
    RequestFacts {
        port,
        protocol: if http.is_some() { "http" } else { "tcp" },
        method: http.map(|h| h.method.clone()),
        path: http.map(|h| h.path.clone()),
        headers: http.map(|h| h.headers.clone()).unwrap_or_default(),
    }
}

/// The proxy lets a plaintext `GET`/`HEAD` to a listed probe path through, as it must for the
/// kubelet (which has no mesh identity) under any default policy.
fn probe_match<'a>(
    question: &Question,
    port: u16,
    probes: &'a [ProbeFacts],
) -> Option<&'a ProbeFacts> {
    if question.caller != CallerArg::Unauthenticated {
        return None;
    }
    let http = question.http.as_ref()?;
    if http.method != "GET" && http.method != "HEAD" {
        return None;
    }
    probes
        .iter()
        .find(|p| p.port == port && p.path == http.path)
}

/// Asks the proxy's evaluator, compiled from the config as the proxy compiles it.
fn evaluate(
    decision: &mut DecisionFacts,
    config: &ProxyConfig,
    identity: Option<&SpiffeId>,
    question: &Question,
    port: u16,
    trust_domain: &str,
) -> Result<()> {
    let authorizer = config
        .authorizer(trust_domain)
        .map_err(|e| Error::Undecidable(format!("the config's policies do not compile: {e}")))?;
    let uri = identity.map(SpiffeId::uri);
    let caller = Caller {
        identity: identity
            .zip(uri.as_deref())
            .map(|(id, uri)| CallerIdentity {
                uri,
                trust_domain: &id.trust_domain,
                namespace: &id.namespace,
            }),
        address: question.address,
    };
    let http = question
        .http
        .as_ref()
        .map(|h| h as &dyn contract::HttpFacts);
    let verdict = authorizer.decide(&Request { port, caller, http });
    let policies = &config.authorization.policies;
    decision.allowed = verdict.allowed;
    let (by, header) = match verdict.by {
        // The indices come from an evaluator compiled from these very policies.
        DecidedBy::Rule { policy, rule } => match policies.get(policy) {
            Some(p) => {
                let by = DecidedByFacts::Rule {
                    policy: p.name.clone(),
                    action: p.action,
                    rule,
                    summary: p.rules.get(rule).map(summary::rule).unwrap_or_default(),
                };
                (by, p.name.clone())
            }
            None => {
                return Err(Error::Undecidable(format!(
                    "the evaluator named policy #{policy}, which the config does not have"
                )));
            }
        },
        DecidedBy::NoAllowMatched => {
            let names: Vec<String> = authorizer
                .allow_policies_for(port)
                .filter_map(|i| policies.get(i).map(|p| p.name.clone()))
                .collect();
            let header = names.join(", ");
            (DecidedByFacts::NoAllowMatched { policies: names }, header)
        }
        DecidedBy::Default(policy) => {
            if policy == contract::DefaultPolicy::ClusterAuthenticated
                && identity.is_some()
                && question.address.is_none()
                && !config.authorization.cluster_networks.is_empty()
            {
                decision.notes.push(
                    "cluster-authenticated needs the caller's address in the cluster networks; \
                     none was given (--from-ip), so it counts as outside"
                        .to_owned(),
                );
            }
            (
                DecidedByFacts::Default { policy },
                policy.label().to_owned(),
            )
        }
    };
    decision.decided_by = by;
    decision.response = response(decision.allowed, question.http.is_some(), &header);
    if !decision.allowed && question.http.is_some() {
        decision.denied_by_header = Some(header);
    }
    Ok(())
}

fn response(allowed: bool, http: bool, denied_by: &str) -> String {
    match (allowed, http) {
        (true, true) => "passes the request to the app".to_owned(),
        (true, false) => "relays the connection to the app".to_owned(),
        (false, true) => format!(
            "answers HTTP 403 with {}: {denied_by} (gRPC: status 7, PERMISSION_DENIED)",
            names::DENIED_BY_HEADER
        ),
        (false, false) => "closes the connection after accepting it".to_owned(),
    }
}
