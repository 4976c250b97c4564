//! The policy CRDs: generated YAML is current, samples parse, defaults are applied, and every
//! CEL rule accepts a good case and refuses a bad one (evaluated client-side with kube's CEL
//! evaluator; the local-cluster tests prove the same rules against a real apiserver).

// A panic is how a test reports failure; unwrap is fine outside #[test] functions here too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use kube::CustomResourceExt;
use tandem_crds::v1alpha1::{
    CircuitBreakerPolicy, LoadBalancerKind, RetryCondition, TrafficPolicy, crd_yamls,
};

const MANIFESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests");

fn sample(name: &str) -> String {
    std::fs::read_to_string(format!("{MANIFESTS}/samples/{name}")).unwrap()
}

fn traffic(yaml: &str) -> TrafficPolicy {
    serde_yaml::from_str(yaml).unwrap()
}

fn breaker(yaml: &str) -> CircuitBreakerPolicy {
    serde_yaml::from_str(yaml).unwrap()
}

/// The messages of every CEL rule the object breaks (empty when it is valid).
fn cel_errors<T: serde::Serialize + CustomResourceExt>(obj: &T) -> Vec<String> {
    match kube::core::cel::validate_cel(obj) {
        Ok(()) => vec![],
        Err(errors) => errors.iter().map(|e| e.to_string()).collect(),
    }
}

fn assert_refused_with<T: serde::Serialize + CustomResourceExt>(obj: &T, message: &str) {
    let errors = cel_errors(obj);
    assert!(
        errors.iter().any(|e| e.contains(message)),
        "expected {message:?} in {errors:#?}"
    );
}

const TP_HEAD: &str =
    "apiVersion: tandem.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: t, namespace: shop}\n";
const CBP_HEAD: &str = "apiVersion: tandem.dev/v1alpha1\nkind: CircuitBreakerPolicy\nmetadata: {name: c, namespace: shop}\n";

#[test]
fn checked_in_crd_yaml_is_current() {
    for (file, generated) in crd_yamls().unwrap() {
        let checked_in =
            std::fs::read_to_string(format!("{MANIFESTS}/crds/{file}")).unwrap_or_default();
        assert!(
            generated == checked_in,
            "manifests/crds/{file} is stale: run `make crds`"
        );
    }
}

#[test]
fn crds_have_short_names_and_printer_columns() {
    let crd = TrafficPolicy::crd();
    assert_eq!(crd.spec.names.short_names, Some(vec!["tp".to_string()]));
    let columns: Vec<String> = crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(
        columns,
        ["Target", "Accepted", "Programmed", "Proxies", "Age"]
    );
    assert_eq!(
        CircuitBreakerPolicy::crd().spec.names.short_names,
        Some(vec!["cbp".to_string()])
    );
}

#[test]
fn every_schema_field_is_documented() {
    fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
        let Some(props) = schema.get("properties").and_then(|p| p.as_object()) else {
            if let Some(items) = schema.get("items") {
                walk(&format!("{path}[]"), items, missing);
            }
            return;
        };
        for (name, prop) in props {
            let here = format!("{path}.{name}");
            let top_level =
                path.is_empty() && ["apiVersion", "kind", "metadata"].contains(&name.as_str());
            if prop.get("description").is_none() && !top_level {
                missing.push(here.clone());
            }
            walk(&here, prop, missing);
        }
    }
    for crd in [TrafficPolicy::crd(), CircuitBreakerPolicy::crd()] {
        let schema = serde_json::to_value(&crd.spec.versions[0].schema).unwrap();
        let mut missing = vec![];
        walk("", &schema["openAPIV3Schema"], &mut missing);
        assert!(
            missing.is_empty(),
            "{}: undocumented fields {missing:?}",
            crd.spec.names.kind
        );
    }
}

#[test]
fn samples_are_valid_and_the_invalid_sample_is_not() {
    for name in ["canary-split.yaml", "retries-with-budget.yaml"] {
        let policy = traffic(&sample(name));
        assert_eq!(cel_errors(&policy), Vec::<String>::new(), "{name}");
    }
    assert_eq!(
        cel_errors(&breaker(&sample("circuit-breaker.yaml"))),
        Vec::<String>::new()
    );

    let invalid = traffic(&sample("invalid-policy.yaml"));
    assert_refused_with(
        &invalid,
        "retries.perTryTimeout must not be longer than the rule's timeout",
    );
    assert_refused_with(&invalid, "at least one backend must have a positive weight");
}

#[test]
fn omitted_fields_take_the_documented_defaults() {
    let policy = traffic(&format!(
        "{TP_HEAD}spec:\n  targetRef: {{name: server}}\n  rules:\n  - retries: {{}}\n    backends: [{{name: a, port: 80}}]\n"
    ));
    let rule = &policy.spec.rules[0];
    let retries = rule.retries.as_ref().unwrap();
    assert_eq!(retries.attempts, 2);
    assert_eq!(
        retries.retry_on,
        [
            RetryCondition::FiveXx,
            RetryCondition::ConnectFailure,
            RetryCondition::Reset
        ]
    );
    assert_eq!(retries.backoff.base_interval, "25ms");
    assert_eq!(retries.backoff.max_interval, "250ms");
    assert!(
        !retries.retry_non_idempotent,
        "non-idempotent methods are not retried by default"
    );
    assert_eq!(rule.backends[0].weight, 1);
    assert_eq!(policy.spec.load_balancer, LoadBalancerKind::PeakEwma);

    let cbp = breaker(&format!(
        "{CBP_HEAD}spec:\n  targetRef: {{name: server}}\n  connectionPool: {{}}\n  outlierDetection: {{}}\n"
    ));
    let pool = cbp.spec.connection_pool.as_ref().unwrap();
    assert_eq!(
        (
            pool.max_connections,
            pool.max_pending_requests,
            pool.max_requests,
            pool.max_retries
        ),
        (1024, 1024, 1024, 3)
    );
    let od = cbp.spec.outlier_detection.as_ref().unwrap();
    assert_eq!(od.consecutive_5xx_errors, 5);
    assert_eq!(
        (
            od.interval.as_str(),
            od.base_ejection_time.as_str(),
            od.max_ejection_time.as_str()
        ),
        ("10s", "30s", "300s")
    );
    assert_eq!(od.max_ejection_percent, 10);
}

#[test]
fn per_try_timeout_may_equal_but_not_exceed_the_timeout() {
    let rule = |per_try: &str| {
        traffic(&format!(
            "{TP_HEAD}spec:\n  targetRef: {{name: s}}\n  rules:\n  - timeout: 1s\n    retries: {{perTryTimeout: {per_try}}}\n"
        ))
    };
    assert_eq!(cel_errors(&rule("1000ms")), Vec::<String>::new());
    assert_refused_with(&rule("1s1ms"), "perTryTimeout must not be longer");
}

#[test]
fn backends_need_one_positive_weight() {
    let with = |weights: &str| {
        traffic(&format!(
            "{TP_HEAD}spec:\n  targetRef: {{name: s}}\n  rules:\n  - backends: {weights}\n"
        ))
    };
    assert_eq!(
        cel_errors(&with(
            "[{name: a, port: 80, weight: 0}, {name: b, port: 80, weight: 1}]"
        )),
        Vec::<String>::new()
    );
    assert_eq!(cel_errors(&with("[]")), Vec::<String>::new());
    assert_refused_with(
        &with("[{name: a, port: 80, weight: 0}]"),
        "at least one backend must have a positive weight",
    );
}

#[test]
fn paths_other_than_regex_start_with_a_slash() {
    let with = |path: &str| {
        traffic(&format!(
            "{TP_HEAD}spec:\n  targetRef: {{name: s}}\n  rules:\n  - matches: [{{path: {path}}}]\n"
        ))
    };
    assert_eq!(
        cel_errors(&with("{type: Exact, value: /health}")),
        Vec::<String>::new()
    );
    assert_eq!(
        cel_errors(&with("{type: RegularExpression, value: '.*/v[0-9]+'}")),
        Vec::<String>::new()
    );
    assert_refused_with(
        &with("{type: PathPrefix, value: api}"),
        "must start with '/'",
    );
}

#[test]
fn retriable_status_codes_need_their_condition() {
    let with = |retry_on: &str| {
        traffic(&format!(
            "{TP_HEAD}spec:\n  targetRef: {{name: s}}\n  rules:\n  - retries: {{retryOn: {retry_on}, retriableStatusCodes: [409]}}\n"
        ))
    };
    assert_eq!(
        cel_errors(&with("[retriable-status-codes]")),
        Vec::<String>::new()
    );
    assert_refused_with(&with("[5xx]"), "retriableStatusCodes is used only when");
}

#[test]
fn backoff_base_is_not_above_its_maximum() {
    let with = |base: &str, max: &str| {
        traffic(&format!(
            "{TP_HEAD}spec:\n  targetRef: {{name: s}}\n  rules:\n  - retries: {{backoff: {{baseInterval: {base}, maxInterval: {max}}}}}\n"
        ))
    };
    assert_eq!(cel_errors(&with("100ms", "100ms")), Vec::<String>::new());
    assert_refused_with(
        &with("1s", "250ms"),
        "baseInterval must not be longer than backoff.maxInterval",
    );
}

#[test]
fn ejection_time_is_not_above_its_maximum() {
    let with = |base: &str, max: &str| {
        breaker(&format!(
            "{CBP_HEAD}spec:\n  targetRef: {{name: s}}\n  outlierDetection: {{baseEjectionTime: {base}, maxEjectionTime: {max}}}\n"
        ))
    };
    assert_eq!(cel_errors(&with("30s", "30s")), Vec::<String>::new());
    assert_refused_with(
        &with("10m", "5m"),
        "baseEjectionTime must not be longer than maxEjectionTime",
    );
}

#[test]
fn outlier_detection_needs_a_trigger() {
    let cbp = breaker(&format!(
        "{CBP_HEAD}spec:\n  targetRef: {{name: s}}\n  outlierDetection: {{consecutive5xxErrors: 0}}\n"
    ));
    assert_refused_with(
        &cbp,
        "set consecutive5xxErrors or consecutiveGatewayErrors above 0",
    );
}

#[test]
fn a_breaker_policy_must_configure_something() {
    let cbp = breaker(&format!("{CBP_HEAD}spec:\n  targetRef: {{name: s}}\n"));
    assert_refused_with(
        &cbp,
        "set spec.connectionPool, spec.outlierDetection, or both",
    );
}

#[test]
fn policies_convert_to_the_proxy_contract() {
    use tandem_crds::v1alpha1::{circuit_breaker, retries, retry_budget};
    let policy = traffic(&sample("retries-with-budget.yaml"));
    let converted = retries(
        "rules[0].retries",
        policy.spec.rules[0].retries.as_ref().unwrap(),
    )
    .unwrap();
    assert_eq!(converted.attempts, 2);
    assert_eq!(converted.per_try_timeout_ms, Some(500));
    assert_eq!(
        (converted.backoff_base_ms, converted.backoff_max_ms),
        (25, 250)
    );
    let budget = retry_budget(policy.spec.retry_budget.as_ref().unwrap()).unwrap();
    assert!((budget.ratio - 0.2).abs() < f64::EPSILON);
    assert_eq!(budget.window_ms, 10_000);

    let cbp = breaker(&sample("circuit-breaker.yaml"));
    let cb = circuit_breaker(&cbp.spec).unwrap();
    let od = cb.outlier_detection.unwrap();
    assert_eq!(
        (
            od.base_ejection_time_ms,
            od.max_ejection_time_ms,
            od.max_ejection_percent
        ),
        (30_000, 300_000, 50)
    );
    assert_eq!(cb.connection_pool.unwrap().max_requests, 100);
}

#[test]
fn conversion_refuses_values_a_schema_less_install_could_let_through() {
    use tandem_crds::v1alpha1::retries;
    let mut policy = traffic(&sample("retries-with-budget.yaml"));
    let rule = policy.spec.rules[0].retries.as_mut().unwrap();
    rule.per_try_timeout = Some("soon".into());
    let err = retries("rules[0].retries", rule).unwrap_err().to_string();
    assert!(
        err.starts_with("rules[0].retries.perTryTimeout: invalid duration \"soon\""),
        "{err}"
    );
    rule.per_try_timeout = None;
    rule.attempts = -1;
    let err = retries("rules[0].retries", rule).unwrap_err().to_string();
    assert_eq!(
        err,
        "rules[0].retries.attempts: must not be negative, found -1"
    );
}
