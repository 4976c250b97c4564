//! The operator at scale against a real control plane: 1,000 Services with TrafficPolicies,
//! 5,000 ready endpoints (5 per Service) and 200 ServiceAccounts with an injected pod each
//! (pod objects only: nothing runs them).
//!
//! Reports: the time from one policy change to every one of the 200 ConfigMaps carrying it
//! (p50 / p99 / max over repeated changes, seen through a watch, as a kubelet would), the
//! ConfigMap writes caused by one endpoint change (write amplification), the config size and
//! the operator's memory (VmRSS now, VmHWM peak). Prints the report and writes it to
//! `$TANDEM_BENCH_OUT/[quick-]operator-report.md` (default `bench/results`).
//!
//! `QUICK=1` keeps the scale and makes fewer changes. The whole run is bounded: it gives up
//! with an error after [`BUDGET`] (quick: [`QUICK_BUDGET`]).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, stream};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;
use support::*;
use tandem_crds::v1alpha1::TrafficPolicy;

const SERVICES: usize = 1_000;
const ENDPOINTS_PER_SERVICE: usize = 5;
const SERVICE_ACCOUNTS: usize = 200;
/// Policy changes measured. Each rewrites all 200 ConfigMaps (~0.7 MB each) in etcd: the count
/// stays small so etcd's 2 GiB quota holds between the apiserver's compactions.
const CHANGES: usize = 8;
const QUICK_CHANGES: usize = 3;
/// Endpoint changes measured for write amplification.
const ENDPOINT_CHANGES: usize = 2;
/// The whole run, setup included, gives up after this.
const BUDGET: Duration = Duration::from_secs(20 * 60);
const QUICK_BUDGET: Duration = Duration::from_secs(12 * 60);
/// One change must reach every ConfigMap within this.
const PROPAGATION_LIMIT: Duration = Duration::from_secs(180);
const NS: &str = "bench";

/// Latest config version per ConfigMap, with when it arrived.
type Seen = Arc<Mutex<HashMap<String, (String, Instant)>>>;

#[tokio::main]
async fn main() -> ExitCode {
    let quick = std::env::var("QUICK").is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "yes"));
    let budget = if quick { QUICK_BUDGET } else { BUDGET };
    match tokio::time::timeout(budget, bench(quick)).await {
        Ok(report) => {
            println!("{report}");
            let dir = std::env::var_os("TANDEM_BENCH_OUT").map_or_else(
                || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/results"),
                PathBuf::from,
            );
            let file = dir.join(if quick {
                "quick-operator-report.md"
            } else {
                "operator-report.md"
            });
            if let Err(error) =
                std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&file, &report))
            {
                eprintln!("cannot write {}: {error}", file.display());
                return ExitCode::FAILURE;
            }
            eprintln!("report written to {}", file.display());
            ExitCode::SUCCESS
        }
        Err(_) => {
            eprintln!("operator benchmark: gave up after {budget:?}");
            ExitCode::FAILURE
        }
    }
}

async fn bench(quick: bool) -> String {
    let changes = if quick { QUICK_CHANGES } else { CHANGES };
    let cluster = cluster().await;
    let client = cluster.client();
    let setup = Instant::now();
    create_objects(&client).await;
    let setup_time = setup.elapsed();
    eprintln!(
        "created {SERVICES} Services, {} endpoints, {SERVICE_ACCOUNTS} injected ServiceAccounts in {setup_time:?}",
        SERVICES * ENDPOINTS_PER_SERVICE,
    );

    let seen = watch_config_maps(&client);
    let start = Instant::now();
    let operator = Operator::start(&cluster, "operator-bench").await;
    let (mut version, done) = all_carry(&seen, "", PROPAGATION_LIMIT)
        .await
        .expect("initial configs");
    let initial = done - start;
    eprintln!("operator start to all {SERVICE_ACCOUNTS} ConfigMaps written: {initial:?}");
    let size = {
        let api: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
        let cm = api.get("tandem-proxy-sa-0").await.unwrap();
        cm.data.unwrap()["config.json"].len()
    };

    // Policy changes, one at a time, each to a different Service.
    let mut latencies = Vec::new();
    for round in 0..changes {
        let changed = Instant::now();
        policy(&client, round * 7, 3 + u32::try_from(round % 5).unwrap()).await;
        let (next, last) = all_carry(&seen, &version, PROPAGATION_LIMIT)
            .await
            .expect("change propagated");
        latencies.push(last - changed);
        version = next;
        eprintln!(
            "policy change {round}: all {SERVICE_ACCOUNTS} ConfigMaps updated after {:?}",
            last - changed
        );
    }
    latencies.sort();

    // Write amplification: one endpoint added to one Service, then one taken away.
    let mut amplification = Vec::new();
    let mut endpoint_latencies = Vec::new();
    for round in 0..ENDPOINT_CHANGES {
        let applies = operator
            .metric("tandem_operator_configmap_applies_total")
            .await;
        let count = ENDPOINTS_PER_SERVICE + 1 - round % 2;
        let ips: Vec<String> = (0..count)
            .map(|e| format!("10.101.250.{}", e + 1))
            .collect();
        let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
        let changed = Instant::now();
        endpoints(&client, NS, "svc-500", 8080, &refs).await;
        let (next, last) = all_carry(&seen, &version, PROPAGATION_LIMIT)
            .await
            .expect("endpoint change propagated");
        version = next;
        // Let any straggling pass finish before counting.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let writes = operator
            .metric("tandem_operator_configmap_applies_total")
            .await
            - applies;
        amplification.push(writes);
        endpoint_latencies.push(last - changed);
        eprintln!(
            "endpoint change {round}: {writes} ConfigMap writes, all updated after {:?}",
            last - changed
        );
    }

    let pid = operator.process.pid().unwrap();
    let (rss, hwm) = memory_kib(pid);
    let passes = operator.metric("tandem_operator_reconciles_total").await;
    let mut report = String::new();
    let _ = writeln!(
        report,
        "# tandem-operator at scale{}\n",
        if quick { ": quick run" } else { "" }
    );
    let _ = writeln!(
        report,
        "- Date: {}; machine: {} cores; load average (1 min) {}",
        k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ"),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .next()
            .unwrap_or("?"),
    );
    let _ = writeln!(
        report,
        "- Cluster: real etcd + kube-apiserver + kube-controller-manager on loopback; \
         {SERVICES} Services each with a TrafficPolicy, {} ready endpoints ({ENDPOINTS_PER_SERVICE} per \
         Service), {SERVICE_ACCOUNTS} ServiceAccounts with one injected pod each (objects only). \
         Created in {:.1} s.",
        SERVICES * ENDPOINTS_PER_SERVICE,
        setup_time.as_secs_f64()
    );
    let _ = writeln!(
        report,
        "- Operator: release build, one replica, 100 ms debounce; times are seen through a \
         ConfigMap watch, as a kubelet sees them.\n"
    );
    let _ = writeln!(report, "| figure | value |\n|---|---|");
    let _ = writeln!(
        report,
        "| operator start → all {SERVICE_ACCOUNTS} ConfigMaps written | {:.2} s |",
        initial.as_secs_f64()
    );
    let _ = writeln!(
        report,
        "| one policy change → all {SERVICE_ACCOUNTS} ConfigMaps updated, p50 / p99 / max ({changes} changes) | {:.2} s / {:.2} s / {:.2} s |",
        percentile(&latencies, 0.5).as_secs_f64(),
        percentile(&latencies, 0.99).as_secs_f64(),
        latencies.last().unwrap().as_secs_f64(),
    );
    let _ = writeln!(
        report,
        "| one endpoint change → ConfigMap writes (write amplification) | {} |",
        amplification
            .iter()
            .map(|w| format!("{w}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(
        report,
        "| one endpoint change → all ConfigMaps updated | {} |",
        endpoint_latencies
            .iter()
            .map(|d| format!("{:.2} s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let _ = writeln!(report, "| config.json per ConfigMap | {size} bytes |");
    let _ = writeln!(
        report,
        "| operator memory, VmRSS at the end / VmHWM (peak) | {:.1} MiB / {:.1} MiB |",
        kib_to_mib(rss),
        kib_to_mib(hwm)
    );
    let _ = writeln!(report, "| reconcile passes in all | {passes} |");
    let _ = writeln!(
        report,
        "\nEvery workload's config carries every governed Service, so a change to one governed \
         Service or its endpoints rewrites all {SERVICE_ACCOUNTS} ConfigMaps: the write \
         amplification is the number of injected ServiceAccounts. With {changes} changes the \
         p99 is the slowest one. Reproduce with `make bench-operator{}`.",
        if quick { " QUICK=1" } else { "" }
    );
    report
}

/// The namespace, 200 ServiceAccounts with an injected pod each, 1,000 Services with 5
/// endpoints and a TrafficPolicy each.
async fn create_objects(client: &kube::Client) {
    apply::<k8s_openapi::api::core::v1::Namespace>(
        client,
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
}

/// Watches the ConfigMaps of the namespace, recording each one's config version on arrival.
fn watch_config_maps(client: &kube::Client) -> Seen {
    let seen: Seen = Arc::default();
    let watched = seen.clone();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    tokio::spawn(async move {
        // A watch error (a dropped connection, a compaction) is retried with backoff: stopping
        // here would leave every later change unseen.
        let mut events = std::pin::pin!(
            // The operator's own only: every namespace also has kube-root-ca.crt.
            watcher::watcher(
                cms,
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
    seen
}

fn version_of(json: &str) -> String {
    // `"version":"<hash>"` comes right after apiVersion in the compact document.
    json.split("\"version\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_default()
        .to_owned()
}

/// Waits until all ConfigMaps carry one version other than `not`; returns it and when the last
/// one arrived.
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// (VmRSS, VmHWM) of a process in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
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
