//! The local control plane behaves like a real cluster: authenticated, authorised with RBAC,
//! controllers running, ServiceAccount tokens accepted.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, ServiceAccount};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;
use tandem_tests::cluster::client_from_kubeconfig;
use tandem_tests::{ControlPlane, ControlPlaneOptions};

async fn start() -> ControlPlane {
    ControlPlane::start(ControlPlaneOptions::default())
        .await
        .expect("control plane starts")
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make e2e"]
async fn the_apiserver_reports_the_pinned_release() {
    let cluster = start().await;
    let version = cluster.client().apiserver_version().await.unwrap();
    let pinned = include_str!("../k8s/KUBE_VERSION").trim();
    assert_eq!(version.git_version, format!("v{pinned}"));
    eprintln!("control plane started in {:?}", cluster.started_in());
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make e2e"]
async fn controllers_create_service_accounts_and_collect_garbage_and_namespaces() {
    let cluster = start().await;
    let client = cluster.client();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "gc-check"}})).unwrap();
    namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();

    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), "gc-check");
    eventually("the default ServiceAccount in a new namespace", || async {
        sas.get_opt("default").await.unwrap().is_some()
    })
    .await;

    // A ConfigMap owned by another is deleted with its owner by the garbage collector.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "gc-check");
    let owner = cms
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "owner"}})).unwrap(),
        )
        .await
        .unwrap();
    let uid = owner.metadata.uid.unwrap();
    let child: ConfigMap = serde_json::from_value(json!({"metadata": {
        "name": "child",
        "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]
    }}))
    .unwrap();
    cms.create(&PostParams::default(), &child).await.unwrap();
    cms.delete("owner", &DeleteParams::default()).await.unwrap();
    eventually("the garbage collector to delete the child", || async {
        cms.get_opt("child").await.unwrap().is_none()
    })
    .await;

    namespaces
        .delete("gc-check", &DeleteParams::default())
        .await
        .unwrap();
    eventually("namespace deletion to finish", || async {
        namespaces.get_opt("gc-check").await.unwrap().is_none()
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make e2e"]
async fn a_service_account_kubeconfig_has_only_the_rights_rbac_grants() {
    let cluster = start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("default.kubeconfig");
    cluster
        .service_account_kubeconfig("default", "default", Duration::from_secs(3600), &path)
        .await
        .unwrap();
    let yaml = std::fs::read_to_string(&path).unwrap();
    let client = client_from_kubeconfig(&yaml).await.unwrap();

    // Authenticated: discovery is open to every authenticated user.
    client.apiserver_version().await.unwrap();
    // Not authorised: the default ServiceAccount has no RBAC grants.
    let err = Api::<ConfigMap>::namespaced(client, "kube-system")
        .list(&Default::default())
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(status) => assert_eq!(status.code, 403, "{status:?}"),
        other => panic!("expected 403, got {other}"),
    }
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make e2e"]
async fn a_new_node_is_given_a_pod_cidr() {
    let cluster = start().await;
    let nodes: Api<Node> = Api::all(cluster.client());
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "cidr-check"}})).unwrap();
    nodes.create(&PostParams::default(), &node).await.unwrap();
    eventually(
        "the node IPAM controller to assign spec.podCIDR",
        || async {
            let node = nodes.get("cidr-check").await.unwrap();
            node.spec.and_then(|s| s.pod_cidr).is_some()
        },
    )
    .await;
    let cidr = nodes
        .get("cidr-check")
        .await
        .unwrap()
        .spec
        .unwrap()
        .pod_cidr
        .unwrap();
    assert!(cidr.starts_with("10.244."), "{cidr}");
    assert!(cidr.ends_with("/24"), "{cidr}");
}
