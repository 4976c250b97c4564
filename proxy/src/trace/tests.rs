//! The request-path state machine, without sockets: what is decided, written and recorded.

use super::*;
use crate::metrics::TraceMetrics;

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn settings(percent: f64) -> Arc<TraceSettings> {
    let config = ProxyConfig::from_json(
        format!(
            r#"{{"apiVersion":"tandem.dev/proxy-config/v1","workload":{{"namespace":"shop","serviceAccount":"web"}},"telemetry":{{"tracing":{{"collector":"http://otel:4318","samplingPercent":{percent}}}}}}}"#
        )
        .as_bytes(),
    )
    .unwrap();
    TraceSettings::compile(&config).unwrap().unwrap()
}

fn request(headers: &[(&'static str, &'static str)]) -> RequestHeader {
    let mut req = RequestHeader::build("GET", b"/orders?id=7", None).unwrap();
    req.insert_header("host", "web.shop:8080").unwrap();
    for (k, v) in headers {
        req.append_header(*k, *v).unwrap();
    }
    req
}

fn written(trace: &RequestTrace, name: &str) -> Option<String> {
    let mut upstream = request(&[]);
    trace.write(&mut upstream).unwrap();
    upstream
        .headers
        .get(name)
        .map(|v| v.to_str().unwrap().to_owned())
}

fn exporter() -> (Exporter, tokio::sync::mpsc::Receiver<SpanRecord>) {
    let mut registry = prometheus_client::registry::Registry::default();
    Exporter::channel(16, TraceMetrics::register(&mut registry))
}

#[test]
fn tracing_off_writes_nothing_but_logs_the_incoming_ids() {
    let trace = RequestTrace::begin(None, true, &request(&[("traceparent", TP)]), false, None);
    assert!(!trace.is_recording());
    assert_eq!(written(&trace, "traceparent"), None);
    let (t, s) = trace.log_ids().unwrap();
    assert_eq!(t.as_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(s.as_str(), "00f067aa0ba902b7");
    assert!(
        RequestTrace::begin(None, true, &request(&[]), false, None)
            .log_ids()
            .is_none()
    );
}

#[test]
fn a_sampled_off_context_passes_through_unchanged() {
    let off = TP.replace("-01", "-00");
    let req = request(&[("traceparent", Box::leak(off.into_boxed_str()))]);
    let trace = RequestTrace::begin(Some(&settings(100.0)), true, &req, false, None);
    assert!(!trace.is_recording());
    assert_eq!(written(&trace, "traceparent"), None, "left as it came");
    assert_eq!(trace.log_ids().unwrap().1.as_str(), "00f067aa0ba902b7");
}

#[test]
fn a_sampled_context_is_continued_with_the_proxy_s_span_as_parent() {
    let trace = RequestTrace::begin(
        Some(&settings(0.0)),
        true,
        &request(&[("traceparent", TP)]),
        false,
        None,
    );
    assert!(trace.is_recording(), "the parent decides, not the 0 %");
    let tp = written(&trace, "traceparent").unwrap();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{tp}"
    );
    assert!(tp.ends_with("-01"));
    let (_, span) = trace.log_ids().unwrap();
    assert_eq!(
        &tp[36..52],
        span.as_str(),
        "the upstream's parent is the SERVER span"
    );
    assert_ne!(span.as_str(), "00f067aa0ba902b7");
}

#[test]
fn without_a_context_the_probability_decides_and_the_decision_travels() {
    let root = RequestTrace::begin(Some(&settings(100.0)), false, &request(&[]), false, None);
    assert!(root.is_recording());
    assert!(written(&root, "traceparent").unwrap().ends_with("-01"));
    let none = RequestTrace::begin(Some(&settings(0.0)), false, &request(&[]), false, None);
    assert!(!none.is_recording());
    let tp = written(&none, "traceparent").unwrap();
    assert!(
        tp.ends_with("-00"),
        "the next proxy must not draw again: {tp}"
    );
    assert_eq!(&tp[3..35], none.log_ids().unwrap().0.as_str());
}

#[test]
fn b3_is_written_back_in_its_own_form() {
    let single = request(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]);
    let trace = RequestTrace::begin(Some(&settings(1.0)), true, &single, false, None);
    let b3 = written(&trace, "b3").unwrap();
    assert!(b3.starts_with("80f198ee56343ba864fe8b2a57d3eff7-"), "{b3}");
    assert!(b3.ends_with("-1-e457b5a2e4d86bd1"), "parent named: {b3}");
    assert_eq!(written(&trace, "traceparent"), None);
    let multi = request(&[
        ("x-b3-traceid", "a3ce929d0e0e4736"),
        ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ("x-b3-sampled", "1"),
    ]);
    let trace = RequestTrace::begin(Some(&settings(1.0)), true, &multi, false, None);
    assert_eq!(written(&trace, "x-b3-traceid").unwrap(), "a3ce929d0e0e4736");
    assert_eq!(
        written(&trace, "x-b3-parentspanid").unwrap(),
        "e457b5a2e4d86bd1"
    );
    assert_eq!(written(&trace, "x-b3-sampled").unwrap(), "1");
    assert_eq!(
        written(&trace, "x-b3-spanid").unwrap(),
        trace.log_ids().unwrap().1.as_str()
    );
}

#[test]
fn each_outbound_attempt_is_a_client_span_under_the_same_parent() {
    let (exporter, mut spans) = exporter();
    let mut trace = RequestTrace::begin(
        Some(&settings(1.0)),
        false,
        &request(&[("traceparent", TP)]),
        false,
        None,
    );
    trace.destination_port(80);
    let hop = Hop {
        service: "shop/web",
        route: Some("orders"),
        ..Hop::default()
    };
    let endpoint: SocketAddr = "10.0.0.7:8080".parse().unwrap();
    trace.begin_attempt(&exporter, endpoint, &hop);
    let first = written(&trace, "traceparent").unwrap();
    trace.attempt_response(503);
    trace.end_attempt(
        &exporter,
        &hop,
        End {
            status: 0,
            error: Some(ErrorType::Status(503)),
        },
    );
    trace.begin_attempt(&exporter, endpoint, &hop);
    let second = written(&trace, "traceparent").unwrap();
    assert_ne!(
        first[36..52],
        second[36..52],
        "each attempt its own span id"
    );
    trace.attempt_response(200);
    trace.finish(&exporter, &hop, end_of(200, false, None));
    let a = spans.try_recv().unwrap();
    let b = spans.try_recv().unwrap();
    assert!(spans.try_recv().is_err());
    assert_eq!(
        (a.kind, a.attempt, a.status, a.error),
        (Kind::Client, 1, 503, Some(ErrorType::Status(503)))
    );
    assert_eq!((b.attempt, b.status, b.error), (2, 200, None));
    assert_eq!(a.parent, b.parent);
    assert_eq!(
        Hex::<16>::of(&a.parent.unwrap()).as_str(),
        "00f067aa0ba902b7"
    );
    assert_eq!(a.name(), "web.shop:80/orders");
    assert_eq!(&second[36..52], Hex::<16>::of(&b.span_id).as_str());
}

#[test]
fn a_refused_outbound_request_still_gets_a_client_span() {
    let (exporter, mut spans) = exporter();
    let mut trace = RequestTrace::begin(Some(&settings(100.0)), false, &request(&[]), false, None);
    let hop = Hop {
        service: "shop/web",
        policy: Some("max-connections"),
        ..Hop::default()
    };
    trace.finish(&exporter, &hop, end_of(503, true, None));
    let span = spans.try_recv().unwrap();
    assert_eq!((span.attempt, span.parent), (0, None));
    assert_eq!(span.policy.as_deref(), Some("max-connections"));
    assert_eq!(span.error, Some(ErrorType::Status(503)));
    assert_eq!(
        Hex::<16>::of(&span.span_id).as_str(),
        trace.log_ids().unwrap().1.as_str()
    );
}

#[test]
fn the_server_span_is_named_after_the_workload_and_the_app_port() {
    let (exporter, mut spans) = exporter();
    let mut trace = RequestTrace::begin(
        Some(&settings(100.0)),
        true,
        &request(&[("tracestate", "congo=t61rcWkgMzE")]),
        true,
        None,
    );
    trace.finish(
        &exporter,
        &Hop {
            port: Some(8080),
            ..Hop::default()
        },
        end_of(200, false, None),
    );
    let span = spans.try_recv().unwrap();
    assert_eq!(span.kind, Kind::Server);
    assert_eq!(span.name(), "web.shop:8080/*");
    assert_eq!(&*span.server_address, "web.shop");
    assert_eq!(span.protocol_version, "2");
    assert_eq!(span.trace_state.unwrap(), "congo=t61rcWkgMzE");
}

#[test]
fn authorities_split_into_host_and_port() {
    assert_eq!(
        (
            authority_host("web.shop:8080"),
            authority_port("web.shop:8080")
        ),
        ("web.shop", 8080)
    );
    assert_eq!((authority_host("web"), authority_port("web")), ("web", 80));
    assert_eq!(
        (authority_host("[::1]:9"), authority_port("[::1]:9")),
        ("::1", 9)
    );
    assert_eq!(authority_port("[::1]"), 80);
}
