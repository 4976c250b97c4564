//! A real HTTPS operator speaking the config stream's contract
//! (`tandem_crds::contract::stream`) on loopback: the watch (a snapshot, or `current` when the
//! proxy holds the version, then whatever the test pushes), discovery and applied reports.
//! Its serving certificate comes from a [`TestCa`] for the signer's DNS name, as the real
//! operator's does; one bearer token is accepted, any other is refused `Unauthenticated`.
//! [`TestOperator::stop`] closes every connection and the listener; [`TestOperator::restart`]
//! listens again on the same port.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tandem_crds::contract::stream::{APPLIED_PATH, DISCOVER_PATH, WATCH_PATH};
use tandem_crds::contract::{
    AppliedReport, ConfigDelta, DiscoverRequest, DiscoverResponse, ProxyConfig, ServiceRef,
    StreamMessage, StreamRefusal,
};
use tandem_crds::identity::signer_dns_name;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;

use super::ca::TestCa;

type Body = BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct State {
    token: String,
    /// The operator's current config of the workload.
    config: Mutex<Option<ProxyConfig>>,
    /// The open watches.
    watches: Mutex<Vec<mpsc::UnboundedSender<Bytes>>>,
    /// The `version` of each watch request, in order.
    watch_versions: Mutex<Vec<Option<String>>>,
    /// Watches refused for their token.
    refused: Mutex<usize>,
    discovers: Mutex<Vec<SocketAddr>>,
    answers: Mutex<HashMap<SocketAddr, ServiceRef>>,
    applied: Mutex<Vec<AppliedReport>>,
}

/// The operator; stopped on drop.
pub struct TestOperator {
    pub addr: SocketAddr,
    /// The name its certificate carries.
    pub name: String,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl TestOperator {
    /// Listens on loopback port 0, accepting `token`.
    pub async fn start(issuer: &TestCa, token: &str) -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Self::start_on(issuer, token, listener)
    }

    /// Serves on `listener` (bound anywhere, e.g. inside a network namespace).
    pub fn start_on(issuer: &TestCa, token: &str, listener: std::net::TcpListener) -> Self {
        listener.set_nonblocking(true).unwrap();
        let listener = TcpListener::from_std(listener).unwrap();
        let name = signer_dns_name();
        let serving = issuer.issue_server(&name);
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(serving.chain.clone(), serving.private_key())
        .unwrap();
        let operator = Self {
            addr: listener.local_addr().unwrap(),
            name,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            state: Arc::new(State {
                token: token.to_owned(),
                ..State::default()
            }),
            tasks: Arc::default(),
        };
        operator.serve(listener);
        operator
    }

    fn serve(&self, listener: TcpListener) {
        let (acceptor, state, tasks) = (
            self.acceptor.clone(),
            self.state.clone(),
            self.tasks.clone(),
        );
        let accepting = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, state) = (acceptor.clone(), state.clone());
                let connection = tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(handle(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
                tasks.lock().unwrap().push(connection);
            }
        });
        self.tasks.lock().unwrap().push(accepting);
    }

    /// Closes the listener and every connection (the watches end mid-stream).
    pub fn stop(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
        self.state.watches.lock().unwrap().clear();
    }

    /// Listens again on the same port.
    pub async fn restart(&self) {
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
            }
        };
        self.serve(listener);
    }

    /// Sets the current config without telling open watches (the next watch gets it).
    pub fn set(&self, config: ProxyConfig) {
        *self.state.config.lock().unwrap() = Some(config);
    }

    /// Publishes a new config: open watches get the delta from the current one.
    pub fn publish(&self, config: ProxyConfig) {
        let old = self.state.config.lock().unwrap().replace(config.clone());
        let message = match old {
            Some(old) => StreamMessage::Delta(ConfigDelta::between(&old, &config)),
            None => StreamMessage::Snapshot { config },
        };
        self.send(&message.to_line());
    }

    /// Sends a raw line (or anything) on every open watch.
    pub fn send(&self, line: &str) {
        let bytes = Bytes::from(line.to_owned());
        self.state
            .watches
            .lock()
            .unwrap()
            .retain(|w| w.send(bytes.clone()).is_ok());
    }

    /// Open watches.
    pub fn watches(&self) -> usize {
        let mut watches = self.state.watches.lock().unwrap();
        watches.retain(|w| !w.is_closed());
        watches.len()
    }

    /// The `version` parameter of each watch request so far.
    pub fn watch_versions(&self) -> Vec<Option<String>> {
        self.state.watch_versions.lock().unwrap().clone()
    }

    /// Watches refused for their token.
    pub fn refused(&self) -> usize {
        *self.state.refused.lock().unwrap()
    }

    /// Answers discovery of `addr` with `service`.
    pub fn answer(&self, addr: SocketAddr, service: ServiceRef) {
        self.state.answers.lock().unwrap().insert(addr, service);
    }

    /// The addresses asked for so far.
    pub fn discovers(&self) -> Vec<SocketAddr> {
        self.state.discovers.lock().unwrap().clone()
    }

    /// The applied reports so far.
    pub fn applied(&self) -> Vec<AppliedReport> {
        self.state.applied.lock().unwrap().clone()
    }
}

impl Drop for TestOperator {
    fn drop(&mut self) {
        self.stop();
    }
}

fn full(status: u16, body: Vec<u8>) -> hyper::Response<Body> {
    hyper::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)).boxed())
        .unwrap()
}

fn refuse(status: u16, reason: &str) -> hyper::Response<Body> {
    let body = serde_json::to_vec(&StreamRefusal {
        reason: reason.into(),
        message: format!("test operator: {reason}"),
    })
    .unwrap();
    full(status, body)
}

async fn handle(
    state: &State,
    req: hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<Body> {
    let authorized = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        == Some(format!("Bearer {}", state.token).as_str());
    let path = req.uri().path().to_owned();
    if !authorized {
        if path == WATCH_PATH {
            *state.refused.lock().unwrap() += 1;
        }
        return refuse(401, "Unauthenticated");
    }
    let query = req.uri().query().map(str::to_owned);
    let body = req.into_body().collect().await.unwrap().to_bytes();
    match path.as_str() {
        p if p == WATCH_PATH => watch(state, query),
        p if p == DISCOVER_PATH => {
            let Ok(request) = serde_json::from_slice::<DiscoverRequest>(&body) else {
                return refuse(400, "BadRequest");
            };
            state.discovers.lock().unwrap().push(request.address);
            let service = state.answers.lock().unwrap().get(&request.address).cloned();
            full(
                200,
                serde_json::to_vec(&DiscoverResponse { service }).unwrap(),
            )
        }
        p if p == APPLIED_PATH => {
            let Ok(report) = serde_json::from_slice::<AppliedReport>(&body) else {
                return refuse(400, "BadRequest");
            };
            state.applied.lock().unwrap().push(report);
            full(200, b"{}".to_vec())
        }
        _ => refuse(404, "NotFound"),
    }
}

fn watch(state: &State, query: Option<String>) -> hyper::Response<Body> {
    let version = query.as_deref().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("version="))
            .map(str::to_owned)
    });
    state.watch_versions.lock().unwrap().push(version.clone());
    let Some(config) = state.config.lock().unwrap().clone() else {
        return refuse(503, "NoConfig");
    };
    let first = if version.as_deref() == Some(config.version.as_str()) {
        StreamMessage::Current {
            version: config.version.clone(),
        }
    } else {
        StreamMessage::Snapshot { config }
    };
    let (tx, rx) = mpsc::unbounded_channel();
    tx.send(Bytes::from(first.to_line())).unwrap();
    state.watches.lock().unwrap().push(tx);
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
    });
    hyper::Response::builder()
        .status(200)
        .header("content-type", "application/x-ndjson")
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .unwrap()
}
