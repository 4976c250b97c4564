//! Routing, retries and circuit breaking through the real proxy, against upstream servers that
//! fail on command. Each behaviour is observed directly: the requests each upstream received,
//! the status and headers the client got, the breaker state at `/config`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod flaky;
mod support;

use std::net::SocketAddr;
use std::time::Duration;

use flaky::{Flaky, Mode};
use serde_json::{Value, json};
use support::{ConfigDir, Proxy};

const VIP: &str = "10.96.0.10";
const HOST: &str = "10.96.0.10:80";

/// A config with one service, `web`, whose endpoints are `endpoints`, and extra fields merged in.
fn config(endpoints: &[SocketAddr], extra: Value) -> String {
    let mut service = json!({
        "name": "web",
        "namespace": "test",
        "clusterIps": [VIP],
        "ports": [{
            "port": 80,
            "protocol": "http",
            "endpoints": endpoints.iter().map(|e| json!({"address": e.to_string()})).collect::<Vec<_>>(),
        }],
        "loadBalancer": "roundRobin",
    });
    if let (Some(s), Some(e)) = (service.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    json!({
        "apiVersion": "tandem.dev/proxy-config/v1",
        "version": "v1",
        "workload": {"namespace": "test", "serviceAccount": "client"},
        "services": [service],
    })
    .to_string()
}

fn retries(retry_on: &[&str], attempts: u32) -> Value {
    json!({
        "routes": [{
            "name": "all",
            "retries": {
                "attempts": attempts,
                "retryOn": retry_on,
                "backoffBaseMs": 1,
                "backoffMaxMs": 5,
            },
        }],
    })
}

async fn start(config_json: &str) -> (Proxy, ConfigDir) {
    let mut dir = ConfigDir::new();
    dir.publish(config_json);
    let proxy = Proxy::start(&dir.path());
    proxy.wait_config_version("v1").await;
    (proxy, dir)
}

async fn send(proxy: &Proxy, method: &str, body: &[u8]) -> flaky::Response {
    flaky::send(proxy.outbound, method, HOST, "/", body)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_get_is_retried_on_another_endpoint() {
    let bad = Flaky::start("bad", Mode::Fail(503)).await;
    let good = Flaky::start("good", Mode::Healthy).await;
    let (proxy, _dir) = start(&config(&[bad.addr(), good.addr()], retries(&["5xx"], 1))).await;
    for _ in 0..10 {
        let r = send(&proxy, "GET", b"").await;
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-served-by"), Some("good"));
    }
    // Every attempt that reached the bad endpoint was retried once, on the good one.
    assert!(bad.requests() >= 1);
    assert_eq!(good.requests(), 10);

    // The retries are in /metrics: as a counter, and as requests that took two attempts.
    let (_, metrics) = proxy.admin("/metrics").await;
    let retried = bad.requests();
    assert!(
        metrics.contains(&format!(
            "tandem_retries_total{{dst_service=\"test/web\"}} {retried}\n"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "tandem_request_attempts_bucket{{le=\"1.0\",direction=\"outbound\",dst_service=\"test/web\"}} {}\n",
            10 - retried
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "tandem_request_attempts_count{direction=\"outbound\",dst_service=\"test/web\"} 10\n"
        ),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_not_retried_by_default() {
    let bad = Flaky::start("bad", Mode::Fail(503)).await;
    let good = Flaky::start("good", Mode::Healthy).await;
    let (proxy, _dir) = start(&config(&[bad.addr(), good.addr()], retries(&["5xx"], 2))).await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(send(&proxy, "POST", b"pay 10").await.status);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, vec![200, 200, 503, 503]);
    assert_eq!(bad.requests() + good.requests(), 4, "one attempt per POST");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_elsewhere_and_a_reset_mid_response_is_not() {
    let dead = Flaky::start("dead", Mode::Healthy).await;
    dead.refuse();
    let good = Flaky::start("good", Mode::Healthy).await;
    let (proxy, _dir) = start(&config(
        &[dead.addr(), good.addr()],
        retries(&["connectFailure", "reset"], 1),
    ))
    .await;
    for _ in 0..6 {
        let r = send(&proxy, "POST", b"x").await;
        assert_eq!(
            r.status, 200,
            "connect failures are retried even for POST: {r:?}"
        );
    }
    assert_eq!(good.requests(), 6);

    // Once the head is on its way to the client, a reset cannot be retried.
    good.set(Mode::ResetMidResponse);
    let before = good.requests();
    let r = flaky::send(proxy.outbound, "GET", HOST, "/", b"").await;
    assert!(r.is_err() || r.as_ref().unwrap().body.len() < 100, "{r:?}");
    assert_eq!(good.requests() - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejection_after_consecutive_5xx_shows_at_config_and_the_endpoint_returns_after_its_time() {
    let bad = Flaky::start("bad", Mode::Fail(503)).await;
    let good = Flaky::start("good", Mode::Healthy).await;
    let extra = json!({
        "circuitBreaker": {
            "outlierDetection": {
                "consecutive5xx": 2,
                "consecutiveGatewayErrors": 0,
                "intervalMs": 1000,
                "baseEjectionTimeMs": 1500,
                "maxEjectionTimeMs": 10000,
                "maxEjectionPercent": 50,
            },
        },
    });
    let (proxy, _dir) = start(&config(&[bad.addr(), good.addr()], extra)).await;
    for _ in 0..4 {
        send(&proxy, "GET", b"").await;
    }
    assert_eq!(bad.requests(), 2, "ejected after two 503s in a row");
    let (_, body) = proxy.admin("/config").await;
    let config: Value = serde_json::from_str(&body).unwrap();
    let dest = &config["policies"]["destinations"][0];
    assert_eq!(dest["activeEjections"], 1, "{dest}");
    assert_eq!(dest["endpoints"][0]["state"], "ejected");
    let (_, metrics) = proxy.admin("/metrics").await;
    for line in [
        "tandem_ejections_total{dst_service=\"test/web\",port=\"80\"} 1\n",
        "tandem_active_ejections{dst_service=\"test/web\",port=\"80\"} 1\n",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    for _ in 0..10 {
        assert_eq!(send(&proxy, "GET", b"").await.status, 200);
    }
    assert_eq!(bad.requests(), 2, "no traffic while ejected");

    // After the ejection time, one probe goes to the endpoint; it is healthy again.
    bad.set(Mode::Healthy);
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    for _ in 0..10 {
        assert_eq!(send(&proxy, "GET", b"").await.status, 200);
    }
    assert!(bad.requests() >= 5, "restored: {}", bad.requests());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_endpoints_answers_503_saying_so() {
    let (proxy, _dir) = start(&config(&[], json!({}))).await;
    let r = send(&proxy, "GET", b"").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("x-tandem-error"), Some("no-endpoints"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_past_the_request_timeout_is_answered_504() {
    let slow = Flaky::start("slow", Mode::Slow(Duration::from_secs(3))).await;
    let extra = json!({"routes": [{"name": "all", "timeoutMs": 300}]});
    let (proxy, _dir) = start(&config(&[slow.addr()], extra)).await;
    let r = send(&proxy, "GET", b"").await;
    assert_eq!(r.status, 504);
}
