//! The watch: one long `GET` per connection, its NDJSON lines applied as they come.
//!
//! The stream keeps its own last full config (`held`), the one the operator's deltas are made
//! for; each message rebuilds it and hands a copy to the [`ConfigStore`], which validates and
//! compiles it like a file and activates it if it is newer than what is active. A delta for
//! another base, or a `current` for a version the stream does not have, ends the connection and
//! the next one asks for a snapshot. Whatever ends a connection (refusal, error, silence for
//! three heartbeat intervals, the operator going away), the proxy keeps its config and tries
//! again after a jittered exponential backoff.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use bytes::BytesMut;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tandem_crds::contract::stream::{
    HEARTBEAT_INTERVAL, MAX_MESSAGE_BYTES, STREAM_CONTENT_TYPE, WATCH_PATH, WATCH_VERSION_PARAM,
};
use tandem_crds::contract::{ProxyConfig, StreamMessage};
use tokio::sync::Notify;

use super::operator::{CALL_TIMEOUT, Operator, StreamError, jitter};
use crate::config::ConfigStore;
use crate::error::chain;
use crate::metrics::Metrics;

/// First backoff cap after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Largest backoff cap.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// What `/config` shows under `stream`.
#[derive(Clone, Debug, Default)]
pub struct StreamStatus {
    /// Whether a watch is open and answered.
    pub connected: bool,
    /// Since when it is (or, disconnected, since when it is not).
    pub since: Option<SystemTime>,
    /// Why the last connection ended, and when.
    pub last_error: Option<(String, SystemTime)>,
    /// Connections that ended since start.
    pub reconnects: u64,
}

/// The watch's state, written by the watch task only.
pub struct StreamState {
    /// `host:port` of the operator.
    pub operator: String,
    status: ArcSwap<StreamStatus>,
}

impl StreamState {
    /// Not connected yet.
    pub fn new(operator: String) -> Self {
        Self {
            operator,
            status: ArcSwap::from_pointee(StreamStatus::default()),
        }
    }

    /// The state now.
    pub fn status(&self) -> Arc<StreamStatus> {
        self.status.load_full()
    }

    fn update(&self, f: impl FnOnce(&mut StreamStatus)) {
        let mut status = StreamStatus::clone(&self.status.load());
        f(&mut status);
        self.status.store(Arc::new(status));
    }
}

/// Full-jitter exponential backoff: each wait is random in `0..=cap`, the cap doubling from
/// [`BACKOFF_MIN`] to [`BACKOFF_MAX`], so 10,000 proxies whose operator restarted do not come
/// back in step.
struct Backoff {
    cap: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { cap: BACKOFF_MIN }
    }

    fn next(&mut self) -> Duration {
        let wait = jitter(self.cap);
        self.cap = (self.cap * 2).min(BACKOFF_MAX);
        wait
    }

    fn reset(&mut self) {
        self.cap = BACKOFF_MIN;
    }
}

/// The watch task.
pub struct Watch {
    operator: Arc<Operator>,
    store: Arc<ConfigStore>,
    state: Arc<StreamState>,
    metrics: Arc<Metrics>,
    /// Woken at each connect, so the reporter retries what failed.
    connected: Arc<Notify>,
    /// The stream's last full config, the base of the operator's deltas.
    held: Option<ProxyConfig>,
    /// How long the watch may stay silent.
    silence: Duration,
}

impl Watch {
    /// A watch that has not connected yet.
    pub fn new(
        operator: Arc<Operator>,
        store: Arc<ConfigStore>,
        state: Arc<StreamState>,
        metrics: Arc<Metrics>,
        connected: Arc<Notify>,
    ) -> Self {
        Self {
            operator,
            store,
            state,
            metrics,
            connected,
            held: None,
            silence: HEARTBEAT_INTERVAL * 3,
        }
    }

    /// Watches forever, reconnecting after each end.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new();
        let mut snapshot = false;
        loop {
            let (answered, error) = self.watch_once(snapshot).await;
            if answered {
                backoff.reset();
            }
            snapshot = error.wants_snapshot();
            let message = chain(&error);
            tracing::warn!(error = %message, kept = self.store.active().is_some(), "Config stream ended; the proxy keeps its config and reconnects");
            self.metrics.stream.connected.set(0);
            self.metrics.stream.reconnects.inc();
            let now = SystemTime::now();
            self.state.update(|s| {
                if s.connected {
                    s.since = Some(now);
                }
                s.connected = false;
                s.last_error = Some((message, now));
                s.reconnects += 1;
            });
            let wait = error.retry_soon().unwrap_or_else(|| backoff.next());
            tokio::time::sleep(wait).await;
        }
    }

    /// The version to send: the stream's own, else the active one; none to ask for a snapshot.
    fn held_version(&self, snapshot: bool) -> Option<String> {
        if snapshot {
            return None;
        }
        self.held
            .as_ref()
            .map(|h| h.version.clone())
            .or_else(|| self.store.active().map(|a| a.config.version.clone()))
            .filter(|v| !v.is_empty())
    }

    /// One connection: returns whether the operator answered it, and why it ended.
    async fn watch_once(&mut self, snapshot: bool) -> (bool, StreamError) {
        let path = match self.held_version(snapshot) {
            Some(version) => format!(
                "{WATCH_PATH}?{WATCH_VERSION_PARAM}={}",
                encode_query(&version)
            ),
            None => WATCH_PATH.to_owned(),
        };
        let opened = tokio::time::timeout(
            CALL_TIMEOUT,
            self.operator
                .send(http::Method::GET, &path, None, STREAM_CONTENT_TYPE),
        )
        .await;
        let (response, _driver) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(error)) => return (false, error),
            Err(_) => return (false, StreamError::Timeout(CALL_TIMEOUT)),
        };
        self.metrics.stream.connected.set(1);
        let now = SystemTime::now();
        self.state.update(|s| {
            s.connected = true;
            s.since = Some(now);
        });
        tracing::info!(operator = %self.state.operator, path, "Config stream connected");
        self.connected.notify_one();
        (true, self.read(response.into_body()).await)
    }

    /// Reads lines until the watch ends.
    async fn read(&mut self, mut body: Incoming) -> StreamError {
        let mut buffer = BytesMut::new();
        // How much of `buffer` is known to hold no newline: a snapshot arriving in many frames
        // is scanned once, not once per frame.
        let mut scanned = 0;
        loop {
            let frame = match tokio::time::timeout(self.silence, body.frame()).await {
                Err(_) => return StreamError::Silent(self.silence),
                Ok(None) => return StreamError::Closed,
                Ok(Some(Err(e))) => return StreamError::BadAnswer(Box::new(e)),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue; // trailers
            };
            buffer.extend_from_slice(&data);
            while let Some(offset) = buffer[scanned..].iter().position(|b| *b == b'\n') {
                let end = scanned + offset;
                let line = buffer.split_to(end + 1);
                scanned = 0;
                if let Err(error) = self.handle(&line[..end]) {
                    return error;
                }
            }
            scanned = buffer.len();
            if buffer.len() > MAX_MESSAGE_BYTES {
                return StreamError::LineTooLong;
            }
        }
    }

    /// Applies one line.
    fn handle(&mut self, line: &[u8]) -> Result<(), StreamError> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let message = StreamMessage::from_line(line).map_err(StreamError::BadMessage)?;
        match message {
            StreamMessage::Heartbeat => Ok(()),
            StreamMessage::Snapshot { config } => {
                tracing::debug!(version = %config.version, "Stream snapshot");
                self.deliver(config);
                Ok(())
            }
            StreamMessage::Current { version } => self.current(version),
            StreamMessage::Delta(delta) => {
                let Some(held) = self.held.as_mut() else {
                    return Err(StreamError::UnknownCurrent(delta.base));
                };
                delta.apply_to(held).map_err(StreamError::Delta)?;
                tracing::debug!(base = %delta.base, version = %delta.version, services = delta.services.len(), removed = delta.removed.len(), "Stream delta");
                let config = held.clone();
                self.deliver(config);
                Ok(())
            }
        }
    }

    /// The operator says we already hold `version`: the stream's base is then that config,
    /// which is either the stream's own or the active one.
    fn current(&mut self, version: String) -> Result<(), StreamError> {
        if self.held.as_ref().is_some_and(|h| h.version == version) {
            return Ok(());
        }
        match self.store.active() {
            Some(active) if active.config.version == version => {
                self.held = Some(active.config.clone());
                Ok(())
            }
            _ => Err(StreamError::UnknownCurrent(version)),
        }
    }

    /// Keeps `config` as the stream's base and offers it to the store (which logs, counts and
    /// shows a refusal; the stream goes on, as the operator's next delta builds on it).
    fn deliver(&mut self, config: ProxyConfig) {
        self.held = Some(config.clone());
        let _ = self.store.apply_stream(config);
    }
}

/// Percent-encodes a version for the query string (stamps are `[0-9a-z.]`, but a hand-written
/// file's version may be anything).
fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::IdentityState;
    use crate::identity::certify::SignerAddr;
    use tandem_crds::contract::ConfigDelta;

    fn config(version: &str, service_account: &str) -> ProxyConfig {
        let text = format!(
            r#"{{"apiVersion":"tandem.dev/proxy-config/v1","version":"{version}","workload":{{"namespace":"shop","serviceAccount":"{service_account}"}}}}"#
        );
        ProxyConfig::from_json(text.as_bytes()).unwrap()
    }

    /// A watch whose operator is never called (only [`Watch::handle`] runs).
    fn watch() -> (Watch, Arc<ConfigStore>) {
        let metrics = Arc::new(Metrics::new());
        let store = Arc::new(ConfigStore::new("x".into(), metrics.clone()));
        let operator = Arc::new(Operator {
            addr: SignerAddr::parse("127.0.0.1:1").unwrap(),
            server_name: "127.0.0.1".try_into().unwrap(),
            token: "token".into(),
            identity: Arc::new(IdentityState::default()),
        });
        let state = Arc::new(StreamState::new("127.0.0.1:1".into()));
        let watch = Watch::new(operator, store.clone(), state, metrics, Arc::default());
        (watch, store)
    }

    fn line(message: &StreamMessage) -> Vec<u8> {
        message.to_line().trim_end().as_bytes().to_vec()
    }

    #[test]
    fn current_adopts_the_active_config_as_the_base_of_deltas() {
        let (mut watch, store) = watch();
        store
            .apply(config("100.a", "web").to_json().as_bytes())
            .unwrap();
        watch
            .handle(&line(&StreamMessage::Current {
                version: "100.a".into(),
            }))
            .unwrap();
        let delta = ConfigDelta::between(&config("100.a", "web"), &config("200.b", "web"));
        watch.handle(&line(&StreamMessage::Delta(delta))).unwrap();
        let active = store.active().unwrap();
        assert_eq!(active.config.version, "200.b");
        assert_eq!(active.source, tandem_crds::contract::ConfigSource::Stream);
    }

    #[test]
    fn what_the_stream_cannot_build_on_ends_the_connection_for_a_snapshot() {
        let (mut watch, store) = watch();
        let delta = ConfigDelta::between(&config("100.a", "web"), &config("200.b", "web"));
        let no_base = watch.handle(&line(&StreamMessage::Delta(delta.clone())));
        assert!(no_base.unwrap_err().wants_snapshot());
        let unknown = watch.handle(&line(&StreamMessage::Current {
            version: "100.a".into(),
        }));
        assert!(unknown.unwrap_err().wants_snapshot());
        watch
            .handle(&line(&StreamMessage::Snapshot {
                config: config("150.c", "web"),
            }))
            .unwrap();
        let mismatch = watch.handle(&line(&StreamMessage::Delta(delta)));
        assert!(matches!(mismatch, Err(StreamError::Delta(_))));
        assert_eq!(store.active().unwrap().config.version, "150.c");
        let bad = watch.handle(b"{\"type\":\"nonsense\"}").unwrap_err();
        assert!(matches!(bad, StreamError::BadMessage(_)) && !bad.wants_snapshot());
        watch.handle(b"  ").unwrap();
    }

    #[test]
    fn a_refused_snapshot_still_becomes_the_base_of_the_operators_next_delta() {
        let (mut watch, store) = watch();
        watch
            .handle(&line(&StreamMessage::Snapshot {
                config: config("100.a", "web"),
            }))
            .unwrap();
        let mut invalid = config("200.b", "web");
        invalid.workload.service_account = String::new();
        watch
            .handle(&line(&StreamMessage::Snapshot {
                config: invalid.clone(),
            }))
            .unwrap();
        assert_eq!(store.active().unwrap().config.version, "100.a");
        let delta = ConfigDelta::between(&invalid, &config("300.c", "web"));
        watch.handle(&line(&StreamMessage::Delta(delta))).unwrap();
        assert_eq!(store.active().unwrap().config.version, "300.c");
    }

    #[test]
    fn followers_and_throttled_accepts_are_retried_soon_and_retry_after_is_honoured() {
        let refused = |reason: &str, retry_after: Option<u64>| StreamError::Refused {
            status: 503,
            reason: reason.into(),
            message: String::new(),
            retry_after: retry_after.map(Duration::from_secs),
        };
        for reason in ["NotLeader", "Throttled"] {
            let wait = refused(reason, None).retry_soon().unwrap();
            assert!(wait >= Duration::from_millis(250) && wait <= Duration::from_secs(1));
        }
        let wait = refused("Throttled", Some(3)).retry_soon().unwrap();
        assert!(wait >= Duration::from_secs(3) && wait <= Duration::from_millis(3_250));
        let capped = refused("NotLeader", Some(3_600)).retry_soon().unwrap();
        assert!(capped <= Duration::from_millis(30_250));
        assert_eq!(refused("Unauthenticated", None).retry_soon(), None);
        assert_eq!(StreamError::Closed.retry_soon(), None);
    }

    #[test]
    fn backoff_waits_grow_to_the_cap_and_reset() {
        let mut backoff = Backoff::new();
        for _ in 0..20 {
            assert!(backoff.next() <= BACKOFF_MAX);
        }
        assert_eq!(backoff.cap, BACKOFF_MAX);
        backoff.reset();
        assert!(backoff.next() <= BACKOFF_MIN);
    }

    #[test]
    fn versions_are_encoded_for_the_query() {
        assert_eq!(
            encode_query("1733220000123.9f86d081"),
            "1733220000123.9f86d081"
        );
        assert_eq!(encode_query("v 1&x"), "v%201%26x");
    }
}
