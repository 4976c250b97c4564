//! The policy CRDs in `manifests/crds/` on a real kube-apiserver: they install and become
//! Established, the sample policies are accepted, and every schema bound and every CEL rule
//! refuses what it should, with the message a user will read.

// Helpers outside #[test] functions too: in a test, a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::{Value, json};
use tandem_crds::names;
use tandem_tests::install::{self, InstalledCrd};
use tandem_tests::schema_bounds::{cel_messages, spec_bounds};
use tandem_tests::{ControlPlane, ControlPlaneOptions};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    install::yaml_files(dir).unwrap_or_else(|e| panic!("{e}"))
}

fn read_yaml(path: &Path) -> Value {
    let mut docs =
        install::read_documents(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(docs.len(), 1, "{}: one document expected", path.display());
    docs.remove(0)
}

async fn install_crds(client: &kube::Client) -> Vec<InstalledCrd> {
    let crds = install::install_crds(client)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(!crds.is_empty(), "no CRDs in manifests/crds");
    crds
}

async fn create_namespace(client: &kube::Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

fn resource_for<'a>(crds: &'a [InstalledCrd], object: &Value) -> &'a InstalledCrd {
    let kind = object["kind"].as_str().unwrap_or_default();
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    crds.iter()
        .find(|c| c.resource.kind == kind && c.resource.api_version == api_version)
        .unwrap_or_else(|| panic!("no CRD serves {api_version} {kind}"))
}

/// Creates `object` in `namespace` (only as a dry run when `dry_run`), returning the
/// apiserver's refusal message if it refuses.
async fn create(
    client: &kube::Client,
    crds: &[InstalledCrd],
    namespace: &str,
    object: &Value,
    dry_run: bool,
) -> Result<(), String> {
    let crd = resource_for(crds, object);
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &crd.resource);
    let mut object: DynamicObject = serde_json::from_value(object.clone()).unwrap();
    object.metadata.namespace = Some(namespace.to_owned());
    let params = PostParams {
        dry_run,
        ..PostParams::default()
    };
    match api.create(&params, &object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) => Err(status.message),
        Err(other) => panic!("create failed without an API answer: {other}"),
    }
}

/// The `# expect: ...` header of an invalid-policy fixture.
fn expectation(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("# expect: "))
        .unwrap_or_else(|| panic!("{} has no '# expect: ' line", path.display()))
        .to_owned()
}

async fn start() -> ControlPlane {
    ControlPlane::start(ControlPlaneOptions::default())
        .await
        .unwrap_or_else(|e| panic!("the control plane did not start: {e}"))
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make e2e"]
async fn the_crds_install_and_the_sample_policies_are_accepted_or_refused_as_documented() {
    let cluster = start().await;
    let client = cluster.client();
    let crds = install_crds(&client).await;
    assert_eq!(
        crds.iter()
            .map(|c| c.resource.group.as_str())
            .collect::<Vec<_>>(),
        vec![names::API_GROUP; crds.len()]
    );

    // The policy samples; app.yaml (the sample app of the demo) is checked by the manifest
    // dry-run test instead.
    let samples: Vec<PathBuf> = yaml_files(&repo().join("manifests/samples"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "app.yaml"))
        .collect();
    let mut namespaces_made = Vec::new();
    let mut accepted = 0;
    for path in &samples {
        let doc = read_yaml(path);
        let namespace = doc["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned();
        if namespace != "default" && !namespaces_made.contains(&namespace) {
            create_namespace(&client, &namespace).await;
            namespaces_made.push(namespace.clone());
        }
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let outcome = create(&client, &crds, &namespace, &doc, false).await;
        if file.starts_with("invalid") {
            // The sample's own comment quotes these messages to the reader.
            let message = outcome.expect_err(&format!("{file} must be refused"));
            for expected in [
                "retries.perTryTimeout must not be longer than the rule's timeout",
                "at least one backend must have a positive weight",
            ] {
                assert!(message.contains(expected), "{file}: {message}");
            }
        } else {
            outcome.unwrap_or_else(|m| panic!("{file} was refused: {m}"));
            accepted += 1;
        }
    }
    assert!(accepted >= 3, "only {accepted} valid samples");
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make e2e"]
async fn every_cel_rule_refuses_its_fixture_with_its_message() {
    let cluster = start().await;
    let client = cluster.client();
    let crds = install_crds(&client).await;

    let fixtures = yaml_files(&repo().join("tests/fixtures/policies/invalid"));
    let mut expected_somewhere = Vec::new();
    for path in &fixtures {
        let want = expectation(path);
        let message = create(&client, &crds, "default", &read_yaml(path), true)
            .await
            .expect_err(&format!("{} was accepted", path.display()));
        assert!(
            message.contains(&want),
            "{}: expected {want:?} in {message:?}",
            path.display()
        );
        expected_somewhere.push(want);
    }

    // A CEL rule without a fixture that proves it is a rule nobody has seen refuse anything.
    for crd in &crds {
        for rule in cel_messages(&crd.schema) {
            assert!(
                expected_somewhere.iter().any(|want| want == &rule),
                "{}: no fixture in tests/fixtures/policies/invalid expects {rule:?}",
                crd.resource.kind
            );
        }
    }
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make e2e"]
async fn every_schema_bound_refuses_a_value_just_outside_it() {
    let cluster = start().await;
    let client = cluster.client();
    let crds = install_crds(&client).await;

    let mut checked = 0;
    for crd in &crds {
        let file = format!(
            "tests/fixtures/policies/full-{}.yaml",
            crd.resource.kind.to_lowercase()
        );
        let full = read_yaml(&repo().join(&file));
        create(&client, &crds, "default", &full, true)
            .await
            .unwrap_or_else(|m| panic!("{file} must be valid: {m}"));
        for bound in spec_bounds(&crd.schema) {
            let broken = bound
                .violate(&full)
                .unwrap_or_else(|why| panic!("{file}: {why}; set it so the bound is tested"));
            let message = create(&client, &crds, "default", &broken, true)
                .await
                .err()
                .unwrap_or_else(|| panic!("{}: {bound} was not enforced", crd.resource.kind));
            let (path, words) = (bound.field_path(), bound.expected_words());
            assert!(
                message.contains(&path) && message.contains(&words),
                "{}: {bound}: expected {path:?} and {words:?} in {message:?}",
                crd.resource.kind
            );
            checked += 1;
        }
    }
    eprintln!("{checked} schema bounds enforced by the apiserver");
    assert!(checked > 20, "only {checked} bounds found");
}
