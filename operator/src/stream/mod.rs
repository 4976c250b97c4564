//! The config stream's server: the three calls of [`tandem_crds::contract::stream`], served
//! beside certify on the signer's HTTPS listener.
//!
//! Every call carries the proxy's projected token; [`auth`] reviews it (TokenReview and the pod
//! binding, as certify does) and gives the caller's pod and workload, the only view it can
//! see. Only the leader answers (its hub is the one the reconciler publishes into); a follower
//! refuses `NotLeader` and the proxy retries through the Service.
//!
//! Reconnect storms (every proxy after an operator restart) are throttled: at most
//! [`MAX_SETUPS`] calls are between their arrival and their first byte (the review, the
//! snapshot) at once; the others wait up to [`SETUP_WAIT`] for a turn, then are refused
//! `Throttled` with `Retry-After`, and the proxy backs off with jitter. An open watch costs
//! its connection (about 21 KB measured, mostly hyper's 8 KiB read and header buffers and
//! rustls's state) and a few hundred bytes of its own, nothing per change: no queue, no copy
//! of the config (see [`watch`]).

pub mod auth;
pub mod watch;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tandem_crds::contract::stream::{
    APPLIED_PATH, AppliedReport, DISCOVER_PATH, DiscoverRequest, DiscoverResponse,
    STREAM_CONTENT_TYPE, StreamRefusal, WATCH_PATH,
};
use tokio::sync::{Semaphore, SemaphorePermit, watch as channel};
use tracing::{debug, warn};

use crate::hub::Hub;
use crate::metrics::StreamMetrics;
use crate::signer::{self, Refusal};
use auth::{Authenticator, Caller};
use watch::Follow;

/// Calls between arrival and first byte at once (each may cost a TokenReview and a
/// snapshot's serialization).
pub const MAX_SETUPS: usize = 64;
/// How long a call waits for a set-up turn before it is refused `Throttled`.
pub const SETUP_WAIT: Duration = Duration::from_secs(2);
/// The `Retry-After` of `Throttled` and `NotLeader` refusals, in seconds (the proxy adds its
/// jitter).
const RETRY_AFTER_SECONDS: u64 = 1;
/// Largest body of discover and applied (each is well under 200 bytes).
const MAX_BODY_BYTES: usize = 4 * 1024;

/// A refused stream call: its stable reason, HTTP status and message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// As in [`StreamRefusal::reason`].
    pub reason: &'static str,
    /// The HTTP status.
    pub status: StatusCode,
    /// For a person.
    pub message: String,
}

impl Refused {
    fn new(reason: &'static str, status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            reason,
            status,
            message: message.into(),
        }
    }

    fn not_leader() -> Self {
        Self::new(
            "NotLeader",
            StatusCode::SERVICE_UNAVAILABLE,
            "this operator replica is not the leader; retry (the Service reaches the leader)",
        )
    }

    fn bad_request(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new("BadRequest", status, message)
    }

    /// Whether the refusal is routine (a storm, a follower) rather than a caller's fault:
    /// logged at debug, not warn.
    fn is_routine(&self) -> bool {
        matches!(self.reason, "NotLeader" | "Throttled")
    }
}

impl From<Refusal> for Refused {
    fn from(refusal: Refusal) -> Self {
        Self::new(refusal.reason(), refusal.status(), refusal.message())
    }
}

/// The bound on calls being set up at once: a turn is waited for at most `wait`, then the
/// call is refused `Throttled` (and the proxy retries with jitter).
pub struct Throttle {
    turns: Semaphore,
    size: usize,
    wait: Duration,
}

impl Throttle {
    /// `size` turns, each waited for at most `wait`.
    pub fn new(size: usize, wait: Duration) -> Self {
        Self {
            turns: Semaphore::new(size),
            size,
            wait,
        }
    }

    /// A turn, held until dropped.
    pub async fn turn(&self) -> Result<SemaphorePermit<'_>, Refused> {
        match tokio::time::timeout(self.wait, self.turns.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_)) | Err(_) => Err(Refused::new(
                "Throttled",
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "{} config stream calls are being set up; retry after a moment",
                    self.size
                ),
            )),
        }
    }
}

/// What the stream's handlers share.
pub struct StreamServer {
    hub: Arc<Hub>,
    auth: Authenticator,
    leader: channel::Receiver<bool>,
    setups: Throttle,
}

impl StreamServer {
    /// Serves `hub` to callers reviewed by `auth`, while `leader` holds true.
    pub fn new(hub: Arc<Hub>, auth: Authenticator, leader: channel::Receiver<bool>) -> Self {
        Self {
            hub,
            auth,
            leader,
            setups: Throttle::new(MAX_SETUPS, SETUP_WAIT),
        }
    }

    fn metrics(&self) -> &StreamMetrics {
        self.hub.metrics()
    }

    fn leading(&self) -> Result<(), Refused> {
        if *self.leader.borrow() {
            Ok(())
        } else {
            Err(Refused::not_leader())
        }
    }

    /// The leader check, a turn, and the caller: what every call starts with.
    async fn admit(&self, headers: &HeaderMap) -> Result<(Caller, SemaphorePermit<'_>), Refused> {
        self.leading()?;
        let token = signer::bearer(headers).ok_or_else(|| {
            Refused::new(
                "Unauthenticated",
                StatusCode::UNAUTHORIZED,
                "no Authorization: Bearer <token> header",
            )
        })?;
        let permit = self.setups.turn().await?;
        let caller = self.auth.caller(token).await?;
        Ok((caller, permit))
    }

    /// The JSON refusal, counted and logged.
    fn refuse(&self, call: &'static str, refused: Refused) -> Response {
        StreamMetrics::count(&self.metrics().refused, "reason", refused.reason);
        if refused.is_routine() {
            debug!(call, reason = refused.reason, message = %refused.message, "Refused a config stream call");
        } else {
            warn!(call, reason = refused.reason, message = %refused.message, "Refused a config stream call");
        }
        let mut response = (
            refused.status,
            axum::Json(StreamRefusal {
                reason: refused.reason.to_owned(),
                message: refused.message,
            }),
        )
            .into_response();
        if refused.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}

/// The stream's routes, to merge into the signer's app.
pub fn router(server: Arc<StreamServer>) -> Router {
    Router::new()
        .route(WATCH_PATH, get(watch_config))
        .route(DISCOVER_PATH, post(discover))
        .route(APPLIED_PATH, post(applied))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(server)
}

/// The query of [`WATCH_PATH`].
#[derive(Debug, Deserialize)]
struct WatchQuery {
    /// The version the proxy holds (absent on its first start without a file).
    version: Option<String>,
}

async fn watch_config(
    State(server): State<Arc<StreamServer>>,
    headers: HeaderMap,
    query: Result<Query<WatchQuery>, QueryRejection>,
) -> Response {
    match open_watch(&server, &headers, query).await {
        Ok(response) => response,
        Err(refused) => server.refuse("watch", refused),
    }
}

async fn open_watch(
    server: &Arc<StreamServer>,
    headers: &HeaderMap,
    query: Result<Query<WatchQuery>, QueryRejection>,
) -> Result<Response, Refused> {
    let Query(query) = query.map_err(|e| Refused::bad_request(e.status(), e.body_text()))?;
    let (caller, permit) = server.admit(headers).await?;
    let views = server.hub.subscribe(&caller.workload);
    let mut follow = Follow::new(
        server.hub.clone(),
        caller.pod.clone(),
        views,
        server.leader.clone(),
        query.version,
    );
    // The first line is built under the permit: in a storm, serializing snapshots is the
    // work being throttled. A workload not yet published waits without holding a turn.
    let first = follow.first_line();
    drop(permit);
    debug!(workload = ?caller.workload, pod = %caller.pod.name, ready = first.is_some(), "Watch opened");
    let lines = futures::stream::unfold((first, follow), |(first, mut follow)| async move {
        let line = match first {
            Some(line) => line,
            None => follow.next_line().await?,
        };
        Some((Ok::<Bytes, Infallible>(line), (None, follow)))
    });
    Ok((
        [(header::CONTENT_TYPE, STREAM_CONTENT_TYPE)],
        Body::from_stream(lines),
    )
        .into_response())
}

/// A call's JSON body as `T` (`what` names it in the refusal): a body over the limit or not
/// a `T` is refused `BadRequest`.
fn json_body<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
    what: &str,
) -> Result<T, Refused> {
    let body = body.map_err(|e| Refused::bad_request(e.status(), e.body_text()))?;
    serde_json::from_slice(&body).map_err(|e| {
        Refused::bad_request(
            StatusCode::BAD_REQUEST,
            format!("the body is not {what}: {e}"),
        )
    })
}

async fn discover(
    State(server): State<Arc<StreamServer>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let answer = async {
        let (caller, _permit) = server.admit(&headers).await?;
        let request: DiscoverRequest = json_body(body, "a DiscoverRequest")?;
        let service = server.hub.resolve(request.address);
        let result = if service.is_some() { "found" } else { "unknown" };
        StreamMetrics::count(&server.metrics().discoveries, "result", result);
        if let Some(service) = &service
            && server.hub.learn(&caller.workload, service.clone())
        {
            debug!(workload = ?caller.workload, service = %format!("{}/{}", service.namespace, service.name), "Learned a dependency");
        }
        Ok::<_, Refused>(DiscoverResponse { service })
    }
    .await;
    match answer {
        Ok(response) => (StatusCode::OK, axum::Json(response)).into_response(),
        Err(refused) => server.refuse("discover", refused),
    }
}

async fn applied(
    State(server): State<Arc<StreamServer>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let answer = async {
        let (caller, _permit) = server.admit(&headers).await?;
        let report: AppliedReport = json_body(body, "an AppliedReport")?;
        server
            .hub
            .applied(caller.pod, caller.workload, report.version, report.source);
        Ok::<_, Refused>(())
    }
    .await;
    match answer {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(refused) => server.refuse("applied", refused),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn past_its_turns_a_call_waits_then_is_refused_throttled() {
        let throttle = Throttle::new(2, Duration::from_millis(50));
        let first = throttle.turn().await.unwrap();
        let _second = throttle.turn().await.unwrap();
        let refused = throttle.turn().await.unwrap_err();
        assert_eq!(refused.reason, "Throttled");
        assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
        drop(first);
        assert!(throttle.turn().await.is_ok());
    }

    #[test]
    fn certify_refusals_keep_their_reason_and_status_on_the_stream() {
        let refused = Refused::from(Refusal::WrongAudience("for vault".into()));
        assert_eq!(
            (refused.reason, refused.status, refused.message.as_str()),
            ("WrongAudience", StatusCode::FORBIDDEN, "for vault")
        );
        assert!(!refused.is_routine());
        assert!(Refused::not_leader().is_routine());
    }
}
