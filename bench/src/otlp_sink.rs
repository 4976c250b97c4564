//! The OTLP/HTTP load sink the tracing topologies export to (`tandem-bench otlp-sink`): it
//! answers `POST /v1/traces` with 200 and an empty body after reading the request body, and
//! counts the POSTs and their bytes; `GET /stats` says how many (`posts <n> bytes <n>`).
//!
//! It decodes nothing: what is measured is what exporting costs the proxy, and a collector's
//! own work runs in another process anyway. The end-to-end proof that the spans are real
//! OTLP is the proxy's test suite against the OpenTelemetry Collector; here the proxies' own
//! `tandem_trace_spans_exported_total` says what the sink accepted.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// The path spans are POSTed to (OTLP/HTTP).
pub const TRACES_PATH: &str = "/v1/traces";
/// The path the counts are read from.
pub const STATS_PATH: &str = "/stats";

/// What the sink has received so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// `POST /v1/traces` requests answered 200.
    pub posts: u64,
    /// Their bodies' bytes.
    pub bytes: u64,
}

impl SinkStats {
    /// The `GET /stats` body.
    pub fn render(&self) -> String {
        format!("posts {} bytes {}\n", self.posts, self.bytes)
    }

    /// Parses a `GET /stats` body (`None`: not one).
    pub fn parse(text: &str) -> Option<Self> {
        let mut words = text.split_whitespace();
        let mut field = |name: &str| -> Option<u64> {
            (words.next()? == name).then_some(())?;
            words.next()?.parse().ok()
        };
        let stats = Self {
            posts: field("posts")?,
            bytes: field("bytes")?,
        };
        words.next().is_none().then_some(stats)
    }
}

#[derive(Default)]
struct Counters {
    posts: AtomicU64,
    bytes: AtomicU64,
}

impl Counters {
    fn stats(&self) -> SinkStats {
        SinkStats {
            posts: self.posts.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

/// Serves the sink on `listener` until the process ends.
pub async fn serve(listener: TcpListener) {
    let counters = Arc::new(Counters::default());
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                eprintln!("otlp-sink: accept: {error}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let counters = counters.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(request, counters.clone()));
            // The proxy's exporter keeps its connection alive; a close is routine.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    counters: Arc<Counters>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let status = match (request.method(), request.uri().path()) {
        (&Method::POST, TRACES_PATH) => match request.into_body().collect().await {
            Ok(body) => {
                counters
                    .bytes
                    .fetch_add(body.to_bytes().len() as u64, Ordering::Relaxed);
                counters.posts.fetch_add(1, Ordering::Relaxed);
                StatusCode::OK
            }
            // The exporter gave up mid-body: not an accepted export.
            Err(_) => StatusCode::BAD_REQUEST,
        },
        (&Method::GET, STATS_PATH) => {
            return Ok(Response::new(Full::new(Bytes::from(
                counters.stats().render(),
            ))));
        }
        _ => StatusCode::NOT_FOUND,
    };
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin;

    #[test]
    fn stats_round_trip_and_refuse_anything_else() {
        let stats = SinkStats {
            posts: 3,
            bytes: 12_345,
        };
        assert_eq!(SinkStats::parse(&stats.render()), Some(stats));
        assert_eq!(SinkStats::parse("posts 3"), None);
        assert_eq!(SinkStats::parse("bytes 3 posts 4"), None);
        assert_eq!(SinkStats::parse("posts x bytes 4"), None);
        assert_eq!(SinkStats::parse("posts 1 bytes 2 more"), None);
    }

    async fn post(addr: std::net::SocketAddr, path: &str, body: &'static [u8]) -> u16 {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = Request::post(path)
            .header(hyper::header::HOST, addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from_static(body)))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        response.into_body().collect().await.unwrap();
        status
    }

    #[tokio::test]
    async fn the_sink_accepts_trace_posts_and_counts_their_bytes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener));
        assert_eq!(post(addr, TRACES_PATH, b"0123456789").await, 200);
        assert_eq!(post(addr, TRACES_PATH, b"abc").await, 200);
        // Not the traces path: refused and not counted.
        assert_eq!(post(addr, "/v1/metrics", b"ignored").await, 404);
        let text = admin::get(addr, STATS_PATH).await.unwrap();
        assert_eq!(
            SinkStats::parse(&text),
            Some(SinkStats {
                posts: 2,
                bytes: 13
            })
        );
    }
}
