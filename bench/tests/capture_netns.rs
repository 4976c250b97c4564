//! The capture run's real mesh path, end to end and functional only (no timing): two pods in
//! network namespaces, `tandem-proxy init`'s iptables rules in both, both sidecars as UID
//! 2102, and the load generator in the client pod sending to the service's cluster IP. Every
//! request must succeed and both sidecars must have counted every one.
//!
//! Needs root, `ip`, `iptables` and `nsenter` (skipped with a message otherwise, like the
//! benchmark itself), and the tandem-proxy binary: `TANDEM_PROXY_BIN`, else the one in this
//! test's own target directory (`cargo test --workspace`, as `make unit` runs it, builds it for
//! the proxy's own tests), else it is built here with `cargo build -p tandem-proxy`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use tandem_bench::capture::{self, CaptureStage};
use tandem_bench::loadgen::{self, OpenLoop, Protocol, Target};
use tandem_bench::netns::{self, Pods};
use tandem_bench::run::Stage;
use tandem_bench::topology::Topology;

mod support;

use support::tandem_proxy;

const REQUESTS: u64 = 200;

#[test]
fn every_request_to_the_cluster_ip_is_captured_and_counted_by_both_sidecars() {
    if let Some(why) = netns::missing_prerequisites() {
        eprintln!("skipped: the capture test needs what the capture run needs: {why}");
        return;
    }
    // Found (or built) before the namespaces exist: a build may take minutes.
    let tandem = tandem_proxy();
    let pods = Pods::create().unwrap();
    let stage = CaptureStage {
        tandem,
        pods: pods.paths(),
    };
    let bench = PathBuf::from(env!("CARGO_BIN_EXE_tandem-bench"));
    let _upstream = capture::start_upstream(&bench, &stage.pods, 32).unwrap();
    let client = stage.pods.client.clone();

    let (summary, counted, rules_gone) = netns::in_netns(&client, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let upstream = Target {
                addr: capture::upstream_addr(),
                authority: capture::upstream_addr().to_string(),
                protocol: Protocol::Http1,
            };
            loadgen::wait_ready(&upstream, Duration::from_secs(10))
                .await
                .unwrap();
            let running = stage.start(Topology::TandemCaptured).unwrap();
            assert_eq!(running.http1.ip(), capture::CLUSTER_IP);
            let target = running.target(Protocol::Http1);
            loadgen::wait_ready(&target, Duration::from_secs(10))
                .await
                .unwrap();
            let mut before = Vec::new();
            for probe in &running.probes {
                before.push(probe.read().await.unwrap());
            }
            let load = OpenLoop {
                rate: REQUESTS,
                length: Duration::from_secs(1),
                in_flight: 8,
                h2_connections: 1,
                timeout: Duration::from_secs(5),
            };
            let outcome = loadgen::open_loop(&target, &load).await.unwrap();
            let mut counted = Vec::new();
            for (probe, before) in running.probes.iter().zip(before) {
                counted.push((probe.label.clone(), probe.read().await.unwrap() - before));
            }
            drop(running);
            // Stopping the captured topology removes the rules: direct may start again.
            let rules_gone = stage.start(Topology::DirectNetns).is_ok();
            (outcome.summary, counted, rules_gone)
        })
    })
    .unwrap();

    assert_eq!(summary.ok, REQUESTS, "requests that succeeded");
    assert_eq!(summary.errors, 0, "requests that failed");
    assert_eq!(counted.len(), 2, "one probe per sidecar: {counted:?}");
    for (label, count) in &counted {
        assert_eq!(*count, REQUESTS, "{label}");
    }
    assert!(
        rules_gone,
        "the capture rules outlived the captured topology"
    );
    drop(pods);
}
