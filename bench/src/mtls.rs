//! Mutual TLS in the benchmark: what a mutual-TLS topology must show before it is measured
//! (both sides hold a certificate, plaintext to the server side is refused, a handshake
//! happened), and how the TLS handshakes a run caused are counted.
//!
//! A two-hop topology with mutual TLS that quietly fell back to plaintext would report
//! plaintext figures under the mTLS name; these checks make that round fail instead.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use crate::admin;
use crate::loadgen::{self, LoadError, Target};

/// The counter of mutual-TLS handshakes tandem-proxy exports (issue 13), by `direction` and
/// `result`.
pub const HANDSHAKES_METRIC: &str = "tandem_tls_handshakes_total";

/// How a topology's TLS handshakes are counted.
#[derive(Debug, Clone)]
pub enum Handshakes {
    /// The server sidecar's completed inbound handshakes:
    /// `tandem_tls_handshakes_total{direction="inbound",result="success"}` on its admin port.
    Tandem {
        /// The server sidecar's admin listener.
        admin: SocketAddr,
    },
    /// The server-side nginx's accepted connections (`stub_status`, on a plaintext listener of
    /// its own): each connection the client-side nginx opens to its TLS listener is one
    /// handshake (full or resumed). Each reading's own connection is counted too, and taken off.
    Nginx {
        /// The status listener.
        status: SocketAddr,
    },
}

/// The `accepts` figure of nginx's `stub_status` page.
///
/// ```text
/// Active connections: 1
/// server accepts handled requests
///  16 16 31
/// Reading: 0 Writing: 1 Waiting: 0
/// ```
pub fn parse_stub_status_accepts(text: &str) -> Option<u64> {
    let mut lines = text.lines();
    lines.find(|l| l.trim_start().starts_with("server accepts"))?;
    lines.next()?.split_whitespace().next()?.parse().ok()
}

impl Handshakes {
    /// The counter now.
    pub async fn read(&self) -> Result<u64, String> {
        match self {
            Self::Tandem { admin } => {
                let text = admin::get(*admin, "/metrics")
                    .await
                    .map_err(|e| e.to_string())?;
                tandem_handshakes(&text).ok_or_else(|| {
                    format!(
                        "the server sidecar's /metrics has no {HANDSHAKES_METRIC}: this \
                         tandem-proxy does not do mutual TLS"
                    )
                })
            }
            Self::Nginx { status } => {
                let (code, text) = admin::fetch(*status, "/")
                    .await
                    .map_err(|e| e.to_string())?;
                if code != 200 {
                    return Err(format!("nginx status page: status {code}"));
                }
                parse_stub_status_accepts(&text)
                    .ok_or_else(|| format!("nginx status page unreadable: {text:?}"))
            }
        }
    }

    /// Handshakes between a reading `before` and a reading `after`.
    pub fn between(&self, before: u64, after: u64) -> u64 {
        let delta = after.saturating_sub(before);
        match self {
            Self::Tandem { .. } => delta,
            // The later reading's own connection was accepted before it was answered.
            Self::Nginx { .. } => delta.saturating_sub(1),
        }
    }
}

/// The server sidecar's completed inbound handshakes in a `/metrics` text; `None` when the
/// proxy has no such counter at all.
pub fn tandem_handshakes(text: &str) -> Option<u64> {
    let known = text
        .lines()
        .any(|line| line.starts_with(&format!("{HANDSHAKES_METRIC}{{")));
    known.then(|| {
        admin::counter_sum(
            text,
            HANDSHAKES_METRIC,
            &[("direction", "inbound"), ("result", "success")],
        )
    })
}

/// What a mutual-TLS topology must show before it is measured.
#[derive(Debug, Clone)]
pub struct MtlsCheck {
    /// Admin listeners whose `/ready` must answer 200: a tandem-proxy is ready once it holds a
    /// certificate and the trust anchors (empty for nginx, whose certificates are files).
    pub ready: Vec<SocketAddr>,
    /// A plaintext request straight to the server side's listener, which must fail: the
    /// server sidecar runs `strict`, the server-side nginx listens `ssl` only.
    pub plaintext: Target,
    /// The handshake counter.
    pub handshakes: Handshakes,
}

impl MtlsCheck {
    /// Before any request through the topology: every `/ready` answers 200 within `within`,
    /// plaintext to the server side is refused, and the handshake counter can be read (its
    /// value is returned, the baseline for [`MtlsCheck::handshaken`]).
    pub async fn before(&self, within: Duration) -> Result<u64, String> {
        let deadline = Instant::now() + within;
        for &admin in &self.ready {
            wait_ready(admin, deadline).await?;
        }
        // nginx has no readiness endpoint: its status page answering says it is up.
        loop {
            match self.handshakes.read().await {
                Ok(_) => break,
                Err(e) if !self.ready.is_empty() || Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        // Refused means: connected, then no 2xx. A listener not yet bound proves nothing.
        loop {
            match loadgen::wait_ready(&self.plaintext, Duration::ZERO).await {
                Ok(()) => {
                    return Err(format!(
                        "a plaintext request to the server side ({}) was answered 2xx: mutual \
                         TLS is not in effect there (a tandem-proxy without mutual TLS ignores \
                         `strict`)",
                        self.plaintext.addr
                    ));
                }
                Err(LoadError::Connect { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e @ LoadError::Connect { .. }) => {
                    return Err(format!(
                        "the server side's listener {} never accepted a connection: {e}",
                        self.plaintext.addr
                    ));
                }
                Err(_) => break,
            }
        }
        self.handshakes.read().await
    }

    /// After a request went through the topology: at least one TLS handshake since
    /// `baseline`, or the hop was not TLS.
    pub async fn handshaken(&self, baseline: u64) -> Result<(), String> {
        let now = self.handshakes.read().await?;
        match self.handshakes.between(baseline, now) {
            0 => Err(
                "requests went through, but no TLS handshake was counted on the server side".into(),
            ),
            _ => Ok(()),
        }
    }
}

/// Polls `admin`'s `/ready` until it answers 200 or `deadline` passes.
async fn wait_ready(admin: SocketAddr, deadline: Instant) -> Result<(), String> {
    loop {
        let last = match admin::fetch(admin, "/ready").await {
            Ok((200, _)) => return Ok(()),
            Ok((code, body)) => format!("status {code}: {}", body.trim()),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "{admin}/ready did not answer 200 in time (no certificate?): {last}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nginx_accepts_are_read_from_the_status_page() {
        let page = "Active connections: 1 \nserver accepts handled requests\n 16 16 31 \nReading: 0 Writing: 1 Waiting: 0 \n";
        assert_eq!(parse_stub_status_accepts(page), Some(16));
        assert_eq!(parse_stub_status_accepts("Active connections: 1\n"), None);
    }

    #[test]
    fn the_status_reading_s_own_connection_is_not_a_handshake() {
        let nginx = Handshakes::Nginx {
            status: "127.0.0.1:1".parse().unwrap(),
        };
        // Before: 10 (its own connection included); 3 handshakes; after: 10 + 3 + 1.
        assert_eq!(nginx.between(10, 14), 3);
        assert_eq!(nginx.between(10, 11), 0);
        let tandem = Handshakes::Tandem {
            admin: "127.0.0.1:1".parse().unwrap(),
        };
        assert_eq!(tandem.between(10, 14), 4);
        assert_eq!(tandem.between(14, 10), 0);
    }

    #[test]
    fn tandem_handshakes_count_inbound_successes_and_a_proxy_without_the_counter_is_told_apart() {
        let text = "\
# TYPE tandem_tls_handshakes counter
tandem_tls_handshakes_total{direction=\"outbound\",result=\"success\"} 9
tandem_tls_handshakes_total{direction=\"inbound\",result=\"success\"} 7
tandem_tls_handshakes_total{direction=\"inbound\",result=\"untrusted\"} 2
";
        assert_eq!(tandem_handshakes(text), Some(7));
        let before_mtls =
            "tandem_requests_total{direction=\"inbound\",dst_service=\"inbound\"} 5\n";
        assert_eq!(tandem_handshakes(before_mtls), None);
    }
}
