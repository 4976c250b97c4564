//! The real apiserver calls the real webhook: pods created in a labelled namespace come back
//! injected, the others untouched.
//!
//! The webhook runs in this process with `--self-signed`, authenticated as its own
//! ServiceAccount with exactly the RBAC of `manifests/webhook/rbac.yaml`: it writes its CA and
//! serving certificate into the Secret and the CA into the MutatingWebhookConfiguration of
//! `manifests/webhook/`, registered here by URL on 127.0.0.1 (the local cluster has no
//! Service network to reach it through).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a panic is the failure report"
)]

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::{ClusterResourceScope, NamespaceResourceScope};
use kube::api::{Api, ListParams, PostParams};
use serde::Deserialize as _;
use serde::de::DeserializeOwned;
use serde_json::json;
use tandem_tests::cluster::client_from_kubeconfig;
use tandem_tests::{ControlPlane, ControlPlaneOptions};
use tandem_webhook::bootstrap::BootstrapConfig;
use tandem_webhook::{CertSource, InjectConfig, Settings};

const SYSTEM: &str = "tandem-system";

fn manifest<T: DeserializeOwned>(file: &str, kind: &str) -> Vec<T> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/webhook")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|document| serde_yaml::Value::deserialize(document).unwrap())
        .filter(|value| value["kind"].as_str() == Some(kind))
        .map(|value| serde_yaml::from_value(value).unwrap())
        .collect()
}

async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    for _ in 0..300 {
        if let Some(value) = check().await {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn create_in<K>(client: &kube::Client, namespace: &str, object: &K) -> K
where
    K: kube::Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    K: Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), namespace);
    api.create(&PostParams::default(), object).await.unwrap()
}

async fn create_cluster<K>(client: &kube::Client, object: &K) -> K
where
    K: kube::Resource<Scope = ClusterResourceScope, DynamicType = ()>,
    K: Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let api: Api<K> = Api::all(client.clone());
    api.create(&PostParams::default(), object).await.unwrap()
}

fn namespace(name: &str, inject: bool) -> Namespace {
    let labels = if inject {
        json!({"tandem.dev/inject": "enabled"})
    } else {
        json!({})
    };
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap()
}

fn pod(labels: serde_json::Value, annotations: serde_json::Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"generateName": "app-", "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "registry.local/app:1"}]}
    }))
    .unwrap()
}

fn init_names(pod: &Pod) -> Vec<String> {
    let spec = pod.spec.as_ref().unwrap();
    spec.init_containers
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect()
}

/// Creates a namespace and waits for its `default` ServiceAccount (pods need it).
async fn namespace_ready(client: &kube::Client, name: &str, inject: bool) {
    create_cluster(client, &namespace(name, inject)).await;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), name);
    eventually("the default ServiceAccount", || async {
        accounts.get_opt("default").await.unwrap().map(|_| ())
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make e2e"]
async fn the_apiserver_injects_pods_through_the_webhook() {
    let cluster = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .unwrap();
    let admin = cluster.client();

    // The webhook's namespace, ServiceAccount and RBAC, from the manifests.
    create_cluster(&admin, &namespace(SYSTEM, false)).await;
    for account in manifest::<ServiceAccount>("rbac.yaml", "ServiceAccount") {
        create_in(&admin, SYSTEM, &account).await;
    }
    create_in(&admin, SYSTEM, &manifest::<Role>("rbac.yaml", "Role")[0]).await;
    create_in(
        &admin,
        SYSTEM,
        &manifest::<RoleBinding>("rbac.yaml", "RoleBinding")[0],
    )
    .await;
    create_cluster(
        &admin,
        &manifest::<ClusterRole>("rbac.yaml", "ClusterRole")[0],
    )
    .await;
    create_cluster(
        &admin,
        &manifest::<ClusterRoleBinding>("rbac.yaml", "ClusterRoleBinding")[0],
    )
    .await;

    // The registration, pointed at the webhook on loopback instead of its Service.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut registration: MutatingWebhookConfiguration = manifest(
        "mutatingwebhookconfiguration.yaml",
        "MutatingWebhookConfiguration",
    )
    .remove(0);
    for webhook in registration.webhooks.iter_mut().flatten() {
        webhook.client_config.service = None;
        webhook.client_config.url = Some(format!("https://127.0.0.1:{port}/mutate"));
    }
    create_cluster(&admin, &registration).await;

    // The webhook, as its ServiceAccount.
    let kubeconfig = cluster.dir().join("tandem-webhook.kubeconfig");
    cluster
        .service_account_kubeconfig(
            SYSTEM,
            "tandem-webhook",
            Duration::from_secs(3600),
            &kubeconfig,
        )
        .await
        .unwrap();
    let webhook_client = client_from_kubeconfig(&std::fs::read_to_string(&kubeconfig).unwrap())
        .await
        .unwrap();
    let settings = Settings {
        listen: listener.local_addr().unwrap(),
        certificates: CertSource::SelfSigned(BootstrapConfig {
            namespace: SYSTEM.into(),
            secret: "tandem-webhook-tls".into(),
            service: "tandem-webhook".into(),
            webhook_configuration: "tandem-webhook".into(),
            extra_names: vec!["127.0.0.1".into()],
            ca_validity: Duration::from_secs(3650 * 86_400),
            cert_validity: Duration::from_secs(90 * 86_400),
            check_interval: Duration::from_secs(3600),
        }),
        max_body_bytes: 4 << 20,
        shutdown_grace: Duration::from_secs(5),
        inject: InjectConfig {
            proxy_image: "registry.local/tandem-proxy:e2e".into(),
            ..InjectConfig::default()
        },
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let webhook = tokio::spawn(tandem_webhook::run_with_client(
        listener,
        settings,
        webhook_client,
        async {
            let _ = stopped.await;
        },
    ));

    // The webhook made its certificates and registered its CA.
    let registrations: Api<MutatingWebhookConfiguration> = Api::all(admin.clone());
    let bundle = eventually("the caBundle", || async {
        let current = registrations.get("tandem-webhook").await.unwrap();
        let webhooks = current.webhooks.unwrap_or_default();
        let bundles: Vec<_> = webhooks
            .iter()
            .filter_map(|w| w.client_config.ca_bundle.clone())
            .collect();
        (bundles.len() == webhooks.len()).then(|| bundles[0].clone())
    })
    .await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), SYSTEM);
    let secret = secrets.get("tandem-webhook-tls").await.unwrap();
    assert_eq!(
        secret.data.unwrap()["ca.crt"],
        bundle,
        "the caBundle is the Secret's CA"
    );

    // A labelled namespace: every pod is injected, unless it opts out.
    namespace_ready(&admin, "shop", true).await;
    let shop: Api<Pod> = Api::namespaced(admin.clone(), "shop");
    let created = eventually("the webhook to answer", || async {
        shop.create(&PostParams::default(), &pod(json!({}), json!({})))
            .await
            .ok()
    })
    .await;
    assert_eq!(init_names(&created), ["tandem-init", "tandem-proxy"]);
    let annotations = created.metadata.annotations.clone().unwrap();
    assert!(
        annotations.contains_key("tandem.dev/proxy-version"),
        "{annotations:?}"
    );
    let volumes = created.spec.as_ref().unwrap().volumes.clone().unwrap();
    let config = volumes.iter().find(|v| v.name == "tandem-config").unwrap();
    assert_eq!(
        config.config_map.as_ref().unwrap().name,
        "tandem-proxy-default"
    );

    let opted_out = shop
        .create(
            &PostParams::default(),
            &pod(json!({}), json!({"tandem.dev/inject": "disabled"})),
        )
        .await
        .unwrap();
    assert!(init_names(&opted_out).is_empty(), "annotated disabled");
    let labelled_out = shop
        .create(
            &PostParams::default(),
            &pod(json!({"tandem.dev/inject": "disabled"}), json!({})),
        )
        .await
        .unwrap();
    assert!(init_names(&labelled_out).is_empty(), "labelled disabled");

    // A dry run is injected in the answer and stored nowhere.
    let before = shop.list(&ListParams::default()).await.unwrap().items.len();
    let dry = shop
        .create(
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &pod(json!({}), json!({})),
        )
        .await
        .unwrap();
    assert_eq!(init_names(&dry), ["tandem-init", "tandem-proxy"]);
    assert_eq!(
        shop.list(&ListParams::default()).await.unwrap().items.len(),
        before
    );

    // Another namespace: only pods labelled to opt in.
    namespace_ready(&admin, "jobs", false).await;
    let jobs: Api<Pod> = Api::namespaced(admin.clone(), "jobs");
    let plain = jobs
        .create(&PostParams::default(), &pod(json!({}), json!({})))
        .await
        .unwrap();
    assert!(
        init_names(&plain).is_empty(),
        "unlabelled pod in an unlabelled namespace"
    );
    let annotated = jobs
        .create(
            &PostParams::default(),
            &pod(json!({}), json!({"tandem.dev/inject": "enabled"})),
        )
        .await
        .unwrap();
    assert!(
        init_names(&annotated).is_empty(),
        "the annotation cannot opt in: only labels select"
    );
    let labelled = jobs
        .create(
            &PostParams::default(),
            &pod(json!({"tandem.dev/inject": "enabled"}), json!({})),
        )
        .await
        .unwrap();
    assert_eq!(init_names(&labelled), ["tandem-init", "tandem-proxy"]);

    let _ = stop.send(());
    webhook.await.unwrap().unwrap();
}
