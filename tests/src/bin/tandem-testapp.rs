//! `tandem-testapp`: the test application the node agent runs for the test images.
//!
//! - `server --listen ADDR --name NAME [--fail-every N]`: answers every request with its name
//!   (so a client sees which version served it), failing every Nth request with 503.
//! - `client --target URL [--rps R] [--stats-listen ADDR]`: sends R requests per second to
//!   URL (none with `--rps 0`) and serves what it observed at `/stats` (counts by status and
//!   body, p50/p99 latency; `/stats?reset=1` starts a new window). `/burst?n=N` sends exactly N
//!   more requests (`&concurrency=C` at once, `&rps=R` paced, `&target=URL` elsewhere) and
//!   answers with what those N observed: a bounded measurement from inside the pod.

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
        #[arg(long, env = "LISTEN", default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        #[arg(long, env = "NAME", default_value = "server")]
        name: String,
        /// Fail every Nth request with 503 (0: never).
        #[arg(long, env = "FAIL_EVERY", default_value_t = 0)]
        fail_every: u64,
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
    latencies_us: Vec<u64>,
}

#[derive(Debug, Serialize)]
struct Stats {
    seconds: f64,
    total: u64,
    ok: u64,
    by_status: BTreeMap<String, u64>,
    by_body: BTreeMap<String, u64>,
    p50_ms: f64,
    p99_ms: f64,
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
            p50_ms: pick(0.5),
            p99_ms: pick(0.99),
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
        } => server(listen, name, fail_every).await,
        Command::Client {
            target,
            rps,
            stats_listen,
        } => client(target, rps, stats_listen).await,
    }
}

async fn server(listen: SocketAddr, name: String, fail_every: u64) -> anyhow::Result<()> {
    let count = Arc::new(AtomicU64::new(0));
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .fallback(move || {
            let name = name.clone();
            let count = count.clone();
            async move {
                let n = count.fetch_add(1, Ordering::Relaxed) + 1;
                if fail_every > 0 && n.is_multiple_of(fail_every) {
                    (StatusCode::SERVICE_UNAVAILABLE, format!("{name} failing\n"))
                } else {
                    (StatusCode::OK, format!("{name}\n"))
                }
            }
        });
    let listener = tokio::net::TcpListener::bind(listen).await?;
    eprintln!("tandem-testapp server on {listen}");
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown())
        .await?;
    Ok(())
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
                    let outcome = send(&state.http, state.target.clone()).await;
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
    latency: Duration,
}

/// One GET with a 5 s limit; transport errors and timeouts are outcomes, not failures.
async fn send(http: &Http, uri: hyper::Uri) -> Outcome {
    let started = Instant::now();
    let request = tokio::time::timeout(Duration::from_secs(5), async {
        let response = http.get(uri).await?;
        let status = response.status().as_u16().to_string();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).trim().to_owned()))
    })
    .await;
    let (status, body) = match request {
        Ok(Ok(pair)) => pair,
        Ok(Err(_)) => ("error".to_owned(), String::new()),
        Err(_) => ("timeout".to_owned(), String::new()),
    };
    Outcome {
        status,
        body,
        latency: started.elapsed(),
    }
}

impl Window {
    fn record(&mut self, outcome: Outcome) {
        *self.by_status.entry(outcome.status).or_default() += 1;
        *self.by_body.entry(outcome.body).or_default() += 1;
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
    let window = Arc::new(Mutex::new(Window {
        started: Some(Instant::now()),
        ..Window::default()
    }));
    // Connections of its own: a burst must not ride on connections opened before a policy
    // changed (a proxy decides how to carry a connection when it is opened).
    let http: Http = Client::builder(TokioExecutor::new()).build_http();
    let next = Arc::new(AtomicU64::new(0));
    let started = tokio::time::Instant::now();
    let pace = query
        .rps
        .filter(|r| *r > 0)
        .map(|r| Duration::from_secs(1) / r);
    let workers: Vec<_> = (0..query.concurrency)
        .map(|_| {
            let (window, next, http, target) =
                (window.clone(), next.clone(), http.clone(), target.clone());
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
                    let outcome = send(&http, target.clone()).await;
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
