//! Unit tests of AuthorizationPolicy rendering: targets, ports, rules, contradictions, defaults,
//! version stamps, status, and the flags that feed them.

use std::collections::BTreeMap;
use std::sync::Arc;

use clap::Parser;
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, Namespace, Pod, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::PartialObjectMeta;
use tandem_crds::contract::{
    self, AuthorizationAction, Caller, CallerIdentity, Callers, DecidedBy, DefaultPolicy,
    HeaderMatch, Operations, PathMatch, ProxyConfig, Request, ValueMatch,
};
use tandem_crds::names::DEFAULT_POLICY_ANNOTATION;
use tandem_crds::v1alpha1::{AuthorizationPolicy, AuthorizationPolicySpec, reason};

use crate::policy::{PolicyKind, Verdict};
use crate::render::{Inputs, document, render};
use crate::status::{Programming, next_authorization_status};
use crate::tests::{annotated, at, key, meta, pod};

// ---------------------------------------------------------------------------------------------
// Fixtures

/// A Service with a selector; ports `(name, port, targetPort)`.
fn service(
    namespace: &str,
    name: &str,
    selector: &[(&str, &str)],
    ports: &[(&str, i32, Option<IntOrString>)],
) -> Arc<Service> {
    Arc::new(Service {
        metadata: meta(namespace, name),
        spec: Some(ServiceSpec {
            selector: Some(
                selector
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p, t)| ServicePort {
                        name: Some((*n).to_owned()),
                        port: *p,
                        target_port: t.clone(),
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// An injected pod with labels and named container ports `(name, port)`.
fn labelled(
    namespace: &str,
    name: &str,
    service_account: &str,
    labels: &[(&str, &str)],
    ports: &[(&str, i32)],
) -> Arc<Pod> {
    let mut pod = (*pod(namespace, name, service_account, true)).clone();
    pod.metadata.labels = Some(
        labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    );
    if let Some(spec) = pod.spec.as_mut() {
        spec.containers = vec![Container {
            name: "app".into(),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| ContainerPort {
                        name: Some((*n).to_owned()),
                        container_port: *p,
                        ..ContainerPort::default()
                    })
                    .collect(),
            ),
            ..Container::default()
        }];
    }
    Arc::new(pod)
}

fn policy(namespace: &str, name: &str, spec: serde_json::Value) -> Arc<AuthorizationPolicy> {
    let spec: AuthorizationPolicySpec =
        serde_json::from_value(spec).unwrap_or_else(|e| panic!("{e}"));
    let mut policy = AuthorizationPolicy::new(name, spec);
    policy.metadata.namespace = Some(namespace.into());
    policy.metadata.creation_timestamp = at(0);
    policy.metadata.generation = Some(2);
    Arc::new(policy)
}

fn namespace(name: &str, default_policy: Option<&str>) -> Arc<PartialObjectMeta<Namespace>> {
    let mut ns = (*annotated::<Namespace>(None, name, None)).clone();
    if let Some(value) = default_policy {
        ns.metadata.annotations = Some(
            [(DEFAULT_POLICY_ANNOTATION.to_owned(), value.to_owned())]
                .into_iter()
                .collect(),
        );
    }
    Arc::new(ns)
}

/// A bank: Service `ledger` (port 80 → the pods' port named `web`, 9000 → 9090, gRPC) selects
/// the pods of two ServiceAccounts, `ledger` (web = 8080) and `ledger-canary` (web = 8081),
/// plus a pod that is not injected; `teller` is a client; Service `db` is plain TCP.
fn bank() -> Inputs {
    let mut audit = (*labelled("bank", "audit-1", "audit", &[("app", "ledger")], &[])).clone();
    if let Some(spec) = audit.spec.as_mut() {
        spec.init_containers = None;
    }
    Inputs {
        services: vec![
            service(
                "bank",
                "ledger",
                &[("app", "ledger")],
                &[
                    ("http", 80, Some(IntOrString::String("web".into()))),
                    ("grpc-admin", 9000, Some(IntOrString::Int(9090))),
                ],
            ),
            service("bank", "db", &[("app", "db")], &[("tcp-pg", 5432, None)]),
        ],
        pods: vec![
            labelled(
                "bank",
                "ledger-1",
                "ledger",
                &[("app", "ledger"), ("tier", "core")],
                &[("web", 8080)],
            ),
            labelled(
                "bank",
                "ledger-2",
                "ledger-canary",
                &[("app", "ledger")],
                &[("web", 8081)],
            ),
            labelled("bank", "teller-1", "teller", &[("app", "teller")], &[]),
            labelled("bank", "db-1", "db", &[("app", "db")], &[("pg", 5432)]),
            Arc::new(audit),
        ],
        service_accounts: ["ledger", "ledger-canary", "teller", "db", "audit"]
            .into_iter()
            .map(|sa| annotated(Some("bank"), sa, None))
            .collect(),
        ..Inputs::default()
    }
}

fn allow_teller_on(target: serde_json::Value) -> serde_json::Value {
    serde_json::json!({
        "targetRef": target,
        "action": "Allow",
        "rules": [{"from": {"serviceAccounts": [{"name": "teller"}]}}]
    })
}

fn verdict(rendered: &crate::Rendered, name: &str) -> Verdict {
    rendered
        .verdicts
        .get(&key(PolicyKind::Authorization, "bank", name))
        .cloned()
        .unwrap_or_else(|| panic!("no verdict for {name}"))
}

fn invalid_message(rendered: &crate::Rendered, name: &str) -> String {
    match verdict(rendered, name) {
        Verdict::Rejected { reason, message } if reason == reason::INVALID => message,
        other => panic!("{name} is not Invalid: {other:?}"),
    }
}

fn policies(rendered: &crate::Rendered, sa: &str) -> Vec<contract::AuthorizationPolicy> {
    rendered.config_for("bank", sa).authorization.policies
}

fn ports_of(rendered: &crate::Rendered, sa: &str) -> Vec<Vec<u16>> {
    policies(rendered, sa)
        .into_iter()
        .map(|p| p.ports)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Targets and ports

#[test]
fn a_service_target_reaches_the_workloads_its_selector_picks_on_their_target_ports() {
    let mut inputs = bank();
    inputs.authorization_policies = vec![policy(
        "bank",
        "allow-teller",
        allow_teller_on(serde_json::json!({"kind": "Service", "name": "ledger"})),
    )];
    let rendered = render(&inputs);
    assert_eq!(verdict(&rendered, "allow-teller"), Verdict::Accepted);
    assert_eq!(
        policies(&rendered, "ledger"),
        [contract::AuthorizationPolicy {
            name: "bank/allow-teller".into(),
            action: AuthorizationAction::Allow,
            // The named port `web` is 8080 on these pods; 9000 targets 9090.
            ports: vec![8080, 9090],
            rules: vec![contract::AuthorizationRule {
                from: Some(Callers {
                    principals: vec!["spiffe://cluster.local/ns/bank/sa/teller".into()],
                    ..Callers::default()
                }),
                to: None,
            }],
        }]
    );
    assert_eq!(ports_of(&rendered, "ledger-canary"), [vec![8081, 9090]]);
    assert!(policies(&rendered, "teller").is_empty());
    assert!(policies(&rendered, "db").is_empty());
    // audit-1 is selected but not injected: it has no proxy to enforce anything.
    assert_eq!(
        rendered.workloads_of(&key(PolicyKind::Authorization, "bank", "allow-teller")),
        ["bank/ledger", "bank/ledger-canary"]
    );
}

#[test]
fn target_ref_ports_narrow_a_service_policy_to_their_target_ports() {
    let mut inputs = bank();
    inputs.authorization_policies = vec![policy(
        "bank",
        "admin",
        allow_teller_on(serde_json::json!({"kind": "Service", "name": "ledger", "ports": [9000]})),
    )];
    let rendered = render(&inputs);
    assert_eq!(ports_of(&rendered, "ledger"), [vec![9090]]);
    assert_eq!(ports_of(&rendered, "ledger-canary"), [vec![9090]]);
}

#[test]
fn a_named_target_port_no_pod_declares_covers_nothing_rather_than_every_port() {
    let mut inputs = bank();
    inputs.pods[0] = labelled("bank", "ledger-1", "ledger", &[("app", "ledger")], &[]);
    inputs.authorization_policies = vec![policy(
        "bank",
        "web-only",
        allow_teller_on(serde_json::json!({"kind": "Service", "name": "ledger", "ports": [80]})),
    )];
    let rendered = render(&inputs);
    assert_eq!(verdict(&rendered, "web-only"), Verdict::Accepted);
    assert!(
        policies(&rendered, "ledger").is_empty(),
        "not on every port"
    );
    assert_eq!(ports_of(&rendered, "ledger-canary"), [vec![8081]]);
    assert_eq!(
        rendered.workloads_of(&key(PolicyKind::Authorization, "bank", "web-only")),
        ["bank/ledger-canary"]
    );
}

#[test]
fn a_target_port_left_out_is_the_service_port_itself() {
    let mut inputs = bank();
    inputs.authorization_policies = vec![policy(
        "bank",
        "db",
        allow_teller_on(serde_json::json!({"kind": "Service", "name": "db"})),
    )];
    assert_eq!(ports_of(&render(&inputs), "db"), [vec![5432]]);
}

#[test]
fn a_service_account_target_covers_every_port_and_may_have_no_pods_yet() {
    let mut inputs = bank();
    inputs.authorization_policies = vec![
        policy(
            "bank",
            "ledger-sa",
            allow_teller_on(serde_json::json!({"kind": "ServiceAccount", "name": "ledger"})),
        ),
        policy(
            "bank",
            "audit-sa",
            allow_teller_on(serde_json::json!({"kind": "ServiceAccount", "name": "audit"})),
        ),
    ];
    let rendered = render(&inputs);
    assert_eq!(ports_of(&rendered, "ledger"), [Vec::<u16>::new()]);
    assert!(policies(&rendered, "ledger-canary").is_empty());
    assert_eq!(verdict(&rendered, "audit-sa"), Verdict::Accepted);
    assert!(
        rendered
            .workloads_of(&key(PolicyKind::Authorization, "bank", "audit-sa"))
            .is_empty()
    );
}

#[test]
fn a_missing_service_or_service_account_is_target_not_found() {
    let mut inputs = bank();
    inputs.authorization_policies = vec![
        policy(
            "bank",
            "ghost-svc",
            allow_teller_on(serde_json::json!({"kind": "Service", "name": "ghost"})),
        ),
        policy(
            "bank",
            "ghost-sa",
            allow_teller_on(serde_json::json!({"kind": "ServiceAccount", "name": "ghost"})),
        ),
    ];
    let rendered = render(&inputs);
    for (name, message) in [
        ("ghost-svc", "Service bank/ghost does not exist"),
        ("ghost-sa", "ServiceAccount bank/ghost does not exist"),
    ] {
        assert_eq!(
            verdict(&rendered, name),
            Verdict::Rejected {
                reason: reason::TARGET_NOT_FOUND,
                message: message.into()
            }
        );
    }
    assert!(rendered.authorizations.workloads_of.is_empty());
    assert!(policies(&rendered, "ledger").is_empty());
}

#[test]
fn a_target_ref_port_the_service_lacks_is_invalid() {
    let mut inputs = bank();
    inputs.authorization_policies = vec![policy(
        "bank",
        "wrong-port",
        allow_teller_on(serde_json::json!({"kind": "Service", "name": "ledger", "ports": [8080]})),
    )];
    let message = invalid_message(&render(&inputs), "wrong-port");
    assert!(
        message.contains(
            "targetRef.ports[0]: Service bank/ledger has no TCP port 8080 (it has 80, 9000)"
        ),
        "{message}"
    );
}

#[test]
fn a_service_in_another_namespace_is_not_a_target() {
    let mut inputs = bank();
    inputs.authorization_policies = vec![policy(
        "shop",
        "cross",
        allow_teller_on(serde_json::json!({"kind": "Service", "name": "ledger"})),
    )];
    let rendered = render(&inputs);
    assert!(matches!(
        rendered.verdicts.get(&key(PolicyKind::Authorization, "shop", "cross")),
        Some(Verdict::Rejected { reason, .. }) if *reason == reason::TARGET_NOT_FOUND
    ));
}

// ---------------------------------------------------------------------------------------------
// Rules

#[test]
fn rules_convert_to_the_contract_as_traffic_policy_matches_do() {
    let mut inputs = bank();
    inputs.authorization_policies = vec![policy(
        "bank",
        "full",
        serde_json::json!({
            "targetRef": {"kind": "Service", "name": "ledger"},
            "action": "Deny",
            "rules": [
                {
                    "from": {
                        "principals": ["spiffe://cluster.local/ns/ops/*"],
                        "serviceAccounts": [{"name": "teller"}, {"namespace": "shop", "name": "web"}],
                        "namespaces": ["dev"],
                        "authenticated": true
                    },
                    "to": {
                        "ports": [8080, 8081],
                        "paths": [
                            {"type": "Exact", "value": "/health"},
                            {"value": "/api"},
                            {"type": "RegularExpression", "value": "/v[0-9]+/.*"}
                        ],
                        "methods": ["POST", "DELETE"],
                        "headers": [{"name": "X-Team", "value": "blue"},
                                    {"name": "x-env", "type": "RegularExpression", "value": "prod|stage"}]
                    }
                },
                {"from": {"unauthenticated": true}},
                {}
            ]
        }),
    )];
    let rendered = render(&inputs);
    assert_eq!(verdict(&rendered, "full"), Verdict::Accepted);
    let rendered = &policies(&rendered, "ledger")[0];
    assert_eq!(rendered.action, AuthorizationAction::Deny);
    assert_eq!(
        rendered.rules[0].from,
        Some(Callers {
            principals: vec![
                "spiffe://cluster.local/ns/ops/*".into(),
                "spiffe://cluster.local/ns/bank/sa/teller".into(),
                "spiffe://cluster.local/ns/shop/sa/web".into(),
            ],
            namespaces: vec!["dev".into()],
            authenticated: true,
            unauthenticated: false,
        })
    );
    assert_eq!(
        rendered.rules[0].to,
        Some(Operations {
            ports: vec![8080, 8081],
            paths: vec![
                PathMatch::Exact("/health".into()),
                PathMatch::Prefix("/api".into()),
                PathMatch::Regex("/v[0-9]+/.*".into()),
            ],
            methods: vec!["POST".into(), "DELETE".into()],
            headers: vec![
                HeaderMatch {
                    name: "x-team".into(),
                    value: ValueMatch::Exact("blue".into())
                },
                HeaderMatch {
                    name: "x-env".into(),
                    value: ValueMatch::Regex("prod|stage".into())
                },
            ],
        })
    );
    assert!(
        rendered.rules[1]
            .from
            .as_ref()
            .is_some_and(|f| f.unauthenticated)
    );
    assert_eq!(rendered.rules[2], contract::AuthorizationRule::default());
}

#[test]
fn service_accounts_use_the_meshes_trust_domain() {
    let mut inputs = bank();
    inputs.mesh.trust_domain = "bank.example".into();
    inputs.authorization_policies = vec![policy(
        "bank",
        "allow-teller",
        allow_teller_on(serde_json::json!({"kind": "Service", "name": "ledger"})),
    )];
    let rendered = render(&inputs);
    let from = policies(&rendered, "ledger")[0].rules[0].from.clone();
    assert_eq!(
        from.map(|f| f.principals),
        Some(vec!["spiffe://bank.example/ns/bank/sa/teller".to_owned()])
    );
}

#[test]
fn a_rule_port_the_policy_does_not_cover_is_invalid_and_other_policies_still_render() {
    let mut inputs = bank();
    inputs.authorization_policies = vec![
        policy(
            "bank",
            "allow-teller",
            allow_teller_on(serde_json::json!({"kind": "Service", "name": "ledger"})),
        ),
        policy(
            "bank",
            "bad-port",
            serde_json::json!({
                "targetRef": {"kind": "Service", "name": "ledger"},
                "action": "Allow",
                "rules": [{"to": {"ports": [8080, 7777]}}]
            }),
        ),
    ];
    let rendered = render(&inputs);
    let message = invalid_message(&rendered, "bad-port");
    assert_eq!(
        message,
        "rules[0].to.ports[1]: 7777 is not among the ports the policy covers (8080, 8081, 9090), \
         so the rule can never match"
    );
    assert_eq!(verdict(&rendered, "allow-teller"), Verdict::Accepted);
    let names: Vec<String> = policies(&rendered, "ledger")
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["bank/allow-teller"]);
    assert!(
        rendered
            .workloads_of(&key(PolicyKind::Authorization, "bank", "bad-port"))
            .is_empty()
    );
}

#[test]
fn http_conditions_where_every_port_is_declared_tcp_are_invalid() {
    let mut inputs = bank();
    let on = |name: &str, target: serde_json::Value, to: serde_json::Value| {
        policy(
            "bank",
            name,
            serde_json::json!({"targetRef": target, "action": "Allow", "rules": [{"to": to}]}),
        )
    };
    inputs.authorization_policies = vec![
        on(
            "db-get",
            serde_json::json!({"kind": "Service", "name": "db"}),
            serde_json::json!({"methods": ["GET"]}),
        ),
        // 9090 is gRPC: HTTP conditions make sense there.
        on(
            "ledger-admin-path",
            serde_json::json!({"kind": "Service", "name": "ledger"}),
            serde_json::json!({"ports": [9090], "paths": [{"value": "/admin"}]}),
        ),
        // A ServiceAccount target has no declared protocols to hold against it.
        on(
            "db-sa-get",
            serde_json::json!({"kind": "ServiceAccount", "name": "db"}),
            serde_json::json!({"methods": ["GET"]}),
        ),
    ];
    let rendered = render(&inputs);
    let message = invalid_message(&rendered, "db-get");
    assert!(
        message.starts_with("rules[0].to: paths, methods and headers need HTTP")
            && message.contains("5432 \"tcp-pg\""),
        "{message}"
    );
    assert_eq!(verdict(&rendered, "ledger-admin-path"), Verdict::Accepted);
    assert_eq!(verdict(&rendered, "db-sa-get"), Verdict::Accepted);
}

#[test]
fn principals_of_another_trust_domain_are_invalid() {
    let mut inputs = bank();
    let from = |name: &str, principal: &str| {
        policy(
            "bank",
            name,
            serde_json::json!({
                "targetRef": {"kind": "ServiceAccount", "name": "ledger"},
                "action": "Allow",
                "rules": [{"from": {"principals": [principal]}}]
            }),
        )
    };
    inputs.authorization_policies = vec![
        from("foreign", "spiffe://other.example/ns/bank/sa/teller"),
        from("foreign-prefix", "spiffe://other.example/*"),
        from("foreign-partial", "spiffe://x*"),
        from("ours-prefix", "spiffe://cluster.local/ns/ops/*"),
        from("ours-partial", "spiffe://clus*"),
    ];
    let rendered = render(&inputs);
    assert_eq!(
        invalid_message(&rendered, "foreign"),
        "rules[0].from.principals[0]: spiffe://other.example/ns/bank/sa/teller is in trust \
         domain other.example, not the mesh's cluster.local: no caller can present it here"
    );
    assert!(invalid_message(&rendered, "foreign-prefix").contains("other.example"));
    assert!(invalid_message(&rendered, "foreign-partial").contains("x*"));
    assert_eq!(verdict(&rendered, "ours-prefix"), Verdict::Accepted);
    assert_eq!(verdict(&rendered, "ours-partial"), Verdict::Accepted);
}

#[test]
fn what_the_contracts_validation_refuses_is_invalid_with_the_policys_own_path() {
    let mut inputs = bank();
    inputs.authorization_policies = vec![policy(
        "bank",
        "bad",
        serde_json::json!({
            "targetRef": {"kind": "ServiceAccount", "name": "ledger"},
            "action": "Deny",
            "rules": [
                {
                    "from": {"principals": ["spiffe://cluster.local/not-a-workload"]},
                    "to": {"paths": [{"type": "RegularExpression", "value": "/a(("}]}
                },
                {
                    // The schema lets `a..b` through; as a SPIFFE ID it is no name.
                    "from": {"principals": ["spiffe://cluster.local/ns/bank/sa/teller"],
                             "serviceAccounts": [{"name": "teller"}, {"name": "a..b"}]}
                }
            ]
        }),
    )];
    let rendered = render(&inputs);
    let message = invalid_message(&rendered, "bad");
    assert!(
        message.starts_with("rules[0].from.principals[0]: must be a SPIFFE ID"),
        "{message}"
    );
    assert!(
        message.contains("; rules[0].to.paths[0].regex: "),
        "{message}"
    );
    assert!(policies(&rendered, "ledger").is_empty());
}

// ---------------------------------------------------------------------------------------------
// Defaults, order, versions and what the proxy makes of it

#[test]
fn the_default_policy_comes_from_the_namespace_annotation_else_the_flag() {
    let mut inputs = bank();
    inputs.pods.push(pod("shop", "web-1", "web", true));
    inputs.pods.push(pod("dev", "x-1", "x", true));
    inputs.namespaces = vec![
        namespace("bank", Some("deny")),
        namespace("shop", Some("everyone")),
        namespace("dev", None),
        namespace("edge", Some("cluster-authenticated")),
    ];
    inputs.mesh.default_policy = DefaultPolicy::AllAuthenticated;
    inputs.mesh.cluster_networks = vec!["10.244.0.0/16".parse().unwrap_or_else(|e| panic!("{e}"))];
    let rendered = render(&inputs);
    let default = |ns: &str, sa: &str| rendered.config_for(ns, sa).authorization.default_policy;
    assert_eq!(default("bank", "ledger"), DefaultPolicy::Deny);
    assert_eq!(default("bank", "teller"), DefaultPolicy::Deny);
    assert_eq!(
        default("shop", "web"),
        DefaultPolicy::AllAuthenticated,
        "bad value: the flag"
    );
    assert_eq!(default("dev", "x"), DefaultPolicy::AllAuthenticated);
    // A workload without pods yet (config_for is asked anyway) follows its namespace too.
    assert_eq!(default("bank", "nobody"), DefaultPolicy::Deny);
    // Only cluster-authenticated reads the networks, so only its configs carry them.
    assert!(
        rendered
            .config_for("dev", "x")
            .authorization
            .cluster_networks
            .is_empty()
    );
    assert_eq!(
        rendered
            .config_for("edge", "y")
            .authorization
            .cluster_networks,
        inputs.mesh.cluster_networks
    );
    let bad: Vec<_> = rendered
        .bad_annotations
        .iter()
        .map(|b| (b.annotation, b.kind, b.name.as_str(), b.reason()))
        .collect();
    assert_eq!(
        bad,
        [(
            DEFAULT_POLICY_ANNOTATION,
            "Namespace",
            "shop",
            "InvalidDefaultPolicy"
        )]
    );
    assert!(
        rendered.bad_annotations[0]
            .message()
            .contains("\"everyone\" is none of all-unauthenticated, all-authenticated"),
        "{}",
        rendered.bad_annotations[0].message()
    );
}

#[test]
fn the_mesh_defaults_are_linkerds() {
    let mesh = crate::render::Mesh::default();
    assert_eq!(mesh.default_policy, DefaultPolicy::AllUnauthenticated);
    let networks: Vec<String> = mesh
        .cluster_networks
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        networks,
        [
            "10.0.0.0/8",
            "100.64.0.0/10",
            "172.16.0.0/12",
            "192.168.0.0/16"
        ]
    );
}

#[test]
fn policies_on_one_workload_are_sorted_by_name_and_only_its_version_changes() {
    let before = render(&bank());
    let mut inputs = bank();
    inputs.authorization_policies = vec![
        policy(
            "bank",
            "z-allow",
            allow_teller_on(serde_json::json!({"kind": "ServiceAccount", "name": "ledger"})),
        ),
        policy(
            "bank",
            "a-deny",
            serde_json::json!({
                "targetRef": {"kind": "Service", "name": "ledger"},
                "action": "Deny",
                "rules": [{"from": {"unauthenticated": true}}]
            }),
        ),
    ];
    let after = render(&inputs);
    let names: Vec<String> = policies(&after, "ledger")
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["bank/a-deny", "bank/z-allow"]);
    let version = |r: &crate::Rendered, sa: &str| r.config_for("bank", sa).version;
    assert_ne!(version(&before, "ledger"), version(&after, "ledger"));
    assert_ne!(
        version(&before, "ledger-canary"),
        version(&after, "ledger-canary")
    );
    assert_eq!(version(&before, "teller"), version(&after, "teller"));
    assert_eq!(
        before.services(),
        after.services(),
        "the services did not change"
    );

    // A changed default changes the stamp as well.
    inputs.namespaces = vec![namespace("bank", Some("deny"))];
    assert_ne!(
        version(&after, "teller"),
        version(&render(&inputs), "teller")
    );
}

#[test]
fn the_rendered_authorization_round_trips_and_decides_as_written() {
    let mut inputs = bank();
    inputs.namespaces = vec![namespace("bank", Some("deny"))];
    inputs.authorization_policies = vec![policy(
        "bank",
        "allow-teller",
        allow_teller_on(serde_json::json!({"kind": "Service", "name": "ledger"})),
    )];
    let config = render(&inputs).config_for("bank", "ledger");
    let parsed =
        ProxyConfig::from_json(document(&config).as_bytes()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed, config);
    let authorizer = parsed
        .authorizer("cluster.local")
        .unwrap_or_else(|e| panic!("{e}"));
    let ask = |sa: &'static str, port: u16| {
        let uri: &'static str =
            Box::leak(format!("spiffe://cluster.local/ns/bank/sa/{sa}").into_boxed_str());
        authorizer.decide(&Request {
            port,
            caller: Caller {
                identity: Some(CallerIdentity {
                    uri,
                    trust_domain: "cluster.local",
                    namespace: "bank",
                }),
                address: None,
            },
            http: None,
        })
    };
    assert!(ask("teller", 8080).allowed);
    assert_eq!(
        ask("teller", 8080).by,
        DecidedBy::Rule { policy: 0, rule: 0 }
    );
    assert_eq!(ask("db", 8080).by, DecidedBy::NoAllowMatched);
    // 15000 is not a port of the Service: the namespace's default, deny, decides.
    assert_eq!(
        ask("teller", 15000).by,
        DecidedBy::Default(DefaultPolicy::Deny)
    );
}

#[test]
fn a_pod_known_by_its_metadata_keeps_what_targeting_reads() {
    let mut inputs = bank();
    // As the operator's metadata watch builds them: the metadata and what the webhook records.
    inputs.pods = inputs
        .pods
        .iter()
        .map(|p| {
            let recorded = crate::stores::Recorded::from_pod(p);
            let mut metadata = p.metadata.clone();
            metadata.annotations.get_or_insert_default().insert(
                tandem_crds::names::PROXY_VERSION_ANNOTATION.to_owned(),
                "0.1.0".to_owned(),
            );
            Arc::new(crate::stores::metadata_pod(metadata, &recorded))
        })
        .collect();
    inputs.authorization_policies = vec![policy(
        "bank",
        "allow-teller",
        allow_teller_on(serde_json::json!({"kind": "Service", "name": "ledger"})),
    )];
    let rendered = render(&inputs);
    assert_eq!(ports_of(&rendered, "ledger"), [vec![8080, 9090]]);
    assert_eq!(ports_of(&rendered, "ledger-canary"), [vec![8081, 9090]]);
}

// ---------------------------------------------------------------------------------------------
// Status

#[test]
fn an_authorization_status_lists_its_workloads_and_counts_their_config_maps() {
    let workloads = vec!["bank/ledger".to_owned(), "bank/ledger-canary".to_owned()];
    let (status, transitions) = next_authorization_status(
        None,
        Some(2),
        &Verdict::Accepted,
        &Programming::Done {
            config_maps: 7,
            proxies: None,
        },
        &workloads,
        "2026-01-01T00:00:00Z",
    );
    assert_eq!(status.workloads, workloads);
    assert_eq!(status.observed_generation, Some(2));
    let conditions: BTreeMap<&str, (&str, &str)> = status
        .conditions
        .iter()
        .map(|c| (c.type_.as_str(), (c.reason.as_str(), c.message.as_str())))
        .collect();
    assert_eq!(conditions["Accepted"].0, reason::ACCEPTED);
    assert_eq!(
        conditions["Programmed"],
        (reason::PROGRAMMED, "carried by 2 proxy ConfigMap(s)")
    );
    assert_eq!(transitions.len(), 2);

    // Recomputed unchanged: equal, no transition. Rejected: applies nowhere.
    let (again, none) = next_authorization_status(
        Some(&status),
        Some(2),
        &Verdict::Accepted,
        &Programming::Done {
            config_maps: 9,
            proxies: None,
        },
        &workloads,
        "2026-01-02T00:00:00Z",
    );
    assert_eq!(again, status);
    assert!(none.is_empty());
    let (refused, _) = next_authorization_status(
        Some(&status),
        Some(3),
        &Verdict::Rejected {
            reason: reason::INVALID,
            message: "rules[0]: bad".into(),
        },
        &Programming::Done {
            config_maps: 9,
            proxies: None,
        },
        &[],
        "2026-01-02T00:00:00Z",
    );
    assert!(refused.workloads.is_empty());
    assert_eq!(refused.conditions[0].message, "rules[0]: bad");
}

// ---------------------------------------------------------------------------------------------
// Flags

fn settings(args: &[&str]) -> crate::Settings {
    crate::Settings::try_parse_from(std::iter::once("tandem-operator").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn the_default_policy_and_cluster_network_flags_reach_the_mesh() {
    let mesh = settings(&[]).mesh().unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mesh, crate::render::Mesh::default());
    let mesh = settings(&[
        "--default-policy",
        "cluster-authenticated",
        "--cluster-networks",
        "10.244.0.0/16, fd00::/8",
    ])
    .mesh()
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(mesh.default_policy, DefaultPolicy::ClusterAuthenticated);
    let networks: Vec<String> = mesh
        .cluster_networks
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(networks, ["10.244.0.0/16", "fd00::/8"]);
    let every = settings(&["--cluster-networks", ""])
        .mesh()
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(every.cluster_networks.is_empty(), "empty: every address");
}

#[test]
fn an_invalid_default_policy_or_network_is_a_settings_error() {
    for (args, needle) in [
        (
            ["--default-policy", "open"],
            "--default-policy \"open\" is none of",
        ),
        (
            ["--cluster-networks", "10.0.0.0/8,ten"],
            "--cluster-networks: \"ten\"",
        ),
    ] {
        match settings(&args).validate() {
            Err(crate::Error::Settings(message)) => {
                assert!(message.contains(needle), "{message}")
            }
            other => panic!("{args:?}: {other:?}"),
        }
    }
}
