//! Shutdown, bad input and the admin port's isolation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::upstream::{self, bind_local};
use support::{ConfigDir, Proxy, config, get, service};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_requests_in_flight_then_exits_zero() {
    let slow = upstream::http("slow", bind_local());
    let mut dir = ConfigDir::new();
    dir.publish(&config(
        "v1",
        vec![service("slow", "127.0.0.1", 18090, "http", &[slow])],
    ));
    let mut proxy = Proxy::start(&dir.path());
    let addr = proxy.outbound;
    let in_flight = tokio::spawn(async move { get(addr, "127.0.0.1:18090", "/slow", &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.sigterm();
    let r = in_flight.await.unwrap().unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "slow GET /slow");
    let status = tokio::task::spawn_blocking(move || {
        let status = proxy.wait_exit(Duration::from_secs(10));
        (status, proxy)
    })
    .await
    .unwrap();
    assert_eq!(status.0.code(), Some(0));
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "still accepting after exit"
    );
}

/// Sends raw bytes; returns what came back and whether the proxy closed the connection
/// (within 5 s).
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> (String, bool) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(bytes).await;
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out))
        .await
        .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

fn status_of(reply: &str) -> Option<u16> {
    reply.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_smuggling_requests_get_a_4xx_or_a_close_and_the_next_client_is_served() {
    let app = upstream::http("app", bind_local());
    let mut dir = ConfigDir::new();
    dir.publish(&config(
        "v1",
        vec![service("app", "127.0.0.1", 18091, "http", &[app])],
    ));
    let proxy = Proxy::start(&dir.path());
    let host = "Host: 127.0.0.1:18091\r\n";
    let huge = "a".repeat(200 * 1024);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("CL and TE", format!("POST / HTTP/1.1\r\n{host}Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n{host}\r\n").into_bytes()),
        ("two CLs", format!("POST / HTTP/1.1\r\n{host}Content-Length: 1\r\nContent-Length: 20\r\n\r\nxGET /smuggled HTTP/1.1\r\n\r\n").into_bytes()),
        ("oversized header", format!("GET / HTTP/1.1\r\n{host}X-Big: {huge}\r\n\r\n").into_bytes()),
        ("garbage request line", b"GET \x00\x01\x02 nonsense\r\n\r\n".to_vec()),
        ("bad chunk size", format!("POST / HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n").into_bytes()),
    ];
    for (name, bytes) in cases {
        let (reply, closed) = raw(proxy.outbound, &bytes).await;
        assert!(
            !reply.contains("/smuggled"),
            "{name}: smuggled request reached the app: {reply}"
        );
        let responses = reply.matches("HTTP/1.1 ").count();
        match status_of(&reply) {
            Some(code) if (400..500).contains(&code) => {}
            // RFC 9112 §6.1: with both headers, chunked wins and the connection is closed after
            // the one response, so the bytes after the chunked body are never read as a request.
            Some(200) if name == "CL and TE" && closed && responses == 1 => {}
            None => assert!(closed, "{name}: neither answered nor closed"),
            Some(code) => panic!("{name}: got {code}: {reply}"),
        }
        let ok = get(proxy.outbound, "127.0.0.1:18091", "/after", &[])
            .await
            .unwrap();
        assert_eq!(ok.body, "app GET /after", "after {name}");
    }
    assert!(proxy.child.id() > 0);
    assert_eq!(proxy.admin("/live").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_port_is_not_reachable_through_the_inbound_listener() {
    let mut dir = ConfigDir::new();
    dir.publish(&config("v1", vec![]));
    let proxy = Proxy::start(&dir.path());
    let authority = format!("127.0.0.1:{}", proxy.admin.port());
    let r = get(proxy.inbound, &authority, "/config", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 403);
    assert!(!r.body.contains("apiVersion"));
    // The admin port itself answers.
    assert_eq!(proxy.admin("/live").await.0, 200);
    let (status, body) = proxy.admin("/config").await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["config"]["apiVersion"], "tandem.dev/proxy-config/v1");
    assert_eq!(v["hash"].as_str().unwrap().len(), 64);
    assert!(v["loadedAt"].is_string());
}
