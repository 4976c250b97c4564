//! The operator at scale against a real control plane, with a simulated fleet of stream
//! clients (`make bench-operator`; `QUICK=1` for the smaller scale, see `scale.rs`).
//!
//! Full scale, the issue's: 10,000 Services × 5 ready endpoints (one in ten with a
//! TrafficPolicy), 1,000 ServiceAccounts with 10 injected pods each naming their dependencies
//! in `tandem.dev/dependencies` (median 10, p99 100), two gateway workloads depending on every
//! namespace, and one stream client per pod (10,000) with the pod's own projected token. Pods
//! are objects only; the clients play their proxies (fleet.rs).
//!
//! Reports, each beside main's figure before this work (1,000 Services, 200 ServiceAccounts):
//! ConfigMap sizes; ConfigMap writes per policy change (against the workloads that depend on
//! the Service) and per endpoint change; change → applied on every affected proxy on the
//! stream path and the ConfigMap on the file path; the convergence histogram the operator
//! exports; its memory; the gateways' refusal; and 10,000 reconnects after an operator
//! restart. Prints the report and writes it to `$TANDEM_BENCH_OUT/[quick-]operator-report.md`
//! (default `bench/results`). The whole run is bounded by the scale's budget.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/support/mod.rs"]
mod support;

#[path = "operator_scale/files.rs"]
mod files;
#[path = "operator_scale/fleet.rs"]
mod fleet;
#[path = "operator_scale/measure.rs"]
mod measure;
#[path = "operator_scale/objects.rs"]
mod objects;
#[path = "operator_scale/scale.rs"]
mod scale;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::ListParams;
use tandem_crds::contract::generation_of;
use tandem_crds::identity::{ISSUER_ROOTS_KEY, ISSUER_SECRET};
use tandem_crds::names::config_map_name;
use tandem_crds::v1alpha1::TrafficPolicy;

use fleet::{Client, Fleet};
use measure::{Buckets, seconds};
use scale::{GATEWAYS, Scale};
use support::{Operator, cluster, endpoints};

/// The operator's first ConfigMaps and the fleet's first attach must come within this.
const START_LIMIT: Duration = Duration::from_secs(600);
/// One change must reach every affected ConfigMap and client within this.
const CHANGE_LIMIT: Duration = Duration::from_secs(60);
/// After a change has arrived everywhere, straggling writes are counted for this long.
const SETTLE: Duration = Duration::from_secs(2);
/// The fleet must re-attach to a restarted operator within this.
const STORM_LIMIT: Duration = Duration::from_secs(300);
const CONVERGENCE: &str = "tandem_proxy_convergence_seconds";
const APPLIES: &str = "tandem_operator_configmap_applies_total";
const IDENTITY: &str = "operator-bench";

#[tokio::main]
async fn main() -> ExitCode {
    let quick = std::env::var("QUICK").is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "yes"));
    let scale = if quick { Scale::quick() } else { Scale::full() };
    let budget = scale.budget;
    match tokio::time::timeout(budget, bench(scale)).await {
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

/// What one change cost and how long it took to arrive.
#[derive(Debug, Default)]
struct Change {
    service: usize,
    /// Workloads that depend on the Service (its ConfigMaps must be written, no others).
    dependents: usize,
    writes: f64,
    /// ConfigMaps that took a new version, and each one's delay.
    files: Vec<Duration>,
    /// Affected clients that applied it, and each one's delay.
    streams: Vec<Duration>,
    /// Affected clients attached when it was made.
    attached: usize,
    /// Clients of workloads that do not depend on the Service that got a new version anyway.
    spurious: usize,
    /// Affected clients whose config, once arrived, does not carry the change.
    wrong: usize,
    /// The policy's `status.proxies` and Programmed condition after it.
    status: String,
}

impl Change {
    fn slowest_stream(&self) -> Option<Duration> {
        (self.streams.len() == self.attached && self.attached > 0)
            .then(|| self.streams.iter().max().copied())
            .flatten()
    }

    fn slowest_file(&self) -> Option<Duration> {
        (self.files.len() == self.dependents && self.dependents > 0)
            .then(|| self.files.iter().max().copied())
            .flatten()
    }
}

/// The restart and its reconnects.
#[derive(Debug, Default)]
struct Storm {
    reattached: usize,
    from_start: Option<Duration>,
    from_stop: Option<Duration>,
    snapshots: u64,
    currents: u64,
    healthz: Vec<Duration>,
    healthz_failures: usize,
    writes: f64,
    memory: (f64, f64),
    /// Workloads whose ConfigMap the endpoint changes left behind, and their clients.
    stale: usize,
    stale_clients: usize,
}

async fn bench(scale: Scale) -> String {
    let cluster = cluster().await;
    let client = cluster.client();
    let mut out = Report::new(&scale);

    let setup = Instant::now();
    objects::services(&client, &scale).await;
    let dependencies = scale.dependencies();
    let members = objects::workloads(&client, &scale, &dependencies).await;
    out.setup = setup.elapsed();
    out.dependencies = scale::dependency_summary(&dependencies);
    eprintln!(
        "created {} Services, {} workloads, {} pods with tokens in {:?}",
        scale.services,
        scale.service_accounts + GATEWAYS,
        members.len(),
        out.setup
    );

    let files = files::watch(&client);
    let started = Instant::now();
    let mut operator = Operator::start(&cluster, IDENTITY).await;
    let roots = issuer_roots(&client).await;
    let expected: Vec<String> = (0..scale.service_accounts)
        .map(|w| config_map_key(&scale, w))
        .collect();
    out.initial = all_present(&files, &expected, started).await;
    eprintln!("operator start → all ConfigMaps written: {:?}", out.initial);
    out.sizes = {
        let map = files.lock().unwrap();
        let mut sizes: Vec<usize> = expected
            .iter()
            .filter_map(|k| map.get(k).map(|s| s.bytes))
            .collect();
        sizes.sort_unstable();
        sizes
    };

    let spread = Duration::from_secs_f64((scale.clients() as f64 / 2_000.0).max(1.0));
    let fleet_start = Instant::now();
    let fleet = Fleet::start(members, &roots, operator.identity_port, spread);
    out.attach = wait_attached(&fleet, fleet_start, START_LIMIT).await;
    eprintln!(
        "fleet: {} of {} attached after {:?}",
        fleet.attached_since(fleet_start),
        scale.clients(),
        out.attach
    );
    out.gateway = gateway_evidence(&client, &files, &fleet).await;
    out.memory_start = memory(&operator);

    let dependents = dependents_of(&scale, &dependencies);
    // The changes are measured from a quiet start: the attach's applied reports answered (else
    // they land in the convergence histogram's window, and their status updates in the first
    // change's time).
    out.drain = drain(&fleet).await;
    let before = metrics_page(&operator).await;
    out.policy_changes =
        policy_changes(&client, &scale, &operator, &fleet, &files, &dependents).await;
    out.endpoint_changes =
        endpoint_changes(&client, &scale, &operator, &fleet, &files, &dependents).await;
    let after = metrics_page(&operator).await;
    for source in ["stream", "file"] {
        let buckets = Buckets::parse(&after, CONVERGENCE, source).since(&Buckets::parse(
            &before,
            CONVERGENCE,
            source,
        ));
        out.histogram.push((source, buckets));
    }
    out.memory_changes = memory(&operator);
    out.reports = format!(
        "{} sent, {} refused, {} failed, {} dropped",
        fleet.reports.sent.load(Ordering::Relaxed),
        fleet.reports.refused.load(Ordering::Relaxed),
        fleet.reports.failed.load(Ordering::Relaxed),
        fleet.reports.dropped.load(Ordering::Relaxed)
    );

    // Endpoint changes went by stream only: their workloads' ConfigMaps are behind, and the
    // restarted operator (with no watch open yet) must write exactly those.
    let stale: BTreeSet<usize> = out
        .endpoint_changes
        .iter()
        .flat_map(|c| dependents[c.service].iter().copied())
        .collect();
    out.storm = storm(&cluster, &mut operator, &fleet).await;
    out.storm.stale = stale.len();
    out.storm.stale_clients = stale.len() * scale.pods_per_service_account;
    out.failures = failure_sample(&fleet);
    fleet.stop();
    out.render()
}

// === Setup =====================================================================================

/// Waits until the fleet's applied reports are all answered; how long that took (`None`
/// past [`START_LIMIT`]).
async fn drain(fleet: &Fleet) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < START_LIMIT {
        if fleet.reports.drained() {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

fn config_map_key(scale: &Scale, w: usize) -> String {
    format!(
        "{}/{}",
        scale.workload_namespace(w),
        config_map_name(&format!("sa-{w}"))
    )
}

/// The trust roots the proxy verifies the operator with, once the issuer exists.
async fn issuer_roots(client: &kube::Client) -> String {
    let api: Api<Secret> = Api::namespaced(client.clone(), "tandem-system");
    let deadline = Instant::now() + START_LIMIT;
    loop {
        if let Ok(Some(secret)) = api.get_opt(ISSUER_SECRET).await
            && let Some(roots) = secret.data.as_ref().and_then(|d| d.get(ISSUER_ROOTS_KEY))
        {
            return String::from_utf8(roots.0.clone()).expect("PEM roots");
        }
        assert!(
            Instant::now() < deadline,
            "no issuer Secret after {START_LIMIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// When every expected ConfigMap has arrived, measured from `since`; `None` past the limit.
async fn all_present(
    files: &files::Files,
    expected: &[String],
    since: Instant,
) -> Option<Duration> {
    let deadline = since + START_LIMIT;
    while Instant::now() < deadline {
        {
            let map = files.lock().unwrap();
            let arrivals: Option<Vec<Instant>> =
                expected.iter().map(|k| map.get(k).map(|s| s.at)).collect();
            if let Some(arrivals) = arrivals {
                return arrivals.into_iter().max().map(|at| at - since);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// When every ordinary client attached after `since`; `None` past `limit`.
async fn wait_attached(fleet: &Fleet, since: Instant, limit: Duration) -> Option<Duration> {
    let total = fleet.ordinary().count();
    let deadline = since + limit;
    while Instant::now() < deadline {
        let times: Vec<Instant> = fleet
            .ordinary()
            .filter_map(|c| c.attached_at().filter(|at| *at >= since))
            .collect();
        if times.len() == total {
            return times.into_iter().max().map(|at| at - since);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Workloads by the Service they depend on.
fn dependents_of(scale: &Scale, dependencies: &[BTreeSet<usize>]) -> Vec<Vec<usize>> {
    let mut dependents = vec![Vec::new(); scale.services];
    for (w, services) in dependencies.iter().enumerate() {
        for &s in services {
            dependents[s].push(w);
        }
    }
    dependents
}

/// `count` Services among `candidates` (each with dependents), spread from the fewest
/// dependents to the most, so both small and large fan-outs are measured.
fn pick(candidates: Vec<usize>, dependents: &[Vec<usize>], count: usize) -> Vec<usize> {
    let mut candidates: Vec<usize> = candidates
        .into_iter()
        .filter(|&s| !dependents[s].is_empty())
        .collect();
    candidates.sort_by_key(|&s| (dependents[s].len(), s));
    if candidates.is_empty() || count == 0 {
        return Vec::new();
    }
    let last = candidates.len() - 1;
    let mut picked: Vec<usize> = (0..count)
        .map(|k| candidates[k * last / count.saturating_sub(1).max(1)])
        .collect();
    picked.dedup();
    picked
}

// === Changes ===================================================================================

async fn policy_changes(
    client: &kube::Client,
    scale: &Scale,
    operator: &Operator,
    fleet: &Fleet,
    files: &files::Files,
    dependents: &[Vec<usize>],
) -> Vec<Change> {
    let candidates = (0..scale.services)
        .filter(|&s| scale.has_policy(s))
        .collect();
    let mut changes = Vec::new();
    for (round, service) in pick(candidates, dependents, scale.policy_changes)
        .into_iter()
        .enumerate()
    {
        // 2 at creation, so each changed Service gets a value it did not have (3 to 10: the
        // CRD allows at most 10) and its arrival is recognisable.
        let attempts = 3 + u32::try_from(round % 8).unwrap();
        let change = measure_change(
            scale,
            operator,
            fleet,
            files,
            &dependents[service],
            service,
            || async {
                objects::policy(client, scale, service, attempts).await;
            },
            |config| {
                config
                    .service(&service_ref(scale, service))
                    .and_then(|s| s.routes.first())
                    .and_then(|r| r.retries.as_ref())
                    .is_some_and(|r| r.attempts == attempts)
            },
        )
        .await;
        let status = policy_status(client, scale, service).await;
        eprintln!(
            "policy change {round} (svc-{service}, {} dependents): {} writes, stream {}, file {}, {status}",
            change.dependents,
            change.writes,
            seconds(&change.streams),
            seconds(&change.files)
        );
        changes.push(Change { status, ..change });
    }
    changes
}

async fn endpoint_changes(
    client: &kube::Client,
    scale: &Scale,
    operator: &Operator,
    fleet: &Fleet,
    files: &files::Files,
    dependents: &[Vec<usize>],
) -> Vec<Change> {
    // Services without a policy: an endpoint change there is purely an endpoint change.
    let candidates = (0..scale.services)
        .filter(|&s| !scale.has_policy(s))
        .collect();
    let mut changes = Vec::new();
    for (round, service) in pick(candidates, dependents, scale.endpoint_changes)
        .into_iter()
        .enumerate()
    {
        let ips = objects::endpoint_ips(scale, service, 1);
        let added: std::net::IpAddr = ips.last().unwrap().parse().unwrap();
        let change = measure_change(
            scale,
            operator,
            fleet,
            files,
            &dependents[service],
            service,
            || async {
                let refs: Vec<&str> = ips.iter().map(String::as_str).collect();
                endpoints(
                    client,
                    &scale.service_namespace(service),
                    &format!("svc-{service}"),
                    8080,
                    &refs,
                )
                .await;
            },
            |config| {
                config
                    .service(&service_ref(scale, service))
                    .is_some_and(|s| {
                        s.ports
                            .iter()
                            .any(|p| p.endpoints.iter().any(|e| e.address.ip() == added))
                    })
            },
        )
        .await;
        eprintln!(
            "endpoint change {round} (svc-{service}, {} dependents): {} writes, {} ConfigMaps changed, stream {}",
            change.dependents,
            change.writes,
            change.files.len(),
            seconds(&change.streams)
        );
        changes.push(change);
    }
    changes
}

fn service_ref(scale: &Scale, service: usize) -> tandem_crds::contract::ServiceRef {
    tandem_crds::contract::ServiceRef {
        name: format!("svc-{service}"),
        namespace: scale.service_namespace(service),
    }
}

/// Makes one change and waits until every affected client has applied a newer version and
/// every affected ConfigMap carries one (an endpoint change waits for the clients only: no
/// ConfigMap should change), then counts the writes it caused.
#[allow(clippy::too_many_arguments)]
async fn measure_change<F, Fut>(
    scale: &Scale,
    operator: &Operator,
    fleet: &Fleet,
    files: &files::Files,
    dependents: &[usize],
    service: usize,
    make: F,
    carries: impl Fn(&tandem_crds::contract::ProxyConfig) -> bool,
) -> Change
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let is_policy = scale.has_policy(service);
    let affected: BTreeSet<usize> = dependents.iter().copied().collect();
    let clients: Vec<&Arc<Client>> = fleet
        .ordinary()
        .filter(|c| c.member.workload.is_some_and(|w| affected.contains(&w)))
        .filter(|c| c.attached_at().is_some())
        .collect();
    let keys: Vec<String> = dependents
        .iter()
        .map(|&w| config_map_key(scale, w))
        .collect();
    let versions_before: Vec<String> = {
        let map = files.lock().unwrap();
        keys.iter()
            .map(|k| map.get(k).map(|s| s.version.clone()).unwrap_or_default())
            .collect()
    };
    let applies = operator.metric(APPLIES).await;
    let at = Instant::now();
    make().await;
    let deadline = at + CHANGE_LIMIT;
    // A new version, not an older one seen late (generations order a workload's versions).
    let newer = |before: &str, seen: &files::Seen| {
        seen.at >= at
            && seen.version != before
            && generation_of(&seen.version) >= generation_of(before)
    };
    loop {
        let streams_done = clients
            .iter()
            .all(|c| c.arrival_after(at, |_| true).is_some());
        let files_done = !is_policy || {
            let map = files.lock().unwrap();
            keys.iter()
                .zip(&versions_before)
                .all(|(k, before)| map.get(k).is_some_and(|s| newer(before, s)))
        };
        if (streams_done && files_done) || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(SETTLE).await;
    let writes = operator.metric(APPLIES).await - applies;
    let streams: Vec<Duration> = clients
        .iter()
        .filter_map(|c| c.arrival_after(at, |_| true).map(|t| t - at))
        .collect();
    let files_changed: Vec<Duration> = {
        let map = files.lock().unwrap();
        keys.iter()
            .zip(&versions_before)
            .filter_map(|(k, before)| map.get(k).filter(|s| newer(before, s)).map(|s| s.at - at))
            .collect()
    };
    let wrong = clients
        .iter()
        .filter(|c| !c.held.lock().unwrap().config.as_ref().is_some_and(&carries))
        .count();
    let spurious = fleet
        .ordinary()
        .filter(|c| c.member.workload.is_some_and(|w| !affected.contains(&w)))
        .filter(|c| c.arrival_after(at, |_| true).is_some())
        .count();
    Change {
        service,
        dependents: dependents.len(),
        writes,
        files: files_changed,
        streams,
        attached: clients.len(),
        spurious,
        wrong,
        status: String::new(),
    }
}

async fn policy_status(client: &kube::Client, scale: &Scale, service: usize) -> String {
    let api: Api<TrafficPolicy> =
        Api::namespaced(client.clone(), &scale.service_namespace(service));
    let Ok(policy) = api.get(&format!("tp-{service}")).await else {
        return "status unreadable".to_owned();
    };
    let status = policy.status.unwrap_or_default();
    let programmed = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Programmed")
        .map_or("no Programmed condition".to_owned(), |c| {
            format!("Programmed={:?} {}", c.status, c.reason)
        });
    format!(
        "proxies {}, {programmed}",
        status.proxies.as_deref().unwrap_or("unset")
    )
}

// === Gateways ==================================================================================

/// What shows that the gateways were refused: their ConfigMaps, the Event on their
/// ServiceAccount, a policy they need, and what their stream clients were told.
async fn gateway_evidence(
    client: &kube::Client,
    files: &files::Files,
    fleet: &Fleet,
) -> Vec<String> {
    let ns = scale::namespace(0);
    let mut lines = Vec::new();
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    // The Event may trail the first pass a little.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut found: Vec<String> = Vec::new();
    while found.len() < GATEWAYS && Instant::now() < deadline {
        found = events
            .list(&ListParams::default())
            .await
            .map(|list| {
                list.items
                    .iter()
                    .filter(|e| e.reason.as_deref() == Some("ConfigTooLarge"))
                    .filter_map(|e| {
                        let name = e.regarding.as_ref()?.name.clone()?;
                        name.starts_with("gateway-")
                            .then(|| format!("{name}: {}", e.note.as_deref().unwrap_or_default()))
                    })
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect()
            })
            .unwrap_or_default();
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    lines.push(format!(
        "ConfigTooLarge Events on the gateways' ServiceAccounts: {}",
        if found.is_empty() {
            "none".to_owned()
        } else {
            found.join("; ")
        }
    ));
    for g in 0..GATEWAYS {
        let key = format!("{ns}/{}", config_map_name(&format!("gateway-{g}")));
        let written = files.lock().unwrap().get(&key).map(|s| s.bytes);
        lines.push(format!(
            "ConfigMap {key}: {}",
            written.map_or("not written".to_owned(), |b| format!("written, {b} bytes"))
        ));
    }
    for gateway in fleet.gateways() {
        let held = gateway.held.lock().unwrap();
        lines.push(format!(
            "stream client of {}/{}: {}",
            gateway.member.namespace,
            gateway.member.pod,
            match (&held.config, &held.refusal) {
                (Some(config), _) => format!("served ({} Services)", config.services.len()),
                (None, _) if held.open => format!(
                    "watch accepted (200) but no config served{}",
                    if held.heartbeats_only {
                        ", heartbeats only"
                    } else {
                        " yet"
                    }
                ),
                (None, Some((status, reason))) => format!("refused {status} {reason}"),
                (None, None) => format!(
                    "no answer yet ({})",
                    held.failure.as_deref().unwrap_or("no attempt")
                ),
            }
        ));
    }
    let api: Api<TrafficPolicy> = Api::namespaced(client.clone(), &ns);
    if let Ok(policy) = api.get("tp-0").await {
        let status = policy.status.unwrap_or_default();
        for c in status.conditions.iter().filter(|c| c.type_ == "Programmed") {
            lines.push(format!(
                "{ns}/tp-0 (needed by both gateways): Programmed={:?} {}: {}; proxies {}",
                c.status,
                c.reason,
                c.message,
                status.proxies.as_deref().unwrap_or("unset")
            ));
        }
    }
    lines
}

// === Restart ===================================================================================

/// Stops the operator and starts it again while the fleet is attached; measures until every
/// client is attached to the new one, polling its `/healthz` meanwhile.
async fn storm(
    cluster: &tandem_tests::ControlPlane,
    operator: &mut Operator,
    fleet: &Fleet,
) -> Storm {
    let snapshots = |f: &Fleet| {
        f.ordinary()
            .map(|c| c.snapshots.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let currents = |f: &Fleet| {
        f.ordinary()
            .map(|c| c.currents.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let (snapshots_before, currents_before) = (snapshots(fleet), currents(fleet));
    let stopped = Instant::now();
    operator.process.stop();
    let restarted = Operator::start(cluster, IDENTITY).await;
    let started = Instant::now();
    fleet.retarget(restarted.identity_port);
    let polling = Arc::new(AtomicBool::new(true));
    let poller = tokio::spawn(poll_healthz(restarted.port, polling.clone()));
    let from_stop = wait_attached(fleet, stopped, STORM_LIMIT).await;
    polling.store(false, Ordering::Relaxed);
    let (healthz, healthz_failures) = poller.await.unwrap_or_default();
    tokio::time::sleep(SETTLE).await;
    let storm = Storm {
        reattached: fleet.attached_since(stopped),
        from_start: from_stop.map(|d| d.saturating_sub(started - stopped)),
        from_stop,
        snapshots: snapshots(fleet) - snapshots_before,
        currents: currents(fleet) - currents_before,
        healthz,
        healthz_failures,
        writes: restarted.metric(APPLIES).await,
        memory: memory(&restarted),
        ..Storm::default()
    };
    eprintln!("restart: {storm:?}");
    *operator = restarted;
    storm
}

/// `/healthz` every 100 ms while `polling`: the latencies once it first answered, and the
/// failures after that.
async fn poll_healthz(port: u16, polling: Arc<AtomicBool>) -> (Vec<Duration>, usize) {
    let mut latencies = Vec::new();
    let mut failures = 0;
    while polling.load(Ordering::Relaxed) {
        match measure::healthz(port).await {
            Ok(latency) => latencies.push(latency),
            Err(_) if !latencies.is_empty() => failures += 1,
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    (latencies, failures)
}

// === Reading the operator ======================================================================

async fn metrics_page(operator: &Operator) -> String {
    support::http_get(operator.port, "/metrics")
        .await
        .unwrap_or_default()
}

fn memory(operator: &Operator) -> (f64, f64) {
    operator
        .process
        .pid()
        .map_or((0.0, 0.0), measure::memory_mib)
}

/// A few clients' last refusal or failure, for a run that did not converge.
fn failure_sample(fleet: &Fleet) -> Vec<String> {
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for client in fleet.ordinary() {
        let held = client.held.lock().unwrap();
        if let Some((status, reason)) = &held.refusal {
            *reasons
                .entry(format!("refused {status} {reason}"))
                .or_default() += 1;
        }
        if let Some(failure) = &held.failure {
            *reasons.entry(failure.clone()).or_default() += 1;
        }
    }
    reasons
        .into_iter()
        .map(|(reason, count)| format!("{count} × {reason}"))
        .collect()
}

// === The report ================================================================================

/// Everything the report prints.
#[derive(Default)]
struct Report {
    scale: Option<Scale>,
    setup: Duration,
    dependencies: (usize, usize, usize),
    initial: Option<Duration>,
    sizes: Vec<usize>,
    attach: Option<Duration>,
    drain: Option<Duration>,
    gateway: Vec<String>,
    memory_start: (f64, f64),
    memory_changes: (f64, f64),
    policy_changes: Vec<Change>,
    endpoint_changes: Vec<Change>,
    histogram: Vec<(&'static str, Buckets)>,
    reports: String,
    storm: Storm,
    failures: Vec<String>,
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("did not complete".to_owned(), |d| {
        format!("{:.2} s", d.as_secs_f64())
    })
}

fn kb(bytes: Option<usize>) -> String {
    bytes.map_or("–".to_owned(), |b| format!("{:.1} KB", b as f64 / 1000.0))
}

impl Report {
    fn new(scale: &Scale) -> Self {
        Self {
            scale: Some(scale.clone()),
            ..Self::default()
        }
    }

    fn render(&self) -> String {
        let scale = self.scale.as_ref().expect("a scale");
        let mut r = String::new();
        let quick = scale.name == "quick";
        let _ = writeln!(
            r,
            "# tandem-operator at scale{}\n",
            if quick { ": quick run" } else { "" }
        );
        let _ = writeln!(
            r,
            "- Date: {}; machine: {} cores shared with other work; load average (1 min) {}",
            k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ"),
            std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
            std::fs::read_to_string("/proc/loadavg")
                .unwrap_or_default()
                .split_whitespace()
                .next()
                .unwrap_or("?"),
        );
        let _ = writeln!(
            r,
            "- Scale ({}): {} Services in {} namespaces, {} ready endpoints each, a TrafficPolicy on \
             one in {}; {} ServiceAccounts × {} injected pods (objects only), each naming its \
             dependencies in `tandem.dev/dependencies` (p50 {}, p99 {}, max {}); {GATEWAYS} \
             gateway workloads depending on every namespace (`<ns>/*`); one simulated stream \
             client per pod ({} in all, each with its own pod-bound token). Created in {:.1} s.",
            scale.name,
            scale.services,
            scale.namespaces,
            scale.endpoints_per_service,
            scale.policy_every,
            scale.service_accounts,
            scale.pods_per_service_account,
            self.dependencies.0,
            self.dependencies.1,
            self.dependencies.2,
            scale.clients() + GATEWAYS,
            self.setup.as_secs_f64()
        );
        let _ = writeln!(
            r,
            "- Control plane: real etcd + kube-apiserver + kube-controller-manager on loopback; \
             the operator a release build, one replica. File-path times are seen through a \
             ConfigMap watch, as a kubelet sees them (the kubelet's own sync lag, up to 60–90 s, \
             comes on top); stream-path times are when a client applied the version.\n"
        );
        let _ = writeln!(
            r,
            "\"Main\" is main before this work (bench/results/operator-report.md of 2026-11-26: 1,000 \
             Services each with a policy, 200 ServiceAccounts, every ConfigMap carrying every \
             governed Service; no stream).\n"
        );
        let _ = writeln!(
            r,
            "| figure | target | main | this run |\n|---|---|---|---|"
        );
        let at = |p: f64| measure::percentile(&self.sizes, p);
        let _ = writeln!(
            r,
            "| ConfigMap config.json p50 / p99 / max ({} workloads) | p99 ≤ 64 KB | 734.0 KB / 734.0 KB / 734.0 KB | {} / {} / {} |",
            self.sizes.len(),
            kb(at(0.5)),
            kb(at(0.99)),
            kb(self.sizes.last().copied())
        );
        let _ = writeln!(
            r,
            "| operator start → every workload's ConfigMap written | – | 23.89 s | {} |",
            secs(self.initial)
        );
        let _ = writeln!(
            r,
            "| fleet start → all {} stream clients attached | – | no stream | {} |",
            scale.clients(),
            secs(self.attach)
        );
        let _ = writeln!(
            r,
            "| then until their applied reports are answered (the changes start after) | – | – | {} |",
            secs(self.drain)
        );
        let writes: Vec<String> = self
            .policy_changes
            .iter()
            .map(|c| format!("{} (expected {})", c.writes, c.dependents))
            .collect();
        let _ = writeln!(
            r,
            "| ConfigMap writes per policy change, measured (expected = workloads depending on the Service) | = dependents | 200 (all) | {} |",
            writes.join(", ")
        );
        let endpoint_writes: Vec<String> = self
            .endpoint_changes
            .iter()
            .map(|c| format!("{} ({} dependents)", c.writes, c.dependents))
            .collect();
        let _ = writeln!(
            r,
            "| ConfigMap writes per endpoint change, stream up | 0 | 200, 200 | {} |",
            endpoint_writes.join(", ")
        );
        let per_proxy: Vec<Duration> = self
            .policy_changes
            .iter()
            .flat_map(|c| c.streams.iter().copied())
            .collect();
        let every: Vec<Duration> = self
            .policy_changes
            .iter()
            .filter_map(Change::slowest_stream)
            .collect();
        let _ = writeln!(
            r,
            "| policy change → applied, stream path, per affected proxy p50 / p99 / max ({} proxies) | – | no stream | {} |",
            per_proxy.len(),
            seconds(&per_proxy)
        );
        let _ = writeln!(
            r,
            "| policy change → every affected proxy applied, stream path, p50 / p99 / max ({} of {} changes complete) | p99 ≤ 1 s | no stream | {} |",
            every.len(),
            self.policy_changes.len(),
            seconds(&every)
        );
        let endpoint_every: Vec<Duration> = self
            .endpoint_changes
            .iter()
            .filter_map(Change::slowest_stream)
            .collect();
        let _ = writeln!(
            r,
            "| endpoint change → every affected proxy applied, stream path, p50 / p99 / max ({} of {} complete) | p99 ≤ 1 s | 24.12 s, 31.22 s (file) | {} |",
            endpoint_every.len(),
            self.endpoint_changes.len(),
            seconds(&endpoint_every)
        );
        let file_every: Vec<Duration> = self
            .policy_changes
            .iter()
            .filter_map(Change::slowest_file)
            .collect();
        let per_file: Vec<Duration> = self
            .policy_changes
            .iter()
            .flat_map(|c| c.files.iter().copied())
            .collect();
        let _ = writeln!(
            r,
            "| policy change → every affected ConfigMap, file path, p50 / p99 / max ({} of {} complete) | – | 24.99 s / 35.30 s / 35.30 s | {} |",
            file_every.len(),
            self.policy_changes.len(),
            seconds(&file_every)
        );
        let _ = writeln!(
            r,
            "| policy change → each affected ConfigMap, file path, p50 / p99 / max ({} ConfigMaps) | – | – | {} |",
            per_file.len(),
            seconds(&per_file)
        );
        for (source, buckets) in &self.histogram {
            let show = |q: f64| {
                buckets
                    .quantile(q)
                    .map_or("–".to_owned(), |v| format!("{v:.3} s"))
            };
            let _ = writeln!(
                r,
                "| operator's `{CONVERGENCE}{{source=\"{source}\"}}` over the changes, p50 / p99 from buckets ({} reports) | – | not exported | {} / {} |",
                buckets.count(),
                show(0.5),
                show(0.99)
            );
        }
        let _ = writeln!(
            r,
            "| operator memory after start: VmRSS / VmHWM | – | – | {:.1} MiB / {:.1} MiB |",
            self.memory_start.0, self.memory_start.1
        );
        let _ = writeln!(
            r,
            "| operator memory after the changes: VmRSS (end) / VmHWM (peak) | peak ≤ 300 MiB | 209.9 MiB / 278.8 MiB | {:.1} MiB / {:.1} MiB |",
            self.memory_changes.0, self.memory_changes.1
        );
        let storm = &self.storm;
        let _ = writeln!(
            r,
            "| operator restart → all {} clients re-attached, from its start (from the stop) | – | no stream | {} ({}) |",
            scale.clients(),
            secs(storm.from_start),
            secs(storm.from_stop)
        );
        let _ = writeln!(
            r,
            "| re-attached with Current / Snapshot (expected Snapshot: the {} clients of workloads an endpoint change touched) | – | – | {} / {} ({} of {} re-attached) |",
            storm.stale_clients,
            storm.currents,
            storm.snapshots,
            storm.reattached,
            scale.clients()
        );
        let _ = writeln!(
            r,
            "| restarted operator's /healthz during the reconnects, p50 / p99 / max ({} polls, {} failed) | responsive | – | {} |",
            storm.healthz.len(),
            storm.healthz_failures,
            seconds(&storm.healthz)
        );
        let _ = writeln!(
            r,
            "| ConfigMap writes by the restarted operator (expected: the {} workloads whose ConfigMap the stream-only endpoint changes left behind) | – | – | {} |",
            storm.stale, storm.writes
        );
        let _ = writeln!(
            r,
            "| restarted operator memory: VmRSS / VmHWM | peak ≤ 300 MiB | – | {:.1} MiB / {:.1} MiB |",
            storm.memory.0, storm.memory.1
        );

        let _ = writeln!(r, "\n## Gateways (depend on every namespace)\n");
        for line in &self.gateway {
            let _ = writeln!(r, "- {line}");
        }
        let _ = writeln!(r, "\n## Each change\n");
        let _ = writeln!(
            r,
            "| change | dependents | writes | ConfigMaps updated | clients applied / attached | stream p50 / p99 / max | wrong content | unaffected clients that got a version | policy status after |\n|---|---|---|---|---|---|---|---|---|"
        );
        for (kind, changes) in [
            ("policy", &self.policy_changes),
            ("endpoints", &self.endpoint_changes),
        ] {
            for c in changes {
                let _ = writeln!(
                    r,
                    "| {kind} svc-{} | {} | {} | {} | {} / {} | {} | {} | {} | {} |",
                    c.service,
                    c.dependents,
                    c.writes,
                    c.files.len(),
                    c.streams.len(),
                    c.attached,
                    seconds(&c.streams),
                    c.wrong,
                    c.spurious,
                    if c.status.is_empty() {
                        "–"
                    } else {
                        &c.status
                    }
                );
            }
        }
        let _ = writeln!(
            r,
            "\nApplied reports (shared pool of keep-alive connections): {}.",
            self.reports
        );
        if !self.failures.is_empty() {
            let _ = writeln!(
                r,
                "\nClients' last refusal or failure over the run (counts; reconnects after the restart included):\n"
            );
            for line in &self.failures {
                let _ = writeln!(r, "- {line}");
            }
        }
        let _ = writeln!(
            r,
            "\nReproduce with `make bench-operator{}`. The simulated clients share one TLS client \
             config with session resumption off (every reconnect is a full handshake) and post \
             applied reports through a pool of 8 keep-alive connections, each report with its \
             pod's own token; the restarted operator listens on a new port, which the clients \
             follow as they would follow the Service.",
            if quick { " QUICK=1" } else { "" }
        );
        r
    }
}
