//! `tandemctl explain` against a real kube-apiserver: the objects a cluster holds (a Namespace
//! with a default-deny annotation, an injected pod, its proxy ConfigMap rendered from the
//! contract types, AuthorizationPolicies with the status an operator writes), the real binary
//! run on them, and its table and JSON compared with the golden files in `tests/golden/`
//! (`TANDEM_UPDATE_GOLDEN=1` rewrites them; review the diff).
//!
//! Nothing is normalised: every name, time and version in the output is set by this test.

// In a test, a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tandem_crds::contract::{
    self, AuthorizationAction, AuthorizationPolicy as Rendered, AuthorizationRule, Callers,
    DefaultPolicy, Endpoint, Operations, PathMatch, Protocol, ProxyConfig, ServicePort, Workload,
};
use tandem_crds::names;
use tandem_crds::v1alpha1::AuthorizationPolicy;
use tandem_tests::{ControlPlane, ControlPlaneOptions, install};

const NS: &str = "shop";

/// What one run of the binary did.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn tandemctl(kubeconfig: &Path, args: &[&str]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_tandemctl"))
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        // The test's own environment must not pick another cluster or context.
        .env_remove("KUBECONFIG")
        .output()
        .expect("run tandemctl");
    Run {
        code: output.status.code().expect("exited, not killed"),
        stdout: String::from_utf8(output.stdout).expect("UTF-8 stdout"),
        stderr: String::from_utf8(output.stderr).expect("UTF-8 stderr"),
    }
}

/// `kubectl tandem <args>` with `kubectl-tandem` on PATH; its stdout.
fn kubectl_plugin(kubeconfig: &Path, args: &[&str]) -> String {
    let plugin_dir = Path::new(env!("CARGO_BIN_EXE_kubectl-tandem"))
        .parent()
        .expect("the plugin's directory")
        .to_owned();
    let path = std::env::join_paths(std::iter::once(plugin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let output = Command::new(tandem_tests::cluster::kubectl_binary())
        .arg("tandem")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .env("PATH", path)
        .env_remove("KUBECONFIG")
        .output()
        .expect("run kubectl");
    assert!(
        output.status.success(),
        "kubectl tandem: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 stdout")
}

fn golden_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// Compares with the golden file, or rewrites it under `TANDEM_UPDATE_GOLDEN=1`.
fn assert_golden(name: &str, actual: &str) {
    let path = golden_path(name);
    if std::env::var_os("TANDEM_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (TANDEM_UPDATE_GOLDEN=1 writes it)", path.display()));
    assert!(
        expected == actual,
        "{name} differs from the golden file {}\n--- expected\n{expected}\n--- actual\n{actual}",
        path.display()
    );
}

async fn create<K>(api: &Api<K>, value: Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).unwrap();
    api.create(&PostParams::default(), &object).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// The cluster's objects

fn injected_pod() -> Value {
    json!({
        "metadata": {
            "name": "web-0",
            "labels": {"app": "web"},
            "annotations": {names::PROXY_VERSION_ANNOTATION: "0.1.0"}
        },
        "spec": {
            "serviceAccountName": "web",
            "initContainers": [
                {"name": names::INIT_CONTAINER, "image": "tandem-proxy:0.1.0", "args": ["init"]},
                {"name": names::PROXY_CONTAINER, "image": "tandem-proxy:0.1.0",
                 "restartPolicy": "Always",
                 "env": [{"name": "TANDEM_APP_PROBES", "value": r#"[{"port":8080,"path":"/ready"}]"#}]}
            ],
            "containers": [{
                "name": "app", "image": "web:1",
                "ports": [{"containerPort": 8080, "name": "http"}],
                "readinessProbe": {"httpGet": {"port": "http", "path": "/ready"}}
            }]
        }
    })
}

fn principal(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// The config the operator would render for shop/web, built with the contract types.
fn proxy_config() -> ProxyConfig {
    let mut config = ProxyConfig::new(Workload {
        namespace: NS.into(),
        service_account: "web".into(),
        mtls: contract::MtlsMode::Permissive,
    });
    config.version = "3f9a1c".into();
    config.authorization.default_policy = DefaultPolicy::Deny;
    config.authorization.policies = vec![
        Rendered {
            name: "shop/allow-web".into(),
            action: AuthorizationAction::Allow,
            ports: vec![8080],
            rules: vec![
                AuthorizationRule {
                    from: Some(Callers {
                        principals: vec![principal(NS, "frontend")],
                        namespaces: vec!["batch".into()],
                        ..Callers::default()
                    }),
                    to: None,
                },
                AuthorizationRule {
                    from: Some(Callers {
                        principals: vec![principal(NS, "admin")],
                        ..Callers::default()
                    }),
                    to: Some(Operations {
                        methods: vec!["GET".into()],
                        paths: vec![PathMatch::Prefix("/api".into())],
                        ..Operations::default()
                    }),
                },
            ],
        },
        Rendered {
            name: "shop/deny-batch".into(),
            action: AuthorizationAction::Deny,
            ports: vec![],
            rules: vec![AuthorizationRule {
                from: Some(Callers {
                    principals: vec![principal("batch", "cron")],
                    ..Callers::default()
                }),
                to: None,
            }],
        },
    ];
    config.services = vec![contract::Service {
        name: "db".into(),
        namespace: NS.into(),
        cluster_ips: vec!["10.96.0.20".parse().unwrap()],
        ports: vec![ServicePort {
            name: "pg".into(),
            port: 5432,
            protocol: Protocol::Tcp,
            endpoints: vec![Endpoint {
                address: "10.244.0.12:5432".parse().unwrap(),
                meshed: true,
                identity: Some(principal(NS, "db")),
                workload: None,
            }],
        }],
        ..contract::Service::default()
    }];
    config.validate().unwrap();
    config
}

fn policy(name: &str, kind: &str, target: &str, action: &str, rules: Value) -> Value {
    json!({
        "apiVersion": "tandem.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name},
        "spec": {"targetRef": {"kind": kind, "name": target}, "action": action, "rules": rules}
    })
}

fn condition(type_: &str, status: &str, reason: &str, message: &str) -> Value {
    json!({"type": type_, "status": status, "reason": reason, "message": message,
           "lastTransitionTime": "2026-12-01T10:00:00Z", "observedGeneration": 1})
}

async fn set_status(api: &Api<AuthorizationPolicy>, name: &str, status: Value) {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .unwrap();
}

/// Everything a cluster with Tandem holds about shop/web-0.
async fn populate(client: &kube::Client) {
    install::install_crds(client).await.unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    create(
        &namespaces,
        json!({"metadata": {"name": NS,
            "labels": {names::INJECT_LABEL: names::INJECT_ENABLED},
            "annotations": {names::DEFAULT_POLICY_ANNOTATION: "deny"}}}),
    )
    .await;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
    create(&accounts, json!({"metadata": {"name": "web"}})).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    create(&pods, injected_pod()).await;
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    for (name, app) in [("web", "web"), ("admin", "admin")] {
        create(
            &services,
            json!({"metadata": {"name": name},
                   "spec": {"selector": {"app": app}, "ports": [{"port": 80, "targetPort": 8080}]}}),
        )
        .await;
    }
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    create(
        &config_maps,
        json!({"metadata": {"name": names::config_map_name("web")},
               "data": {names::CONFIG_KEY: proxy_config().to_json()}}),
    )
    .await;

    let policies: Api<AuthorizationPolicy> = Api::namespaced(client.clone(), NS);
    let frontend = json!([{"from": {"principals": [principal(NS, "frontend")], "namespaces": ["batch"]}},
                          {"from": {"principals": [principal(NS, "admin")]},
                           "to": {"methods": ["GET"], "paths": [{"type": "PathPrefix", "value": "/api"}]}}]);
    create(
        &policies,
        policy("allow-web", "Service", "web", "Allow", frontend),
    )
    .await;
    create(
        &policies,
        policy(
            "deny-batch",
            "ServiceAccount",
            "web",
            "Deny",
            json!([{"from": {"principals": [principal("batch", "cron")]}}]),
        ),
    )
    .await;
    create(
        &policies,
        policy("allow-metrics", "ServiceAccount", "web", "Allow",
               json!([{"from": {"namespaces": ["monitoring"]}, "to": {"ports": [9090], "methods": ["GET"]}}])),
    )
    .await;
    // Targets a Service that does not select web-0: not this pod's business.
    create(
        &policies,
        policy(
            "allow-admin",
            "Service",
            "admin",
            "Allow",
            json!([{"from": {"authenticated": true}}]),
        ),
    )
    .await;
    let programmed = |workloads: Value| {
        json!({"observedGeneration": 1, "workloads": workloads, "conditions": [
            condition("Accepted", "True", "Accepted", "the policy is valid"),
            condition("Programmed", "True", "Programmed", "1 of 1 ConfigMaps carry it")]})
    };
    set_status(&policies, "allow-web", programmed(json!(["shop/web"]))).await;
    set_status(&policies, "deny-batch", programmed(json!(["shop/web"]))).await;
    set_status(&policies, "allow-admin", programmed(json!(["shop/admin"]))).await;
    set_status(
        &policies,
        "allow-metrics",
        json!({"observedGeneration": 1, "workloads": [], "conditions": [
            condition("Accepted", "False", "Invalid",
                      "rules[0].to.ports[0]: 9090 is not a port of any pod running as web"),
            condition("Programmed", "False", "Invalid", "not accepted")]}),
    )
    .await;
}

/// A kubeconfig for a new ServiceAccount of `shop`; `reader`: with a Role granting what
/// `explain` reads in the namespace (no Namespace access: that needs a ClusterRole).
async fn service_account_kubeconfig(cluster: &ControlPlane, name: &str, reader: bool) -> PathBuf {
    let client = cluster.client();
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
    create(&accounts, json!({"metadata": {"name": name}})).await;
    if reader {
        let roles: Api<Role> = Api::namespaced(client.clone(), NS);
        create(
            &roles,
            json!({"metadata": {"name": name}, "rules": [
                {"apiGroups": [""], "resources": ["pods", "configmaps"], "verbs": ["get"]},
                {"apiGroups": [""], "resources": ["services"], "verbs": ["list"]},
                {"apiGroups": ["tandem.dev"], "resources": ["authorizationpolicies"], "verbs": ["list"]}]}),
        )
        .await;
        let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), NS);
        create(
            &bindings,
            json!({"metadata": {"name": name},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                   "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": NS}]}),
        )
        .await;
    }
    let path = cluster.dir().join(format!("{name}.kubeconfig"));
    cluster
        .service_account_kubeconfig(NS, name, Duration::from_secs(3600), &path)
        .await
        .unwrap();
    path
}

async fn start() -> ControlPlane {
    let cluster = ControlPlane::start(ControlPlaneOptions::default())
        .await
        .unwrap_or_else(|e| panic!("the control plane did not start: {e}"));
    populate(&cluster.client()).await;
    cluster
}

// ---------------------------------------------------------------------------------------------
// The scenarios

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make test-tandemctl"]
async fn explain_shows_the_chain_from_policy_to_config_and_decides_as_the_proxy_would() {
    let cluster = start().await;
    let kubeconfig = cluster.admin_kubeconfig();
    let explain = |args: &[&str]| {
        let mut all = vec!["explain", "web-0", "-n", NS];
        all.extend_from_slice(args);
        tandemctl(&kubeconfig, &all)
    };

    let table = explain(&[]);
    assert_eq!((table.code, table.stderr.as_str()), (0, ""));
    assert_golden("explain.txt", &table.stdout);
    // The same program as a kubectl plugin, found on PATH as kubectl finds plugins.
    let plugin = kubectl_plugin(&kubeconfig, &["explain", "web-0", "-n", NS]);
    assert_eq!(plugin, table.stdout);

    let json = explain(&["-o", "json"]);
    assert_eq!((json.code, json.stderr.as_str()), (0, ""));
    assert_golden("explain.json", &json.stdout);
    let parsed: Value = serde_json::from_str(&json.stdout).expect("-o json prints JSON");
    assert_eq!(parsed["apiVersion"], "tandemctl.tandem.dev/explain/v1");

    // Allowed: admin's GET under /api, by allow-web's second rule.
    let allowed = explain(&[
        "--from",
        "shop/admin",
        "--method",
        "GET",
        "--path",
        "/api/items",
    ]);
    assert_eq!((allowed.code, allowed.stderr.as_str()), (0, ""));
    assert_golden("allowed.txt", &allowed.stdout);

    // Denied: admin's POST matches no Allow rule: 403 naming the Allow policy, exit 1.
    let denied = explain(&[
        "--from",
        "shop/admin",
        "--method",
        "POST",
        "--path",
        "/api/items",
    ]);
    assert_eq!((denied.code, denied.stderr.as_str()), (1, ""));
    assert_golden("denied.txt", &denied.stdout);

    // A deny rule beats the allow rule that names batch's namespace; TCP: the connection closes.
    let tcp = explain(&[
        "--from",
        "spiffe://cluster.local/ns/batch/sa/cron",
        "--port",
        "8080",
        "-o",
        "json",
    ]);
    assert_eq!((tcp.code, tcp.stderr.as_str()), (1, ""));
    assert_golden("denied-tcp.json", &tcp.stdout);

    // Under default deny the kubelet's probe still gets in; the same caller elsewhere does not.
    let probe = explain(&["--from", "unauthenticated", "--path", "/ready"]);
    assert_eq!((probe.code, probe.stderr.as_str()), (0, ""));
    assert_golden("probe.txt", &probe.stdout);
    let elsewhere = explain(&[
        "--from",
        "unauthenticated",
        "--port",
        "9090",
        "--path",
        "/ready",
    ]);
    assert_eq!(elsewhere.code, 1, "{}", elsewhere.stdout);
    assert!(
        elsewhere
            .stdout
            .contains("DENIED by the default policy deny"),
        "{}",
        elsewhere.stdout
    );

    // A pod that does not exist: its own exit code and a message naming it, nothing on stdout.
    let missing = tandemctl(
        &kubeconfig,
        &["explain", "nope", "-n", NS, "--from", "shop/admin"],
    );
    assert_eq!(missing.code, 3);
    assert_eq!(missing.stdout, "");
    assert_eq!(missing.stderr, "tandemctl: pod shop/nope not found\n");

    // Rights: with the namespaced reads the README lists, explain works and says it cannot
    // tell where the default came from; with none, it is a cluster error, not a decision.
    let viewer = service_account_kubeconfig(&cluster, "viewer", true).await;
    let limited = tandemctl(
        &viewer,
        &["explain", "web-0", "-n", NS, "--from", "shop/frontend"],
    );
    assert_eq!(limited.code, 0, "{}", limited.stderr);
    assert!(
        limited.stdout.contains(
            "Default policy: deny (cannot tell: read Namespace shop: the apiserver answered 403 \
             Forbidden: namespaces \"shop\" is forbidden"
        ),
        "{}",
        limited.stdout
    );
    let nobody = service_account_kubeconfig(&cluster, "nobody", false).await;
    let refused = tandemctl(
        &nobody,
        &["explain", "web-0", "-n", NS, "--from", "shop/admin"],
    );
    assert_eq!(refused.code, 4, "{}", refused.stdout);
    assert_eq!(refused.stdout, "");
    assert!(
        refused
            .stderr
            .starts_with("tandemctl: read pod shop/web-0: the apiserver answered 403 Forbidden: "),
        "{}",
        refused.stderr
    );

    // The ConfigMap gone: the report still shows the policies; a decision cannot be given.
    let config_maps: Api<ConfigMap> = Api::namespaced(cluster.client(), NS);
    config_maps
        .delete(&names::config_map_name("web"), &Default::default())
        .await
        .unwrap();
    let without = explain(&[]);
    assert_eq!(without.code, 0, "{}", without.stderr);
    assert!(
        without
            .stdout
            .contains("Config:         ConfigMap tandem-proxy-web does not exist"),
        "{}",
        without.stdout
    );
    let undecidable = explain(&["--from", "shop/admin"]);
    assert_eq!(undecidable.code, 5, "{}", undecidable.stdout);
    assert!(
        undecidable
            .stderr
            .starts_with("tandemctl: cannot decide: ConfigMap tandem-proxy-web does not exist"),
        "{}",
        undecidable.stderr
    );
}

/// No cluster needed: an apiserver that is not there is a cluster error (4), not a decision.
#[test]
fn an_unreachable_apiserver_is_exit_code_4_not_a_decision() {
    let dir = tempfile::tempdir().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // Nothing listens there once the listener is dropped.
    drop(listener);
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: c\n\
             clusters: [{{name: c, cluster: {{server: 'https://127.0.0.1:{port}', insecure-skip-tls-verify: true}}}}]\n\
             users: [{{name: u, user: {{token: t}}}}]\n\
             contexts: [{{name: c, context: {{cluster: c, user: u, namespace: shop}}}}]\n"
        ),
    )
    .unwrap();
    let run = tandemctl(&kubeconfig, &["explain", "web-0", "--from", "shop/admin"]);
    assert_eq!(run.code, 4, "{}", run.stderr);
    assert_eq!(run.stdout, "");
    assert!(
        run.stderr.starts_with("tandemctl: read pod shop/web-0: "),
        "{}",
        run.stderr
    );
}
