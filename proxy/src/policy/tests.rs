//! The engine as the request path drives it: select, record, retry, reload.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use tandem_crds::contract::{
    Backend, CircuitBreaker, ConnectionPool, Endpoint, LoadBalancer, OutlierDetection, PathMatch,
    Protocol, ProxyConfig, RequestMatch, Retries, RetryBudget as BudgetConfig, RetryOn, Route,
    Service, ServicePort, ServiceRef, Workload,
};

use super::sources::{ManualClock, SeededRandom};
use super::*;

// ---------------------------------------------------------------------------------------------
// Fixtures

struct Harness {
    clock: Arc<ManualClock>,
    sources: Sources,
}

impl Harness {
    fn new() -> Self {
        let clock = Arc::new(ManualClock::new());
        let sources = Sources {
            clock: clock.clone(),
            random: Arc::new(SeededRandom::new(2024)),
        };
        Self { clock, sources }
    }

    fn build(&self, config: &ProxyConfig, previous: Option<&PolicySet>) -> PolicySet {
        config.validate().unwrap();
        PolicySet::build(config, previous, &self.sources).unwrap()
    }

    fn advance(&self, d: Duration) {
        self.clock.advance(d);
    }
}

const VIP: [u8; 4] = [10, 96, 0, 10];

fn service(name: &str, vip_last: u8, endpoints: &[u8]) -> Service {
    Service {
        name: name.into(),
        namespace: "shop".into(),
        cluster_ips: vec![std::net::IpAddr::from([VIP[0], VIP[1], VIP[2], vip_last])],
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            endpoints: endpoints
                .iter()
                .map(|&i| Endpoint {
                    address: addr(i),
                    meshed: i % 2 == 0,
                    identity: None,
                    workload: None,
                })
                .collect(),
            ..ServicePort::default()
        }],
        ..Service::default()
    }
}

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([10, 0, 0, i], 8080))
}

fn config(services: Vec<Service>) -> ProxyConfig {
    let mut c = ProxyConfig::new(Workload {
        namespace: "shop".into(),
        service_account: "web".into(),
        mtls: Default::default(),
    });
    c.services = services;
    c
}

fn reference(name: &str) -> ServiceRef {
    ServiceRef {
        name: name.into(),
        namespace: "shop".into(),
    }
}

fn retries(retry_on: &[RetryOn], attempts: u32) -> Retries {
    Retries {
        attempts,
        per_try_timeout_ms: None,
        retry_on: retry_on.to_vec(),
        retriable_status_codes: vec![],
        backoff_base_ms: 10,
        backoff_max_ms: 100,
        retry_non_idempotent: false,
    }
}

fn retrying(mut svc: Service, r: Retries) -> Service {
    svc.routes = vec![Route {
        name: "all".into(),
        retries: Some(r),
        ..Route::default()
    }];
    svc
}

fn outlier(consecutive_5xx: u32, max_percent: u32) -> CircuitBreaker {
    CircuitBreaker {
        connection_pool: None,
        outlier_detection: Some(OutlierDetection {
            consecutive_5xx,
            consecutive_gateway_errors: 0,
            interval_ms: 10_000,
            base_ejection_time_ms: 30_000,
            max_ejection_time_ms: 300_000,
            max_ejection_percent: max_percent,
        }),
    }
}

fn get(path: &str) -> Parts {
    request("GET", path)
}

fn request(method: &str, path: &str) -> Parts {
    http::Request::builder()
        .method(method)
        .uri(path)
        .body(())
        .unwrap()
        .into_parts()
        .0
}

fn policy<'a>(set: &'a PolicySet, name: &str) -> &'a Arc<Policy> {
    set.policy(&reference(name)).unwrap()
}

fn endpoint_state<'a>(set: &'a PolicySet, name: &str, i: u8) -> &'a Arc<endpoint::EndpointState> {
    set.destinations()
        .find(|d| d.service().name == name)
        .unwrap()
        .endpoints()
        .iter()
        .find(|e| e.address() == addr(i))
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Routing

#[test]
fn without_routes_requests_go_to_the_service_itself_on_the_requested_port() {
    let h = Harness::new();
    let set = h.build(&config(vec![service("cart", 1, &[1])]), None);
    let p = set
        .for_destination(SocketAddr::from(([10, 96, 0, 1], 80)))
        .unwrap();
    let d = p.select(80, &get("/")).unwrap();
    assert_eq!(d.route_name(), DEFAULT_ROUTE);
    assert_eq!(d.backend(), &reference("cart"));
    assert_eq!(d.endpoint(), Some(addr(1)));
    assert!(
        set.for_destination(SocketAddr::from(([10, 96, 0, 1], 81)))
            .is_none()
    );
}

#[test]
fn canary_split_is_within_two_points_over_10000_requests() {
    let h = Harness::new();
    let mut reviews = service("reviews", 1, &[1]);
    reviews.routes = vec![Route {
        name: "canary".into(),
        matches: vec![RequestMatch {
            path: Some(PathMatch::Prefix("/reviews".into())),
            ..RequestMatch::default()
        }],
        backends: vec![
            Backend {
                service: reference("reviews-v1"),
                port: 80,
                weight: 90,
            },
            Backend {
                service: reference("reviews-v2"),
                port: 80,
                weight: 10,
            },
        ],
        ..Route::default()
    }];
    let set = h.build(
        &config(vec![
            reviews,
            service("reviews-v1", 2, &[2]),
            service("reviews-v2", 3, &[3]),
        ]),
        None,
    );
    let p = policy(&set, "reviews");
    let mut v2 = 0u32;
    for _ in 0..10_000 {
        let mut d = p.select(80, &get("/reviews/1")).unwrap();
        assert_eq!(d.route_name(), "canary");
        if d.backend().name == "reviews-v2" {
            v2 += 1;
        }
        d.on_attempt_result(Outcome::Response(200));
    }
    let percent = f64::from(v2) / 100.0;
    assert!((percent - 10.0).abs() <= 2.0, "v2 got {percent}%");
    // A request no route matches goes to the service itself.
    let d = p.select(80, &get("/other")).unwrap();
    assert_eq!(d.backend(), &reference("reviews"));
}

// ---------------------------------------------------------------------------------------------
// Retries

#[test]
fn post_is_not_retried_by_default() {
    let h = Harness::new();
    let svc = retrying(service("pay", 1, &[1, 2]), retries(&[RetryOn::FiveXx], 2));
    let set = h.build(&config(vec![svc]), None);
    let mut d = policy(&set, "pay")
        .select(80, &request("POST", "/charge"))
        .unwrap();
    d.on_attempt_result(Outcome::Response(503));
    assert_eq!(
        d.should_retry(RequestBody::Replayable),
        RetryDecision::Stop(NoRetry::NonIdempotent)
    );
    assert_eq!(d.attempts(), 1);
}

#[test]
fn a_failed_get_is_retried_on_another_endpoint_after_a_jittered_backoff() {
    let h = Harness::new();
    let svc = retrying(
        service("cart", 1, &[1, 2, 3]),
        retries(&[RetryOn::FiveXx], 2),
    );
    let set = h.build(&config(vec![svc]), None);
    for _ in 0..50 {
        let mut d = policy(&set, "cart").select(80, &get("/")).unwrap();
        let first = d.endpoint().unwrap();
        d.on_attempt_result(Outcome::Response(503));
        let RetryDecision::Retry { backoff } = d.should_retry(RequestBody::Replayable) else {
            panic!("should retry");
        };
        assert!(backoff <= Duration::from_millis(10));
        assert_ne!(d.endpoint(), Some(first));
        assert_eq!(d.attempts(), 2);
        d.on_attempt_result(Outcome::Response(200));
        assert_eq!(
            d.should_retry(RequestBody::Replayable),
            RetryDecision::Stop(NoRetry::NotFailed)
        );
    }
}

#[test]
fn retries_stop_when_attempts_are_used_up() {
    let h = Harness::new();
    let svc = retrying(service("cart", 1, &[1, 2]), retries(&[RetryOn::FiveXx], 2));
    let set = h.build(&config(vec![svc]), None);
    let mut d = policy(&set, "cart").select(80, &get("/")).unwrap();
    for _ in 0..2 {
        d.on_attempt_result(Outcome::Reset);
        assert!(matches!(
            d.should_retry(RequestBody::Replayable),
            RetryDecision::Retry { .. }
        ));
    }
    d.on_attempt_result(Outcome::Reset);
    assert_eq!(
        d.should_retry(RequestBody::Replayable),
        RetryDecision::Stop(NoRetry::AttemptsExhausted)
    );
    assert_eq!(d.attempts(), 3);
}

#[test]
fn budget_stops_a_retry_storm() {
    let h = Harness::new();
    let mut svc = retrying(
        service("cart", 1, &[1, 2, 3]),
        retries(&[RetryOn::FiveXx], 3),
    );
    svc.retry_budget = Some(BudgetConfig {
        ratio: 0.2,
        min_retries_per_second: 1,
        window_ms: 10_000,
    });
    let set = h.build(&config(vec![svc]), None);
    let p = policy(&set, "cart");
    let mut attempts = 0u32;
    // 1,000 requests over one second to a service where every attempt fails.
    for _ in 0..1_000 {
        h.advance(Duration::from_millis(1));
        let mut d = p.select(80, &get("/")).unwrap();
        loop {
            d.on_attempt_result(Outcome::Response(503));
            if let RetryDecision::Stop(_) = d.should_retry(RequestBody::Replayable) {
                break;
            }
        }
        attempts += d.attempts();
    }
    // Without a budget: 4,000 attempts. With it: 1,000 + 20 % + the 10 s × 1/s floor.
    let retries = attempts - 1_000;
    assert!(retries <= 200 + 10, "{retries} retries");
    assert!(retries >= 200, "{retries} retries");
    assert_eq!(p.budget().retries_total(), u64::from(retries));
    assert!(p.budget().exhausted_total() >= 900);
}

#[test]
fn a_retry_that_would_outlive_the_request_timeout_is_not_made() {
    let h = Harness::new();
    let mut svc = retrying(service("cart", 1, &[1, 2]), retries(&[RetryOn::FiveXx], 5));
    svc.routes[0].timeout_ms = Some(50);
    let set = h.build(&config(vec![svc]), None);
    let mut d = policy(&set, "cart").select(80, &get("/")).unwrap();
    assert_eq!(d.request_timeout(), Some(Duration::from_millis(50)));
    h.advance(Duration::from_millis(49));
    assert_eq!(d.attempt_timeout(), Some(Duration::from_millis(1)));
    h.advance(Duration::from_millis(1));
    d.on_attempt_result(Outcome::Timeout);
    assert_eq!(
        d.should_retry(RequestBody::Replayable),
        RetryDecision::Stop(NoRetry::Deadline)
    );
}

#[test]
fn concurrent_retries_are_capped_by_max_retries() {
    let h = Harness::new();
    let mut svc = retrying(service("cart", 1, &[1, 2]), retries(&[RetryOn::FiveXx], 2));
    svc.circuit_breaker = Some(CircuitBreaker {
        connection_pool: Some(ConnectionPool {
            max_connections: 100,
            max_pending_requests: 100,
            max_requests: 100,
            max_retries: 1,
        }),
        outlier_detection: None,
    });
    let set = h.build(&config(vec![svc]), None);
    let p = policy(&set, "cart");
    let mut a = p.select(80, &get("/")).unwrap();
    let mut b = p.select(80, &get("/")).unwrap();
    a.on_attempt_result(Outcome::Response(502));
    b.on_attempt_result(Outcome::Response(502));
    assert!(matches!(
        a.should_retry(RequestBody::Replayable),
        RetryDecision::Retry { .. }
    ));
    assert_eq!(
        b.should_retry(RequestBody::Replayable),
        RetryDecision::Stop(NoRetry::MaxRetries)
    );
    // The retry slot comes back when the retry ends.
    a.on_attempt_result(Outcome::Response(200));
    let mut c = p.select(80, &get("/")).unwrap();
    c.on_attempt_result(Outcome::Response(502));
    assert!(matches!(
        c.should_retry(RequestBody::Replayable),
        RetryDecision::Retry { .. }
    ));
}

// ---------------------------------------------------------------------------------------------
// Circuit breaking

#[test]
fn excess_requests_fail_fast_naming_the_limit_and_slots_return_when_requests_end() {
    let h = Harness::new();
    let mut svc = service("cart", 1, &[1]);
    svc.circuit_breaker = Some(CircuitBreaker {
        connection_pool: Some(ConnectionPool {
            max_connections: 100,
            max_pending_requests: 100,
            max_requests: 2,
            max_retries: 1,
        }),
        outlier_detection: None,
    });
    let set = h.build(&config(vec![svc]), None);
    let p = policy(&set, "cart");
    let a = p.select(80, &get("/")).unwrap();
    let _b = p.select(80, &get("/")).unwrap();
    let refusal = p.select(80, &get("/")).unwrap_err();
    assert_eq!(refusal.status(), 503);
    assert_eq!(refusal.header(), ("x-tandem-overflow", "max-requests"));
    drop(a);
    assert!(p.select(80, &get("/")).is_ok());
    let snap = set.snapshot();
    assert_eq!(snap.destinations[0].overflows_total["max-requests"], 1);
}

#[test]
fn pending_requests_are_limited_until_their_connection_is_ready() {
    let h = Harness::new();
    let mut svc = service("cart", 1, &[1]);
    svc.circuit_breaker = Some(CircuitBreaker {
        connection_pool: Some(ConnectionPool {
            max_connections: 100,
            max_pending_requests: 1,
            max_requests: 100,
            max_retries: 1,
        }),
        outlier_detection: None,
    });
    let set = h.build(&config(vec![svc]), None);
    let p = policy(&set, "cart");
    let mut a = p.select(80, &get("/")).unwrap();
    assert_eq!(
        p.select(80, &get("/")).unwrap_err().header(),
        ("x-tandem-overflow", "max-pending-requests")
    );
    a.on_connected();
    assert!(p.select(80, &get("/")).is_ok());
}

fn pooled(name: &str, protocol: Protocol, max_connections: u32) -> Service {
    let mut svc = service(name, 1, &[1, 3]);
    svc.ports[0].protocol = protocol;
    svc.circuit_breaker = Some(CircuitBreaker {
        connection_pool: Some(ConnectionPool {
            max_connections,
            max_pending_requests: 1_000,
            max_requests: 1_000,
            max_retries: 1,
        }),
        outlier_detection: None,
    });
    svc
}

#[test]
fn http1_attempts_in_flight_are_capped_by_max_connections_one_connection_each() {
    let h = Harness::new();
    let set = h.build(&config(vec![pooled("cart", Protocol::Http, 2)]), None);
    let p = policy(&set, "cart");
    let mut a = p.select(80, &get("/")).unwrap();
    let mut b = p.select(80, &get("/")).unwrap();
    // Connected or not, an attempt in flight holds its connection.
    a.on_connected();
    b.on_connected();
    assert_eq!(
        p.select(80, &get("/")).unwrap_err().header(),
        ("x-tandem-overflow", "max-connections")
    );
    drop(a);
    assert!(p.select(80, &get("/")).is_ok());
    let snap = set.snapshot();
    assert_eq!(snap.destinations[0].overflows_total["max-connections"], 1);
    assert_eq!(snap.destinations[0].limits["max-connections"], 2);
}

#[test]
fn an_http2_connection_counts_for_as_many_attempts_as_it_carries_streams() {
    let h = Harness::new();
    let set = h.build(&config(vec![pooled("grpc", Protocol::Grpc, 1)]), None);
    let p = policy(&set, "grpc");
    let streams: Vec<_> = (0..STREAMS_PER_H2_CONNECTION)
        .map(|_| p.select(80, &get("/")).unwrap())
        .collect();
    assert_eq!(
        p.select(80, &get("/")).unwrap_err().header(),
        ("x-tandem-overflow", "max-connections")
    );
    drop(streams);
    assert!(p.select(80, &get("/")).is_ok());
}

#[test]
fn no_endpoints_is_its_own_visible_state() {
    let h = Harness::new();
    let set = h.build(&config(vec![service("cart", 1, &[])]), None);
    let refusal = policy(&set, "cart").select(80, &get("/")).unwrap_err();
    assert_eq!(refusal, Refusal::NoEndpoints);
    assert_eq!(refusal.header(), ("x-tandem-error", "no-endpoints"));
    let snap = set.snapshot();
    assert_eq!(snap.destinations[0].state, "no-endpoints");
    assert_eq!(snap.destinations[0].no_endpoints_total, 1);
}

#[test]
fn ejection_after_n_consecutive_5xx_and_restore_after_the_ejection_time_with_a_single_probe() {
    let h = Harness::new();
    let mut svc = service("cart", 1, &[1, 2, 3]);
    svc.load_balancer = LoadBalancer::RoundRobin;
    svc.circuit_breaker = Some(outlier(3, 100));
    let set = h.build(&config(vec![svc]), None);
    let p = policy(&set, "cart");
    // Endpoint 1 answers 503, the others 200, until it has failed three times in a row.
    let mut failures = 0;
    while failures < 3 {
        let mut d = p.select(80, &get("/")).unwrap();
        if d.endpoint() == Some(addr(1)) {
            failures += 1;
            let ejected = d.on_attempt_result(Outcome::Response(503));
            assert_eq!(ejected, failures == 3);
        } else {
            d.on_attempt_result(Outcome::Response(200));
        }
    }
    let served = |n: usize| -> Vec<SocketAddr> {
        (0..n)
            .map(|_| {
                let mut d = p.select(80, &get("/")).unwrap();
                let e = d.endpoint().unwrap();
                d.on_attempt_result(Outcome::Response(200));
                e
            })
            .collect()
    };
    assert!(
        !served(30).contains(&addr(1)),
        "ejected endpoint got traffic"
    );
    let snap = set.snapshot();
    assert_eq!(snap.destinations[0].active_ejections, 1);
    assert_eq!(snap.destinations[0].endpoints[0].state, "ejected");
    assert_eq!(
        snap.destinations[0].endpoints[0].ejected_for_ms,
        Some(30_000)
    );

    // The ejection time passes: exactly one request probes endpoint 1 while it is unanswered.
    h.advance(Duration::from_secs(30));
    let mut probe = None;
    let mut others = Vec::new();
    for _ in 0..10 {
        let d = p.select(80, &get("/")).unwrap();
        if d.endpoint() == Some(addr(1)) {
            assert!(probe.is_none(), "a second probe");
            assert!(d.attempt().unwrap().is_probe());
            probe = Some(d);
        } else {
            others.push(d);
        }
    }
    let mut probe = probe.expect("the endpoint was probed");
    assert_eq!(set.snapshot().destinations[0].endpoints[0].state, "probing");
    probe.on_attempt_result(Outcome::Response(200));
    drop(others);
    assert!(
        served(30).contains(&addr(1)),
        "restored endpoint gets traffic"
    );
    assert_eq!(set.snapshot().destinations[0].active_ejections, 0);
}

#[test]
fn an_abandoned_probe_is_handed_to_the_next_request() {
    let h = Harness::new();
    let mut svc = service("cart", 1, &[1, 2]);
    svc.circuit_breaker = Some(outlier(1, 100));
    let set = h.build(&config(vec![svc]), None);
    let p = policy(&set, "cart");
    loop {
        let mut d = p.select(80, &get("/")).unwrap();
        let is_one = d.endpoint() == Some(addr(1));
        d.on_attempt_result(Outcome::Response(if is_one { 500 } else { 200 }));
        if is_one {
            break;
        }
    }
    h.advance(Duration::from_secs(30));
    let d = p.select(80, &get("/")).unwrap();
    assert!(d.attempt().unwrap().is_probe());
    drop(d); // the client went away
    let d = p.select(80, &get("/")).unwrap();
    assert!(d.attempt().unwrap().is_probe(), "probe given back");
}

#[test]
fn panic_mode_sends_to_every_endpoint_when_all_are_ejected() {
    let h = Harness::new();
    let mut svc = service("cart", 1, &[1, 2]);
    svc.load_balancer = LoadBalancer::RoundRobin;
    svc.circuit_breaker = Some(outlier(1, 100));
    let set = h.build(&config(vec![svc]), None);
    let p = policy(&set, "cart");
    for _ in 0..2 {
        let mut d = p.select(80, &get("/")).unwrap();
        d.on_attempt_result(Outcome::ConnectFailure);
    }
    let snap = set.snapshot();
    assert_eq!(snap.destinations[0].active_ejections, 2);
    assert_eq!(snap.destinations[0].state, "panic");
    let mut seen = Vec::new();
    for _ in 0..4 {
        let d = p.select(80, &get("/")).unwrap();
        assert!(d.attempt().unwrap().is_panic());
        seen.push(d.endpoint().unwrap());
    }
    assert!(
        seen.contains(&addr(1)) && seen.contains(&addr(2)),
        "{seen:?}"
    );
    assert_eq!(set.snapshot().destinations[0].panic_total, 4);
}

#[test]
fn max_ejection_percent_keeps_the_rest_serving() {
    let h = Harness::new();
    let mut svc = service("cart", 1, &[1, 2, 3, 4]);
    svc.circuit_breaker = Some(outlier(1, 50));
    let set = h.build(&config(vec![svc]), None);
    let p = policy(&set, "cart");
    for _ in 0..40 {
        if let Ok(mut d) = p.select(80, &get("/")) {
            d.on_attempt_result(Outcome::Response(503));
        }
    }
    let snap = set.snapshot();
    assert_eq!(snap.destinations[0].active_ejections, 2);
    assert_eq!(snap.destinations[0].state, "serving");
}

// ---------------------------------------------------------------------------------------------
// Reloads

#[test]
fn state_of_remaining_endpoints_is_kept_across_endpoint_set_changes() {
    let h = Harness::new();
    let mut svc = service("cart", 1, &[1, 2, 3]);
    svc.circuit_breaker = Some(outlier(1, 100));
    let first = h.build(&config(vec![svc.clone()]), None);
    let p = policy(&first, "cart");
    // Eject endpoint 2 and leave a request in flight on whichever endpoint is picked next.
    loop {
        let mut d = p.select(80, &get("/")).unwrap();
        let two = d.endpoint() == Some(addr(2));
        d.on_attempt_result(Outcome::Response(if two { 503 } else { 200 }));
        if two {
            break;
        }
    }
    let in_flight = p.select(80, &get("/")).unwrap();
    let busy = in_flight.endpoint().unwrap();
    let before = endpoint_state(&first, "cart", 1).rtt(h.sources.now());

    // Endpoint 3 leaves, endpoint 4 joins.
    let mut next = svc.clone();
    next.ports[0].endpoints = [1, 2, 4]
        .iter()
        .map(|&i| Endpoint {
            address: addr(i),
            meshed: false,
            identity: None,
            workload: None,
        })
        .collect();
    let second = h.build(&config(vec![next]), Some(&first));
    assert!(Arc::ptr_eq(
        endpoint_state(&first, "cart", 1),
        endpoint_state(&second, "cart", 1)
    ));
    assert!(
        endpoint_state(&second, "cart", 2).is_ejected(),
        "ejection survives"
    );
    assert_eq!(
        endpoint_state(&second, "cart", 1).rtt(h.sources.now()),
        before
    );
    assert!(!endpoint_state(&second, "cart", 4).is_ejected());
    let snap = second.snapshot();
    assert_eq!(snap.destinations[0].ejections_total, 1, "totals carry over");
    if busy != addr(3) {
        let i = busy
            .ip()
            .to_string()
            .rsplit('.')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(endpoint_state(&second, "cart", i).in_flight(), 1);
    }
    drop(in_flight);
    assert!(
        second
            .destinations()
            .all(|d| d.endpoints().iter().all(|e| e.in_flight() == 0))
    );
}

#[test]
fn requests_in_flight_finish_under_the_policy_they_started_with() {
    let h = Harness::new();
    let mut svc = retrying(service("cart", 1, &[1, 2]), retries(&[RetryOn::FiveXx], 1));
    svc.routes[0].timeout_ms = Some(1_000);
    let first = h.build(&config(vec![svc.clone()]), None);
    let mut old = policy(&first, "cart").select(80, &get("/")).unwrap();

    svc.routes[0].timeout_ms = Some(5_000);
    svc.routes[0].retries = None;
    let second = h.build(&config(vec![svc]), Some(&first));
    drop(first);
    let new = policy(&second, "cart").select(80, &get("/")).unwrap();
    assert_eq!(new.request_timeout(), Some(Duration::from_millis(5_000)));
    assert_eq!(old.request_timeout(), Some(Duration::from_millis(1_000)));
    old.on_attempt_result(Outcome::Response(500));
    assert!(
        matches!(
            old.should_retry(RequestBody::Replayable),
            RetryDecision::Retry { .. }
        ),
        "the old request keeps its retry policy"
    );
}

#[test]
fn retry_counters_and_budget_carry_over_a_reload() {
    let h = Harness::new();
    let svc = retrying(service("cart", 1, &[1, 2]), retries(&[RetryOn::FiveXx], 1));
    let first = h.build(&config(vec![svc.clone()]), None);
    let mut d = policy(&first, "cart").select(80, &get("/")).unwrap();
    d.on_attempt_result(Outcome::Response(500));
    assert!(matches!(
        d.should_retry(RequestBody::Replayable),
        RetryDecision::Retry { .. }
    ));
    let second = h.build(&config(vec![svc]), Some(&first));
    assert_eq!(policy(&second, "cart").budget().retries_total(), 1);
    assert_eq!(second.snapshot().services[0].retries_total, 1);
}

#[test]
fn snapshot_serializes_for_the_config_endpoint() {
    let h = Harness::new();
    let set = h.build(&config(vec![service("cart", 1, &[1, 2])]), None);
    let json = serde_json::to_value(set.snapshot()).unwrap();
    let dest = &json["destinations"][0];
    assert_eq!(dest["service"], "shop/cart");
    assert_eq!(dest["loadBalancer"], "peak-ewma");
    assert_eq!(dest["state"], "serving");
    assert_eq!(dest["endpoints"][1]["address"], "10.0.0.2:8080");
    assert_eq!(dest["endpoints"][1]["meshed"], true);
    assert_eq!(dest["endpoints"][0]["state"], "healthy");
}

#[test]
fn turning_outlier_detection_off_returns_ejected_endpoints_to_service() {
    let h = Harness::new();
    let mut svc = service("cart", 1, &[1, 2]);
    svc.circuit_breaker = Some(outlier(1, 100));
    let first = h.build(&config(vec![svc.clone()]), None);
    let mut d = policy(&first, "cart").select(80, &get("/")).unwrap();
    d.on_attempt_result(Outcome::Response(500));
    assert_eq!(first.snapshot().destinations[0].active_ejections, 1);
    svc.circuit_breaker = None;
    let second = h.build(&config(vec![svc]), Some(&first));
    assert_eq!(second.snapshot().destinations[0].active_ejections, 0);
}

#[test]
fn policies_and_decisions_can_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<PolicySet>();
    send_sync::<Policy>();
    send_sync::<Decision>();
}
