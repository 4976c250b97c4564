//! tandem-proxy's admin port as the benchmark reads it: a GET of `/metrics`, the sum of a
//! counter over the series that match some labels, and [`Probe`]s that prove a topology's
//! requests really went through a proxy (its request counter grew by what was sent).

use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::netns;

/// Errors reading a proxy's admin port.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The GET failed.
    #[error("admin {addr}{path}: {message}")]
    Get {
        /// The admin address.
        addr: SocketAddr,
        /// The path asked for.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// The network namespace could not be entered.
    #[error("admin {addr}: {source}")]
    Netns {
        /// The admin address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: netns::NetnsError,
    },
}

/// GETs `path` from the admin listener at `addr` and returns the body (any status).
pub async fn get(addr: SocketAddr, path: &str) -> Result<String, AdminError> {
    Ok(fetch(addr, path).await?.1)
}

/// GETs `path` from the listener at `addr` (an admin port, nginx's status page) and returns
/// the status and the body.
pub async fn fetch(addr: SocketAddr, path: &str) -> Result<(u16, String), AdminError> {
    let fail = |message: String| AdminError::Get {
        addr,
        path: path.to_owned(),
        message,
    };
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| fail(e.to_string()))?;
    tokio::spawn(conn);
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| fail(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| fail(e.to_string()))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| fail(e.to_string()))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Sums the counter `name` over its series whose labels include every `name="value"` pair of
/// `labels` (Prometheus text format; a counter without such series sums to zero; a series
/// without labels counts when `labels` is empty).
pub fn counter_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            // A series without labels (`name 12`) matches when no label is asked for.
            let (set, value) = match rest.strip_prefix('{') {
                Some(rest) => rest.rsplit_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            if set.is_empty() && !labels.is_empty() {
                return None;
            }
            let wanted = labels
                .iter()
                .all(|(k, v)| set.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
            wanted.then(|| value.trim().parse::<f64>().ok()).flatten()
        })
        .map(|v| v as u64)
        .sum()
}

/// One proxy's request counter for one direction (and, outbound, one destination service):
/// read before and after a run to prove the run's requests went through that proxy.
#[derive(Debug, Clone)]
pub struct Probe {
    /// Which proxy, in error messages (`client sidecar outbound`).
    pub label: String,
    /// The network namespace the admin listener lives in (`None`: this one).
    pub netns: Option<PathBuf>,
    /// The admin listener.
    pub admin: SocketAddr,
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    /// The service the requests must be for, `<namespace>/<name>` (`bench/upstream`); read
    /// as `destination_service="<name>.<namespace>.svc.cluster.local"` outbound, ignored
    /// inbound (`inbound`), where every request is for the app.
    pub service: String,
}

impl Probe {
    /// The counter's current value, from `/metrics`. Inside another network namespace the
    /// GET runs on a thread of its own that entered it (setns is per thread).
    pub async fn read(&self) -> Result<u64, AdminError> {
        let text = match &self.netns {
            None => get(self.admin, "/metrics").await?,
            Some(path) => {
                let addr = self.admin;
                let path = path.clone();
                let joined = tokio::task::spawn_blocking(move || {
                    netns::in_netns(&path, move || {
                        let runtime = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .map_err(|e| AdminError::Get {
                                addr,
                                path: "/metrics".into(),
                                message: format!("runtime: {e}"),
                            })?;
                        runtime.block_on(get(addr, "/metrics"))
                    })
                })
                .await
                .map_err(|e| AdminError::Get {
                    addr,
                    path: "/metrics".into(),
                    message: format!("reader thread: {e}"),
                })?;
                joined.map_err(|source| AdminError::Netns { addr, source })??
            }
        };
        Ok(self.count(&text))
    }

    /// This probe's counter in a `/metrics` text: the proxy's standard (Istio-shaped)
    /// `tandem_requests_total`, `reporter="source"` outbound to the service,
    /// `reporter="destination"` inbound.
    pub fn count(&self, text: &str) -> u64 {
        if self.direction == "inbound" {
            return counter_sum(
                text,
                "tandem_requests_total",
                &[("reporter", "destination")],
            );
        }
        let fqdn = match self.service.split_once('/') {
            Some((namespace, name)) => format!("{name}.{namespace}.svc.cluster.local"),
            None => self.service.clone(),
        };
        counter_sum(
            text,
            "tandem_requests_total",
            &[("reporter", "source"), ("destination_service", &fqdn)],
        )
    }
}

/// Checks that a proxy counted a run's requests: at least every request that succeeded, at
/// most every request sent, and at least 99% of those sent (a request that failed may not have
/// reached it, but a run whose requests mostly never reached the proxy did not measure it).
pub fn check_counted(label: &str, counted: u64, ok: u64, errors: u64) -> Result<(), String> {
    let sent = ok + errors;
    if counted >= ok && counted <= sent && counted * 100 >= sent * 99 {
        Ok(())
    } else {
        Err(format!(
            "{label} counted {counted} requests, but {sent} were sent ({ok} succeeded): the \
             traffic did not go through it as the topology says"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# TYPE tandem_requests counter
tandem_requests_total{reporter=\"source\",destination_service=\"upstream.bench.svc.cluster.local\",response_code=\"200\"} 1190
tandem_requests_total{reporter=\"source\",destination_service=\"upstream.bench.svc.cluster.local\",response_code=\"503\"} 10
tandem_requests_total{reporter=\"source\",destination_service=\"unknown\",response_code=\"200\"} 7
tandem_requests_total{reporter=\"destination\",destination_service=\"unknown\",response_code=\"200\"} 1198
tandem_requests_total_other{reporter=\"destination\"} 5
tandem_retries_total{direction=\"outbound\",dst_service=\"bench/upstream\",reason=\"5xx\"} 3
tandem_retries_total{direction=\"outbound\",dst_service=\"bench/upstream\",reason=\"reset\"} 4
";

    #[test]
    fn counters_are_summed_over_the_series_that_carry_the_labels() {
        let outbound = [
            ("reporter", "source"),
            ("destination_service", "upstream.bench.svc.cluster.local"),
        ];
        assert_eq!(
            counter_sum(METRICS, "tandem_requests_total", &outbound),
            1200
        );
        assert_eq!(
            counter_sum(
                METRICS,
                "tandem_requests_total",
                &[("reporter", "destination")]
            ),
            1198
        );
        assert_eq!(counter_sum(METRICS, "tandem_retries_total", &[]), 7);
        assert_eq!(counter_sum(METRICS, "tandem_ejections_total", &[]), 0);
        let unlabelled =
            "tandem_trace_spans_exported_total 42\ntandem_trace_spans_exported_totalx 1\n";
        assert_eq!(
            counter_sum(unlabelled, "tandem_trace_spans_exported_total", &[]),
            42
        );
        assert_eq!(
            counter_sum(
                unlabelled,
                "tandem_trace_spans_exported_total",
                &[("a", "b")]
            ),
            0
        );
    }

    #[test]
    fn a_probe_counts_only_its_direction_and_service() {
        let probe = Probe {
            label: "client".into(),
            netns: None,
            admin: "127.0.0.1:15020".parse().unwrap(),
            direction: "outbound",
            service: "bench/upstream".into(),
        };
        assert_eq!(probe.count(METRICS), 1200);
        let inbound = Probe {
            direction: "inbound",
            service: "inbound".into(),
            ..probe
        };
        assert_eq!(inbound.count(METRICS), 1198);
    }

    #[test]
    fn a_proxy_that_saw_fewer_requests_than_succeeded_fails_the_check() {
        assert!(check_counted("client", 1000, 1000, 0).is_ok());
        assert!(check_counted("client", 1002, 1000, 3).is_ok());
        // Every request failed before reaching the proxy: nothing was measured through it.
        assert!(check_counted("client", 0, 0, 1500).is_err());
        let bypassed = check_counted("server sidecar inbound", 0, 1000, 0).unwrap_err();
        assert!(bypassed.contains("counted 0 requests"), "{bypassed}");
        assert!(check_counted("client", 1010, 1000, 3).is_err());
    }
}
