//! The operator against a real control plane (etcd, kube-apiserver, kube-controller-manager on
//! loopback): policies, Services, EndpointSlices and injected pods in; proxy ConfigMaps and
//! policy status out; leader takeover; an apiserver restart.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use support::*;
use tandem_crds::contract::Protocol;
use tandem_crds::v1alpha1::{CircuitBreakerPolicy, TrafficPolicy};

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make test-operator"]
async fn policies_services_endpoints_and_pods_become_configmaps_and_status() {
    let cluster = cluster().await;
    let client = cluster.client();
    let operator = Operator::start(&cluster, "operator-a").await;
    namespace_with_injected_client(&client, "shop").await;
    canary_services(&client, "shop").await;

    // A policy in: the client's ConfigMap carries the split, the policy is Accepted and
    // Programmed for generation 1.
    canary(&client, "shop", "canary", 90, 10).await;
    eventually("the canary in tandem-proxy-client", || async {
        proxy_config(&client, "shop", "client")
            .await
            .is_some_and(|(c, _)| canary_weights(&c) == [90, 10])
    })
    .await;
    let (config, _) = proxy_config(&client, "shop", "client").await.unwrap();
    assert_eq!(config.workload.service_account, "client");
    let names: Vec<&str> = config.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["server", "server-v1", "server-v2"]);
    let v1 = config
        .services
        .iter()
        .find(|s| s.name == "server-v1")
        .unwrap();
    assert_eq!(
        v1.ports[0].endpoints[0].address.to_string(),
        "10.244.0.11:8080"
    );
    assert!(
        !v1.cluster_ips.is_empty(),
        "cluster IPs come from the Service"
    );
    eventually("canary Accepted and Programmed at generation 1", || async {
        traffic_condition(&client, "shop", "canary", "Accepted").await
            == Some(("True".into(), "Accepted".into(), Some(1)))
            && traffic_condition(&client, "shop", "canary", "Programmed")
                .await
                .is_some_and(|(s, _, _)| s == "True")
    })
    .await;

    // A change of the policy reaches the ConfigMap and the status follows the generation.
    canary(&client, "shop", "canary", 50, 50).await;
    eventually("the 50/50 split in tandem-proxy-client", || async {
        proxy_config(&client, "shop", "client")
            .await
            .is_some_and(|(c, _)| canary_weights(&c) == [50, 50])
    })
    .await;
    eventually("observedGeneration 2", || async {
        traffic_condition(&client, "shop", "canary", "Accepted")
            .await
            .is_some_and(|(_, _, g)| g == Some(2))
    })
    .await;

    // A new endpoint reaches the ConfigMap.
    endpoints(
        &client,
        "shop",
        "server-v2",
        8080,
        &["10.244.0.21", "10.244.0.22"],
    )
    .await;
    eventually("the new server-v2 endpoint", || async {
        proxy_config(&client, "shop", "client")
            .await
            .is_some_and(|(c, _)| {
                c.services
                    .iter()
                    .find(|s| s.name == "server-v2")
                    .is_some_and(|s| s.ports[0].endpoints.len() == 2)
            })
    })
    .await;

    // A change nothing governs writes nothing: a pass runs, no ConfigMap is applied.
    let (_, version_before) = proxy_config(&client, "shop", "client").await.unwrap();
    let applies = operator
        .metric("tandem_operator_configmap_applies_total")
        .await;
    let passes = operator.metric("tandem_operator_reconciles_total").await;
    service(
        &client,
        "shop",
        "unrelated",
        json!([{"name": "http", "port": 80}]),
    )
    .await;
    endpoints(&client, "shop", "unrelated", 8080, &["10.244.0.99"]).await;
    eventually("a pass after the unrelated change", || async {
        operator.metric("tandem_operator_reconciles_total").await > passes
    })
    .await;
    assert_eq!(
        operator
            .metric("tandem_operator_configmap_applies_total")
            .await,
        applies
    );
    let (config, version_after) = proxy_config(&client, "shop", "client").await.unwrap();
    assert_eq!(
        version_before, version_after,
        "the ConfigMap was not rewritten"
    );
    assert!(!config.services.iter().any(|s| s.name == "unrelated"));

    // A second policy on the same Service loses to the older one, visibly.
    canary(&client, "shop", "newer", 1, 1).await;
    eventually("the newer policy Conflicted", || async {
        traffic_condition(&client, "shop", "newer", "Accepted")
            .await
            .is_some_and(|(s, r, _)| s == "False" && r == "Conflicted")
    })
    .await;
    let events: Api<Event> = Api::namespaced(client.clone(), "shop");
    eventually("an Event for the conflict", || async {
        events.list(&ListParams::default()).await.is_ok_and(|list| {
            list.items
                .iter()
                .any(|e| e.reason.as_deref() == Some("Conflicted"))
        })
    })
    .await;
    assert_eq!(
        canary_weights(&proxy_config(&client, "shop", "client").await.unwrap().0),
        [50, 50]
    );

    // An invalid policy is refused with a reason and blocks nothing; a circuit breaker on a
    // Service that does not exist is TargetNotFound.
    apply::<TrafficPolicy>(
        &client,
        Some("shop"),
        json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "TrafficPolicy",
            "metadata": {"name": "bad-regex", "namespace": "shop"},
            "spec": {"targetRef": {"name": "server-v1"},
                     "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/a(("}}]}]}
        }),
    )
    .await;
    apply::<CircuitBreakerPolicy>(
        &client,
        Some("shop"),
        json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "CircuitBreakerPolicy",
            "metadata": {"name": "ghost", "namespace": "shop"},
            "spec": {"targetRef": {"name": "ghost"}, "connectionPool": {"maxConnections": 5}}
        }),
    )
    .await;
    apply::<CircuitBreakerPolicy>(
        &client,
        Some("shop"),
        json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "CircuitBreakerPolicy",
            "metadata": {"name": "protect", "namespace": "shop"},
            "spec": {"targetRef": {"name": "server"}, "connectionPool": {"maxConnections": 5}}
        }),
    )
    .await;
    eventually("bad-regex Invalid", || async {
        traffic_condition(&client, "shop", "bad-regex", "Accepted")
            .await
            .is_some_and(|(s, r, _)| s == "False" && r == "Invalid")
    })
    .await;
    eventually("ghost TargetNotFound", || async {
        breaker_condition(&client, "shop", "ghost", "Accepted").await
            == Some(("False".into(), "TargetNotFound".into()))
    })
    .await;
    eventually("the breaker in the config", || async {
        proxy_config(&client, "shop", "client")
            .await
            .is_some_and(|(c, _)| {
                c.services.iter().any(|s| {
                    s.name == "server"
                        && s.circuit_breaker
                            .as_ref()
                            .and_then(|b| b.connection_pool.as_ref())
                            .is_some_and(|p| p.max_connections == 5)
                })
            })
    })
    .await;

    // A second injected ServiceAccount gets its own ConfigMap with the same services.
    apply::<k8s_openapi::api::core::v1::ServiceAccount>(
        &client,
        Some("shop"),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "server", "namespace": "shop"}}),
    )
    .await;
    injected_pod(&client, "shop", "server-1", "server").await;
    eventually("tandem-proxy-server", || async {
        proxy_config(&client, "shop", "server")
            .await
            .is_some_and(|(c, _)| c.workload.service_account == "server" && c.services.len() == 3)
    })
    .await;

    // A Service changes: its port's declared protocol reaches the config.
    service(
        &client,
        "shop",
        "server-v1",
        json!([{"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "kubernetes.io/h2c"}]),
    )
    .await;
    eventually("server-v1 speaks h2c", || async {
        proxy_config(&client, "shop", "client")
            .await
            .is_some_and(|(c, _)| {
                c.services
                    .iter()
                    .find(|s| s.name == "server-v1")
                    .is_some_and(|s| s.ports[0].protocol == Protocol::Http2)
            })
    })
    .await;

    // Endpoints go: the EndpointSlice of server-v2 is deleted, the service stays, empty.
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "shop");
    slices
        .delete("server-v2-test", &DeleteParams::default())
        .await
        .unwrap();
    eventually("server-v2 without endpoints", || async {
        proxy_config(&client, "shop", "client")
            .await
            .is_some_and(|(c, _)| {
                c.services
                    .iter()
                    .find(|s| s.name == "server-v2")
                    .is_some_and(|s| s.ports[0].endpoints.is_empty())
            })
    })
    .await;

    // A policy goes: the circuit breaker leaves the config.
    let breakers: Api<CircuitBreakerPolicy> = Api::namespaced(client.clone(), "shop");
    breakers
        .delete("protect", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the breaker out of the config", || async {
        proxy_config(&client, "shop", "client")
            .await
            .is_some_and(|(c, _)| {
                c.services
                    .iter()
                    .find(|s| s.name == "server")
                    .is_some_and(|s| s.circuit_breaker.is_none())
            })
    })
    .await;

    // The older of two conflicting policies goes: the newer one is Accepted and programmed.
    let traffic: Api<TrafficPolicy> = Api::namespaced(client.clone(), "shop");
    traffic
        .delete("canary", &DeleteParams::default())
        .await
        .unwrap();
    eventually("newer Accepted once canary is gone", || async {
        traffic_condition(&client, "shop", "newer", "Accepted")
            .await
            .is_some_and(|(s, r, _)| s == "True" && r == "Accepted")
    })
    .await;
    eventually("newer's 1/1 split in the config", || async {
        proxy_config(&client, "shop", "client")
            .await
            .is_some_and(|(c, _)| canary_weights(&c) == [1, 1])
    })
    .await;

    // The target goes away: TargetNotFound, and its routes leave the config.
    let services: Api<Service> = Api::namespaced(client.clone(), "shop");
    services
        .delete("server", &DeleteParams::default())
        .await
        .unwrap();
    eventually("newer TargetNotFound", || async {
        traffic_condition(&client, "shop", "newer", "Accepted")
            .await
            .is_some_and(|(s, r, _)| s == "False" && r == "TargetNotFound")
    })
    .await;
    eventually("server out of the config", || async {
        proxy_config(&client, "shop", "client")
            .await
            .is_some_and(|(c, _)| !c.services.iter().any(|s| s.name == "server"))
    })
    .await;

    // The last injected pod of a ServiceAccount goes: its ConfigMap goes too.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    pods.delete("server-1", &DeleteParams::default().grace_period(0))
        .await
        .unwrap();
    eventually("tandem-proxy-server deleted", || async {
        proxy_config(&client, "shop", "server").await.is_none()
    })
    .await;
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");
    assert!(
        config_maps
            .get_opt("tandem-proxy-client")
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(operator.status_of("/readyz").await, Some(200));
    assert_eq!(operator.status_of("/healthz").await, Some(200));
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make test-operator"]
async fn a_new_leader_takes_over_when_the_leader_is_killed() {
    let cluster = cluster().await;
    let client = cluster.client();
    let mut a = Operator::start(&cluster, "operator-a").await;
    let mut b = Operator::start(&cluster, "operator-b").await;
    namespace_with_injected_client(&client, "shop").await;
    canary_services(&client, "shop").await;
    canary(&client, "shop", "canary", 90, 10).await;
    eventually("the canary in tandem-proxy-client", || async {
        proxy_config(&client, "shop", "client")
            .await
            .is_some_and(|(c, _)| canary_weights(&c) == [90, 10])
    })
    .await;
    let holder = lease_holder(&client).await.expect("a leader");
    let (leader, follower) = if holder == a.identity {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert_eq!(follower.metric("tandem_operator_leader").await, 0.0);
    assert_eq!(leader.metric("tandem_operator_leader").await, 1.0);

    // SIGKILL: no chance to release the Lease; the follower must wait for it to expire.
    let pid = leader.process.pid().expect("leader runs");
    kill(Pid::from_raw(i32::try_from(pid).unwrap()), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    canary(&client, "shop", "canary", 0, 100).await;
    let follower_id = follower.identity.clone();
    eventually("the follower holds the Lease", || async {
        lease_holder(&client).await.as_deref() == Some(follower_id.as_str())
    })
    .await;
    let takeover = killed.elapsed();
    eprintln!("takeover after SIGKILL of the leader: {takeover:?}");
    // The bound, from the Lease's timing (8 s valid, read every 2 s: about 12 s at
    // worst), not a speed claim.
    assert!(
        takeover < Duration::from_secs(15),
        "the follower took over after {takeover:?}"
    );
    eventually("the follower wrote the new split", || async {
        proxy_config(&client, "shop", "client")
            .await
            .is_some_and(|(c, _)| canary_weights(&c) == [0, 100])
    })
    .await;
    follower.process.ensure_running().unwrap();

    // A clean shutdown releases the Lease: a fresh replica gets it without waiting it out.
    let c = Operator::start(&cluster, "operator-c").await;
    eventually("operator-c ready", || async {
        c.status_of("/readyz").await == Some(200)
    })
    .await;
    let stopped = Instant::now();
    follower.process.stop();
    eventually("operator-c holds the Lease", || async {
        lease_holder(&client).await.as_deref() == Some("operator-c")
    })
    .await;
    eprintln!(
        "takeover after SIGTERM of the leader: {:?}",
        stopped.elapsed()
    );
    assert!(
        follower_log_released(follower),
        "the stopped leader logged releasing the Lease"
    );
}

fn follower_log_released(operator: &Operator) -> bool {
    operator.log().contains("Released the Lease")
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make test-operator"]
async fn the_operator_rides_out_an_apiserver_outage_and_converges_after_it() {
    let mut cluster = cluster().await;
    let client = cluster.client();
    let mut operator = Operator::start(&cluster, "operator-a").await;
    namespace_with_injected_client(&client, "shop").await;
    canary_services(&client, "shop").await;
    canary(&client, "shop", "canary", 90, 10).await;
    eventually("the canary in tandem-proxy-client", || async {
        proxy_config(&client, "shop", "client")
            .await
            .is_some_and(|(c, _)| canary_weights(&c) == [90, 10])
    })
    .await;

    // Down for longer than the Lease: the leader cannot renew, steps down, and keeps running.
    cluster.stop_apiserver();
    eventually(
        "the leader steps down while the apiserver is away",
        || async { operator.metric("tandem_operator_leader").await == 0.0 },
    )
    .await;
    // The apiserver closes its watches last, as it exits: then they fail and are retried.
    eventually("the watches fail and are retried", || async {
        operator.metric("tandem_operator_watch_errors_total").await >= 1.0
    })
    .await;
    operator.process.ensure_running().unwrap();
    assert_eq!(operator.status_of("/healthz").await, Some(200));

    // Back: it takes the Lease again and converges on what changed.
    cluster.start_apiserver().await.unwrap();
    canary(&client, "shop", "canary", 10, 90).await;
    eventually("the new split after the restart", || async {
        proxy_config(&client, "shop", "client")
            .await
            .is_some_and(|(c, _)| canary_weights(&c) == [10, 90])
    })
    .await;
    operator.process.ensure_running().unwrap();
    assert_eq!(operator.metric("tandem_operator_leader").await, 1.0);
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make test-operator"]
async fn a_restarted_operator_deletes_nothing_before_every_watch_has_listed() {
    let cluster = cluster().await;
    let client = cluster.client();
    let mut first = Operator::start(&cluster, "operator-a").await;
    namespace_with_injected_client(&client, "shop").await;
    apply::<k8s_openapi::api::core::v1::ServiceAccount>(
        &client,
        Some("shop"),
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "worker", "namespace": "shop"}}),
    )
    .await;
    injected_pod(&client, "shop", "worker-1", "worker").await;
    canary_services(&client, "shop").await;
    canary(&client, "shop", "canary", 90, 10).await;
    for sa in ["client", "worker"] {
        eventually(&format!("the canary in tandem-proxy-{sa}"), || async {
            proxy_config(&client, "shop", sa)
                .await
                .is_some_and(|(c, _)| canary_weights(&c) == [90, 10])
        })
        .await;
    }
    eventually("the trust roots in shop", || async {
        config_map_versions(&client, "shop")
            .await
            .contains_key("tandem-trust-roots")
    })
    .await;
    let before = config_map_versions(&client, "shop").await;
    assert_eq!(before.len(), 3, "two proxy configs and the trust roots");
    let deleted = record_deletions(&client, "shop");
    first.process.stop();

    // The replacement may not list pods for now (as after an upgrade whose new watch got ahead
    // of its RBAC): its Pod store stays empty and unsynced. Acting on it would find no
    // injected pod and delete both ConfigMaps.
    let granted = set_pod_rights(&client, false).await;
    let second = Operator::start(&cluster, "operator-b").await;
    eventually(
        "the replacement's pod watch refused three times",
        || async { second.metric("tandem_operator_watch_errors_total").await >= 3.0 },
    )
    .await;
    assert_eq!(
        *deleted.lock().unwrap(),
        Vec::<String>::new(),
        "ConfigMaps deleted by an operator that could not see the pods"
    );
    assert_eq!(config_map_versions(&client, "shop").await, before);
    assert_eq!(second.status_of("/readyz").await, Some(503));
    assert_eq!(second.metric("tandem_operator_reconciles_total").await, 0.0);
    assert_ne!(
        lease_holder(&client).await.as_deref(),
        Some("operator-b"),
        "an unsynced replica does not campaign"
    );

    // Once it can list pods it syncs, leads, finds every ConfigMap as it should be and
    // rewrites none of them; then it follows changes as usual.
    set_pod_rights(&client, granted).await;
    eventually("the replacement ready and leading", || async {
        second.status_of("/readyz").await == Some(200)
            && lease_holder(&client).await.as_deref() == Some("operator-b")
            && second.metric("tandem_operator_reconciles_total").await >= 1.0
    })
    .await;
    assert_eq!(config_map_versions(&client, "shop").await, before);
    assert_eq!(
        second
            .metric("tandem_operator_configmap_applies_total")
            .await,
        0.0,
        "unchanged inputs, no write"
    );
    canary(&client, "shop", "canary", 50, 50).await;
    for sa in ["client", "worker"] {
        eventually(&format!("the new split in tandem-proxy-{sa}"), || async {
            proxy_config(&client, "shop", sa)
                .await
                .is_some_and(|(c, _)| canary_weights(&c) == [50, 50])
        })
        .await;
    }
    assert_eq!(
        second
            .metric("tandem_operator_configmap_deletes_total")
            .await,
        0.0
    );
    assert!(
        deleted.lock().unwrap().is_empty(),
        "no proxy ConfigMap was deleted across the restart"
    );
    let after = config_map_versions(&client, "shop").await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    for (name, (uid, _)) in &before {
        assert_eq!(&after[name].0, uid, "{name} is the same object");
    }
}

// ---------------------------------------------------------------------------------------------
// The reconciler in process, with a hub the test holds (as the config stream holds it)

mod in_process {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::time::Duration;

    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::Client;
    use kube::api::Api;
    use prometheus_client::registry::Registry;
    use tandem_crds::contract::{ConfigSource, ServiceRef};
    use tandem_crds::v1alpha1::TrafficPolicy;
    use tandem_operator::controller::{
        Debounce, LEARNED_ANNOTATION, Reconciler, Stores, start_watches,
    };
    use tandem_operator::hub::{Hub, PodKey};
    use tandem_operator::metrics::Metrics;
    use tandem_operator::render::{Mesh, WorkloadKey};
    use tokio::sync::{Notify, watch};
    use tokio::task::JoinHandle;

    use super::support::*;

    /// A leading reconciler with its own watches, stopped when dropped.
    struct Running {
        hub: Arc<Hub>,
        metrics: Metrics,
        tasks: Vec<JoinHandle<()>>,
        _stop: watch::Sender<bool>,
        _leader: watch::Sender<bool>,
        _authority: watch::Sender<Option<Arc<tandem_operator::ca::Authority>>>,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self._stop.send_replace(true);
            for task in &self.tasks {
                task.abort();
            }
        }
    }

    async fn reconciler(client: &Client) -> Running {
        let trigger = Arc::new(Notify::new());
        let metrics = Metrics::register(&mut Registry::default());
        let (stores, writers) = Stores::new();
        let mut tasks = start_watches(client, writers, &trigger, &metrics);
        stores.wait_until_ready().await.unwrap();
        let hub = Arc::new(Hub::new(trigger.clone(), metrics.stream.clone()));
        let (authority_tx, authority) = watch::channel(None);
        let reconciler = Reconciler::new(
            client.clone(),
            stores,
            metrics.clone(),
            "in-process",
            Mesh::default(),
            authority,
            hub.clone(),
        );
        let (leader_tx, leader) = watch::channel(true);
        let (stop_tx, stop) = watch::channel(false);
        let debounce = Debounce {
            quiet: Duration::from_millis(100),
            ceiling: Duration::from_secs(10),
        };
        tasks.push(tokio::spawn(reconciler.run(
            trigger.clone(),
            debounce,
            leader,
            stop,
        )));
        // The watches' first lists happened before the loop waited: wake it once.
        trigger.notify_one();
        Running {
            hub,
            metrics,
            tasks,
            _stop: stop_tx,
            _leader: leader_tx,
            _authority: authority_tx,
        }
    }

    fn client_workload() -> WorkloadKey {
        WorkloadKey {
            namespace: "shop".into(),
            service_account: "client".into(),
        }
    }

    fn pod(name: &str) -> PodKey {
        PodKey {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    fn has_endpoint(config: &tandem_crds::contract::ProxyConfig, address: &str) -> bool {
        config
            .services
            .iter()
            .filter(|s| s.name == "server-v1")
            .flat_map(|s| &s.ports)
            .flat_map(|p| &p.endpoints)
            .any(|e| e.address.to_string() == address)
    }

    #[tokio::test]
    #[ignore = "needs the control-plane binaries: run by make test-operator"]
    async fn endpoint_churn_writes_no_configmap_while_every_pod_watches() {
        let cluster = cluster().await;
        let client = cluster.client();
        namespace_with_injected_client(&client, "shop").await;
        injected_pod(&client, "shop", "client-2", "client").await;
        canary_services(&client, "shop").await;
        canary(&client, "shop", "canary", 90, 10).await;
        let running = reconciler(&client).await;
        eventually("the canary in tandem-proxy-client", || async {
            proxy_config(&client, "shop", "client")
                .await
                .is_some_and(|(c, _)| canary_weights(&c) == [90, 10])
        })
        .await;
        let first = running.hub.watching(pod("client-1"));
        let second = running.hub.watching(pod("client-2"));
        let (_, resource_version) = proxy_config(&client, "shop", "client").await.unwrap();
        let applies = running.metrics.config_map_applies.get();

        // New endpoints: the hub's view (the stream) has them; the ConfigMap is not written.
        endpoints(
            &client,
            "shop",
            "server-v1",
            8080,
            &["10.244.0.11", "10.244.0.12"],
        )
        .await;
        eventually("the new endpoint in the published view", || async {
            running
                .hub
                .current(&client_workload())
                .is_some_and(|v| has_endpoint(&v.config, "10.244.0.12:8080"))
        })
        .await;
        // Past the next status refresh too (it writes what is due for pods that stopped
        // watching): still nothing written.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (config, unchanged) = proxy_config(&client, "shop", "client").await.unwrap();
        assert_eq!(
            unchanged, resource_version,
            "the ConfigMap was not rewritten"
        );
        assert!(!has_endpoint(&config, "10.244.0.12:8080"));
        assert_eq!(running.metrics.config_map_applies.get(), applies);

        // One pod stops watching: the file catches up, without another change.
        drop(second);
        eventually("the new endpoint in the ConfigMap", || async {
            proxy_config(&client, "shop", "client")
                .await
                .is_some_and(|(c, _)| has_endpoint(&c, "10.244.0.12:8080"))
        })
        .await;
        let written = running.hub.current(&client_workload()).unwrap();
        let (config, _) = proxy_config(&client, "shop", "client").await.unwrap();
        assert_eq!(config.version, written.config.version);
        drop(first);
    }

    #[tokio::test]
    #[ignore = "needs the control-plane binaries: run by make test-operator"]
    async fn a_learned_service_joins_the_view_and_the_configmap_and_survives_a_restart() {
        let cluster = cluster().await;
        let client = cluster.client();
        namespace_with_injected_client(&client, "shop").await;
        canary_services(&client, "shop").await;
        service(
            &client,
            "shop",
            "search",
            serde_json::json!([{"name": "http", "port": 80}]),
        )
        .await;
        let search = ServiceRef {
            name: "search".into(),
            namespace: "shop".into(),
        };
        let running = reconciler(&client).await;
        eventually("tandem-proxy-client", || async {
            proxy_config(&client, "shop", "client").await.is_some()
        })
        .await;
        let (config, _) = proxy_config(&client, "shop", "client").await.unwrap();
        assert!(!config.services.iter().any(|s| s.name == "search"));

        // Discovery resolves the cluster IP and learns it: view, then ConfigMap.
        let services: Api<k8s_openapi::api::core::v1::Service> =
            Api::namespaced(client.clone(), "shop");
        let search_ip: std::net::IpAddr = services
            .get("search")
            .await
            .unwrap()
            .spec
            .unwrap()
            .cluster_ip
            .unwrap()
            .parse()
            .unwrap();
        eventually("discovery resolves search", || async {
            running.hub.resolve((search_ip, 80).into()) == Some(search.clone())
        })
        .await;
        assert!(running.hub.learn(&client_workload(), search.clone()));
        eventually(
            "search in the ConfigMap and its learned annotation",
            || async {
                let api: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");
                let cm = api.get("tandem-proxy-client").await.unwrap();
                let learned = cm
                    .metadata
                    .annotations
                    .unwrap_or_default()
                    .get(LEARNED_ANNOTATION)
                    .cloned();
                learned.as_deref() == Some("shop/search")
                    && proxy_config(&client, "shop", "client")
                        .await
                        .is_some_and(|(c, _)| c.services.iter().any(|s| s.name == "search"))
            },
        )
        .await;
        let (before, resource_version) = proxy_config(&client, "shop", "client").await.unwrap();
        drop(running);

        // A new reconciler (an operator restart) seeds what was learned from the ConfigMap:
        // same content, same version, nothing rewritten.
        let restarted = reconciler(&client).await;
        eventually("the restarted reconciler publishes the view", || async {
            restarted.hub.current(&client_workload()).is_some()
        })
        .await;
        assert_eq!(
            restarted.hub.learned(&client_workload()),
            BTreeSet::from([search])
        );
        let view = restarted.hub.current(&client_workload()).unwrap();
        assert_eq!(view.config.version, before.version);
        let (_, after) = proxy_config(&client, "shop", "client").await.unwrap();
        assert_eq!(after, resource_version);
    }

    #[tokio::test]
    #[ignore = "needs the control-plane binaries: run by make test-operator"]
    async fn status_counts_the_proxies_that_run_the_policys_generation() {
        let cluster = cluster().await;
        let client = cluster.client();
        namespace_with_injected_client(&client, "shop").await;
        injected_pod(&client, "shop", "client-2", "client").await;
        canary_services(&client, "shop").await;
        canary(&client, "shop", "canary", 90, 10).await;
        let running = reconciler(&client).await;
        let policies: Api<TrafficPolicy> = Api::namespaced(client.clone(), "shop");
        let proxies = || async {
            policies
                .get("canary")
                .await
                .ok()
                .and_then(|p| p.status)
                .and_then(|s| s.proxies)
        };
        eventually("0/2 proxies", || async {
            proxies().await.as_deref() == Some("0/2")
        })
        .await;
        let view = running.hub.current(&client_workload()).unwrap();
        running.hub.applied(
            pod("client-1"),
            client_workload(),
            view.config.version.clone(),
            ConfigSource::Stream,
        );
        eventually("1/2 proxies", || async {
            proxies().await.as_deref() == Some("1/2")
        })
        .await;
        let programmed = traffic_condition(&client, "shop", "canary", "Programmed")
            .await
            .unwrap();
        assert_eq!(programmed.0, "True");

        // A new policy generation: the proxy on the old config no longer counts.
        canary(&client, "shop", "canary", 50, 50).await;
        eventually("0/2 proxies at generation 2", || async {
            proxies().await.as_deref() == Some("0/2")
        })
        .await;
    }

    /// `slices` EndpointSlices of 1,000 ready endpoints each behind Service `service`.
    async fn many_endpoints(client: &Client, ns: &str, service: &str, slices: usize) {
        for slice in 0..slices {
            let endpoints: Vec<serde_json::Value> = (0..1000)
                .map(|i| {
                    serde_json::json!({
                        "addresses": [format!("10.{}.{}.{}", 100 + slice, i / 250, i % 250 + 1)],
                        "conditions": {"ready": true}
                    })
                })
                .collect();
            apply::<k8s_openapi::api::discovery::v1::EndpointSlice>(
                client,
                Some(ns),
                serde_json::json!({
                    "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {
                        "name": format!("{service}-{slice}"), "namespace": ns,
                        "labels": {"kubernetes.io/service-name": service,
                                   "endpointslice.kubernetes.io/managed-by": "tandem-test"}
                    },
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": endpoints
                }),
            )
            .await;
        }
    }

    /// Pods are watched through their metadata: a pod from an older webhook (without the
    /// recorded ServiceAccount) is read once and still gets its config; a finished pod no
    /// longer needs one.
    #[tokio::test]
    #[ignore = "needs the control-plane binaries: run by make test-operator"]
    async fn older_pods_are_read_once_and_finished_pods_stop_needing_a_config() {
        let cluster = cluster().await;
        let client = cluster.client();
        namespace_with_injected_client(&client, "shop").await;
        canary_services(&client, "shop").await;
        apply::<k8s_openapi::api::core::v1::ServiceAccount>(
            &client,
            Some("shop"),
            serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
                               "metadata": {"name": "legacy", "namespace": "shop"}}),
        )
        .await;
        let legacy = injected_pod_by_older_webhook(
            "shop",
            "legacy-1",
            "legacy",
            serde_json::json!({}),
            serde_json::json!([]),
        );
        assert!(
            legacy["metadata"]["annotations"]
                .get("tandem.dev/service-account")
                .is_none()
        );
        apply::<k8s_openapi::api::core::v1::Pod>(&client, Some("shop"), legacy).await;
        let _running = reconciler(&client).await;

        eventually(
            "tandem-proxy-legacy for the older webhook's pod",
            || async {
                proxy_config(&client, "shop", "legacy")
                    .await
                    .is_some_and(|(c, _)| c.workload.service_account == "legacy")
            },
        )
        .await;
        eventually("tandem-proxy-client", || async {
            proxy_config(&client, "shop", "client").await.is_some()
        })
        .await;

        // Both pods finish (as the kubelet reports it): their ConfigMaps go.
        let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), "shop");
        for (name, phase) in [("client-1", "Succeeded"), ("legacy-1", "Failed")] {
            pods.patch_status(
                name,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(serde_json::json!({"status": {"phase": phase}})),
            )
            .await
            .unwrap();
        }
        eventually("tandem-proxy-client and -legacy deleted", || async {
            proxy_config(&client, "shop", "client").await.is_none()
                && proxy_config(&client, "shop", "legacy").await.is_none()
        })
        .await;
    }

    #[tokio::test]
    #[ignore = "needs the control-plane binaries: run by make test-operator"]
    async fn a_config_over_the_limit_is_refused_for_its_workload_alone() {
        let cluster = cluster().await;
        let client = cluster.client();
        namespace_with_injected_client(&client, "shop").await;
        canary_services(&client, "shop").await;
        canary(&client, "shop", "canary", 90, 10).await;
        // A gateway that depends on a Service with 30,000 endpoints: well over 1 MiB of config.
        service(
            &client,
            "shop",
            "big",
            serde_json::json!([{"name": "http", "port": 80}]),
        )
        .await;
        many_endpoints(&client, "shop", "big", 30).await;
        apply::<k8s_openapi::api::core::v1::ServiceAccount>(
            &client,
            Some("shop"),
            serde_json::json!({"apiVersion": "v1", "kind": "ServiceAccount",
                               "metadata": {"name": "gateway", "namespace": "shop"}}),
        )
        .await;
        apply::<k8s_openapi::api::core::v1::Pod>(
            &client,
            Some("shop"),
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "gateway-1", "namespace": "shop",
                             "annotations": {"tandem.dev/dependencies": "big",
                                             "tandem.dev/proxy-version": "0.1.0",
                                             "tandem.dev/service-account": "gateway",
                                             "tandem.dev/container-ports": ""}},
                "spec": {
                    "serviceAccountName": "gateway",
                    "automountServiceAccountToken": false,
                    "initContainers": [
                        {"name": "tandem-init", "image": "tandem/proxy:dev"},
                        {"name": "tandem-proxy", "image": "tandem/proxy:dev", "restartPolicy": "Always"}
                    ],
                    "containers": [{"name": "app", "image": "app:dev"}]
                }
            }),
        )
        .await;
        apply::<TrafficPolicy>(
            &client,
            Some("shop"),
            serde_json::json!({
                "apiVersion": "tandem.dev/v1alpha1", "kind": "TrafficPolicy",
                "metadata": {"name": "big-timeout", "namespace": "shop"},
                "spec": {"targetRef": {"kind": "Service", "name": "big"},
                         "rules": [{"name": "all", "timeout": "2s"}]}
            }),
        )
        .await;
        let _running = reconciler(&client).await;

        // The others are written and programmed.
        eventually("the canary in tandem-proxy-client", || async {
            proxy_config(&client, "shop", "client")
                .await
                .is_some_and(|(c, _)| canary_weights(&c) == [90, 10])
        })
        .await;
        eventually("big-timeout ConfigTooLarge naming shop/gateway", || async {
            let api: Api<TrafficPolicy> = Api::namespaced(client.clone(), "shop");
            api.get("big-timeout")
                .await
                .ok()
                .and_then(|p| p.status)
                .is_some_and(|s| {
                    s.conditions.iter().any(|c| {
                        c.type_ == "Programmed"
                            && c.reason == "ConfigTooLarge"
                            && c.message.contains("shop/gateway")
                    })
                })
        })
        .await;
        eventually("canary Programmed", || async {
            traffic_condition(&client, "shop", "canary", "Programmed")
                .await
                .is_some_and(|(s, _, _)| s == "True")
        })
        .await;
        let events: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(client.clone(), "shop");
        eventually(
            "a ConfigTooLarge Event on ServiceAccount gateway",
            || async {
                events.list(&Default::default()).await.is_ok_and(|list| {
                    list.items.iter().any(|e| {
                        e.reason.as_deref() == Some("ConfigTooLarge")
                            && e.regarding.as_ref().and_then(|r| r.kind.as_deref())
                                == Some("ServiceAccount")
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                                == Some("gateway")
                    })
                })
            },
        )
        .await;
        // Refused, not truncated: no ConfigMap for the gateway at all.
        assert!(proxy_config(&client, "shop", "gateway").await.is_none());
    }
}
