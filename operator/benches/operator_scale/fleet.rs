//! The simulated fleet: one stream client per injected pod, doing what a proxy does on the
//! config stream. Each holds one TLS connection (verified against the issuer's roots for the
//! signer's DNS name, as the proxy verifies it), sends `GET /v1/config/watch?version=<held>`
//! with its pod's projected token, reads the NDJSON messages, applies snapshots and deltas
//! (`ConfigDelta::apply_to`), validates the result, records when each version arrived, and
//! reports it applied (`POST /v1/config/applied`). A refusal, a dropped connection, a delta for
//! another base or three silent heartbeat intervals end the watch; the client reconnects with
//! full-jitter exponential backoff, as the proxy does.
//!
//! Applied reports go through a small shared pool of keep-alive connections, each request with
//! the reporting pod's own token: one extra connection per client would double the sockets of
//! both processes (the machine allows 20,000 descriptors per process).

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tandem_crds::contract::stream::{
    APPLIED_PATH, HEARTBEAT_INTERVAL, MAX_MESSAGE_BYTES, WATCH_PATH, WATCH_VERSION_PARAM,
};
use tandem_crds::contract::{
    AppliedReport, ConfigSource, ProxyConfig, StreamMessage, StreamRefusal,
};
use tandem_crds::identity::signer_dns_name;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::objects::Member;

/// First reconnect delay; doubles per failure up to [`BACKOFF_CAP`], fully jittered.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Connect + TLS + response head must come within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections of the applied-report pool.
const REPORTERS: usize = 8;
/// Reports queued for the pool at most; beyond it they are dropped and counted.
const REPORT_QUEUE: usize = 65_536;
/// Arrivals each client remembers (enough for the changes one run makes).
const HISTORY: usize = 256;

/// What one client holds and has seen.
#[derive(Debug, Default)]
pub struct Held {
    /// The config it runs (none before its first snapshot).
    pub config: Option<ProxyConfig>,
    /// Each version it applied, with when it arrived (the latest last).
    pub arrivals: Vec<(String, Instant)>,
    /// When its current watch was accepted (its first message read); `None` while detached.
    pub attached_at: Option<Instant>,
    /// The last refusal: HTTP status and `StreamRefusal.reason`.
    pub refusal: Option<(u16, String)>,
    /// The last other failure, for the report of a run that did not converge.
    pub failure: Option<String>,
    /// A watch was accepted but sent only heartbeats before any config (a workload the
    /// operator has no view for).
    pub heartbeats_only: bool,
    /// A watch is open (answered 200) now.
    pub open: bool,
}

/// One simulated proxy.
#[derive(Debug)]
pub struct Client {
    /// The pod it plays.
    pub member: Member,
    /// Its state (a plain mutex: held for a field update each, never across an await).
    pub held: Mutex<Held>,
    /// Watches accepted, and which first message they got.
    pub snapshots: AtomicU64,
    pub currents: AtomicU64,
    pub deltas: AtomicU64,
    /// Deltas for another base (each forces a reconnect).
    pub mismatches: AtomicU64,
}

impl Client {
    /// When the client last attached, if it is attached.
    pub fn attached_at(&self) -> Option<Instant> {
        self.held.lock().unwrap().attached_at
    }

    /// The version it runs now.
    pub fn version(&self) -> Option<String> {
        self.held
            .lock()
            .unwrap()
            .config
            .as_ref()
            .map(|c| c.version.clone())
    }

    /// When it first applied a version after `since` that satisfies `carries`.
    pub fn arrival_after(&self, since: Instant, carries: impl Fn(&str) -> bool) -> Option<Instant> {
        let held = self.held.lock().unwrap();
        held.arrivals
            .iter()
            .find(|(version, at)| *at >= since && carries(version))
            .map(|(_, at)| *at)
    }
}

/// Counters of the applied-report pool.
#[derive(Debug, Default)]
pub struct Reports {
    pub queued: AtomicU64,
    pub sent: AtomicU64,
    pub refused: AtomicU64,
    pub failed: AtomicU64,
    pub dropped: AtomicU64,
}

/// The running fleet.
pub struct Fleet {
    /// Every client, ordinary workloads first, gateways last.
    pub clients: Vec<Arc<Client>>,
    /// The applied-report counters.
    pub reports: Arc<Reports>,
    /// The operator's signer port: the clients' "Service address" (a restarted operator listens
    /// on another port; the clients follow it as they would follow the Service).
    port: Arc<AtomicU16>,
    stopped: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Applied reports waiting for the pool: the client and the version it applied.
type Queue = Arc<tokio::sync::Mutex<mpsc::Receiver<(Arc<Client>, String)>>>;

/// What every client task shares.
struct Shared {
    connector: TlsConnector,
    name: ServerName<'static>,
    port: Arc<AtomicU16>,
    stopped: Arc<AtomicBool>,
    reports: mpsc::Sender<(Arc<Client>, String)>,
    report_counts: Arc<Reports>,
}

impl Reports {
    /// Whether every queued report has been answered (or has failed).
    pub fn drained(&self) -> bool {
        let done = self.sent.load(Ordering::Relaxed)
            + self.refused.load(Ordering::Relaxed)
            + self.failed.load(Ordering::Relaxed);
        done >= self.queued.load(Ordering::Relaxed)
    }
}

impl Fleet {
    /// Starts one client per member against 127.0.0.1:`port`, each after a random delay within
    /// `spread` (pods do not all start in the same millisecond).
    pub fn start(members: Vec<Member>, roots_pem: &str, port: u16, spread: Duration) -> Self {
        let port = Arc::new(AtomicU16::new(port));
        let stopped = Arc::new(AtomicBool::new(false));
        let report_counts = Arc::new(Reports::default());
        let (reports, queue) = mpsc::channel(REPORT_QUEUE);
        let shared = Arc::new(Shared {
            connector: TlsConnector::from(Arc::new(tls_config(roots_pem))),
            name: ServerName::try_from(signer_dns_name()).expect("the signer's DNS name"),
            port: port.clone(),
            stopped: stopped.clone(),
            reports,
            report_counts: report_counts.clone(),
        });
        let clients: Vec<Arc<Client>> = members
            .into_iter()
            .map(|member| {
                Arc::new(Client {
                    member,
                    held: Mutex::default(),
                    snapshots: AtomicU64::new(0),
                    currents: AtomicU64::new(0),
                    deltas: AtomicU64::new(0),
                    mismatches: AtomicU64::new(0),
                })
            })
            .collect();
        let mut tasks: Vec<JoinHandle<()>> = clients
            .iter()
            .map(|client| {
                let delay = spread.mul_f64(fastrand::f64());
                tokio::spawn(run(shared.clone(), client.clone(), delay))
            })
            .collect();
        let queue: Queue = Arc::new(tokio::sync::Mutex::new(queue));
        for _ in 0..REPORTERS {
            tasks.push(tokio::spawn(report(shared.clone(), queue.clone())));
        }
        Self {
            clients,
            reports: report_counts,
            port,
            stopped,
            tasks,
        }
    }

    /// Points the fleet at a (restarted) operator's port.
    pub fn retarget(&self, port: u16) {
        self.port.store(port, Ordering::Relaxed);
    }

    /// The clients of ordinary workloads (not the gateways).
    pub fn ordinary(&self) -> impl Iterator<Item = &Arc<Client>> {
        self.clients.iter().filter(|c| c.member.workload.is_some())
    }

    /// The gateways' clients.
    pub fn gateways(&self) -> impl Iterator<Item = &Arc<Client>> {
        self.clients.iter().filter(|c| c.member.workload.is_none())
    }

    /// How many ordinary clients are attached, having attached at or after `since`.
    pub fn attached_since(&self, since: Instant) -> usize {
        self.ordinary()
            .filter(|c| c.attached_at().is_some_and(|at| at >= since))
            .count()
    }

    /// Stops every client and reporter.
    pub fn stop(self) {
        self.stopped.store(true, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn tls_config(roots_pem: &str) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(root.expect("a root")).expect("add root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every reconnect pays a full handshake: the operator's worst case. (The clients share
    // this config; resuming through its shared cache would flatter the storm.)
    config.resumption = rustls::client::Resumption::disabled();
    config
}

/// Why one watch ended.
#[derive(Debug)]
enum Ended {
    Refused(u16, String),
    Failed(String),
}

/// One client: watch, and reconnect with backoff whenever the watch ends.
async fn run(shared: Arc<Shared>, client: Arc<Client>, delay: Duration) {
    tokio::time::sleep(delay).await;
    let mut failures: u32 = 0;
    while !shared.stopped.load(Ordering::Relaxed) {
        let ended = watch(&shared, &client).await;
        let attached = {
            let mut held = client.held.lock().unwrap();
            let attached = held.attached_at.take().is_some();
            held.open = false;
            match ended {
                Ended::Refused(status, reason) => held.refusal = Some((status, reason)),
                Ended::Failed(why) => held.failure = Some(why),
            }
            attached
        };
        // A watch that was accepted resets the backoff: the next try is quick.
        failures = if attached { 0 } else { failures + 1 };
        tokio::time::sleep(backoff(failures)).await;
    }
}

fn backoff(failures: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1 << failures.min(10))
        .min(BACKOFF_CAP);
    ceiling.mul_f64(fastrand::f64())
}

async fn connect(shared: &Shared) -> Result<SendRequest<Full<Bytes>>, String> {
    let port = shared.port.load(Ordering::Relaxed);
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let tls: TlsStream<TcpStream> = shared
        .connector
        .connect(shared.name.clone(), tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (sender, connection) = http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(async move {
        // Ends when the watch's body and the sender are dropped, or the peer closes.
        let _ = connection.await;
    });
    Ok(sender)
}

/// One watch, from connect to its end.
async fn watch(shared: &Shared, client: &Arc<Client>) -> Ended {
    let held_version = client.version();
    let path = match &held_version {
        Some(version) => format!("{WATCH_PATH}?{WATCH_VERSION_PARAM}={version}"),
        None => WATCH_PATH.to_owned(),
    };
    let head = async {
        let mut sender = connect(shared).await?;
        let request = Request::get(path)
            .header(header::HOST, signer_dns_name())
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", client.member.token),
            )
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("request: {e}"))?;
        sender
            .send_request(request)
            .await
            .map_err(|e| format!("watch: {e}"))
    };
    let response = match tokio::time::timeout(CONNECT_TIMEOUT, head).await {
        Ok(Ok(response)) => response,
        Ok(Err(why)) => return Ended::Failed(why),
        Err(_) => return Ended::Failed("no answer within 10 s".to_owned()),
    };
    let status = response.status();
    let mut body = response.into_body();
    if status != StatusCode::OK {
        let text = match tokio::time::timeout(CONNECT_TIMEOUT, body.collect()).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            _ => Bytes::new(),
        };
        let reason = serde_json::from_slice::<StreamRefusal>(&text).map_or_else(
            |_| String::from_utf8_lossy(&text).into_owned(),
            |r| r.reason,
        );
        return Ended::Refused(status.as_u16(), reason);
    }
    client.held.lock().unwrap().open = true;
    let silence = HEARTBEAT_INTERVAL * 3;
    let mut buffer: Vec<u8> = Vec::new();
    loop {
        let frame = match tokio::time::timeout(silence, body.frame()).await {
            Err(_) => return Ended::Failed("silent for three heartbeat intervals".to_owned()),
            Ok(None) => return Ended::Failed("the operator ended the watch".to_owned()),
            Ok(Some(Err(e))) => return Ended::Failed(format!("watch body: {e}")),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buffer.extend_from_slice(&data);
        while let Some(end) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            if let Err(why) = handle(shared, client, &line) {
                return Ended::Failed(why);
            }
        }
        if buffer.len() > MAX_MESSAGE_BYTES {
            return Ended::Failed("a message longer than MAX_MESSAGE_BYTES".to_owned());
        }
    }
}

/// Applies one message; an error ends the watch.
fn handle(shared: &Shared, client: &Arc<Client>, line: &[u8]) -> Result<(), String> {
    let message = StreamMessage::from_line(line).map_err(|e| format!("bad message: {e}"))?;
    let now = Instant::now();
    let mut held = client.held.lock().unwrap();
    // Attached means serving a config from this watch: its first Snapshot or Current.
    let first = held.attached_at.is_none();
    let applied = match message {
        StreamMessage::Heartbeat => {
            held.heartbeats_only = held.config.is_none();
            None
        }
        StreamMessage::Snapshot { config } => {
            config
                .validate()
                .map_err(|e| format!("invalid snapshot: {e:?}"))?;
            client
                .snapshots
                .fetch_add(u64::from(first), Ordering::Relaxed);
            let version = config.version.clone();
            held.config = Some(config);
            Some(version)
        }
        StreamMessage::Current { version } => {
            if held.config.as_ref().map(|c| &c.version) != Some(&version) {
                return Err(format!("told current {version}, but holds another"));
            }
            client
                .currents
                .fetch_add(u64::from(first), Ordering::Relaxed);
            Some(version)
        }
        StreamMessage::Delta(delta) => {
            let Some(config) = held.config.as_mut() else {
                return Err("a delta before any snapshot".to_owned());
            };
            let mut next = config.clone();
            if let Err(mismatch) = delta.apply_to(&mut next) {
                client.mismatches.fetch_add(1, Ordering::Relaxed);
                return Err(mismatch.to_string());
            }
            next.validate()
                .map_err(|e| format!("invalid after delta: {e:?}"))?;
            *config = next;
            client.deltas.fetch_add(1, Ordering::Relaxed);
            Some(delta.version)
        }
    };
    if first && applied.is_some() {
        held.attached_at = Some(now);
    }
    if let Some(version) = applied {
        let changed = held.arrivals.last().map(|(v, _)| v) != Some(&version);
        if changed {
            held.arrivals.push((version.clone(), now));
            if held.arrivals.len() > HISTORY {
                held.arrivals.remove(0);
            }
        }
        drop(held);
        let counts = &shared.report_counts;
        if shared.reports.try_send((client.clone(), version)).is_ok() {
            counts.queued.fetch_add(1, Ordering::Relaxed);
        } else {
            counts.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// A reporter of the pool: posts queued applied reports over one keep-alive connection,
/// reconnecting when it breaks.
async fn report(shared: Arc<Shared>, queue: Queue) {
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    loop {
        let Some((client, version)) = queue.lock().await.recv().await else {
            return;
        };
        let body = serde_json::to_vec(&AppliedReport {
            version,
            source: ConfigSource::Stream,
        })
        .expect("a report serializes");
        // One retry on a fresh connection: a kept-alive one may have been closed meanwhile.
        let mut outcome = Err(String::new());
        for _ in 0..2 {
            outcome = post(&shared, &mut sender, &client, body.clone()).await;
            if outcome.is_ok() {
                break;
            }
            sender = None;
        }
        let counts = &shared.report_counts;
        match outcome {
            Ok(status) if status.is_success() => counts.sent.fetch_add(1, Ordering::Relaxed),
            Ok(_) => counts.refused.fetch_add(1, Ordering::Relaxed),
            Err(_) => counts.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

async fn post(
    shared: &Shared,
    sender: &mut Option<SendRequest<Full<Bytes>>>,
    client: &Client,
    body: Vec<u8>,
) -> Result<StatusCode, String> {
    let attempt = async {
        if sender.as_ref().is_none_or(SendRequest::is_closed) {
            *sender = Some(connect(shared).await?);
        }
        let Some(open) = sender.as_mut() else {
            return Err("no connection".to_owned());
        };
        open.ready().await.map_err(|e| format!("not ready: {e}"))?;
        let request = Request::post(APPLIED_PATH)
            .header(header::HOST, signer_dns_name())
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", client.member.token),
            )
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("request: {e}"))?;
        let response = open
            .send_request(request)
            .await
            .map_err(|e| format!("applied: {e}"))?;
        let status = response.status();
        // Read the answer whole so the connection can carry the next request.
        let _ = response.into_body().collect().await;
        Ok(status)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s".to_owned()))
}
