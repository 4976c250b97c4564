//! The proxy config contract: round trips, the checked-in schema, and every validation rule.

// A panic is how a test reports failure; unwrap is fine outside #[test] functions here too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;

use tandem_crds::contract::{
    Backend, CircuitBreaker, ConfigError, ConnectionPool, Endpoint, HeaderMatch, OutlierDetection,
    PathMatch, Protocol, ProxyConfig, RequestMatch, Retries, RetryBudget, RetryOn, Route, Service,
    ServicePort, ServiceRef, Telemetry, Tracing, ValueMatch, Workload,
};

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn service(name: &str, ip: &str, endpoints: &[&str]) -> Service {
    Service {
        name: name.into(),
        namespace: "shop".into(),
        cluster_ips: vec![ip.parse().unwrap()],
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            protocol: Protocol::Http,
            endpoints: endpoints
                .iter()
                .map(|e| Endpoint {
                    address: addr(e),
                    meshed: true,
                    identity: Some("spiffe://cluster.local/ns/shop/sa/server".into()),
                    workload: None,
                })
                .collect(),
        }],
        ..Service::default()
    }
}

fn backend(name: &str, weight: u32) -> Backend {
    Backend {
        service: ServiceRef {
            name: name.into(),
            namespace: "shop".into(),
        },
        port: 80,
        weight,
    }
}

fn retries() -> Retries {
    Retries {
        attempts: 2,
        per_try_timeout_ms: Some(250),
        retry_on: vec![RetryOn::FiveXx, RetryOn::ConnectFailure],
        retriable_status_codes: vec![],
        backoff_base_ms: 25,
        backoff_max_ms: 250,
        retry_non_idempotent: false,
    }
}

/// A config exercising every field: the canary split of the samples, with retries and a breaker.
fn full_config() -> ProxyConfig {
    let mut config = ProxyConfig::new(Workload {
        namespace: "shop".into(),
        service_account: "client".into(),
        mtls: Default::default(),
    });
    let mut server = service(
        "server",
        "10.96.0.10",
        &["10.244.0.5:8080", "10.244.0.6:8080"],
    );
    server.routes = vec![Route {
        name: "canary".into(),
        matches: vec![RequestMatch {
            path: Some(PathMatch::Prefix("/api".into())),
            method: Some("GET".into()),
            headers: vec![HeaderMatch {
                name: "x-user".into(),
                value: ValueMatch::Regex("beta-.*".into()),
            }],
        }],
        backends: vec![backend("server-v1", 90), backend("server-v2", 10)],
        timeout_ms: Some(1000),
        retries: Some(retries()),
    }];
    server.retry_budget = Some(RetryBudget {
        ratio: 0.2,
        min_retries_per_second: 10,
        window_ms: 10_000,
    });
    server.circuit_breaker = Some(CircuitBreaker {
        connection_pool: Some(ConnectionPool {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
        }),
        outlier_detection: Some(OutlierDetection {
            consecutive_5xx: 5,
            consecutive_gateway_errors: 0,
            interval_ms: 10_000,
            base_ejection_time_ms: 30_000,
            max_ejection_time_ms: 300_000,
            max_ejection_percent: 10,
        }),
    });
    config.services = vec![
        server,
        service("server-v1", "10.96.0.11", &["10.244.0.5:8080"]),
        service("server-v2", "10.96.0.12", &["10.244.0.6:8080"]),
    ];
    config
}

fn problems(config: &ProxyConfig) -> Vec<String> {
    match config.validate() {
        Ok(()) => vec![],
        Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn full_config_round_trips_through_json() {
    let config = full_config();
    assert_eq!(problems(&config), Vec::<String>::new());
    let json = config.to_json();
    let back = ProxyConfig::from_json(json.as_bytes()).unwrap();
    assert_eq!(back, config);
    assert_eq!(back.to_json(), json, "serialization is stable");
}

#[test]
fn minimal_config_uses_documented_defaults() {
    let json = r#"{"apiVersion":"tandem.dev/proxy-config/v1","workload":{"namespace":"a","serviceAccount":"b"}}"#;
    let config = ProxyConfig::from_json(json.as_bytes()).unwrap();
    assert_eq!(config.defaults.connect_timeout_ms, 1000);
    assert!(config.services.is_empty());
}

#[test]
fn connections_find_their_service_by_cluster_ip_and_port() {
    let config = full_config();
    let (svc, port) = config.service_for(addr("10.96.0.10:80")).unwrap();
    assert_eq!(svc.name, "server");
    assert_eq!(port.endpoints.len(), 2);
    assert!(config.service_for(addr("10.96.0.10:81")).is_none());
    assert!(config.service_for(addr("10.1.1.1:80")).is_none());
}

#[test]
fn unknown_fields_and_wrong_types_are_parse_errors() {
    let unknown = r#"{"apiVersion":"tandem.dev/proxy-config/v1","workload":{"namespace":"a","serviceAccount":"b"},"surprise":1}"#;
    assert!(matches!(
        ProxyConfig::from_json(unknown.as_bytes()),
        Err(ConfigError::Parse(_))
    ));
    let half_written = &full_config().to_json()[..200];
    assert!(matches!(
        ProxyConfig::from_json(half_written.as_bytes()),
        Err(ConfigError::Parse(_))
    ));
}

#[test]
fn wrong_api_version_is_refused() {
    let mut config = full_config();
    config.api_version = "tandem.dev/proxy-config/v2".into();
    assert_eq!(
        problems(&config),
        [
            "$.apiVersion: must be \"tandem.dev/proxy-config/v1\", found \"tandem.dev/proxy-config/v2\""
        ]
    );
}

#[test]
fn every_problem_is_reported_with_its_path() {
    let mut config = full_config();
    config.workload.service_account.clear();
    let route = &mut config.services[0].routes[0];
    route.backends = vec![backend("server-v1", 0), backend("missing", 0)];
    route.matches[0].path = Some(PathMatch::Regex("(unclosed".into()));
    route.matches[0].headers[0].name = "X-User".into();
    route.matches[0].method = Some("get".into());
    let retries = route.retries.as_mut().unwrap();
    retries.per_try_timeout_ms = Some(5000);
    retries.retry_on.clear();
    retries.attempts = 11;
    retries.retriable_status_codes = vec![700];
    retries.backoff_base_ms = 500;
    let breaker = config.services[0].circuit_breaker.as_mut().unwrap();
    breaker
        .outlier_detection
        .as_mut()
        .unwrap()
        .base_ejection_time_ms = 400_000;
    breaker
        .outlier_detection
        .as_mut()
        .unwrap()
        .max_ejection_percent = 101;
    breaker.connection_pool.as_mut().unwrap().max_requests = 0;
    config.services[0].retry_budget.as_mut().unwrap().ratio = f64::NAN;
    config
        .services
        .push(service("server-v1", "10.96.0.13", &[]));

    let found = problems(&config);
    let r = "$.services[0].routes[0]";
    let expected = [
        "$.workload.serviceAccount: must not be empty".to_string(),
        format!("{r}.matches[0].path.regex: invalid regular expression"),
        format!("{r}.matches[0].method: method must be an upper-case HTTP token such as GET"),
        format!("{r}.matches[0].headers[0].name: must be a lower-case HTTP header name"),
        format!("{r}.backends: at least one backend must have a positive weight"),
        format!("{r}.backends[1].service: service shop/missing is not in this config"),
        format!("{r}.retries.attempts: at most 10 retries"),
        format!("{r}.retries.retryOn: must name at least one condition"),
        format!("{r}.retries.perTryTimeoutMs: must not exceed the route's timeout"),
        format!("{r}.retries.retriableStatusCodes[0]: must be an HTTP status 100-599"),
        format!("{r}.retries.retriableStatusCodes: listed codes need retryOn retriableStatusCodes"),
        format!("{r}.retries.backoffBaseMs: must be positive and not above backoffMaxMs"),
        "$.services[0].retryBudget.ratio: must be between 0 and 10".to_string(),
        "$.services[0].circuitBreaker.connectionPool.maxRequests: must be positive".to_string(),
        "$.services[0].circuitBreaker.outlierDetection.baseEjectionTimeMs: must be positive and not above maxEjectionTimeMs".to_string(),
        "$.services[0].circuitBreaker.outlierDetection.maxEjectionPercent: must be 0-100".to_string(),
        "$.services[3]: duplicate service shop/server-v1".to_string(),
    ];
    for want in &expected {
        assert!(
            found.iter().any(|f| f.starts_with(want.as_str())),
            "missing {want:?} in {found:#?}"
        );
    }
    assert_eq!(found.len(), expected.len(), "{found:#?}");
}

#[test]
fn backend_port_must_exist_on_the_backend_service() {
    let mut config = full_config();
    config.services[0].routes[0].backends[0].port = 81;
    assert_eq!(
        problems(&config),
        [
            "$.services[0].routes[0].backends[0].port: port is not one of the backend service's ports"
        ]
    );
}

#[test]
fn duplicate_ports_and_zero_ports_are_refused() {
    let mut config = full_config();
    let dup = config.services[1].ports[0].clone();
    config.services[1].ports.push(dup);
    config.services[2].ports[0].port = 0;
    let found = problems(&config);
    assert!(
        found.contains(&"$.services[1].ports[1].port: duplicate port 80".to_string()),
        "{found:?}"
    );
    assert!(
        found.contains(&"$.services[2].ports[0].port: must be 1-65535".to_string()),
        "{found:?}"
    );
}

#[test]
fn oversized_regex_is_refused_before_compiling() {
    let mut config = full_config();
    config.services[0].routes[0].matches[0].path = Some(PathMatch::Regex("a".repeat(2000)));
    assert_eq!(
        problems(&config),
        [
            "$.services[0].routes[0].matches[0].path.regex: regular expression longer than 1024 bytes"
        ]
    );
}

#[test]
fn checked_in_json_schema_is_current() {
    let generated =
        serde_json::to_string_pretty(&tandem_crds::contract::json_schema()).unwrap() + "\n";
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/proxy-config.schema.json"
    );
    let checked_in = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        generated == checked_in,
        "manifests/proxy-config.schema.json is stale: run `make crds`"
    );
}

fn with_tracing(collector: &str, sampling_percent: f64) -> ProxyConfig {
    let mut config = full_config();
    config.telemetry = Telemetry {
        tracing: Some(Tracing {
            collector: collector.into(),
            sampling_percent,
        }),
        ..Telemetry::default()
    };
    config
}

#[test]
fn a_tracing_collector_must_be_an_http_base_url_with_a_host() {
    for good in [
        "http://otel-collector.observability:4318",
        "https://collector.example.com",
        "http://10.0.0.9:4318/otlp",
        "http://[::1]:4318",
    ] {
        assert_eq!(
            problems(&with_tracing(good, 1.0)),
            Vec::<String>::new(),
            "{good}"
        );
    }
    let path = "$.telemetry.tracing.collector";
    for (bad, why) in [
        ("otel:4318", "must be an http:// or https:// URL"),
        ("grpc://otel:4317", "must be an http:// or https:// URL"),
        ("http://", "must name a host"),
        ("http://:4318", "must name a host"),
        (
            "http://otel:0",
            "has a port that is not a number from 1 to 65535",
        ),
        (
            "http://otel:70000",
            "has a port that is not a number from 1 to 65535",
        ),
        (
            "http://otel:43x8",
            "has a port that is not a number from 1 to 65535",
        ),
        (
            "http://otel:4318/v1?x=1",
            "must not have a query or fragment (/v1/traces is appended to it)",
        ),
        ("http://user:pw@otel:4318", "must not carry credentials"),
        (
            "http://ot el:4318",
            "must not contain whitespace or control characters",
        ),
        (
            "http://[::1:4318",
            "has an IPv6 address without its closing bracket",
        ),
    ] {
        assert_eq!(
            problems(&with_tracing(bad, 1.0)),
            [format!("{path}: {why}")],
            "{bad}"
        );
    }
}

#[test]
fn a_sampling_percent_must_be_a_finite_number_from_0_to_100() {
    for good in [0.0, 0.5, 1.0, 100.0] {
        assert_eq!(
            problems(&with_tracing("http://otel:4318", good)),
            Vec::<String>::new()
        );
    }
    for bad in [-0.1, 100.5, f64::NAN, f64::INFINITY] {
        assert_eq!(
            problems(&with_tracing("http://otel:4318", bad)),
            ["$.telemetry.tracing.samplingPercent: must be a number from 0 to 100"],
            "{bad}"
        );
    }
}

#[test]
fn tracing_round_trips_and_defaults_to_one_percent() {
    let config = with_tracing("http://otel:4318", 25.0);
    let back = ProxyConfig::from_json(config.to_json().as_bytes()).unwrap();
    assert_eq!(back, config);
    let json = r#"{"apiVersion":"tandem.dev/proxy-config/v1","workload":{"namespace":"a","serviceAccount":"b"},"telemetry":{"tracing":{"collector":"http://otel:4318"}}}"#;
    let parsed = ProxyConfig::from_json(json.as_bytes()).unwrap();
    let tracing = parsed.telemetry.tracing.unwrap();
    assert_eq!(
        tracing.sampling_percent,
        tandem_crds::contract::DEFAULT_SAMPLING_PERCENT
    );
}
