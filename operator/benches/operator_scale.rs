//! The operator at scale against a real control plane: 1,000 Services with TrafficPolicies,
//! 5,000 ready endpoints (5 per Service) and 200 ServiceAccounts with an injected pod each.
//!
//! Reports: the time from one policy change to every one of the 200 ConfigMaps carrying it
//! (p50 / p99 / max over repeated changes, seen through a watch), the ConfigMap writes caused
//! by one endpoint change (write amplification), the config size and the operator's memory.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use support::*;
use tandem_crds::v1alpha1::TrafficPolicy;

const SERVICES: usize = 1_000;
const ENDPOINTS_PER_SERVICE: usize = 5;
const SERVICE_ACCOUNTS: usize = 200;
/// Each full round writes 200 ConfigMaps of ~0.7 MB into etcd; a handful keeps etcd's 2 GiB
/// quota safe between the apiserver's compactions.
const CHANGES: usize = 5;
const NS: &str = "bench";

/// Latest config version per ConfigMap, with when it arrived.
type Seen = Arc<Mutex<HashMap<String, (String, Instant)>>>;

fn version_of(json: &str) -> String {
    // `"version":"<hash>"` comes right after apiVersion in the compact document.
    json.split("\"version\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_owned()
}

async fn all_carry(seen: &Seen, not: &str, deadline: Duration) -> Option<(String, Instant)> {
    let start = Instant::now();
    loop {
        {
            let map = seen.lock().unwrap();
            if map.len() == SERVICE_ACCOUNTS {
                let versions: Vec<&(String, Instant)> = map.values().collect();
                let first = &versions[0].0;
                if first != not && !first.is_empty() && versions.iter().all(|(v, _)| v == first) {
                    let last = versions.iter().map(|(_, t)| *t).max().unwrap();
                    return Some((first.clone(), last));
                }
            }
        }
        if start.elapsed() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let cluster = cluster().await;
    let client = cluster.client();
    let setup = Instant::now();
    apply::<k8s_openapi::api::core::v1::Namespace>(
        &client,
        None,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}}),
    )
    .await;
    stream::iter(0..SERVICE_ACCOUNTS)
        .for_each_concurrent(16, |i| {
            let client = client.clone();
            async move {
                let sa = format!("sa-{i}");
                apply::<k8s_openapi::api::core::v1::ServiceAccount>(
                    &client,
                    Some(NS),
                    json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa, "namespace": NS}}),
                )
                .await;
                injected_pod(&client, NS, &format!("pod-{i}"), &sa).await;
            }
        })
        .await;
    stream::iter(0..SERVICES)
        .for_each_concurrent(16, |i| {
            let client = client.clone();
            async move {
                let name = format!("svc-{i}");
                service(
                    &client,
                    NS,
                    &name,
                    json!([{"name": "http", "port": 80, "targetPort": 8080}]),
                )
                .await;
                let ips: Vec<String> = (0..ENDPOINTS_PER_SERVICE)
                    .map(|e| format!("10.{}.{}.{}", 100 + i / 250, i % 250, e + 1))
                    .collect();
                let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
                endpoints(&client, NS, &name, 8080, &refs).await;
                policy(&client, i, 2).await;
            }
        })
        .await;
    eprintln!(
        "created {SERVICES} Services, {} endpoints, {SERVICE_ACCOUNTS} injected ServiceAccounts in {:?}",
        SERVICES * ENDPOINTS_PER_SERVICE,
        setup.elapsed()
    );

    // Watch the ConfigMaps as a kubelet would.
    let seen: Seen = Arc::default();
    let watched = seen.clone();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    tokio::spawn(async move {
        let mut events =
            std::pin::pin!(watcher::watcher(cms, watcher::Config::default()).applied_objects());
        while let Ok(Some(cm)) = events.try_next().await {
            let version = cm
                .data
                .as_ref()
                .and_then(|d| d.get("config.json"))
                .map(|j| version_of(j))
                .unwrap_or_default();
            let name = cm.metadata.name.clone().unwrap_or_default();
            watched
                .lock()
                .unwrap()
                .insert(name, (version, Instant::now()));
        }
    });

    let start = Instant::now();
    let operator = Operator::start(&cluster, "operator-bench").await;
    let (mut version, done) = all_carry(&seen, "", Duration::from_secs(600))
        .await
        .expect("initial configs");
    eprintln!(
        "operator start to all {SERVICE_ACCOUNTS} ConfigMaps written: {:?}",
        done - start
    );
    let size = {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
        let cm = api.get("tandem-proxy-sa-0").await.unwrap();
        cm.data.unwrap()["config.json"].len()
    };
    eprintln!("config size: {size} bytes per ConfigMap");

    let mut latencies = Vec::new();
    for round in 0..CHANGES {
        let changed = Instant::now();
        policy(&client, round * 7, 3 + u32::try_from(round % 5).unwrap()).await;
        let (next, last) = all_carry(&seen, &version, Duration::from_secs(300))
            .await
            .expect("change propagated");
        latencies.push(last - changed);
        version = next;
        eprintln!(
            "change {round}: all {SERVICE_ACCOUNTS} ConfigMaps updated after {:?}",
            last - changed
        );
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 - 1.0) * p).round() as usize];
    eprintln!(
        "policy change -> every ConfigMap updated: p50 {:?}, p99 {:?}, max {:?} ({CHANGES} changes)",
        pct(0.5),
        pct(0.99),
        latencies.last().unwrap()
    );

    // Write amplification: one endpoint added to one Service.
    let applies = operator
        .metric("tandem_operator_configmap_applies_total")
        .await;
    let changed = Instant::now();
    endpoints(
        &client,
        NS,
        "svc-500",
        8080,
        &[
            "10.101.250.1",
            "10.101.250.2",
            "10.101.250.3",
            "10.101.250.4",
            "10.101.250.5",
            "10.101.250.6",
        ],
    )
    .await;
    let (_, last) = all_carry(&seen, &version, Duration::from_secs(300))
        .await
        .expect("endpoint propagated");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let writes = operator
        .metric("tandem_operator_configmap_applies_total")
        .await
        - applies;
    eprintln!(
        "one endpoint change: {writes} ConfigMap writes, all updated after {:?}",
        last - changed
    );
    let pid = operator.process.pid().unwrap();
    eprintln!("operator memory (VmRSS): {} MiB", rss_kib(pid) / 1024);
    eprintln!(
        "reconcile passes: {}",
        operator.metric("tandem_operator_reconciles_total").await
    );
}

/// A TrafficPolicy on `svc-<i>` with one retrying rule.
async fn policy(client: &kube::Client, i: usize, attempts: u32) {
    apply::<TrafficPolicy>(
        client,
        Some(NS),
        json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": format!("tp-{i}"), "namespace": NS},
            "spec": {"targetRef": {"name": format!("svc-{i}")},
                     "rules": [{"name": "api", "matches": [{"path": {"value": "/api"}}],
                                "timeout": "2s", "retries": {"attempts": attempts}}]}
        }),
    )
    .await;
}
