//! Unit tests of the pure core: rendering, verdicts and status.

use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    Container, ObjectReference, Pod, PodSpec, PodStatus, Service, ServicePort, ServiceSpec,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use tandem_crds::contract::{
    EndpointWorkload, LoadBalancer, MetricsPrefix, Protocol, Telemetry, Tracing,
};
use tandem_crds::v1alpha1::{
    CircuitBreakerPolicy, CircuitBreakerPolicySpec, ConditionStatus, PolicyStatus, TrafficPolicy,
    TrafficPolicySpec, reason,
};

use crate::policy::{PolicyKey, PolicyKind, Verdict};
use kube::api::PartialObjectMeta;
use tandem_crds::identity::{MTLS_MODE_ANNOTATION, MtlsMode};

use crate::render::{
    BadAnnotation, Inputs, MAX_CONFIG_MAP_BYTES, document, protocol_of, render, trust_namespaces,
    workloads,
};
use crate::status::{Programming, next_status};

// ---------------------------------------------------------------------------------------------
// Fixtures

pub(crate) fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        ..ObjectMeta::default()
    }
}

fn service(namespace: &str, name: &str, ip: &str, ports: &[(&str, i32)]) -> Arc<Service> {
    Arc::new(Service {
        metadata: meta(namespace, name),
        spec: Some(ServiceSpec {
            cluster_ip: Some(ip.into()),
            cluster_ips: Some(vec![ip.into()]),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, p)| ServicePort {
                        name: (!n.is_empty()).then(|| (*n).to_owned()),
                        port: *p,
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        status: None,
    })
}

/// One slice for `service` with endpoints `(ip, ready, pod)` on ports `(name, targetPort)`.
fn slice(
    namespace: &str,
    service: &str,
    name: &str,
    ports: &[(&str, i32)],
    endpoints: &[(&str, Option<bool>, &str)],
) -> Arc<EndpointSlice> {
    let mut metadata = meta(namespace, name);
    metadata.labels = Some(
        [("kubernetes.io/service-name".to_owned(), service.to_owned())]
            .into_iter()
            .collect(),
    );
    Arc::new(EndpointSlice {
        metadata,
        address_type: "IPv4".into(),
        ports: Some(
            ports
                .iter()
                .map(|(n, p)| EndpointPort {
                    name: Some((*n).to_owned()),
                    port: Some(*p),
                    protocol: Some("TCP".into()),
                    ..EndpointPort::default()
                })
                .collect(),
        ),
        endpoints: endpoints
            .iter()
            .map(|(ip, ready, pod)| Endpoint {
                addresses: vec![(*ip).to_owned()],
                conditions: Some(EndpointConditions {
                    ready: *ready,
                    ..EndpointConditions::default()
                }),
                target_ref: (!pod.is_empty()).then(|| ObjectReference {
                    kind: Some("Pod".into()),
                    name: Some((*pod).to_owned()),
                    namespace: Some(namespace.to_owned()),
                    ..ObjectReference::default()
                }),
                ..Endpoint::default()
            })
            .collect(),
    })
}

pub(crate) fn pod(namespace: &str, name: &str, service_account: &str, injected: bool) -> Arc<Pod> {
    let init = injected.then(|| {
        vec![Container {
            name: "tandem-proxy".into(),
            ..Container::default()
        }]
    });
    Arc::new(Pod {
        metadata: meta(namespace, name),
        spec: Some(PodSpec {
            service_account_name: Some(service_account.into()),
            init_containers: init,
            ..PodSpec::default()
        }),
        status: Some(PodStatus {
            phase: Some("Running".into()),
            ..PodStatus::default()
        }),
    })
}

pub(crate) fn at(seconds: i64) -> Option<Time> {
    Timestamp::from_second(1_700_000_000 + seconds)
        .ok()
        .map(Time)
}

fn traffic(
    namespace: &str,
    name: &str,
    created: i64,
    spec: serde_json::Value,
) -> Arc<TrafficPolicy> {
    let spec: TrafficPolicySpec = serde_json::from_value(spec).unwrap_or_else(|e| panic!("{e}"));
    let mut policy = TrafficPolicy::new(name, spec);
    policy.metadata.namespace = Some(namespace.into());
    policy.metadata.creation_timestamp = at(created);
    policy.metadata.generation = Some(1);
    Arc::new(policy)
}

fn breaker(
    namespace: &str,
    name: &str,
    created: i64,
    spec: serde_json::Value,
) -> Arc<CircuitBreakerPolicy> {
    let spec: CircuitBreakerPolicySpec =
        serde_json::from_value(spec).unwrap_or_else(|e| panic!("{e}"));
    let mut policy = CircuitBreakerPolicy::new(name, spec);
    policy.metadata.namespace = Some(namespace.into());
    policy.metadata.creation_timestamp = at(created);
    policy.metadata.generation = Some(3);
    Arc::new(policy)
}

pub(crate) fn key(kind: PolicyKind, namespace: &str, name: &str) -> PolicyKey {
    PolicyKey {
        kind,
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// A shop with a canary: `server` splits 90/10 between `server-v1` and `server-v2`.
/// Shop's canary split evenly instead of 90/10.
fn even_canary() -> Arc<TrafficPolicy> {
    traffic(
        "shop",
        "canary",
        0,
        serde_json::json!({
            "targetRef": {"name": "server"},
            "rules": [{"backends": [
                {"name": "server-v1", "port": 80, "weight": 50},
                {"name": "server-v2", "port": 80, "weight": 50}
            ]}]
        }),
    )
}

fn shop() -> Inputs {
    Inputs {
        traffic_policies: vec![traffic(
            "shop",
            "canary",
            0,
            serde_json::json!({
                "targetRef": {"name": "server"},
                "rules": [{"backends": [
                    {"name": "server-v1", "port": 80, "weight": 90},
                    {"name": "server-v2", "port": 80, "weight": 10}
                ]}]
            }),
        )],
        services: vec![
            service("shop", "server", "10.96.0.10", &[("http", 80)]),
            service("shop", "server-v1", "10.96.0.11", &[("http", 80)]),
            service("shop", "server-v2", "10.96.0.12", &[("http", 80)]),
            service("shop", "unrelated", "10.96.0.13", &[("http", 80)]),
        ],
        endpoint_slices: vec![
            slice(
                "shop",
                "server-v1",
                "server-v1-abc",
                &[("http", 8080)],
                &[
                    ("10.244.0.5", Some(true), "v1-a"),
                    ("10.244.0.4", None, "v1-b"),
                ],
            ),
            slice(
                "shop",
                "server-v2",
                "server-v2-abc",
                &[("http", 8080)],
                &[
                    ("10.244.0.6", Some(true), "v2-a"),
                    ("10.244.0.7", Some(false), "v2-b"),
                ],
            ),
        ],
        pods: vec![
            pod("shop", "client-1", "client", true),
            pod("shop", "v1-a", "server", true),
            pod("shop", "v1-b", "server", false),
        ],
        ..Inputs::default()
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering

#[test]
fn a_canary_renders_its_target_and_both_backends_only() {
    let rendered = render(&shop());
    let names: Vec<&str> = rendered
        .services()
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(names, ["server", "server-v1", "server-v2"]);
    let server = &rendered.services()[0];
    assert_eq!(server.routes.len(), 1);
    assert_eq!(server.routes[0].name, "rule-0");
    let weights: Vec<(&str, u32)> = server.routes[0]
        .backends
        .iter()
        .map(|b| (b.service.name.as_str(), b.weight))
        .collect();
    assert_eq!(weights, [("server-v1", 90), ("server-v2", 10)]);
    assert_eq!(
        rendered
            .verdicts
            .get(&key(PolicyKind::Traffic, "shop", "canary")),
        Some(&Verdict::Accepted)
    );
}

#[test]
fn endpoints_are_ready_only_sorted_on_the_target_port_and_marked_meshed() {
    let rendered = render(&shop());
    let v1 = &rendered.services()[1];
    let endpoints: Vec<(String, bool)> = v1.ports[0]
        .endpoints
        .iter()
        .map(|e| (e.address.to_string(), e.meshed))
        .collect();
    // 10.244.0.4 has no ready condition (unknown counts as ready) and its pod is not injected.
    assert_eq!(
        endpoints,
        [
            ("10.244.0.4:8080".to_owned(), false),
            ("10.244.0.5:8080".to_owned(), true)
        ]
    );
    let v2 = &rendered.services()[2];
    assert_eq!(
        v2.ports[0].endpoints.len(),
        1,
        "the not-ready endpoint is left out"
    );
}

#[test]
fn cluster_ips_and_protocols_come_from_the_service() {
    let rendered = render(&shop());
    let server = &rendered.services()[0];
    assert_eq!(
        server.cluster_ips,
        ["10.96.0.10"
            .parse::<std::net::IpAddr>()
            .unwrap_or_else(|e| panic!("{e}"))]
    );
    assert_eq!(server.ports[0].port, 80);
    assert_eq!(server.ports[0].protocol, Protocol::Http);
}

#[test]
fn protocol_comes_from_app_protocol_then_the_port_name_prefix() {
    let port = |name: Option<&str>, app: Option<&str>| ServicePort {
        name: name.map(str::to_owned),
        app_protocol: app.map(str::to_owned),
        port: 80,
        ..ServicePort::default()
    };
    assert_eq!(
        protocol_of(&port(Some("web"), Some("kubernetes.io/h2c"))),
        Protocol::Http2
    );
    assert_eq!(protocol_of(&port(Some("grpc-api"), None)), Protocol::Grpc);
    assert_eq!(protocol_of(&port(Some("http"), None)), Protocol::Http);
    assert_eq!(protocol_of(&port(Some("h2c-x"), None)), Protocol::Http2);
    assert_eq!(protocol_of(&port(Some("tcp-db"), None)), Protocol::Tcp);
    assert_eq!(
        protocol_of(&port(Some("grpc"), Some("http"))),
        Protocol::Http
    );
    assert_eq!(protocol_of(&port(Some("web"), None)), Protocol::Detect);
    assert_eq!(protocol_of(&port(None, None)), Protocol::Detect);
}

#[test]
fn unchanged_inputs_render_byte_identical_json() {
    let a = document(&render(&shop()).config_for("shop", "client"));
    let mut reordered = shop();
    reordered.services.reverse();
    reordered.endpoint_slices.reverse();
    reordered.pods.reverse();
    let b = document(&render(&reordered).config_for("shop", "client"));
    assert_eq!(a, b);
}

#[test]
fn a_changed_weight_changes_the_version() {
    let before = render(&shop());
    let mut inputs = shop();
    inputs.traffic_policies = vec![even_canary()];
    let after = render(&inputs);
    assert_ne!(before.services(), after.services());
}

#[test]
fn the_rendered_config_is_valid_and_round_trips_through_the_proxy_parser() {
    let config = render(&shop()).config_for("shop", "client");
    let parsed = tandem_crds::contract::ProxyConfig::from_json(document(&config).as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed, config);
    assert_eq!(parsed.workload.service_account, "client");
}

#[test]
fn retries_without_a_budget_get_the_default_budget() {
    let mut inputs = shop();
    inputs.traffic_policies = vec![traffic(
        "shop",
        "retry",
        0,
        serde_json::json!({
            "targetRef": {"name": "server"},
            "loadBalancer": "RoundRobin",
            "rules": [{"name": "gets", "timeout": "2s",
                       "matches": [{"method": "GET", "path": {"value": "/api"},
                                    "headers": [{"name": "X-Canary", "value": "yes"}]}],
                       "retries": {"attempts": 3, "perTryTimeout": "500ms"}}]
        }),
    )];
    let rendered = render(&inputs);
    let names: Vec<&str> = rendered
        .services()
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    // No backends: the target alone, beside server-v1, rendered for its meshed endpoint.
    assert_eq!(names, ["server", "server-v1"]);
    let server = &rendered.services()[0];
    assert_eq!(server.load_balancer, LoadBalancer::RoundRobin);
    assert_eq!(
        server.retry_budget,
        Some(tandem_crds::v1alpha1::default_retry_budget())
    );
    let route = &server.routes[0];
    assert_eq!(route.name, "gets");
    assert!(
        route.backends.is_empty(),
        "empty backends mean the target itself"
    );
    assert_eq!(route.timeout_ms, Some(2000));
    assert_eq!(route.retries.as_ref().map(|r| r.attempts), Some(3));
    assert_eq!(route.matches[0].headers[0].name, "x-canary");
}

#[test]
fn a_policy_without_retries_has_no_budget() {
    let rendered = render(&shop());
    assert_eq!(rendered.services()[0].retry_budget, None);
}

#[test]
fn a_missing_target_is_reported_and_renders_nothing() {
    let mut inputs = shop();
    inputs
        .services
        .retain(|s| s.metadata.name.as_deref() != Some("server"));
    let rendered = render(&inputs);
    assert!(
        rendered.services().iter().all(|s| s.routes.is_empty()),
        "only the meshed services, unrouted: {:?}",
        rendered.services()
    );
    match rendered
        .verdicts
        .get(&key(PolicyKind::Traffic, "shop", "canary"))
    {
        Some(Verdict::Rejected { reason: r, message }) => {
            assert_eq!(*r, reason::TARGET_NOT_FOUND);
            assert!(message.contains("shop/server"), "{message}");
        }
        other => panic!("unexpected verdict {other:?}"),
    }
}

#[test]
fn a_missing_backend_is_target_not_found() {
    let mut inputs = shop();
    inputs
        .services
        .retain(|s| s.metadata.name.as_deref() != Some("server-v2"));
    let rendered = render(&inputs);
    match rendered
        .verdicts
        .get(&key(PolicyKind::Traffic, "shop", "canary"))
    {
        Some(Verdict::Rejected { reason: r, message }) => {
            assert_eq!(*r, reason::TARGET_NOT_FOUND);
            assert!(message.contains("server-v2"), "{message}");
        }
        other => panic!("unexpected verdict {other:?}"),
    }
}

#[test]
fn a_backend_port_the_service_lacks_is_invalid_and_other_policies_still_render() {
    let mut inputs = shop();
    inputs
        .services
        .push(service("shop", "api", "10.96.0.20", &[("grpc", 9000)]));
    inputs.traffic_policies.push(traffic(
        "shop",
        "bad-port",
        5,
        serde_json::json!({
            "targetRef": {"name": "api"},
            "rules": [{"backends": [{"name": "server-v1", "port": 81}]}]
        }),
    ));
    let rendered = render(&inputs);
    match rendered
        .verdicts
        .get(&key(PolicyKind::Traffic, "shop", "bad-port"))
    {
        Some(Verdict::Rejected { reason: r, message }) => {
            assert_eq!(*r, reason::INVALID);
            assert!(message.contains("rules[0].backends[0].port"), "{message}");
        }
        other => panic!("unexpected verdict {other:?}"),
    }
    assert_eq!(
        rendered
            .verdicts
            .get(&key(PolicyKind::Traffic, "shop", "canary")),
        Some(&Verdict::Accepted)
    );
    assert!(!rendered.services().iter().any(|s| s.name == "api"));
}

#[test]
fn an_invalid_regex_is_invalid() {
    let mut inputs = shop();
    inputs.traffic_policies = vec![traffic(
        "shop",
        "regex",
        0,
        serde_json::json!({
            "targetRef": {"name": "server"},
            "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/a(("}}]}]
        }),
    )];
    let rendered = render(&inputs);
    assert!(matches!(
        rendered.verdicts.get(&key(PolicyKind::Traffic, "shop", "regex")),
        Some(Verdict::Rejected { reason: r, .. }) if *r == reason::INVALID
    ));
    assert!(
        rendered.services().iter().all(|s| s.routes.is_empty()),
        "only the meshed services, unrouted: {:?}",
        rendered.services()
    );
}

#[test]
fn a_bad_duration_the_schema_missed_is_invalid() {
    let mut inputs = shop();
    inputs.traffic_policies = vec![traffic(
        "shop",
        "slow",
        0,
        serde_json::json!({
            "targetRef": {"name": "server"},
            "rules": [{"timeout": "forever"}]
        }),
    )];
    let rendered = render(&inputs);
    match rendered
        .verdicts
        .get(&key(PolicyKind::Traffic, "shop", "slow"))
    {
        Some(Verdict::Rejected { reason: r, message }) => {
            assert_eq!(*r, reason::INVALID);
            assert!(message.contains("rules[0].timeout"), "{message}");
        }
        other => panic!("unexpected verdict {other:?}"),
    }
}

#[test]
fn the_older_of_two_policies_on_one_service_wins() {
    let mut inputs = shop();
    inputs.traffic_policies.push(traffic(
        "shop",
        "a-newer",
        60,
        serde_json::json!({"targetRef": {"name": "server"}, "loadBalancer": "LeastRequest"}),
    ));
    let rendered = render(&inputs);
    assert_eq!(
        rendered
            .verdicts
            .get(&key(PolicyKind::Traffic, "shop", "canary")),
        Some(&Verdict::Accepted)
    );
    match rendered
        .verdicts
        .get(&key(PolicyKind::Traffic, "shop", "a-newer"))
    {
        Some(Verdict::Rejected { reason: r, message }) => {
            assert_eq!(*r, reason::CONFLICTED);
            assert!(message.contains("shop/canary"), "{message}");
        }
        other => panic!("unexpected verdict {other:?}"),
    }
    assert_eq!(rendered.services()[0].load_balancer, LoadBalancer::PeakEwma);
}

#[test]
fn equal_creation_times_are_broken_by_name() {
    let mut inputs = shop();
    inputs.traffic_policies.push(traffic(
        "shop",
        "b-same-age",
        0,
        serde_json::json!({"targetRef": {"name": "server"}}),
    ));
    inputs.traffic_policies.push(traffic(
        "shop",
        "a-same-age",
        0,
        serde_json::json!({"targetRef": {"name": "server"}}),
    ));
    let rendered = render(&inputs);
    assert_eq!(
        rendered
            .verdicts
            .get(&key(PolicyKind::Traffic, "shop", "a-same-age")),
        Some(&Verdict::Accepted)
    );
    assert!(!rendered.verdicts[&key(PolicyKind::Traffic, "shop", "canary")].is_accepted());
}

#[test]
fn policies_of_different_kinds_on_one_service_do_not_conflict() {
    let mut inputs = shop();
    inputs.circuit_breaker_policies = vec![breaker(
        "shop",
        "protect",
        10,
        serde_json::json!({
            "targetRef": {"name": "server"},
            "connectionPool": {"maxConnections": 10},
            "outlierDetection": {"consecutive5xxErrors": 3, "baseEjectionTime": "10s"}
        }),
    )];
    let rendered = render(&inputs);
    assert!(rendered.verdicts.values().all(Verdict::is_accepted));
    let server = &rendered.services()[0];
    let breaker = server
        .circuit_breaker
        .as_ref()
        .unwrap_or_else(|| panic!("no breaker"));
    assert_eq!(
        breaker
            .connection_pool
            .as_ref()
            .map(|p| (p.max_connections, p.max_pending_requests)),
        Some((10, 1024))
    );
    assert_eq!(
        breaker
            .outlier_detection
            .as_ref()
            .map(|o| o.base_ejection_time_ms),
        Some(10_000)
    );
    assert_eq!(server.routes.len(), 1, "the TrafficPolicy's routes stay");
}

#[test]
fn a_circuit_breaker_alone_governs_its_service() {
    let inputs = Inputs {
        circuit_breaker_policies: vec![breaker(
            "shop",
            "protect",
            0,
            serde_json::json!({"targetRef": {"name": "unrelated"}, "connectionPool": {}}),
        )],
        ..shop()
    };
    let rendered = render(&Inputs {
        traffic_policies: Vec::new(),
        ..inputs
    });
    let names: Vec<&str> = rendered
        .services()
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    // unrelated for its breaker, server-v1 for its meshed endpoint.
    assert_eq!(names, ["server-v1", "unrelated"]);
    assert!(rendered.services().iter().all(|s| s.routes.is_empty()));
    assert!(rendered.services()[1].circuit_breaker.is_some());
}

#[test]
fn a_circuit_breaker_with_impossible_ejection_times_is_invalid() {
    let inputs = Inputs {
        circuit_breaker_policies: vec![breaker(
            "shop",
            "protect",
            0,
            serde_json::json!({"targetRef": {"name": "server"},
                               "outlierDetection": {"interval": "soon"}}),
        )],
        ..shop()
    };
    let rendered = render(&inputs);
    assert!(matches!(
        rendered.verdicts.get(&key(PolicyKind::CircuitBreaker, "shop", "protect")),
        Some(Verdict::Rejected { reason: r, .. }) if *r == reason::INVALID
    ));
    assert!(rendered.services()[0].circuit_breaker.is_none());
}

#[test]
fn policies_target_services_in_their_own_namespace_only() {
    let mut inputs = shop();
    inputs.traffic_policies = vec![traffic(
        "other",
        "canary",
        0,
        serde_json::json!({"targetRef": {"name": "server"}}),
    )];
    let rendered = render(&inputs);
    assert!(matches!(
        rendered.verdicts.get(&key(PolicyKind::Traffic, "other", "canary")),
        Some(Verdict::Rejected { reason: r, .. }) if *r == reason::TARGET_NOT_FOUND
    ));
}

#[test]
fn workloads_are_the_service_accounts_of_injected_running_pods() {
    let mut pods = shop().pods;
    let mut finished = (*pod("shop", "job-1", "batch", true)).clone();
    finished.status = Some(PodStatus {
        phase: Some("Succeeded".into()),
        ..PodStatus::default()
    });
    pods.push(Arc::new(finished));
    let mut no_sa = (*pod("web", "w-1", "", true)).clone();
    if let Some(spec) = no_sa.spec.as_mut() {
        spec.service_account_name = None;
    }
    pods.push(Arc::new(no_sa));
    let names: Vec<(String, String)> = workloads(&pods)
        .into_iter()
        .map(|w| (w.namespace, w.service_account))
        .collect();
    assert_eq!(
        names,
        [
            ("shop".to_owned(), "client".to_owned()),
            ("shop".to_owned(), "server".to_owned()),
            ("web".to_owned(), "default".to_owned())
        ]
    );
}

#[test]
fn named_target_ports_resolve_through_the_slice_port_of_the_same_name() {
    let mut inputs = shop();
    inputs.services = vec![
        service(
            "shop",
            "server",
            "10.96.0.10",
            &[("http", 80), ("grpc", 9000)],
        ),
        service("shop", "server-v1", "10.96.0.11", &[("http", 80)]),
        service("shop", "server-v2", "10.96.0.12", &[("http", 80)]),
    ];
    inputs.endpoint_slices.push(slice(
        "shop",
        "server",
        "server-x",
        &[("grpc", 50051), ("http", 8080)],
        &[("10.244.0.9", Some(true), "")],
    ));
    let rendered = render(&inputs);
    let server = &rendered.services()[0];
    let by_port: Vec<(u16, String)> = server
        .ports
        .iter()
        .map(|p| (p.port, p.endpoints[0].address.to_string()))
        .collect();
    assert_eq!(
        by_port,
        [
            (80, "10.244.0.9:8080".to_owned()),
            (9000, "10.244.0.9:50051".to_owned())
        ]
    );
    assert_eq!(server.ports[1].protocol, Protocol::Grpc);
}

#[test]
fn a_thousand_endpoints_fit_well_under_the_configmap_limit() {
    let mut inputs = shop();
    let endpoints: Vec<(String, Option<bool>, &str)> = (0..1000)
        .map(|i| {
            (
                format!("10.244.{}.{}", i / 250, i % 250 + 1),
                Some(true),
                "",
            )
        })
        .collect();
    let refs: Vec<(&str, Option<bool>, &str)> = endpoints
        .iter()
        .map(|(a, r, p)| (a.as_str(), *r, *p))
        .collect();
    inputs.endpoint_slices = vec![slice("shop", "server-v1", "big", &[("http", 8080)], &refs)];
    let json = document(&render(&inputs).config_for("shop", "client"));
    assert!(json.len() < MAX_CONFIG_MAP_BYTES, "{} bytes", json.len());
}

// ---------------------------------------------------------------------------------------------
// Status

fn condition<'a>(status: &'a PolicyStatus, type_: &str) -> &'a tandem_crds::v1alpha1::Condition {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition"))
}

#[test]
fn an_accepted_programmed_policy_reports_both_conditions_and_the_generation() {
    let (status, transitions) = next_status(
        None,
        Some(4),
        &Verdict::Accepted,
        &Programming::Done {
            config_maps: 3,
            proxies: None,
        },
        "2026-01-01T00:00:00Z",
    );
    assert_eq!(status.observed_generation, Some(4));
    let accepted = condition(&status, "Accepted");
    assert_eq!(accepted.status, ConditionStatus::True);
    assert_eq!(accepted.reason, reason::ACCEPTED);
    assert_eq!(accepted.observed_generation, Some(4));
    let programmed = condition(&status, "Programmed");
    assert_eq!(programmed.status, ConditionStatus::True);
    assert!(programmed.message.contains('3'));
    assert_eq!(transitions.len(), 2);
}

#[test]
fn recomputing_an_unchanged_status_gives_an_equal_value_and_no_transition() {
    let verdict = Verdict::Accepted;
    let done = Programming::Done {
        config_maps: 1,
        proxies: None,
    };
    let (first, _) = next_status(None, Some(1), &verdict, &done, "2026-01-01T00:00:00Z");
    let (second, transitions) = next_status(
        Some(&first),
        Some(1),
        &verdict,
        &done,
        "2026-01-02T00:00:00Z",
    );
    assert_eq!(first, second);
    assert!(transitions.is_empty());
}

#[test]
fn a_new_generation_updates_observed_generation_but_keeps_transition_times() {
    let done = Programming::Done {
        config_maps: 1,
        proxies: None,
    };
    let (first, _) = next_status(
        None,
        Some(1),
        &Verdict::Accepted,
        &done,
        "2026-01-01T00:00:00Z",
    );
    let (second, transitions) = next_status(
        Some(&first),
        Some(2),
        &Verdict::Accepted,
        &done,
        "2026-01-02T00:00:00Z",
    );
    assert_eq!(second.observed_generation, Some(2));
    assert_eq!(
        condition(&second, "Accepted").last_transition_time,
        "2026-01-01T00:00:00Z"
    );
    assert!(transitions.is_empty());
}

#[test]
fn a_rejection_is_a_transition_with_its_reason_and_not_programmed() {
    let done = Programming::Done {
        config_maps: 1,
        proxies: None,
    };
    let (first, _) = next_status(
        None,
        Some(1),
        &Verdict::Accepted,
        &done,
        "2026-01-01T00:00:00Z",
    );
    let rejected = Verdict::Rejected {
        reason: reason::CONFLICTED,
        message: "older wins".into(),
    };
    let (second, transitions) = next_status(
        Some(&first),
        Some(2),
        &rejected,
        &done,
        "2026-01-02T00:00:00Z",
    );
    let accepted = condition(&second, "Accepted");
    assert_eq!(accepted.status, ConditionStatus::False);
    assert_eq!(accepted.reason, reason::CONFLICTED);
    assert_eq!(accepted.last_transition_time, "2026-01-02T00:00:00Z");
    assert_eq!(
        condition(&second, "Programmed").status,
        ConditionStatus::False
    );
    assert_eq!(transitions.len(), 2);
    assert!(transitions.iter().all(|t| !t.holds));
}

#[test]
fn a_config_over_the_limit_is_reported_as_too_large() {
    let (status, _) = next_status(
        None,
        Some(1),
        &Verdict::Accepted,
        &Programming::TooLarge("1200000 bytes".into()),
        "2026-01-01T00:00:00Z",
    );
    let programmed = condition(&status, "Programmed");
    assert_eq!(programmed.status, ConditionStatus::False);
    assert_eq!(programmed.reason, reason::TOO_LARGE);
    assert_eq!(condition(&status, "Accepted").status, ConditionStatus::True);
}

#[test]
fn failed_writes_leave_the_policy_pending() {
    let (status, _) = next_status(
        None,
        Some(1),
        &Verdict::Accepted,
        &Programming::Pending("1 of 2".into()),
        "2026-01-01T00:00:00Z",
    );
    assert_eq!(condition(&status, "Programmed").reason, reason::PENDING);
}

// ---------------------------------------------------------------------------------------------
// Identity and mTLS modes

pub(crate) fn annotated<K>(
    namespace: Option<&str>,
    name: &str,
    mode: Option<&str>,
) -> Arc<PartialObjectMeta<K>> {
    let mut metadata = ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(str::to_owned),
        ..ObjectMeta::default()
    };
    if let Some(mode) = mode {
        metadata.annotations = Some(
            [(MTLS_MODE_ANNOTATION.to_owned(), mode.to_owned())]
                .into_iter()
                .collect(),
        );
    }
    Arc::new(PartialObjectMeta {
        types: None,
        metadata,
        _phantom: std::marker::PhantomData,
    })
}

fn endpoints_of(rendered: &crate::Rendered, service: &str) -> Vec<(String, bool, Option<String>)> {
    rendered
        .services()
        .iter()
        .filter(|s| s.name == service)
        .flat_map(|s| &s.ports)
        .flat_map(|p| &p.endpoints)
        .map(|e| (e.address.to_string(), e.meshed, e.identity.clone()))
        .collect()
}

#[test]
fn a_meshed_endpoint_carries_its_pods_service_account_identity_and_others_none() {
    let mut inputs = shop();
    inputs.mesh.trust_domain = "example.org".into();
    let rendered = render(&inputs);
    assert_eq!(
        endpoints_of(&rendered, "server-v1"),
        [
            ("10.244.0.4:8080".to_owned(), false, None),
            (
                "10.244.0.5:8080".to_owned(),
                true,
                Some("spiffe://example.org/ns/shop/sa/server".to_owned())
            ),
        ]
    );
    // The proxy accepts what the operator writes.
    let config = rendered.config_for("shop", "client");
    let parsed = tandem_crds::contract::ProxyConfig::from_json(document(&config).as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed, config);
}

#[test]
fn an_endpoint_carries_its_pods_workload_as_istio_derives_it() {
    let mut inputs = shop();
    // v1-a belongs to ReplicaSet server-v1-5c9d (Deployment server-v1); v1-b to no controller.
    if let Some(v1_a) = inputs
        .pods
        .iter_mut()
        .find(|p| p.metadata.name.as_deref() == Some("v1-a"))
    {
        let pod = Arc::make_mut(v1_a);
        pod.metadata.labels = Some(
            [("pod-template-hash".to_owned(), "5c9d".to_owned())]
                .into_iter()
                .collect(),
        );
        pod.metadata.owner_references = Some(vec![
            k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "apps/v1".into(),
                kind: "ReplicaSet".into(),
                name: "server-v1-5c9d".into(),
                uid: "u".into(),
                controller: Some(true),
                ..Default::default()
            },
        ]);
    }
    let rendered = render(&inputs);
    let workloads: Vec<(String, Option<EndpointWorkload>)> = rendered
        .services()
        .iter()
        .filter(|s| s.name == "server-v1")
        .flat_map(|s| &s.ports)
        .flat_map(|p| &p.endpoints)
        .map(|e| (e.address.to_string(), e.workload.clone()))
        .collect();
    let workload = |name: &str| {
        Some(EndpointWorkload {
            name: name.into(),
            namespace: "shop".into(),
        })
    };
    assert_eq!(
        workloads,
        [
            ("10.244.0.4:8080".to_owned(), workload("v1-b")),
            ("10.244.0.5:8080".to_owned(), workload("server-v1")),
        ]
    );
    // The proxy accepts it.
    let config = rendered.config_for("shop", "client");
    let parsed = tandem_crds::contract::ProxyConfig::from_json(document(&config).as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed, config);
}

#[test]
fn the_mesh_telemetry_is_in_every_config_and_in_its_hash() {
    let plain = render(&shop());
    let mut inputs = shop();
    inputs.mesh.telemetry = Telemetry {
        metrics_prefix: MetricsPrefix::Istio,
        tracing: Some(Tracing {
            collector: "http://collector:4318".into(),
            sampling_percent: 5.0,
        }),
    };
    let traced = render(&inputs);
    for (namespace, service_account) in [("shop", "client"), ("shop", "server")] {
        let config = traced.config_for(namespace, service_account);
        assert_eq!(config.telemetry, inputs.mesh.telemetry);
        let parsed = tandem_crds::contract::ProxyConfig::from_json(document(&config).as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parsed.telemetry, inputs.mesh.telemetry);
        // A changed setting is a changed version, so proxies take it.
        assert_ne!(
            config.version,
            plain.config_for(namespace, service_account).version
        );
    }
    // The default is left out of the JSON, for proxies older than the field.
    assert!(!document(&plain.config_for("shop", "client")).contains("telemetry"));
}

#[test]
fn a_service_with_meshed_endpoints_is_rendered_without_a_policy_and_an_unmeshed_one_is_not() {
    let mut inputs = shop();
    inputs.traffic_policies.clear();
    inputs.endpoint_slices.push(slice(
        "shop",
        "unrelated",
        "unrelated-abc",
        &[("http", 8080)],
        &[("10.244.0.9", Some(true), "stranger")],
    ));
    let rendered = render(&inputs);
    let names: Vec<&str> = rendered
        .services()
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    // server-v1 has a meshed endpoint (pod v1-a is injected); server-v2's pods are not known
    // as injected, unrelated's pod is not injected, and server has no endpoints at all.
    assert_eq!(names, ["server-v1"]);
    let v1 = &rendered.services()[0];
    assert!(v1.routes.is_empty(), "no policy, no routes: {v1:?}");
    assert_eq!(
        endpoints_of(&rendered, "server-v1")[1].2.as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/server")
    );
}

#[test]
fn the_mtls_mode_comes_from_the_service_account_then_the_namespace_then_the_flag() {
    let mut inputs = shop();
    inputs.pods.push(pod("shop", "db-1", "db", true));
    inputs.pods.push(pod("other", "x-1", "x", true));
    inputs.namespaces = vec![
        annotated(None, "shop", Some("strict")),
        annotated(None, "other", None),
    ];
    inputs.service_accounts = vec![
        annotated(Some("shop"), "client", Some("Permissive")),
        annotated(Some("shop"), "db", None),
    ];
    inputs.mesh.default_mtls = MtlsMode::Permissive;
    let rendered = render(&inputs);
    let mode = |ns: &str, sa: &str| rendered.config_for(ns, sa).workload.mtls;
    assert_eq!(
        mode("shop", "client"),
        MtlsMode::Permissive,
        "its own annotation"
    );
    assert_eq!(mode("shop", "db"), MtlsMode::Strict, "its namespace's");
    assert_eq!(mode("other", "x"), MtlsMode::Permissive, "the flag");
    assert!(rendered.bad_annotations.is_empty());

    inputs.mesh.default_mtls = MtlsMode::Strict;
    assert_eq!(
        render(&inputs).config_for("other", "x").workload.mtls,
        MtlsMode::Strict
    );
}

#[test]
fn an_invalid_mtls_annotation_is_ignored_for_the_next_level_and_reported() {
    let mut inputs = shop();
    inputs.namespaces = vec![annotated(None, "shop", Some("strict"))];
    inputs.service_accounts = vec![annotated(Some("shop"), "client", Some("on"))];
    let rendered = render(&inputs);
    assert_eq!(
        rendered.config_for("shop", "client").workload.mtls,
        MtlsMode::Strict
    );
    assert_eq!(
        rendered.bad_annotations,
        [BadAnnotation {
            annotation: MTLS_MODE_ANNOTATION,
            kind: "ServiceAccount",
            namespace: "shop".into(),
            name: "client".into(),
            value: "on".into(),
        }]
    );
    assert!(rendered.bad_annotations[0].message().contains("\"on\""));
}

#[test]
fn trust_roots_go_to_namespaces_with_running_injected_pods_only() {
    let mut inputs = shop();
    inputs.pods.push(pod("plain", "p-1", "p", false));
    let mut finished = (*pod("done", "d-1", "d", true)).clone();
    finished.status.as_mut().unwrap().phase = Some("Succeeded".into());
    inputs.pods.push(Arc::new(finished));
    assert_eq!(
        trust_namespaces(&inputs.pods)
            .into_iter()
            .collect::<Vec<_>>(),
        ["shop"]
    );
}

// ---------------------------------------------------------------------------------------------
// Scoped configs

use std::collections::BTreeSet;

use tandem_crds::contract::{ServiceRef, generation_of};
use tandem_crds::names::DEPENDENCIES_ANNOTATION;

use crate::index::{Change, Index};
use crate::render::WorkloadKey;

fn depending(pod: Arc<Pod>, dependencies: &str) -> Arc<Pod> {
    let mut pod = (*pod).clone();
    pod.metadata.annotations = Some(
        [(DEPENDENCIES_ANNOTATION.to_owned(), dependencies.to_owned())]
            .into_iter()
            .collect(),
    );
    Arc::new(pod)
}

fn workload(namespace: &str, service_account: &str) -> WorkloadKey {
    WorkloadKey {
        namespace: namespace.into(),
        service_account: service_account.into(),
    }
}

fn service_key(namespace: &str, name: &str) -> ServiceRef {
    ServiceRef {
        name: name.into(),
        namespace: namespace.into(),
    }
}

fn names_in(config: &tandem_crds::contract::ProxyConfig) -> Vec<String> {
    config
        .services
        .iter()
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .collect()
}

/// The shop, with a `billing` namespace of two Services, and `client` naming `deps`.
fn scoped_shop(deps: &str) -> Inputs {
    let mut inputs = shop();
    inputs
        .services
        .push(service("billing", "invoices", "10.96.1.1", &[("http", 80)]));
    inputs
        .services
        .push(service("billing", "ledger", "10.96.1.2", &[("http", 80)]));
    inputs.pods[0] = depending(pod("shop", "client-1", "client", true), deps);
    inputs
}

#[test]
fn a_config_holds_only_the_services_its_pods_name_and_their_backends() {
    let rendered = render(&scoped_shop("server"));
    let config = rendered.config_for("shop", "client");
    // The canary's backends come with its target; unrelated and billing do not.
    assert_eq!(
        names_in(&config),
        ["shop/server", "shop/server-v1", "shop/server-v2"]
    );
    assert_eq!(config.services[0].routes.len(), 1);
    // A workload naming nothing gets its inbound side only.
    assert!(rendered.config_for("shop", "server").services.is_empty());
}

#[test]
fn a_namespace_wildcard_names_every_service_of_the_namespace() {
    let rendered = render(&scoped_shop("billing/*, unrelated"));
    assert_eq!(
        names_in(&rendered.config_for("shop", "client")),
        ["billing/invoices", "billing/ledger", "shop/unrelated"],
        "unrelated has no policy and no meshed endpoint, and is included anyway"
    );
}

#[test]
fn learned_services_are_in_the_view_and_missing_ones_are_left_out() {
    let rendered = render(&scoped_shop(""));
    let learned = BTreeSet::from([
        service_key("billing", "ledger"),
        service_key("billing", "gone"),
        service_key("shop", "server-v1"),
    ]);
    let scope = rendered.scope_of(&workload("shop", "client"), &learned);
    assert_eq!(
        scope.view,
        BTreeSet::from([
            service_key("billing", "ledger"),
            service_key("shop", "server-v1")
        ])
    );
}

#[test]
fn dependencies_unite_over_the_pods_of_a_service_account_and_bad_entries_are_reported_once() {
    let mut inputs = scoped_shop("server");
    inputs.pods.push(depending(
        pod("shop", "client-2", "client", true),
        "billing/ledger Bad/x",
    ));
    inputs
        .pods
        .push(depending(pod("shop", "client-3", "client", true), "Bad/x"));
    let rendered = render(&inputs);
    assert_eq!(
        names_in(&rendered.config_for("shop", "client")),
        [
            "billing/ledger",
            "shop/server",
            "shop/server-v1",
            "shop/server-v2"
        ]
    );
    let bad: Vec<&BadAnnotation> = rendered
        .bad_annotations
        .iter()
        .filter(|b| b.annotation == DEPENDENCIES_ANNOTATION)
        .collect();
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert_eq!(
        (bad[0].kind, bad[0].name.as_str()),
        ("ServiceAccount", "client")
    );
    assert!(bad[0].message().contains("Bad/x"), "{}", bad[0].message());
    assert_eq!(bad[0].reason(), "InvalidDependencies");
}

#[test]
fn scoped_configs_are_byte_identical_for_equal_inputs_and_valid() {
    let a = document(&render(&scoped_shop("billing/*,server")).config_for("shop", "client"));
    let mut reordered = scoped_shop("server billing/*");
    reordered.services.reverse();
    reordered.endpoint_slices.reverse();
    let b = document(&render(&reordered).config_for("shop", "client"));
    assert_eq!(a, b);
    let parsed = tandem_crds::contract::ProxyConfig::from_json(a.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed.services.len(), 5);
}

// ---------------------------------------------------------------------------------------------
// The index across passes

/// Shop with three workloads: `client` depends on the canary, `billing` on billing's
/// Services, `server` on nothing.
fn three_workloads() -> (Inputs, Vec<WorkloadKey>) {
    let mut inputs = scoped_shop("server");
    inputs.pods.push(depending(
        pod("shop", "billing-1", "billing", true),
        "billing/*",
    ));
    let wanted = vec![
        workload("shop", "billing"),
        workload("shop", "client"),
        workload("shop", "server"),
    ];
    (inputs, wanted)
}

fn update(
    index: &mut Index,
    inputs: &Inputs,
    wanted: &[WorkloadKey],
    now_ms: u64,
) -> Vec<(String, Change)> {
    let (updates, _) = index.update(
        &Arc::new(render(inputs)),
        wanted,
        |_| BTreeSet::new(),
        |_| None,
        now_ms,
        MAX_CONFIG_MAP_BYTES,
    );
    updates
        .into_iter()
        .map(|u| (u.workload.service_account, u.change))
        .collect()
}

#[test]
fn a_pass_renders_only_the_workloads_whose_dependencies_changed() {
    let (mut inputs, wanted) = three_workloads();
    let mut index = Index::default();
    assert_eq!(
        update(&mut index, &inputs, &wanted, 1000).len(),
        3,
        "first pass: all"
    );
    assert!(
        update(&mut index, &inputs, &wanted, 2000).is_empty(),
        "nothing changed"
    );

    // New endpoints behind billing/ledger: only `billing` depends on it.
    inputs.endpoint_slices.push(slice(
        "billing",
        "ledger",
        "ledger-abc",
        &[("http", 8080)],
        &[("10.244.3.3", Some(true), "")],
    ));
    assert_eq!(
        update(&mut index, &inputs, &wanted, 3000),
        [("billing".to_owned(), Change::Endpoints)]
    );

    // A policy change on the canary: only `client`, as a policy change.
    inputs.traffic_policies = vec![even_canary()];
    assert_eq!(
        update(&mut index, &inputs, &wanted, 4000),
        [("client".to_owned(), Change::Policy)]
    );
    let dependents: Vec<&WorkloadKey> = index
        .dependents(&service_key("shop", "server-v2"))
        .collect();
    assert_eq!(dependents, [&workload("shop", "client")]);
}

#[test]
fn versions_keep_their_generation_for_equal_content_and_grow_strictly_otherwise() {
    let (mut inputs, wanted) = three_workloads();
    let mut index = Index::default();
    update(&mut index, &inputs, &wanted, 5000);
    let client = workload("shop", "client");
    let first = index.entry(&client).unwrap().version.clone();
    assert_eq!(generation_of(&first), 5000);

    // A clock that went backwards still gives a later generation.
    inputs.pods[0] = depending(pod("shop", "client-1", "client", true), "server unrelated");
    update(&mut index, &inputs, &wanted, 10);
    let second = index.entry(&client).unwrap().version.clone();
    assert_eq!(generation_of(&second), 5001);

    // After a restart, the ConfigMap's version is reused when the content is the same.
    let mut fresh = Index::default();
    let (updates, _) = fresh.update(
        &Arc::new(render(&inputs)),
        &wanted,
        |_| BTreeSet::new(),
        |w| (w == &client).then(|| second.clone()),
        99_999,
        MAX_CONFIG_MAP_BYTES,
    );
    let restarted = updates.iter().find(|u| u.workload == client).unwrap();
    assert_eq!(restarted.config.as_ref().unwrap().version, second);
    assert_eq!(
        restarted.change,
        Change::Policy,
        "a new index writes (hash-gated)"
    );
}

#[test]
fn a_policy_change_stays_due_until_written_even_if_endpoints_change_after_it() {
    let (mut inputs, wanted) = three_workloads();
    let mut index = Index::default();
    update(&mut index, &inputs, &wanted, 1000);
    for (workload, _) in index.due() {
        let version = index.entry(&workload).unwrap().version.clone();
        index.written(&workload, &version);
    }
    assert!(index.due().is_empty());
    inputs.pods[0] = depending(
        pod("shop", "client-1", "client", true),
        "server billing/ledger",
    );
    update(&mut index, &inputs, &wanted, 2000);
    inputs.endpoint_slices.push(slice(
        "billing",
        "ledger",
        "ledger-abc",
        &[("http", 8080)],
        &[("10.244.3.3", Some(true), "")],
    ));
    update(&mut index, &inputs, &wanted, 3000);
    let due: Vec<(String, Change)> = index
        .due()
        .into_iter()
        .map(|(w, c)| (w.service_account, c))
        .collect();
    assert_eq!(
        due,
        [
            ("billing".to_owned(), Change::Endpoints),
            ("client".to_owned(), Change::Policy)
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Refusal and proxy counts

#[test]
fn a_too_large_workload_is_refused_alone_and_named_on_the_policies_it_needs() {
    let (mut inputs, wanted) = three_workloads();
    inputs.traffic_policies.push(traffic(
        "billing",
        "ledger-timeout",
        0,
        serde_json::json!({"targetRef": {"name": "ledger"}, "rules": [{"timeout": "1s"}]}),
    ));
    let mut index = Index::default();
    update(&mut index, &inputs, &wanted, 1000);
    index.refuse(&workload("shop", "billing"), 2_000_000);
    assert!(
        index
            .due()
            .iter()
            .all(|(w, _)| w.service_account != "billing"),
        "a refused config is not due"
    );
    let canary = key(PolicyKind::Traffic, "shop", "canary");
    let ledger = key(PolicyKind::Traffic, "billing", "ledger-timeout");
    let counts = |_: &WorkloadKey, _: u64| (0, 1);
    match crate::controller::programming_of(&ledger, &index, 0, counts) {
        Programming::TooLarge(message) => {
            assert!(message.contains("shop/billing"), "{message}");
            assert!(message.contains("2000000 bytes"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        crate::controller::programming_of(&canary, &index, 0, counts),
        Programming::Done {
            config_maps: 1,
            proxies: Some((0, 1))
        },
        "a policy the refused workload does not need is unaffected"
    );
}

#[test]
fn proxies_count_against_the_first_config_generation_carrying_the_policys_generation() {
    let (mut inputs, wanted) = three_workloads();
    let mut index = Index::default();
    update(&mut index, &inputs, &wanted, 1000);
    let canary = key(PolicyKind::Traffic, "shop", "canary");
    let client = workload("shop", "client");
    assert_eq!(index.carriers(&canary), [(&client, 1000)]);

    // Unrelated changes to client's config later do not move the bar.
    inputs.pods[0] = depending(pod("shop", "client-1", "client", true), "server unrelated");
    update(&mut index, &inputs, &wanted, 2000);
    assert_eq!(index.carriers(&canary), [(&client, 1000)]);

    // A new policy generation does: proxies must run the config that carries it.
    let mut changed = (*inputs.traffic_policies[0]).clone();
    changed.metadata.generation = Some(2);
    changed.spec.rules[0].backends[0].weight = 50;
    inputs.traffic_policies = vec![Arc::new(changed)];
    update(&mut index, &inputs, &wanted, 3000);
    assert_eq!(index.carriers(&canary), [(&client, 3000)]);

    // Two of three pods run it: 2/3 in status and in the message.
    let programming = crate::controller::programming_of(&canary, &index, 0, |w, generation| {
        assert_eq!((w, generation), (&client, 3000));
        (2, 3)
    });
    let (status, _) = next_status(
        None,
        Some(2),
        &Verdict::Accepted,
        &programming,
        "2026-01-01T00:00:00Z",
    );
    assert_eq!(status.proxies.as_deref(), Some("2/3"));
    assert!(
        condition(&status, "Programmed")
            .message
            .contains("2/3 proxies run it"),
        "{:?}",
        condition(&status, "Programmed").message
    );
}

// ---------------------------------------------------------------------------------------------
// Debounce

mod debounce {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::sync::Notify;
    use tokio::time::Instant;

    use crate::controller::{Debounce, settle};

    const DEBOUNCE: Debounce = Debounce {
        quiet: Duration::from_millis(100),
        ceiling: Duration::from_secs(10),
    };

    #[tokio::test(start_paused = true)]
    async fn a_single_event_settles_after_the_quiet_time() {
        let trigger = Arc::new(Notify::new());
        let first = Instant::now();
        settle(trigger, first, DEBOUNCE).await;
        assert_eq!(first.elapsed(), Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn events_keep_extending_the_wait_until_the_ceiling() {
        let trigger = Arc::new(Notify::new());
        let feeder = trigger.clone();
        let events = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                feeder.notify_one();
            }
        });
        let first = Instant::now();
        settle(trigger, first, DEBOUNCE).await;
        assert_eq!(first.elapsed(), Duration::from_secs(10));
        events.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_that_stops_settles_a_quiet_time_after_its_last_event() {
        let trigger = Arc::new(Notify::new());
        let feeder = trigger.clone();
        tokio::spawn(async move {
            for _ in 0..5 {
                tokio::time::sleep(Duration::from_millis(60)).await;
                feeder.notify_one();
            }
        });
        let first = Instant::now();
        settle(trigger, first, DEBOUNCE).await;
        assert_eq!(first.elapsed(), Duration::from_millis(400));
    }
}

// ---------------------------------------------------------------------------------------------
// Incremental passes: reusing the last catalog and scoping only touched workloads changes no
// result

/// Gives every Service and EndpointSlice a `resourceVersion`, as the apiserver does, so that
/// a pass may reuse their catalog entries.
fn versioned(mut inputs: Inputs) -> Inputs {
    for service in &mut inputs.services {
        Arc::make_mut(service).metadata.resource_version = Some("1".into());
    }
    for slice in &mut inputs.endpoint_slices {
        Arc::make_mut(slice).metadata.resource_version = Some("1".into());
    }
    inputs
}

/// Two reconcilers side by side: one renders from scratch and scopes every workload, the
/// other reuses its last rendering. After each change both must hold the same configs.
struct SideBySide {
    fresh: Index,
    incremental: Index,
    last: Option<Arc<crate::Rendered>>,
    now_ms: u64,
}

impl SideBySide {
    fn pass(&mut self, inputs: &Inputs, wanted: &[WorkloadKey], step: &str) -> (usize, usize) {
        self.now_ms += 1000;
        let fresh = Arc::new(render(inputs));
        let incremental = Arc::new(crate::render::render_with(inputs, self.last.as_deref()));
        assert_eq!(
            *incremental, *fresh,
            "{step}: the reused catalog renders the same"
        );
        let learned = |_: &WorkloadKey| BTreeSet::new();
        let (a, _) = self.fresh.update(
            &fresh,
            wanted,
            learned,
            |_| None,
            self.now_ms,
            MAX_CONFIG_MAP_BYTES,
        );
        let (b, _) = self.incremental.update(
            &incremental,
            wanted,
            learned,
            |_| None,
            self.now_ms,
            MAX_CONFIG_MAP_BYTES,
        );
        for workload in wanted {
            assert_eq!(
                self.fresh.entry(workload).map(|e| &e.scope),
                self.incremental.entry(workload).map(|e| &e.scope),
                "{step}: {workload:?} is scoped alike"
            );
        }
        let reused = incremental
            .catalog
            .iter()
            .filter(|(k, e)| {
                self.last
                    .as_ref()
                    .and_then(|l| l.catalog.get(*k))
                    .is_some_and(|old| Arc::ptr_eq(old, e))
            })
            .count();
        self.last = Some(incremental);
        assert_eq!(a.len(), b.len(), "{step}: as many updates");
        (reused, b.len())
    }
}

#[test]
fn an_incremental_pass_reuses_unchanged_entries_and_renders_what_a_fresh_one_does() {
    let (mut inputs, wanted) = three_workloads();
    // An ungoverned Service with a meshed endpoint (governed entries are compared by value).
    inputs.endpoint_slices.push(slice(
        "shop",
        "unrelated",
        "unrelated-abc",
        &[("http", 8080)],
        &[("10.244.0.9", Some(true), "u-a")],
    ));
    inputs.pods.push(pod("shop", "u-a", "unrelated", true));
    inputs.pods[0] = depending(pod("shop", "client-1", "client", true), "server, unrelated");
    let mut inputs = versioned(inputs);
    let mut runs = SideBySide {
        fresh: Index::default(),
        incremental: Index::default(),
        last: None,
        now_ms: 0,
    };
    let services = inputs.services.len();
    assert_eq!(runs.pass(&inputs, &wanted, "first"), (0, 3));
    assert_eq!(runs.pass(&inputs, &wanted, "unchanged"), (services, 0));

    // New endpoints behind billing/ledger (a new slice): only that entry is rebuilt.
    let mut ledger = slice(
        "billing",
        "ledger",
        "ledger-abc",
        &[("http", 8080)],
        &[("10.244.3.3", Some(true), "")],
    );
    Arc::make_mut(&mut ledger).metadata.resource_version = Some("7".into());
    inputs.endpoint_slices.push(ledger);
    assert_eq!(runs.pass(&inputs, &wanted, "new slice"), (services - 1, 1));

    // The pod behind unrelated's endpoint goes away before its slice changes: the endpoint
    // loses its identity, though no Service or slice changed version.
    inputs
        .pods
        .retain(|p| p.metadata.name.as_deref() != Some("u-a"));
    let (reused, updates) = runs.pass(&inputs, &wanted, "endpoint pod gone");
    assert_eq!(
        (reused, updates),
        (services - 1, 1),
        "unrelated's entry was rebuilt"
    );

    // A policy change, then a Service that appears in a namespace a workload names whole,
    // then one that goes away.
    inputs.traffic_policies = vec![even_canary()];
    runs.pass(&inputs, &wanted, "policy change");
    let mut audit = service("billing", "audit", "10.96.1.3", &[("http", 80)]);
    Arc::make_mut(&mut audit).metadata.resource_version = Some("9".into());
    inputs.services.push(audit);
    let (_, updates) = runs.pass(&inputs, &wanted, "Service appeared");
    assert_eq!(updates, 1, "billing names billing/* and gets billing/audit");
    inputs
        .services
        .retain(|s| s.metadata.name.as_deref() != Some("server-v2"));
    runs.pass(&inputs, &wanted, "Service gone");
    assert_eq!(
        runs.pass(&inputs, &wanted, "settled"),
        (inputs.services.len(), 0)
    );
}

#[test]
fn a_config_whose_services_alone_pass_the_limit_is_not_built() {
    let (inputs, wanted) = three_workloads();
    let mut index = Index::default();
    let rendered = Arc::new(render(&inputs));
    let (updates, _) = index.update(&rendered, &wanted, |_| BTreeSet::new(), |_| None, 1000, 100);
    let client = updates
        .iter()
        .find(|u| u.workload == workload("shop", "client"))
        .unwrap();
    let Err(bound) = client.config else {
        panic!(
            "client's three Services pass 100 bytes: {:?}",
            client.config
        )
    };
    let built = rendered.config_with(
        &client.workload,
        &index.entry(&client.workload).unwrap().scope,
    );
    let json = document(&built);
    assert!(
        bound > 100 && bound < json.len(),
        "{bound} is a lower bound of {}",
        json.len()
    );
    let server = updates
        .iter()
        .find(|u| u.workload == workload("shop", "server"))
        .unwrap();
    assert!(server.config.is_ok(), "a config with no Services is built");
}

#[test]
fn a_pod_known_by_its_metadata_keeps_its_controller_and_so_its_workload() {
    let mut metadata = meta("shop", "cart-7d9f8c-x1");
    metadata.labels = Some([("pod-template-hash".to_owned(), "7d9f8c".to_owned())].into());
    metadata.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            kind: "Other".into(),
            name: "not-the-controller".into(),
            ..Default::default()
        },
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            kind: "ReplicaSet".into(),
            name: "cart-7d9f8c".into(),
            controller: Some(true),
            ..Default::default()
        },
    ]);
    let source = pod("shop", "cart-7d9f8c-x1", "cart", true);
    let recorded = crate::stores::Recorded::from_pod(&source);
    let stored = crate::stores::metadata_pod(metadata, &recorded);
    let owners = stored
        .metadata
        .owner_references
        .as_deref()
        .unwrap_or_default();
    assert_eq!(owners.len(), 1, "only the controller is kept: {owners:?}");
    assert_eq!(tandem_crds::pods::workload_name(&stored.metadata), "cart");
}
