//! Semantic validation of a [`ProxyConfig`]: every problem, each with its JSON path.

use std::collections::BTreeSet;
use std::fmt;

use super::authz::{Authorization, AuthorizationPolicy, AuthorizationRule};
use super::{
    Backend, CircuitBreaker, HeaderMatch, PROXY_CONFIG_API_VERSION, PathMatch, ProxyConfig,
    RequestMatch, Retries, RetryBudget, RetryOn, Route, Service, Tracing, ValueMatch,
};

/// Longest regular expression accepted, in bytes: a config must not be able to make the proxy
/// spend unbounded memory compiling one.
const MAX_REGEX_LEN: usize = 1024;
/// Bound on the compiled size of one regular expression.
const MAX_REGEX_SIZE: usize = 1 << 20;
/// Most retries per request a config may ask for.
const MAX_RETRY_ATTEMPTS: u32 = 10;

/// One problem in a config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationError {
    /// JSON path of the offending value, e.g. `$.services[0].routes[1].backends`.
    pub path: String,
    /// What is wrong, for a person.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Every problem found in a config (never empty).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<ValidationError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("; "))
    }
}

/// Collects problems while walking the config.
#[derive(Default)]
struct Report(Vec<ValidationError>);

impl Report {
    fn error(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(ValidationError {
            path: path.into(),
            message: message.into(),
        });
    }

    fn finish(self) -> Result<(), ValidationErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ValidationErrors(self.0))
        }
    }

    fn check(&mut self, ok: bool, path: impl FnOnce() -> String, message: &str) {
        if !ok {
            self.error(path(), message);
        }
    }
}

pub(super) fn validate(config: &ProxyConfig) -> Result<(), ValidationErrors> {
    let mut report = Report::default();
    if config.api_version != PROXY_CONFIG_API_VERSION {
        report.error(
            "$.apiVersion",
            format!(
                "must be {PROXY_CONFIG_API_VERSION:?}, found {:?}",
                config.api_version
            ),
        );
    }
    report.check(
        !config.workload.namespace.is_empty(),
        || "$.workload.namespace".into(),
        "must not be empty",
    );
    report.check(
        !config.workload.service_account.is_empty(),
        || "$.workload.serviceAccount".into(),
        "must not be empty",
    );
    report.check(
        config.defaults.connect_timeout_ms > 0,
        || "$.defaults.connectTimeoutMs".into(),
        "must be positive",
    );

    let mut seen = BTreeSet::new();
    let keys = config.service_keys();
    for (i, service) in config.services.iter().enumerate() {
        let path = format!("$.services[{i}]");
        if !seen.insert(service.key()) {
            report.error(&path, format!("duplicate service {}", service.key()));
        }
        service_problems(config, &keys, service, &path, &mut report);
    }
    authorization_problems(&config.authorization, &mut report);
    if let Some(tracing) = &config.telemetry.tracing {
        tracing_problems(tracing, &mut report);
    }
    report.finish()
}

/// The collector must be a base URL the proxy can POST `<collector>/v1/traces` to, and the
/// sampling percentage a probability.
fn tracing_problems(tracing: &Tracing, report: &mut Report) {
    if let Err(why) = collector_problem(&tracing.collector) {
        report.error("$.telemetry.tracing.collector", why);
    }
    let percent = tracing.sampling_percent;
    report.check(
        percent.is_finite() && (0.0..=100.0).contains(&percent),
        || "$.telemetry.tracing.samplingPercent".into(),
        "must be a number from 0 to 100",
    );
}

/// Why `url` is not an `http://` or `https://` base URL with a host (and at most a port and a
/// path): the proxy appends `/v1/traces` to it, so a query or fragment would be misplaced.
fn collector_problem(url: &str) -> Result<(), &'static str> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or("must be an http:// or https:// URL")?;
    if url
        .bytes()
        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err("must not contain whitespace or control characters");
    }
    if rest.contains(['?', '#']) {
        return Err("must not have a query or fragment (/v1/traces is appended to it)");
    }
    let authority = rest.split('/').next().unwrap_or("");
    if authority.contains('@') {
        return Err("must not carry credentials");
    }
    let (host, port) = split_host_port(authority)?;
    if host.is_empty() {
        return Err("must name a host");
    }
    match port {
        Some(port) if port.parse::<u16>().map_or(true, |p| p == 0) => {
            Err("has a port that is not a number from 1 to 65535")
        }
        _ => Ok(()),
    }
}

/// `host[:port]`, where the host may be a bracketed IPv6 address.
fn split_host_port(authority: &str) -> Result<(&str, Option<&str>), &'static str> {
    if let Some(bracketed) = authority.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or("has an IPv6 address without its closing bracket")?;
        return match after {
            "" => Ok((host, None)),
            _ => after
                .strip_prefix(':')
                .map(|port| (host, Some(port)))
                .ok_or("has something other than a port after its IPv6 address"),
        };
    }
    Ok(match authority.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (authority, None),
    })
}

/// Validates the authorization section alone (as `tandemctl` and the operator's checks do).
pub(super) fn validate_authorization(
    authorization: &Authorization,
) -> Result<(), ValidationErrors> {
    let mut report = Report::default();
    authorization_problems(authorization, &mut report);
    report.finish()
}

fn authorization_problems(authorization: &Authorization, report: &mut Report) {
    let mut names = BTreeSet::new();
    for (i, policy) in authorization.policies.iter().enumerate() {
        let path = format!("$.authorization.policies[{i}]");
        if !policy.name.is_empty() && !names.insert(policy.name.as_str()) {
            report.error(&path, format!("duplicate policy {}", policy.name));
        }
        policy_problems(policy, &path, report);
    }
}

fn policy_problems(policy: &AuthorizationPolicy, path: &str, report: &mut Report) {
    report.check(
        !policy.name.is_empty(),
        || format!("{path}.name"),
        "must not be empty",
    );
    for (j, port) in policy.ports.iter().enumerate() {
        report.check(*port != 0, || format!("{path}.ports[{j}]"), "must not be 0");
    }
    report.check(
        !policy.rules.is_empty(),
        || format!("{path}.rules"),
        "a policy needs at least one rule",
    );
    for (j, rule) in policy.rules.iter().enumerate() {
        rule_problems(rule, &format!("{path}.rules[{j}]"), report);
    }
}

fn rule_problems(rule: &AuthorizationRule, path: &str, report: &mut Report) {
    if let Some(from) = &rule.from {
        for (k, principal) in from.principals.iter().enumerate() {
            let ok = match principal.strip_suffix('*') {
                Some(prefix) => prefix.starts_with("spiffe://"),
                None => crate::identity::SpiffeId::parse(principal).is_ok(),
            };
            report.check(
                ok,
                || format!("{path}.from.principals[{k}]"),
                "must be a SPIFFE ID spiffe://<td>/ns/<ns>/sa/<sa>, or a spiffe:// prefix ending in *",
            );
        }
        for (k, namespace) in from.namespaces.iter().enumerate() {
            report.check(
                !namespace.is_empty(),
                || format!("{path}.from.namespaces[{k}]"),
                "must not be empty",
            );
        }
        let any = !from.principals.is_empty()
            || !from.namespaces.is_empty()
            || from.authenticated
            || from.unauthenticated;
        report.check(
            any,
            || format!("{path}.from"),
            "matches no caller: set principals, namespaces, authenticated or unauthenticated",
        );
    }
    let Some(to) = &rule.to else {
        return;
    };
    for (k, port) in to.ports.iter().enumerate() {
        report.check(
            *port != 0,
            || format!("{path}.to.ports[{k}]"),
            "must not be 0",
        );
    }
    for (k, p) in to.paths.iter().enumerate() {
        let at = format!("{path}.to.paths[{k}]");
        path_problems(p, &at, report);
    }
    for (k, method) in to.methods.iter().enumerate() {
        method_problems(method, &format!("{path}.to.methods[{k}]"), report);
    }
    for (k, header) in to.headers.iter().enumerate() {
        header_problems(header, &format!("{path}.to.headers[{k}]"), report);
    }
}

fn service_problems(
    config: &ProxyConfig,
    keys: &BTreeSet<super::ServiceRef>,
    service: &Service,
    path: &str,
    report: &mut Report,
) {
    report.check(
        !service.name.is_empty(),
        || format!("{path}.name"),
        "must not be empty",
    );
    report.check(
        !service.namespace.is_empty(),
        || format!("{path}.namespace"),
        "must not be empty",
    );
    let mut ports = BTreeSet::new();
    for (j, port) in service.ports.iter().enumerate() {
        let port_path = format!("{path}.ports[{j}]");
        report.check(
            port.port != 0,
            || format!("{port_path}.port"),
            "must be 1-65535",
        );
        if !ports.insert(port.port) {
            report.error(
                format!("{port_path}.port"),
                format!("duplicate port {}", port.port),
            );
        }
        for (k, endpoint) in port.endpoints.iter().enumerate() {
            report.check(
                endpoint.address.port() != 0,
                || format!("{port_path}.endpoints[{k}].address"),
                "endpoint port must be 1-65535",
            );
            if let Some(identity) = &endpoint.identity {
                let at = || format!("{port_path}.endpoints[{k}].identity");
                if let Err(e) = crate::identity::SpiffeId::parse(identity) {
                    report.error(at(), e.to_string());
                }
                report.check(endpoint.meshed, at, "an identity needs meshed: true");
            }
        }
    }
    for (j, route) in service.routes.iter().enumerate() {
        route_problems(config, keys, route, &format!("{path}.routes[{j}]"), report);
    }
    if let Some(budget) = &service.retry_budget {
        budget_problems(budget, &format!("{path}.retryBudget"), report);
    }
    if let Some(breaker) = &service.circuit_breaker {
        breaker_problems(breaker, &format!("{path}.circuitBreaker"), report);
    }
}

fn route_problems(
    config: &ProxyConfig,
    keys: &BTreeSet<super::ServiceRef>,
    route: &Route,
    path: &str,
    report: &mut Report,
) {
    report.check(
        !route.name.is_empty(),
        || format!("{path}.name"),
        "must not be empty",
    );
    for (k, m) in route.matches.iter().enumerate() {
        match_problems(m, &format!("{path}.matches[{k}]"), report);
    }
    if !route.backends.is_empty() && route.backends.iter().all(|b| b.weight == 0) {
        report.error(
            format!("{path}.backends"),
            "at least one backend must have a positive weight",
        );
    }
    for (k, backend) in route.backends.iter().enumerate() {
        backend_problems(
            config,
            keys,
            backend,
            &format!("{path}.backends[{k}]"),
            report,
        );
    }
    if let Some(timeout) = route.timeout_ms {
        report.check(
            timeout > 0,
            || format!("{path}.timeoutMs"),
            "must be positive",
        );
    }
    if let Some(retries) = &route.retries {
        retry_problems(
            retries,
            route.timeout_ms,
            &format!("{path}.retries"),
            report,
        );
    }
}

fn match_problems(m: &RequestMatch, path: &str, report: &mut Report) {
    if let Some(p) = &m.path {
        path_problems(p, &format!("{path}.path"), report);
    }
    if let Some(method) = &m.method {
        method_problems(method, &format!("{path}.method"), report);
    }
    for (i, header) in m.headers.iter().enumerate() {
        header_problems(header, &format!("{path}.headers[{i}]"), report);
    }
}

fn path_problems(m: &PathMatch, path: &str, report: &mut Report) {
    match m {
        PathMatch::Exact(p) | PathMatch::Prefix(p) => report.check(
            p.starts_with('/'),
            || path.to_owned(),
            "path must start with '/'",
        ),
        PathMatch::Regex(re) => regex_problems(re, &format!("{path}.regex"), report),
    }
}

fn method_problems(method: &str, path: &str, report: &mut Report) {
    report.check(
        !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase()),
        || path.to_owned(),
        "method must be an upper-case HTTP token such as GET",
    );
}

fn header_problems(HeaderMatch { name, value }: &HeaderMatch, path: &str, report: &mut Report) {
    report.check(
        is_header_name(name),
        || format!("{path}.name"),
        "must be a lower-case HTTP header name",
    );
    if let ValueMatch::Regex(re) = value {
        regex_problems(re, &format!("{path}.value.regex"), report);
    }
}

fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.!#$%&'*+^`|~".contains(&b)
        })
}

fn regex_problems(re: &str, path: &str, report: &mut Report) {
    if re.len() > MAX_REGEX_LEN {
        report.error(
            path,
            format!("regular expression longer than {MAX_REGEX_LEN} bytes"),
        );
        return;
    }
    if let Err(err) = regex::RegexBuilder::new(re)
        .size_limit(MAX_REGEX_SIZE)
        .build()
    {
        report.error(path, format!("invalid regular expression: {err}"));
    }
}

fn backend_problems(
    config: &ProxyConfig,
    keys: &BTreeSet<super::ServiceRef>,
    backend: &Backend,
    path: &str,
    report: &mut Report,
) {
    if !keys.contains(&backend.service) {
        report.error(
            format!("{path}.service"),
            format!("service {} is not in this config", backend.service),
        );
        return;
    }
    let has_port = config
        .service(&backend.service)
        .is_some_and(|s| s.port(backend.port).is_some());
    report.check(
        has_port,
        || format!("{path}.port"),
        "port is not one of the backend service's ports",
    );
}

fn retry_problems(retries: &Retries, timeout: Option<u64>, path: &str, report: &mut Report) {
    report.check(
        retries.attempts <= MAX_RETRY_ATTEMPTS,
        || format!("{path}.attempts"),
        "at most 10 retries",
    );
    report.check(
        !retries.retry_on.is_empty(),
        || format!("{path}.retryOn"),
        "must name at least one condition",
    );
    if let (Some(per_try), Some(total)) = (retries.per_try_timeout_ms, timeout) {
        report.check(
            per_try <= total,
            || format!("{path}.perTryTimeoutMs"),
            "must not exceed the route's timeout",
        );
    }
    if retries.per_try_timeout_ms == Some(0) {
        report.error(format!("{path}.perTryTimeoutMs"), "must be positive");
    }
    for (i, code) in retries.retriable_status_codes.iter().enumerate() {
        report.check(
            (100..=599).contains(code),
            || format!("{path}.retriableStatusCodes[{i}]"),
            "must be an HTTP status 100-599",
        );
    }
    report.check(
        retries.retriable_status_codes.is_empty()
            || retries.retry_on.contains(&RetryOn::RetriableStatusCodes),
        || format!("{path}.retriableStatusCodes"),
        "listed codes need retryOn retriableStatusCodes",
    );
    report.check(
        retries.backoff_base_ms > 0 && retries.backoff_base_ms <= retries.backoff_max_ms,
        || format!("{path}.backoffBaseMs"),
        "must be positive and not above backoffMaxMs",
    );
}

fn budget_problems(budget: &RetryBudget, path: &str, report: &mut Report) {
    report.check(
        budget.ratio.is_finite() && (0.0..=10.0).contains(&budget.ratio),
        || format!("{path}.ratio"),
        "must be between 0 and 10",
    );
    report.check(
        budget.window_ms > 0,
        || format!("{path}.windowMs"),
        "must be positive",
    );
}

fn breaker_problems(breaker: &CircuitBreaker, path: &str, report: &mut Report) {
    if let Some(pool) = &breaker.connection_pool {
        let limits = [
            ("maxConnections", pool.max_connections),
            ("maxPendingRequests", pool.max_pending_requests),
            ("maxRequests", pool.max_requests),
        ];
        for (name, value) in limits {
            report.check(
                value > 0,
                || format!("{path}.connectionPool.{name}"),
                "must be positive",
            );
        }
    }
    if let Some(od) = &breaker.outlier_detection {
        let od_path = format!("{path}.outlierDetection");
        report.check(
            od.interval_ms > 0,
            || format!("{od_path}.intervalMs"),
            "must be positive",
        );
        report.check(
            od.base_ejection_time_ms > 0 && od.base_ejection_time_ms <= od.max_ejection_time_ms,
            || format!("{od_path}.baseEjectionTimeMs"),
            "must be positive and not above maxEjectionTimeMs",
        );
        report.check(
            od.max_ejection_percent <= 100,
            || format!("{od_path}.maxEjectionPercent"),
            "must be 0-100",
        );
    }
}
