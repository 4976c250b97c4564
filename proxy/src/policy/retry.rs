//! Whether a failed attempt is retried, and after how long.
//!
//! The checks here are the ones that depend only on the route's policy and the request: the
//! configured conditions, the attempt count, the method and the body. The shared limits (the
//! retry budget and the connection pool's concurrent-retry limit) are applied by
//! [`Decision::should_retry`](super::Decision::should_retry) after these pass.

use std::time::Duration;

use http::Method;
use tandem_crds::contract::{self, RetryOn};

use super::outcome::Outcome;
use super::sources::{Random, RandomExt, duration_nanos};

/// Largest request body buffered for replay, as Linkerd: larger bodies are not retried.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// A compiled retry policy of one route.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Retries after the first try.
    pub attempts: u32,
    /// Timeout of each try.
    pub per_try_timeout: Option<Duration>,
    conditions: Conditions,
    /// Sorted, for a binary search.
    retriable_status_codes: Vec<u16>,
    backoff_base: Duration,
    backoff_max: Duration,
    retry_non_idempotent: bool,
}

/// The `retryOn` set as bits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Conditions(u8);

impl Conditions {
    fn bit(on: RetryOn) -> u8 {
        match on {
            RetryOn::FiveXx => 1,
            RetryOn::GatewayError => 2,
            RetryOn::ConnectFailure => 4,
            RetryOn::Reset => 8,
            RetryOn::RetriableStatusCodes => 16,
        }
    }

    fn has(self, on: RetryOn) -> bool {
        self.0 & Self::bit(on) != 0
    }
}

/// Whether the request's body can be sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestBody {
    /// No body, or one held whole in the replay buffer (at most [`MAX_REPLAY_BODY`]).
    Replayable,
    /// Larger than the replay buffer, or not yet read to its end within it.
    TooLarge,
}

impl RequestBody {
    /// Classifies a body of known length.
    pub fn of_length(bytes: u64) -> Self {
        if bytes <= MAX_REPLAY_BODY {
            Self::Replayable
        } else {
            Self::TooLarge
        }
    }
}

/// Why a failed attempt is not retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoRetry {
    /// The last attempt succeeded, or no attempt result was recorded.
    NotFailed,
    /// The route has no retry policy.
    NotConfigured,
    /// The outcome is not one of the route's `retryOn` conditions.
    NotRetriable,
    /// Every configured retry was used.
    AttemptsExhausted,
    /// The method is not idempotent and the policy does not allow retrying it.
    NonIdempotent,
    /// The body could not be replayed.
    BodyTooLarge,
    /// The retry budget is spent.
    BudgetExhausted,
    /// The destination's concurrent-retry limit is reached.
    MaxRetries,
    /// The destination's pending-request limit is reached.
    MaxPendingRequests,
    /// The request's deadline would pass during the backoff.
    Deadline,
    /// No endpoint is left to try.
    NoEndpoints,
}

impl NoRetry {
    /// A short name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotFailed => "not-failed",
            Self::NotConfigured => "not-configured",
            Self::NotRetriable => "not-retriable",
            Self::AttemptsExhausted => "attempts-exhausted",
            Self::NonIdempotent => "non-idempotent",
            Self::BodyTooLarge => "body-too-large",
            Self::BudgetExhausted => "budget-exhausted",
            Self::MaxRetries => "max-retries",
            Self::MaxPendingRequests => "max-pending-requests",
            Self::Deadline => "deadline",
            Self::NoEndpoints => "no-endpoints",
        }
    }
}

/// Whether `method` may be repeated without a different effect (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl RetryPolicy {
    /// Compiles a route's retry policy.
    pub fn new(retries: &contract::Retries) -> Self {
        let mut codes = retries.retriable_status_codes.clone();
        codes.sort_unstable();
        codes.dedup();
        Self {
            attempts: retries.attempts,
            per_try_timeout: retries.per_try_timeout_ms.map(Duration::from_millis),
            conditions: Conditions(
                retries
                    .retry_on
                    .iter()
                    .fold(0, |bits, &on| bits | Conditions::bit(on)),
            ),
            retriable_status_codes: codes,
            backoff_base: Duration::from_millis(retries.backoff_base_ms),
            backoff_max: Duration::from_millis(retries.backoff_max_ms.max(retries.backoff_base_ms)),
            retry_non_idempotent: retries.retry_non_idempotent,
        }
    }

    /// Whether the outcome is one of the configured conditions. As in Envoy, `5xx` and
    /// `gateway-error` also cover attempts that got no response at all (the proxy would answer
    /// those with 502, 503 or 504 itself), and `reset` covers connect failures and timeouts too.
    pub fn retries_on(&self, outcome: Outcome) -> bool {
        let c = self.conditions;
        match outcome {
            Outcome::Response(status) => {
                (c.has(RetryOn::FiveXx) && (500..=599).contains(&status))
                    || (c.has(RetryOn::GatewayError) && matches!(status, 502..=504))
                    || (c.has(RetryOn::RetriableStatusCodes)
                        && self.retriable_status_codes.binary_search(&status).is_ok())
            }
            Outcome::ConnectFailure => {
                c.has(RetryOn::ConnectFailure)
                    || c.has(RetryOn::Reset)
                    || c.has(RetryOn::FiveXx)
                    || c.has(RetryOn::GatewayError)
            }
            Outcome::Reset | Outcome::Timeout => {
                c.has(RetryOn::Reset) || c.has(RetryOn::FiveXx) || c.has(RetryOn::GatewayError)
            }
        }
    }

    /// The checks that depend on this policy and the request alone.
    ///
    /// `retries_done` counts the retries already made. A connect failure is retried whatever the
    /// method and body, because nothing of the request reached the endpoint: repeating it cannot
    /// repeat an effect.
    pub fn check(
        &self,
        retries_done: u32,
        outcome: Outcome,
        idempotent: bool,
        body: RequestBody,
    ) -> Result<(), NoRetry> {
        if !outcome.is_failure() && !self.retries_on(outcome) {
            return Err(NoRetry::NotFailed);
        }
        if !self.retries_on(outcome) {
            return Err(NoRetry::NotRetriable);
        }
        if retries_done >= self.attempts {
            return Err(NoRetry::AttemptsExhausted);
        }
        if outcome == Outcome::ConnectFailure {
            return Ok(());
        }
        if !idempotent && !self.retry_non_idempotent {
            return Err(NoRetry::NonIdempotent);
        }
        if body == RequestBody::TooLarge {
            return Err(NoRetry::BodyTooLarge);
        }
        Ok(())
    }

    /// The pause before retry number `retry` (0 for the first retry): exponential backoff with
    /// full jitter (uniform between zero and `min(max, base × 2^retry)`), so that clients that
    /// failed together do not retry together.
    pub fn backoff(&self, retry: u32, random: &dyn Random) -> Duration {
        let ceiling = self
            .backoff_base
            .checked_mul(1u32.checked_shl(retry).unwrap_or(u32::MAX))
            .unwrap_or(self.backoff_max)
            .min(self.backoff_max);
        let nanos = duration_nanos(ceiling);
        Duration::from_nanos(random.below(nanos.saturating_add(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::sources::SeededRandom;

    fn policy(retry_on: &[RetryOn]) -> RetryPolicy {
        RetryPolicy::new(&contract::Retries {
            attempts: 2,
            per_try_timeout_ms: None,
            retry_on: retry_on.to_vec(),
            retriable_status_codes: vec![429],
            backoff_base_ms: 25,
            backoff_max_ms: 250,
            retry_non_idempotent: false,
        })
    }

    const REPLAY: RequestBody = RequestBody::Replayable;

    #[test]
    fn post_is_not_retried_by_default() {
        let p = policy(&[RetryOn::FiveXx]);
        assert!(!is_idempotent(&Method::POST));
        assert_eq!(
            p.check(0, Outcome::Response(503), false, REPLAY),
            Err(NoRetry::NonIdempotent)
        );
        assert_eq!(
            p.check(0, Outcome::Reset, false, REPLAY),
            Err(NoRetry::NonIdempotent),
            "a reset may come after the endpoint acted on the request"
        );
    }

    #[test]
    fn post_is_retried_when_the_policy_allows_it() {
        let mut p = policy(&[RetryOn::FiveXx]);
        p.retry_non_idempotent = true;
        assert_eq!(p.check(0, Outcome::Response(503), false, REPLAY), Ok(()));
    }

    #[test]
    fn a_connect_failure_is_retried_for_any_method_because_nothing_was_sent() {
        let p = policy(&[RetryOn::ConnectFailure]);
        assert_eq!(
            p.check(0, Outcome::ConnectFailure, false, RequestBody::TooLarge),
            Ok(())
        );
    }

    #[test]
    fn idempotent_methods_are_the_rfc_9110_ones() {
        for m in ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"] {
            assert!(
                is_idempotent(&Method::from_bytes(m.as_bytes()).unwrap()),
                "{m}"
            );
        }
        for m in ["POST", "PATCH", "CONNECT"] {
            assert!(
                !is_idempotent(&Method::from_bytes(m.as_bytes()).unwrap()),
                "{m}"
            );
        }
    }

    #[test]
    fn bodies_over_64_kib_are_not_retried() {
        let p = policy(&[RetryOn::FiveXx]);
        assert_eq!(RequestBody::of_length(64 * 1024), RequestBody::Replayable);
        let big = RequestBody::of_length(64 * 1024 + 1);
        assert_eq!(
            p.check(0, Outcome::Response(500), true, big),
            Err(NoRetry::BodyTooLarge)
        );
    }

    #[test]
    fn retries_stop_after_the_configured_attempts() {
        let p = policy(&[RetryOn::FiveXx]);
        assert_eq!(p.check(1, Outcome::Response(500), true, REPLAY), Ok(()));
        assert_eq!(
            p.check(2, Outcome::Response(500), true, REPLAY),
            Err(NoRetry::AttemptsExhausted)
        );
    }

    #[test]
    fn only_the_configured_conditions_are_retried() {
        let gateway = policy(&[RetryOn::GatewayError]);
        assert!(gateway.retries_on(Outcome::Response(503)));
        assert!(!gateway.retries_on(Outcome::Response(500)));
        assert!(gateway.retries_on(Outcome::Timeout));

        let connect = policy(&[RetryOn::ConnectFailure]);
        assert!(connect.retries_on(Outcome::ConnectFailure));
        assert!(!connect.retries_on(Outcome::Reset));
        assert!(!connect.retries_on(Outcome::Response(503)));

        let reset = policy(&[RetryOn::Reset]);
        assert!(reset.retries_on(Outcome::Reset));
        assert!(reset.retries_on(Outcome::ConnectFailure));
        assert!(!reset.retries_on(Outcome::Response(502)));

        let codes = policy(&[RetryOn::RetriableStatusCodes]);
        assert!(codes.retries_on(Outcome::Response(429)));
        assert!(!codes.retries_on(Outcome::Response(500)));

        assert_eq!(
            gateway.check(0, Outcome::Response(500), true, REPLAY),
            Err(NoRetry::NotRetriable)
        );
        assert_eq!(
            gateway.check(0, Outcome::Response(200), true, REPLAY),
            Err(NoRetry::NotFailed)
        );
    }

    #[test]
    fn a_listed_status_below_500_counts_as_a_failure_to_retry() {
        let p = policy(&[RetryOn::RetriableStatusCodes]);
        assert_eq!(p.check(0, Outcome::Response(429), true, REPLAY), Ok(()));
    }

    #[test]
    fn backoff_is_fully_jittered_under_an_exponential_ceiling_capped_at_max() {
        let p = policy(&[RetryOn::FiveXx]);
        let random = SeededRandom::new(3);
        for (retry, ceiling_ms) in [(0, 25), (1, 50), (2, 100), (3, 200), (4, 250), (40, 250)] {
            let samples: Vec<Duration> = (0..2_000).map(|_| p.backoff(retry, &random)).collect();
            let max = samples.iter().max().unwrap();
            let min = samples.iter().min().unwrap();
            assert!(
                *max <= Duration::from_millis(ceiling_ms),
                "retry {retry}: {max:?}"
            );
            // Full jitter spreads over the whole range, not just near the ceiling.
            assert!(
                *max >= Duration::from_millis(ceiling_ms) * 9 / 10,
                "retry {retry}"
            );
            assert!(
                *min <= Duration::from_millis(ceiling_ms) / 10,
                "retry {retry}"
            );
        }
    }
}
