//! The upstream every topology forwards to: a small HTTP server answering every request with
//! the same fixed body, over HTTP/1.1 and h2c (prior knowledge) on one port.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// The body the upstream answers with: `size` bytes of text ending in a newline.
pub fn fixed_body(size: usize) -> Bytes {
    let mut body = vec![b'x'; size];
    if let Some(last) = body.last_mut() {
        *last = b'\n';
    }
    Bytes::from(body)
}

/// Whether the `n`th request (counting from 1) is one a server failing every `fail_every`th
/// request answers with 503; `None` or 0 never fails.
pub fn fails(n: u64, fail_every: Option<u64>) -> bool {
    fail_every.is_some_and(|every| every > 0 && n.is_multiple_of(every))
}

/// Serves `body` to every request on `listener` until the process ends.
pub async fn serve(listener: TcpListener, body: Bytes) {
    serve_failing(listener, body, None).await;
}

/// Serves `body`, except that every `fail_every`th request is answered 503 (the resilience
/// benchmark's misbehaving endpoint).
pub async fn serve_failing(listener: TcpListener, body: Bytes, fail_every: Option<u64>) {
    let served = Arc::new(AtomicU64::new(0));
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors or a reset in the backlog: keep serving the others.
                eprintln!("upstream: accept: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        let served = served.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_request| {
                let body = body.clone();
                let n = served.fetch_add(1, Ordering::Relaxed) + 1;
                async move {
                    let mut response = Response::new(Full::new(body));
                    if fails(n, fail_every) {
                        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            // A client closing mid-request is routine under load; nothing to report.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadgen::{Protocol, Target, wait_ready};

    #[test]
    fn the_body_has_the_requested_size() {
        assert_eq!(fixed_body(32).len(), 32);
        assert_eq!(fixed_body(32).last(), Some(&b'\n'));
        assert!(fixed_body(0).is_empty());
    }

    #[test]
    fn a_server_failing_every_second_request_fails_half_of_them() {
        let failed = (1..=100).filter(|&n| fails(n, Some(2))).count();
        assert_eq!(failed, 50);
        assert!(!(1..=100).any(|n| fails(n, None) || fails(n, Some(0))));
    }

    #[tokio::test]
    async fn the_upstream_answers_http1_and_h2c_on_one_port() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, fixed_body(32)));
        for protocol in [Protocol::Http1, Protocol::H2c] {
            let target = Target {
                addr,
                authority: addr.to_string(),
                protocol,
            };
            wait_ready(&target, Duration::from_secs(5)).await.unwrap();
        }
    }
}
