//! One request's decision: what [`Policy::select`](super::Policy::select) chose, and the state
//! of its attempts. The request path keeps it in its per-request context and calls
//! [`Decision::on_attempt_result`] and [`Decision::should_retry`] after each attempt.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tandem_crds::contract::ServiceRef;

use super::breaker::{Overflow, PoolGuard};
use super::destination::{Attempt, Destination};
use super::outcome::Outcome;
use super::retry::{NoRetry, RequestBody, RetryPolicy};
use super::sources::Nanos;
use super::{Policy, Refusal};

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryDecision {
    /// Wait `backoff`, then send the request again to [`Decision::endpoint`] (already chosen,
    /// preferring another endpoint than the one that failed).
    Retry {
        /// The pause before the retry.
        backoff: Duration,
    },
    /// Answer with the last attempt's result.
    Stop(NoRetry),
}

/// A request's routing decision and the state of its attempts.
///
/// It holds `Arc`s of the policy and destination it started with, so a reload never changes a
/// request in flight, and RAII guards for its connection-pool slots, so they are given back
/// however the request ends.
#[derive(Debug)]
pub struct Decision {
    pub(crate) policy: Arc<Policy>,
    /// Index of the matched route; `None` when no route matched.
    pub(crate) route: Option<usize>,
    pub(crate) destination: Arc<Destination>,
    pub(crate) idempotent: bool,
    pub(crate) deadline: Option<Nanos>,
    pub(crate) attempts: u32,
    pub(crate) retries: u32,
    pub(crate) current: Option<Attempt>,
    /// The endpoint and outcome of the last finished attempt.
    pub(crate) last: Option<(SocketAddr, Outcome)>,
    pub(crate) _request: PoolGuard,
    pub(crate) retry_permit: Option<PoolGuard>,
    /// Why the last failed attempt was not retried (for `response_flags`' `URX`).
    pub(crate) stopped: Option<NoRetry>,
}

impl Decision {
    /// Name of the route that matched, or [`DEFAULT_ROUTE`](super::DEFAULT_ROUTE).
    pub fn route_name(&self) -> &str {
        self.policy.route_name(self.route)
    }

    /// The service the request was sent to (the policy's service).
    pub fn service(&self) -> &ServiceRef {
        self.policy.service()
    }

    /// The backend chosen by the route's split.
    pub fn backend(&self) -> &ServiceRef {
        self.destination.service()
    }

    /// The backend's port.
    pub fn backend_port(&self) -> u16 {
        self.destination.port()
    }

    /// The destination chosen, with its endpoints and counters.
    pub fn destination(&self) -> &Arc<Destination> {
        &self.destination
    }

    /// The endpoint of the attempt in progress.
    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.current.as_ref().map(Attempt::address)
    }

    /// The attempt in progress.
    pub fn attempt(&self) -> Option<&Attempt> {
        self.current.as_ref()
    }

    /// Name of the route that matched, `None` when no route did.
    pub fn matched_route(&self) -> Option<&str> {
        self.route.map(|_| self.route_name())
    }

    /// How the last finished attempt ended.
    pub fn last_outcome(&self) -> Option<Outcome> {
        self.last.map(|(_, outcome)| outcome)
    }

    /// Why the last attempt was not retried, once [`should_retry`](Self::should_retry) said
    /// to stop.
    pub fn retry_stopped(&self) -> Option<NoRetry> {
        self.stopped
    }

    /// Attempts made so far, the first included (for the attempts-per-request metric).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The route's retry policy.
    pub fn retry_policy(&self) -> Option<&RetryPolicy> {
        self.policy.route_settings(self.route).retries.as_ref()
    }

    /// The whole-request timeout, retries included; when it fires the answer is 504.
    pub fn request_timeout(&self) -> Option<Duration> {
        self.policy.route_settings(self.route).timeout
    }

    /// Time left before the request timeout, if it has one (zero once passed).
    pub fn time_left(&self) -> Option<Duration> {
        let now = self.policy.sources.now();
        self.deadline.map(|d| d.since(now))
    }

    /// Timeout of the attempt in progress: the per-try timeout, cut to the time left.
    pub fn attempt_timeout(&self) -> Option<Duration> {
        let per_try = self.retry_policy().and_then(|r| r.per_try_timeout);
        match (per_try, self.time_left()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Time allowed to connect to the endpoint.
    pub fn connect_timeout(&self) -> Duration {
        self.policy.connect_timeout
    }

    /// Time an idle pooled upstream connection is kept.
    pub fn idle_timeout(&self) -> Duration {
        self.policy.idle_timeout
    }

    /// The attempt in progress has its connection: releases its `maxPendingRequests` slot.
    pub fn on_connected(&mut self) {
        if let Some(attempt) = self.current.as_mut() {
            attempt.connected();
        }
    }

    /// Records how the attempt in progress ended. Returns whether outlier detection ejected its
    /// endpoint because of it. Without an attempt in progress it does nothing.
    pub fn on_attempt_result(&mut self, outcome: Outcome) -> bool {
        let Some(attempt) = self.current.take() else {
            return false;
        };
        let address = attempt.address();
        let now = self.destination.now();
        let ejected = self.destination.record(attempt, outcome, now);
        self.last = Some((address, outcome));
        self.retry_permit = None;
        ejected
    }

    /// Decides whether to retry after [`on_attempt_result`](Self::on_attempt_result).
    ///
    /// In order: the outcome must be a configured condition; retries must remain; the method
    /// must be idempotent (unless allowed, or nothing was sent); the body must be replayable;
    /// the backoff must end before the request's deadline; the destination's `maxRetries` must
    /// have room; an endpoint must be available (another than the failed one if possible); and
    /// last the retry budget must allow it, so a refused retry never spends budget.
    pub fn should_retry(&mut self, body: RequestBody) -> RetryDecision {
        match self.plan_retry(body) {
            Ok(backoff) => {
                self.stopped = None;
                RetryDecision::Retry { backoff }
            }
            Err(reason) => {
                self.stopped = Some(reason);
                RetryDecision::Stop(reason)
            }
        }
    }

    fn plan_retry(&mut self, body: RequestBody) -> Result<Duration, NoRetry> {
        let (failed, outcome) = self.last.ok_or(NoRetry::NotFailed)?;
        let Some(policy) = self.retry_policy() else {
            return Err(if outcome.is_failure() {
                NoRetry::NotConfigured
            } else {
                NoRetry::NotFailed
            });
        };
        policy.check(self.retries, outcome, self.idempotent, body)?;
        let backoff = policy.backoff(self.retries, self.policy.sources.random.as_ref());
        let now = self.destination.now();
        let start = now.after(backoff);
        if self.deadline.is_some_and(|deadline| start >= deadline) {
            return Err(NoRetry::Deadline);
        }
        let permit = self
            .destination
            .try_acquire(Overflow::MaxRetries)
            .map_err(|_| NoRetry::MaxRetries)?;
        let mut attempt =
            self.destination
                .pick(Some(failed), now)
                .map_err(|refusal| match refusal {
                    Refusal::Overflow(_) => NoRetry::MaxPendingRequests,
                    Refusal::NoEndpoints | Refusal::UnknownPort(_) => NoRetry::NoEndpoints,
                })?;
        if !self.policy.budget.try_withdraw(now) {
            return Err(NoRetry::BudgetExhausted);
        }
        attempt.starts_at(start);
        self.current = Some(attempt);
        self.retry_permit = Some(permit);
        self.retries += 1;
        self.attempts += 1;
        self.last = None;
        Ok(backoff)
    }
}
