//! The local cluster's end-to-end scenarios, on one cluster with Tandem installed as a user
//! installs it (webhook and operator under their own ServiceAccounts) and a node agent running
//! what the webhook injected:
//!
//! - a: a labelled namespace gets injected pods whose traffic crosses both proxies, with the
//!   proxy configs the operator rendered;
//! - b: a 90/10 TrafficPolicy splits live traffic 90/10, seconds after it is applied;
//! - c: retries with a budget turn a server failing half its requests into ≥ 99.9 % success;
//! - d: a CircuitBreakerPolicy ejects a failing endpoint and the errors stop;
//! - e: invalid policies are refused by the apiserver or marked Accepted=False with a reason,
//!   and the valid ones keep working;
//! - f: restarting the operator, the webhook and the apiserver disturbs no traffic;
//! - g (on its own cluster): an unlabelled namespace and an opted-out pod are not injected.
//!
//! Every burst of requests is sent from inside a meshed pod (the `loadgen` client), through its
//! proxy, and is bounded in count; every wait is bounded in time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod e2e_support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;
use tandem_crds::contract::{LoadBalancer, ProxyConfig};

use e2e_support::{ClientStats, Mesh, SERIAL, counter, eventually, pod_ip, repo};

/// Requests per measurement of a split or a success rate.
const REQUESTS: u64 = 2_000;

/// How long the operator and the proxies may take to carry a change: generous, because the
/// machine is shared; the time it took is reported, never asserted more tightly.
const PROPAGATION: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control-plane binaries: run by make e2e"]
async fn a_meshed_app_is_injected_steered_by_policies_and_undisturbed_by_restarts() {
    let _serial = SERIAL.lock().await;
    let mut mesh = Mesh::start().await.expect("cluster, Tandem and node start");
    let started = Instant::now();
    mesh.apply_file(&repo().join("manifests/samples/app.yaml"))
        .await
        .expect("sample app applies");
    mesh.apply_file(&repo().join("tests/fixtures/e2e/workloads.yaml"))
        .await
        .expect("scenario workloads apply");

    let client = scenario_a(&mesh, started).await;
    let loadgen = mesh
        .ready_pods("shop", "app=loadgen", 1, Duration::from_secs(90))
        .await
        .unwrap()
        .remove(0);
    scenario_b(&mesh, &loadgen).await;
    scenario_c(&mesh, &loadgen).await;
    scenario_d(&mesh, &loadgen).await;
    scenario_e(&mesh, &loadgen).await;
    scenario_f(&mut mesh, &loadgen, &client).await;

    // Deleting a pod stops it and removes its network namespace.
    let pods: Api<Pod> = Api::namespaced(mesh.client(), "shop");
    let name = client.metadata.name.clone().unwrap();
    pods.delete(&name, &DeleteParams::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pods.get_opt(&name).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "pod {name} was not finalized");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "all scenarios a-f: {:.0} s from the first apply",
        started.elapsed().as_secs_f64()
    );
    mesh.node.shutdown().await;
}

/// Scenario a: the sample app is injected, its endpoints published, the operator renders each
/// ServiceAccount's proxy config, and client → server traffic crosses both proxies. Returns
/// the client pod.
async fn scenario_a(mesh: &Mesh, started: Instant) -> Pod {
    let servers = mesh
        .ready_pods("shop", "app=server", 2, Duration::from_secs(90))
        .await
        .unwrap();
    let clients = mesh
        .ready_pods("shop", "app=client", 1, Duration::from_secs(90))
        .await
        .unwrap();
    eprintln!(
        "scenario a: 3 injected pods Ready {:?} after apply",
        started.elapsed()
    );

    // The spec: tandem-init then the tandem-proxy native sidecar, the config volume, the
    // annotation; and the statuses the node reported for them.
    for pod in servers.iter().chain(&clients) {
        assert_injected(pod);
    }

    // The operator rendered each ServiceAccount's config, and the proxies loaded it: that
    // version, or a newer one from the stream. A workload whose pods all watch the stream gets
    // endpoint-only changes there alone, so its ConfigMap may rightly lag what its proxy runs.
    let configs: Api<ConfigMap> = Api::namespaced(mesh.client(), "shop");
    for pod in servers.iter().chain(&clients) {
        let sa = pod
            .spec
            .as_ref()
            .unwrap()
            .service_account_name
            .clone()
            .unwrap();
        let sa_name = sa.as_str();
        let (rendered, _) = eventually(
            &format!("the operator's config for {sa}, loaded by its proxy"),
            PROPAGATION,
            move || async move {
                let Some(rendered) = mesh.operator_config("shop", sa_name).await? else {
                    return Ok(None);
                };
                let loaded = mesh.proxy_loaded(pod).await?;
                Ok(loaded
                    .is_some_and(|l| l.generation() >= rendered.generation())
                    .then_some(rendered))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()));
        assert_eq!(rendered.workload.service_account, sa);
        let cm = configs
            .get(&tandem_crds::names::config_map_name(&sa))
            .await
            .unwrap();
        assert_eq!(
            cm.metadata
                .labels
                .unwrap_or_default()
                .get("app.kubernetes.io/managed-by")
                .map(String::as_str),
            Some("tandem-operator"),
            "the ConfigMap is the operator's"
        );
    }

    // Endpoints published by the real EndpointSlice controller.
    let slices: Api<EndpointSlice> = Api::namespaced(mesh.client(), "shop");
    let mut expected: Vec<String> = servers
        .iter()
        .map(|p| pod_ip(p).unwrap().to_string())
        .collect();
    expected.sort();
    let (slices, expected) = (&slices, &expected);
    eventually(
        "server endpoints published",
        Duration::from_secs(30),
        move || async move {
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=server"))
                .await?;
            let mut published: Vec<String> = list
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                .flat_map(|e| e.addresses.clone())
                .collect();
            published.sort();
            Ok((published == *expected).then_some(()))
        },
    )
    .await
    .unwrap();

    // Traffic: the client calls the server's ClusterIP; both proxies carry it. As in any
    // cluster, published endpoints reach the Service rules a moment later (the node agent's
    // kube-proxy watch); give them two seconds before measuring.
    let client = &clients[0];
    tokio::time::sleep(Duration::from_secs(2)).await;
    mesh.client_stats(client, true).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats = mesh.client_stats(client, false).await.unwrap();
    assert!(stats.total > 50, "the client sent requests: {stats:?}");
    assert_eq!(stats.ok, stats.total, "every request succeeded: {stats:?}");
    // No policy governs the server yet, but its endpoints are meshed, so the operator renders
    // it into the client's config too (for mutual TLS). Until that config reaches the client's
    // pod (the kubelet's ConfigMap sync), its proxy passes the connection through as opaque
    // TCP — connections and bytes are its record; from then on it proxies HTTP and counts
    // requests. Which one a run sees depends on that lag, so either record will do, but the
    // two together must account for the traffic (a response is at least 20 bytes).
    let client_metrics = mesh.proxy_metrics(client).await.unwrap();
    // The standard series: relayed connections are TCP series, proxied HTTP request series.
    let outbound = [("reporter", "source")];
    let connections = counter(
        &client_metrics,
        "tandem_tcp_connections_opened_total",
        &outbound,
    );
    let upstream_bytes = counter(
        &client_metrics,
        "tandem_tcp_received_bytes_total",
        &outbound,
    );
    let outbound_requests = counter(&client_metrics, "tandem_requests_total", &outbound);
    assert!(
        connections + outbound_requests >= 1.0,
        "client proxy carried nothing:\n{client_metrics}"
    );
    assert!(
        upstream_bytes / 20.0 + outbound_requests >= stats.total as f64,
        "client proxy relayed {upstream_bytes} bytes and proxied {outbound_requests} requests \
         for {} responses:\n{client_metrics}",
        stats.total
    );
    let mut inbound = 0.0;
    for server in &servers {
        let metrics = mesh.proxy_metrics(server).await.unwrap();
        let n = counter(
            &metrics,
            "tandem_requests_total",
            &[("reporter", "destination")],
        );
        assert!(
            n > 0.0,
            "server proxy {} carried inbound requests:\n{metrics}",
            server.metadata.name.as_deref().unwrap()
        );
        inbound += n;
    }
    assert!(
        inbound >= stats.total as f64 * 0.9,
        "server proxies saw {inbound} inbound requests for {}",
        stats.total
    );
    eprintln!(
        "scenario a: {} requests, {} ok, p50 {:.1} ms, p99 {:.1} ms; client proxy: {connections} outbound connections, {upstream_bytes} bytes from upstream, {outbound_requests} requests; server proxies: {inbound} inbound requests",
        stats.total, stats.ok, stats.p50_ms, stats.p99_ms
    );
    client.clone()
}

fn assert_injected(pod: &Pod) {
    let spec = pod.spec.as_ref().unwrap();
    let inits: Vec<_> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(inits, ["tandem-init", "tandem-proxy"]);
    let proxy = &spec.init_containers.as_ref().unwrap()[1];
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    assert_eq!(proxy.image.as_deref(), Some(e2e_support::PROXY_IMAGE));
    let init = &spec.init_containers.as_ref().unwrap()[0];
    assert_eq!(init.args.as_ref().unwrap()[0], "init");
    assert!(
        pod.metadata
            .annotations
            .as_ref()
            .unwrap()
            .contains_key("tandem.dev/proxy-version")
    );
    let sa = spec.service_account_name.as_deref().unwrap();
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "tandem-config")
        .unwrap();
    assert_eq!(
        volume.config_map.as_ref().unwrap().name,
        format!("tandem-proxy-{sa}")
    );
    let statuses = pod
        .status
        .as_ref()
        .unwrap()
        .init_container_statuses
        .as_ref()
        .unwrap();
    let terminated = statuses[0]
        .state
        .as_ref()
        .unwrap()
        .terminated
        .as_ref()
        .unwrap();
    assert_eq!(terminated.exit_code, 0, "tandem-init ran and succeeded");
    assert!(statuses[1].started == Some(true) && statuses[1].ready);
}

/// The weights of the first route of `shop/<service>` in a proxy config.
fn weights(config: &ProxyConfig, service: &str) -> Option<Vec<u32>> {
    let route = config
        .services
        .iter()
        .find(|s| s.namespace == "shop" && s.name == service)?
        .routes
        .first()?;
    Some(route.backends.iter().map(|b| b.weight).collect())
}

/// `http://<cluster IP>/` of a Service in shop.
async fn service_url(mesh: &Mesh, service: &str) -> String {
    format!(
        "http://{}/",
        mesh.cluster_ip("shop", service).await.unwrap()
    )
}

/// Waits until loadgen's proxy has loaded a config satisfying `check`; returns the time taken.
async fn until_loaded(
    mesh: &Mesh,
    loadgen: &Pod,
    what: &str,
    check: impl Fn(&ProxyConfig) -> bool,
) -> Duration {
    let check = &check;
    eventually(what, PROPAGATION, move || async move {
        Ok(mesh.proxy_loaded(loadgen).await?.filter(|c| check(c)))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()))
    .1
}

/// Waits until a policy's condition has `status` and `reason`; returns its message.
async fn until_condition(
    mesh: &Mesh,
    plural: &str,
    name: &str,
    type_: &str,
    (status, reason): (&str, &str),
) -> String {
    eventually(
        &format!("{plural} {name}: {type_}={status} ({reason})"),
        PROPAGATION,
        move || async move {
            Ok(mesh
                .policy_condition(plural, "shop", name, type_)
                .await?
                .filter(|(s, r, _)| s == status && r == reason)
                .map(|(_, _, message)| message))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()))
    .0
}

fn describe(stats: &ClientStats) -> String {
    format!(
        "{} requests in {:.1} s, {:.2} % ok, by status {:?}, by body {:?}, p50 {:.1} ms, p99 {:.1} ms",
        stats.total,
        stats.seconds,
        stats.success_rate() * 100.0,
        stats.by_status,
        stats.by_body,
        stats.p50_ms,
        stats.p99_ms
    )
}

/// Scenario b: the sample canary (90 % to server-v1, 10 % to server-v2) splits requests to
/// the Service server, measured over a bounded number of requests.
async fn scenario_b(mesh: &Mesh, loadgen: &Pod) {
    let target = service_url(mesh, "server").await;
    // Before: nothing governs server, so kube-proxy's rules pick a pod per *connection*.
    let before = mesh.burst(loadgen, &target, 200, 4, None).await.unwrap();
    eprintln!("scenario b: before the policy, {}", describe(&before));

    let applied = Instant::now();
    mesh.apply_file(&repo().join("manifests/samples/canary-split.yaml"))
        .await
        .expect("the sample canary applies");
    eventually(
        "the 90/10 split in tandem-proxy-loadgen",
        PROPAGATION,
        move || async move {
            Ok(mesh
                .operator_config("shop", "loadgen")
                .await?
                .filter(|c| weights(c, "server") == Some(vec![90, 10])))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()));
    let in_configmap = applied.elapsed();
    until_loaded(
        mesh,
        loadgen,
        "the 90/10 split loaded by loadgen's proxy",
        |c| weights(c, "server") == Some(vec![90, 10]),
    )
    .await;
    let in_proxy = applied.elapsed();

    let after = mesh
        .burst(loadgen, &target, REQUESTS, 4, None)
        .await
        .unwrap();
    assert_eq!(after.total, REQUESTS);
    assert_eq!(after.ok, after.total, "every request succeeded: {after:?}");
    let (v1, v2) = (after.share("v1"), after.share("v2"));
    assert!(
        (v1 + v2 - 1.0).abs() < 1e-9,
        "only v1 and v2 answer: {after:?}"
    );
    assert!(
        (v2 - 0.10).abs() <= 0.03,
        "server-v2 got {:.1} % of {REQUESTS} requests, not 10 ± 3 %: {after:?}",
        v2 * 100.0
    );
    until_condition(
        mesh,
        "trafficpolicies",
        "server-canary",
        "Accepted",
        ("True", "Accepted"),
    )
    .await;
    eventually(
        "server-canary Programmed",
        PROPAGATION,
        move || async move {
            Ok(mesh
                .policy_condition("trafficpolicies", "shop", "server-canary", "Programmed")
                .await?
                .filter(|(s, _, _)| s == "True"))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()));
    eprintln!(
        "scenario b: 90/10 canary applied; in the ConfigMap after {:.2} s, in loadgen's proxy after {:.2} s; observed split over {REQUESTS} requests: v1 {:.1} %, v2 {:.1} % (p50 {:.1} ms, p99 {:.1} ms)",
        in_configmap.as_secs_f64(),
        in_proxy.as_secs_f64(),
        v1 * 100.0,
        v2 * 100.0,
        after.p50_ms,
        after.p99_ms
    );
}

/// Scenario c: retries with a budget against a server failing every second request.
async fn scenario_c(mesh: &Mesh, loadgen: &Pod) {
    let target = service_url(mesh, "flaky").await;
    let before = mesh.burst(loadgen, &target, 200, 1, None).await.unwrap();
    assert!(
        (0.4..=0.6).contains(&before.success_rate()),
        "without retries, half the requests fail: {before:?}"
    );
    eprintln!("scenario c: before the policy, {}", describe(&before));

    let applied = Instant::now();
    mesh.apply_file(&repo().join("tests/fixtures/e2e/retries.yaml"))
        .await
        .expect("the retry policy applies");
    until_loaded(
        mesh,
        loadgen,
        "flaky's retries loaded by loadgen's proxy",
        |c| {
            c.services
                .iter()
                .any(|s| s.name == "flaky" && s.routes.iter().any(|r| r.retries.is_some()))
        },
    )
    .await;
    let in_proxy = applied.elapsed();

    let after = mesh
        .burst(loadgen, &target, REQUESTS, 1, None)
        .await
        .unwrap();
    assert_eq!(after.total, REQUESTS);
    assert!(
        after.success_rate() >= 0.999,
        "with retries, at least 99.9 % succeed: {after:?}"
    );
    let admin = mesh.proxy_admin_config(loadgen).await.unwrap();
    let policy = admin["policies"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["service"] == "shop/flaky")
        .cloned()
        .unwrap_or_default();
    let retries = policy["retriesTotal"].as_u64().unwrap_or(0);
    assert!(
        retries >= REQUESTS / 4,
        "the proxy retried ({retries} retries): {policy}"
    );
    let metrics = mesh.proxy_metrics(loadgen).await.unwrap();
    let exported = counter(
        &metrics,
        "tandem_retries_total",
        &[("dst_service", "shop/flaky")],
    );
    assert!(
        exported >= retries as f64,
        "/metrics exports the retries ({exported}):\n{metrics}"
    );
    eprintln!(
        "scenario c: retries loaded {:.2} s after apply; {}; loadgen's proxy retried {retries} times, budget refused {}",
        in_proxy.as_secs_f64(),
        describe(&after),
        policy["retryBudgetExhaustedTotal"]
    );
}

/// Scenario d: a CircuitBreakerPolicy ejects the failing endpoint of breaker, then every
/// request succeeds.
async fn scenario_d(mesh: &Mesh, loadgen: &Pod) {
    let target = service_url(mesh, "breaker").await;
    let bad = mesh
        .ready_pods("shop", "app=breaker,health=bad", 1, Duration::from_secs(60))
        .await
        .unwrap();
    let bad_address = format!("{}:8080", pod_ip(&bad[0]).unwrap());
    let bad_address = bad_address.as_str();

    mesh.apply_file(&repo().join("tests/fixtures/e2e/round-robin.yaml"))
        .await
        .expect("the round-robin policy applies");
    until_loaded(
        mesh,
        loadgen,
        "round-robin for breaker loaded by loadgen's proxy",
        |c| {
            c.services.iter().any(|s| {
                s.name == "breaker"
                    && s.load_balancer == LoadBalancer::RoundRobin
                    && s.ports.first().is_some_and(|p| p.endpoints.len() == 2)
            })
        },
    )
    .await;
    let before = mesh.burst(loadgen, &target, 200, 1, None).await.unwrap();
    assert!(
        (0.4..=0.6).contains(&before.success_rate()),
        "without a breaker, every second request reaches the failing endpoint: {before:?}"
    );
    eprintln!("scenario d: round-robin, no breaker: {}", describe(&before));

    let applied = Instant::now();
    mesh.apply_file(&repo().join("tests/fixtures/e2e/breaker.yaml"))
        .await
        .expect("the circuit breaker applies");
    until_loaded(
        mesh,
        loadgen,
        "breaker's outlier detection loaded by loadgen's proxy",
        |c| {
            c.services.iter().any(|s| {
                s.name == "breaker"
                    && s.circuit_breaker.is_some()
                    && s.ports.first().is_some_and(|p| p.endpoints.len() == 2)
            })
        },
    )
    .await;
    let in_proxy = applied.elapsed();

    // Traffic at 100 requests per second while the proxy's /config is watched for the
    // ejection of the failing endpoint.
    let traffic = Instant::now();
    let ejection = async {
        eventually(
            "the failing endpoint ejected",
            Duration::from_secs(10),
            move || async move {
                let admin = mesh.proxy_admin_config(loadgen).await?;
                let ejected = admin["policies"]["destinations"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|d| d["service"] == "shop/breaker")
                    .flat_map(|d| d["endpoints"].as_array().cloned().unwrap_or_default())
                    .any(|e| e["address"] == bad_address && e["state"] == "ejected");
                Ok(ejected.then(|| traffic.elapsed()))
            },
        )
        .await
    };
    let (first, ejected_after) =
        tokio::join!(mesh.burst(loadgen, &target, 300, 1, Some(100)), ejection);
    let first = first.unwrap();
    let (ejected_after, _) = ejected_after.unwrap_or_else(|e| panic!("{e:#}: {first:?}"));
    let admin = mesh.proxy_admin_config(loadgen).await.unwrap();
    let destination = admin["policies"]["destinations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["service"] == "shop/breaker")
        .cloned()
        .unwrap();
    assert!(
        destination["ejectionsTotal"].as_u64().unwrap_or(0) >= 1,
        "{destination}"
    );
    let metrics = mesh.proxy_metrics(loadgen).await.unwrap();
    let breaker = [("dst_service", "shop/breaker")];
    assert!(
        counter(&metrics, "tandem_ejections_total", &breaker) >= 1.0
            && counter(&metrics, "tandem_active_ejections", &breaker) == 1.0,
        "/metrics shows the ejection:\n{metrics}"
    );

    let after = mesh
        .burst(loadgen, &target, REQUESTS, 4, None)
        .await
        .unwrap();
    assert_eq!(after.total, REQUESTS);
    assert_eq!(
        after.ok, after.total,
        "no errors once the failing endpoint is ejected: {after:?}"
    );
    assert_eq!(after.share("breaker-ok"), 1.0, "{after:?}");
    eprintln!(
        "scenario d: breaker loaded {:.2} s after apply; {bad_address} ejected {} ms into traffic, after {} errors in the first {} requests; then {}",
        in_proxy.as_secs_f64(),
        ejected_after.as_millis(),
        first.total - first.ok,
        first.total,
        describe(&after)
    );
}

/// Scenario e: invalid policies are refused by the apiserver (CEL rules, schema bounds) or
/// marked Accepted=False with a reason by the operator; the valid ones keep working.
async fn scenario_e(mesh: &Mesh, loadgen: &Pod) {
    let refused = mesh
        .apply_file(&repo().join("manifests/samples/invalid-policy.yaml"))
        .await
        .expect_err("the apiserver refuses the invalid sample");
    let refused = format!("{refused:#}");
    for message in [
        "retries.perTryTimeout must not be longer than the rule's timeout",
        "at least one backend must have a positive weight",
    ] {
        assert!(refused.contains(message), "{message:?} not in {refused}");
    }
    let out_of_bounds = json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": "too-many-retries", "namespace": "shop"},
        "spec": {"targetRef": {"name": "flaky"}, "rules": [{"retries": {"attempts": 11}}]}
    });
    let bounds = e2e_support::apply_value(&mesh.client(), &out_of_bounds)
        .await
        .expect_err("the apiserver refuses attempts above 10");
    let bounds = format!("{bounds:#}");
    assert!(bounds.contains("attempts"), "{bounds}");

    let applied = Instant::now();
    mesh.apply_file(&repo().join("tests/fixtures/e2e/mistakes.yaml"))
        .await
        .expect("the apiserver accepts what its schema cannot judge");
    let mut verdicts = Vec::new();
    for (name, reason) in [
        ("bad-regex", "Invalid"),
        ("missing-backend", "TargetNotFound"),
        ("second-canary", "Conflicted"),
    ] {
        let message =
            until_condition(mesh, "trafficpolicies", name, "Accepted", ("False", reason)).await;
        verdicts.push(format!("{name}: {reason} ({message})"));
    }
    let judged = applied.elapsed();

    // The valid policies are untouched, and traffic still follows them.
    until_condition(
        mesh,
        "trafficpolicies",
        "server-canary",
        "Accepted",
        ("True", "Accepted"),
    )
    .await;
    until_condition(
        mesh,
        "trafficpolicies",
        "flaky-retries",
        "Accepted",
        ("True", "Accepted"),
    )
    .await;
    let loaded = mesh.proxy_loaded(loadgen).await.unwrap().unwrap();
    assert_eq!(weights(&loaded, "server"), Some(vec![90, 10]));
    for (service, route) in [("server-v1", "unclosed"), ("server-v2", "nowhere")] {
        assert!(
            !loaded
                .services
                .iter()
                .filter(|s| s.name == service)
                .flat_map(|s| &s.routes)
                .any(|r| r.name == route),
            "the refused rule {route} reached the proxy"
        );
    }
    let server = mesh
        .burst(loadgen, &service_url(mesh, "server").await, 1_000, 4, None)
        .await
        .unwrap();
    assert_eq!(server.ok, server.total, "{server:?}");
    assert!((server.share("v2") - 0.10).abs() <= 0.04, "{server:?}");
    let flaky = mesh
        .burst(loadgen, &service_url(mesh, "flaky").await, 1_000, 1, None)
        .await
        .unwrap();
    assert!(flaky.success_rate() >= 0.999, "{flaky:?}");
    eprintln!(
        "scenario e: refused by the apiserver: the CEL rules of invalid-policy.yaml and attempts: 11; marked by the operator within {:.2} s: {}; still working: server v2 share {:.1} % over 1000, flaky {:.2} % ok over 1000",
        judged.as_secs_f64(),
        verdicts.join("; "),
        server.share("v2") * 100.0,
        flaky.success_rate() * 100.0
    );
}

/// Scenario f: the operator, the webhook and the apiserver restart one after the other while
/// two bounded streams of requests run; none fails, and afterwards the webhook still injects
/// and the operator still programs the proxies.
async fn scenario_f(mesh: &mut Mesh, loadgen: &Pod, client: &Pod) {
    // 40 s of requests: the restarts take about 15 s here (the apiserver alone 14 s, most of
    // it the 10 s the harness waits for it to stop), with room for a slower machine.
    const STREAM: u64 = 2_000;
    const STREAM_RPS: u32 = 50;
    let target = service_url(mesh, "server").await;
    let hash_before = mesh.proxy_admin_config(loadgen).await.unwrap()["hash"].clone();
    mesh.client_stats(client, true).await.unwrap();

    let Mesh {
        node,
        tandem,
        cluster,
        ..
    } = mesh;
    let stream = e2e_support::burst(node, loadgen, &target, STREAM, 2, Some(STREAM_RPS));
    let restarts = async {
        let began = Instant::now();
        tandem.restart_operator(cluster).await?;
        let operator = began.elapsed();
        tandem.restart_webhook(cluster).await?;
        let webhook = began.elapsed() - operator;
        cluster.restart_apiserver().await?;
        let apiserver = began.elapsed() - operator - webhook;
        anyhow::Ok((operator, webhook, apiserver, began.elapsed()))
    };
    let (stream, restarts) = tokio::join!(stream, restarts);
    let (operator, webhook, apiserver, all) = restarts.unwrap_or_else(|e| panic!("{e:#}"));
    let stream = stream.unwrap();
    assert_eq!(stream.total, STREAM);
    assert_eq!(stream.ok, stream.total, "no request failed: {stream:?}");
    assert!(
        all.as_secs_f64() < stream.seconds,
        "the stream ({:.1} s) covered the restarts ({:.1} s)",
        stream.seconds,
        all.as_secs_f64()
    );
    let background = mesh.client_stats(client, false).await.unwrap();
    assert!(background.total > 0, "{background:?}");
    assert_eq!(
        background.ok, background.total,
        "no request failed: {background:?}"
    );
    let hash_after = mesh.proxy_admin_config(loadgen).await.unwrap()["hash"].clone();

    // Still working: the webhook injects (a dry-run create), the operator programs a change.
    let pods: Api<Pod> = Api::namespaced(mesh.client(), "shop");
    let probe: Pod = serde_json::from_value(json!({
        "metadata": {"name": "after-restarts"},
        "spec": {"containers": [{"name": "app", "image": e2e_support::TESTAPP_IMAGE}]}
    }))
    .unwrap();
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    let injected = pods.create(&dry_run, &probe).await.unwrap();
    assert_eq!(
        injected.spec.unwrap().init_containers.map(|c| c.len()),
        Some(2),
        "the restarted webhook injects"
    );
    let changed = Instant::now();
    let mut canary: serde_json::Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("manifests/samples/canary-split.yaml")).unwrap(),
    )
    .unwrap();
    canary["spec"]["rules"][0]["backends"][0]["weight"] = json!(50);
    canary["spec"]["rules"][0]["backends"][1]["weight"] = json!(50);
    e2e_support::apply_value(&mesh.client(), &canary)
        .await
        .unwrap();
    until_loaded(mesh, loadgen, "the 50/50 split after the restarts", |c| {
        weights(c, "server") == Some(vec![50, 50])
    })
    .await;
    eprintln!(
        "scenario f: restarts took operator {:.1} s, webhook {:.1} s, apiserver {:.1} s; during them loadgen sent {} ({:.2} % ok) and the client {} ({:.2} % ok); loadgen's config {} across the restarts; afterwards the webhook injected and a 50/50 change reached loadgen's proxy in {:.2} s",
        operator.as_secs_f64(),
        webhook.as_secs_f64(),
        apiserver.as_secs_f64(),
        stream.total,
        stream.success_rate() * 100.0,
        background.total,
        background.success_rate() * 100.0,
        if hash_before == hash_after {
            "unchanged"
        } else {
            "was rewritten"
        },
        changed.elapsed().as_secs_f64()
    );
}

#[tokio::test]
#[ignore = "needs root and the control-plane binaries: run by make e2e"]
async fn an_unlabelled_namespace_and_an_opted_out_pod_are_not_injected() {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::start()
        .await
        .expect("cluster, webhook and node start");
    let client = mesh.client();
    for (name, labels) in [
        ("plain", json!({})),
        ("meshed", json!({"tandem.dev/inject": "enabled"})),
    ] {
        e2e_support::apply_value(&client, &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})).await.unwrap();
    }
    let pod = |name: &str, annotations: serde_json::Value| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations, "labels": {"app": name}},
            "spec": {"terminationGracePeriodSeconds": 2, "containers": [{
                "name": "server", "image": e2e_support::TESTAPP_IMAGE,
                "args": ["server", "--listen", "0.0.0.0:8080", "--name", name],
                "securityContext": {"runAsUser": 1000}}]}
        }))
        .unwrap()
    };
    let plain: Api<Pod> = Api::namespaced(client.clone(), "plain");
    let meshed: Api<Pod> = Api::namespaced(client.clone(), "meshed");
    let a = plain
        .create(&PostParams::default(), &pod("unlabelled", json!({})))
        .await
        .unwrap();
    let b = meshed
        .create(
            &PostParams::default(),
            &pod("opted-out", json!({"tandem.dev/inject": "disabled"})),
        )
        .await
        .unwrap();
    let c = meshed
        .create(&PostParams::default(), &pod("meshed", json!({})))
        .await
        .unwrap();
    for created in [&a, &b] {
        let spec = created.spec.as_ref().unwrap();
        assert!(
            spec.init_containers.is_none(),
            "{:?} was injected",
            created.metadata.name
        );
        assert!(
            !created
                .metadata
                .annotations
                .clone()
                .unwrap_or_default()
                .contains_key("tandem.dev/proxy-version")
        );
    }
    assert_eq!(
        c.spec
            .as_ref()
            .unwrap()
            .init_containers
            .as_ref()
            .map(Vec::len),
        Some(2),
        "the control pod is injected"
    );
    // The uninjected pods run as they are: no proxy, the app answers on its own port.
    let a = mesh
        .ready_pods("plain", "app=unlabelled", 1, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        mesh.get(&a[0], 8080, "/").await.unwrap().trim(),
        "unlabelled"
    );
    assert!(
        mesh.get(&a[0], 15020, "/metrics").await.is_err(),
        "no proxy admin port in an uninjected pod"
    );
    mesh.node.shutdown().await;
}
