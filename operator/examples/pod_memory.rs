//! What 1,000 injected pods cost the operator's pod watch, before (full pods decoded, then
//! stripped, as the operator did until the metadata-only watch) and after (`PartialObjectMeta`
//! decoded, then turned into the small pods rendering reads). Counts heap bytes with a
//! counting allocator: the peak while one list page of 1,000 pods is decoded and kept, and
//! what stays in the store. Prints the figures; asserts nothing.
//!
//! `cargo run -p tandem-operator --example pod_memory`
#![allow(clippy::unwrap_used, clippy::expect_used)]
// Counting heap bytes takes a global allocator, which is an unsafe trait; it only forwards.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodStatus};
use kube::api::PartialObjectMeta;
use serde_json::{Value, json};
use tandem_operator::stores::{Recorded, metadata_pod};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const PODS: usize = 1_000;

/// One injected pod as the apiserver returns it (a Deployment's, after the webhook).
fn full_pod(i: usize) -> Value {
    let metadata = json!({
        "name": format!("web-7c9f8d6b5-{i:05}"), "namespace": "shop",
        "uid": format!("00000000-0000-0000-0000-{i:012}"), "resourceVersion": "123456",
        "generateName": "web-7c9f8d6b5-", "creationTimestamp": "2026-12-03T10:00:00Z",
        "labels": {"app": "web", "pod-template-hash": "7c9f8d6b5", "version": "v1"},
        "annotations": {"tandem.dev/proxy-version": "0.1.0", "prometheus.io/scrape": "true",
                        "prometheus.io/port": "15020", "prometheus.io/path": "/metrics",
                        "tandem.dev/service-account": "web",
                        "tandem.dev/container-ports": "http=8080,metrics=9090"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                             "name": "web-7c9f8d6b5", "uid": "11111111-0000-0000-0000-000000000000",
                             "controller": true, "blockOwnerDeletion": true}],
        "managedFields": [
            {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
             "time": "2026-12-03T10:00:00Z", "fieldsType": "FieldsV1",
             "fieldsV1": {"f:metadata": {"f:generateName": {}, "f:labels": {".": {},
                 "f:app": {}, "f:pod-template-hash": {}, "f:version": {}},
                 "f:ownerReferences": {".": {}, "k:{\"uid\":\"1111\"}": {}}},
                 "f:spec": {"f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:image": {},
                 "f:name": {}, "f:ports": {}, "f:resources": {}}}}}},
            {"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
             "time": "2026-12-03T10:00:05Z", "fieldsType": "FieldsV1", "subresource": "status",
             "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {},
                 "f:hostIP": {}, "f:phase": {}, "f:podIP": {}, "f:startTime": {}}}}
        ]
    });
    let env: Vec<Value> = (0..8)
        .map(|e| json!({"name": format!("SETTING_{e}"), "value": "a-value-of-some-length"}))
        .collect();
    let mount = json!([{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]);
    let status = |name: &str| {
        json!({"name": name, "ready": true, "restartCount": 0,
        "image": "registry.example/app:1.2.3", "imageID": "registry.example/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "containerID": "containerd://0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "started": true, "state": {"running": {"startedAt": "2026-12-03T10:00:04Z"}}})
    };
    json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
        "spec": {
            "serviceAccountName": "web", "serviceAccount": "web", "nodeName": "node-17",
            "initContainers": [
                {"name": "tandem-init", "image": "tandem/proxy:0.1.0", "args": ["init", "--uid", "1337"],
                 "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_RAW"]}}},
                {"name": "tandem-proxy", "image": "tandem/proxy:0.1.0", "restartPolicy": "Always",
                 "args": ["run", "--config", "/etc/tandem/config.json"], "env": env.clone(),
                 "ports": [{"name": "tandem-admin", "containerPort": 15020}],
                 "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                 "readinessProbe": {"httpGet": {"path": "/ready", "port": 15020}},
                 "volumeMounts": [{"name": "tandem-config", "mountPath": "/etc/tandem"}]}
            ],
            "containers": [{"name": "app", "image": "registry.example/app:1.2.3", "env": env,
                            "ports": [{"name": "http", "containerPort": 8080},
                                      {"name": "metrics", "containerPort": 9090}],
                            "resources": {"requests": {"cpu": "250m", "memory": "256Mi"},
                                          "limits": {"memory": "512Mi"}},
                            "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}},
                            "volumeMounts": mount}],
            "volumes": [{"name": "tandem-config", "configMap": {"name": "tandem-proxy-web"}},
                        {"name": "kube-api-access", "projected": {"sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}}]}}],
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}]
        },
        "status": {"phase": "Running", "hostIP": "10.0.0.17", "podIP": format!("10.244.{}.{}", i / 250, i % 250),
                   "startTime": "2026-12-03T10:00:01Z",
                   "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"},
                                  {"type": "Initialized", "status": "True"}, {"type": "PodScheduled", "status": "True"}],
                   "initContainerStatuses": [status("tandem-init"), status("tandem-proxy")],
                   "containerStatuses": [status("app")]}
    })
}

/// A list page, decoded as kube decodes one (straight from the bytes).
#[derive(serde::Deserialize)]
struct List<T> {
    items: Vec<T>,
}

/// The operator's strip before the metadata-only watch (kept here only to measure against).
fn strip_full(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    pod.metadata.owner_references = None;
    if let Some(annotations) = pod.metadata.annotations.as_mut() {
        annotations
            .retain(|k, _| k == "tandem.dev/dependencies" || k == "tandem.dev/proxy-version");
    }
    if let Some(spec) = pod.spec.as_mut() {
        for container in &mut spec.containers {
            *container = Container {
                name: std::mem::take(&mut container.name),
                ports: container.ports.take().map(|ports| {
                    ports
                        .into_iter()
                        .map(|p| ContainerPort {
                            name: p.name,
                            container_port: p.container_port,
                            protocol: p.protocol,
                            ..Default::default()
                        })
                        .collect()
                }),
                ..Default::default()
            };
        }
        spec.volumes = None;
        spec.affinity = None;
        spec.tolerations = None;
        for init in spec.init_containers.iter_mut().flatten() {
            *init = Container {
                name: std::mem::take(&mut init.name),
                ..Default::default()
            };
        }
    }
    if let Some(status) = pod.status.as_mut() {
        *status = PodStatus {
            phase: status.phase.take(),
            ..Default::default()
        };
    }
}

/// Runs `f` from a clean peak; returns (bytes on the wire, peak heap above the start, heap
/// kept by what `f` returns).
fn measure<T>(wire: &[u8], f: impl FnOnce(&[u8]) -> T) -> (usize, usize, usize, T) {
    let start = LIVE.load(Ordering::Relaxed);
    PEAK.store(start, Ordering::Relaxed);
    let kept = f(wire);
    let peak = PEAK.load(Ordering::Relaxed) - start;
    let retained = LIVE.load(Ordering::Relaxed).saturating_sub(start);
    (wire.len(), peak, retained, kept)
}

fn main() {
    let full: Vec<Value> = (0..PODS).map(full_pod).collect();
    let meta: Vec<Value> = full
        .iter()
        .map(|p| json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": p["metadata"]}))
        .collect();
    let full_wire = serde_json::to_vec(&json!({"items": full})).unwrap();
    let meta_wire = serde_json::to_vec(&json!({"items": meta})).unwrap();
    drop((full, meta));

    let before = measure(&full_wire, |wire| {
        let mut pods = serde_json::from_slice::<List<Pod>>(wire).unwrap().items;
        pods.iter_mut().for_each(strip_full);
        pods
    });
    let after = measure(&meta_wire, |wire| {
        serde_json::from_slice::<List<PartialObjectMeta<Pod>>>(wire)
            .unwrap()
            .items
            .into_iter()
            .map(|m| {
                let recorded = Recorded::from_annotations(&m.metadata).expect("recorded");
                metadata_pod(m.metadata, &recorded)
            })
            .collect::<Vec<Pod>>()
    });
    assert_eq!(before.3.len(), after.3.len());
    println!("{PODS} injected pods   wire bytes   peak heap (list decoded)   kept in the store");
    for (label, (wire, peak, kept, _)) in [
        ("before (full pods)", &before),
        ("after (metadata)", &after),
    ] {
        println!(
            "{label:<20} {:>9} KiB {:>15} KiB {:>22} KiB",
            wire / 1024,
            peak / 1024,
            kept / 1024
        );
    }
}
