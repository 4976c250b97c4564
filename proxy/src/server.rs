//! Start, serve, drain: the proxy's lifecycle.
//!
//! Start: raise `RLIMIT_NOFILE`, load the config (a missing or refused file is not fatal: the
//! proxy passes traffic through and reports not ready), bind the three listeners, start the
//! config watcher and, with identity on, the operator's config stream. Stop (SIGTERM or SIGINT): report not ready, stop accepting, tell HTTP
//! sessions to finish (no more keep-alive, GOAWAY on HTTP/2), wait for connections in flight up
//! to the grace period, return.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use pingora::apps::HttpServerOptions;
use pingora::apps::ServerApp;
use pingora::protocols::l4::stream::Stream as PingoraStream;
use pingora::proxy::{HttpProxy, http_proxy};
use pingora::server::configuration::ServerConf;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{Notify, watch};

use crate::access_log::AccessLog;
use crate::admin::Admin;
use crate::cli::RunArgs;
use crate::config::{ConfigStore, Watcher};
use crate::connection::Listener;
use crate::error::{Error, Result};
use crate::http::MeshHttp;
use crate::identity::IdentityState;
use crate::logging::Logs;
use crate::metrics::{Direction, Metrics};
use crate::stream::StreamClient;
use crate::tls::MeshTls;
use crate::trace::export::Exporter;

/// The addresses the proxy itself listens on.
#[derive(Clone, Copy, Debug)]
pub struct OwnAddrs {
    /// Outbound capture listener.
    pub outbound: SocketAddr,
    /// Inbound capture listener.
    pub inbound: SocketAddr,
    /// Admin server.
    pub admin: SocketAddr,
}

/// State shared by every task.
pub struct Shared {
    /// The active config.
    pub config: Arc<ConfigStore>,
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// Where the proxy listens.
    pub own: OwnAddrs,
    /// Connections in flight, for the drain.
    pub tracker: Arc<Tracker>,
    /// Where each HTTP request's line goes.
    pub access_log: AccessLog,
    /// This proxy's certificate and trust anchors.
    pub identity: Arc<IdentityState>,
    /// Mutual TLS on both listeners, over `identity`.
    pub tls: MeshTls,
    /// The operator's config stream, when it is on.
    pub stream: Option<StreamClient>,
    /// Where finished spans go (the export queue).
    pub tracer: Exporter,
    draining: AtomicBool,
}

impl Shared {
    /// Ready: listeners bound (true once `Shared` exists), a valid config loaded, not draining;
    /// with identity on, also a current certificate and a trust bundle.
    pub fn ready(&self) -> Result<(), &'static str> {
        if self.draining.load(Ordering::Relaxed) {
            return Err("draining");
        }
        if self.config.active().is_none() {
            return Err("no valid config loaded");
        }
        self.identity.ready()
    }

    /// Whether shutdown has begun.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Time allowed to connect upstream, from the active config.
    pub fn connect_timeout(&self) -> Duration {
        let ms = self
            .config
            .active()
            .map_or(tandem_crds::contract::DEFAULT_CONNECT_TIMEOUT_MS, |a| {
                a.config.defaults.connect_timeout_ms
            });
        Duration::from_millis(ms)
    }

    /// An outbound connection went to `dst`, which no config entry knows: it passes through,
    /// and the operator is asked (later, by another task) which Service it is. Never waits.
    pub fn unknown_destination(&self, dst: SocketAddr) {
        if let Some(stream) = &self.stream {
            stream.discovery.ask(dst);
        }
    }

    /// Refuses outbound destinations that are the proxy's own capture listeners (a loop).
    pub fn refuse_loop(&self, dst: SocketAddr) -> Result<(), &'static str> {
        let local = dst.ip().is_loopback() || dst.ip().is_unspecified();
        let ours = dst.port() == self.own.outbound.port() || dst.port() == self.own.inbound.port();
        if local && ours {
            return Err("destination is the proxy's own listener");
        }
        Ok(())
    }

    /// Refuses inbound destinations on the proxy's own ports: the admin port and the capture
    /// ports are never reachable through the inbound listener.
    pub fn refuse_inbound(&self, dst: SocketAddr) -> Result<(), &'static str> {
        let port = dst.port();
        if port == self.own.admin.port()
            || port == self.own.inbound.port()
            || port == self.own.outbound.port()
        {
            return Err("the proxy's own ports are not reachable through the inbound listener");
        }
        Ok(())
    }
}

/// Counts connections in flight and wakes the drain when none is left.
#[derive(Default)]
pub struct Tracker {
    active: AtomicUsize,
    idle: Notify,
}

/// One connection in flight; dropping it ends it.
pub struct InFlight(Arc<Tracker>);

impl Tracker {
    /// Counts a connection in.
    pub fn enter(self: &Arc<Self>) -> InFlight {
        self.active.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Connections in flight now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// Resolves when no connection is in flight.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Accept backlog of each listener. tokio's default (1,024) overflows when thousands of clients
/// connect at once (a pod's burst of 10,000 calls): the kernel drops the excess SYNs, the
/// clients resend them after a second, and a calling proxy's 1 s connect timeout fails them.
/// The kernel caps this at `net.core.somaxconn` (4,096 by default since Linux 5.4).
const LISTEN_BACKLOG: u32 = 4_096;

async fn bind(addr: SocketAddr, what: &'static str) -> Result<TcpListener> {
    let listen = || {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| Error::Bind { addr, what, source })
}

fn local(listener: &TcpListener, requested: SocketAddr) -> SocketAddr {
    listener.local_addr().unwrap_or(requested)
}

/// Raises the soft open-files limit to the hard limit, so 10,000 connections (two sockets
/// each) fit.
fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::debug!(limit, "Raised RLIMIT_NOFILE"),
        Err(e) => tracing::warn!(error = %e, "Cannot raise RLIMIT_NOFILE"),
    }
}

fn pingora_conf(args: &RunArgs) -> Arc<ServerConf> {
    Arc::new(ServerConf {
        threads: args.worker_threads.max(1),
        ..ServerConf::default()
    })
}

fn proxies(
    conf: &Arc<ServerConf>,
    direction: Direction,
    shared: &Arc<Shared>,
) -> (Arc<HttpProxy<MeshHttp>>, Arc<HttpProxy<MeshHttp>>) {
    let h1 = http_proxy(conf, MeshHttp::new(direction, shared.clone()));
    let mut h2 = http_proxy(conf, MeshHttp::new(direction, shared.clone()));
    let mut options = HttpServerOptions::default();
    options.h2c = true;
    h2.server_options = Some(options);
    (Arc::new(h1), Arc::new(h2))
}

/// Runs the proxy until SIGTERM or SIGINT, then drains and returns. `logs` is the running log
/// ([`crate::logging::init`]).
pub async fn run(args: RunArgs, logs: &Logs) -> Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).map_err(|source| Error::Signal {
        signal: "SIGTERM",
        source,
    })?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(|source| Error::Signal {
        signal: "SIGINT",
        source,
    })?;
    let metrics = Arc::new(Metrics::new());
    let writer = logs.writer.clone();
    metrics.count_dropped_log_lines(Box::new(move || writer.dropped()));
    let identity = crate::identity::start(&args.identity, args.config_poll, metrics.clone());
    let parts = Parts {
        metrics,
        access_log: logs.access.clone(),
        identity,
    };
    let stop = async move {
        tokio::select! {
            _ = sigterm.recv() => "SIGTERM",
            _ = sigint.recv() => "SIGINT",
        }
    };
    serve(args, parts, |_| {}, stop).await
}

/// What a running proxy is given besides its flags.
pub struct Parts {
    /// Every metric.
    pub metrics: Arc<Metrics>,
    /// Where request lines go.
    pub access_log: AccessLog,
    /// The certificate and trust anchors, filled (and renewed) by whoever owns them.
    pub identity: Arc<IdentityState>,
}

/// Binds the listeners, tells `listening` where they are, serves until `stop` resolves (to the
/// name of what stopped it), then drains and returns. [`run`] is this with the process's
/// signals; tests embed proxies through it.
pub async fn serve(
    args: RunArgs,
    parts: Parts,
    listening: impl FnOnce(OwnAddrs),
    stop: impl std::future::Future<Output = &'static str>,
) -> Result<()> {
    raise_fd_limit();
    let Parts {
        metrics,
        access_log,
        identity,
    } = parts;
    // Before the first config compiles: its labels name this workload.
    metrics.mesh.set_workload(&args.workload_name);
    let store = Arc::new(
        ConfigStore::new(args.config.clone(), metrics.clone()).with_identity(identity.clone()),
    );
    let mut watcher = Watcher::new(store.clone());
    watcher.check();

    let outbound = bind(args.outbound_addr, "outbound").await?;
    let inbound = bind(args.inbound_addr, "inbound").await?;
    let admin = bind(args.admin_addr, "admin").await?;
    let own = OwnAddrs {
        outbound: local(&outbound, args.outbound_addr),
        inbound: local(&inbound, args.inbound_addr),
        admin: local(&admin, args.admin_addr),
    };
    let tls = MeshTls::new(identity.clone(), metrics.clone())
        .map_err(Error::Tls)?
        .with_probes(args.app_probes.clone());
    let stream = crate::stream::start(&args, store.clone(), identity.clone(), metrics.clone());
    let tracer = {
        let store = store.clone();
        Exporter::spawn(
            args.trace.trace_queue as usize,
            args.trace.trace_flush,
            Box::new(move || store.active().and_then(|a| a.tracing.clone())),
            metrics.trace.clone(),
        )
    };
    let shared = Arc::new(Shared {
        config: store,
        metrics,
        own,
        tracker: Arc::new(Tracker::default()),
        access_log,
        identity,
        tls,
        stream,
        tracer,
        draining: AtomicBool::new(false),
    });

    let conf = pingora_conf(&args);
    let (shutdown_tx, shutdown) = watch::channel(false);
    let mut apps = Vec::new();
    let mut accepting = Vec::new();
    for (direction, listener) in [
        (Direction::Outbound, outbound),
        (Direction::Inbound, inbound),
    ] {
        let (h1, h2) = proxies(&conf, direction, &shared);
        apps.push(h1.clone());
        apps.push(h2.clone());
        let ctx = Arc::new(Listener {
            direction,
            shared: shared.clone(),
            h1,
            h2,
            shutdown: shutdown.clone(),
        });
        accepting.push(tokio::spawn(accept_loop(listener, ctx, shutdown.clone())));
    }
    let admin_app = Arc::new(Admin::server(shared.clone()));
    tokio::spawn(admin_loop(admin, admin_app, shutdown.clone()));
    tokio::spawn(watcher.run(args.config_poll));

    tracing::info!(
        outbound = %own.outbound,
        inbound = %own.inbound,
        admin = %own.admin,
        config = %args.config.display(),
        ready = shared.ready().is_ok(),
        "listening"
    );
    listening(own);

    let signal = stop.await;
    tracing::info!(signal, grace = ?args.drain_grace, in_flight = shared.tracker.active(), "Draining");
    shared.draining.store(true, Ordering::Relaxed);
    let _ = shutdown_tx.send(true);
    for task in accepting {
        let _ = task.await;
    }
    for app in &apps {
        app.cleanup().await;
    }
    match tokio::time::timeout(args.drain_grace, shared.tracker.idle()).await {
        Ok(()) => tracing::info!("Drained; exiting"),
        Err(_) => tracing::warn!(
            left = shared.tracker.active(),
            "Drain grace period over; exiting with connections open"
        ),
    }
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<Listener>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => {
                    let serving = ctx.clone().serve(tcp);
                    tracing::trace!(future_bytes = std::mem::size_of_val(&serving), "Accepted");
                    tokio::spawn(serving);
                }
                Err(e) => {
                    // Out of file descriptors or a transient error: back off a little.
                    tracing::warn!(direction = ctx.direction.as_str(), error = %e, "Accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
    // Dropping the listener stops accepting: new connections are refused by the kernel.
}

async fn admin_loop(
    listener: TcpListener,
    app: Arc<pingora::apps::http_app::HttpServer<Admin>>,
    shutdown: watch::Receiver<bool>,
) {
    loop {
        match listener.accept().await {
            Ok((tcp, _)) => {
                let app = app.clone();
                let shutdown = shutdown.clone();
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    let stream: pingora::protocols::Stream = Box::new(PingoraStream::from(tcp));
                    app.process_new(stream, &shutdown).await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "Admin accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
