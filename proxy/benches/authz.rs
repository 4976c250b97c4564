//! Inbound authorization's cost per request: what `MeshHttp::request_filter` adds for one
//! HTTP request — the caller from the connection's peer identity, the facts read in place from
//! Pingora's request header, the decision, and the counter — with 1, 10 and 100 rules, side by
//! side with authorization off (no policy, the open default: the decision is known without
//! looking at the request).
//!
//! The rules are the expensive kind: each names a principal, a path prefix and a method, and
//! the request is allowed by the last one, so every rule is tried (a Deny policy with one rule
//! that does not match is tried first, as in Istio's order). Each configuration is also run
//! with the caller matching no rule (the denial's decision; building the 403 is not included).
//!
//! `cargo bench -p tandem-proxy --bench authz` (no harness). CPU time per request is read from
//! `/proc/thread-self/schedstat`, so other processes on the cores do not inflate it; wall time
//! is shown beside it.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::IpAddr;
use std::time::Instant;

use pingora::http::RequestHeader;
use tandem_crds::contract::{
    Authorization, AuthorizationAction, AuthorizationPolicy, AuthorizationRule, Callers,
    DefaultPolicy, Operations, PathMatch, ProxyConfig, Request, Workload,
};
use tandem_crds::identity::SpiffeId;
use tandem_proxy::authz::{self, Authz};
use tandem_proxy::metrics::{AuthzProtocol, Metrics};
use tandem_proxy::tls::PeerIdentity;

const REQUESTS: u32 = 1_000_000;
const RUNS: usize = 5;

fn rule(i: usize) -> AuthorizationRule {
    AuthorizationRule {
        from: Some(Callers {
            principals: vec![format!("spiffe://cluster.local/ns/shop/sa/caller-{i}")],
            ..Callers::default()
        }),
        to: Some(Operations {
            paths: vec![PathMatch::Prefix(format!("/api/v{i}"))],
            methods: vec!["GET".into()],
            ..Operations::default()
        }),
    }
}

/// `rules` Allow rules (the last one allows `caller-<rules-1>` to GET `/api/v<rules-1>/…`)
/// behind a one-rule Deny policy; no policy at all when `rules` is 0.
fn config(rules: usize) -> ProxyConfig {
    let mut config = ProxyConfig::new(Workload {
        namespace: "shop".into(),
        service_account: "api".into(),
        ..Workload::default()
    });
    if rules > 0 {
        config.authorization = Authorization {
            default_policy: DefaultPolicy::Deny,
            cluster_networks: vec![],
            policies: vec![
                AuthorizationPolicy {
                    name: "shop/allow-callers".into(),
                    action: AuthorizationAction::Allow,
                    ports: vec![8080],
                    rules: (0..rules).map(rule).collect(),
                },
                AuthorizationPolicy {
                    name: "shop/deny-batch".into(),
                    action: AuthorizationAction::Deny,
                    ports: vec![],
                    rules: vec![AuthorizationRule {
                        from: Some(Callers {
                            principals: vec!["spiffe://cluster.local/ns/shop/sa/batch".into()],
                            ..Callers::default()
                        }),
                        to: None,
                    }],
                },
            ],
        };
    }
    config.validate().unwrap();
    config
}

fn thread_cpu_nanos() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Authorizes `REQUESTS` requests of `peer`; returns (CPU ns, wall ns) per request and how
/// many were allowed.
fn run(authz: &Authz, req: &RequestHeader, peer: &PeerIdentity) -> (f64, f64, u32) {
    let client: IpAddr = "10.244.1.7".parse().unwrap();
    let mut allowed = 0;
    let cpu_start = thread_cpu_nanos();
    let start = Instant::now();
    for _ in 0..REQUESTS {
        // What `admit_inbound` does per request, after the port and probe checks.
        let protocol = if authz::is_grpc(req) {
            AuthzProtocol::Grpc
        } else {
            AuthzProtocol::Http
        };
        let facts = authz::RequestFacts(std::hint::black_box(req));
        let request = Request {
            port: 8080,
            caller: authz::caller(Some(std::hint::black_box(peer)), Some(client)),
            http: Some(&facts),
        };
        let (decision, verdict) = authz.authorize(&request, protocol);
        allowed += u32::from(decision.allowed);
        std::hint::black_box(verdict);
    }
    let wall = start.elapsed().as_nanos() as f64 / f64::from(REQUESTS);
    let cpu = (thread_cpu_nanos() - cpu_start) as f64 / f64::from(REQUESTS);
    (cpu, wall, allowed)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let metrics = Metrics::new();
    println!("| rules | caller | CPU ns/request | wall ns/request |");
    println!("|---:|---|---:|---:|");
    for rules in [0usize, 1, 10, 100] {
        let authz = Authz::compile(&config(rules), "cluster.local", &metrics.authz).unwrap();
        let last = rules.saturating_sub(1);
        let path = format!("/api/v{last}/items/42");
        let mut req = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
        req.insert_header("host", "api.shop:8080").unwrap();
        req.insert_header("user-agent", "bench/1").unwrap();
        req.insert_header("accept", "application/json").unwrap();
        let callers = [
            ("allowed (last rule)", format!("caller-{last}")),
            ("denied (no rule)", "stranger".to_owned()),
        ];
        for (what, sa) in callers {
            if rules == 0 && what.starts_with("denied") {
                continue; // off: nobody is denied
            }
            let peer = PeerIdentity::new(SpiffeId::new("cluster.local", "shop", &sa));
            run(&authz, &req, &peer); // warm up
            let runs: Vec<_> = (0..RUNS).map(|_| run(&authz, &req, &peer)).collect();
            let expect_allowed = what.starts_with("allowed");
            assert!(
                runs.iter()
                    .all(|r| (r.2 == REQUESTS) == expect_allowed && (r.2 == 0) != expect_allowed),
                "{rules} rules, {what}: wrong decisions"
            );
            let cpu = median(runs.iter().map(|r| r.0).collect());
            let wall = median(runs.iter().map(|r| r.1).collect());
            let label = if rules == 0 {
                "off (no policy)".to_owned()
            } else {
                rules.to_string()
            };
            let what = if rules == 0 { "any" } else { what };
            println!("| {label} | {what} | {cpu:.0} | {wall:.0} |");
        }
    }
    println!(
        "\nmedian of {RUNS} runs of {REQUESTS} requests, one thread; release build, \
         decision + counter + facts, response not included"
    );
}
