//! The certify task: get the first certificate, renew it at 70 % (±5 %) of its lifetime with a
//! fresh key, retry failures with backoff, and report every step (log, `/config`, metrics).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use super::certify::{Signer, certify};
use super::error::CertifyFailure;
use super::schedule::{renewal_delay, renewal_time, retry_delay};
use super::{CertifyStatus, Credentials, Failure, IdentityState};
use crate::error::chain;
use crate::metrics::Metrics;

/// Time allowed for one certify attempt, from resolving the signer to the end of its answer.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// The certify task.
pub struct Client {
    signer: Signer,
    state: Arc<IdentityState>,
    metrics: Arc<Metrics>,
    trust_changed: Arc<Notify>,
}

impl Client {
    /// A task asking `signer`, installing into `state`; a failed attempt's backoff is cut short
    /// when `trust_changed` is notified (a new bundle may be what it lacked).
    pub fn new(
        signer: Signer,
        state: Arc<IdentityState>,
        metrics: Arc<Metrics>,
        trust_changed: Arc<Notify>,
    ) -> Self {
        Self {
            signer,
            state,
            metrics,
            trust_changed,
        }
    }

    /// One attempt: certify, then install and report. Returns how long to wait until the next.
    pub async fn attempt(&self) -> Duration {
        let current = self.state.credentials();
        let expected = current.as_ref().map(|c| c.id.clone());
        match certify(&self.signer, self.state.trust(), expected.as_ref()).await {
            Ok(credentials) => self.installed(credentials),
            Err(failure) => self.failed(&failure, current.as_deref()),
        }
    }

    fn installed(&self, credentials: Credentials) -> Duration {
        let now = SystemTime::now();
        let jitter = fastrand::f64() * 2.0 - 1.0;
        let renew_at = renewal_time(credentials.not_before, credentials.not_after, jitter);
        let delay = renewal_delay(renew_at, now);
        let next = now + delay;
        let previous = self.state.certify_status();
        tracing::info!(
            id = %credentials.id,
            serial = %credentials.serial,
            not_after = %humantime::format_rfc3339(credentials.not_after),
            next_renewal = %humantime::format_rfc3339(next),
            renewal = previous.issued > 0,
            "Certificate installed"
        );
        self.metrics.identity.renewed();
        self.metrics
            .identity
            .cert_expiry
            .set(unix_seconds(credentials.not_after));
        self.metrics.identity.next_renewal.set(unix_seconds(next));
        self.state.set_credentials(Arc::new(credentials));
        self.state.set_certify_status(CertifyStatus {
            next_attempt: Some(next),
            last_error: None,
            failures: 0,
            issued: previous.issued + 1,
        });
        delay
    }

    fn failed(&self, failure: &CertifyFailure, current: Option<&Credentials>) -> Duration {
        let now = SystemTime::now();
        let previous = self.state.certify_status();
        let failures = previous.failures.saturating_add(1);
        let expiry = current.map(|c| c.not_after);
        let delay = retry_delay(failures, now, expiry);
        let next = now + delay;
        let message = chain(failure);
        let reason = failure.reason();
        match expiry {
            Some(expiry) if expiry <= now => tracing::error!(
                reason,
                error = %message,
                failures,
                expired = %humantime::format_rfc3339(expiry),
                retry_in = ?delay,
                "Certificate EXPIRED and renewal failed: peers refuse this proxy's mutual TLS until the signer answers"
            ),
            Some(expiry) => tracing::warn!(
                reason,
                error = %message,
                failures,
                expires = %humantime::format_rfc3339(expiry),
                retry_in = ?delay,
                "Certificate renewal failed; the current certificate stays in use"
            ),
            None => tracing::warn!(
                reason,
                error = %message,
                failures,
                retry_in = ?delay,
                "Cannot get a certificate yet; not ready until one is issued"
            ),
        }
        self.metrics.identity.failed(reason);
        self.metrics.identity.next_renewal.set(unix_seconds(next));
        self.state.set_certify_status(CertifyStatus {
            next_attempt: Some(next),
            last_error: Some(Failure {
                reason: Some(reason),
                message,
                at: now,
            }),
            failures,
            issued: previous.issued,
        });
        delay
    }

    /// Gets and renews the certificate, forever.
    pub async fn run(self) {
        loop {
            let delay = self.attempt().await;
            let retrying = self.state.certify_status().failures > 0;
            if retrying {
                // A new trust bundle may be what the last attempt lacked: try again at once.
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = self.trust_changed.notified() => {}
                }
            } else {
                tokio::time::sleep(delay).await;
            }
        }
    }
}

fn unix_seconds(t: SystemTime) -> f64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs_f64(),
        Err(e) => -e.duration().as_secs_f64(),
    }
}
