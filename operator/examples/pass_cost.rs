//! What one reconcile pass costs at the benchmark's full scale (10,000 Services × 5 endpoints,
//! a TrafficPolicy on one in ten, 1,000 workloads × 10 pods naming their dependencies, two
//! gateways depending on everything), without a cluster: the objects are built in memory and
//! the pass's pure steps are timed — rendering the catalog, updating the index (scoping every
//! workload) and building and sizing the configs that changed — for the first pass, after one
//! endpoint change and after one policy change. Prints the figures; asserts nothing.
//!
//! `cargo run --release -p tandem-operator --example pass_cost [quick]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../benches/operator_scale/scale.rs"]
#[allow(dead_code)]
mod scale;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use scale::{GATEWAYS, Scale};
use serde_json::json;
use tandem_crds::names::{DEPENDENCIES_ANNOTATION, PROXY_VERSION_ANNOTATION};
use tandem_crds::v1alpha1::TrafficPolicy;
use tandem_operator::index::Index;
use tandem_operator::render::{Inputs, Mesh, Rendered, WorkloadKey, document, render_with};

/// The ConfigMap limit the reconciler refuses above.
const LIMIT: usize = 1024 * 1024;

fn main() {
    let scale = if std::env::args().any(|a| a == "quick") {
        Scale::quick()
    } else {
        Scale::full()
    };
    let built = Instant::now();
    let mut inputs = objects(&scale);
    println!(
        "{} Services, {} pods, {} policies built in {:.2} s",
        inputs.services.len(),
        inputs.pods.len(),
        inputs.traffic_policies.len(),
        built.elapsed().as_secs_f64()
    );
    let wanted: Vec<WorkloadKey> = tandem_operator::render::workloads(&inputs.pods)
        .into_iter()
        .collect();
    let mut index = Index::default();
    let mut catalog: Option<Arc<Rendered>> = None;
    let mut now = 1_000_000;
    pass(
        "first pass",
        &inputs,
        &mut catalog,
        &mut index,
        &wanted,
        now,
    );

    // One endpoint change: Service 7 gets a sixth endpoint.
    let slice = inputs
        .endpoint_slices
        .iter()
        .position(|s| s.metadata.name.as_deref() == Some("svc-7"))
        .unwrap();
    inputs.endpoint_slices[slice] = Arc::new(endpoint_slice(&scale, 7, 1, "2"));
    now += 1_000;
    pass(
        "endpoint change",
        &inputs,
        &mut catalog,
        &mut index,
        &wanted,
        now,
    );

    // One policy change: the first TrafficPolicy retries three times instead of two.
    let changed = policy(&scale, 0, 3, 2);
    inputs.traffic_policies[0] = Arc::new(changed);
    now += 1_000;
    pass(
        "policy change",
        &inputs,
        &mut catalog,
        &mut index,
        &wanted,
        now,
    );

    now += 1_000;
    pass("no change", &inputs, &mut catalog, &mut index, &wanted, now);
}

/// Times one pass's pure steps and prints them.
fn pass(
    name: &str,
    inputs: &Inputs,
    catalog: &mut Option<Arc<Rendered>>,
    index: &mut Index,
    wanted: &[WorkloadKey],
    now_ms: u64,
) {
    let started = Instant::now();
    let rendered = Arc::new(render_with(inputs, catalog.as_deref()));
    let rendered_in = started.elapsed();
    let (updates, _) = index.update(
        &rendered,
        wanted,
        |_| BTreeSet::new(),
        |_| None,
        now_ms,
        LIMIT,
    );
    let indexed_in = started.elapsed() - rendered_in;
    let mut refused = 0;
    for update in &updates {
        let bytes = match &update.config {
            Ok(config) => document(config).len(),
            Err(bytes) => *bytes,
        };
        if bytes > LIMIT {
            refused += 1;
            index.refuse(&update.workload, bytes);
        }
    }
    let total = started.elapsed();
    *catalog = Some(rendered);
    println!(
        "{name:>16}: render {:>7.1} ms, index {:>7.1} ms, size {:>7.1} ms, total {:>7.1} ms; {} configs built, {refused} refused",
        rendered_in.as_secs_f64() * 1e3,
        indexed_in.as_secs_f64() * 1e3,
        (total - rendered_in - indexed_in).as_secs_f64() * 1e3,
        total.as_secs_f64() * 1e3,
        updates.len(),
    );
}

/// The benchmark's objects, as the operator's stores would hold them.
fn objects(scale: &Scale) -> Inputs {
    let mut inputs = Inputs {
        traffic_policies: Vec::new(),
        circuit_breaker_policies: Vec::new(),
        authorization_policies: Vec::new(),
        services: Vec::new(),
        endpoint_slices: Vec::new(),
        pods: Vec::new(),
        service_accounts: Vec::new(),
        namespaces: Vec::new(),
        mesh: Mesh::default(),
    };
    for i in 0..scale.services {
        let ns = scale.service_namespace(i);
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": format!("svc-{i}"), "namespace": ns, "resourceVersion": "1"},
            "spec": {"clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1),
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}
        }))
        .unwrap();
        inputs.services.push(Arc::new(service));
        inputs
            .endpoint_slices
            .push(Arc::new(endpoint_slice(scale, i, 0, "1")));
        if scale.has_policy(i) {
            inputs
                .traffic_policies
                .push(Arc::new(policy(scale, i, 2, 1)));
        }
    }
    for (w, services) in scale.dependencies().iter().enumerate() {
        let ns = scale.workload_namespace(w);
        let annotation = scale::annotation(scale, &ns, services);
        for p in 0..scale.pods_per_service_account {
            inputs.pods.push(Arc::new(pod(
                &ns,
                &format!("sa-{w}-{p}"),
                &format!("sa-{w}"),
                &annotation,
            )));
        }
    }
    let everything = scale::gateway_annotation(scale);
    for g in 0..GATEWAYS {
        let name = format!("gateway-{g}");
        inputs.pods.push(Arc::new(pod(
            &scale::namespace(0),
            &name,
            &name,
            &everything,
        )));
    }
    inputs
}

fn endpoint_slice(scale: &Scale, i: usize, extra: usize, version: &str) -> EndpointSlice {
    let endpoints: Vec<serde_json::Value> = (0..scale.endpoints_per_service + extra)
        .map(|e| {
            json!({"addresses": [format!("10.{}.{}.{}", 100 + i / 250, i % 250, e + 1)],
                   "conditions": {"ready": true}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": scale.service_namespace(i),
                     "resourceVersion": version,
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": endpoints
    }))
    .unwrap()
}

fn policy(scale: &Scale, i: usize, attempts: u32, generation: i64) -> TrafficPolicy {
    serde_json::from_value(json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": format!("tp-{i}"), "namespace": scale.service_namespace(i),
                     "generation": generation, "resourceVersion": generation.to_string()},
        "spec": {"targetRef": {"name": format!("svc-{i}")},
                 "rules": [{"name": "api", "matches": [{"path": {"value": "/api"}}],
                            "timeout": "2s", "retries": {"attempts": attempts}}]}
    }))
    .unwrap()
}

fn pod(ns: &str, name: &str, service_account: &str, dependencies: &str) -> Pod {
    let meta = serde_json::from_value(json!({
        "name": name, "namespace": ns,
        "annotations": {DEPENDENCIES_ANNOTATION: dependencies, PROXY_VERSION_ANNOTATION: "bench"}
    }))
    .unwrap();
    tandem_crds::pods::from_metadata(meta, service_account, &[])
}
