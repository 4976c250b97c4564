//! Authorization by identity, end to end, on one local cluster with Tandem installed as a user
//! installs it; the meshed pods talk over mutual TLS (the default), so the server's proxy knows
//! each caller's ServiceAccount from its certificate:
//!
//! - a: an Allow policy on the Service `server` naming the ServiceAccount `web`: web's requests
//!   get 200; batch's (another ServiceAccount) and the unmeshed outsider's get 403, with
//!   `tandem-denied-by` and the body naming the policy; the policy lists the workload in its
//!   status and is Accepted and Programmed; the server's proxy loaded it, resolved to the pod's
//!   port, and logs the denials with the deciding policy;
//! - b: the namespace `locked`, annotated `tandem.dev/default-policy: deny` from the start: the
//!   unmeshed client and even a meshed one are refused, while the pod's kubelet readiness probe
//!   keeps passing (the pod is Ready, the probe path is answered, another path is refused) and
//!   the proxy's own `/ready` answers; an Allow policy then lets web in, and only web;
//! - c: a Deny rule beats an Allow (web may call everything but `/admin`); path and method
//!   rules (anyone may `GET /public`; `POST /public` or `GET /admin` are refused);
//! - d: an opaque TCP port: a Deny policy closes batch's connections before any byte comes back
//!   while web's are echoed; an Allow policy for web then closes the outsider's too;
//! - e: an Allow policy naming web created and deleted three times on a port web may call
//!   anyway, while web sends steadily (100/s): every request is counted, none is denied, and
//!   the server's proxy's metrics show requests allowed by the policy and by the default on
//!   either side of every switch;
//! - f: a policy whose HTTP rule can never apply to its opaque TCP port, and one whose target
//!   Service does not exist, get `Accepted=False` with the reasons `Invalid` and
//!   `TargetNotFound`; no proxy receives them, and the other policies keep working;
//! - g: gRPC (HTTP/2, `application/grpc`) to a port declared grpc, with an Allow rule on web,
//!   `POST` and a path prefix: web's calls reach the server; batch's, and web's to another
//!   service path, end with `grpc-status: 7` (PERMISSION_DENIED), the policy named in
//!   `tandem-denied-by` and in `grpc-message`;
//! - h: a new workload (another ServiceAccount) joins the protected Service while batch sends to
//!   it steadily: the policies' status lists it, its proxy runs them, and none of batch's
//!   requests gets through it, from its first (no window between Ready and protected); once
//!   it is deleted the status lists the first workload alone and its ConfigMap is gone;
//! - i: `tandemctl explain --from …` (the real binary, against this cluster) says, for HTTP
//!   requests and TCP connections of each caller, exactly what the proxy then does: allowed or
//!   denied, and the `tandem-denied-by` a denial carries;
//! - throughout: `tandem_authz_decisions_total{decision,policy,protocol}` on the server's proxy
//!   moves by exactly the requests and connections of each step, with the labels of what decided
//!   them (HTTP and TCP, allow and deny, by a policy, by no Allow match, by a default, and the
//!   kubelet's probes as `probe`).
//!
//! A second cluster runs the operator with the mesh-wide default `all-authenticated`: the meshed
//! client gets in and the unmeshed one is refused (`default:all-authenticated`) while the
//! server's plaintext probe keeps it Ready; the namespace annotated `deny` stays stricter; the
//! server's namespace annotated `all-unauthenticated` lets the unmeshed client in; annotated
//! `cluster-authenticated` it lets web (a mesh identity from the pod network) in and keeps the
//! outsider out; with the annotation removed the mesh's default refuses the outsider again.
//!
//! Every burst is bounded in count and sent from inside a pod (`tandem-testapp client`, `GET
//! /burst?n=N` or `/tcp?n=N`); every wait is for a state (a condition, the config a proxy has
//! loaded, a counter), bounded in time.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod e2e_support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use tandem_crds::contract::{AuthorizationAction, DefaultPolicy, ProxyConfig};
use tandem_crds::identity::{DEFAULT_TRUST_DOMAIN, SpiffeId};
use tandem_crds::names::{ADMIN_PORT, DEFAULT_POLICY_ANNOTATION, DENIED_BY_HEADER};
use tandem_tests::install::InstallOptions;

use e2e_support::{Burst, ClientStats, Mesh, SERIAL, TcpStats, counter, eventually, pod_ip, repo};

/// How long the operator and the proxies may take to carry a change: generous, because the
/// machine is shared; the time it took is reported, never asserted more tightly.
const PROPAGATION: Duration = Duration::from_secs(60);

/// The meshed namespace of the server and its two clients.
const NS: &str = "authz";
/// The meshed namespace whose default policy is `deny`.
const LOCKED: &str = "locked";

/// The metric every decision is counted in.
const DECISIONS: &str = "tandem_authz_decisions_total";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control-plane binaries: run by make e2e"]
async fn callers_are_allowed_and_denied_by_identity_path_method_and_port_with_probes_kept_and_no_request_wrongly_denied_while_policies_change()
 {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::start().await.expect("cluster, Tandem and node start");
    let started = Instant::now();
    let pods = setup(&mesh).await;
    scenario_a(&mesh, &pods).await;
    scenario_b(&mesh, &pods).await;
    scenario_c(&mesh, &pods).await;
    scenario_d(&mesh, &pods).await;
    scenario_e(&mesh, &pods).await;
    scenario_f(&mesh, &pods).await;
    scenario_g(&mesh, &pods).await;
    scenario_h(&mesh, &pods).await;
    scenario_i(&mesh, &pods).await;
    eprintln!(
        "all scenarios a-i: {:.0} s from the apply",
        started.elapsed().as_secs_f64()
    );
    mesh.node.shutdown().await;
}

/// The mesh-wide default (the operator's `--default-policy`, here `all-authenticated`) decides
/// where no namespace annotation overrides it; an annotation overrides it either way, and
/// changing or removing the annotation takes effect on the running proxies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and the control-plane binaries: run by make e2e"]
async fn the_mesh_wide_default_applies_unless_a_namespace_annotation_overrides_it() {
    let _serial = SERIAL.lock().await;
    let mesh = Mesh::start_with(InstallOptions {
        operator_env: vec![(
            "TANDEM_DEFAULT_POLICY".into(),
            DefaultPolicy::AllAuthenticated.as_str().into(),
        )],
        ..InstallOptions::default()
    })
    .await
    .expect("cluster, Tandem (mesh default all-authenticated) and node start");
    let started = Instant::now();
    let pods = setup(&mesh).await;
    eprintln!("mesh default all-authenticated:");
    // The test drives the clients from the node, in plaintext (`GET /burst` on 9090): under
    // all-authenticated that needs a policy, as any plaintext admin port would.
    for client in ["web", "batch"] {
        apply_policy(
            &mesh,
            NS,
            &format!("{client}-control"),
            json!({
                "targetRef": {"kind": "ServiceAccount", "name": client},
                "action": "Allow",
                "rules": [{"from": {"unauthenticated": true}, "to": {"ports": [9090]}}],
            }),
        )
        .await;
    }
    await_loaded(&mesh, &pods.web, "authz/web-control", true).await;
    await_loaded(&mesh, &pods.batch, "authz/batch-control", true).await;
    let server = url(&mesh, NS, "server", "/").await;
    let vault = url(&mesh, LOCKED, "vault", "/").await;
    await_default(&mesh, &pods.server, DefaultPolicy::AllAuthenticated).await;
    await_default(&mesh, &pods.vault, DefaultPolicy::Deny).await;

    let before = mesh.proxy_metrics(&pods.server).await.unwrap();
    let web = send(&mesh, &pods.web, &server, "GET", 20).await;
    assert_allowed(
        &web,
        20,
        "authz-server",
        "web, meshed, under all-authenticated",
    );
    let outsider = send(&mesh, &pods.outsider, &server, "GET", 20).await;
    assert_denied(
        &outsider,
        20,
        &["default:all-authenticated"],
        "unauthenticated",
        "the unmeshed outsider, under all-authenticated",
    );
    let after = mesh.proxy_metrics(&pods.server).await.unwrap();
    assert_eq!(
        moved(&before, &after),
        expect(&[
            ("allow", "default:all-authenticated", "http", 20),
            ("deny", "default:all-authenticated", "http", 20),
        ]),
        "the server's decisions, by label:\n{after}"
    );
    // The server's plaintext kubelet probe is not a meshed caller either: it still passes.
    let pod = Api::<Pod>::namespaced(mesh.client(), NS)
        .get(pods.server.metadata.name.as_deref().unwrap())
        .await
        .unwrap();
    assert!(
        e2e_support::is_ready(&pod),
        "the server stays Ready under all-authenticated: {:?}",
        pod.status
    );
    let locked = send(&mesh, &pods.web, &vault, "GET", 10).await;
    assert_denied(
        &locked,
        10,
        &["default:deny"],
        &spiffe_id(NS, "web"),
        "web, to the namespace annotated deny (stricter than the mesh)",
    );
    eprintln!(
        "  web {}; outsider {}; web to the vault {}",
        describe(&web),
        describe(&outsider),
        describe(&locked)
    );

    // The namespace annotated all-unauthenticated (looser than the mesh): the outsider gets in.
    annotate(&mesh, NS, Some("all-unauthenticated")).await;
    await_default(&mesh, &pods.server, DefaultPolicy::AllUnauthenticated).await;
    let outsider = send(&mesh, &pods.outsider, &server, "GET", 20).await;
    assert_allowed(
        &outsider,
        20,
        "authz-server",
        "the outsider, the namespace annotated all-unauthenticated",
    );
    // cluster-authenticated: a mesh identity from an address in the cluster networks (the
    // operator's default networks hold the pod network): web in, the outsider out.
    annotate(&mesh, NS, Some("cluster-authenticated")).await;
    await_default(&mesh, &pods.server, DefaultPolicy::ClusterAuthenticated).await;
    let before = mesh.proxy_metrics(&pods.server).await.unwrap();
    let web_in = send(&mesh, &pods.web, &server, "GET", 20).await;
    assert_allowed(
        &web_in,
        20,
        "authz-server",
        "web, under cluster-authenticated",
    );
    let outsider_out = send(&mesh, &pods.outsider, &server, "GET", 20).await;
    assert_denied(
        &outsider_out,
        20,
        &["default:cluster-authenticated"],
        "unauthenticated",
        "the outsider, under cluster-authenticated",
    );
    let after = mesh.proxy_metrics(&pods.server).await.unwrap();
    assert_eq!(
        moved(&before, &after),
        expect(&[
            ("allow", "default:cluster-authenticated", "http", 20),
            ("deny", "default:cluster-authenticated", "http", 20),
        ]),
        "the server's decisions, by label:\n{after}"
    );
    eprintln!(
        "  annotated cluster-authenticated: web {}; outsider {}",
        describe(&web_in),
        describe(&outsider_out)
    );
    // The annotation removed: the mesh's default again.
    annotate(&mesh, NS, None).await;
    await_default(&mesh, &pods.server, DefaultPolicy::AllAuthenticated).await;
    let again = send(&mesh, &pods.outsider, &server, "GET", 20).await;
    assert_denied(
        &again,
        20,
        &["default:all-authenticated"],
        "unauthenticated",
        "the outsider, the annotation removed",
    );
    eprintln!(
        "  annotated all-unauthenticated: outsider {}; annotation removed: outsider {} ({:.0} s from the apply)",
        describe(&outsider),
        describe(&again),
        started.elapsed().as_secs_f64()
    );
    mesh.node.shutdown().await;
}

/// Applies the workloads and waits until every pod is Ready and the meshed paths are mTLS.
async fn setup(mesh: &Mesh) -> Pods {
    let started = Instant::now();
    mesh.apply_file(&repo().join("tests/fixtures/e2e/authz.yaml"))
        .await
        .expect("the authorization workloads apply");
    let ready = |ns: &'static str, selector: &'static str| async move {
        mesh.ready_pods(ns, selector, 1, Duration::from_secs(120))
            .await
            .unwrap()
            .remove(0)
    };
    let pods = Pods {
        server: ready(NS, "app=server").await,
        web: ready(NS, "app=web").await,
        batch: ready(NS, "app=batch").await,
        vault: ready(LOCKED, "app=vault").await,
        outsider: ready("outside", "app=outsider").await,
    };
    eprintln!(
        "setup: 5 pods Ready {:.1} s after the apply",
        started.elapsed().as_secs_f64()
    );
    meshed_paths_are_mutual_tls(mesh, &pods).await;
    pods
}

/// Sets (or, with `None`, removes) a namespace's `tandem.dev/default-policy` annotation.
async fn annotate(mesh: &Mesh, namespace: &str, policy: Option<&str>) {
    let namespaces: Api<Namespace> = Api::all(mesh.client());
    let patch = json!({"metadata": {"annotations": {DEFAULT_POLICY_ANNOTATION: policy}}});
    or_logs(
        mesh,
        namespaces
            .patch(namespace, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
            .map_err(anyhow::Error::from),
    );
}

/// Waits until `pod`'s proxy has loaded a config whose default policy is `policy`.
async fn await_default(mesh: &Mesh, pod: &Pod, policy: DefaultPolicy) {
    let (_, took) = or_logs(
        mesh,
        eventually(
            &format!(
                "{}'s proxy runs default {policy}",
                pod.metadata.name.as_deref().unwrap_or_default()
            ),
            PROPAGATION,
            || async {
                Ok(mesh
                    .proxy_loaded(pod)
                    .await?
                    .filter(|c| c.authorization.default_policy == policy)
                    .map(|_| ()))
            },
        )
        .await,
    );
    eprintln!(
        "  {}'s proxy runs default {policy} ({:.1} s)",
        pod.metadata.name.as_deref().unwrap_or_default(),
        took.as_secs_f64()
    );
}

/// The pods every scenario uses.
struct Pods {
    server: Pod,
    web: Pod,
    batch: Pod,
    vault: Pod,
    outsider: Pod,
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// The SPIFFE ID of a ServiceAccount.
fn spiffe_id(namespace: &str, service_account: &str) -> String {
    SpiffeId::new(DEFAULT_TRUST_DOMAIN, namespace, service_account).uri()
}

/// Panics with `what`'s error and every log tail.
fn or_logs<T>(mesh: &Mesh, what: anyhow::Result<T>) -> T {
    what.unwrap_or_else(|e| panic!("{e:#}\n{}", mesh.logs()))
}

/// `http://<cluster IP of ns/service>/<path>`.
async fn url(mesh: &Mesh, namespace: &str, service: &str, path: &str) -> String {
    let ip = mesh.cluster_ip(namespace, service).await.unwrap();
    format!("http://{ip}{path}")
}

fn policies() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("tandem.dev", "v1alpha1", "AuthorizationPolicy"),
        "authorizationpolicies",
    )
}

/// Applies `AuthorizationPolicy` `namespace/name` with `spec`, then waits until the operator
/// has accepted and programmed this generation; returns its status.
async fn apply_policy(mesh: &Mesh, namespace: &str, name: &str, spec: Value) -> Value {
    let object = json!({
        "apiVersion": "tandem.dev/v1alpha1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    });
    or_logs(
        mesh,
        e2e_support::apply_value(&mesh.client(), &object).await,
    );
    let (status, took) = or_logs(
        mesh,
        eventually(
            &format!("AuthorizationPolicy {namespace}/{name} Accepted and Programmed"),
            PROPAGATION,
            || async {
                let Some(object) = mesh
                    .policy_object("authorizationpolicies", namespace, name)
                    .await?
                else {
                    return Ok(None);
                };
                Ok(programmed(&object).then(|| object.data["status"].clone()))
            },
        )
        .await,
    );
    eprintln!(
        "  {namespace}/{name}: Accepted and Programmed {:.1} s after the apply, workloads {}",
        took.as_secs_f64(),
        status["workloads"]
    );
    status
}

/// Whether the operator's conditions describe this generation and are both True.
fn programmed(object: &DynamicObject) -> bool {
    let status = &object.data["status"];
    let generation = object.metadata.generation;
    let current = status["observedGeneration"].as_i64() == generation;
    let condition = |type_: &str| {
        status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == type_ && c["status"] == "True")
    };
    current && condition("Accepted") && condition("Programmed")
}

/// Deletes `AuthorizationPolicy` `namespace/name`.
async fn delete_policy(mesh: &Mesh, namespace: &str, name: &str) {
    let api: Api<DynamicObject> = Api::namespaced_with(mesh.client(), namespace, &policies());
    or_logs(
        mesh,
        api.delete(name, &DeleteParams::default())
            .await
            .map(|_| ())
            .map_err(anyhow::Error::from),
    );
}

/// Waits until `pod`'s proxy has loaded a config that holds (or, with `present` false, no
/// longer holds) policy `name` (`<ns>/<name>`); returns that config.
async fn await_loaded(mesh: &Mesh, pod: &Pod, name: &str, present: bool) -> ProxyConfig {
    let (config, took) = or_logs(
        mesh,
        eventually(
            &format!(
                "{}'s proxy loaded a config {} {name}",
                pod.metadata.name.as_deref().unwrap_or_default(),
                if present { "with" } else { "without" }
            ),
            PROPAGATION,
            || async {
                Ok(mesh
                    .proxy_loaded(pod)
                    .await?
                    .filter(|c| c.authorization.policies.iter().any(|p| p.name == name) == present))
            },
        )
        .await,
    );
    eprintln!(
        "  {}'s proxy {} {name} (config {}) after {:.1} s more",
        pod.metadata.name.as_deref().unwrap_or_default(),
        if present { "loaded" } else { "dropped" },
        config.version,
        took.as_secs_f64()
    );
    config
}

/// One series of the decisions counter.
fn decisions(metrics: &str, decision: &str, policy: &str, protocol: &str) -> f64 {
    counter(
        metrics,
        DECISIONS,
        &[
            ("decision", decision),
            ("policy", policy),
            ("protocol", protocol),
        ],
    )
}

/// Every series of the decisions counter, by (decision, policy, protocol).
fn all_decisions(metrics: &str) -> BTreeMap<(String, String, String), f64> {
    let label = |line: &str, name: &str| {
        line.split(&format!("{name}=\""))
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_default()
            .to_owned()
    };
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{DECISIONS}{{")))
        .filter_map(|l| {
            let value: f64 = l.rsplit(' ').next()?.parse().ok()?;
            Some((
                (
                    label(l, "decision"),
                    label(l, "policy"),
                    label(l, "protocol"),
                ),
                value,
            ))
        })
        .collect()
}

/// The series that moved between two scrapes, and by how much (probes left out: the kubelet
/// probes on its own schedule).
fn moved(before: &str, after: &str) -> BTreeMap<(String, String, String), f64> {
    let before = all_decisions(before);
    all_decisions(after)
        .into_iter()
        .map(|(k, v)| {
            let d = v - before.get(&k).copied().unwrap_or(0.0);
            (k, d)
        })
        .filter(|((_, policy, _), d)| *d != 0.0 && policy != "probe")
        .collect()
}

/// `(decision, policy, protocol) -> n` as [`moved`] returns it.
fn expect(entries: &[(&str, &str, &str, u64)]) -> BTreeMap<(String, String, String), f64> {
    entries
        .iter()
        .map(|(d, p, proto, n)| {
            (
                ((*d).to_owned(), (*p).to_owned(), (*proto).to_owned()),
                *n as f64,
            )
        })
        .collect()
}

fn describe(stats: &ClientStats) -> String {
    format!(
        "{} requests, by status {:?}, by header {:?}",
        stats.total, stats.by_status, stats.by_header
    )
}

/// `n` requests (GET unless `method`) from `client` to `target`, counting the denied-by header.
async fn send(mesh: &Mesh, client: &Pod, target: &str, method: &str, n: u64) -> ClientStats {
    let ask = Burst::new(target, n)
        .concurrency(2)
        .method(method)
        .header(DENIED_BY_HEADER);
    or_logs(mesh, mesh.burst_with(client, &ask).await)
}

/// Asserts that every request of `stats` was answered 200 by `body`, with no denied-by header.
fn assert_allowed(stats: &ClientStats, n: u64, body: &str, what: &str) {
    assert_eq!(stats.total, n, "{what}: {}", describe(stats));
    assert_eq!(
        stats.ok,
        n,
        "{what}: every request allowed: {}",
        describe(stats)
    );
    assert_eq!(
        stats.by_body.get(body).copied(),
        Some(n),
        "{what}: answered by {body}: {:?}",
        stats.by_body
    );
    assert_eq!(
        stats.by_header.get("").copied(),
        Some(n),
        "{what}: no {DENIED_BY_HEADER} on an allowed response: {:?}",
        stats.by_header
    );
}

/// Asserts that every request of `stats` got 403 with `tandem-denied-by` naming exactly the
/// policies `by` (several when no Allow rule matched: the covering Allow policies, any order)
/// and a body that names them and `caller` (a SPIFFE ID, or `unauthenticated`).
fn assert_denied(stats: &ClientStats, n: u64, by: &[&str], caller: &str, what: &str) {
    assert_eq!(stats.total, n, "{what}: {}", describe(stats));
    assert_eq!(
        stats.by_status.get("403").copied(),
        Some(n),
        "{what}: every request denied with 403: {}",
        describe(stats)
    );
    let mut named: Vec<Vec<&str>> = stats
        .by_header
        .keys()
        .map(|h| {
            let mut names: Vec<&str> = h.split(", ").collect();
            names.sort_unstable();
            names
        })
        .collect();
    named.dedup();
    let mut expected = by.to_vec();
    expected.sort_unstable();
    assert_eq!(
        named,
        vec![expected],
        "{what}: {DENIED_BY_HEADER} names {by:?}: {:?}",
        stats.by_header
    );
    let header = stats.by_header.keys().next().cloned().unwrap_or_default();
    for body in stats.by_body.keys() {
        assert!(
            body.starts_with(&format!("denied by {header}:")) && body.contains(caller),
            "{what}: the body names the policy ({header}) and the caller ({caller}): {body:?}"
        );
    }
}

/// The identity `config` names for the endpoint `address` of Service `namespace/service`.
fn endpoint_identity<'a>(
    config: &'a ProxyConfig,
    (namespace, service): (&str, &str),
    address: SocketAddr,
) -> Option<&'a str> {
    config
        .services
        .iter()
        .filter(|s| s.namespace == namespace && s.name == service)
        .flat_map(|s| &s.ports)
        .flat_map(|p| &p.endpoints)
        .find(|e| e.address == address)
        .and_then(|e| e.identity.as_deref())
}

/// Before anything is decided by identity, both clients' proxies must reach the server's three
/// ports (and the vault) over mutual TLS: their configs name the server's identity for each
/// endpoint. Otherwise a client would be "unauthenticated" for reasons not the scenario's.
async fn meshed_paths_are_mutual_tls(mesh: &Mesh, pods: &Pods) {
    let server_ip = pod_ip(&pods.server).unwrap();
    let vault_ip = pod_ip(&pods.vault).unwrap();
    let server_id = spiffe_id(NS, "server");
    let vault_id = spiffe_id(LOCKED, "vault");
    let endpoints = [
        (
            (NS, "server"),
            SocketAddr::from((server_ip, 8080)),
            &server_id,
        ),
        (
            (NS, "steady"),
            SocketAddr::from((server_ip, 8081)),
            &server_id,
        ),
        (
            (NS, "echo"),
            SocketAddr::from((server_ip, 7000)),
            &server_id,
        ),
        (
            (NS, "grpc"),
            SocketAddr::from((server_ip, 8082)),
            &server_id,
        ),
        (
            (LOCKED, "vault"),
            SocketAddr::from((vault_ip, 8080)),
            &vault_id,
        ),
    ];
    for client in [&pods.web, &pods.batch] {
        let (_, took) = or_logs(
            mesh,
            eventually(
                "the client's proxy names the identity of every server endpoint",
                PROPAGATION,
                || async {
                    let Some(config) = mesh.proxy_loaded(client).await? else {
                        return Ok(None);
                    };
                    let named = endpoints.iter().all(|(service, address, id)| {
                        endpoint_identity(&config, *service, *address) == Some(id.as_str())
                    });
                    Ok(named.then_some(()))
                },
            )
            .await,
        );
        eprintln!(
            "setup: {}'s proxy names the servers' identities for {:?} ({:.1} s)",
            client.metadata.name.as_deref().unwrap_or_default(),
            endpoints.map(|(service, address, _)| format!("{}/{} {address}", service.0, service.1)),
            took.as_secs_f64()
        );
    }
    for (pod, sa) in [(&pods.web, "web"), (&pods.batch, "batch")] {
        let (_, took) = or_logs(
            mesh,
            eventually(
                "the client's proxy has its certificate",
                PROPAGATION,
                || async {
                    let identity = mesh.proxy_admin_config(pod).await?["identity"].clone();
                    Ok((identity["spiffeId"] == json!(spiffe_id(NS, sa))).then_some(()))
                },
            )
            .await,
        );
        eprintln!(
            "setup: {sa}'s proxy holds {} ({:.1} s)",
            spiffe_id(NS, sa),
            took.as_secs_f64()
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios

/// Scenario a: an Allow policy on a Service.
async fn scenario_a(mesh: &Mesh, pods: &Pods) {
    eprintln!("scenario a: an Allow policy naming web on the Service server");
    let target = url(mesh, NS, "server", "/").await;
    // Before any policy, both clients are served (the default, all-unauthenticated).
    let open = send(mesh, &pods.batch, &target, "GET", 10).await;
    assert_allowed(&open, 10, "authz-server", "batch before any policy");

    let status = apply_policy(
        mesh,
        NS,
        "allow-web",
        json!({
            "targetRef": {"kind": "Service", "name": "server"},
            "action": "Allow",
            "rules": [{"from": {"serviceAccounts": [{"name": "web"}]}}],
        }),
    )
    .await;
    assert_eq!(
        status["workloads"],
        json!(["authz/server"]),
        "the policy's status lists the server's workload: {status}"
    );
    let config = await_loaded(mesh, &pods.server, "authz/allow-web", true).await;
    let rendered = config
        .authorization
        .policies
        .iter()
        .find(|p| p.name == "authz/allow-web")
        .unwrap();
    assert_eq!(rendered.action, AuthorizationAction::Allow, "{rendered:?}");
    assert_eq!(
        rendered.ports,
        vec![8080],
        "the Service's port 80 resolved to the pod's port: {rendered:?}"
    );
    let web_id = spiffe_id(NS, "web");
    assert!(
        rendered
            .rules
            .iter()
            .filter_map(|r| r.from.as_ref())
            .any(|f| f.principals == [web_id.clone()]),
        "the ServiceAccount reference rendered as web's SPIFFE ID: {rendered:?}"
    );

    let before = mesh.proxy_metrics(&pods.server).await.unwrap();
    let web = send(mesh, &pods.web, &target, "GET", 50).await;
    assert_allowed(&web, 50, "authz-server", "web");
    let batch = send(mesh, &pods.batch, &target, "GET", 30).await;
    let batch_id = spiffe_id(NS, "batch");
    assert_denied(&batch, 30, &["authz/allow-web"], &batch_id, "batch");
    let outsider = send(mesh, &pods.outsider, &target, "GET", 10).await;
    assert_denied(
        &outsider,
        10,
        &["authz/allow-web"],
        "unauthenticated",
        "the unmeshed outsider",
    );
    let after = mesh.proxy_metrics(&pods.server).await.unwrap();
    assert_eq!(
        moved(&before, &after),
        expect(&[
            ("allow", "authz/allow-web", "http", 50),
            ("deny", "no-allow-match", "http", 40),
        ]),
        "the server's decisions, by label:\n{after}"
    );

    // The access log says the same, per request.
    let log = mesh.node.log_path(
        NS,
        pods.server.metadata.name.as_deref().unwrap(),
        tandem_crds::names::PROXY_CONTAINER,
    );
    let (entries, _) = or_logs(
        mesh,
        eventually(
            "the server's proxy logged batch's denials",
            Duration::from_secs(10),
            || async {
                let text = std::fs::read_to_string(&log)?;
                let denied = text
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .filter(|e| {
                        e["message"] == "request"
                            && e["authz_decision"] == "deny"
                            && e["authz_policy"] == "no-allow-match"
                            && e["peer_identity"] == json!(batch_id)
                    })
                    .count();
                Ok((denied >= 30).then_some(denied))
            },
        )
        .await,
    );
    eprintln!(
        "scenario a: web {}; batch {}; outsider {}; decisions {:?}; {entries} access-log entries of batch's denials",
        describe(&web),
        describe(&batch),
        describe(&outsider),
        moved(&before, &after)
    );
}

/// Scenario b: a namespace whose default is `deny`; the kubelet's probes still pass.
async fn scenario_b(mesh: &Mesh, pods: &Pods) {
    eprintln!("scenario b: the namespace locked, default-policy deny");
    await_default(mesh, &pods.vault, DefaultPolicy::Deny).await;
    let target = url(mesh, LOCKED, "vault", "/").await;
    let vault_ip = pod_ip(&pods.vault).unwrap();
    let before = mesh.proxy_metrics(&pods.vault).await.unwrap();

    let outsider = send(mesh, &pods.outsider, &target, "GET", 20).await;
    assert_denied(
        &outsider,
        20,
        &["default:deny"],
        "unauthenticated",
        "the unmeshed outsider, to the deny namespace",
    );
    let web_id = spiffe_id(NS, "web");
    let web = send(mesh, &pods.web, &target, "GET", 20).await;
    assert_denied(
        &web,
        20,
        &["default:deny"],
        &web_id,
        "web, meshed, to the deny namespace",
    );

    // The kubelet's probe (plaintext GET /healthz from the node) is served, and counted as a
    // probe; any other plaintext request from the node is refused like the outsider's.
    let probe = or_logs(
        mesh,
        mesh.node
            .http_get(SocketAddr::from((vault_ip, 8080)), "/healthz")
            .await
            .map_err(anyhow::Error::from),
    );
    assert_eq!(
        (probe.status, probe.body.trim()),
        (200, "ok"),
        "the probe path is served under deny"
    );
    let other = or_logs(
        mesh,
        mesh.node
            .http_get(SocketAddr::from((vault_ip, 8080)), "/not-a-probe")
            .await
            .map_err(anyhow::Error::from),
    );
    assert_eq!(
        other.status, 403,
        "another path from the node is refused: {}",
        other.body
    );
    assert!(
        other.body.starts_with("denied by default:deny:"),
        "{}",
        other.body
    );
    let probes = |m: &str| decisions(m, "allow", "probe", "http");
    let (probed, _) = or_logs(
        mesh,
        eventually(
            "the kubelet's probes of the vault are allowed and counted",
            Duration::from_secs(30),
            || async {
                let now = probes(&mesh.proxy_metrics(&pods.vault).await?);
                // The node's own GET, and at least two of the node agent's (1 s period).
                Ok((now >= probes(&before) + 3.0).then_some(now - probes(&before)))
            },
        )
        .await,
    );
    let pod = Api::<Pod>::namespaced(mesh.client(), LOCKED)
        .get(pods.vault.metadata.name.as_deref().unwrap())
        .await
        .unwrap();
    assert!(
        e2e_support::is_ready(&pod),
        "the vault stays Ready under deny: {:?}",
        pod.status
    );
    for path in ["/ready", "/live"] {
        let answer = or_logs(
            mesh,
            mesh.node
                .http_get(SocketAddr::from((vault_ip, ADMIN_PORT)), path)
                .await
                .map_err(anyhow::Error::from),
        );
        assert_eq!(
            answer.status, 200,
            "the proxy's own {path} answers under deny: {}",
            answer.body
        );
    }
    let after = mesh.proxy_metrics(&pods.vault).await.unwrap();
    assert_eq!(
        moved(&before, &after),
        expect(&[("deny", "default:deny", "http", 41)]),
        "the vault's decisions, by label:\n{after}"
    );
    eprintln!(
        "scenario b: outsider {}; web {}; /healthz from the node {} {:?}, /not-a-probe {}; {probed} probes allowed meanwhile; the vault Ready, its proxy's /ready and /live 200",
        describe(&outsider),
        describe(&web),
        probe.status,
        probe.body.trim(),
        other.status
    );

    // An Allow policy on the vault's ServiceAccount, naming web from the other namespace.
    let status = apply_policy(
        mesh,
        LOCKED,
        "allow-web",
        json!({
            "targetRef": {"kind": "ServiceAccount", "name": "vault"},
            "action": "Allow",
            "rules": [{"from": {"serviceAccounts": [{"namespace": NS, "name": "web"}]}}],
        }),
    )
    .await;
    assert_eq!(status["workloads"], json!(["locked/vault"]), "{status}");
    await_loaded(mesh, &pods.vault, "locked/allow-web", true).await;
    let before = mesh.proxy_metrics(&pods.vault).await.unwrap();
    let web = send(mesh, &pods.web, &target, "GET", 20).await;
    assert_allowed(
        &web,
        20,
        "locked-vault",
        "web, allowed into the deny namespace",
    );
    let outsider = send(mesh, &pods.outsider, &target, "GET", 20).await;
    assert_denied(
        &outsider,
        20,
        &["locked/allow-web"],
        "unauthenticated",
        "the outsider, still",
    );
    let after = mesh.proxy_metrics(&pods.vault).await.unwrap();
    assert_eq!(
        moved(&before, &after),
        expect(&[
            ("allow", "locked/allow-web", "http", 20),
            ("deny", "no-allow-match", "http", 20),
        ]),
        "the vault's decisions, by label:\n{after}"
    );
    eprintln!(
        "scenario b: with locked/allow-web, web {}; outsider {}",
        describe(&web),
        describe(&outsider)
    );
}

/// Scenario c: a Deny rule beats an Allow; path and method rules.
async fn scenario_c(mesh: &Mesh, pods: &Pods) {
    eprintln!("scenario c: deny beats allow; paths and methods");
    apply_policy(
        mesh,
        NS,
        "allow-public",
        json!({
            "targetRef": {"kind": "Service", "name": "server"},
            "action": "Allow",
            "rules": [{"to": {
                "paths": [{"type": "Exact", "value": "/public"}],
                "methods": ["GET"],
            }}],
        }),
    )
    .await;
    apply_policy(
        mesh,
        NS,
        "deny-admin",
        json!({
            "targetRef": {"kind": "Service", "name": "server"},
            "action": "Deny",
            "rules": [{
                "from": {"serviceAccounts": [{"name": "web"}]},
                "to": {"paths": [{"type": "PathPrefix", "value": "/admin"}]},
            }],
        }),
    )
    .await;
    await_loaded(mesh, &pods.server, "authz/allow-public", true).await;
    await_loaded(mesh, &pods.server, "authz/deny-admin", true).await;

    let web_id = spiffe_id(NS, "web");
    let batch_id = spiffe_id(NS, "batch");
    let allows = ["authz/allow-public", "authz/allow-web"];
    let before = mesh.proxy_metrics(&pods.server).await.unwrap();
    let admin = url(mesh, NS, "server", "/admin/panel").await;
    let web_admin = send(mesh, &pods.web, &admin, "GET", 20).await;
    assert_denied(
        &web_admin,
        20,
        &["authz/deny-admin"],
        &web_id,
        "web, GET /admin/panel: the Deny rule beats allow-web",
    );
    let elsewhere = url(mesh, NS, "server", "/orders").await;
    let web_orders = send(mesh, &pods.web, &elsewhere, "POST", 20).await;
    assert_allowed(&web_orders, 20, "authz-server", "web, POST /orders");
    let public = url(mesh, NS, "server", "/public").await;
    let get_public = send(mesh, &pods.batch, &public, "GET", 20).await;
    assert_allowed(&get_public, 20, "authz-server", "batch, GET /public");
    let post_public = send(mesh, &pods.batch, &public, "POST", 20).await;
    assert_denied(&post_public, 20, &allows, &batch_id, "batch, POST /public");
    let batch_admin = send(mesh, &pods.batch, &admin, "GET", 20).await;
    assert_denied(
        &batch_admin,
        20,
        &allows,
        &batch_id,
        "batch, GET /admin/panel",
    );
    // The exact path: /public/x is not /public.
    let below = url(mesh, NS, "server", "/public/x").await;
    let get_below = send(mesh, &pods.batch, &below, "GET", 10).await;
    assert_denied(&get_below, 10, &allows, &batch_id, "batch, GET /public/x");
    let after = mesh.proxy_metrics(&pods.server).await.unwrap();
    assert_eq!(
        moved(&before, &after),
        expect(&[
            ("allow", "authz/allow-public", "http", 20),
            ("allow", "authz/allow-web", "http", 20),
            ("deny", "authz/deny-admin", "http", 20),
            ("deny", "no-allow-match", "http", 50),
        ]),
        "the server's decisions, by label:\n{after}"
    );
    eprintln!(
        "scenario c: web GET /admin/panel {}; web POST /orders {}; batch GET /public {}; batch POST /public {}; batch GET /admin/panel {}; batch GET /public/x {}",
        describe(&web_admin),
        describe(&web_orders),
        describe(&get_public),
        describe(&post_public),
        describe(&batch_admin),
        describe(&get_below)
    );
}

/// Asserts that every connection of `stats` was echoed.
fn assert_echoed(stats: &TcpStats, n: u64, line_bytes: u64, what: &str) {
    assert_eq!(
        (stats.total, stats.count("echoed")),
        (n, n),
        "{what}: every connection echoed: {stats:?}"
    );
    assert_eq!(stats.bytes_back, line_bytes, "{what}: {stats:?}");
}

/// Asserts that every connection of `stats` was closed with no byte back.
fn assert_closed(stats: &TcpStats, n: u64, what: &str) {
    assert_eq!(stats.total, n, "{what}: {stats:?}");
    assert_eq!(
        stats.count("closed") + stats.count("reset"),
        n,
        "{what}: every connection closed by the mesh, none left hanging: {stats:?}"
    );
    assert_eq!(stats.bytes_back, 0, "{what}: no byte came back: {stats:?}");
}

/// The bytes `n` echoed connections bring back: `tandem-tcp-<i>\n` for i in 0..n.
fn echo_bytes(n: u64) -> u64 {
    (0..n)
        .map(|i| format!("tandem-tcp-{i}\n").len() as u64)
        .sum()
}

/// Scenario d: an opaque TCP port, allowed and denied per connection.
async fn scenario_d(mesh: &Mesh, pods: &Pods) {
    eprintln!("scenario d: opaque TCP on the Service echo");
    const N: u64 = 10;
    let ip = mesh.cluster_ip(NS, "echo").await.unwrap();
    let target = format!("{ip}:7000");
    let tcp = |client: &Pod| {
        let target = target.clone();
        let client = client.clone();
        async move { or_logs(mesh, mesh.tcp_burst(&client, &target, N, 2).await) }
    };
    let before = mesh.proxy_metrics(&pods.server).await.unwrap();
    assert_echoed(&tcp(&pods.web).await, N, echo_bytes(N), "web, no policy");
    assert_echoed(
        &tcp(&pods.batch).await,
        N,
        echo_bytes(N),
        "batch, no policy",
    );
    let after = mesh.proxy_metrics(&pods.server).await.unwrap();
    assert_eq!(
        moved(&before, &after),
        expect(&[("allow", "default:all-unauthenticated", "tcp", 2 * N)]),
        "no policy covers port 7000 yet (those on the Service server cover 8080 only):\n{after}"
    );

    apply_policy(
        mesh,
        NS,
        "echo-deny-batch",
        json!({
            "targetRef": {"kind": "Service", "name": "echo"},
            "action": "Deny",
            "rules": [{"from": {"serviceAccounts": [{"name": "batch"}]}}],
        }),
    )
    .await;
    await_loaded(mesh, &pods.server, "authz/echo-deny-batch", true).await;
    let before = mesh.proxy_metrics(&pods.server).await.unwrap();
    let web = tcp(&pods.web).await;
    assert_echoed(&web, N, echo_bytes(N), "web, batch denied");
    let batch = tcp(&pods.batch).await;
    assert_closed(&batch, N, "batch, denied");
    let after = mesh.proxy_metrics(&pods.server).await.unwrap();
    assert_eq!(
        moved(&before, &after),
        expect(&[
            ("allow", "default:all-unauthenticated", "tcp", N),
            ("deny", "authz/echo-deny-batch", "tcp", N),
        ]),
        "the server's decisions, by label:\n{after}"
    );
    eprintln!("scenario d: with echo-deny-batch, web {web:?}; batch {batch:?}");

    apply_policy(
        mesh,
        NS,
        "echo-allow-web",
        json!({
            "targetRef": {"kind": "Service", "name": "echo", "ports": [7000]},
            "action": "Allow",
            "rules": [{"from": {"serviceAccounts": [{"name": "web"}]}}],
        }),
    )
    .await;
    await_loaded(mesh, &pods.server, "authz/echo-allow-web", true).await;
    let before = mesh.proxy_metrics(&pods.server).await.unwrap();
    let web = tcp(&pods.web).await;
    assert_echoed(&web, N, echo_bytes(N), "web, allowed");
    let outsider = tcp(&pods.outsider).await;
    assert_closed(&outsider, N, "the unmeshed outsider, no Allow rule matches");
    let batch = tcp(&pods.batch).await;
    assert_closed(&batch, N, "batch, the Deny policy first");
    let after = mesh.proxy_metrics(&pods.server).await.unwrap();
    assert_eq!(
        moved(&before, &after),
        expect(&[
            ("allow", "authz/echo-allow-web", "tcp", N),
            ("deny", "authz/echo-deny-batch", "tcp", N),
            ("deny", "no-allow-match", "tcp", N),
        ]),
        "the server's decisions, by label:\n{after}"
    );
    eprintln!(
        "scenario d: with echo-allow-web too, web {web:?}; outsider {outsider:?}; batch {batch:?}"
    );
}

/// Requests summed over bursts.
#[derive(Debug, Default)]
struct Load {
    bursts: u64,
    total: u64,
    ok: u64,
    by_status: BTreeMap<String, u64>,
    by_header: BTreeMap<String, u64>,
}

impl Load {
    fn add(&mut self, stats: &ClientStats) {
        self.bursts += 1;
        self.total += stats.total;
        self.ok += stats.ok;
        for (k, v) in &stats.by_status {
            *self.by_status.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &stats.by_header {
            *self.by_header.entry(k.clone()).or_default() += v;
        }
    }
}

/// Scenario e: an Allow policy naming web created and deleted, three times, while web sends
/// steadily (4 at once, 100/s) to a port it may call anyway (the default, all-unauthenticated).
async fn scenario_e(mesh: &Mesh, pods: &Pods) {
    eprintln!("scenario e: steady-allow-web created and deleted under load, three times");
    const POLICY: &str = "authz/steady-allow-web";
    /// Requests each side of every switch must see decided, at the least.
    const EACH_SIDE: f64 = 50.0;
    let target = url(mesh, NS, "steady", "/").await;
    let before = mesh.proxy_metrics(&pods.server).await.unwrap();
    let by_policy = |m: &str| decisions(m, "allow", POLICY, "http");
    let by_default = |m: &str| decisions(m, "allow", "default:all-unauthenticated", "http");
    // Waits until `series` has counted EACH_SIDE more requests than at `mark`.
    let more = |what: &'static str, series: fn(&str) -> f64, mark: String| async move {
        or_logs(
            mesh,
            eventually(what, PROPAGATION, || async {
                let now = series(&mesh.proxy_metrics(&pods.server).await?);
                Ok((now >= series(&mark) + EACH_SIDE).then_some(()))
            })
            .await,
        );
    };
    let done = AtomicBool::new(false);
    let steps = async {
        let began = Instant::now();
        let mut switches = Vec::new();
        more(
            "requests allowed by the default",
            by_default,
            before.clone(),
        )
        .await;
        for _ in 0..3 {
            apply_policy(
                mesh,
                NS,
                "steady-allow-web",
                json!({
                    "targetRef": {"kind": "Service", "name": "steady"},
                    "action": "Allow",
                    "rules": [{"from": {"serviceAccounts": [{"name": "web"}]}}],
                }),
            )
            .await;
            let config = await_loaded(mesh, &pods.server, POLICY, true).await;
            let ports = config
                .authorization
                .policies
                .iter()
                .find(|p| p.name == POLICY)
                .map(|p| p.ports.clone());
            assert_eq!(ports, Some(vec![8081]), "{:?}", config.authorization);
            switches.push(began.elapsed());
            let mark = mesh.proxy_metrics(&pods.server).await.unwrap();
            more("requests allowed by the policy", by_policy, mark).await;
            delete_policy(mesh, NS, "steady-allow-web").await;
            await_loaded(mesh, &pods.server, POLICY, false).await;
            switches.push(began.elapsed());
            let mark = mesh.proxy_metrics(&pods.server).await.unwrap();
            more("requests allowed by the default again", by_default, mark).await;
        }
        done.store(true, Ordering::Relaxed);
        switches
    };
    let load = async {
        let mut load = Load::default();
        while !done.load(Ordering::Relaxed) {
            let ask = Burst::new(&target, 50)
                .concurrency(4)
                .rps(100)
                .header(DENIED_BY_HEADER);
            let stats = or_logs(mesh, mesh.burst_with(&pods.web, &ask).await);
            load.add(&stats);
        }
        load
    };
    let (load, switches) = tokio::join!(load, steps);
    let after = mesh.proxy_metrics(&pods.server).await.unwrap();
    let decided = moved(&before, &after);
    let denied: f64 = decided
        .iter()
        .filter(|((decision, _, _), _)| decision == "deny")
        .map(|(_, n)| n)
        .sum::<f64>()
        + 0.0;
    let under_policy = by_policy(&after) - by_policy(&before);
    let under_default = by_default(&after) - by_default(&before);
    assert!(load.total > 0);
    assert_eq!(
        (load.ok, load.by_status.get("403").copied().unwrap_or(0)),
        (load.total, 0),
        "no request wrongly denied (or failed) while the policy came and went: {load:?}"
    );
    assert_eq!(
        denied, 0.0,
        "the server's proxy denied nothing: {decided:?}"
    );
    assert_eq!(
        under_policy + under_default,
        load.total as f64,
        "every request was decided once, by the policy or the default: {decided:?}"
    );
    assert!(
        under_policy >= 3.0 * EACH_SIDE && under_default >= 4.0 * EACH_SIDE,
        "requests were allowed on both sides of each switch: {decided:?}"
    );
    eprintln!(
        "scenario e: policy in force (loaded by the server's proxy) from/to {:?} s; web sent {} requests in {} bursts: {} ok, {} denied (403); the server's proxy allowed {under_policy} by {POLICY} and {under_default} by the default, denied {denied}",
        switches
            .iter()
            .map(|t| format!("{:.1}", t.as_secs_f64()))
            .collect::<Vec<_>>(),
        load.total,
        load.bursts,
        load.ok,
        load.by_status.get("403").copied().unwrap_or(0)
    );
}

/// Scenario f: policies the operator cannot apply get `Accepted=False` with a reason, reach no
/// proxy, and leave the others working.
async fn scenario_f(mesh: &Mesh, pods: &Pods) {
    eprintln!("scenario f: an invalid and a dangling policy beside the working ones");
    let loaded_before = mesh.proxy_loaded(&pods.server).await.unwrap().unwrap();
    let names = |c: &ProxyConfig| -> Vec<String> {
        c.authorization
            .policies
            .iter()
            .map(|p| p.name.clone())
            .collect()
    };
    let bad = [
        (
            "echo-paths",
            json!({
                "targetRef": {"kind": "Service", "name": "echo"},
                "action": "Allow",
                "rules": [{"to": {"paths": [{"type": "Exact", "value": "/x"}]}}],
            }),
            "Invalid",
            "HTTP",
        ),
        (
            "ghost",
            json!({
                "targetRef": {"kind": "Service", "name": "ghost"},
                "action": "Deny",
                "rules": [{}],
            }),
            "TargetNotFound",
            "ghost",
        ),
    ];
    for (name, spec, reason, says) in &bad {
        let object = json!({
            "apiVersion": "tandem.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": NS},
            "spec": spec,
        });
        or_logs(
            mesh,
            e2e_support::apply_value(&mesh.client(), &object).await,
        );
        let ((status, got, message), took) = or_logs(
            mesh,
            eventually(
                &format!("{NS}/{name} Accepted=False"),
                PROPAGATION,
                || async {
                    Ok(mesh
                        .policy_condition("authorizationpolicies", NS, name, "Accepted")
                        .await?
                        .filter(|(status, _, _)| status == "False"))
                },
            )
            .await,
        );
        assert_eq!(
            (status.as_str(), got.as_str()),
            ("False", *reason),
            "{name}: {message}"
        );
        assert!(
            message.contains(says),
            "{name}: the message says why: {message}"
        );
        eprintln!(
            "  {NS}/{name}: Accepted=False {got} after {:.1} s: {message}",
            took.as_secs_f64()
        );
    }
    // The others still work, and the proxy runs the same policies.
    let target = url(mesh, NS, "server", "/").await;
    let web = send(mesh, &pods.web, &target, "GET", 20).await;
    assert_allowed(&web, 20, "authz-server", "web, beside the refused policies");
    let batch = send(mesh, &pods.batch, &target, "GET", 20).await;
    assert_denied(
        &batch,
        20,
        &["authz/allow-public", "authz/allow-web"],
        &spiffe_id(NS, "batch"),
        "batch, beside the refused policies",
    );
    let ip = mesh.cluster_ip(NS, "echo").await.unwrap();
    let echo = or_logs(
        mesh,
        mesh.tcp_burst(&pods.web, &format!("{ip}:7000"), 10, 2)
            .await,
    );
    assert_echoed(
        &echo,
        10,
        echo_bytes(10),
        "web's TCP, beside the refused policies",
    );
    let loaded = mesh.proxy_loaded(&pods.server).await.unwrap().unwrap();
    assert_eq!(
        names(&loaded),
        names(&loaded_before),
        "the refused policies reached no proxy"
    );
    eprintln!(
        "scenario f: web {}; batch {}; web's TCP {echo:?}; the server's proxy runs {:?}",
        describe(&web),
        describe(&batch),
        names(&loaded)
    );
}

/// `%XX` escapes decoded (gRPC's `grpc-message` encoding).
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Asserts that every call of `stats` ended in a trailers-only PERMISSION_DENIED naming
/// `policy` (`by_header` holds `grpc-status|tandem-denied-by|grpc-message`).
fn assert_permission_denied(stats: &ClientStats, n: u64, policy: &str, caller: &str, what: &str) {
    assert_eq!(
        (stats.total, stats.by_status.get("200").copied()),
        (n, Some(n)),
        "{what}: gRPC answers over HTTP 200: {}",
        describe(stats)
    );
    assert_eq!(stats.by_header.len(), 1, "{what}: {:?}", stats.by_header);
    let seen = stats.by_header.keys().next().unwrap();
    let parts: Vec<&str> = seen.split('|').collect();
    let message = percent_decoded(parts.get(2).copied().unwrap_or_default());
    assert_eq!(
        parts[..2],
        ["7", policy],
        "{what}: grpc-status 7 and {DENIED_BY_HEADER} {policy}: {seen}"
    );
    assert!(
        message.starts_with(&format!("denied by {policy}:")) && message.contains(caller),
        "{what}: grpc-message names the policy and the caller ({caller}): {message:?}"
    );
    assert_eq!(
        stats.by_body.keys().collect::<Vec<_>>(),
        [""],
        "{what}: the app never answered: {:?}",
        stats.by_body
    );
}

/// Scenario g: gRPC calls allowed and refused with PERMISSION_DENIED.
async fn scenario_g(mesh: &Mesh, pods: &Pods) {
    eprintln!("scenario g: gRPC on the Service grpc");
    const POLICY: &str = "authz/grpc-allow-web";
    apply_policy(
        mesh,
        NS,
        "grpc-allow-web",
        json!({
            "targetRef": {"kind": "Service", "name": "grpc"},
            "action": "Allow",
            "rules": [{
                "from": {"serviceAccounts": [{"name": "web"}]},
                "to": {
                    "methods": ["POST"],
                    "paths": [{"type": "PathPrefix", "value": "/tandem.Echo"}],
                },
            }],
        }),
    )
    .await;
    await_loaded(mesh, &pods.server, POLICY, true).await;
    let call = |client: &Pod, method: &str| {
        let client = client.clone();
        let method = method.to_owned();
        async move {
            let ip = mesh.cluster_ip(NS, "grpc").await.unwrap();
            let target = format!("http://{ip}:9000{method}");
            let ask = Burst::new(&target, 20)
                .concurrency(2)
                .grpc()
                .header(&format!("grpc-status,{DENIED_BY_HEADER},grpc-message"));
            or_logs(mesh, mesh.burst_with(&client, &ask).await)
        }
    };
    let before = mesh.proxy_metrics(&pods.server).await.unwrap();
    let web = call(&pods.web, "/tandem.Echo/Say").await;
    assert_eq!(
        (web.total, web.ok, web.by_body.get("authz-server").copied()),
        (20, 20, Some(20)),
        "web's calls reach the server: {}\n{}",
        describe(&web),
        mesh.logs()
    );
    assert_eq!(
        web.by_header.keys().collect::<Vec<_>>(),
        ["||"],
        "no grpc-status or denial on web's calls: {:?}",
        web.by_header
    );
    let batch = call(&pods.batch, "/tandem.Echo/Say").await;
    assert_permission_denied(&batch, 20, POLICY, &spiffe_id(NS, "batch"), "batch");
    let other = call(&pods.web, "/tandem.Admin/Drop").await;
    assert_permission_denied(
        &other,
        20,
        POLICY,
        &spiffe_id(NS, "web"),
        "web, another service path",
    );
    let after = mesh.proxy_metrics(&pods.server).await.unwrap();
    assert_eq!(
        moved(&before, &after),
        expect(&[
            ("allow", POLICY, "grpc", 20),
            ("deny", "no-allow-match", "grpc", 40),
        ]),
        "the server's decisions, by label:\n{after}"
    );
    eprintln!(
        "scenario g: web /tandem.Echo/Say {}; batch /tandem.Echo/Say {}; web /tandem.Admin/Drop {}",
        describe(&web),
        describe(&batch),
        describe(&other)
    );
}

/// Scenario h: a new workload behind the protected Service is protected from its first request.
async fn scenario_h(mesh: &Mesh, pods: &Pods) {
    eprintln!("scenario h: a second workload joins the Service server under load");
    let account = json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "server-v2", "namespace": NS},
    });
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "server-v2", "namespace": NS},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "server", "version": "v2"}},
            "template": {
                "metadata": {"labels": {"app": "server", "version": "v2"}},
                "spec": {
                    "serviceAccountName": "server-v2",
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "server",
                        "image": e2e_support::TESTAPP_IMAGE,
                        "args": ["server", "--listen", "0.0.0.0:8080", "--name", "authz-server-v2"],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {
                            "httpGet": {"path": "/healthz", "port": "http"},
                            "periodSeconds": 1,
                        },
                        "securityContext": {
                            "runAsUser": 1000,
                            "runAsGroup": 1000,
                            "runAsNonRoot": true,
                            "allowPrivilegeEscalation": false,
                        },
                    }],
                },
            },
        },
    });
    let target = url(mesh, NS, "server", "/").await;
    let done = AtomicBool::new(false);
    let steps = async {
        let began = Instant::now();
        or_logs(
            mesh,
            e2e_support::apply_value(&mesh.client(), &account).await,
        );
        or_logs(
            mesh,
            e2e_support::apply_value(&mesh.client(), &deployment).await,
        );
        let v2 = or_logs(
            mesh,
            mesh.ready_pods(NS, "version=v2", 1, Duration::from_secs(90))
                .await,
        )
        .remove(0);
        let ready = began.elapsed();
        // Web reaches the new pod through the Service (its endpoint is published).
        let (_, reached) = or_logs(
            mesh,
            eventually("web's requests reach server-v2", PROPAGATION, || async {
                let stats = mesh
                    .burst_with(&pods.web, &Burst::new(&target, 20).concurrency(2))
                    .await?;
                Ok(stats.by_body.contains_key("authz-server-v2").then_some(()))
            })
            .await,
        );
        // And batch's have reached it too, and were denied there.
        or_logs(
            mesh,
            eventually(
                "server-v2's proxy denied batch's requests",
                PROPAGATION,
                || async {
                    let metrics = mesh.proxy_metrics(&v2).await?;
                    Ok(
                        (decisions(&metrics, "deny", "no-allow-match", "http") >= 10.0)
                            .then_some(()),
                    )
                },
            )
            .await,
        );
        done.store(true, Ordering::Relaxed);
        (v2, ready, reached)
    };
    let load = async {
        let mut load = Load::default();
        while !done.load(Ordering::Relaxed) {
            let ask = Burst::new(&target, 20)
                .concurrency(2)
                .rps(50)
                .header(DENIED_BY_HEADER);
            let stats = or_logs(mesh, mesh.burst_with(&pods.batch, &ask).await);
            load.add(&stats);
        }
        load
    };
    let (load, (v2, ready, reached)) = tokio::join!(load, steps);
    assert!(load.total > 0);
    assert_eq!(
        load.by_status.get("403").copied(),
        Some(load.total),
        "none of batch's requests got through, to either workload: {load:?}"
    );
    let config = mesh.proxy_loaded(&v2).await.unwrap().unwrap();
    let names: Vec<&str> = config
        .authorization
        .policies
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(
        names,
        ["authz/allow-public", "authz/allow-web", "authz/deny-admin"],
        "server-v2's proxy runs the Service's policies"
    );
    let v2_metrics = mesh.proxy_metrics(&v2).await.unwrap();
    let denied_there = decisions(&v2_metrics, "deny", "no-allow-match", "http");
    for policy in ["allow-web", "allow-public", "deny-admin"] {
        let (status, _) = or_logs(
            mesh,
            eventually(
                &format!("{NS}/{policy} lists server-v2"),
                PROPAGATION,
                || async {
                    let object = mesh
                        .policy_object("authorizationpolicies", NS, policy)
                        .await?;
                    Ok(object
                        .map(|o| o.data["status"].clone())
                        .filter(|s| s["workloads"] == json!(["authz/server", "authz/server-v2"])))
                },
            )
            .await,
        );
        assert!(
            status["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Programmed" && c["status"] == "True"),
            "{policy}: {status}"
        );
    }
    // server-v2 removed: the policies' status and the ConfigMaps follow.
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(mesh.client(), NS);
    or_logs(
        mesh,
        deployments
            .delete("server-v2", &DeleteParams::default())
            .await
            .map(|_| ())
            .map_err(anyhow::Error::from),
    );
    let (_, left) = or_logs(
        mesh,
        eventually(
            "the policies list only authz/server, and server-v2's ConfigMap is gone",
            PROPAGATION,
            || async {
                for policy in ["allow-web", "allow-public", "deny-admin"] {
                    let status = mesh
                        .policy_object("authorizationpolicies", NS, policy)
                        .await?
                        .map(|o| o.data["status"]["workloads"].clone());
                    if status != Some(json!(["authz/server"])) {
                        return Ok(None);
                    }
                }
                Ok(mesh
                    .operator_config(NS, "server-v2")
                    .await?
                    .is_none()
                    .then_some(()))
            },
        )
        .await,
    );
    eprintln!(
        "scenario h: server-v2 deleted: the policies list only authz/server again and its ConfigMap is gone {:.1} s later",
        left.as_secs_f64()
    );
    eprintln!(
        "scenario h: server-v2 Ready {:.1} s after its apply, reached by web {:.1} s later; batch sent {} requests meanwhile: {:?}, {denied_there} denied by server-v2's proxy; the three policies list authz/server and authz/server-v2",
        ready.as_secs_f64(),
        reached.as_secs_f64(),
        load.total,
        load.by_status
    );
}

/// One question for `tandemctl explain` and the real traffic that answers it.
struct Question {
    caller: &'static str,
    port: u16,
    /// `(method, path)`; `None`: an opaque TCP connection.
    http: Option<(&'static str, &'static str)>,
}

/// Runs `tandemctl explain <server pod> --from … -o json`; returns (exit code, decision).
async fn explain(
    mesh: &Mesh,
    tandemctl: &std::path::Path,
    pod: &Pod,
    q: &Question,
) -> (i32, Value) {
    let mut command = tokio::process::Command::new(tandemctl);
    command
        .arg("explain")
        .arg(pod.metadata.name.as_deref().unwrap())
        .args([
            "-n",
            NS,
            "--from",
            q.caller,
            "--port",
            &q.port.to_string(),
            "-o",
            "json",
        ])
        .arg("--kubeconfig")
        .arg(mesh.cluster.admin_kubeconfig());
    if let Some((method, path)) = q.http {
        command.args(["--method", method, "--path", path]);
    }
    let output = or_logs(mesh, command.output().await.map_err(anyhow::Error::from));
    let code = output.status.code().unwrap_or(-1);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "tandemctl explain printed no JSON ({e}), exit {code}: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (code, report["decision"].clone())
}

/// Scenario i: what `tandemctl explain` says is what the proxy does.
async fn scenario_i(mesh: &Mesh, pods: &Pods) {
    eprintln!("scenario i: tandemctl explain against the proxy's own decisions");
    let tandemctl = or_logs(
        mesh,
        tandem_tests::install::workspace_binary("tandemctl", "tandemctl")
            .map_err(anyhow::Error::from),
    );
    let callers: BTreeMap<&str, &Pod> = [
        ("authz/web", &pods.web),
        ("authz/batch", &pods.batch),
        ("unauthenticated", &pods.outsider),
    ]
    .into();
    let http = |caller, method, path| Question {
        caller,
        port: 8080,
        http: Some((method, path)),
    };
    let tcp = |caller| Question {
        caller,
        port: 7000,
        http: None,
    };
    let questions = [
        http("authz/web", "GET", "/admin/panel"),
        http("authz/web", "POST", "/orders"),
        http("authz/batch", "GET", "/public"),
        http("authz/batch", "POST", "/public"),
        http("authz/batch", "GET", "/"),
        http("unauthenticated", "GET", "/public"),
        http("unauthenticated", "DELETE", "/public"),
        tcp("authz/web"),
        tcp("authz/batch"),
        tcp("unauthenticated"),
    ];
    let echo = format!("{}:7000", mesh.cluster_ip(NS, "echo").await.unwrap());
    let mut table = Vec::new();
    for q in &questions {
        let (code, decision) = explain(mesh, &tandemctl, &pods.server, q).await;
        let allowed = decision["allowed"].as_bool();
        let client = callers[q.caller];
        let (did_allow, header) = match q.http {
            Some((method, path)) => {
                let target = url(mesh, NS, "server", path).await;
                let stats = send(mesh, client, &target, method, 5).await;
                let denied = stats.by_status.get("403").copied() == Some(5);
                assert!(
                    denied || stats.ok == 5,
                    "{} {method} {path}: all allowed or all denied: {}",
                    q.caller,
                    describe(&stats)
                );
                (
                    !denied,
                    stats.by_header.keys().next().cloned().unwrap_or_default(),
                )
            }
            None => {
                let stats = or_logs(mesh, mesh.tcp_burst(client, &echo, 5, 1).await);
                let echoed = stats.count("echoed") == 5;
                assert!(
                    echoed || stats.bytes_back == 0,
                    "{} TCP: all echoed or all closed: {stats:?}",
                    q.caller
                );
                (echoed, String::new())
            }
        };
        let what = format!(
            "{} {}",
            q.caller,
            q.http
                .map_or("TCP 7000".to_owned(), |(m, p)| format!("{m} {p}"))
        );
        assert_eq!(
            (allowed, code),
            (Some(did_allow), if did_allow { 0 } else { 1 }),
            "{what}: explain says {decision}, the proxy {}",
            if did_allow { "allowed it" } else { "denied it" }
        );
        if q.http.is_some() && !did_allow {
            assert_eq!(
                decision["deniedByHeader"].as_str(),
                Some(header.as_str()),
                "{what}: explain's tandem-denied-by is the proxy's: {decision}"
            );
        }
        table.push(format!(
            "{what}: {} ({})",
            if did_allow { "allowed" } else { "denied" },
            decision["decidedBy"]["policy"]
                .as_str()
                .or(decision["decidedBy"]["kind"].as_str())
                .unwrap_or_default()
        ));
    }
    eprintln!(
        "scenario i: explain and the proxy agree on {}",
        table.join("; ")
    );
}
