//! One call to the operator's HTTPS port: connect (the certify call's connector), present the
//! token, send, read the status; refusals are read as the contract's [`StreamRefusal`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tandem_crds::contract::stream::MAX_MESSAGE_BYTES;
use tandem_crds::contract::{DeltaMismatch, StreamRefusal};

use crate::identity::certify::{self, SignerAddr};
use crate::identity::{CertifyFailure, IdentityState};

/// Largest answer body read from a discover or applied call (a few hundred bytes).
const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Time allowed for a whole discover or applied call, and for the watch's answer to start.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait a `Retry-After` may impose.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// Why a call to the operator, or a watch, ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// No trust bundle is loaded yet, so the operator's certificate cannot be checked.
    #[error("no trust bundle loaded: the operator's certificate cannot be verified")]
    NoTrust,
    /// The token could not be read, or the operator could not be reached over verified TLS.
    #[error(transparent)]
    Connect(CertifyFailure),
    /// The HTTP exchange broke off.
    #[error("HTTP exchange with the operator at {addr} failed")]
    Http {
        /// `host:port` of the operator.
        addr: String,
        /// The cause.
        #[source]
        source: hyper::Error,
    },
    /// The request could not be put together.
    #[error("cannot build the request")]
    Request(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The operator refused the call.
    #[error("the operator refused: {status} {reason}: {message}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The contract's stable reason (`NotLeader`, `Throttled`, `Unauthenticated`, …).
        reason: String,
        /// The operator's explanation.
        message: String,
        /// How long the operator asked us to wait (`Retry-After`).
        retry_after: Option<Duration>,
    },
    /// The call took too long.
    #[error("no answer from the operator within {0:?}")]
    Timeout(Duration),
    /// An answer's body could not be read or is not what the contract says.
    #[error("the operator's answer is unusable")]
    BadAnswer(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// A line of the watch is longer than the contract allows.
    #[error("a line of the stream is longer than {MAX_MESSAGE_BYTES} bytes")]
    LineTooLong,
    /// A line of the watch is not a message.
    #[error("a line of the stream is not a message")]
    BadMessage(#[source] serde_json::Error),
    /// Nothing arrived for three heartbeat intervals.
    #[error("no message from the operator for {0:?}")]
    Silent(Duration),
    /// The operator ended the watch.
    #[error("the operator closed the stream")]
    Closed,
    /// A delta was made for another version than the one the stream holds.
    #[error("the stream cannot apply a delta")]
    Delta(#[source] DeltaMismatch),
    /// The operator says we hold a version the stream has no config of.
    #[error("the operator says we hold {0:?}, which the stream does not have")]
    UnknownCurrent(String),
}

impl StreamError {
    /// Whether the next watch should ask for a snapshot (send no version).
    pub fn wants_snapshot(&self) -> bool {
        matches!(self, Self::Delta(_) | Self::UnknownCurrent(_))
    }

    /// How soon to retry when the operator said so: its `Retry-After`, or soon for a follower
    /// (`NotLeader`) or a throttled accept (`Throttled`), whose cause passes on its own.
    pub fn retry_soon(&self) -> Option<Duration> {
        let Self::Refused {
            reason,
            retry_after,
            ..
        } = self
        else {
            return None;
        };
        let soon = matches!(reason.as_str(), "NotLeader" | "Throttled");
        match retry_after {
            Some(after) => Some((*after).min(MAX_RETRY_AFTER) + jitter(Duration::from_millis(250))),
            None if soon => Some(Duration::from_millis(250) + jitter(Duration::from_millis(750))),
            None => None,
        }
    }
}

/// A random duration in `0..=max`.
pub(crate) fn jitter(max: Duration) -> Duration {
    let millis = u64::try_from(max.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(fastrand::u64(0..=millis))
}

/// Ends the connection task when the call is done with it.
pub(crate) struct Driver(tokio::task::JoinHandle<()>);

impl Drop for Driver {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where the operator is and how to prove who we are.
pub struct Operator {
    /// Its HTTPS address (the signer's).
    pub addr: SignerAddr,
    /// The name its certificate must carry.
    pub server_name: ServerName<'static>,
    /// The projected ServiceAccount token file (read for every call: the kubelet rotates it).
    pub token: PathBuf,
    /// Where the trust anchors are.
    pub identity: Arc<IdentityState>,
}

impl Operator {
    /// Sends one request; returns the answer once its head arrived (2xx), or the refusal.
    pub(crate) async fn send(
        &self,
        method: http::Method,
        path_and_query: &str,
        body: Option<Vec<u8>>,
        accept: &str,
    ) -> Result<(http::Response<Incoming>, Driver), StreamError> {
        let trust = self.identity.trust().ok_or(StreamError::NoTrust)?;
        let token = certify::read_token(&self.token).map_err(StreamError::Connect)?;
        let tls = certify::open(&self.addr, &self.server_name, &trust)
            .await
            .map_err(StreamError::Connect)?;
        let addr = self.addr.to_string();
        let http = |source| StreamError::Http {
            addr: addr.clone(),
            source,
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(http)?;
        let driver = Driver(tokio::spawn(async move {
            let _ = connection.await;
        }));
        let mut request = http::Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(http::header::HOST, addr.as_str())
            .header(http::header::AUTHORIZATION, token)
            .header(http::header::ACCEPT, accept);
        if body.is_some() {
            request = request.header(http::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| StreamError::Request(Box::new(e)))?;
        let response = sender.send_request(request).await.map_err(http)?;
        if response.status().is_success() {
            return Ok((response, driver));
        }
        Err(refusal(response).await)
    }

    /// `POST`s `body` as JSON and reads a JSON answer, within [`CALL_TIMEOUT`].
    pub(crate) async fn post<B: Serialize, A: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<A, StreamError> {
        let call = async {
            let body = serde_json::to_vec(body).map_err(|e| StreamError::Request(Box::new(e)))?;
            let (response, _driver) = self
                .send(http::Method::POST, path, Some(body), "application/json")
                .await?;
            let bytes = read_limited(response).await?;
            // An empty 2xx body is an empty object (the applied call needs no answer).
            let bytes = if bytes.is_empty() {
                Bytes::from_static(b"{}")
            } else {
                bytes
            };
            serde_json::from_slice(&bytes).map_err(|e| StreamError::BadAnswer(Box::new(e)))
        };
        tokio::time::timeout(CALL_TIMEOUT, call)
            .await
            .map_err(|_| StreamError::Timeout(CALL_TIMEOUT))?
    }
}

async fn read_limited(response: http::Response<Incoming>) -> Result<Bytes, StreamError> {
    Ok(Limited::new(response.into_body(), MAX_ANSWER_BYTES)
        .collect()
        .await
        .map_err(StreamError::BadAnswer)?
        .to_bytes())
}

/// Reads a non-2xx answer: the contract's [`StreamRefusal`] when the body is one.
async fn refusal(response: http::Response<Incoming>) -> StreamError {
    let status = response.status();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let body = tokio::time::timeout(CALL_TIMEOUT, read_limited(response))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let (reason, message) = match serde_json::from_slice::<StreamRefusal>(&body) {
        Ok(r) => (r.reason, r.message),
        Err(_) => (
            status.canonical_reason().unwrap_or("error").to_owned(),
            String::from_utf8_lossy(&body[..body.len().min(512)])
                .trim()
                .to_owned(),
        ),
    };
    StreamError::Refused {
        status: status.as_u16(),
        reason,
        message,
        retry_after,
    }
}
