//! The file path, seen as a kubelet sees it: a watch on the operator's ConfigMaps in every
//! namespace, recording each one's config version and size on arrival.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tandem_crds::names::CONFIG_KEY;

/// One ConfigMap as last seen.
#[derive(Clone, Debug)]
pub struct Seen {
    /// The config's version.
    pub version: String,
    /// Bytes of `config.json`.
    pub bytes: usize,
    /// When this version arrived.
    pub at: Instant,
}

/// ConfigMaps by `namespace/name`.
pub type Files = Arc<Mutex<HashMap<String, Seen>>>;

/// Starts the watch.
pub fn watch(client: &kube::Client) -> Files {
    let files: Files = Arc::default();
    let seen = files.clone();
    let api: Api<ConfigMap> = Api::all(client.clone());
    tokio::spawn(async move {
        // A watch error (a dropped connection, a compaction) is retried with backoff: stopping
        // here would leave every later change unseen.
        let mut events = std::pin::pin!(
            watcher::watcher(
                api,
                watcher::Config::default().labels("app.kubernetes.io/managed-by=tandem-operator"),
            )
            .default_backoff()
            .applied_objects()
        );
        while let Some(event) = events.next().await {
            let cm = match event {
                Ok(cm) => cm,
                Err(error) => {
                    eprintln!("ConfigMap watch: {error}; retrying");
                    continue;
                }
            };
            let Some(json) = cm.data.as_ref().and_then(|d| d.get(CONFIG_KEY)) else {
                continue;
            };
            let key = format!(
                "{}/{}",
                cm.metadata.namespace.as_deref().unwrap_or_default(),
                cm.metadata.name.as_deref().unwrap_or_default()
            );
            let version = version_of(json);
            let mut map = seen.lock().unwrap();
            // Only a new version is an arrival (a rewrite of the same one, such as the learned
            // annotation, is not).
            if map.get(&key).is_some_and(|s| s.version == version) {
                continue;
            }
            map.insert(
                key,
                Seen {
                    version,
                    bytes: json.len(),
                    at: Instant::now(),
                },
            );
        }
    });
    files
}

fn version_of(json: &str) -> String {
    // The config's own field; parsing each ~KB document whole would cost the bench more than
    // the operator. `"version":"…"` is the first such key in the compact document.
    json.split("\"version\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_owned()
}
