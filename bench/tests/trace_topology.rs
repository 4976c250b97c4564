//! The tracing topologies, end to end and functional only (no timing): the plaintext two hops
//! with `telemetry.tracing` on both sidecars, exporting to the bench's OTLP load sink. At 100 %
//! every request is traced by both sidecars, so once the batches are flushed the proxies count
//! exactly two spans exported per request and the sink received them; at 1 % the config is
//! accepted, the counters exist, and every sampled trace exported both of its spans.
//!
//! Needs the tandem-proxy binary: `TANDEM_PROXY_BIN`, else the one in this test's own target
//! directory, else it is built here with `cargo build -p tandem-proxy` (as capture_netns.rs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::Duration;

use tandem_bench::loadgen::{self, OpenLoop, Protocol};
use tandem_bench::tandem::TraceReading;
use tandem_bench::topology::{self, Program, Tools, Topology};

mod support;

use support::tandem_proxy;

const REQUESTS: u64 = 200;

fn tools() -> Tools {
    Tools {
        bench: PathBuf::from(env!("CARGO_BIN_EXE_tandem-bench")),
        haproxy: Program::Missing("not used".into()),
        nginx: Program::Missing("not used".into()),
        tandem: Program::Found(tandem_proxy()),
    }
}

/// Sends [`REQUESTS`] through `topology` and returns what it exported since it started, once
/// every span has been flushed (the exporter sends a batch at most 5 s after its first span;
/// `settled` says when the reading is final, else it is read after 8 s), the requests the
/// client sidecar routed since it started, and the requests of the load that succeeded.
async fn traced_run(
    topology: Topology,
    settled: impl Fn(&TraceReading, u64) -> bool,
) -> (TraceReading, u64, u64) {
    let tools = tools();
    let upstream = topology::start_upstream(&tools, 32).unwrap();
    let up = upstream.target(Protocol::Http1);
    loadgen::wait_ready(&up, Duration::from_secs(10))
        .await
        .unwrap();
    let running = topology::start(topology, &tools, upstream.http1).unwrap();
    let traced = running.traced.clone().expect("a tracing topology");
    let target = running.target(Protocol::Http1);
    if let Err(e) = loadgen::wait_ready(&target, Duration::from_secs(20)).await {
        panic!("not ready: {e}\n{}", running.logs());
    }
    let load = OpenLoop {
        rate: REQUESTS,
        length: Duration::from_secs(1),
        in_flight: 8,
        h2_connections: 1,
        timeout: Duration::from_secs(5),
    };
    let outcome = loadgen::open_loop(&target, &load).await.unwrap();
    assert_eq!(outcome.summary.errors, 0, "{}", running.logs());
    // Totals since the proxies started, readiness checks included: a span of a request made
    // before a reading may be exported after it, so deltas would not add up.
    let requests = running.probes[0].read().await.unwrap();
    let mut reading = None;
    for _ in 0..80 {
        // The sink starts beside the proxies: a reading may fail until it answers.
        if let Ok(now) = traced.read().await {
            let done = settled(&now, requests);
            reading = Some(now);
            if done {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reading = reading.unwrap_or_else(|| panic!("no trace reading\n{}", running.logs()));
    (reading, requests, outcome.summary.ok)
}

#[tokio::test]
async fn at_100_percent_both_sidecars_export_a_span_for_every_request() {
    let (reading, requests, ok) = traced_run(Topology::TandemTrace100, |r, requests| {
        r.spans.exported + r.spans.dropped >= 2 * requests
    })
    .await;
    assert_eq!(ok, REQUESTS);
    // The readiness check's requests count too.
    assert!(
        requests >= REQUESTS,
        "the client sidecar routed every request"
    );
    assert_eq!(reading.spans.dropped, 0, "{reading:?}");
    assert_eq!(reading.spans.exported, 2 * requests, "{reading:?}");
    assert!(reading.sink_posts >= 1, "{reading:?}");
    // Each span is tens of bytes of protobuf at least: the sink got real payloads.
    assert!(reading.sink_bytes >= 20 * 2 * REQUESTS, "{reading:?}");
}

#[tokio::test]
async fn at_1_percent_the_counters_exist_and_each_sampled_trace_exports_both_spans() {
    // How many are sampled is random, so the reading waits the whole 8 s (past the exporter's
    // 5 s flush). A trace is sampled once, at the client sidecar, and the server sidecar
    // follows its traceparent: spans come in pairs.
    let (reading, requests, _) = traced_run(Topology::TandemTrace1, |_, _| false).await;
    assert!(requests >= REQUESTS);
    assert_eq!(reading.spans.dropped, 0, "{reading:?}");
    assert_eq!(reading.spans.exported % 2, 0, "{reading:?}");
    // 1 % of 200: about 2 traces; 40 would be 20 %, not 1 %.
    assert!(reading.spans.exported < 40, "{reading:?}");
    assert_eq!(
        reading.sink_posts == 0,
        reading.spans.exported == 0,
        "{reading:?}"
    );
}

#[test]
fn the_untraced_two_hops_have_no_export_path() {
    let tools = tools();
    let upstream = "127.0.0.1:9".parse().unwrap();
    let running = topology::start(Topology::TandemTwoHops, &tools, upstream).unwrap();
    assert!(running.traced.is_none());
    assert_eq!(Topology::TandemTwoHops.sampling_percent(), None);
    assert_eq!(Topology::TandemTrace100.sampling_percent(), Some(100.0));
}
