//! `tandem-testapp`: the test application the node agent runs for the test images.
//!
//! - `server --listen ADDR[,ADDR…] --name NAME [--fail-every N] [--tcp-listen ADDR]
//!   [--linger SECONDS]`: answers every request, whatever its method, on every listen address
//!   with its name (so a client sees which version served it), failing every Nth request with
//!   503; `/healthz` answers `ok`. With `--tcp-listen`, also echoes every byte of every TCP
//!   connection there back (an opaque protocol whose client speaks first). With `--linger`,
//!   keeps serving that long after SIGTERM, as an app behind a `preStop` sleep does while its
//!   endpoint's removal propagates.
//!   Paths choose the answer: `/status/<code>` answers with that status, `/grpc/<code>` as a
//!   gRPC server failing with that status does (HTTP 200, `content-type: application/grpc`,
//!   `grpc-status: <code>`, trailers-only); any other path answers 200 (or 503 per
//!   `--fail-every`). Every answer carries `x-testapp-trace-<name>`: the `traceparent` the
//!   request arrived with ("" when none), so a client sees what each hop of a chain received.
//!   With `--forward URL`, every request but `/healthz` is sent on to URL with the same path,
//!   method and content type (over HTTP/2 when it came over HTTP/2), and answered with what
//!   came back (status, body, content type, `grpc-*` and `x-testapp-trace-*` headers): a
//!   middle tier. It forwards the trace headers (`traceparent`, `tracestate`, B3) as an
//!   instrumented app must, unless `--forward-trace-headers=false`: an app that does not.
//! - `client --target URL [--rps R] [--stats-listen ADDR]`: sends R requests per second to
//!   URL (none with `--rps 0`) and serves what it observed at `/stats` (counts by status and
//!   body, p50/p99 latency, and per body when the last request answered with it was sent, in
//!   unix milliseconds; `/stats?reset=1` starts a new window). `/burst?n=N` sends exactly N
//!   more requests (`&concurrency=C` at once, `&rps=R` paced, `&target=URL` elsewhere,
//!   `&method=POST` another method, `&header=NAME[,NAME…]` counting the values of those response
//!   headers, joined by `|`; `&content_type=…` sent as the request's content type, `&h2=true`
//!   over HTTP/2 with prior knowledge, as a gRPC client speaks) and answers with what those N
//!   observed: a bounded measurement from inside the pod.
//!   `/tcp?n=N&target=HOST:PORT` opens N TCP connections (`&concurrency=C` at once), writes one
//!   line on each and reads until the line comes back, the peer closes, or 5 s pass; it answers
//!   with the outcomes and how many bytes came back in all.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde::Serialize;

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve requests, answering with `--name`.
    Server {
        /// Where to serve HTTP (comma-separated for several ports).
        #[arg(
            long,
            env = "LISTEN",
            default_value = "0.0.0.0:8080",
            value_delimiter = ','
        )]
        listen: Vec<SocketAddr>,
        #[arg(long, env = "NAME", default_value = "server")]
        name: String,
        /// Fail every Nth request with 503 (0: never).
        #[arg(long, env = "FAIL_EVERY", default_value_t = 0)]
        fail_every: u64,
        /// Where to echo TCP, if anywhere.
        #[arg(long, env = "TCP_LISTEN")]
        tcp_listen: Option<SocketAddr>,
        /// Seconds to keep serving after SIGTERM.
        #[arg(long, env = "LINGER", default_value_t = 0)]
        linger: u64,
        /// Send every request on to this URL (a middle tier) instead of answering it.
        #[arg(long, env = "FORWARD")]
        forward: Option<String>,
        /// Whether forwarded requests carry the trace headers they came with.
        #[arg(long, env = "FORWARD_TRACE_HEADERS", default_value_t = true, action = clap::ArgAction::Set)]
        forward_trace_headers: bool,
    },
    /// Send requests and report what came back.
    Client {
        #[arg(long, env = "TARGET")]
        target: String,
        /// Requests per second in the background (0: only bursts).
        #[arg(long, env = "RPS", default_value_t = 50)]
        rps: u32,
        #[arg(long, env = "STATS_LISTEN", default_value = "0.0.0.0:9090")]
        stats_listen: SocketAddr,
    },
}

#[derive(Debug, Default)]
struct Window {
    started: Option<Instant>,
    by_status: BTreeMap<String, u64>,
    by_body: BTreeMap<String, u64>,
    /// Values of the response headers a burst asked for, joined by `|` ("" when absent).
    by_header: BTreeMap<String, u64>,
    latencies_us: Vec<u64>,
    /// Per body, when the last request answered with it was sent (unix milliseconds).
    last_sent_by_body: BTreeMap<String, u64>,
}

#[derive(Debug, Serialize)]
struct Stats {
    seconds: f64,
    total: u64,
    ok: u64,
    by_status: BTreeMap<String, u64>,
    by_body: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    by_header: BTreeMap<String, u64>,
    p50_ms: f64,
    p99_ms: f64,
    /// Per body, when the last request answered with it was sent (unix milliseconds): the
    /// machine's clock, so a test compares it with its own.
    last_sent_by_body: BTreeMap<String, u64>,
}

impl Window {
    fn stats(&self) -> Stats {
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        let pick = |q: f64| {
            if sorted.is_empty() {
                return 0.0;
            }
            let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
            sorted[i.min(sorted.len() - 1)] as f64 / 1000.0
        };
        let total = self.by_status.values().sum();
        Stats {
            seconds: self.started.map_or(0.0, |s| s.elapsed().as_secs_f64()),
            total,
            ok: self.by_status.get("200").copied().unwrap_or(0),
            by_status: self.by_status.clone(),
            by_body: self.by_body.clone(),
            by_header: self.by_header.clone(),
            p50_ms: pick(0.5),
            p99_ms: pick(0.99),
            last_sent_by_body: self.last_sent_by_body.clone(),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Server {
            listen,
            name,
            fail_every,
            tcp_listen,
            linger,
            forward,
            forward_trace_headers,
        } => {
            if let Some(addr) = tcp_listen {
                let listener = tokio::net::TcpListener::bind(addr).await?;
                eprintln!("tandem-testapp TCP echo on {addr}");
                tokio::spawn(echo(listener));
            }
            let forward = forward
                .map(|url| Forward::new(&url, forward_trace_headers))
                .transpose()?;
            let answer = Answer {
                trace_header: format!("x-testapp-trace-{name}").parse()?,
                name,
                fail_every,
                count: Arc::new(AtomicU64::new(0)),
                forward,
            };
            server(listen, answer, Duration::from_secs(linger)).await
        }
        Command::Client {
            target,
            rps,
            stats_listen,
        } => client(target, rps, stats_listen).await,
    }
}

async fn server(listen: Vec<SocketAddr>, answer: Answer, linger: Duration) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .fallback(move |request: axum::extract::Request| {
            let answer = answer.clone();
            async move { answer.answer(request).await }
        });
    let mut servers = tokio::task::JoinSet::new();
    for addr in listen {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        eprintln!("tandem-testapp server on {addr}");
        let app = app.clone();
        servers.spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    shutdown().await;
                    tokio::time::sleep(linger).await;
                })
                .await
        });
    }
    // Every listener stops on SIGTERM; the first to end for another reason ends the server.
    while let Some(done) = servers.join_next().await {
        done??;
    }
    Ok(())
}

/// How the server answers a request (everything but `/healthz`).
#[derive(Clone)]
struct Answer {
    name: String,
    /// `x-testapp-trace-<name>`: the `traceparent` this server received.
    trace_header: hyper::header::HeaderName,
    fail_every: u64,
    count: Arc<AtomicU64>,
    forward: Option<Forward>,
}

/// The trace context headers an instrumented app forwards (W3C and B3).
const TRACE_HEADERS: [&str; 7] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
];

/// Where a middle tier sends requests on.
#[derive(Clone)]
struct Forward {
    base: hyper::Uri,
    trace_headers: bool,
    http1: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
    http2: Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>,
}

impl Forward {
    fn new(url: &str, trace_headers: bool) -> anyhow::Result<Self> {
        Ok(Self {
            base: url.parse()?,
            trace_headers,
            http1: Client::builder(TokioExecutor::new()).build_http(),
            http2: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        })
    }

    /// Sends `request` on (same path, method, content type; trace headers if configured) and
    /// returns the answer's parts the caller passes back.
    async fn send(&self, request: hyper::http::request::Parts) -> axum::response::Response {
        use axum::response::IntoResponse as _;
        let path = request
            .uri
            .path_and_query()
            .map_or("/", hyper::http::uri::PathAndQuery::as_str);
        let uri = match format!("{}{}", self.base.to_string().trim_end_matches('/'), path)
            .parse::<hyper::Uri>()
        {
            Ok(uri) => uri,
            Err(e) => return (StatusCode::BAD_GATEWAY, format!("forward: {e}\n")).into_response(),
        };
        let mut out = hyper::Request::builder()
            .method(request.method.clone())
            .uri(uri);
        for (name, value) in &request.headers {
            let trace = TRACE_HEADERS.contains(&name.as_str());
            if (trace && self.trace_headers) || name == hyper::header::CONTENT_TYPE {
                out = out.header(name, value);
            }
        }
        let Ok(out) = out.body(Empty::<Bytes>::new()) else {
            return (StatusCode::BAD_GATEWAY, "forward: bad request\n").into_response();
        };
        let http = if request.version == hyper::Version::HTTP_2 {
            &self.http2
        } else {
            &self.http1
        };
        let response = match tokio::time::timeout(Duration::from_secs(5), http.request(out)).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                return (StatusCode::BAD_GATEWAY, format!("forward: {e}\n")).into_response();
            }
            Err(_) => return (StatusCode::GATEWAY_TIMEOUT, "forward: timeout\n").into_response(),
        };
        let (parts, body) = response.into_parts();
        let body = match body.collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => return (StatusCode::BAD_GATEWAY, format!("forward: {e}\n")).into_response(),
        };
        let mut back = axum::response::Response::new(axum::body::Body::from(body));
        *back.status_mut() = parts.status;
        for (name, value) in &parts.headers {
            let name_str = name.as_str();
            if name == hyper::header::CONTENT_TYPE
                || name_str.starts_with("grpc-")
                || name_str.starts_with("x-testapp-trace-")
            {
                back.headers_mut().insert(name.clone(), value.clone());
            }
        }
        back
    }
}

impl Answer {
    async fn answer(&self, request: axum::extract::Request) -> axum::response::Response {
        use axum::response::IntoResponse as _;
        let seen = request
            .headers()
            .get("traceparent")
            .cloned()
            .unwrap_or_else(|| hyper::header::HeaderValue::from_static(""));
        let mut response = match &self.forward {
            Some(forward) => forward.send(request.into_parts().0).await,
            None => self.own_answer(request.uri().path()).into_response(),
        };
        response
            .headers_mut()
            .insert(self.trace_header.clone(), seen);
        response
    }

    /// The answer of a server that forwards nothing: chosen by the path, else by
    /// `--fail-every`.
    fn own_answer(&self, path: &str) -> axum::response::Response {
        use axum::response::IntoResponse as _;
        if let Some(code) = path.strip_prefix("/status/") {
            return match code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
            {
                Some(status) => {
                    (status, format!("{} {}\n", self.name, status.as_u16())).into_response()
                }
                None => (
                    StatusCode::BAD_REQUEST,
                    format!("not a status code: {code:?}\n"),
                )
                    .into_response(),
            };
        }
        if let Some(code) = path.strip_prefix("/grpc/") {
            let Ok(code) = code.parse::<u16>() else {
                return (
                    StatusCode::BAD_REQUEST,
                    format!("not a gRPC status: {code:?}\n"),
                )
                    .into_response();
            };
            // Trailers-only: a gRPC error with no message body carries its status in the
            // headers.
            return (
                StatusCode::OK,
                [
                    (hyper::header::CONTENT_TYPE, "application/grpc".to_owned()),
                    (
                        hyper::header::HeaderName::from_static("grpc-status"),
                        code.to_string(),
                    ),
                    (
                        hyper::header::HeaderName::from_static("grpc-message"),
                        format!("{}%20failing", self.name),
                    ),
                ],
            )
                .into_response();
        }
        let n = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if self.fail_every > 0 && n.is_multiple_of(self.fail_every) {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{} failing\n", self.name),
            )
                .into_response()
        } else {
            (StatusCode::OK, format!("{}\n", self.name)).into_response()
        }
    }
}

/// Echoes every connection's bytes back until the client closes its side.
async fn echo(listener: tokio::net::TcpListener) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let (mut read, mut write) = stream.split();
            let _ = tokio::io::copy(&mut read, &mut write).await;
        });
    }
}

type Http = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

/// What the client's handlers share: the background window and a way to send requests.
#[derive(Clone)]
struct ClientState {
    window: Arc<Mutex<Window>>,
    http: Http,
    target: hyper::Uri,
}

async fn client(target: String, rps: u32, stats_listen: SocketAddr) -> anyhow::Result<()> {
    let state = ClientState {
        window: Arc::new(Mutex::new(Window {
            started: Some(Instant::now()),
            ..Window::default()
        })),
        http: Client::builder(TokioExecutor::new()).build_http(),
        target: target.parse()?,
    };
    let sender = (rps > 0).then(|| {
        let state = state.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rps);
            loop {
                tick.tick().await;
                let state = state.clone();
                tokio::spawn(async move {
                    let outcome = send(&state.http, state.target.clone(), &Ask::default()).await;
                    if let Ok(mut w) = state.window.lock() {
                        w.record(outcome);
                    }
                });
            }
        })
    });
    let app = Router::new()
        .route("/stats", get(stats))
        .route("/burst", get(burst))
        .route("/tcp", get(tcp_burst))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(stats_listen).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown())
        .await?;
    if let Some(sender) = sender {
        sender.abort();
    }
    Ok(())
}

/// What one request observed.
struct Outcome {
    status: String,
    body: String,
    /// The asked-for response headers' values joined by `|` ("" when absent); `None` when none
    /// was asked for.
    header: Option<String>,
    latency: Duration,
    /// When the request was sent (unix milliseconds).
    sent_unix_ms: u64,
}

/// What to send, beyond the URL.
#[derive(Clone, Debug, Default)]
struct Ask {
    method: hyper::Method,
    /// Response headers whose values to record.
    headers: Vec<hyper::header::HeaderName>,
    /// The request's content type, if any.
    content_type: Option<hyper::header::HeaderValue>,
    /// Further request headers.
    extra: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
}

/// One request with a 5 s limit; transport errors and timeouts are outcomes, not failures.
async fn send(http: &Http, uri: hyper::Uri, ask: &Ask) -> Outcome {
    let started = Instant::now();
    let sent_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let request = tokio::time::timeout(Duration::from_secs(5), async {
        let mut request = hyper::Request::builder()
            .method(ask.method.clone())
            .uri(uri);
        if let Some(content_type) = &ask.content_type {
            request = request.header(hyper::header::CONTENT_TYPE, content_type);
        }
        for (name, value) in &ask.extra {
            request = request.header(name, value);
        }
        let request = request.body(Empty::<Bytes>::new())?;
        let response = http.request(request).await?;
        let status = response.status().as_u16().to_string();
        let header = (!ask.headers.is_empty()).then(|| {
            ask.headers
                .iter()
                .map(|name| {
                    response
                        .headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                })
                .collect::<Vec<_>>()
                .join("|")
        });
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((
            status,
            String::from_utf8_lossy(&body).trim().to_owned(),
            header,
        ))
    })
    .await;
    let (status, body, header) = match request {
        Ok(Ok(triple)) => triple,
        Ok(Err(_)) => ("error".to_owned(), String::new(), None),
        Err(_) => ("timeout".to_owned(), String::new(), None),
    };
    Outcome {
        status,
        body,
        header: header.or_else(|| (!ask.headers.is_empty()).then(String::new)),
        latency: started.elapsed(),
        sent_unix_ms,
    }
}

impl Window {
    fn record(&mut self, outcome: Outcome) {
        *self.by_status.entry(outcome.status).or_default() += 1;
        let last = self
            .last_sent_by_body
            .entry(outcome.body.clone())
            .or_default();
        *last = (*last).max(outcome.sent_unix_ms);
        *self.by_body.entry(outcome.body).or_default() += 1;
        if let Some(header) = outcome.header {
            *self.by_header.entry(header).or_default() += 1;
        }
        self.latencies_us
            .push(u64::try_from(outcome.latency.as_micros()).unwrap_or(u64::MAX));
    }
}

/// The most requests one burst may send, and the most at once.
const MAX_BURST: u64 = 100_000;
const MAX_CONCURRENCY: u64 = 64;

#[derive(Debug, Deserialize)]
struct BurstQuery {
    n: u64,
    #[serde(default = "one")]
    concurrency: u64,
    rps: Option<u32>,
    target: Option<String>,
    /// The method (default GET).
    method: Option<String>,
    /// Response headers whose values to count, comma-separated.
    header: Option<String>,
    /// The request's content type.
    content_type: Option<String>,
    /// HTTP/2 with prior knowledge.
    #[serde(default)]
    h2: bool,
    /// Request headers to send, `name:value` pairs separated by `;` (e.g. a `traceparent`).
    send_headers: Option<String>,
}

fn one() -> u64 {
    1
}

async fn burst(
    State(state): State<ClientState>,
    Query(query): Query<BurstQuery>,
) -> Result<axum::Json<Stats>, (StatusCode, String)> {
    let bad = |why: String| (StatusCode::BAD_REQUEST, why);
    if query.n > MAX_BURST || !(1..=MAX_CONCURRENCY).contains(&query.concurrency) {
        return Err(bad(format!(
            "n must be at most {MAX_BURST} and concurrency 1 to {MAX_CONCURRENCY}"
        )));
    }
    let target: hyper::Uri = match &query.target {
        Some(t) => t.parse().map_err(|e| bad(format!("target {t:?}: {e}")))?,
        None => state.target.clone(),
    };
    let ask = Ask {
        method: match &query.method {
            Some(m) => m.parse().map_err(|e| bad(format!("method {m:?}: {e}")))?,
            None => hyper::Method::GET,
        },
        headers: query
            .header
            .iter()
            .flat_map(|h| h.split(','))
            .map(|h| h.parse().map_err(|e| bad(format!("header {h:?}: {e}"))))
            .collect::<Result<_, _>>()?,
        content_type: match &query.content_type {
            Some(c) => Some(
                c.parse()
                    .map_err(|e| bad(format!("content type {c:?}: {e}")))?,
            ),
            None => None,
        },
        extra: parse_send_headers(query.send_headers.as_deref()).map_err(bad)?,
    };
    let window = Arc::new(Mutex::new(Window {
        started: Some(Instant::now()),
        ..Window::default()
    }));
    // Connections of its own: a burst must not ride on connections opened before a policy
    // changed (a proxy decides how to carry a connection when it is opened).
    let http: Http = Client::builder(TokioExecutor::new())
        .http2_only(query.h2)
        .build_http();
    let next = Arc::new(AtomicU64::new(0));
    let started = tokio::time::Instant::now();
    let pace = query
        .rps
        .filter(|r| *r > 0)
        .map(|r| Duration::from_secs(1) / r);
    let workers: Vec<_> = (0..query.concurrency)
        .map(|_| {
            let (window, next, http, target, ask) = (
                window.clone(),
                next.clone(),
                http.clone(),
                target.clone(),
                ask.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= query.n {
                        break;
                    }
                    if let Some(pace) = pace {
                        let due = pace.saturating_mul(u32::try_from(i).unwrap_or(u32::MAX));
                        tokio::time::sleep_until(started + due).await;
                    }
                    let outcome = send(&http, target.clone(), &ask).await;
                    if let Ok(mut w) = window.lock() {
                        w.record(outcome);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    }
    let w = window
        .lock()
        .map_err(|_| (StatusCode::INTERNAL_SERVER_ERROR, "poisoned".to_owned()))?;
    Ok(axum::Json(w.stats()))
}

/// `name:value` pairs separated by `;`, as `/burst?send_headers=` takes them.
fn parse_send_headers(
    text: Option<&str>,
) -> Result<Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>, String> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    text.split(';')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair
                .split_once(':')
                .ok_or_else(|| format!("send_headers {pair:?}: not name:value"))?;
            Ok((
                name.trim()
                    .parse()
                    .map_err(|e| format!("header name {name:?}: {e}"))?,
                value
                    .trim()
                    .parse()
                    .map_err(|e| format!("header value {value:?}: {e}"))?,
            ))
        })
        .collect()
}

#[derive(Debug, Deserialize)]
struct TcpQuery {
    n: u64,
    #[serde(default = "one")]
    concurrency: u64,
    /// `host:port`.
    target: String,
}

/// What a TCP burst observed.
#[derive(Debug, Default, Serialize)]
struct TcpStats {
    total: u64,
    /// By outcome: `echoed` (the line came back whole), `closed` (the peer closed before any
    /// byte came back), `reset` (the connection failed before any byte came back), `partial`,
    /// `connect-error`, `timeout`.
    by_outcome: BTreeMap<String, u64>,
    /// Bytes that came back, over every connection.
    bytes_back: u64,
}

async fn tcp_burst(
    Query(query): Query<TcpQuery>,
) -> Result<axum::Json<TcpStats>, (StatusCode, String)> {
    if query.n > MAX_BURST || !(1..=MAX_CONCURRENCY).contains(&query.concurrency) {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("n must be at most {MAX_BURST} and concurrency 1 to {MAX_CONCURRENCY}"),
        ));
    }
    let stats = Arc::new(Mutex::new(TcpStats::default()));
    let next = Arc::new(AtomicU64::new(0));
    let target = Arc::new(query.target);
    let workers: Vec<_> = (0..query.concurrency)
        .map(|_| {
            let (stats, next, target) = (stats.clone(), next.clone(), target.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= query.n {
                        break;
                    }
                    let (outcome, bytes) = tcp_exchange(&target, i).await;
                    if let Ok(mut s) = stats.lock() {
                        s.total += 1;
                        s.bytes_back += bytes;
                        *s.by_outcome.entry(outcome.to_owned()).or_default() += 1;
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker
            .await
            .map_err(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    }
    let mut s = stats
        .lock()
        .map_err(|_| (StatusCode::INTERNAL_SERVER_ERROR, "poisoned".to_owned()))?;
    Ok(axum::Json(std::mem::take(&mut *s)))
}

/// One connection: writes a line, reads until it is back, the peer closes, or 5 s pass.
async fn tcp_exchange(target: &str, i: u64) -> (&'static str, u64) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let line = format!("tandem-tcp-{i}\n");
    let Ok(Ok(mut stream)) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(target),
    )
    .await
    else {
        return ("connect-error", 0);
    };
    let mut back = Vec::new();
    let exchange = async {
        stream.write_all(line.as_bytes()).await?;
        let mut chunk = [0_u8; 256];
        while back.len() < line.len() {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                break;
            }
            back.extend_from_slice(&chunk[..n]);
        }
        std::io::Result::Ok(())
    };
    let outcome = match tokio::time::timeout(Duration::from_secs(5), exchange).await {
        Err(_) => "timeout",
        Ok(Ok(())) if back == line.as_bytes() => "echoed",
        Ok(Ok(())) if back.is_empty() => "closed",
        Ok(Err(_)) if back.is_empty() => "reset",
        Ok(_) => "partial",
    };
    (outcome, back.len() as u64)
}

async fn stats(
    State(state): State<ClientState>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<axum::Json<Stats>, StatusCode> {
    let mut w = state
        .window
        .lock()
        .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?;
    let stats = w.stats();
    if query.contains_key("reset") {
        *w = Window {
            started: Some(Instant::now()),
            ..Window::default()
        };
    }
    Ok(axum::Json(stats))
}

async fn shutdown() {
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        term.recv().await;
    }
}
