//! Every Kubernetes manifest in `manifests/` passes `kubectl apply --dry-run=server` against the
//! real apiserver (with the CRDs and namespaces it needs installed first), so a user's
//! `kubectl apply` of them cannot fail on a schema, admission or typo error.

// Helpers outside #[test] functions too: in a test, a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Output;

use tandem_tests::install::{self, ensure_namespace, install_crds, manifests_dir};
use tandem_tests::{ControlPlane, ControlPlaneOptions};

/// API groups of documents in `manifests/` that are not Kubernetes objects for this cluster:
/// kind's cluster config, kustomize's build file, and cert-manager's (optional) resources,
/// whose CRDs are not ours to install.
const FOREIGN_GROUPS: [&str; 3] = [
    "kind.x-k8s.io",
    "kustomize.config.k8s.io",
    "cert-manager.io",
];

/// Samples that exist to show a refusal (their comments quote it).
fn must_be_refused(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("invalid"))
}

fn all_yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            all_yaml_files(&path, out);
        } else if path.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            out.push(path);
        }
    }
}

fn group_of(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(group, _)| group)
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make e2e"]
async fn every_manifest_passes_a_server_side_dry_run() {
    let cluster = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .unwrap_or_else(|e| panic!("the control plane did not start: {e}"));
    let client = cluster.client();
    install_crds(&client).await.unwrap();

    let mut files = Vec::new();
    all_yaml_files(&manifests_dir(), &mut files);
    let mut namespaces = BTreeSet::new();
    let mut checkable = Vec::new();
    let mut foreign = Vec::new();
    for path in files {
        let docs = install::read_documents(&path).unwrap();
        let groups: BTreeSet<&str> = docs
            .iter()
            .map(|d| group_of(d["apiVersion"].as_str().unwrap_or_default()))
            .collect();
        if groups.iter().any(|g| FOREIGN_GROUPS.contains(g)) {
            assert!(
                groups.iter().all(|g| FOREIGN_GROUPS.contains(g)),
                "{}: mixes foreign and Kubernetes documents; split it so the latter are checked",
                path.display()
            );
            foreign.push(path);
            continue;
        }
        for doc in &docs {
            if let Some(ns) = doc["metadata"]["namespace"].as_str() {
                namespaces.insert(ns.to_owned());
            }
        }
        checkable.push(path);
    }
    // A namespaced object's dry run needs its namespace to exist for real.
    for ns in &namespaces {
        ensure_namespace(&client, ns, &[]).await.unwrap();
    }

    let mut failures = Vec::new();
    for path in &checkable {
        let output = cluster
            .kubectl()
            .args(["apply", "--dry-run=server", "-f"])
            .arg(path)
            .output()
            .unwrap_or_else(|e| panic!("run kubectl: {e}"));
        let refused = !output.status.success();
        if refused != must_be_refused(path) {
            failures.push(format!("{}: {}", path.display(), text(&output)));
        }
    }
    // And each kustomization, as `kubectl apply -k` builds it.
    for kustomization in foreign.iter().filter(|p| p.ends_with("kustomization.yaml")) {
        let dir = kustomization.parent().unwrap();
        let output = cluster
            .kubectl()
            .args(["apply", "--dry-run=server", "-k"])
            .arg(dir)
            .output()
            .unwrap_or_else(|e| panic!("run kubectl: {e}"));
        if !output.status.success() {
            failures.push(format!("-k {}: {}", dir.display(), text(&output)));
        }
    }
    assert!(failures.is_empty(), "dry run:\n{}", failures.join("\n"));
    assert!(
        checkable.len() >= 5,
        "only {} manifests checked",
        checkable.len()
    );
    eprintln!(
        "{} manifests passed the server-side dry run; not Kubernetes objects here: {:?}",
        checkable.len(),
        foreign
    );
}
