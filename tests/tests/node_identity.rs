//! The node agent's part of workload identity, as the kubelet plays it:
//!
//! - an injected pod's `tandem-identity-token` volume holds a token for audience `tandem`,
//!   bound to the pod (its name and UID are in the token), and so does the default
//!   ServiceAccount token; the optional `tandem-trust-roots` volume fills in once its ConfigMap
//!   exists. (That tokens are rewritten at 80 % of their lifetime is proved by the unit tests of
//!   `node::tokens`: the apiserver's shortest lifetime is 600 s, too long to wait for here.)
//! - the node-local forwarder carries bytes from inside a pod's namespace, through the gateway
//!   address, to a listener on the machine's loopback (how pods reach the operator's signer).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod e2e_support;

use std::io::{Read as _, Write as _};
use std::net::Ipv4Addr;
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use tandem_crds::identity;
use tandem_tests::node::forward::{self, HostForward};
use tandem_tests::node::net::{self, NodeNetwork};

use e2e_support::{Mesh, SERIAL, TESTAPP_IMAGE, apply_value, eventually};

const NAMESPACE: &str = "ident";

/// The claims of a JWT (its middle part), not verified: the apiserver made it, and what is
/// under test is what was asked for.
fn claims(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("a JWT has three parts");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .expect("the payload is base64url");
    serde_json::from_slice(&bytes).expect("the payload is JSON")
}

/// Reads `file` of a volume once it exists.
async fn volume_file(mesh: &Mesh, uid: &str, volume: &str, file: &str) -> String {
    let path = mesh.node.volume_path(uid, volume).join(file);
    let (text, _) = eventually(
        &format!("{} to be written", path.display()),
        Duration::from_secs(60),
        || {
            let path = path.clone();
            async move { Ok(std::fs::read_to_string(&path).ok()) }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()));
    text
}

/// The token is for `audience`, for ServiceAccount `web`, and bound to `pod`.
fn assert_bound(token: &str, audience: Option<&str>, pod: &Pod) {
    let claims = claims(token);
    if let Some(audience) = audience {
        assert_eq!(claims["aud"], json!([audience]), "{claims:#}");
    }
    assert_eq!(
        claims["sub"],
        format!("system:serviceaccount:{NAMESPACE}:web"),
        "{claims:#}"
    );
    let bound = &claims["kubernetes.io"]["pod"];
    assert_eq!(
        bound["name"],
        pod.metadata.name.clone().unwrap(),
        "{claims:#}"
    );
    assert_eq!(
        bound["uid"],
        pod.metadata.uid.clone().unwrap(),
        "{claims:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control-plane binaries: run by make e2e"]
async fn an_injected_pod_gets_an_audience_bound_pod_token_and_its_trust_roots_once_they_exist() {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::start().await.expect("cluster, Tandem and node start");
    let client = mesh.client();
    tandem_tests::install::ensure_namespace(
        &client,
        NAMESPACE,
        &[("tandem.dev/inject", "enabled")],
    )
    .await
    .unwrap();
    let account = json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "web", "namespace": NAMESPACE}});
    apply_value(&client, &account).await.unwrap();
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": NAMESPACE},
        "spec": {
            "serviceAccountName": "web",
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "web", "image": TESTAPP_IMAGE,
                            "args": ["server", "--listen", "0.0.0.0:8080", "--name", "web"]}],
        }
    }))
    .unwrap();
    // The apiserver may answer before the ServiceAccount cache has the new account: retry.
    let (created, _) = eventually("the pod to be admitted", Duration::from_secs(30), || {
        let (pods, pod) = (pods.clone(), pod.clone());
        async move { Ok(Some(pods.create(&PostParams::default(), &pod).await?)) }
    })
    .await
    .unwrap();
    let uid = created.metadata.uid.clone().unwrap();
    let spec = created.spec.as_ref().unwrap();
    let volumes = spec.volumes.as_ref().unwrap();
    assert!(
        volumes.iter().any(|v| v.name == "tandem-identity-token"),
        "the webhook injected the identity token: {volumes:?}"
    );

    // The signer's token: audience tandem, the lifetime asked for, bound to this pod.
    let token = volume_file(&mesh, &uid, "tandem-identity-token", identity::TOKEN_FILE).await;
    assert_bound(&token, Some(identity::TOKEN_AUDIENCE), &created);
    let claims = claims(&token);
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(lifetime, identity::TOKEN_EXPIRATION_SECONDS, "{claims:#}");

    // The default ServiceAccount token (kube-api-access-*) is bound to the pod as well.
    let access = volumes
        .iter()
        .find(|v| v.name.starts_with("kube-api-access-"))
        .expect("the ServiceAccount admission plugin projects the API token");
    let api_token = volume_file(&mesh, &uid, &access.name, "token").await;
    assert_bound(&api_token, None, &created);

    // The trust roots: an optional ConfigMap volume, filled in once the ConfigMap exists
    // (the operator's signer writes it; without a signer in this cluster, the test does).
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    let roots: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": identity::TRUST_ROOTS_CONFIG_MAP, "namespace": NAMESPACE},
        "data": {identity::TRUST_ROOTS_KEY: "-----BEGIN CERTIFICATE-----\ntest\n-----END CERTIFICATE-----\n"},
    }))
    .unwrap();
    match config_maps.create(&PostParams::default(), &roots).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create the trust roots: {e}"),
    }
    let (written, took) = eventually(
        "the trust roots to reach the pod's volume",
        Duration::from_secs(30),
        || {
            let (config_maps, path) = (
                config_maps.clone(),
                mesh.node
                    .volume_path(&uid, "tandem-trust-roots")
                    .join(identity::TRUST_ROOTS_KEY),
            );
            async move {
                let current = config_maps.get(identity::TRUST_ROOTS_CONFIG_MAP).await?;
                let want = current
                    .data
                    .and_then(|d| d.get(identity::TRUST_ROOTS_KEY).cloned());
                let have = std::fs::read_to_string(&path).ok();
                Ok((have.is_some() && have == want).then_some(have))
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()));
    assert!(written.is_some_and(|pem| pem.contains("BEGIN CERTIFICATE")));
    eprintln!("trust roots in the pod's volume {took:?} after the ConfigMap");
    mesh.node.shutdown().await;
}

/// Removes a pod namespace made by hand, however the test ends.
struct PodNamespace(String);

impl Drop for PodNamespace {
    fn drop(&mut self) {
        let _ = net::ip(&["netns", "delete", &self.0]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: run by make e2e"]
async fn the_node_forwarder_carries_bytes_from_a_pod_namespace_to_a_loopback_listener() {
    net::require_root().unwrap();
    let id = std::process::id();
    let node = NodeNetwork::create(&format!("tandem-fwd-node-{id}")).unwrap();
    let pod_ns = PodNamespace(format!("tandem-fwd-pod-{id}"));
    node.add_pod(
        &pod_ns.0,
        &format!("tvf{id}"),
        Ipv4Addr::new(10, 244, 250, 2),
    )
    .unwrap();

    // An echo server on the machine's loopback, answering each line prefixed.
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let target = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0_u8; 64];
                let n = stream.read(&mut buf).await.unwrap();
                let mut reply = b"host saw: ".to_vec();
                reply.extend_from_slice(&buf[..n]);
                stream.write_all(&reply).await.unwrap();
            });
        }
    });

    // The signer's real port: nothing else listens in a namespace this test just made.
    let forward = HostForward {
        port: identity::SIGNER_PORT,
        target,
    };
    let forwarder = forward::start(&node.path(), forward).unwrap();

    let pod_path = net::netns_path(&pod_ns.0);
    let reply = tokio::task::spawn_blocking(move || {
        let mut stream =
            net::connect_in(&pod_path, forward.listen_addr(), Duration::from_secs(5)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream.write_all(b"hello from the pod").unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        reply
    })
    .await
    .unwrap();
    assert_eq!(reply, "host saw: hello from the pod");

    // The pod cannot reach the loopback listener itself: only the forwarder bridges.
    let pod_path = net::netns_path(&pod_ns.0);
    let direct = tokio::task::spawn_blocking(move || {
        net::connect_in(&pod_path, target, Duration::from_secs(1)).is_err()
    })
    .await
    .unwrap();
    assert!(
        direct,
        "{target} must not be reachable from the pod's namespace"
    );
    forwarder.abort();
    server.abort();
}
