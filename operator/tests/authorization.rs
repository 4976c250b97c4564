//! AuthorizationPolicies against a real control plane (etcd, kube-apiserver,
//! kube-controller-manager on loopback), the operator a process with its own RBAC: policies in,
//! each targeted workload's `authorization` and the policy's status out.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams};
use serde_json::{Value, json};
use support::*;
use tandem_crds::contract::{AuthorizationAction, DefaultPolicy, ProxyConfig};
use tandem_crds::v1alpha1::AuthorizationPolicy;

/// A namespace (with annotations) and its ServiceAccounts.
async fn namespace(client: &Client, ns: &str, annotations: Value, accounts: &[&str]) {
    apply::<Namespace>(
        client,
        None,
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": ns, "annotations": annotations}}),
    )
    .await;
    for sa in accounts {
        apply::<ServiceAccount>(
            client,
            Some(ns),
            json!({"apiVersion": "v1", "kind": "ServiceAccount",
                   "metadata": {"name": sa, "namespace": ns}}),
        )
        .await;
    }
}

/// An injected pod labelled `app` (what the test's Services select), with container ports.
async fn pod(client: &Client, ns: &str, name: &str, sa: &str, app: &str, ports: Value) -> Pod {
    labelled_injected_pod(client, ns, name, sa, json!({"app": app}), ports).await
}

/// A Service selecting `app`.
async fn selecting(client: &Client, ns: &str, name: &str, app: &str, ports: Value) -> Service {
    apply(
        client,
        Some(ns),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"app": app}, "ports": ports}
        }),
    )
    .await
}

async fn authorization(client: &Client, ns: &str, name: &str, spec: Value) -> AuthorizationPolicy {
    apply(
        client,
        Some(ns),
        json!({
            "apiVersion": "tandem.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec
        }),
    )
    .await
}

/// What a policy's status says: condition type → (status, reason, message), and workloads.
async fn policy_status(
    client: &Client,
    ns: &str,
    name: &str,
) -> Option<(
    std::collections::BTreeMap<String, (String, String, String)>,
    Vec<String>,
)> {
    let api: Api<AuthorizationPolicy> = Api::namespaced(client.clone(), ns);
    let status = api.get_opt(name).await.ok().flatten()?.status?;
    let conditions = status
        .conditions
        .iter()
        .map(|c| {
            (
                c.type_.clone(),
                (
                    format!("{:?}", c.status),
                    c.reason.clone(),
                    c.message.clone(),
                ),
            )
        })
        .collect();
    Some((conditions, status.workloads))
}

async fn accepted_reason(client: &Client, ns: &str, name: &str) -> Option<(String, String)> {
    let (conditions, _) = policy_status(client, ns, name).await?;
    let (status, reason, message) = conditions.get("Accepted")?.clone();
    Some((format!("{status}/{reason}"), message))
}

async fn config(client: &Client, ns: &str, sa: &str) -> Option<ProxyConfig> {
    proxy_config(client, ns, sa).await.map(|(c, _)| c)
}

fn policy_names(config: &ProxyConfig) -> Vec<String> {
    config
        .authorization
        .policies
        .iter()
        .map(|p| p.name.clone())
        .collect()
}

/// Waits for an Event with `reason` about the object `name` in `ns`.
async fn eventually_an_event(client: &Client, ns: &str, reason: &str, name: &str) {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    eventually(&format!("a {reason} Event on {name}"), || async {
        events.list(&ListParams::default()).await.is_ok_and(|list| {
            list.items.iter().any(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            })
        })
    })
    .await;
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make test-operator"]
async fn a_service_allow_policy_lands_in_exactly_the_selected_workloads_and_leaves_with_it() {
    let cluster = cluster().await;
    let client = cluster.client();
    let _operator = Operator::start(&cluster, "operator-authz-a").await;
    namespace(
        &client,
        "bank",
        json!({}),
        &["ledger", "ledger-canary", "teller", "db"],
    )
    .await;
    pod(
        &client,
        "bank",
        "ledger-1",
        "ledger",
        "ledger",
        json!([{"name": "web", "containerPort": 8080}]),
    )
    .await;
    pod(
        &client,
        "bank",
        "ledger-2",
        "ledger-canary",
        "ledger",
        json!([{"name": "web", "containerPort": 8081}]),
    )
    .await;
    pod(&client, "bank", "teller-1", "teller", "teller", json!([])).await;
    pod(&client, "bank", "db-1", "db", "db", json!([])).await;
    selecting(
        &client,
        "bank",
        "ledger",
        "ledger",
        json!([{"name": "http", "port": 80, "targetPort": "web"}]),
    )
    .await;
    for sa in ["ledger", "ledger-canary", "teller", "db"] {
        eventually(&format!("tandem-proxy-{sa}"), || async {
            config(&client, "bank", sa).await.is_some()
        })
        .await;
    }
    let before = config(&client, "bank", "ledger").await.unwrap();
    assert!(before.authorization.policies.is_empty());
    assert_eq!(
        before.authorization.default_policy,
        DefaultPolicy::AllUnauthenticated
    );
    assert!(
        before.authorization.cluster_networks.is_empty(),
        "only cluster-authenticated carries the cluster networks"
    );
    let untouched = config_map_versions(&client, "bank").await;

    authorization(
        &client,
        "bank",
        "allow-teller",
        json!({
            "targetRef": {"kind": "Service", "name": "ledger"},
            "action": "Allow",
            "rules": [{"from": {"serviceAccounts": [{"name": "teller"}]},
                       "to": {"methods": ["GET"], "paths": [{"value": "/api"}]}}]
        }),
    )
    .await;
    for sa in ["ledger", "ledger-canary"] {
        eventually(&format!("allow-teller in tandem-proxy-{sa}"), || async {
            config(&client, "bank", sa)
                .await
                .is_some_and(|c| policy_names(&c) == ["bank/allow-teller"])
        })
        .await;
    }
    let with = config(&client, "bank", "ledger").await.unwrap();
    let rendered = &with.authorization.policies[0];
    assert_eq!(rendered.action, AuthorizationAction::Allow);
    assert_eq!(rendered.ports, [8080], "the named target port, resolved");
    assert_eq!(
        rendered.rules[0].from.as_ref().unwrap().principals,
        ["spiffe://cluster.local/ns/bank/sa/teller"]
    );
    assert_eq!(rendered.rules[0].to.as_ref().unwrap().methods, ["GET"]);
    assert_ne!(with.version, before.version, "the stamp follows the policy");
    let canary = config(&client, "bank", "ledger-canary").await.unwrap();
    assert_eq!(
        canary.authorization.policies[0].ports,
        [8081],
        "each workload's own container port"
    );
    eventually(
        "allow-teller Accepted, Programmed, on both ledgers",
        || async {
            policy_status(&client, "bank", "allow-teller")
                .await
                .is_some_and(|(conditions, workloads)| {
                    workloads == ["bank/ledger", "bank/ledger-canary"]
                        && conditions
                            .get("Accepted")
                            .is_some_and(|c| c.1 == "Accepted")
                        && conditions.get("Programmed")
                            == Some(&(
                                "True".into(),
                                "Programmed".into(),
                                "carried by 2 proxy ConfigMap(s); 0/2 proxies run it".into(),
                            ))
                })
        },
    )
    .await;
    // Only the targeted workload's ConfigMap was written.
    let after = config_map_versions(&client, "bank").await;
    for sa in ["teller", "db"] {
        let name = format!("tandem-proxy-{sa}");
        assert_eq!(after.get(&name), untouched.get(&name), "{name} rewritten");
    }
    for name in ["tandem-proxy-ledger", "tandem-proxy-ledger-canary"] {
        assert_ne!(after.get(name), untouched.get(name), "{name} not written");
    }

    // Removed: the ledger's config is what it was before, byte for byte.
    let api: Api<AuthorizationPolicy> = Api::namespaced(client.clone(), "bank");
    api.delete("allow-teller", &DeleteParams::default())
        .await
        .unwrap();
    eventually("allow-teller gone from tandem-proxy-ledger", || async {
        config(&client, "bank", "ledger")
            .await
            .is_some_and(|c| c.authorization.policies.is_empty())
    })
    .await;
    // The same content, so the same hash; a later generation, so proxies take it over the
    // config that carried the policy.
    let mut restored = config(&client, "bank", "ledger").await.unwrap();
    let hash = |version: &str| version.split_once('.').map(|(_, h)| h.to_owned());
    assert_eq!(hash(&restored.version), hash(&before.version));
    assert!(restored.generation() > with.generation());
    restored.version.clone_from(&before.version);
    assert_eq!(restored, before);
}

#[tokio::test]
#[ignore = "needs the control-plane binaries: run by make test-operator"]
async fn a_deny_namespace_default_and_invalid_policies_leave_the_others_working() {
    let cluster = cluster().await;
    let client = cluster.client();
    let _operator = Operator::start(&cluster, "operator-authz-b").await;
    namespace(&client, "vault", json!({}), &["api", "client"]).await;
    pod(
        &client,
        "vault",
        "api-1",
        "api",
        "api",
        json!([{"name": "http", "containerPort": 8080}]),
    )
    .await;
    pod(&client, "vault", "client-1", "client", "client", json!([])).await;
    selecting(
        &client,
        "vault",
        "api",
        "api",
        json!([{"name": "http", "port": 80, "targetPort": 8080}]),
    )
    .await;
    selecting(
        &client,
        "vault",
        "pg",
        "api",
        json!([{"name": "tcp-pg", "port": 5432}]),
    )
    .await;

    // The namespace says deny: every workload there defaults to deny.
    namespace(
        &client,
        "vault",
        json!({"tandem.dev/default-policy": "deny"}),
        &[],
    )
    .await;
    for sa in ["api", "client"] {
        eventually(&format!("default deny in tandem-proxy-{sa}"), || async {
            config(&client, "vault", sa)
                .await
                .is_some_and(|c| c.authorization.default_policy == DefaultPolicy::Deny)
        })
        .await;
    }

    // One good policy among four bad ones.
    let from_client = json!([{"from": {"serviceAccounts": [{"name": "client"}]}}]);
    authorization(
        &client,
        "vault",
        "allow-client",
        json!({"targetRef": {"kind": "ServiceAccount", "name": "api"},
               "action": "Allow", "rules": from_client}),
    )
    .await;
    let foreign = |td: &str| {
        json!({"targetRef": {"kind": "ServiceAccount", "name": "api"}, "action": "Allow",
               "rules": [{"from": {"principals": [format!("spiffe://{td}/ns/vault/sa/client")]}}]})
    };
    authorization(&client, "vault", "foreign", foreign("other.example")).await;
    authorization(
        &client,
        "vault",
        "http-on-tcp",
        json!({"targetRef": {"kind": "Service", "name": "pg"}, "action": "Deny",
               "rules": [{"to": {"methods": ["DELETE"]}}]}),
    )
    .await;
    authorization(
        &client,
        "vault",
        "bad-port",
        json!({"targetRef": {"kind": "Service", "name": "api"}, "action": "Allow",
               "rules": [{"to": {"ports": [9999]}}]}),
    )
    .await;
    authorization(
        &client,
        "vault",
        "ghost",
        json!({"targetRef": {"kind": "Service", "name": "ghost"}, "action": "Allow",
               "rules": from_client}),
    )
    .await;
    for (name, expected, needle) in [
        ("allow-client", "True/Accepted", "valid"),
        ("foreign", "False/Invalid", "trust domain other.example"),
        ("http-on-tcp", "False/Invalid", "declared tcp"),
        ("bad-port", "False/Invalid", "9999 is not among the ports"),
        (
            "ghost",
            "False/TargetNotFound",
            "Service vault/ghost does not exist",
        ),
    ] {
        eventually(&format!("{name} {expected}"), || async {
            accepted_reason(&client, "vault", name)
                .await
                .is_some_and(|(status, message)| status == expected && message.contains(needle))
        })
        .await;
    }
    eventually("allow-client on vault/api, and only it", || async {
        config(&client, "vault", "api")
            .await
            .is_some_and(|c| policy_names(&c) == ["vault/allow-client"])
    })
    .await;
    let (_, workloads) = policy_status(&client, "vault", "allow-client")
        .await
        .unwrap();
    assert_eq!(workloads, ["vault/api"]);
    let (conditions, workloads) = policy_status(&client, "vault", "foreign").await.unwrap();
    assert!(workloads.is_empty());
    assert_eq!(conditions["Programmed"].1, "Pending");
    eventually_an_event(&client, "vault", "Invalid", "foreign").await;

    // Fixed, the refused policy joins; nothing was lost meanwhile.
    authorization(&client, "vault", "foreign", foreign("cluster.local")).await;
    eventually("foreign, fixed, in tandem-proxy-api", || async {
        config(&client, "vault", "api")
            .await
            .is_some_and(|c| policy_names(&c) == ["vault/allow-client", "vault/foreign"])
    })
    .await;

    // A value the operator does not know is ignored (the mesh default applies) and said so.
    namespace(
        &client,
        "vault",
        json!({"tandem.dev/default-policy": "nobody"}),
        &[],
    )
    .await;
    eventually("the mesh default back in tandem-proxy-client", || async {
        config(&client, "vault", "client")
            .await
            .is_some_and(|c| c.authorization.default_policy == DefaultPolicy::AllUnauthenticated)
    })
    .await;
    // Events about a cluster-scoped object land in `default`.
    eventually_an_event(&client, "default", "InvalidDefaultPolicy", "vault").await;
}
