//! Tracing's cost per request, off / 1 % / 100 % sampled, side by side: what the outbound
//! proxy's hooks do for one request without an incoming context — read the headers and decide
//! (`request_filter`), begin the attempt's span (`upstream_peer`), write `traceparent` onto the
//! upstream request (`upstream_request_filter`), note the response, end the span and format
//! the access log's ids (`logging`) — plus, for a sampled request, everything its span costs
//! after that: the queue, the export task's OTLP encoding and the POST to a collector (a local
//! HTTP server in the process that reads each batch and answers 200).
//!
//! CPU time is the whole process's (every thread's `/proc/self/task/*/schedstat`), measured
//! until the export task has sent every span, so the export is counted, not deferred. The
//! queue holds every span of a run, so none is dropped.
//!
//! `cargo bench -p tandem-proxy --bench trace` (no harness).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use pingora::http::RequestHeader;
use tandem_crds::contract::ProxyConfig;
use tandem_proxy::metrics::TraceMetrics;
use tandem_proxy::trace::export::Exporter;
use tandem_proxy::trace::{Hop, RequestTrace, TraceSettings, end_of};

const REQUESTS: u32 = 200_000;
const RUNS: usize = 5;

fn process_cpu_nanos() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

fn settings(collector: &str, percent: f64) -> Arc<TraceSettings> {
    let config = ProxyConfig::from_json(
        format!(
            r#"{{"apiVersion":"tandem.dev/proxy-config/v1","workload":{{"namespace":"shop","serviceAccount":"web"}},"telemetry":{{"tracing":{{"collector":"{collector}","samplingPercent":{percent}}}}}}}"#
        )
        .as_bytes(),
    )
    .unwrap();
    TraceSettings::compile(&config).unwrap().unwrap()
}

/// A collector that reads each export and answers 200.
fn sink(rt: &tokio::runtime::Runtime) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::new())))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    format!("http://{addr}")
}

/// One request's tracing, as the outbound hooks run it.
/// Returns whether it was sampled, and the length of the logged ids (so they are not
/// optimised away).
fn request(
    settings: Option<&Arc<TraceSettings>>,
    exporter: &Exporter,
    req: &RequestHeader,
) -> (bool, usize) {
    let mut trace = RequestTrace::begin(settings, false, req, false, None);
    let sampled = trace.is_recording();
    trace.destination_port(80);
    let hop = Hop {
        service: "shop/orders",
        route: Some("orders"),
        ..Hop::default()
    };
    trace.begin_attempt(exporter, "10.244.1.9:8080".parse().unwrap(), &hop);
    let mut upstream = req.clone();
    trace.write(&mut upstream).unwrap();
    trace.attempt_response(200);
    trace.finish(exporter, &hop, end_of(200, false, None));
    let ids = trace.log_ids();
    std::hint::black_box(&upstream);
    (
        sampled,
        ids.map_or(0, |(t, s)| t.as_str().len() + s.as_str().len()),
    )
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let collector = sink(&rt);
    let mut req = RequestHeader::build("GET", b"/orders/42?expand=items", None).unwrap();
    req.insert_header("host", "orders.shop:80").unwrap();
    req.insert_header("user-agent", "bench/1").unwrap();
    req.insert_header("accept", "application/json").unwrap();
    println!("| tracing | CPU ns/request | spans exported per run |");
    println!("|---|---:|---:|");
    for (label, percent) in [("off", None), ("1 %", Some(1.0)), ("100 %", Some(100.0))] {
        let settings = percent.map(|p| settings(&collector, p));
        let mut results = Vec::new();
        for _ in 0..=RUNS {
            let mut registry = prometheus_client::registry::Registry::default();
            let metrics = TraceMetrics::register(&mut registry);
            let for_task = settings.clone();
            let exporter = {
                let _inside = rt.enter();
                Exporter::spawn(
                    REQUESTS as usize,
                    Duration::from_millis(100),
                    Box::new(move || for_task.clone()),
                    metrics.clone(),
                )
            };
            let cpu = process_cpu_nanos();
            let mut sink = 0;
            let mut sampled = 0u64;
            for _ in 0..REQUESTS {
                let (recorded, len) =
                    request(settings.as_ref(), &exporter, std::hint::black_box(&req));
                sampled += u64::from(recorded);
                sink += len;
            }
            std::hint::black_box(sink);
            // Batches of 512 go at once; the last partial one at the flush: waited for (the
            // wait itself is idle, not CPU), so every span's export is in the figure.
            let deadline = Instant::now() + Duration::from_secs(60);
            while metrics.exported.get() < sampled && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            assert_eq!(
                metrics.exported.get(),
                sampled,
                "every sampled span exported"
            );
            let spent = (process_cpu_nanos() - cpu) as f64 / f64::from(REQUESTS);
            assert_eq!(
                metrics.dropped_queue_full.get(),
                0,
                "the queue holds a whole run"
            );
            assert_eq!(
                metrics.export_errors.get(),
                0,
                "the sink takes every export"
            );
            results.push((spent, metrics.exported.get()));
            drop(exporter);
        }
        results.remove(0); // warm-up
        let mut cpu: Vec<f64> = results.iter().map(|r| r.0).collect();
        cpu.sort_by(f64::total_cmp);
        let exported = results.iter().map(|r| r.1).max().unwrap_or(0);
        println!("| {label} | {:.0} | {exported} |", cpu[cpu.len() / 2]);
    }
    println!(
        "\nmedian of {RUNS} runs of {REQUESTS} requests (after one warm-up run); release build; \
         process CPU including the export task and the local collector's HTTP server"
    );
}
