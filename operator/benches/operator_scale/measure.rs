//! Small measuring tools: percentiles, the operator's `/metrics` and `/healthz` over plain
//! HTTP, its convergence histogram, and a process's memory.

use std::time::{Duration, Instant};

/// Nearest-rank percentile of a sorted slice (`None` when empty).
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some(sorted[rank.min(sorted.len() - 1)])
}

/// `p50 / p99 / max` of durations, in seconds (`–` when none).
pub fn seconds(values: &[Duration]) -> String {
    let mut sorted = values.to_vec();
    sorted.sort();
    let show =
        |d: Option<Duration>| d.map_or("–".to_owned(), |d| format!("{:.3} s", d.as_secs_f64()));
    format!(
        "{} / {} / {}",
        show(percentile(&sorted, 0.5)),
        show(percentile(&sorted, 0.99)),
        show(sorted.last().copied())
    )
}

/// How long `/healthz` takes to answer 200 (an error when it does not, or not within 5 s).
pub async fn healthz(port: u16) -> Result<Duration, String> {
    let start = Instant::now();
    match tokio::time::timeout(
        Duration::from_secs(5),
        super::support::http_get(port, "/healthz"),
    )
    .await
    {
        Ok(Ok(response))
            if response.starts_with("HTTP/1.0 200") || response.starts_with("HTTP/1.1 200") =>
        {
            Ok(start.elapsed())
        }
        Ok(Ok(response)) => Err(response.lines().next().unwrap_or_default().to_owned()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 5 s".to_owned()),
    }
}

/// A histogram's cumulative buckets (upper bound, count) for one `source`, as exported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Buckets(pub Vec<(f64, f64)>);

impl Buckets {
    /// Reads `<name>_bucket{…source="<source>"…,le="…"} <count>` lines from a metrics page.
    pub fn parse(page: &str, name: &str, source: &str) -> Self {
        let prefix = format!("{name}_bucket{{");
        let label = format!("source=\"{source}\"");
        let mut buckets: Vec<(f64, f64)> = page
            .lines()
            .filter_map(|line| {
                let labels = line.strip_prefix(&prefix)?;
                let (labels, value) = labels.rsplit_once("} ")?;
                if !labels.split(',').any(|l| l == label) {
                    return None;
                }
                let le = labels
                    .split(',')
                    .find_map(|l| l.strip_prefix("le=\""))?
                    .trim_end_matches('"');
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().ok()?
                };
                Some((bound, value.trim().parse().ok()?))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        Self(buckets)
    }

    /// The observations between `earlier` and `self` (same buckets).
    pub fn since(&self, earlier: &Self) -> Self {
        Self(
            self.0
                .iter()
                .map(|&(bound, count)| {
                    let before = earlier
                        .0
                        .iter()
                        .find(|(b, _)| *b == bound)
                        .map_or(0.0, |(_, c)| *c);
                    (bound, count - before)
                })
                .collect(),
        )
    }

    /// Observations in all.
    pub fn count(&self) -> f64 {
        self.0.last().map_or(0.0, |(_, c)| *c)
    }

    /// The `q` quantile estimated as Prometheus' `histogram_quantile` does: linear within the
    /// bucket it falls in; the last finite bound when it falls in `+Inf`.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut lower = (0.0, 0.0);
        for &(bound, count) in &self.0 {
            if count >= rank {
                if bound.is_infinite() {
                    return Some(lower.0);
                }
                let width = count - lower.1;
                let within = if width > 0.0 {
                    (rank - lower.1) / width
                } else {
                    1.0
                };
                return Some(lower.0 + (bound - lower.0) * within);
            }
            lower = (bound, count);
        }
        Some(lower.0)
    }
}

/// (VmRSS, VmHWM) of a process in MiB.
pub fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}
