//! `tandem-testapp`: the test application the node agent runs for the test images.
//!
//! - `server --listen ADDR --name NAME [--fail-every N]`: answers every request with its name
//!   (so a client sees which version served it), failing every Nth request with 503.
//! - `client --target URL [--rps R] [--stats-listen ADDR]`: sends R requests per second to
//!   URL and serves what it observed at `/stats` (counts by status and body, p50/p99 latency;
//!   `/stats?reset=1` starts a new window).

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

async fn client(target: String, rps: u32, stats_listen: SocketAddr) -> anyhow::Result<()> {
    let window = Arc::new(Mutex::new(Window {
        started: Some(Instant::now()),
        ..Window::default()
    }));
    let http: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: hyper::Uri = target.parse()?;
    let sender = {
        let window = window.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rps.max(1));
            loop {
                tick.tick().await;
                let http = http.clone();
                let uri = uri.clone();
                let window = window.clone();
                tokio::spawn(async move {
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
                    if let Ok(mut w) = window.lock() {
                        *w.by_status.entry(status).or_default() += 1;
                        *w.by_body.entry(body).or_default() += 1;
                        w.latencies_us
                            .push(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
                    }
                });
            }
        })
    };
    let app = Router::new()
        .route("/stats", get(stats))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(window);
    let listener = tokio::net::TcpListener::bind(stats_listen).await?;
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown())
        .await?;
    sender.abort();
    Ok(())
}

async fn stats(
    State(window): State<Arc<Mutex<Window>>>,
    Query(query): Query<BTreeMap<String, String>>,
) -> Result<axum::Json<Stats>, StatusCode> {
    let mut w = window
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
