//! Tandem installed from `manifests/` as a user would, the webhook running as a local process
//! with its own ServiceAccount's token: the apiserver calls it over TLS on 127.0.0.1 for pods in
//! labelled namespaces, and for no others.

// Helpers outside #[test] functions too: in a test, a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Api, PostParams};
use serde_json::json;
use tandem_crds::names;
use tandem_tests::install::{Tandem, ensure_namespace};
use tandem_tests::{ControlPlane, ControlPlaneOptions};

async fn wait_default_service_account(client: &kube::Client, namespace: &str) {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    for _ in 0..300 {
        if api.get_opt("default").await.unwrap().is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no default ServiceAccount in {namespace}");
}

fn pod(name: &str, annotations: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "tandem-testapp:0.1.0"}]}
    }))
    .unwrap()
}

fn init_container_names(pod: &Pod) -> Vec<String> {
    pod.spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .map(|cs| cs.iter().map(|c| c.name.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make e2e"]
async fn the_apiserver_calls_the_local_webhook_for_labelled_namespaces_only() {
    let cluster = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .unwrap_or_else(|e| panic!("the control plane did not start: {e}"));
    let mut tandem = Tandem::install(&cluster)
        .await
        .unwrap_or_else(|e| panic!("Tandem did not install: {e}"));
    let client = cluster.client();

    ensure_namespace(
        &client,
        "meshed",
        &[(names::INJECT_LABEL, names::INJECT_ENABLED)],
    )
    .await
    .unwrap();
    ensure_namespace(&client, "plain", &[]).await.unwrap();
    wait_default_service_account(&client, "meshed").await;
    wait_default_service_account(&client, "plain").await;

    let meshed: Api<Pod> = Api::namespaced(client.clone(), "meshed");
    let created = meshed
        .create(&PostParams::default(), &pod("app", json!({})))
        .await
        .unwrap_or_else(|e| panic!("create in a labelled namespace: {e}"));
    assert_eq!(
        init_container_names(&created),
        [names::INIT_CONTAINER, names::PROXY_CONTAINER],
        "{created:?}"
    );
    let sidecar = &created
        .spec
        .as_ref()
        .unwrap()
        .init_containers
        .as_ref()
        .unwrap()[1];
    assert_eq!(sidecar.restart_policy.as_deref(), Some("Always"));
    assert_eq!(
        sidecar.image.as_deref(),
        Some(tandem_tests::install::PROXY_IMAGE)
    );
    let annotations = created.metadata.annotations.clone().unwrap_or_default();
    assert!(
        annotations.contains_key(names::PROXY_VERSION_ANNOTATION),
        "{annotations:?}"
    );

    let opted_out = meshed
        .create(
            &PostParams::default(),
            &pod(
                "opted-out",
                json!({names::INJECT_ANNOTATION: names::INJECT_DISABLED}),
            ),
        )
        .await
        .unwrap();
    assert!(init_container_names(&opted_out).is_empty(), "{opted_out:?}");

    let plain: Api<Pod> = Api::namespaced(client.clone(), "plain");
    let untouched = plain
        .create(&PostParams::default(), &pod("app", json!({})))
        .await
        .unwrap();
    assert!(init_container_names(&untouched).is_empty(), "{untouched:?}");

    tandem.ensure_running().unwrap();
}
