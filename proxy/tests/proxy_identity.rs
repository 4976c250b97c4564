//! The proxy's identity client against a real HTTPS signer on loopback: getting the first
//! certificate, refusals and retries, renewal of short-lived certificates, and the trust-roots
//! file's hot reload.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use support::ca::{Misbehave, TestCa, TestSigner};
use support::{ConfigDir, Proxy, ProxyOptions, config, eventually, temp_dir};
use tandem_crds::identity::SpiffeId;

const WAIT: Duration = Duration::from_secs(20);

/// A signer (root → issuer → leaves), a token file, a kubelet-style trust-roots volume, a
/// config, and a proxy pointed at all of them.
struct Mesh {
    root: TestCa,
    signer: TestSigner,
    id: SpiffeId,
    token: PathBuf,
    roots: ConfigDir,
    _config: ConfigDir,
    proxy: Proxy,
}

impl Mesh {
    /// Everything in order: the proxy's token is accepted and the roots file holds the root.
    async fn start() -> Self {
        Self::start_with(|_, _| {}, None).await
    }

    /// `prepare` runs on the signer (and the token file's path) before the proxy starts;
    /// `roots_pem` replaces the roots file's first contents.
    async fn start_with(
        prepare: impl FnOnce(&TestSigner, &std::path::Path),
        roots_pem: Option<String>,
    ) -> Self {
        let root = TestCa::root("tandem test root");
        let signer = TestSigner::start(root.intermediate("tandem test issuer")).await;
        let id = SpiffeId::new("cluster.local", "test", "web");
        signer.allow("token-web", &id);
        let token = temp_dir("token").join("token");
        std::fs::write(&token, "token-web\n").unwrap();
        prepare(&signer, &token);
        let mut roots = ConfigDir::with_file("roots.pem");
        roots.publish(&roots_pem.unwrap_or_else(|| root.pem.clone()));
        let mut config_dir = ConfigDir::new();
        config_dir.publish(&config("v1", vec![]));
        let mut opts = ProxyOptions::loopback(config_dir.path());
        opts.extra = vec![
            "--identity-addr".into(),
            signer.addr.to_string(),
            "--identity-token".into(),
            token.display().to_string(),
            "--trust-roots".into(),
            roots.path().display().to_string(),
        ];
        let proxy = Proxy::start_with(opts);
        Self {
            root,
            signer,
            id,
            token,
            roots,
            _config: config_dir,
            proxy,
        }
    }

    async fn identity(&self) -> serde_json::Value {
        let (status, body) = self.proxy.admin("/config").await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["identity"].clone()
    }

    /// Waits until `/config`'s identity section satisfies `f`, and returns it.
    async fn wait_identity(
        &self,
        what: &str,
        f: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        let deadline = std::time::Instant::now() + WAIT;
        while std::time::Instant::now() < deadline {
            last = self.identity().await;
            if f(&last) {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for {what}; /config identity: {last:#}");
    }

    /// The value of one series at `/metrics` (the exact name and labels as exposed).
    async fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.proxy.admin("/metrics").await;
        body.lines().find_map(|line| {
            let value = line.strip_prefix(series)?.strip_prefix(' ')?;
            value.trim().parse().ok()
        })
    }
}

fn fingerprint(ca: &TestCa) -> String {
    Sha256::digest(ca.cert.as_ref())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn time(v: &serde_json::Value) -> SystemTime {
    humantime::parse_rfc3339(v.as_str().unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_obtains_a_certificate_for_the_identity_its_token_names() {
    let mesh = Mesh::start().await;
    let identity = mesh
        .wait_identity("a certificate", |v| v["spiffeId"].is_string())
        .await;
    assert_eq!(identity["enabled"], true);
    assert_eq!(identity["spiffeId"], mesh.id.uri());
    assert_eq!(identity["serial"], mesh.signer.issued()[0]);
    assert_eq!(identity["lastError"], serde_json::Value::Null);
    assert_eq!(
        identity["trustRoots"],
        serde_json::json!([fingerprint(&mesh.root)])
    );
    assert!(time(&identity["notAfter"]) > SystemTime::now() + Duration::from_secs(86_000));
    // Renewal is planned for 65–75 % of the 24 h lifetime.
    let next = time(&identity["nextRenewal"]);
    let not_before = time(&identity["notBefore"]);
    let planned = next.duration_since(not_before).unwrap().as_secs_f64() / 86_400.0;
    assert!(
        (0.64..=0.76).contains(&planned),
        "renewal at {planned} of the lifetime"
    );
    // The first CSR carries no identity (none is known yet); the signer ignores it anyway.
    assert_eq!(mesh.signer.csr_uri_sans()[0], Vec::<String>::new());

    eventually("ready", WAIT, async || {
        mesh.proxy.admin("/ready").await.0 == 200
    })
    .await;
    assert_eq!(
        mesh.metric(r#"tandem_identity_renewals_total{result="ok"}"#)
            .await,
        Some(1.0)
    );
    let expiry = mesh
        .metric("tandem_identity_cert_expiry_timestamp_seconds")
        .await
        .unwrap();
    let not_after = time(&identity["notAfter"])
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((expiry - not_after).abs() < 1.0, "{expiry} vs {not_after}");
    assert!(
        mesh.metric("tandem_identity_next_renewal_timestamp_seconds")
            .await
            .unwrap()
            > expiry - 86_400.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_shows_at_config_and_in_metrics_and_is_retried_until_a_good_one_appears() {
    let mesh = Mesh::start_with(
        |_, token| std::fs::write(token, "not-a-known-token").unwrap(),
        None,
    )
    .await;
    let identity = mesh
        .wait_identity("the refusal", |v| v["lastError"].is_object())
        .await;
    assert_eq!(identity["lastError"]["reason"], "unauthenticated");
    assert!(
        identity["lastError"]["message"]
            .as_str()
            .unwrap()
            .contains("Unauthenticated"),
        "{identity:#}"
    );
    assert_eq!(identity["spiffeId"], serde_json::Value::Null);
    let (status, body) = mesh.proxy.admin("/ready").await;
    assert_eq!(
        (status, body.as_str()),
        (503, "not ready: no certificate yet\n")
    );
    assert!(
        mesh.metric(r#"tandem_identity_renewals_total{result="error",reason="unauthenticated"}"#)
            .await
            .unwrap()
            >= 1.0
    );
    // Retried with backoff: a second refusal arrives on its own.
    eventually("a retry", WAIT, async || mesh.signer.requests() >= 2).await;

    // The kubelet rotates the token: the next attempt reads the new one.
    std::fs::write(&mesh.token, "token-web").unwrap();
    let identity = mesh
        .wait_identity("a certificate", |v| v["spiffeId"].is_string())
        .await;
    assert_eq!(identity["spiffeId"], mesh.id.uri());
    assert_eq!(identity["lastError"], serde_json::Value::Null);
    eventually("ready", WAIT, async || {
        mesh.proxy.admin("/ready").await.0 == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_four_second_certificate_is_renewed_with_a_new_key_before_it_expires() {
    let mesh = Mesh::start_with(|signer, _| signer.set_ttl(Duration::from_secs(4)), None).await;
    let pid = mesh.proxy.child.id();
    let first = mesh
        .wait_identity("a certificate", |v| v["serial"].is_string())
        .await;
    let second = mesh
        .wait_identity("a renewed certificate", |v| {
            v["serial"].is_string() && v["serial"] != first["serial"]
        })
        .await;
    let third = mesh
        .wait_identity("a second renewal", |v| {
            v["serial"].is_string()
                && v["serial"] != first["serial"]
                && v["serial"] != second["serial"]
        })
        .await;
    // Each certificate was issued while the one before was still valid.
    for (old, new) in [(&first, &second), (&second, &third)] {
        assert!(
            time(&new["notBefore"]) < time(&old["notAfter"]),
            "renewed after expiry: {old:#} then {new:#}"
        );
        assert_eq!(new["spiffeId"], mesh.id.uri());
    }
    assert_eq!(mesh.proxy.child.id(), pid);
    assert_eq!(mesh.proxy.admin("/ready").await.0, 200);
    // A fresh key each time; renewals name the identity being renewed in the CSR.
    let keys = mesh.signer.csr_keys();
    assert!(keys.len() >= 3);
    assert_ne!(keys[0], keys[1]);
    assert_ne!(keys[1], keys[2]);
    assert_eq!(mesh.signer.csr_uri_sans()[1], vec![mesh.id.uri()]);
    assert!(
        mesh.metric(r#"tandem_identity_renewals_total{result="ok"}"#)
            .await
            .unwrap()
            >= 3.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_roots_file_with_two_roots_is_loaded_and_a_rewritten_file_is_picked_up() {
    let next_root = TestCa::root("tandem next root");
    let mut mesh = Mesh::start().await;
    mesh.roots
        .publish(&format!("{}{}", mesh.root.pem, next_root.pem));
    let both = serde_json::json!([fingerprint(&mesh.root), fingerprint(&next_root)]);
    mesh.wait_identity("two roots", |v| v["trustRoots"] == both)
        .await;

    // A half-written file is refused: the last good bundle stays, the error shows and counts.
    mesh.roots.publish("-----BEGIN CERTIFICATE-----\nMIIB\n");
    let identity = mesh
        .wait_identity("the refusal", |v| v["trustLastError"].is_object())
        .await;
    assert_eq!(identity["trustRoots"], both);
    assert_eq!(
        mesh.metric("tandem_identity_trust_reload_errors_total")
            .await,
        Some(1.0)
    );

    // The rotation ends: only the new root is left.
    mesh.roots.publish(&next_root.pem);
    let identity = mesh
        .wait_identity("the new root alone", |v| {
            v["trustRoots"] == serde_json::json!([fingerprint(&next_root)])
        })
        .await;
    assert_eq!(identity["trustLastError"], serde_json::Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signer_not_under_the_trust_roots_is_unreachable_until_the_roots_are_fixed() {
    let stranger = TestCa::root("somebody else");
    let mut mesh = Mesh::start_with(|_, _| {}, Some(stranger.pem.clone())).await;
    let identity = mesh
        .wait_identity("the refusal", |v| v["lastError"].is_object())
        .await;
    assert_eq!(identity["lastError"]["reason"], "unreachable");
    assert_eq!(
        mesh.signer.requests(),
        0,
        "the request went to an unverified signer"
    );
    assert!(
        mesh.metric(r#"tandem_identity_renewals_total{result="error",reason="unreachable"}"#)
            .await
            .is_some()
    );

    // The right root arrives: the waiting retry is cut short and the certificate follows.
    mesh.roots
        .publish(&format!("{}{}", stranger.pem, mesh.root.pem));
    let identity = mesh
        .wait_identity("a certificate", |v| v["spiffeId"].is_string())
        .await;
    assert_eq!(identity["spiffeId"], mesh.id.uri());
    assert_eq!(mesh.signer.requests(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_key_is_refused_as_a_bad_response() {
    let mesh = Mesh::start_with(|signer, _| signer.misbehave(Misbehave::WrongKey), None).await;
    let identity = mesh
        .wait_identity("the refusal", |v| v["lastError"].is_object())
        .await;
    assert_eq!(identity["lastError"]["reason"], "bad-response");
    assert!(
        identity["lastError"]["message"]
            .as_str()
            .unwrap()
            .contains("different public key"),
        "{identity:#}"
    );
    assert_eq!(identity["spiffeId"], serde_json::Value::Null);
    assert!(
        mesh.metric(r#"tandem_identity_renewals_total{result="error",reason="bad-response"}"#)
            .await
            .is_some()
    );

    mesh.signer.misbehave(Misbehave::No);
    mesh.wait_identity("a certificate", |v| v["spiffeId"].is_string())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signer_refusing_for_another_reason_is_counted_as_refused() {
    let mesh = Mesh::start_with(|signer, _| signer.misbehave(Misbehave::Unavailable), None).await;
    let identity = mesh
        .wait_identity("the refusal", |v| v["lastError"].is_object())
        .await;
    assert_eq!(identity["lastError"]["reason"], "refused");
    assert!(
        identity["lastError"]["message"]
            .as_str()
            .unwrap()
            .contains("503 IssuerUnavailable"),
        "{identity:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_signer_identity_is_off_and_not_required_for_readiness() {
    let mut dir = ConfigDir::new();
    dir.publish(&config("v1", vec![]));
    let proxy = Proxy::start(&dir.path());
    eventually("ready", WAIT, async || proxy.admin("/ready").await.0 == 200).await;
    let (_, body) = proxy.admin("/config").await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["identity"], serde_json::json!({"enabled": false}));
    let (_, metrics) = proxy.admin("/metrics").await;
    assert!(!metrics.contains("tandem_identity_"), "{metrics}");
}

#[test]
fn the_test_ca_fills_an_identity_state_whose_leaf_chains_to_the_root() {
    let root = TestCa::root("root");
    let issuer = root.intermediate("issuer");
    let id = SpiffeId::new("cluster.local", "test", "web");
    let state = support::ca::identity_state(&issuer, &[&root], &id, Duration::from_secs(600));
    let creds = state.credentials().unwrap();
    assert_eq!(creds.id, id);
    assert_eq!(creds.chain.len(), 2);
    assert!(creds.not_after > SystemTime::now());
    let trust = state.trust().unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        trust.roots.clone(),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(
            &creds.chain[0],
            &creds.chain[1..],
            rustls::pki_types::UnixTime::now(),
        )
        .unwrap();
}
