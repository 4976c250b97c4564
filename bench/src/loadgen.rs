//! The load generator: HTTP/1.1 and h2c (prior knowledge) clients built on hyper's connection
//! API, driven three ways.
//!
//! - [`open_loop`]: a constant rate. A dispatcher thread releases each request at its intended
//!   send time (from [`crate::schedule`]); any free worker takes it, and latency is measured
//!   from the intended time, so a slow response delays no later measurement (no coordinated
//!   omission). The dispatcher sleeps on a thread rather than on tokio's timer, whose 1 ms
//!   granularity would swamp the sub-millisecond differences a proxy hop makes.
//! - [`closed_loop`]: N connections, each sending its next request as soon as the previous
//!   answer arrived, for maximum throughput. Its latencies understate the tail by construction.
//! - [`ManyConnections`]: thousands of open connections that each send one request at the same
//!   instant (a wave), latency measured from that instant.
//!
//! Every run is bounded in count and time, and only loopback targets are accepted, or any
//! target from a thread that entered a network namespace other than its process's (the capture
//! run's client pod, whose only link leads to the server pod).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::client::conn::{http1, http2};
use hyper::header::HOST;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::schedule::{intended_offset, total_requests};
use crate::stats::LatencySummary;

/// Errors of the load generator.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The target is not on the loopback network (nor did this thread enter a network
    /// namespace of its own): the benchmark never sends traffic elsewhere.
    #[error(
        "refusing to load {0}: only loopback targets are allowed (or any from a thread inside a network namespace the benchmark entered)"
    )]
    NotLoopback(SocketAddr),
    /// TCP connect failed.
    #[error("connect to {addr}: {source}")]
    Connect {
        /// The target.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP handshake or exchange failed.
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built (bad authority).
    #[error("request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The answer was not a 2xx.
    #[error("status {0}")]
    Status(u16),
    /// No answer within the per-request timeout.
    #[error("timed out")]
    Timeout,
    /// The histogram refused a value (outside its bounds).
    #[error("histogram: {0}")]
    Histogram(String),
    /// The run's parameters make no sense (zero connections, zero rate).
    #[error("invalid load parameters: {0}")]
    Invalid(&'static str),
}

/// Wire protocol of the client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Protocol {
    /// HTTP/1.1, one request at a time per connection.
    Http1,
    /// HTTP/2 over cleartext with prior knowledge, multiplexed.
    H2c,
}

impl Protocol {
    /// Short name used in tables and progress lines.
    pub fn label(self) -> &'static str {
        match self {
            Self::Http1 => "HTTP/1.1",
            Self::H2c => "h2c",
        }
    }
}

/// Where requests go: the socket to connect to and the authority (Host / `:authority`) to send.
#[derive(Debug, Clone)]
pub struct Target {
    /// Socket the client connects to.
    pub addr: SocketAddr,
    /// Value of the Host header (HTTP/1.1) or `:authority` (h2c).
    pub authority: String,
    /// Wire protocol.
    pub protocol: Protocol,
}

impl Target {
    fn check(&self) -> Result<(), LoadError> {
        if self.addr.ip().is_loopback() || in_separate_netns() {
            Ok(())
        } else {
            Err(LoadError::NotLoopback(self.addr))
        }
    }

    fn request(&self) -> Result<Request<Empty<Bytes>>, LoadError> {
        let builder = match self.protocol {
            Protocol::Http1 => Request::get("/").header(HOST, self.authority.as_str()),
            Protocol::H2c => Request::get(format!("http://{}/", self.authority)),
        };
        Ok(builder.body(Empty::new())?)
    }
}

/// Whether the calling thread entered a network namespace other than the one this process
/// started in (its main thread's): the capture run's client pod. Unknown counts as no.
fn in_separate_netns() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let id = |path: &str| std::fs::metadata(path).map(|m| (m.dev(), m.ino())).ok();
    match (id("/proc/thread-self/ns/net"), id("/proc/self/ns/net")) {
        (Some(mine), Some(host)) => mine != host,
        _ => false,
    }
}

/// One client connection, ready to carry requests.
enum Conn {
    H1(http1::SendRequest<Empty<Bytes>>),
    H2(http2::SendRequest<Empty<Bytes>>),
}

async fn connect(target: &Target) -> Result<Conn, LoadError> {
    let stream = TcpStream::connect(target.addr)
        .await
        .map_err(|source| LoadError::Connect {
            addr: target.addr,
            source,
        })?;
    // Loopback latency is what is measured: never let Nagle hold a request back.
    stream
        .set_nodelay(true)
        .map_err(|source| LoadError::Connect {
            addr: target.addr,
            source,
        })?;
    let io = TokioIo::new(stream);
    match target.protocol {
        Protocol::Http1 => {
            let (sender, conn) = http1::handshake(io).await?;
            tokio::spawn(conn);
            Ok(Conn::H1(sender))
        }
        Protocol::H2c => {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            Ok(Conn::H2(sender))
        }
    }
}

/// Sends one GET and reads the whole answer; `Ok` only for a 2xx status.
async fn exchange(conn: &mut Conn, target: &Target) -> Result<(), LoadError> {
    let request = target.request()?;
    let response = match conn {
        Conn::H1(sender) => {
            sender.ready().await?;
            sender.send_request(request).await?
        }
        Conn::H2(sender) => {
            sender.ready().await?;
            sender.send_request(request).await?
        }
    };
    let status = response.status();
    response.into_body().collect().await?;
    if status.is_success() {
        Ok(())
    } else {
        Err(LoadError::Status(status.as_u16()))
    }
}

impl Conn {
    /// Whether the server closed the connection (after a `Connection: close` answer, say); a
    /// client reconnects rather than fail a request it never sent.
    fn is_closed(&self) -> bool {
        match self {
            Conn::H1(sender) => sender.is_closed(),
            Conn::H2(sender) => sender.is_closed(),
        }
    }
}

/// A connection slot that reconnects lazily after a failure.
struct Slot {
    conn: Option<Conn>,
}

impl Slot {
    async fn request(&mut self, target: &Target, limit: Duration) -> Result<(), LoadError> {
        let attempt = async {
            let conn = match self.conn.take() {
                Some(conn) if !conn.is_closed() => conn,
                _ => connect(target).await?,
            };
            let mut conn = conn;
            let outcome = exchange(&mut conn, target).await;
            // A connection that failed mid-exchange is dropped and replaced on the next use.
            if outcome.is_ok() || matches!(outcome, Err(LoadError::Status(_))) {
                self.conn = Some(conn);
            }
            outcome
        };
        match tokio::time::timeout(limit, attempt).await {
            Ok(outcome) => outcome,
            Err(_) => {
                self.conn = None;
                Err(LoadError::Timeout)
            }
        }
    }
}

/// A histogram for latencies in microseconds, from 1 µs to 5 minutes at 3 significant digits.
pub fn latency_histogram() -> Result<Histogram<u64>, LoadError> {
    Histogram::new_with_bounds(1, 300_000_000, 3).map_err(|e| LoadError::Histogram(e.to_string()))
}

fn record(histogram: &mut Histogram<u64>, latency: Duration) {
    // Values past the top bound are clamped rather than lost: a 5-minute latency is a failure
    // in every scenario here anyway.
    let micros = u64::try_from(latency.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    histogram.saturating_record(micros);
}

/// Parameters of a constant-rate run.
#[derive(Debug, Clone)]
pub struct OpenLoop {
    /// Requests per second.
    pub rate: u64,
    /// Length of the run.
    pub length: Duration,
    /// Requests that may be in flight at once (HTTP/1.1: one connection each).
    pub in_flight: usize,
    /// Connections for h2c (the in-flight requests are spread over them).
    pub h2_connections: usize,
    /// Per-request limit; a request over it counts as an error.
    pub timeout: Duration,
}

/// Result of a run: latency summary plus the raw histogram.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// Percentiles and counts.
    pub summary: LatencySummary,
    /// Every recorded latency, in microseconds (for pooling runs).
    pub histogram: Histogram<u64>,
    /// Wall time the run took.
    pub elapsed: Duration,
}

impl RunOutcome {
    /// Completed requests per second of wall time.
    pub fn throughput(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.summary.ok as f64 / secs
        } else {
            0.0
        }
    }
}

async fn open_slots(target: &Target, count: usize, h2_connections: usize) -> Vec<Slot> {
    match target.protocol {
        Protocol::Http1 => (0..count).map(|_| Slot { conn: None }).collect(),
        Protocol::H2c => {
            let mut shared = Vec::new();
            for _ in 0..h2_connections.max(1) {
                // A failed connect leaves the slot empty; it connects on first use.
                shared.push(match connect(target).await {
                    Ok(Conn::H2(sender)) => Some(sender),
                    _ => None,
                });
            }
            (0..count)
                .map(|i| Slot {
                    conn: shared[i % shared.len()].clone().map(Conn::H2),
                })
                .collect()
        }
    }
}

/// Runs a constant-rate load against `target` and returns latencies measured from each
/// request's intended send time.
pub async fn open_loop(target: &Target, params: &OpenLoop) -> Result<RunOutcome, LoadError> {
    target.check()?;
    if params.rate == 0 || params.in_flight == 0 {
        return Err(LoadError::Invalid("rate and in-flight must be positive"));
    }
    let total = total_requests(params.rate, params.length);
    let slots = open_slots(target, params.in_flight, params.h2_connections).await;
    let (tickets, inbox) = async_channel::bounded::<Instant>(total.clamp(1, 1 << 20) as usize);
    let start = Instant::now() + Duration::from_millis(20);
    let rate = params.rate;
    let stop = Arc::new(AtomicBool::new(false));
    let dispatcher_stop = stop.clone();
    // The dispatcher: a plain thread sleeping with the kernel's high-resolution timer.
    let dispatcher = std::thread::spawn(move || {
        let std_start = start.into_std();
        for index in 0..total {
            if dispatcher_stop.load(Ordering::Relaxed) {
                break;
            }
            let due = std_start + intended_offset(index, rate);
            let now = std::time::Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if tickets.send_blocking(Instant::from_std(due)).is_err() {
                break;
            }
        }
    });

    let mut workers = JoinSet::new();
    for mut slot in slots {
        let inbox = inbox.clone();
        let target = target.clone();
        let limit = params.timeout;
        workers.spawn(async move {
            let mut histogram = latency_histogram()?;
            let mut errors = 0u64;
            while let Ok(due) = inbox.recv().await {
                match slot.request(&target, limit).await {
                    Ok(()) => record(&mut histogram, due.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            Ok::<_, LoadError>((histogram, errors))
        });
    }
    drop(inbox);
    let outcome = gather(&mut workers).await;
    stop.store(true, Ordering::Relaxed);
    // The dispatcher ends once its schedule is sent or every worker is gone.
    let _ = tokio::task::spawn_blocking(move || dispatcher.join()).await;
    let (histogram, errors) = outcome?;
    Ok(RunOutcome {
        summary: LatencySummary::from_micros(&histogram, errors),
        histogram,
        elapsed: start.elapsed(),
    })
}

async fn gather(
    workers: &mut JoinSet<Result<(Histogram<u64>, u64), LoadError>>,
) -> Result<(Histogram<u64>, u64), LoadError> {
    let mut total = latency_histogram()?;
    let mut errors = 0u64;
    while let Some(joined) = workers.join_next().await {
        match joined {
            Ok(Ok((histogram, e))) => {
                total
                    .add(&histogram)
                    .map_err(|e| LoadError::Histogram(e.to_string()))?;
                errors += e;
            }
            Ok(Err(e)) => return Err(e),
            // A panicked worker is a bug in this crate; count its requests as lost.
            Err(_) => errors += 1,
        }
    }
    Ok((total, errors))
}

/// Parameters of a maximum-throughput run.
#[derive(Debug, Clone)]
pub struct ClosedLoop {
    /// Concurrent requests (HTTP/1.1: one connection each).
    pub in_flight: usize,
    /// Connections for h2c.
    pub h2_connections: usize,
    /// Length of the run.
    pub length: Duration,
    /// Per-request limit.
    pub timeout: Duration,
}

/// Runs `in_flight` request loops back to back for `length` and returns what completed.
pub async fn closed_loop(target: &Target, params: &ClosedLoop) -> Result<RunOutcome, LoadError> {
    target.check()?;
    if params.in_flight == 0 {
        return Err(LoadError::Invalid("in-flight must be positive"));
    }
    let slots = open_slots(target, params.in_flight, params.h2_connections).await;
    let start = Instant::now();
    let deadline = start + params.length;
    let mut workers = JoinSet::new();
    for mut slot in slots {
        let target = target.clone();
        let limit = params.timeout;
        workers.spawn(async move {
            let mut histogram = latency_histogram()?;
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let sent = Instant::now();
                match slot.request(&target, limit).await {
                    Ok(()) => record(&mut histogram, sent.elapsed()),
                    Err(_) => {
                        errors += 1;
                        // Do not spin on a refused connection.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            Ok::<_, LoadError>((histogram, errors))
        });
    }
    let (histogram, errors) = gather(&mut workers).await?;
    Ok(RunOutcome {
        summary: LatencySummary::from_micros(&histogram, errors),
        histogram,
        elapsed: start.elapsed(),
    })
}

/// Many HTTP/1.1 connections held open at once, each able to carry one request per wave.
pub struct ManyConnections {
    target: Target,
    slots: Vec<Slot>,
    /// Connections that could not be opened.
    pub connect_errors: u64,
}

impl ManyConnections {
    /// Opens `count` connections, at most `parallel` connects at a time (so the listen
    /// backlog is not flooded).
    pub async fn open(target: &Target, count: usize, parallel: usize) -> Result<Self, LoadError> {
        target.check()?;
        let gate = Arc::new(tokio::sync::Semaphore::new(parallel.max(1)));
        let mut connecting = JoinSet::new();
        for _ in 0..count {
            let gate = gate.clone();
            let target = target.clone();
            connecting.spawn(async move {
                let _permit = gate.acquire_owned().await;
                tokio::time::timeout(Duration::from_secs(10), connect(&target)).await
            });
        }
        let mut slots = Vec::with_capacity(count);
        let mut connect_errors = 0;
        while let Some(joined) = connecting.join_next().await {
            match joined {
                Ok(Ok(Ok(conn))) => slots.push(Slot { conn: Some(conn) }),
                _ => connect_errors += 1,
            }
        }
        Ok(Self {
            target: target.clone(),
            slots,
            connect_errors,
        })
    }

    /// Connections currently open.
    pub fn open_count(&self) -> usize {
        self.slots.iter().filter(|s| s.conn.is_some()).count()
    }

    /// Every open connection sends one request at the same instant; latency is measured from
    /// that instant. Connections that failed stay closed for later waves (and count as errors).
    pub async fn wave(&mut self, timeout: Duration) -> Result<RunOutcome, LoadError> {
        let start = Instant::now();
        let mut inflight = JoinSet::new();
        let mut errors = 0u64;
        for mut slot in self.slots.drain(..) {
            if slot.conn.is_none() {
                errors += 1;
                continue;
            }
            let target = self.target.clone();
            inflight.spawn(async move {
                let outcome = slot.request(&target, timeout).await;
                (slot, outcome.map(|()| start.elapsed()))
            });
        }
        let mut histogram = latency_histogram()?;
        while let Some(joined) = inflight.join_next().await {
            match joined {
                Ok((slot, Ok(latency))) => {
                    record(&mut histogram, latency);
                    self.slots.push(slot);
                }
                Ok((mut slot, Err(_))) => {
                    errors += 1;
                    slot.conn = None;
                    self.slots.push(slot);
                }
                Err(_) => errors += 1,
            }
        }
        Ok(RunOutcome {
            summary: LatencySummary::from_micros(&histogram, errors),
            histogram,
            elapsed: start.elapsed(),
        })
    }
}

/// Sends single requests until one succeeds or `within` passes: readiness of a target.
pub async fn wait_ready(target: &Target, within: Duration) -> Result<(), LoadError> {
    target.check()?;
    let deadline = Instant::now() + within;
    loop {
        let mut slot = Slot { conn: None };
        let outcome = slot.request(target, Duration::from_secs(2)).await;
        match outcome {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
