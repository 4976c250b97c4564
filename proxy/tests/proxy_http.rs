//! The HTTP path over real sockets, without iptables: connections that were not redirected are
//! routed by their authority (outbound: the config's services; inbound: 127.0.0.1:<port>).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::upstream::{self, bind_local};
use support::{ConfigDir, Proxy, config, get, h2_client, service};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_requests_to_a_service_are_balanced_over_its_endpoints() {
    let a = upstream::http("a", bind_local());
    let b = upstream::http("b", bind_local());
    let mut dir = ConfigDir::new();
    dir.publish(&config(
        "v1",
        vec![service("web", "127.0.0.1", 18080, "detect", &[a, b])],
    ));
    let proxy = Proxy::start(&dir.path());
    let mut seen = Vec::new();
    for _ in 0..4 {
        let r = get(proxy.outbound, "127.0.0.1:18080", "/hello", &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        seen.push(r.body);
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "a GET /hello",
            "a GET /hello",
            "b GET /hello",
            "b GET /hello"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hops_reach_the_app_and_trace_headers_pass_through_untouched() {
    let app = upstream::http("app", bind_local());
    let mut empty = ConfigDir::new();
    empty.publish(&config("server", vec![]));
    let server_proxy = Proxy::start(&empty.path());
    let mut dir = ConfigDir::new();
    dir.publish(&config(
        "client",
        vec![service(
            "app",
            "127.0.0.1",
            app.port(),
            "http",
            &[server_proxy.inbound],
        )],
    ));
    let client_proxy = Proxy::start(&dir.path());

    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let headers = [
        ("traceparent", tp),
        ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
        ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
    ];
    let authority = format!("127.0.0.1:{}", app.port());
    let r = get(client_proxy.outbound, &authority, "/orders?id=7", &headers)
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "app GET /orders");
    for (k, v) in headers {
        assert_eq!(
            r.headers.get(format!("echo-{k}")).unwrap(),
            v,
            "{k} changed on the way"
        );
    }

    // One access-log line per request on each hop.
    support::eventually(
        "access logs on both hops",
        Duration::from_secs(5),
        async || client_proxy.access_log().len() == 1 && server_proxy.access_log().len() == 1,
    )
    .await;
    let out = &client_proxy.access_log()[0];
    assert_eq!(out["direction"], "outbound");
    assert_eq!(out["dst_service"], "test/app");
    assert_eq!(out["method"], "GET");
    assert_eq!(out["path"], "/orders");
    assert_eq!(out["status"], 200);
    assert_eq!(out["traceparent"], tp);
    assert_eq!(out["upstream"], server_proxy.inbound.to_string());
    assert!(out["timestamp"].is_string() && out["duration_ms"].is_number());
    assert!(out["bytes_in"].is_number() && out["bytes_out"] == 15);
    let inb = &server_proxy.access_log()[0];
    assert_eq!(inb["direction"], "inbound");
    assert_eq!(inb["upstream"], app.to_string());

    let (_, metrics) = client_proxy.admin("/metrics").await;
    let outbound = [
        ("reporter", "source"),
        ("destination_service", "app.test.svc.cluster.local"),
        ("response_code", "200"),
    ];
    assert_eq!(
        support::series_sum(&metrics, "tandem_requests_total", &outbound),
        Some(1),
        "{metrics}"
    );
    assert_eq!(
        support::series_sum(
            &metrics,
            "tandem_request_duration_milliseconds_count",
            &outbound
        ),
        Some(1)
    );
    let (_, metrics) = server_proxy.admin("/metrics").await;
    assert_eq!(
        support::series_sum(
            &metrics,
            "tandem_requests_total",
            &[("reporter", "destination")]
        ),
        Some(1),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_grpc_style_streams_cross_two_hops_both_ways() {
    grpc_style_stream_through_two_hops("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_is_detected_when_the_port_declares_no_protocol() {
    grpc_style_stream_through_two_hops("detect").await;
}

async fn grpc_style_stream_through_two_hops(protocol: &str) {
    let app = upstream::http("app", bind_local());
    let mut empty = ConfigDir::new();
    empty.publish(&config("server", vec![]));
    let server_proxy = Proxy::start(&empty.path());
    let mut dir = ConfigDir::new();
    dir.publish(&config(
        "client",
        vec![service(
            "grpc",
            "127.0.0.1",
            app.port(),
            protocol,
            &[server_proxy.inbound],
        )],
    ));
    let client_proxy = Proxy::start(&dir.path());

    let mut sender = h2_client(client_proxy.outbound).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, std::convert::Infallible>>(4);
    let body = StreamBody::new(tokio_stream_from(rx));
    let req = hyper::Request::post(format!("http://127.0.0.1:{}/echo", app.port()))
        .header("content-type", "application/grpc")
        .body(BodyExt::boxed(body))
        .unwrap();
    tx.send(Ok(Frame::data(Bytes::from_static(b"ping-1"))))
        .await
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-version"],
        "HTTP/2.0",
        "the app must be reached over h2c"
    );
    let mut incoming = resp.into_body();
    // The first message comes back before the client has finished sending: a real stream.
    let first = next_data(&mut incoming).await;
    assert_eq!(first, "ping-1");
    tx.send(Ok(Frame::data(Bytes::from_static(b"ping-2"))))
        .await
        .unwrap();
    assert_eq!(next_data(&mut incoming).await, "ping-2");
    drop(tx);
    assert!(incoming.frame().await.is_none_or(|f| f.is_ok()));
}

async fn next_data(body: &mut hyper::body::Incoming) -> String {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Ok(data) = frame.into_data()
            && !data.is_empty()
        {
            return String::from_utf8_lossy(&data).into_owned();
        }
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
