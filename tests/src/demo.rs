//! The pure parts of `make demo` (binary `tandem-demo`): what a burst of requests measured,
//! the sample policies pointed at the demo's Services, and the before/after table a person
//! reads at a glance.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

/// What `tandem-testapp client`'s `/burst` answers: the outcome of exactly `total` requests.
#[derive(Clone, Debug, Default, PartialEq, serde::Deserialize)]
pub struct Burst {
    /// Seconds from the first request to the last response.
    pub seconds: f64,
    /// Requests sent.
    pub total: u64,
    /// Requests answered 200.
    pub ok: u64,
    /// Responses by status code (`"error"` when no response came).
    pub by_status: BTreeMap<String, u64>,
    /// Responses by body: which server version answered.
    pub by_body: BTreeMap<String, u64>,
    /// Median latency.
    pub p50_ms: f64,
    /// 99th percentile latency.
    pub p99_ms: f64,
}

impl Burst {
    /// Successful responses as a percentage of all requests.
    pub fn success_percent(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        self.ok as f64 * 100.0 / self.total as f64
    }

    /// Requests completed per second.
    pub fn requests_per_second(&self) -> f64 {
        if self.seconds <= 0.0 {
            return 0.0;
        }
        self.total as f64 / self.seconds
    }

    /// Who answered the successful requests, as `v1 90 %, v2 10 %` (bodies trimmed; only 200s
    /// carry a version name, the failures' bodies say "failing").
    pub fn answered_by(&self) -> String {
        let total: u64 = self.by_body.values().sum();
        if total == 0 {
            return "-".to_owned();
        }
        self.by_body
            .iter()
            .filter(|(body, _)| !body.contains("failing"))
            .map(|(body, n)| format!("{} {:.0} %", body.trim(), *n as f64 * 100.0 / total as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One route of the table: what was measured before and after its policy.
#[derive(Clone, Debug)]
pub struct RouteReport {
    /// The route: Service and request, e.g. `shop/server  GET /`.
    pub route: String,
    /// The sample policy that governs it after, e.g. `canary-split.yaml`.
    pub policy: String,
    /// Before the policy.
    pub before: Burst,
    /// After the policy took effect.
    pub after: Burst,
}

/// The table: per route, success rate, requests per second and p50/p99 latency before and
/// after its policy, and who answered.
pub fn table(routes: &[RouteReport]) -> String {
    let header = [
        "route",
        "policy",
        "",
        "success",
        "req/s",
        "p50 ms",
        "p99 ms",
        "answered by",
    ];
    let mut rows: Vec<[String; 8]> = Vec::new();
    for r in routes {
        for (phase, policy, burst) in [
            ("before", "none".to_owned(), &r.before),
            ("after", r.policy.clone(), &r.after),
        ] {
            rows.push([
                if phase == "before" {
                    r.route.clone()
                } else {
                    String::new()
                },
                policy,
                phase.to_owned(),
                format!("{:.2} %", burst.success_percent()),
                format!("{:.0}", burst.requests_per_second()),
                format!("{:.1}", burst.p50_ms),
                format!("{:.1}", burst.p99_ms),
                burst.answered_by(),
            ]);
        }
    }
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // Text columns left-aligned, numbers right-aligned.
    let numeric = [false, false, false, true, true, true, true, false];
    let line = |cells: &[String]| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let pad = widths[i].saturating_sub(cell.chars().count());
            if numeric[i] {
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            } else {
                out.push_str(cell);
                if i + 1 < cells.len() {
                    out.push_str(&" ".repeat(pad));
                }
            }
            if i + 1 < cells.len() {
                out.push_str("  ");
            }
        }
        out.trim_end().to_owned()
    };
    let mut out = String::new();
    let _ = writeln!(out, "{}", line(&header.map(str::to_owned)));
    let rule: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
    let _ = writeln!(out, "{}", "-".repeat(rule));
    for (i, row) in rows.iter().enumerate() {
        if i > 0 && i % 2 == 0 {
            out.push('\n');
        }
        let _ = writeln!(out, "{}", line(row));
    }
    out
}

/// A sample policy pointed at another Service of the namespace: the same spec, a new name,
/// `spec.targetRef.name` replaced. The samples all govern `server`; the demo shows retries
/// and the circuit breaker on Services that fail, and the canary on `server`.
pub fn retarget(policy: &Value, name: &str, service: &str) -> Option<Value> {
    let mut policy = policy.clone();
    *policy.get_mut("metadata")?.get_mut("name")? = Value::from(name);
    *policy
        .get_mut("spec")?
        .get_mut("targetRef")?
        .get_mut("name")? = Value::from(service);
    Some(policy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn burst(ok: u64, total: u64, seconds: f64, bodies: &[(&str, u64)]) -> Burst {
        Burst {
            seconds,
            total,
            ok,
            by_status: BTreeMap::new(),
            by_body: bodies.iter().map(|(b, n)| ((*b).to_owned(), *n)).collect(),
            p50_ms: 1.25,
            p99_ms: 9.5,
        }
    }

    #[test]
    fn a_burst_reports_success_rate_throughput_and_who_answered() {
        let b = burst(900, 1000, 2.0, &[("v1\n", 900), ("v2\n", 100)]);
        assert_eq!(b.success_percent(), 90.0);
        assert_eq!(b.requests_per_second(), 500.0);
        assert_eq!(b.answered_by(), "v1 90 %, v2 10 %");
    }

    #[test]
    fn an_empty_burst_reports_zeros_not_nan() {
        let b = Burst::default();
        assert_eq!(b.success_percent(), 0.0);
        assert_eq!(b.requests_per_second(), 0.0);
        assert_eq!(b.answered_by(), "-");
    }

    #[test]
    fn failures_are_left_out_of_who_answered() {
        let b = burst(1, 2, 1.0, &[("flaky\n", 1), ("flaky failing\n", 1)]);
        assert_eq!(b.answered_by(), "flaky 50 %");
    }

    #[test]
    fn the_table_has_a_before_and_an_after_line_per_route_in_aligned_columns() {
        let text = table(&[RouteReport {
            route: "shop/flaky  GET /api/items".into(),
            policy: "retries-with-budget".into(),
            before: burst(100, 200, 10.0, &[("flaky\n", 200)]),
            after: burst(200, 200, 10.0, &[("flaky\n", 200)]),
        }]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("route"));
        assert!(lines[2].starts_with("shop/flaky  GET /api/items  none"));
        assert!(lines[2].contains("before   50.00 %"), "{text}");
        assert!(lines[3].contains("after   100.00 %"), "{text}");
        let column = |line: &str| line.find('%');
        assert_eq!(column(lines[2]), column(lines[3]), "{text}");
    }

    #[test]
    fn a_sample_policy_is_retargeted_by_name_and_service() {
        let sample = serde_json::json!({"metadata": {"name": "server-retries", "namespace": "shop"},
            "spec": {"targetRef": {"name": "server"}, "rules": []}});
        let moved = retarget(&sample, "flaky-retries", "flaky").unwrap();
        assert_eq!(moved["metadata"]["name"], "flaky-retries");
        assert_eq!(moved["metadata"]["namespace"], "shop");
        assert_eq!(moved["spec"]["targetRef"]["name"], "flaky");
        assert!(retarget(&serde_json::json!({"spec": {}}), "a", "b").is_none());
    }
}
