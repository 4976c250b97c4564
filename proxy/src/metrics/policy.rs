//! The resilience engine's counters, exported from the active policies at scrape time.
//!
//! The engine already counts what it does with atomics of its own (retries granted, budget
//! refusals, ejections, overflows), carried over from one config version to the next; `/config`
//! shows them. Reading them when Prometheus scrapes, rather than mirroring every event into a
//! second set of counters on the request path, keeps that path to one atomic add per event.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::policy::PolicySet;

/// Labels of a per-service series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    dst_service: String,
}

/// Labels of a per-destination (service port) series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PortLabels {
    dst_service: String,
    port: u16,
}

/// Labels of a connection-pool overflow series.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OverflowLabels {
    dst_service: String,
    port: u16,
    limit: &'static str,
}

/// A registry holding the engine's counters as they are now.
pub fn policy_metrics(policies: &PolicySet) -> Registry {
    let retries = Family::<ServiceLabels, Counter>::default();
    let exhausted = Family::<ServiceLabels, Counter>::default();
    for policy in policies.policies() {
        let snap = policy.snapshot();
        let labels = ServiceLabels {
            dst_service: snap.service,
        };
        retries.get_or_create(&labels).inc_by(snap.retries_total);
        exhausted
            .get_or_create(&labels)
            .inc_by(snap.retry_budget_exhausted_total);
    }
    let ejections = Family::<PortLabels, Counter>::default();
    let active = Family::<PortLabels, Gauge>::default();
    let panics = Family::<PortLabels, Counter>::default();
    let no_endpoints = Family::<PortLabels, Counter>::default();
    let overflows = Family::<OverflowLabels, Counter>::default();
    for destination in policies.destinations() {
        let snap = destination.snapshot(destination.now());
        let labels = PortLabels {
            dst_service: snap.service,
            port: snap.port,
        };
        ejections
            .get_or_create(&labels)
            .inc_by(snap.ejections_total);
        active
            .get_or_create(&labels)
            .set(i64::try_from(snap.active_ejections).unwrap_or(i64::MAX));
        panics.get_or_create(&labels).inc_by(snap.panic_total);
        no_endpoints
            .get_or_create(&labels)
            .inc_by(snap.no_endpoints_total);
        for (limit, n) in snap.overflows_total {
            overflows
                .get_or_create(&OverflowLabels {
                    dst_service: labels.dst_service.clone(),
                    port: labels.port,
                    limit,
                })
                .inc_by(n);
        }
    }
    let mut registry = Registry::default();
    registry.register("tandem_retries", "Retries the budget granted", retries);
    registry.register(
        "tandem_retry_budget_exhausted",
        "Retries the budget refused",
        exhausted,
    );
    registry.register(
        "tandem_ejections",
        "Endpoints ejected by outlier detection",
        ejections,
    );
    registry.register("tandem_active_ejections", "Endpoints ejected now", active);
    registry.register(
        "tandem_panic",
        "Picks made while every endpoint was ejected",
        panics,
    );
    registry.register(
        "tandem_no_endpoints",
        "Requests refused because the service had no ready endpoint",
        no_endpoints,
    );
    registry.register(
        "tandem_overflows",
        "Requests refused by a connection-pool limit",
        overflows,
    );
    registry
}
