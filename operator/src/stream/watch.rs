//! One watch: what to send next, from the workload's view in the hub.
//!
//! [`next_message`] is the pure part: the first message is `Current` when the proxy already
//! holds the view's version and `Snapshot` otherwise, then a `Delta` from what was last sent to
//! the newest view. [`Follow`] drives it from the hub's [`watch`] channel, which keeps only the
//! newest value: a slow client gets one delta from what it last got to the newest, and no
//! client ever has a queue.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use serde::Serialize;
use tandem_crds::contract::stream::HEARTBEAT_INTERVAL;
use tandem_crds::contract::{ConfigDelta, ProxyConfig};
use tokio::sync::watch;
use tokio::time::{Instant, Sleep};

use crate::hub::{Hub, PodKey, View, WatchGuard};
use crate::metrics::StreamMetrics;

/// What a watch has delivered so far.
#[derive(Clone, Debug)]
pub enum Sent {
    /// Nothing yet; the proxy said it holds this version (if any).
    Nothing {
        /// The `version` query parameter.
        held: Option<String>,
    },
    /// This config (the proxy holds it now).
    Config(Arc<ProxyConfig>),
}

/// One line to send, borrowing the config for a snapshot rather than copying it (a snapshot
/// is up to 1 MiB, and a reconnect storm sends thousands). Serializes exactly as
/// [`StreamMessage`](tandem_crds::contract::StreamMessage) (checked by the tests).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Outgoing<'a> {
    /// [`StreamMessage::Snapshot`](tandem_crds::contract::StreamMessage::Snapshot).
    Snapshot {
        /// The config.
        config: &'a ProxyConfig,
    },
    /// [`StreamMessage::Current`](tandem_crds::contract::StreamMessage::Current).
    Current {
        /// The version the proxy holds.
        version: &'a str,
    },
    /// [`StreamMessage::Delta`](tandem_crds::contract::StreamMessage::Delta).
    Delta(Box<ConfigDelta>),
    /// [`StreamMessage::Heartbeat`](tandem_crds::contract::StreamMessage::Heartbeat).
    Heartbeat,
}

impl Outgoing<'_> {
    /// The `type` label of the messages metric.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Snapshot { .. } => "snapshot",
            Self::Current { .. } => "current",
            Self::Delta(_) => "delta",
            Self::Heartbeat => "heartbeat",
        }
    }

    /// One line of the body: compact JSON and a newline (as [`StreamMessage::to_line`](tandem_crds::contract::StreamMessage::to_line)).
    pub fn to_line(&self) -> Bytes {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        Bytes::from(line)
    }
}

/// The message that brings a proxy from `sent` to `view`; `None` when it already has it.
pub fn next_message<'a>(sent: &'a Sent, view: &'a ProxyConfig) -> Option<Outgoing<'a>> {
    match sent {
        Sent::Nothing { held } if held.as_deref() == Some(view.version.as_str()) => {
            Some(Outgoing::Current {
                version: &view.version,
            })
        }
        Sent::Nothing { .. } => Some(Outgoing::Snapshot { config: view }),
        Sent::Config(last) if last.version == view.version => None,
        Sent::Config(last) => Some(Outgoing::Delta(Box::new(ConfigDelta::between(last, view)))),
    }
}

/// A watch in progress: the body of one `GET /v1/config/watch`. It ends when the view is
/// retired, when this replica stops leading, or (dropped) when the client goes.
pub struct Follow {
    views: watch::Receiver<Option<Arc<View>>>,
    leader: watch::Receiver<bool>,
    sent: Sent,
    heartbeat: Pin<Box<Sleep>>,
    heartbeat_every: Duration,
    registration: Registration,
    metrics: StreamMetrics,
}

/// The pod counts as watching (the stream, not the file, carries its changes) from the first
/// message on: a watch still waiting for its first view delivers nothing yet.
enum Registration {
    Pending(Arc<Hub>, PodKey),
    Open(#[allow(dead_code, reason = "held for its Drop")] WatchGuard),
}

impl Follow {
    /// Follows `views` for `pod`, whose proxy holds `held`.
    pub fn new(
        hub: Arc<Hub>,
        pod: PodKey,
        views: watch::Receiver<Option<Arc<View>>>,
        leader: watch::Receiver<bool>,
        held: Option<String>,
    ) -> Self {
        let metrics = hub.metrics().clone();
        Self {
            views,
            leader,
            sent: Sent::Nothing { held },
            heartbeat: Box::pin(tokio::time::sleep(HEARTBEAT_INTERVAL)),
            heartbeat_every: HEARTBEAT_INTERVAL,
            registration: Registration::Pending(hub, pod),
            metrics,
        }
    }

    /// Heartbeats every `every` instead of [`HEARTBEAT_INTERVAL`] (the contract's interval is
    /// what proxies expect; tests and benchmarks shorten it).
    #[must_use]
    pub fn heartbeat_every(mut self, every: Duration) -> Self {
        self.heartbeat_every = every;
        self.heartbeat.as_mut().reset(Instant::now() + every);
        self
    }

    /// The first line, if the view is already published (so the caller can build it while it
    /// holds a set-up permit). Marks the current value seen.
    pub fn first_line(&mut self) -> Option<Bytes> {
        let view = self.views.borrow_and_update().clone()?;
        self.line_for(&view)
    }

    /// The next line: a change, or a heartbeat after [`HEARTBEAT_INTERVAL`] of silence;
    /// `None` when the watch ends.
    pub async fn next_line(&mut self) -> Option<Bytes> {
        loop {
            tokio::select! {
                biased;
                changed = self.leader.changed() => {
                    if changed.is_err() || !*self.leader.borrow_and_update() {
                        return None;
                    }
                }
                changed = self.views.changed() => {
                    changed.ok()?;
                    let view = self.views.borrow_and_update().clone();
                    if let Some(line) = view.and_then(|v| self.line_for(&v)) {
                        return Some(line);
                    }
                }
                () = self.heartbeat.as_mut() => {
                    return Some(emit(&self.metrics, &mut self.heartbeat, self.heartbeat_every, &Outgoing::Heartbeat));
                }
            }
        }
    }

    fn line_for(&mut self, view: &View) -> Option<Bytes> {
        let message = next_message(&self.sent, &view.config)?;
        let line = emit(
            &self.metrics,
            &mut self.heartbeat,
            self.heartbeat_every,
            &message,
        );
        self.sent = Sent::Config(view.config.clone());
        self.register();
        Some(line)
    }

    fn register(&mut self) {
        if let Registration::Pending(hub, pod) = &self.registration {
            let guard = hub.watching(pod.clone());
            self.registration = Registration::Open(guard);
        }
    }

    /// Whether the pod counts as watching yet.
    pub fn is_registered(&self) -> bool {
        matches!(self.registration, Registration::Open(_))
    }
}

/// Serializes `message`, counts it and restarts the heartbeat timer (a heartbeat is only for
/// silence).
fn emit(
    metrics: &StreamMetrics,
    heartbeat: &mut Pin<Box<Sleep>>,
    every: Duration,
    message: &Outgoing<'_>,
) -> Bytes {
    StreamMetrics::count(&metrics.messages, "type", message.kind());
    heartbeat.as_mut().reset(Instant::now() + every);
    message.to_line()
}

#[cfg(test)]
mod tests {
    use tandem_crds::contract::{Service, StreamMessage, Workload, version_stamp};
    use tokio::sync::Notify;

    use super::*;
    use crate::render::WorkloadKey;

    fn workload() -> WorkloadKey {
        WorkloadKey {
            namespace: "shop".into(),
            service_account: "web".into(),
        }
    }

    fn pod() -> PodKey {
        PodKey {
            namespace: "shop".into(),
            name: "web-1".into(),
        }
    }

    fn config(generation: u64, services: &[&str]) -> ProxyConfig {
        let mut config = ProxyConfig::new(Workload {
            namespace: "shop".into(),
            service_account: "web".into(),
            ..Workload::default()
        });
        config.version = version_stamp(generation, "abc");
        config.services = services
            .iter()
            .map(|name| Service {
                name: (*name).into(),
                namespace: "shop".into(),
                ..Service::default()
            })
            .collect();
        config
    }

    fn hub() -> Arc<Hub> {
        Arc::new(Hub::new(Arc::new(Notify::new()), StreamMetrics::default()))
    }

    fn parse(line: &Bytes) -> StreamMessage {
        assert!(line.ends_with(b"\n") && line.iter().filter(|b| **b == b'\n').count() == 1);
        StreamMessage::from_line(line).expect("a StreamMessage")
    }

    fn follow(hub: &Arc<Hub>, held: Option<&str>) -> (Follow, watch::Sender<bool>) {
        let (leader_tx, leader) = watch::channel(true);
        let follow = Follow::new(
            hub.clone(),
            pod(),
            hub.subscribe(&workload()),
            leader,
            held.map(str::to_owned),
        );
        (follow, leader_tx)
    }

    #[test]
    fn outgoing_lines_are_stream_messages() {
        let config = config(3, &["a"]);
        let lines = [
            Outgoing::Snapshot { config: &config },
            Outgoing::Current { version: "3.abc" },
            Outgoing::Delta(Box::new(ConfigDelta::between(
                &self::config(2, &[]),
                &config,
            ))),
            Outgoing::Heartbeat,
        ];
        let expected = [
            StreamMessage::Snapshot {
                config: config.clone(),
            },
            StreamMessage::Current {
                version: "3.abc".into(),
            },
            StreamMessage::Delta(ConfigDelta::between(&self::config(2, &[]), &config)),
            StreamMessage::Heartbeat,
        ];
        for (outgoing, expected) in lines.iter().zip(expected) {
            assert_eq!(outgoing.to_line(), Bytes::from(expected.to_line()));
        }
    }

    #[test]
    fn the_first_message_is_current_only_when_the_proxy_holds_the_version() {
        let view = config(5, &["a"]);
        let held = Sent::Nothing {
            held: Some(view.version.clone()),
        };
        assert!(matches!(
            next_message(&held, &view),
            Some(Outgoing::Current { version }) if version == view.version
        ));
        for held in [None, Some("4.old".to_owned())] {
            let sent = Sent::Nothing { held };
            assert!(matches!(
                next_message(&sent, &view),
                Some(Outgoing::Snapshot { .. })
            ));
        }
        let sent = Sent::Config(Arc::new(view.clone()));
        assert!(next_message(&sent, &view).is_none());
    }

    #[tokio::test]
    async fn a_watch_sends_a_snapshot_then_one_coalesced_delta_from_what_it_last_sent() {
        let hub = hub();
        hub.publish(
            &workload(),
            config(1, &["a", "b"]),
            std::time::Instant::now(),
        );
        let (mut follow, _leader) = follow(&hub, Some("0.none"));
        assert!(!follow.is_registered());
        let first = follow.first_line().expect("a first line");
        assert!(
            matches!(parse(&first), StreamMessage::Snapshot { config } if config.generation() == 1)
        );
        assert!(follow.is_registered());
        assert!(hub.all_watching(&[pod()]));

        // Three versions while the client is slow: it gets one delta from 1 to 3.
        hub.publish(&workload(), config(2, &["a"]), std::time::Instant::now());
        hub.publish(
            &workload(),
            config(3, &["a", "c"]),
            std::time::Instant::now(),
        );
        let StreamMessage::Delta(delta) = parse(&follow.next_line().await.unwrap()) else {
            panic!("a delta");
        };
        assert_eq!(
            (delta.base.as_str(), delta.version.as_str()),
            ("1.abc", "3.abc")
        );
        let names: Vec<&str> = delta.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["c"]);
        assert_eq!(delta.removed.len(), 1);
        assert_eq!(delta.removed[0].name, "b");

        hub.retire(&workload());
        assert!(follow.next_line().await.is_none());
        drop(follow);
        assert!(!hub.all_watching(&[pod()]));
    }

    #[tokio::test]
    async fn a_watch_waits_for_the_first_view_and_answers_current_when_it_is_held() {
        let hub = hub();
        let (mut follow, _leader) = follow(&hub, Some("7.abc"));
        assert!(follow.first_line().is_none());
        assert!(!hub.all_watching(&[pod()]));
        hub.publish(&workload(), config(7, &[]), std::time::Instant::now());
        let line = follow.next_line().await.unwrap();
        assert_eq!(
            parse(&line),
            StreamMessage::Current {
                version: "7.abc".into()
            }
        );
        assert!(hub.all_watching(&[pod()]));
    }

    #[tokio::test]
    async fn an_idle_watch_hears_heartbeats_and_a_change_after_them() {
        let hub = hub();
        hub.publish(&workload(), config(1, &[]), std::time::Instant::now());
        let (follow, _leader) = follow(&hub, None);
        let mut follow = follow.heartbeat_every(Duration::from_millis(20));
        follow.first_line().unwrap();
        for _ in 0..2 {
            let line = follow.next_line().await.unwrap();
            assert_eq!(parse(&line), StreamMessage::Heartbeat);
        }
        hub.publish(&workload(), config(2, &["a"]), std::time::Instant::now());
        let line = follow.next_line().await.unwrap();
        assert!(matches!(parse(&line), StreamMessage::Delta(d) if d.version == "2.abc"));
    }

    #[tokio::test]
    async fn a_watch_ends_when_this_replica_stops_leading() {
        let hub = hub();
        hub.publish(&workload(), config(1, &[]), std::time::Instant::now());
        let (mut follow, leader) = follow(&hub, None);
        follow.first_line().unwrap();
        leader.send_replace(false);
        assert!(follow.next_line().await.is_none());
    }
}
