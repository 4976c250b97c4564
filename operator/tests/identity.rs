//! Workload identity against a real apiserver: the issuer Secret, the signer over HTTPS with
//! real projected tokens (TokenRequest, TokenReview), and the trust roots ConfigMap.
// Helpers outside #[test] functions too: in a test, a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, ServiceAccount};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use rcgen::{CertificateParams, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::json;
use support::*;
use tandem_crds::contract::MtlsMode;
use tandem_crds::identity::{
    CertifyError, CertifyRequest, CertifyResponse, ISSUER_ROOTS_KEY, ISSUER_SECRET,
    TRUST_ROOTS_CONFIG_MAP, TRUST_ROOTS_KEY, signer_dns_name,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

async fn issuer_secret(client: &Client) -> Option<Secret> {
    let api: Api<Secret> = Api::namespaced(client.clone(), "tandem-system");
    api.get_opt(ISSUER_SECRET)
        .await
        .expect("read the issuer Secret")
}

async fn wait_for_issuer(client: &Client) -> Secret {
    eventually("the issuer Secret", || async {
        issuer_secret(client).await.is_some()
    })
    .await;
    issuer_secret(client).await.expect("issuer Secret")
}

/// `roots.pem` of the trust roots ConfigMap in `ns`, if there is one.
async fn trust_roots_in(client: &Client, ns: &str) -> Option<String> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let config_map = api.get_opt(TRUST_ROOTS_CONFIG_MAP).await.ok()??;
    config_map.data?.remove(TRUST_ROOTS_KEY)
}

fn roots_of(secret: &Secret) -> String {
    let bytes = &secret.data.as_ref().expect("data")[ISSUER_ROOTS_KEY].0;
    String::from_utf8(bytes.clone()).expect("PEM")
}

/// Merge-patches the object `name` through `api`; `what` says which step failed.
async fn merge_patch<K>(api: &Api<K>, name: &str, patch: serde_json::Value, what: &str)
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect(what);
}

/// Waits for an Event in `ns` with `reason` about the object `name`.
async fn eventually_an_event(client: &Client, ns: &str, reason: &str, name: &str) {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    eventually(&format!("a {reason} Event on {ns}/{name}"), || async {
        events
            .list(&kube::api::ListParams::default())
            .await
            .is_ok_and(|list| {
                list.items.iter().any(|e| {
                    e.reason.as_deref() == Some(reason)
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                })
            })
    })
    .await;
}

/// A CSR for a fresh key that asks to be the apiserver and a cluster admin.
fn greedy_csr() -> String {
    let key = KeyPair::generate().expect("key");
    let mut params =
        CertificateParams::new(vec!["kubernetes.default.svc".to_owned()]).expect("params");
    params.subject_alt_names.push(SanType::URI(
        "spiffe://cluster.local/ns/kube-system/sa/admin"
            .try_into()
            .expect("uri"),
    ));
    params
        .serialize_request(&key)
        .expect("CSR")
        .pem()
        .expect("PEM")
}

/// `POST /v1/certify` over TLS to the signer on 127.0.0.1:`port`, verifying its certificate
/// against `roots_pem` for the signer's DNS name, as a proxy does. Returns status and body.
async fn certify(port: u16, roots_pem: &str, bearer: &str, csr: &str) -> (u16, String) {
    let mut roots = rustls::RootCertStore::empty();
    for root in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(root.expect("root")).expect("add root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the signer");
    let name = ServerName::try_from(signer_dns_name()).expect("server name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .expect("TLS handshake, the signer verified against the trust roots");
    let body = serde_json::to_string(&CertifyRequest {
        csr: csr.to_owned(),
    })
    .expect("body");
    let request = format!(
        "POST /v1/certify HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {bearer}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        signer_dns_name(),
        body.len()
    );
    tls.write_all(request.as_bytes()).await.expect("send");
    let mut response = Vec::new();
    // The server may close without close_notify; what was read is the answer.
    let _ = tls.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, body.to_owned())
}

/// Waits until the signer on `port` completes a TLS handshake (it serves once the issuer is
/// loaded), then certifies.
async fn certify_when_up(port: u16, roots_pem: &str, bearer: &str, csr: &str) -> (u16, String) {
    eventually("the signer accepting connections", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    // Connected is not yet serving: the certificate follows the issuer by a moment.
    for _ in 0..50 {
        let attempt = tokio::time::timeout(
            Duration::from_secs(5),
            certify(port, roots_pem, bearer, csr),
        )
        .await;
        if let Ok(answer) = attempt {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    certify(port, roots_pem, bearer, csr).await
}

fn sans(chain_pem: &str) -> Vec<String> {
    let leaf = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .expect("a leaf")
        .expect("PEM");
    let (_, cert) = X509Certificate::from_der(&leaf).expect("X.509");
    let san = cert
        .subject_alternative_name()
        .expect("SAN extension")
        .expect("SANs");
    san.value
        .general_names
        .iter()
        .map(|name| match name {
            GeneralName::URI(uri) => format!("uri:{uri}"),
            GeneralName::DNSName(dns) => format!("dns:{dns}"),
            other => format!("other:{other:?}"),
        })
        .collect()
}

/// What most scenarios start from: a control plane, one operator, its issuer's roots, and an
/// injected pod `shop/web-1` running as ServiceAccount `web`.
struct Scene {
    cluster: tandem_tests::ControlPlane,
    client: Client,
    operator: Operator,
    roots: String,
    pod: Pod,
}

async fn scene() -> Scene {
    let cluster = cluster().await;
    let client = cluster.client();
    let operator = Operator::start(&cluster, "op").await;
    let roots = roots_of(&wait_for_issuer(&client).await);
    let pod = namespace_with_injected_pod(&client, "shop", "web", "web-1").await;
    Scene {
        cluster,
        client,
        operator,
        roots,
        pod,
    }
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make test-operator"]
async fn two_replicas_make_one_issuer_secret_which_survives_a_restart_and_both_sign() {
    let cluster = cluster().await;
    let client = cluster.client();
    // Two replicas start at once and race to create the Secret.
    let mut a = Operator::start(&cluster, "op-a").await;
    let b = Operator::start(&cluster, "op-b").await;
    let secret = wait_for_issuer(&client).await;
    let roots = roots_of(&secret);
    let created = secret.metadata.resource_version.clone();

    let pod = namespace_with_injected_pod(&client, "shop", "web", "web-1").await;
    let bearer = token(&client, "shop", "web", "tandem", Some(&pod)).await;
    for operator in [&a, &b] {
        let (status, body) =
            certify_when_up(operator.identity_port, &roots, &bearer, &greedy_csr()).await;
        assert_eq!(status, 200, "{} answered {body}", operator.identity);
    }
    assert_eq!(
        issuer_secret(&client)
            .await
            .expect("Secret")
            .metadata
            .resource_version,
        created,
        "nobody rewrote the Secret"
    );
    eventually("a's issued counter", || async {
        a.metric("tandem_identity_certificates_issued_total").await == 1.0
    })
    .await;
    assert!(
        a.metric("tandem_identity_issuer_expiry_timestamp_seconds")
            .await
            > 1.7e9
    );

    // A restarted replica loads the same Secret; it does not make a new one.
    a.process.stop();
    let a = Operator::start(&cluster, "op-a2").await;
    let (status, body) = certify_when_up(a.identity_port, &roots, &bearer, &greedy_csr()).await;
    assert_eq!(status, 200, "{body}");
    let after = issuer_secret(&client).await.expect("Secret");
    assert_eq!(after.metadata.resource_version, created);
    assert_eq!(roots_of(&after), roots);
    assert!(
        !a.log().contains("Created the identity issuer Secret"),
        "the restarted replica made a new CA"
    );
    drop(b);
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make test-operator"]
async fn a_projected_token_gets_a_certificate_for_its_service_account_whatever_the_csr_asks() {
    // The cluster is bound first, so it is dropped last.
    let Scene {
        cluster: _cluster,
        client,
        operator,
        roots,
        pod,
    } = scene().await;

    let bearer = token(&client, "shop", "web", "tandem", Some(&pod)).await;
    let (status, body) =
        certify_when_up(operator.identity_port, &roots, &bearer, &greedy_csr()).await;
    assert_eq!(status, 200, "{body}");
    let response: CertifyResponse = serde_json::from_str(&body).expect("CertifyResponse");
    assert_eq!(response.identity, "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(
        sans(&response.certificate_chain),
        [
            "uri:spiffe://cluster.local/ns/shop/sa/web",
            "dns:web.shop.sa.cluster.local"
        ]
    );
    assert_eq!(
        CertificateDer::pem_slice_iter(response.certificate_chain.as_bytes()).count(),
        2,
        "leaf and issuer"
    );
    let lifetime =
        response.not_after_unix as i64 - time::OffsetDateTime::now_utc().unix_timestamp();
    assert!(
        (86_000..=86_400).contains(&lifetime),
        "24 h, got {lifetime} s"
    );

    // A token that is not bound to a pod (TokenRequest without boundObjectRef) also works:
    // the ServiceAccount is the identity.
    let unbound = token(&client, "shop", "web", "tandem", None).await;
    let (status, body) = certify(operator.identity_port, &roots, &unbound, &greedy_csr()).await;
    assert_eq!(status, 200, "{body}");
    assert!(operator.log().contains("Issued a certificate"));
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make test-operator"]
async fn tokens_for_another_audience_garbage_and_a_deleted_pods_are_refused() {
    // The cluster is bound first, so it is dropped last.
    let Scene {
        cluster: _cluster,
        client,
        operator,
        roots,
        pod,
    } = scene().await;

    let refusal = |body: &str| -> String {
        serde_json::from_str::<CertifyError>(body)
            .unwrap_or_else(|e| panic!("{e}: {body}"))
            .reason
    };

    let apiserver_token = token(
        &client,
        "shop",
        "web",
        "https://kubernetes.default.svc",
        Some(&pod),
    )
    .await;
    let (status, body) = certify_when_up(
        operator.identity_port,
        &roots,
        &apiserver_token,
        &greedy_csr(),
    )
    .await;
    assert_eq!(
        (status, refusal(&body).as_str()),
        (403, "WrongAudience"),
        "{body}"
    );

    let (status, body) =
        certify(operator.identity_port, &roots, "not-a-token", &greedy_csr()).await;
    assert_eq!(
        (status, refusal(&body).as_str()),
        (401, "Unauthenticated"),
        "{body}"
    );

    let good = token(&client, "shop", "web", "tandem", Some(&pod)).await;
    let (status, body) = certify(operator.identity_port, &roots, &good, "no CSR").await;
    assert_eq!((status, refusal(&body).as_str()), (400, "BadCsr"), "{body}");

    // The pod goes; its token must not sign anything any more (the apiserver itself stops
    // authenticating a token bound to a deleted pod; the signer checks the pod as well).
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    pods.delete("web-1", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete the pod");
    eventually("the pod gone", || async {
        pods.get_opt("web-1").await.expect("read pod").is_none()
    })
    .await;
    let (status, body) = certify(operator.identity_port, &roots, &good, &greedy_csr()).await;
    let reason = refusal(&body);
    assert!(
        (status, reason.as_str()) == (401, "Unauthenticated")
            || (status, reason.as_str()) == (403, "PodNotFound"),
        "{status} {body}"
    );
    eventually("the refusals counted by reason", || async {
        operator
            .metric("tandem_identity_certify_refused_total{reason=\"WrongAudience\"}")
            .await
            == 1.0
            && operator
                .metric("tandem_identity_certify_refused_total{reason=\"BadCsr\"}")
                .await
                == 1.0
    })
    .await;
    assert_eq!(
        operator
            .metric("tandem_identity_certificates_issued_total")
            .await,
        0.0
    );
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make test-operator"]
async fn the_trust_roots_and_the_mtls_mode_reach_a_namespace_with_injected_pods_and_a_bad_mode_is_reported()
 {
    let cluster = cluster().await;
    let client = cluster.client();
    let _operator = Operator::start(&cluster, "op").await;
    let roots = roots_of(&wait_for_issuer(&client).await);
    namespace_with_injected_client(&client, "shop").await;

    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), "shop");
    eventually("tandem-trust-roots in shop", || async {
        trust_roots_in(&client, "shop").await.as_ref() == Some(&roots)
    })
    .await;

    // strict on the namespace reaches the workload's config.
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    merge_patch(
        &namespaces,
        "shop",
        json!({"metadata": {"annotations": {"tandem.dev/mtls": "strict"}}}),
        "annotate the namespace",
    )
    .await;
    eventually("the client's config in strict mode", || async {
        proxy_config(&client, "shop", "client")
            .await
            .is_some_and(|(config, _)| config.workload.mtls == MtlsMode::Strict)
    })
    .await;

    // A value that is not a mode is ignored (the namespace's strict still holds) and an Event
    // on the ServiceAccount says why.
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "shop");
    merge_patch(
        &accounts,
        "client",
        json!({"metadata": {"annotations": {"tandem.dev/mtls": "bogus"}}}),
        "annotate the ServiceAccount",
    )
    .await;
    eventually_an_event(&client, "shop", "InvalidMtlsMode", "client").await;
    let (config, _) = proxy_config(&client, "shop", "client")
        .await
        .expect("the client's config");
    assert_eq!(config.workload.mtls, MtlsMode::Strict);

    // With no injected pod left, the roots go as the proxy config does.
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    pods.delete("client-1", &DeleteParams::default().grace_period(0))
        .await
        .expect("delete the pod");
    eventually("tandem-trust-roots removed from shop", || async {
        config_maps
            .get_opt(TRUST_ROOTS_CONFIG_MAP)
            .await
            .is_ok_and(|cm| cm.is_none())
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make test-operator"]
async fn a_rotated_issuer_secret_is_used_at_once_and_an_unusable_one_is_refused_with_an_event() {
    // The cluster is bound first, so it is dropped last.
    let Scene {
        cluster: _cluster,
        client,
        operator,
        roots: old_roots,
        pod,
    } = scene().await;
    let bearer = token(&client, "shop", "web", "tandem", Some(&pod)).await;
    let (status, body) =
        certify_when_up(operator.identity_port, &old_roots, &bearer, &greedy_csr()).await;
    assert_eq!(status, 200, "{body}");

    // Steps 1 and 3 of the rotation at once: both roots trusted, the issuer under the new one.
    let next = tandem_operator::ca::generate(time::OffsetDateTime::now_utc()).expect("new CA");
    let overlap = format!("{old_roots}{}", next.roots_pem);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "tandem-system");
    let data = |cert: &str, key: &str, roots: &str| json!({"stringData": {"tls.crt": cert, "tls.key": key, "ca.crt": roots}});
    merge_patch(
        &secrets,
        ISSUER_SECRET,
        data(&next.cert_pem, &next.key_pem, &overlap),
        "rotate the issuer",
    )
    .await;

    eventually("both roots in tandem-trust-roots", || async {
        trust_roots_in(&client, "shop").await.as_ref() == Some(&overlap)
    })
    .await;
    // The signer now serves, and signs, under the new root alone, without a restart.
    let mut answer = (0, String::new());
    for _ in 0..50 {
        answer = tokio::time::timeout(
            Duration::from_secs(5),
            certify(
                operator.identity_port,
                &next.roots_pem,
                &bearer,
                &greedy_csr(),
            ),
        )
        .await
        .unwrap_or_default();
        if answer.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(answer.0, 200, "{}", answer.1);
    let response: CertifyResponse = serde_json::from_str(&answer.1).expect("CertifyResponse");
    let issuer_in_chain = CertificateDer::pem_slice_iter(response.certificate_chain.as_bytes())
        .nth(1)
        .expect("issuer")
        .expect("PEM");
    let next_issuer = CertificateDer::from_pem_slice(next.cert_pem.as_bytes()).expect("PEM");
    assert_eq!(issuer_in_chain, next_issuer, "signed by the new issuer");

    // A key that is not the certificate's: refused, said in an Event, the last good one signs.
    let other = tandem_operator::ca::generate(time::OffsetDateTime::now_utc()).expect("CA");
    merge_patch(
        &secrets,
        ISSUER_SECRET,
        data(&next.cert_pem, &other.key_pem, &overlap),
        "break the issuer",
    )
    .await;
    eventually_an_event(&client, "tandem-system", "IssuerInvalid", ISSUER_SECRET).await;
    let (status, body) = certify(
        operator.identity_port,
        &next.roots_pem,
        &bearer,
        &greedy_csr(),
    )
    .await;
    assert_eq!(status, 200, "the last good issuer keeps signing: {body}");
}
