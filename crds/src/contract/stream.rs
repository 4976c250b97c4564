//! The config stream: how a proxy gets its workload's config from the operator within about a
//! second, beside the mounted file.
//!
//! The operator serves three calls on its HTTPS signer port (every replica listens; only the
//! leader answers a watch, the others refuse it with `NotLeader` and the proxy tries again,
//! reaching the leader through the Service). Each call carries the proxy's projected
//! ServiceAccount token (audience `tandem`) as a bearer token; the operator reviews it
//! (TokenReview), so a pod only ever sees its own workload's view.
//!
//! - [`WATCH_PATH`] (`GET`, `?version=<the version the proxy holds>`): newline-delimited JSON
//!   [`StreamMessage`]s: first a [`StreamMessage::Snapshot`] (or [`StreamMessage::Current`]
//!   when the proxy already holds the operator's version), then a [`StreamMessage::Delta`] per
//!   change, each whole Service that changed (its endpoints, its policy) or went away, and a
//!   [`StreamMessage::Heartbeat`] every [`HEARTBEAT_INTERVAL`].
//! - [`DISCOVER_PATH`] (`POST` a [`DiscoverRequest`]): the proxy saw a connection to an address
//!   its config does not know; the operator answers which Service it is ([`DiscoverResponse`])
//!   and adds that Service to the workload's view, so it arrives on the stream and, at the next
//!   write, in the ConfigMap.
//! - [`APPLIED_PATH`] (`POST` an [`AppliedReport`]): the proxy applied a version (from the file
//!   or the stream). The operator measures convergence from it and counts, per policy, the
//!   proxies that run it.
//!
//! Versions are ordered by their generation ([`ProxyConfig::generation`]): a proxy applies
//! whichever of file and stream is newer, and keeps its config when the operator is away.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Authorization, Defaults, ProxyConfig, Service, ServiceRef, Workload};

/// The watch: a stream of [`StreamMessage`]s, one JSON document per line.
pub const WATCH_PATH: &str = "/v1/config/watch";
/// The query parameter of [`WATCH_PATH`] naming the version the proxy holds.
pub const WATCH_VERSION_PARAM: &str = "version";
/// On-demand discovery of one address.
pub const DISCOVER_PATH: &str = "/v1/config/discover";
/// The proxy's report of the version it applied.
pub const APPLIED_PATH: &str = "/v1/config/applied";
/// Content type of the watch's body.
pub const STREAM_CONTENT_TYPE: &str = "application/x-ndjson";
/// How often the operator sends a heartbeat on an idle watch; a proxy that hears nothing for
/// three intervals reconnects.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(10);
/// Largest line a proxy accepts on the watch (a snapshot is at most a ConfigMap's 1 MiB, a
/// delta smaller).
pub const MAX_MESSAGE_BYTES: usize = 2 << 20;

/// One line of the watch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum StreamMessage {
    /// The whole config of the workload.
    Snapshot {
        /// The config, as the ConfigMap would hold it (its `version` carries the generation).
        config: ProxyConfig,
    },
    /// The proxy already holds the operator's current version: nothing to send.
    Current {
        /// That version.
        version: String,
    },
    /// A change to apply to the config the stream last delivered.
    Delta(ConfigDelta),
    /// Nothing changed; the connection is alive.
    Heartbeat,
}

impl StreamMessage {
    /// One line of the watch's body: compact JSON and a newline. Serializing plain structs
    /// with string keys cannot fail.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }

    /// Parses one line (without or with its newline).
    pub fn from_line(line: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(line)
    }
}

/// What changed between two versions of a workload's config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConfigDelta {
    /// The version the delta applies to; a proxy holding another one must not apply it (it
    /// reconnects and gets a snapshot).
    pub base: String,
    /// The version after it is applied.
    pub version: String,
    /// Services added or changed, each whole.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<Service>,
    /// Services removed from the view.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<ServiceRef>,
    /// The workload section, when it changed (its mTLS mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
    /// The defaults, when they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defaults: Option<Defaults>,
    /// The authorization section, when it changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<Authorization>,
}

/// Why a delta could not be applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the delta applies to version {base:?}, but the config is at {held:?}")]
pub struct DeltaMismatch {
    /// The version the delta was made for.
    pub base: String,
    /// The version held.
    pub held: String,
}

impl ConfigDelta {
    /// The delta that turns `old` into `new` (services compared whole, by key).
    pub fn between(old: &ProxyConfig, new: &ProxyConfig) -> Self {
        let services = new
            .services
            .iter()
            .filter(|s| old.service(&s.key()) != Some(*s))
            .cloned()
            .collect();
        let removed = old
            .services
            .iter()
            .filter(|s| new.service(&s.key()).is_none())
            .map(Service::key)
            .collect();
        Self {
            base: old.version.clone(),
            version: new.version.clone(),
            services,
            removed,
            workload: (old.workload != new.workload).then(|| new.workload.clone()),
            defaults: (old.defaults != new.defaults).then(|| new.defaults.clone()),
            authorization: (old.authorization != new.authorization)
                .then(|| new.authorization.clone()),
        }
    }

    /// Whether the delta changes nothing but the version.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.removed.is_empty()
            && self.workload.is_none()
            && self.defaults.is_none()
            && self.authorization.is_none()
    }

    /// Applies the delta to `config` (which must be at [`ConfigDelta::base`]), keeping the
    /// services sorted by namespace then name. The result is not validated here: the proxy
    /// validates it as it validates a file.
    pub fn apply_to(&self, config: &mut ProxyConfig) -> Result<(), DeltaMismatch> {
        if config.version != self.base {
            return Err(DeltaMismatch {
                base: self.base.clone(),
                held: config.version.clone(),
            });
        }
        config.services.retain(|s| {
            let key = s.key();
            !self.removed.contains(&key) && !self.services.iter().any(|u| u.key() == key)
        });
        config.services.extend(self.services.iter().cloned());
        config
            .services
            .sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        if let Some(workload) = &self.workload {
            config.workload = workload.clone();
        }
        if let Some(defaults) = &self.defaults {
            config.defaults = defaults.clone();
        }
        if let Some(authorization) = &self.authorization {
            config.authorization = authorization.clone();
        }
        config.version.clone_from(&self.version);
        Ok(())
    }
}

/// The body of [`DISCOVER_PATH`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiscoverRequest {
    /// The original destination of the connection (a cluster IP and port).
    pub address: SocketAddr,
}

/// The answer of [`DISCOVER_PATH`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiscoverResponse {
    /// The Service with that cluster IP and port, now in the workload's view; `None` when no
    /// Service has it (the proxy keeps passing such connections through and does not ask again
    /// for a while).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
}

/// Where an applied version came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ConfigSource {
    /// The mounted ConfigMap.
    File,
    /// The operator's stream.
    Stream,
}

impl ConfigSource {
    /// `file` or `stream`, as in metrics labels and `/config`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::File => "file",
            Self::Stream => "stream",
        }
    }
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of [`APPLIED_PATH`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppliedReport {
    /// The version now active in the proxy.
    pub version: String,
    /// Where it came from.
    pub source: ConfigSource,
}

/// A refused call: the JSON body of every non-2xx answer of the three calls.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StreamRefusal {
    /// A stable reason: `Unauthenticated`, `WrongAudience`, `PodNotFound`,
    /// `NotAServiceAccount`, `NotLeader`, `NoConfig`, `BadRequest`, `ReviewUnavailable`,
    /// `Throttled`.
    pub reason: String,
    /// What went wrong, for a person.
    pub message: String,
}

/// Builds a version stamp from a generation and a content hash: `<generation>.<hash>`.
pub fn version_stamp(generation: u64, hash: &str) -> String {
    format!("{generation}.{hash}")
}

impl ProxyConfig {
    /// The generation the version stamp carries (`<generation>.<hash>`, see
    /// [`version_stamp`]): it orders the versions of one workload's config, so a proxy keeps
    /// the newer of file and stream. A stamp without one (an older operator, a hand-written
    /// file) is generation 0.
    ///
    /// The generation lives in the stamp rather than in a field of its own because proxies
    /// refuse unknown fields: a new field would make every proxy older than this contract
    /// refuse the operator's configs, and sidecars are upgraded independently of it.
    pub fn generation(&self) -> u64 {
        generation_of(&self.version)
    }
}

/// The generation of a version stamp; 0 when it carries none.
pub fn generation_of(version: &str) -> u64 {
    version
        .split_once('.')
        .and_then(|(generation, _)| generation.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::contract::{Endpoint, ServicePort};

    fn service(name: &str, endpoint: &str) -> Service {
        Service {
            name: name.into(),
            namespace: "shop".into(),
            cluster_ips: vec!["10.96.0.10".parse::<IpAddr>().unwrap()],
            ports: vec![ServicePort {
                port: 80,
                endpoints: vec![Endpoint {
                    address: endpoint.parse().unwrap(),
                    meshed: false,
                    identity: None,
                    workload: None,
                }],
                ..ServicePort::default()
            }],
            ..Service::default()
        }
    }

    fn config(version: &str, services: Vec<Service>) -> ProxyConfig {
        let mut config = ProxyConfig::new(Workload {
            namespace: "shop".into(),
            service_account: "web".into(),
            ..Workload::default()
        });
        config.version = version.into();
        config.services = services;
        config
    }

    #[test]
    fn a_delta_carries_only_what_changed_and_rebuilds_the_new_config() {
        let old = config(
            "1.aa",
            vec![
                service("a", "10.244.0.1:80"),
                service("b", "10.244.0.2:80"),
                service("c", "10.244.0.3:80"),
            ],
        );
        let new = config(
            "2.bb",
            vec![
                service("a", "10.244.0.1:80"),
                service("b", "10.244.0.9:80"),
                service("d", "10.244.0.4:80"),
            ],
        );
        let delta = ConfigDelta::between(&old, &new);
        let names: Vec<&str> = delta.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["b", "d"]);
        assert_eq!(delta.removed, [old.services[2].key()]);
        assert!(delta.authorization.is_none() && delta.workload.is_none());

        let mut applied = old.clone();
        delta.apply_to(&mut applied).unwrap();
        assert_eq!(applied, new);
    }

    #[test]
    fn a_delta_for_another_base_is_refused_and_changes_nothing() {
        let old = config("1.aa", vec![service("a", "10.244.0.1:80")]);
        let new = config("2.bb", vec![]);
        let delta = ConfigDelta::between(&old, &new);
        let mut other = config("3.cc", vec![service("a", "10.244.0.1:80")]);
        let before = other.clone();
        assert!(delta.apply_to(&mut other).is_err());
        assert_eq!(other, before);
    }

    #[test]
    fn messages_are_one_line_each_and_read_back() {
        let message = StreamMessage::Delta(ConfigDelta::between(
            &config("1.aa", vec![]),
            &config("2.bb", vec![service("a", "10.244.0.1:80")]),
        ));
        let line = message.to_line();
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.starts_with(r#"{"type":"delta","base":"1.aa""#));
        assert_eq!(StreamMessage::from_line(line.as_bytes()).unwrap(), message);
        assert_eq!(
            StreamMessage::Heartbeat.to_line(),
            "{\"type\":\"heartbeat\"}\n"
        );
    }

    #[test]
    fn the_generation_orders_version_stamps() {
        assert_eq!(
            generation_of(&version_stamp(1733220000123, "9f86d081")),
            1733220000123
        );
        assert_eq!(generation_of("9f86d0818884c7d6"), 0);
        assert_eq!(generation_of(""), 0);
        assert_eq!(generation_of("x.y"), 0);
        assert!(config("12.a", vec![]).generation() > config("9.b", vec![]).generation());
    }
}
