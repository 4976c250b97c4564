//! Scenarios a and g of the local cluster: injection as a user sees it, and mesh traffic
//! through both proxies; pods that must not be injected are not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod e2e_support;

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::json;

use e2e_support::{Mesh, SERIAL, counter, pod_ip, repo};

#[tokio::test]
#[ignore = "needs root and the control-plane binaries: run by make e2e"]
async fn a_labelled_namespace_gets_injected_pods_whose_traffic_crosses_both_proxies() {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::start()
        .await
        .expect("cluster, webhook and node start");
    let started = Instant::now();
    mesh.apply_file(&repo().join("manifests/samples/app.yaml"))
        .await
        .expect("sample app applies");
    // Stands in for the operator (not on main yet): a valid config governing nothing, so every
    // destination passes through the proxies.
    for sa in ["client", "server-v1", "server-v2"] {
        mesh.write_passthrough_config("shop", sa).await.unwrap();
    }
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

    // Endpoints published by the real EndpointSlice controller.
    let slices: Api<EndpointSlice> = Api::namespaced(mesh.client(), "shop");
    let server_ips: Vec<String> = servers
        .iter()
        .map(|p| pod_ip(p).unwrap().to_string())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=server"))
            .await
            .unwrap();
        let mut published: Vec<String> = list
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
            .flat_map(|e| e.addresses.clone())
            .collect();
        published.sort();
        let mut expected = server_ips.clone();
        expected.sort();
        if published == expected {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "endpoints {published:?} != pods {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Traffic: the client calls the server's ClusterIP; both proxies carry it.
    // A window that starts once the endpoints are published: before that the client's early
    // requests had nowhere to go.
    // As in any cluster, published endpoints reach the Service rules a moment later (the node
    // agent's kube-proxy watch); give them two seconds before measuring.
    let client = &clients[0];
    tokio::time::sleep(Duration::from_secs(2)).await;
    mesh.get(client, 9090, "/stats?reset=1").await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stats: serde_json::Value =
        serde_json::from_str(&mesh.get(client, 9090, "/stats").await.unwrap()).unwrap();
    eprintln!("scenario a: client stats {stats}");
    let total = stats["total"].as_u64().unwrap();
    let ok = stats["ok"].as_u64().unwrap();
    assert!(total > 50, "the client sent requests: {stats}");
    assert_eq!(ok, total, "every request succeeded: {stats}");
    // The client's proxy has no config for the server (no operator yet), so it passes the
    // connection through as opaque TCP: connections and bytes, not requests, are its record.
    let client_metrics = mesh.proxy_metrics(client).await.unwrap();
    let outbound = [("direction", "outbound")];
    let connections = counter(&client_metrics, "tandem_tcp_open_total", &outbound);
    let upstream_bytes = counter(&client_metrics, "tandem_tcp_read_bytes", &outbound);
    assert!(
        connections >= 1.0,
        "client proxy relayed no connection:\n{client_metrics}"
    );
    assert!(
        upstream_bytes >= total as f64 * 20.0,
        "client proxy relayed {upstream_bytes} bytes for {total} responses:\n{client_metrics}"
    );
    let mut inbound = 0.0;
    for server in &servers {
        let metrics = mesh.proxy_metrics(server).await.unwrap();
        let n = counter(
            &metrics,
            "tandem_requests_total",
            &[("direction", "inbound")],
        );
        assert!(
            n > 0.0,
            "server proxy {} carried inbound requests:\n{metrics}",
            server.metadata.name.as_deref().unwrap()
        );
        inbound += n;
    }
    assert!(
        inbound >= total as f64 * 0.9,
        "server proxies saw {inbound} inbound requests for {total}"
    );
    eprintln!(
        "scenario a: {total} requests, {ok} ok; client proxy: {connections} outbound connections, {upstream_bytes} bytes from upstream; server proxies: {inbound} inbound requests"
    );

    // Deleting a pod stops it and removes its network namespace.
    let pods: Api<Pod> = Api::namespaced(mesh.client(), "shop");
    let name = client.metadata.name.clone().unwrap();
    pods.delete(&name, &DeleteParams::default()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while pods.get_opt(&name).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "pod {name} was not finalized");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    mesh.node.shutdown().await;
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
