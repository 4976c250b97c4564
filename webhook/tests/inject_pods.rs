//! Golden tests on real AdmissionReview documents (`tests/fixtures/<case>.json`, shaped as the
//! apiserver sends them, defaults and all). Each injected case compares the patch with
//! `<case>.patch.json`, applies it to the pod exactly as the apiserver would, and checks the
//! resulting pod. Run with `TANDEM_BLESS=1` to rewrite the golden patches after a deliberate
//! change, and review the diff.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test helpers: a panic is the failure report"
)]

use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Container, Pod, Volume};
use serde_json::Value;
use tandem_crds::identity;
use tandem_webhook::InjectConfig;
use tandem_webhook::admission::{Outcome, review};
use tandem_webhook::config::IdentityConfig;

fn config() -> InjectConfig {
    InjectConfig {
        proxy_image: "registry.local/tandem-proxy:0.1.0".into(),
        proxy_version: "0.1.0".into(),
        image_pull_policy: Some("IfNotPresent".into()),
        identity: Some(IdentityConfig::default()),
        ..InjectConfig::default()
    }
}

/// [`config`] with identity turned off (`--identity-addr=`).
fn identity_off() -> InjectConfig {
    InjectConfig {
        identity: None,
        ..config()
    }
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// What the webhook answered for one fixture, as it goes over the wire.
struct Answer {
    request: Value,
    response: Value,
    outcome: Outcome,
}

impl Answer {
    fn for_fixture(case: &str) -> Self {
        Self::for_fixture_with(case, &config())
    }

    fn for_fixture_with(case: &str, config: &InjectConfig) -> Self {
        let body = std::fs::read(fixture(&format!("{case}.json"))).unwrap();
        Self::for_body(&body, config)
    }

    fn for_body(body: &[u8], config: &InjectConfig) -> Self {
        let reviewed = review(body, config);
        let wire: Value = serde_json::to_value(&reviewed.review).unwrap();
        assert_eq!(wire["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(wire["kind"], "AdmissionReview");
        let request: Value = serde_json::from_slice(body).unwrap();
        assert_eq!(
            wire["response"]["uid"], request["request"]["uid"],
            "the uid is echoed"
        );
        Self {
            request,
            response: wire["response"].clone(),
            outcome: reviewed.outcome,
        }
    }

    fn allowed(&self) -> bool {
        self.response["allowed"] == Value::Bool(true)
    }

    /// The RFC 6902 patch, decoded from the response.
    fn patch(&self) -> Option<json_patch::Patch> {
        let bytes: Vec<u8> = serde_json::from_value(self.response.get("patch")?.clone()).unwrap();
        assert_eq!(self.response["patchType"], "JSONPatch");
        Some(serde_json::from_slice(&bytes).unwrap())
    }

    fn original(&self) -> Pod {
        serde_json::from_value(self.request["request"]["object"].clone()).unwrap()
    }

    /// The pod after the patch, applied to the JSON the apiserver sent (not to our typed
    /// reading of it), as the apiserver applies it.
    fn patched(&self) -> Pod {
        let mut object = self.request["request"]["object"].clone();
        json_patch::patch(&mut object, &self.patch().expect("a patch")).unwrap();
        serde_json::from_value(object).unwrap()
    }
}

/// Compares the patch with the golden file `<golden>.patch.json`, or writes it under
/// `TANDEM_BLESS`.
fn assert_golden_patch(golden: &str, answer: &Answer) {
    let patch = serde_json::to_string_pretty(&answer.patch().expect("a patch")).unwrap() + "\n";
    let path = fixture(&format!("{golden}.patch.json"));
    if std::env::var_os("TANDEM_BLESS").is_some() {
        std::fs::write(&path, &patch).unwrap();
    }
    let golden = std::fs::read_to_string(&path)
        .unwrap_or_else(|_| panic!("{} is missing: run with TANDEM_BLESS=1", path.display()));
    assert_eq!(
        patch,
        golden,
        "the patch for {golden} differs from {}",
        path.display()
    );
}

fn names(containers: &Option<Vec<Container>>) -> Vec<&str> {
    containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect()
}

fn init_container<'a>(pod: &'a Pod, name: &str) -> &'a Container {
    let spec = pod.spec.as_ref().unwrap();
    spec.init_containers
        .iter()
        .flatten()
        .find(|c| c.name == name)
        .unwrap()
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

/// What every injected pod has, whatever it started as.
fn assert_injected(case: &str) -> (Pod, Pod) {
    assert_injected_with(case, case, &config())
}

/// [`assert_injected`] under `config`, against golden file `<golden>.patch.json`.
fn assert_injected_with(case: &str, golden: &str, config: &InjectConfig) -> (Pod, Pod) {
    let answer = Answer::for_fixture_with(case, config);
    assert_eq!(answer.outcome, Outcome::Injected, "{case}");
    assert!(answer.allowed());
    assert_golden_patch(golden, &answer);
    let (before, after) = (answer.original(), answer.patched());
    let (spec_before, spec) = (before.spec.as_ref().unwrap(), after.spec.as_ref().unwrap());

    // tandem-init, then the proxy as a native sidecar, then the pod's own init containers.
    let mut expected = vec!["tandem-init", "tandem-proxy"];
    expected.extend(names(&spec_before.init_containers));
    assert_eq!(names(&spec.init_containers), expected, "{case}");
    assert_eq!(
        spec.containers, spec_before.containers,
        "{case}: app containers untouched"
    );

    let init = init_container(&after, "tandem-init");
    let init_security = init.security_context.as_ref().unwrap();
    let caps = init_security.capabilities.as_ref().unwrap();
    assert_eq!(
        caps.add.as_deref(),
        Some(&["NET_ADMIN".to_owned(), "NET_RAW".to_owned()][..])
    );
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(init_security.allow_privilege_escalation, Some(false));
    assert_eq!(
        init.command.as_deref(),
        Some(&["tandem-proxy".to_owned()][..])
    );
    let args = init.args.as_ref().unwrap();
    assert_eq!(args[0], "init");
    assert!(args.contains(&"--proxy-uid=2102".to_owned()), "{args:?}");

    let proxy = init_container(&after, "tandem-proxy");
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    let startup = proxy
        .startup_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(startup.path.as_deref(), Some("/ready"));
    let live = proxy
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(live.path.as_deref(), Some("/live"));
    let security = proxy.security_context.as_ref().unwrap();
    assert_eq!(security.run_as_user, Some(2102));
    assert_eq!(security.run_as_group, Some(2102));
    assert_eq!(security.run_as_non_root, Some(true));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(
        security.seccomp_profile.as_ref().unwrap().type_,
        "RuntimeDefault"
    );
    let env = env_names(proxy);
    for name in [
        "TANDEM_POD_NAME",
        "TANDEM_POD_NAMESPACE",
        "TANDEM_POD_IP",
        "TANDEM_SERVICE_ACCOUNT",
    ] {
        assert!(env.contains(&name), "{case}: {name} missing from {env:?}");
    }
    let mount = &proxy.volume_mounts.as_ref().unwrap()[0];
    assert_eq!(
        (mount.name.as_str(), mount.mount_path.as_str()),
        ("tandem-config", "/etc/tandem")
    );
    assert_eq!(mount.read_only, Some(true));

    // The pod's volumes are kept, ours appended.
    let volumes = spec.volumes.as_ref().unwrap();
    let kept = spec_before.volumes.as_ref().map_or(0, Vec::len);
    assert_eq!(
        &volumes[..kept],
        spec_before.volumes.as_deref().unwrap_or_default()
    );
    let config_map = volumes[kept].config_map.as_ref().unwrap();
    assert_eq!(volumes[kept].name, "tandem-config");
    assert_eq!(config_map.optional, Some(true));

    // The pod's annotations are kept, the version added.
    for (key, value) in before.metadata.annotations.iter().flatten() {
        assert_eq!(
            annotation(&after, key),
            Some(value.as_str()),
            "{case}: {key} kept"
        );
    }
    assert_eq!(
        annotation(&after, "tandem.dev/proxy-version"),
        Some("0.1.0")
    );
    assert_eq!(after.metadata.name, before.metadata.name);
    assert_eq!(after.metadata.generate_name, before.metadata.generate_name);

    // Injection is idempotent: the injected pod, sent again, comes back unchanged.
    let mut again = answer.request.clone();
    again["request"]["object"] = serde_json::to_value(&after).unwrap();
    let reviewed = review(&serde_json::to_vec(&again).unwrap(), config);
    assert_eq!(reviewed.outcome.reason(), "already-injected", "{case}");
    (before, after)
}

fn volume<'a>(pod: &'a Pod, name: &str) -> Option<&'a Volume> {
    let volumes = pod.spec.as_ref()?.volumes.as_ref()?;
    volumes.iter().find(|v| v.name == name)
}

fn env_value<'a>(container: &'a Container, name: &str) -> Option<&'a str> {
    container
        .env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

/// The names of the container's environment variables, in order.
fn env_names(container: &Container) -> Vec<&str> {
    container
        .env
        .iter()
        .flatten()
        .map(|e| e.name.as_str())
        .collect()
}

/// The names of the volumes the container mounts, in order.
fn mount_names(container: &Container) -> Vec<&str> {
    container
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.name.as_str())
        .collect()
}

/// The proxy's mount of `volume`: (path, read-only).
fn mount(container: &Container, volume: &str) -> Option<(String, Option<bool>)> {
    container
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == volume)
        .map(|m| (m.mount_path.clone(), m.read_only))
}

/// The identity bootstrap is in `pod`: the audience-bound token and the trust roots mounted
/// read-only where the env says, and the signer named.
fn assert_identity_bootstrap(pod: &Pod, expected: &IdentityConfig) {
    let token = volume(pod, "tandem-identity-token").expect("the token volume");
    let sources = token.projected.as_ref().unwrap().sources.as_ref().unwrap();
    assert_eq!(sources.len(), 1, "only the token is projected: {sources:?}");
    let projection = sources[0].service_account_token.as_ref().unwrap();
    assert_eq!(projection.audience.as_deref(), Some("tandem"));
    assert_eq!(projection.expiration_seconds, Some(3600));
    assert_eq!(projection.path, "token");

    let roots = volume(pod, "tandem-trust-roots").expect("the trust-roots volume");
    let config_map = roots.config_map.as_ref().unwrap();
    assert_eq!(config_map.name, "tandem-trust-roots");
    assert_eq!(
        config_map.optional,
        Some(true),
        "the pod starts before the roots exist"
    );

    let proxy = init_container(pod, "tandem-proxy");
    assert_eq!(
        mount(proxy, "tandem-identity-token"),
        Some((identity::TOKEN_DIR.to_owned(), Some(true)))
    );
    assert_eq!(
        mount(proxy, "tandem-trust-roots"),
        Some((identity::TRUST_ROOTS_DIR.to_owned(), Some(true)))
    );
    assert_eq!(
        env_value(proxy, "TANDEM_IDENTITY_ADDR"),
        Some(expected.addr.as_str())
    );
    assert_eq!(
        env_value(proxy, "TANDEM_IDENTITY_NAME"),
        Some(expected.name.as_str())
    );
    assert_eq!(
        env_value(proxy, "TANDEM_IDENTITY_TOKEN"),
        Some("/var/run/secrets/tandem.dev/identity/token")
    );
    assert_eq!(
        env_value(proxy, "TANDEM_TRUST_ROOTS"),
        Some("/var/run/secrets/tandem.dev/trust/roots.pem")
    );
    for name in ["tandem-init", "tandem-proxy"] {
        let container = init_container(pod, name);
        let mounted = mount(container, "tandem-identity-token").is_some();
        assert_eq!(
            mounted,
            name == "tandem-proxy",
            "{name}: only the proxy sees the token"
        );
    }
    let spec = pod.spec.as_ref().unwrap();
    for app in &spec.containers {
        assert!(
            mount(app, "tandem-identity-token").is_none(),
            "{}: the application never sees the signer's token",
            app.name
        );
    }
}

/// No trace of identity bootstrap in `pod`.
fn assert_no_identity_bootstrap(pod: &Pod) {
    assert!(volume(pod, "tandem-identity-token").is_none());
    assert!(volume(pod, "tandem-trust-roots").is_none());
    let proxy = init_container(pod, "tandem-proxy");
    let env = env_names(proxy);
    assert!(
        !env.iter()
            .any(|name| name.starts_with("TANDEM_IDENTITY") || *name == "TANDEM_TRUST_ROOTS"),
        "{env:?}"
    );
    assert_eq!(mount_names(proxy), ["tandem-config"]);
}

fn config_map_name(pod: &Pod) -> String {
    let volumes = pod.spec.as_ref().unwrap().volumes.as_ref().unwrap();
    let volume = volumes.iter().find(|v| v.name == "tandem-config").unwrap();
    volume.config_map.as_ref().unwrap().name.clone()
}

// ---------------------------------------------------------------------------------------------
// Injected

#[test]
fn a_deployments_pod_without_a_name_is_injected_with_its_service_accounts_config() {
    let (_, after) = assert_injected("deployment-pod");
    assert_eq!(after.metadata.name, None);
    assert_eq!(
        after.metadata.generate_name.as_deref(),
        Some("cart-7d9f8b6c5d-")
    );
    assert_eq!(config_map_name(&after), "tandem-proxy-cart");
    assert_eq!(annotation(&after, "prometheus.io/scrape"), Some("true"));
    assert_eq!(annotation(&after, "prometheus.io/port"), Some("15020"));
    assert_eq!(annotation(&after, "prometheus.io/path"), Some("/metrics"));
}

#[test]
fn existing_init_containers_volumes_and_security_context_are_kept() {
    let (before, after) = assert_injected("existing-init-containers");
    let spec = after.spec.as_ref().unwrap();
    assert_eq!(
        spec.security_context,
        before.spec.as_ref().unwrap().security_context
    );
    // The pod says runAsNonRoot; tandem-init overrides it for itself only, explicitly.
    let init = init_container(&after, "tandem-init")
        .security_context
        .as_ref()
        .unwrap();
    assert_eq!(
        (init.run_as_user, init.run_as_non_root),
        (Some(0), Some(false))
    );

    let args = init_container(&after, "tandem-init").args.clone().unwrap();
    assert!(
        args.contains(&"--skip-inbound-ports=9090".to_owned()),
        "{args:?}"
    );
    assert!(
        args.contains(&"--skip-outbound-ports=5432,6379".to_owned()),
        "{args:?}"
    );
    let proxy = init_container(&after, "tandem-proxy");
    let limits = proxy.resources.as_ref().unwrap().limits.as_ref().unwrap();
    assert_eq!(limits["memory"].0, "128Mi", "the per-pod override wins");
    assert_eq!(config_map_name(&after), "tandem-proxy-orders");
}

#[test]
fn a_bare_pod_gets_volumes_and_keeps_its_own_prometheus_annotations() {
    let (_, after) = assert_injected("bare-pod");
    assert_eq!(
        config_map_name(&after),
        "tandem-proxy-default",
        "no ServiceAccount named"
    );
    assert_eq!(
        annotation(&after, "prometheus.io/port"),
        Some("9102"),
        "the app's scrape wins"
    );
    assert_eq!(annotation(&after, "prometheus.io/path"), None);
    let init = init_container(&after, "tandem-init");
    assert_eq!(
        init.image.as_deref(),
        Some("registry.local/tandem-proxy:canary")
    );
    let args = init.args.clone().unwrap();
    assert!(args.contains(&"--skip-outbound-cidrs=169.254.169.254/32,10.200.0.0/16".to_owned()));
    let proxy = init_container(&after, "tandem-proxy");
    assert_eq!(
        proxy.image.as_deref(),
        Some("registry.local/tandem-proxy:canary")
    );
    assert_eq!(env_value(proxy, "TANDEM_LOG"), Some("debug"));
}

#[test]
fn every_injected_proxy_gets_an_audience_bound_token_and_the_trust_roots() {
    for case in ["deployment-pod", "existing-init-containers", "bare-pod"] {
        let (_, after) = assert_injected(case);
        assert_identity_bootstrap(&after, &IdentityConfig::default());
    }
}

#[test]
fn the_signer_address_and_name_come_from_the_webhooks_config() {
    let local = IdentityConfig {
        addr: "169.254.1.1:15030".into(),
        name: "tandem-identity.tandem-system.svc".into(),
    };
    let config = InjectConfig {
        identity: Some(local.clone()),
        ..config()
    };
    let answer = Answer::for_fixture_with("deployment-pod", &config);
    assert_identity_bootstrap(&answer.patched(), &local);
}

#[test]
fn identity_off_injects_neither_token_nor_trust_roots_nor_signer() {
    let (_, after) = assert_injected_with("deployment-pod", "identity-off", &identity_off());
    assert_no_identity_bootstrap(&after);
}

#[test]
fn a_pod_annotated_identity_disabled_is_injected_without_identity() {
    let (before, after) = assert_injected("identity-opted-out");
    assert_no_identity_bootstrap(&after);
    assert_eq!(
        annotation(&before, "tandem.dev/identity"),
        Some("disabled"),
        "the fixture opts out"
    );
}

#[test]
fn a_pod_that_already_has_a_volume_named_like_the_token_is_refused() {
    let mut document: Value =
        serde_json::from_slice(&std::fs::read(fixture("deployment-pod.json")).unwrap()).unwrap();
    document["request"]["object"]["spec"]["volumes"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "tandem-identity-token", "emptyDir": {}}));
    let reviewed = review(&serde_json::to_vec(&document).unwrap(), &config());
    let Outcome::Denied(message) = &reviewed.outcome else {
        panic!("{}", reviewed.outcome)
    };
    assert!(message.contains("tandem-identity-token"), "{message}");
}

#[test]
fn the_apps_http_probes_reach_the_proxy_so_a_strict_workload_lets_them_through() {
    let mut document: Value =
        serde_json::from_slice(&std::fs::read(fixture("deployment-pod.json")).unwrap()).unwrap();
    let app = &mut document["request"]["object"]["spec"]["containers"][0];
    app["ports"] = serde_json::json!([{"name": "http", "containerPort": 8080}]);
    app["readinessProbe"] = serde_json::json!({"httpGet": {"path": "/healthz", "port": "http"}});
    app["livenessProbe"] = serde_json::json!({"tcpSocket": {"port": 8080}});
    let answer = Answer::for_body(&serde_json::to_vec(&document).unwrap(), &config());
    assert_eq!(answer.outcome, Outcome::Injected);
    let pod = answer.patched();
    let proxy = init_container(&pod, "tandem-proxy");
    assert_eq!(
        env_value(proxy, "TANDEM_APP_PROBES"),
        Some(r#"[{"port":8080,"path":"/healthz"}]"#),
        "only the httpGet probe, its named port resolved"
    );
    let (_, without) = assert_injected("deployment-pod");
    let proxy = init_container(&without, "tandem-proxy");
    assert_eq!(
        env_value(proxy, "TANDEM_APP_PROBES"),
        None,
        "no probes, no env"
    );
}

#[test]
fn annotation_keys_are_escaped_in_patch_paths() {
    let answer = Answer::for_fixture("existing-init-containers");
    let patch = serde_json::to_string(&answer.patch().unwrap()).unwrap();
    assert!(
        patch.contains(r#""/metadata/annotations/tandem.dev~1proxy-version""#),
        "{patch}"
    );
    assert!(
        patch.contains(r#""/metadata/annotations/prometheus.io~1scrape""#),
        "{patch}"
    );
}

#[test]
fn a_dry_run_is_answered_exactly_like_the_real_request() {
    let real = Answer::for_fixture("deployment-pod");
    let dry = Answer::for_fixture("dry-run");
    assert_eq!(dry.outcome, Outcome::Injected);
    assert_eq!(dry.patch(), real.patch());
}

// ---------------------------------------------------------------------------------------------
// Left alone

fn assert_skipped(case: &str, reason: &str) {
    let answer = Answer::for_fixture(case);
    assert_eq!(
        answer.outcome.reason(),
        reason,
        "{case}: {}",
        answer.outcome
    );
    assert!(answer.allowed(), "{case}: skipped pods are allowed");
    assert!(
        answer.patch().is_none(),
        "{case}: skipped pods are not patched"
    );
}

#[test]
fn host_network_pods_are_skipped() {
    assert_skipped("host-network", "host-network");
}

#[test]
fn already_injected_pods_are_returned_unchanged() {
    assert_skipped("already-injected", "already-injected");
}

#[test]
fn pods_annotated_disabled_are_skipped() {
    assert_skipped("opted-out", "opted-out");
}

#[test]
fn pods_in_kube_system_are_never_injected() {
    assert_skipped("kube-system", "system-namespace");
}

// ---------------------------------------------------------------------------------------------
// Refused and malformed

#[test]
fn an_invalid_annotation_refuses_the_pod_naming_the_annotation() {
    let answer = Answer::for_fixture("invalid-annotation");
    assert!(
        matches!(answer.outcome, Outcome::Denied(_)),
        "{}",
        answer.outcome
    );
    assert!(!answer.allowed());
    let message = answer.response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("tandem.dev/skip-outbound-ports"),
        "{message}"
    );
    assert!(message.contains("postgres"), "{message}");
}

#[test]
fn malformed_documents_get_an_invalid_admission_review() {
    let deployment: Value =
        serde_json::from_slice(&std::fs::read(fixture("deployment-pod.json")).unwrap()).unwrap();
    let mut wrong_version = deployment.clone();
    wrong_version["apiVersion"] = "admission.k8s.io/v1beta1".into();
    let mut no_request = deployment.clone();
    no_request.as_object_mut().unwrap().remove("request");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("not json", b"{\"apiVersion\": ".to_vec()),
        ("binary", vec![0xff, 0xfe, 0x00, 0x80]),
        ("a json array", b"[1, 2, 3]".to_vec()),
        ("v1beta1", serde_json::to_vec(&wrong_version).unwrap()),
        ("no request", serde_json::to_vec(&no_request).unwrap()),
    ];
    for (what, body) in cases {
        let reviewed = review(&body, &config());
        assert!(
            matches!(reviewed.outcome, Outcome::Invalid(_)),
            "{what}: {}",
            reviewed.outcome
        );
        let response = reviewed.review.response.unwrap();
        assert!(!response.allowed, "{what}");
        assert!(!response.result.message.is_empty(), "{what}");
    }
}

#[test]
fn an_object_that_is_not_a_pod_is_refused_with_the_reason() {
    let mut document: Value =
        serde_json::from_slice(&std::fs::read(fixture("deployment-pod.json")).unwrap()).unwrap();
    document["request"]["object"]["spec"]["containers"] = "not a list".into();
    let reviewed = review(&serde_json::to_vec(&document).unwrap(), &config());
    let Outcome::Denied(message) = &reviewed.outcome else {
        panic!("{}", reviewed.outcome)
    };
    assert!(message.contains("not a valid Pod"), "{message}");
    assert_eq!(
        reviewed.review.response.unwrap().uid,
        "6a1f0c2e-0001-4d2b-8d6e-1c1f00000001"
    );
}

#[test]
fn other_kinds_and_operations_are_allowed_unchanged() {
    let mut document: Value =
        serde_json::from_slice(&std::fs::read(fixture("deployment-pod.json")).unwrap()).unwrap();
    document["request"]["operation"] = "UPDATE".into();
    let reviewed = review(&serde_json::to_vec(&document).unwrap(), &config());
    assert_eq!(reviewed.outcome, Outcome::Ignored);
    let response = reviewed.review.response.unwrap();
    assert!(response.allowed && response.patch.is_none());
}
