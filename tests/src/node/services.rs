//! kube-proxy's job, honestly: Service ClusterIPs become iptables DNAT rules to the ready
//! endpoints the EndpointSlice controller publishes, kept current by watching both.
//!
//! The rules live in the node namespace's nat table, in chain `TANDEM-SERVICES` jumped to from
//! `PREROUTING` (traffic from pods) and `OUTPUT` (traffic from the node itself). Inside a
//! meshed pod, tandem-init's `OUTPUT` rules have already redirected the application's
//! connection to its proxy; what reaches the node is the proxy's own connection (to an
//! endpoint it picked, or — for a destination its config does not govern — to the original
//! ClusterIP, which is translated here).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt as _, watcher};

use super::net;
use crate::Result;

/// The chain holding the Service rules.
pub const CHAIN: &str = "TANDEM-SERVICES";

/// The label tying an EndpointSlice to its Service.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The `iptables-restore --noflush` document for these Services and EndpointSlices. Declaring
/// the chain flushes it, so each document replaces the last one atomically. Endpoints are
/// chosen uniformly at random: rule `i` of `n` matches with probability `1/(n-i)`.
pub fn rules(services: &[Service], slices: &[EndpointSlice]) -> String {
    let mut doc = String::new();
    doc.push_str("*nat\n");
    let _ = writeln!(doc, ":{CHAIN} - [0:0]");
    let mut services: Vec<&Service> = services.iter().collect();
    services.sort_by_key(|s| (s.metadata.namespace.clone(), s.metadata.name.clone()));
    for service in services {
        let (Some(namespace), Some(name), Some(spec)) = (
            service.metadata.namespace.as_deref(),
            service.metadata.name.as_deref(),
            service.spec.as_ref(),
        ) else {
            continue;
        };
        let Some(cluster_ip) = spec
            .cluster_ip
            .as_deref()
            .filter(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok())
        else {
            continue; // headless, or not yet allocated
        };
        for port in spec.ports.iter().flatten() {
            if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            let endpoints = ready_endpoints(slices, namespace, name, port.name.as_deref());
            let n = endpoints.len();
            for (i, (ip, target)) in endpoints.iter().enumerate() {
                let _ = write!(
                    doc,
                    "-A {CHAIN} -d {cluster_ip}/32 -p tcp --dport {} -m comment --comment \"{namespace}/{name}:{}\"",
                    port.port,
                    port.name.as_deref().unwrap_or("")
                );
                let remaining = n - i;
                if remaining > 1 {
                    let _ = write!(
                        doc,
                        " -m statistic --mode random --probability {:.10}",
                        1.0 / remaining as f64
                    );
                }
                let _ = writeln!(doc, " -j DNAT --to-destination {ip}:{target}");
            }
        }
    }
    doc.push_str("COMMIT\n");
    doc
}

/// The ready endpoints of Service `namespace/name` for the port named `port_name`, as
/// (address, target port), in a stable order.
fn ready_endpoints(
    slices: &[EndpointSlice],
    namespace: &str,
    name: &str,
    port_name: Option<&str>,
) -> Vec<(String, i32)> {
    let wanted = port_name.unwrap_or("");
    let mut out = Vec::new();
    for slice in slices {
        let ours = slice.metadata.namespace.as_deref() == Some(namespace)
            && slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .is_some_and(|s| s == name);
        if !ours || slice.address_type != "IPv4" {
            continue;
        }
        let Some(target) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == wanted)
            .and_then(|p| p.port)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if ready {
                out.extend(endpoint.addresses.iter().map(|a| (a.clone(), target)));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Creates the chain and the jumps to it in node namespace `node_ns`.
pub fn install(node_ns: &str) -> Result<()> {
    let doc =
        format!("*nat\n:{CHAIN} - [0:0]\n-A PREROUTING -j {CHAIN}\n-A OUTPUT -j {CHAIN}\nCOMMIT\n");
    net::run_in_with_stdin(node_ns, "iptables-restore", &["--noflush"], &doc)
}

/// Watches Services and EndpointSlices and rewrites the chain whenever the rules change.
/// Runs until the task is aborted.
pub async fn sync(client: kube::Client, node_ns: String) {
    let (services, service_writer) = reflector::store::<Service>();
    let (slices, slice_writer) = reflector::store::<EndpointSlice>();
    let service_events = reflector::reflector(
        service_writer,
        watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .map(|_| ());
    let slice_events = reflector::reflector(
        slice_writer,
        watcher(
            Api::<EndpointSlice>::all(client),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .map(|_| ());
    let mut events = futures::stream::select(service_events.boxed(), slice_events.boxed());
    let mut applied = String::new();
    while events.next().await.is_some() {
        // Drain what is already queued, so a burst of events is one rewrite.
        while let Some(Some(())) = futures::FutureExt::now_or_never(events.next()) {}
        let doc = render(&services, &slices);
        if doc == applied {
            continue;
        }
        let ns = node_ns.clone();
        let to_apply = doc.clone();
        let result = tokio::task::spawn_blocking(move || {
            net::run_in_with_stdin(&ns, "iptables-restore", &["--noflush"], &to_apply)
        })
        .await;
        match result {
            Ok(Ok(())) => {
                tracing::debug!(rules = doc.lines().count(), "Service rules applied");
                applied = doc;
            }
            Ok(Err(e)) => tracing::error!(error = %e, "Applying Service rules failed"),
            Err(e) => tracing::error!(error = %e, "Applying Service rules panicked"),
        }
    }
}

fn render(services: &Store<Service>, slices: &Store<EndpointSlice>) -> String {
    let services: Vec<Service> = services.state().iter().map(|s| (**s).clone()).collect();
    let slices: Vec<EndpointSlice> = slices.state().iter().map(|s| (**s).clone()).collect();
    rules(&services, &slices)
}

/// A Service's ClusterIP and its ports (name, number).
pub type ServiceLink = (String, Vec<(Option<String>, i32)>);

/// Service names in a namespace with their ClusterIP and ports, for the `*_SERVICE_HOST`
/// environment variables the kubelet sets.
pub fn service_links(services: &[Service]) -> BTreeMap<String, ServiceLink> {
    services
        .iter()
        .filter_map(|s| {
            let name = s.metadata.name.clone()?;
            let spec = s.spec.as_ref()?;
            let ip = spec
                .cluster_ip
                .clone()
                .filter(|ip| ip != "None" && !ip.is_empty())?;
            let ports = spec
                .ports
                .iter()
                .flatten()
                .map(|p| (p.name.clone(), p.port))
                .collect();
            Some((name, (ip, ports)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service() -> Service {
        serde_json::from_value(json!({
            "metadata": {"name": "server", "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
        }))
        .unwrap()
    }

    fn slice(addresses: &[(&str, bool)]) -> EndpointSlice {
        let endpoints: Vec<_> = addresses
            .iter()
            .map(|(ip, ready)| json!({"addresses": [ip], "conditions": {"ready": ready}}))
            .collect();
        serde_json::from_value(json!({
            "metadata": {"name": "server-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "server"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints
        }))
        .unwrap()
    }

    #[test]
    fn ready_endpoints_share_the_cluster_ip_evenly_and_unready_ones_get_nothing() {
        let doc = rules(
            &[service()],
            &[slice(&[
                ("10.244.0.3", true),
                ("10.244.0.2", true),
                ("10.244.0.4", false),
            ])],
        );
        let rules: Vec<&str> = doc.lines().filter(|l| l.starts_with("-A")).collect();
        assert_eq!(rules.len(), 2, "{doc}");
        assert!(rules[0].contains("--probability 0.5000000000"), "{doc}");
        assert!(
            rules[0].ends_with("DNAT --to-destination 10.244.0.2:8080"),
            "{doc}"
        );
        assert!(!rules[1].contains("statistic"), "{doc}");
        assert!(
            rules[1].ends_with("DNAT --to-destination 10.244.0.3:8080"),
            "{doc}"
        );
        assert!(
            rules[0].contains("-d 10.96.0.20/32 -p tcp --dport 80"),
            "{doc}"
        );
    }

    #[test]
    fn a_service_without_endpoints_or_cluster_ip_has_no_rules() {
        let mut headless = service();
        if let Some(spec) = headless.spec.as_mut() {
            spec.cluster_ip = Some("None".into());
        }
        let doc = rules(&[service(), headless], &[]);
        assert_eq!(doc, format!("*nat\n:{CHAIN} - [0:0]\nCOMMIT\n"));
    }
}
