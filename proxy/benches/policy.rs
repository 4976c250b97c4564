//! The resilience engine's cost per request: `select` (route match with a regex, weighted split,
//! pool slots, peak-EWMA pick) plus `on_attempt_result` (EWMA update, outlier bookkeeping), on
//! one thread and on several at once (to show that shared atomics do not serialise requests).
//!
//! `cargo bench -p tandem-proxy --bench policy` (no harness). It reports CPU time per request,
//! read from `/proc/thread-self/schedstat`, so that other processes competing for the cores do
//! not inflate the figure; wall time is shown beside it.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tandem_crds::contract::{
    Backend, CircuitBreaker, ConnectionPool, Endpoint, HeaderMatch, OutlierDetection, PathMatch,
    ProxyConfig, RequestMatch, Retries, RetryOn, Route, Service, ServicePort, ServiceRef,
    ValueMatch, Workload,
};
use tandem_proxy::policy::{Outcome, PolicySet, RequestBody, RetryDecision, Sources};

const REQUESTS: u32 = 200_000;
const RUNS: usize = 5;

fn service(name: &str, ip: u8, endpoints: u8) -> Service {
    Service {
        name: name.into(),
        namespace: "bench".into(),
        cluster_ips: vec![std::net::IpAddr::from([10, 96, 0, ip])],
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            endpoints: (1..=endpoints)
                .map(|i| Endpoint {
                    address: SocketAddr::from(([10, ip, 0, i], 8080)),
                    meshed: true,
                    identity: None,
                    workload: None,
                })
                .collect(),
            ..ServicePort::default()
        }],
        circuit_breaker: Some(CircuitBreaker {
            connection_pool: Some(ConnectionPool {
                max_connections: 10_000,
                max_pending_requests: 10_000,
                max_requests: 10_000,
                max_retries: 100,
            }),
            outlier_detection: Some(OutlierDetection {
                consecutive_5xx: 5,
                consecutive_gateway_errors: 0,
                interval_ms: 10_000,
                base_ejection_time_ms: 30_000,
                max_ejection_time_ms: 300_000,
                max_ejection_percent: 50,
            }),
        }),
        ..Service::default()
    }
}

fn config() -> ProxyConfig {
    let mut front = service("reviews", 1, 10);
    let backend = |name: &str, weight| Backend {
        service: ServiceRef {
            name: name.into(),
            namespace: "bench".into(),
        },
        port: 80,
        weight,
    };
    front.routes = vec![
        Route {
            name: "admin".into(),
            matches: vec![RequestMatch {
                path: Some(PathMatch::Prefix("/admin".into())),
                ..RequestMatch::default()
            }],
            ..Route::default()
        },
        Route {
            name: "items".into(),
            matches: vec![RequestMatch {
                path: Some(PathMatch::Regex("/items/[0-9]+".into())),
                method: Some("GET".into()),
                headers: vec![HeaderMatch {
                    name: "x-tier".into(),
                    value: ValueMatch::Regex("gold|silver".into()),
                }],
            }],
            backends: vec![backend("reviews-v1", 90), backend("reviews-v2", 10)],
            timeout_ms: Some(5_000),
            retries: Some(Retries {
                attempts: 2,
                per_try_timeout_ms: Some(1_000),
                retry_on: vec![RetryOn::FiveXx],
                retriable_status_codes: vec![],
                backoff_base_ms: 25,
                backoff_max_ms: 250,
                retry_non_idempotent: false,
            }),
        },
    ];
    let mut c = ProxyConfig::new(Workload {
        namespace: "bench".into(),
        service_account: "bench".into(),
        mtls: Default::default(),
    });
    c.services = vec![
        front,
        service("reviews-v1", 2, 10),
        service("reviews-v2", 3, 10),
    ];
    c.validate().unwrap();
    c
}

/// CPU time this thread has run, in nanoseconds (Linux).
fn thread_cpu_nanos() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Runs `REQUESTS` requests on each of `threads` threads; returns (CPU ns, wall ns) per request
/// per thread.
fn run(set: &Arc<PolicySet>, threads: usize) -> (f64, f64) {
    let vip = SocketAddr::from(([10, 96, 0, 1], 80));
    let start = Instant::now();
    let cpu: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let set = Arc::clone(set);
                s.spawn(move || {
                    let cpu_start = thread_cpu_nanos();
                    let request = http::Request::builder()
                        .uri("/items/12345?x=1")
                        .header("x-tier", "gold")
                        .header("user-agent", "bench")
                        .body(())
                        .unwrap()
                        .into_parts()
                        .0;
                    let policy = set.for_destination(vip).unwrap();
                    for i in 0..REQUESTS {
                        let mut d = policy.select(80, &request).unwrap();
                        // One request in a thousand fails once and is retried.
                        if (i + t as u32).is_multiple_of(1_000) {
                            d.on_attempt_result(Outcome::Response(503));
                            let r = d.should_retry(RequestBody::Replayable);
                            assert!(matches!(r, RetryDecision::Retry { .. }), "{r:?}");
                        }
                        d.on_attempt_result(Outcome::Response(200));
                        std::hint::black_box(&d);
                    }
                    thread_cpu_nanos() - cpu_start
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let wall = start.elapsed().as_nanos() as f64 / f64::from(REQUESTS);
    let cpu = cpu as f64 / threads as f64 / f64::from(REQUESTS);
    (cpu, wall)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let set = Arc::new(PolicySet::build(&config(), None, &Sources::system()).unwrap());
    // Warm up caches and the allocator.
    run(&set, 1);
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    for threads in [1, cores] {
        let runs: Vec<(f64, f64)> = (0..RUNS).map(|_| run(&set, threads)).collect();
        let cpu = median(runs.iter().map(|r| r.0).collect());
        let wall = median(runs.iter().map(|r| r.1).collect());
        println!(
            "policy select+record, {threads} thread(s): {cpu:.0} ns CPU per request \
             ({wall:.0} ns wall; median of {RUNS} runs of {REQUESTS} requests per thread)"
        );
    }
}
