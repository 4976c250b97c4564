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
