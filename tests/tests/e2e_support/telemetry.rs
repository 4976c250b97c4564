//! The real telemetry back ends the telemetry scenarios run against: Jaeger v2 (an
//! OpenTelemetry Collector with an OTLP receiver, an in-memory store and Jaeger's query API),
//! Prometheus scraping the pods from the node's network namespace, and `promtool`; plus the
//! Prometheus text parser and the dashboard query runner the assertions use.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use tandem_tests::process::{Supervised, free_port};

use super::repo;

// ---------------------------------------------------------------------------------------------
// HTTP from the machine or from a network namespace
// ---------------------------------------------------------------------------------------------

/// `GET path` on `addr`, connecting from network namespace `netns` when given (pod and node
/// addresses exist only there), else from the machine; HTTP/1.1 through hyper, so chunked
/// answers (Prometheus' and Jaeger's larger ones) are read whole. Returns status and body.
pub async fn http_get(
    netns: Option<&Path>,
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let stream = match netns {
        Some(netns) => {
            let std = tandem_tests::node::net::connect_in(netns, addr, Duration::from_secs(5))?;
            std.set_nonblocking(true)?;
            tokio::net::TcpStream::from_std(std)?
        }
        None => tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
            .await
            .with_context(|| format!("connect to {addr}: timeout"))??,
    };
    let exchange = async {
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())?;
        let response = sender.send_request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(Duration::from_secs(20), exchange)
        .await
        .with_context(|| format!("GET http://{addr}{path}: no answer within 20 s"))?
}

/// Percent-encodes a query parameter's value (everything but RFC 3986's unreserved bytes).
pub fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Jaeger v2
// ---------------------------------------------------------------------------------------------

/// The Jaeger binary: `$TANDEM_JAEGER_BIN/jaeger`, else what `tests/jaeger/build.sh` builds
/// (and caches under `~/.cache/tandem/jaeger-v<release>-go<go version>/`).
pub fn jaeger_binary() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os("TANDEM_JAEGER_BIN") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let output = Command::new(repo().join("tests/jaeger/build.sh"))
                .stderr(std::process::Stdio::inherit())
                .output()
                .context("run tests/jaeger/build.sh")?;
            if !output.status.success() {
                bail!("tests/jaeger/build.sh failed: {}", output.status);
            }
            PathBuf::from(String::from_utf8(output.stdout)?.trim())
        }
    };
    let path = dir.join("jaeger");
    if !path.is_file() {
        bail!(
            "{} not found (make telemetry-tools builds it)",
            path.display()
        );
    }
    Ok(path)
}

/// Jaeger v2 on host loopback: OTLP/HTTP in, spans kept in memory, read back through its query
/// API. Every port is free-picked, so it never collides with anything on the machine.
pub struct Jaeger {
    pub otlp_http: SocketAddr,
    pub query_http: SocketAddr,
    process: Supervised,
}

impl Jaeger {
    /// Starts it (config written to `dir`) and waits until its query API answers.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let loopback = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let otlp_http = loopback(free_port()?);
        let query_http = loopback(free_port()?);
        let query_grpc = loopback(free_port()?);
        // Its own metrics are off (they would bind :8888); the batch processor flushes every
        // 100 ms so spans are readable soon after they arrive.
        let config = format!(
            "service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
extensions:
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: {query_http}
    grpc:
      endpoint: {query_grpc}
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 10000
receivers:
  otlp:
    protocols:
      http:
        endpoint: {otlp_http}
processors:
  batch:
    timeout: 100ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"
        );
        let path = dir.join("jaeger.yaml");
        std::fs::write(&path, config)?;
        let mut command = Command::new(jaeger_binary()?);
        command.arg("--config").arg(&path);
        let mut process = Supervised::spawn("jaeger", command, &dir.join("jaeger.log"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            process.ensure_running()?;
            if let Ok((200, _)) = http_get(None, query_http, "/api/services").await {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "Jaeger's query API did not answer within 30 s:\n{}",
                    tandem_tests::process::log_tail(process.log())
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(Self {
            otlp_http,
            query_http,
            process,
        })
    }

    /// The spans of trace `trace_id` (32 hex digits) Jaeger holds; empty when it has none.
    pub async fn trace(&self, trace_id: &str) -> anyhow::Result<Vec<Span>> {
        let (status, body) =
            http_get(None, self.query_http, &format!("/api/traces/{trace_id}")).await?;
        if status == 404 {
            return Ok(Vec::new());
        }
        if status != 200 {
            bail!("GET /api/traces/{trace_id}: {status} {body}");
        }
        let answer: serde_json::Value = serde_json::from_str(&body)?;
        let mut spans = Vec::new();
        for trace in answer["data"].as_array().into_iter().flatten() {
            let processes = &trace["processes"];
            for span in trace["spans"].as_array().into_iter().flatten() {
                spans.push(Span::from_jaeger(span, processes));
            }
        }
        Ok(spans)
    }

    /// The end of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        tandem_tests::process::log_tail(self.process.log())
    }
}

/// One span as Jaeger's query API shows it.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: String,
    pub span_id: String,
    /// The CHILD_OF reference's span id, if any.
    pub parent: Option<String>,
    pub name: String,
    /// `server`, `client`, … (OTLP's kind, as Jaeger's `span.kind` tag).
    pub kind: String,
    /// The exporting resource's `service.name`.
    pub service: String,
    pub tags: BTreeMap<String, String>,
}

impl Span {
    fn from_jaeger(span: &serde_json::Value, processes: &serde_json::Value) -> Self {
        let text = |v: &serde_json::Value| match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let tags: BTreeMap<String, String> = span["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| (text(&t["key"]), text(&t["value"])))
            .collect();
        let parent = span["references"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|r| r["refType"] == "CHILD_OF")
            .map(|r| text(&r["spanID"]));
        let process = span["processID"].as_str().unwrap_or_default();
        Self {
            trace_id: text(&span["traceID"]),
            span_id: text(&span["spanID"]),
            parent,
            name: text(&span["operationName"]),
            kind: tags.get("span.kind").cloned().unwrap_or_default(),
            service: processes[process]["serviceName"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            tags,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Prometheus and promtool (Debian's package)
// ---------------------------------------------------------------------------------------------

/// A scrape target: a pod's admin port, with the labels Prometheus' Kubernetes discovery
/// would give it.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub namespace: String,
    pub pod: String,
}

/// Prometheus inside the node's network namespace (where pod addresses route), scraping the
/// pods' `/metrics` every second; its API on the namespace's loopback.
pub struct Prometheus {
    netns: PathBuf,
    api: SocketAddr,
    process: Supervised,
}

impl Prometheus {
    /// Starts it in `netns` (config and data under `dir`) and waits until it is ready.
    pub async fn start(netns: &Path, dir: &Path, targets: &[Target]) -> anyhow::Result<Self> {
        let mut config = String::from(
            "global: {scrape_interval: 1s, scrape_timeout: 900ms, evaluation_interval: 1s}\n\
             scrape_configs:\n  - job_name: tandem-proxies\n    metrics_path: /metrics\n    static_configs:\n",
        );
        for t in targets {
            config.push_str(&format!(
                "      - targets: [\"{}\"]\n        labels: {{namespace: \"{}\", pod: \"{}\"}}\n",
                t.addr, t.namespace, t.pod
            ));
        }
        let path = dir.join("prometheus.yml");
        std::fs::write(&path, &config)?;
        let check = Command::new("promtool")
            .args(["check", "config"])
            .arg(&path)
            .output()
            .context("run promtool (make telemetry-tools installs it)")?;
        if !check.status.success() {
            bail!(
                "promtool check config:\n{config}\n{}",
                String::from_utf8_lossy(&check.stdout)
            );
        }
        // The node namespace's loopback is private to it: a fixed port cannot collide.
        let api = SocketAddr::from((Ipv4Addr::LOCALHOST, 9090));
        let name = netns
            .file_name()
            .and_then(|n| n.to_str())
            .context("netns path without a name")?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", name, "prometheus"])
            .arg(format!("--config.file={}", path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={api}"))
            .arg("--log.level=warn");
        let mut process = Supervised::spawn("prometheus", command, &dir.join("prometheus.log"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            process.ensure_running()?;
            if let Ok((200, _)) = http_get(Some(netns), api, "/-/ready").await {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "Prometheus was not ready within 60 s:\n{}",
                    tandem_tests::process::log_tail(process.log())
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(Self {
            netns: netns.to_owned(),
            api,
            process,
        })
    }

    /// Runs an instant query; returns the result's series (a vector's samples, or one for a
    /// scalar), each as its labels.
    pub async fn query(&self, expr: &str) -> anyhow::Result<Vec<BTreeMap<String, String>>> {
        let path = format!("/api/v1/query?query={}", encode(expr));
        let (status, body) = http_get(Some(&self.netns), self.api, &path).await?;
        if status != 200 {
            bail!("query {expr}: {status} {body}");
        }
        let answer: serde_json::Value = serde_json::from_str(&body)?;
        let data = &answer["data"];
        match data["resultType"].as_str() {
            Some("vector" | "matrix") => Ok(data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    s["metric"]
                        .as_object()
                        .into_iter()
                        .flatten()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                        .collect()
                })
                .collect()),
            Some("scalar" | "string") => Ok(vec![BTreeMap::new()]),
            other => bail!("query {expr}: unexpected result type {other:?}: {body}"),
        }
    }

    /// Whether every target was scraped successfully at least once (`up == 1`).
    pub async fn all_up(&self, count: usize) -> anyhow::Result<bool> {
        Ok(self.query("up == 1").await?.len() == count)
    }

    /// The end of its log, for failure messages.
    pub fn log_tail(&self) -> String {
        tandem_tests::process::log_tail(self.process.log())
    }
}

/// `promtool check metrics` on an exposition: `Ok` when it is clean, else what it said.
/// (It reads the Prometheus text format, so an OpenMetrics `# EOF` line is dropped first.)
pub fn promtool_check_metrics(exposition: &str) -> anyhow::Result<Result<(), String>> {
    use std::io::Write as _;
    let text: String = exposition
        .lines()
        .filter(|l| *l != "# EOF")
        .map(|l| format!("{l}\n"))
        .collect();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("run promtool (make telemetry-tools installs it)")?;
    child
        .stdin
        .take()
        .context("promtool's stdin")?
        .write_all(text.as_bytes())?;
    let output = child.wait_with_output()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Exit 3 is "parsed, with lint findings". Two are known and cannot go (as in
    // proxy/tests/proxy_metrics.rs): `no help text` on counters (prometheus-client writes an
    // OpenMetrics counter's `# HELP` under its family name, the samples are `<family>_total`)
    // and the base unit of `<prefix>request_duration_milliseconds` (Istio's name, which its
    // dashboards query). Anything else fails.
    let unknown: Vec<&str> = said
        .lines()
        .filter(|finding| !finding.trim().is_empty() && !known_lint(finding))
        .collect();
    Ok(match output.status.code() {
        Some(0 | 3) if unknown.is_empty() => Ok(()),
        _ => Err(format!("{}: {}", output.status, said.trim())),
    })
}

/// Whether a `promtool check metrics` finding is one of the two known ones.
fn known_lint(finding: &str) -> bool {
    finding.ends_with(" no help text")
        || finding.ends_with(
            "request_duration_milliseconds use base unit \"seconds\" instead of \"milliseconds\"",
        )
}

// ---------------------------------------------------------------------------------------------
// The Prometheus text format
// ---------------------------------------------------------------------------------------------

/// One sample of an exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// The samples of an exposition whose name starts with `prefix` (comments skipped).
pub fn samples(exposition: &str, prefix: &str) -> anyhow::Result<Vec<Sample>> {
    exposition
        .lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| parse_sample(l).with_context(|| format!("sample line {l:?}")))
        .collect()
}

fn parse_sample(line: &str) -> anyhow::Result<Sample> {
    let Some(open) = line.find('{') else {
        let mut parts = line.split_whitespace();
        let name = parts.next().context("no name")?;
        return Ok(Sample {
            name: name.to_owned(),
            labels: BTreeMap::new(),
            value: parts.next().context("no value")?.parse()?,
        });
    };
    let mut labels = BTreeMap::new();
    let mut rest = &line[open + 1..];
    loop {
        rest = rest.trim_start_matches([',', ' ']);
        if let Some(after) = rest.strip_prefix('}') {
            rest = after;
            break;
        }
        let (key, after) = rest.split_once("=\"").context("label without =\"")?;
        // The value runs to the first quote not escaped by a backslash.
        let mut value = String::new();
        let mut chars = after.char_indices();
        let close = loop {
            match chars.next().context("label value not closed")? {
                (_, '\\') => match chars.next().context("dangling escape")?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.to_owned(), value);
        rest = &after[close + 1..];
    }
    Ok(Sample {
        name: line[..open].to_owned(),
        labels,
        value: rest
            .split_whitespace()
            .next()
            .context("no value")?
            .parse()?,
    })
}

/// The sum of the samples named `name` whose labels hold every `(key, value)` given.
pub fn sum(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
        .map(|s| s.value)
        .sum()
}

// ---------------------------------------------------------------------------------------------
// Dashboards
// ---------------------------------------------------------------------------------------------

/// One query of a dashboard panel.
#[derive(Clone, Debug)]
pub struct PanelQuery {
    pub panel: String,
    pub expr: String,
}

/// The queries of a Grafana dashboard (any JSON model: panels, rows' nested panels, targets'
/// `expr`), in order.
pub fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<PanelQuery> {
    fn walk(panel: &serde_json::Value, out: &mut Vec<PanelQuery>) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push(PanelQuery {
                    panel: panel["title"].as_str().unwrap_or_default().to_owned(),
                    expr: expr.to_owned(),
                });
            }
        }
        for nested in panel["panels"].as_array().into_iter().flatten() {
            walk(nested, out);
        }
    }
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        walk(panel, &mut out);
    }
    out
}

/// A dashboard JSON file.
pub fn load_dashboard(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    Ok(serde_json::from_str(&text)?)
}

/// Substitutes Grafana's template variables (`$name`, `${name}`) in `expr` as Grafana does for
/// a chosen value; fails on a variable not in `values`, so no query runs half-substituted.
pub fn substitute(expr: &str, values: &BTreeMap<String, String>) -> anyhow::Result<String> {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let close = braced.find('}').context("unclosed ${")?;
            (&braced[..close], close + 2)
        } else {
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..len], len)
        };
        let value = values
            .get(name)
            .with_context(|| format!("variable ${name} has no value (in {expr})"))?;
        out.push_str(value);
        rest = &after[len..];
    }
    out.push_str(rest);
    Ok(out)
}

/// What a dashboard run found: per query, the first choice of variables that gave a
/// non-empty result, or none.
pub struct DashboardRun {
    pub results: Vec<(PanelQuery, Option<BTreeMap<String, String>>)>,
}

impl DashboardRun {
    /// The queries no choice of variables made non-empty.
    pub fn empty(&self) -> Vec<&PanelQuery> {
        self.results
            .iter()
            .filter(|(_, found)| found.is_none())
            .map(|(q, _)| q)
            .collect()
    }
}

/// Runs every query of `dashboard` against `prometheus`, each with the variable choices in
/// `choices` in turn (as a user picks a workload or service in the dashboard's drop-downs),
/// and records the first choice that returns a non-empty result.
pub async fn run_dashboard(
    prometheus: &Prometheus,
    dashboard: &serde_json::Value,
    choices: &[BTreeMap<String, String>],
) -> anyhow::Result<DashboardRun> {
    let mut results = Vec::new();
    for query in dashboard_queries(dashboard) {
        let mut found = None;
        for choice in choices {
            let expr = substitute(&query.expr, choice)?;
            if !prometheus.query(&expr).await?.is_empty() {
                found = Some(choice.clone());
                break;
            }
        }
        results.push((query, found));
    }
    Ok(DashboardRun { results })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_line_is_parsed_with_escapes() {
        let s = parse_sample(r#"x_total{a="1",b="q\"uo\\te",c=""} 42"#).unwrap();
        assert_eq!(s.name, "x_total");
        assert_eq!(s.labels["a"], "1");
        assert_eq!(s.labels["b"], "q\"uo\\te");
        assert_eq!(s.labels["c"], "");
        assert_eq!(s.value, 42.0);
    }

    #[test]
    fn variables_are_substituted_and_a_missing_one_fails() {
        let values: BTreeMap<String, String> = [("workload", "a"), ("__rate_interval", "30s")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into();
        assert_eq!(
            substitute(
                r#"x{w=~"$workload"}[$__rate_interval] ${workload}"#,
                &values
            )
            .unwrap(),
            r#"x{w=~"a"}[30s] a"#
        );
        assert!(substitute("x{n=\"$namespace\"}", &values).is_err());
    }
}
