//! Config loading and hot reload over real sockets.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use support::upstream::{self, bind_local};
use support::{ConfigDir, H1Client, Proxy, config, get, service};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_under_continuous_load_loses_no_request() {
    let old = upstream::http("old", bind_local());
    let new = upstream::http("new", bind_local());
    let mut dir = ConfigDir::new();
    dir.publish(&config(
        "v1",
        vec![service("web", "127.0.0.1", 18081, "http", &[old])],
    ));
    let proxy = Proxy::start(&dir.path());

    let stop = Arc::new(AtomicBool::new(false));
    let served_by_new = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, served_by_new, addr) = (stop.clone(), served_by_new.clone(), proxy.outbound);
        workers.push(tokio::spawn(async move {
            // Keep-alive connections: the swap must apply to the next request on them too.
            let mut client = H1Client::connect(addr, "127.0.0.1:18081").await.unwrap();
            let mut count = 0usize;
            while !stop.load(Ordering::Relaxed) && count < 5_000 {
                let r = client.get("/load").await.unwrap();
                assert_eq!(r.status, 200, "request {count} failed: {}", r.body);
                if r.body.starts_with("new") {
                    served_by_new.fetch_add(1, Ordering::Relaxed);
                }
                count += 1;
            }
            count
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    dir.publish(&config(
        "v2",
        vec![service("web", "127.0.0.1", 18081, "http", &[new])],
    ));
    proxy.wait_config_version("v2").await;
    support::eventually(
        "requests served by the new endpoint",
        Duration::from_secs(10),
        async || served_by_new.load(Ordering::Relaxed) > 20,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap();
    }
    assert!(total > 0);
    let (_, metrics) = proxy.admin("/metrics").await;
    assert!(
        metrics.contains(r#"tandem_config_reloads_total{result="success"} 2"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_or_half_written_config_is_refused_and_the_last_good_one_keeps_serving() {
    let good = upstream::http("good", bind_local());
    let mut dir = ConfigDir::new();
    let v1 = config(
        "v1",
        vec![service("web", "127.0.0.1", 18082, "http", &[good])],
    );
    dir.publish(&v1);
    let proxy = Proxy::start(&dir.path());
    proxy.wait_config_version("v1").await;

    // Half-written: the first half of a valid document.
    dir.publish(&v1[..v1.len() / 2]);
    support::eventually(
        "the refusal shows at /config",
        Duration::from_secs(10),
        async || {
            let (_, body) = proxy.admin("/config").await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["lastError"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("not valid JSON"))
        },
    )
    .await;
    // Valid JSON, invalid config (an unknown API version).
    dir.publish(&v1.replace("proxy-config/v1", "proxy-config/v9"));
    support::eventually(
        "the second refusal is counted",
        Duration::from_secs(10),
        async || {
            proxy
                .admin("/metrics")
                .await
                .1
                .contains("tandem_config_reload_errors_total 2")
        },
    )
    .await;

    let (_, body) = proxy.admin("/config").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["version"], "v1", "{body}");
    assert!(
        v["lastError"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid"),
        "{body}"
    );
    assert_eq!(v["ready"], true);
    let r = get(proxy.outbound, "127.0.0.1:18082", "/", &[])
        .await
        .unwrap();
    assert_eq!(r.body, "good GET /");
    assert_eq!(proxy.admin("/ready").await.0, 200);
    assert!(proxy.log_lines().iter().any(|l| {
        l["level"] == "ERROR"
            && l["message"]
                .as_str()
                .unwrap_or("")
                .contains("Config refused")
    }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_config_file_the_proxy_passes_through_and_is_not_ready_until_one_appears() {
    let app = upstream::http("app", bind_local());
    let mut dir = ConfigDir::new();
    let proxy = Proxy::start(&dir.path());
    let (status, body) = proxy.admin("/ready").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(proxy.admin("/live").await.0, 200);
    // Passthrough: the authority's own address.
    let authority = app.to_string();
    let r = get(proxy.outbound, &authority, "/x", &[]).await.unwrap();
    assert_eq!(r.body, "app GET /x");

    dir.publish(&config("v1", vec![]));
    support::eventually(
        "ready once a valid config appears",
        Duration::from_secs(10),
        async || proxy.admin("/ready").await.0 == 200,
    )
    .await;
}
