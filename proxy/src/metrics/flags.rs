//! `response_flags`: how a request ended when no plain response explains it, in Envoy's
//! vocabulary, which Istio's dashboards and Kiali read.
//!
//! The mapping from the proxy's own outcomes is this one table ([`ResponseFlags::of`]):
//!
//! | what happened (type in this crate) | flag |
//! | --- | --- |
//! | a response arrived, whatever its status | `-` |
//! | [`Refusal::Overflow`]: a circuit breaker limit (`maxRequests`, `maxPendingRequests`, `maxConnections`) | `UO` (upstream overflow) |
//! | [`Refusal::NoEndpoints`]: no ready endpoint, or every one ejected | `UH` (no healthy upstream) |
//! | [`Refusal::UnknownPort`]: the service has no such port | `NR` (no route) |
//! | [`Outcome::Timeout`], or the request timeout fired | `UT` (upstream request timeout) |
//! | [`Outcome::ConnectFailure`]: refused, unreachable, connect timeout | `UF` (upstream connection failure) |
//! | [`Outcome::Reset`]: closed or reset before a response head | `UC` (upstream connection termination) |
//! | the client went away before the response was sent | `DC` (downstream connection termination) |
//! | and the last failure was not retried because [`NoRetry::AttemptsExhausted`], [`NoRetry::BudgetExhausted`] or [`NoRetry::MaxRetries`] | `,URX` appended (retry limit exceeded) |
//!
//! Envoy writes several flags comma-separated in a fixed order (`UF,URX`); so does this.
//! Requests without a policy have no recorded outcome: their Pingora error is classified the
//! same way ([`Cause::of_error`]).

use pingora::{Error as PingoraError, ErrorSource, ErrorType};

use crate::policy::{NoRetry, Outcome, Refusal};

/// Why the request ended without an upstream response, if it did.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub enum Cause {
    /// A response arrived (or nothing went wrong): no flag.
    #[default]
    None,
    /// `UO`.
    Overflow,
    /// `UH`.
    NoHealthyUpstream,
    /// `NR`.
    NoRoute,
    /// `UT`.
    Timeout,
    /// `UF`.
    ConnectFailure,
    /// `UC`.
    UpstreamReset,
    /// `DC`.
    DownstreamReset,
}

impl Cause {
    /// The cause of a refusal by the policy.
    pub fn of_refusal(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Overflow(_) => Self::Overflow,
            Refusal::NoEndpoints => Self::NoHealthyUpstream,
            Refusal::UnknownPort(_) => Self::NoRoute,
        }
    }

    /// The cause of an attempt's outcome.
    pub fn of_outcome(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Response(_) => Self::None,
            Outcome::ConnectFailure => Self::ConnectFailure,
            Outcome::Reset => Self::UpstreamReset,
            Outcome::Timeout => Self::Timeout,
        }
    }

    /// The cause of a Pingora error that ended a request.
    pub fn of_error(e: &PingoraError) -> Self {
        match e.etype() {
            ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::BindError
            | ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::InvalidCert => Self::ConnectFailure,
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => Self::Timeout,
            ErrorType::HTTPStatus(_) => Self::None,
            _ => match e.esource() {
                ErrorSource::Upstream => Self::UpstreamReset,
                ErrorSource::Downstream => Self::DownstreamReset,
                ErrorSource::Internal | ErrorSource::Unset => Self::None,
            },
        }
    }
}

/// The `response_flags` label: a cause and whether the retry limit stopped the request.
#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq)]
pub struct ResponseFlags {
    /// Why no response arrived.
    pub cause: Cause,
    /// The last failure was not retried because a retry limit was reached.
    pub retry_limit: bool,
}

impl ResponseFlags {
    /// No flag (`-`).
    pub const NONE: Self = Self {
        cause: Cause::None,
        retry_limit: false,
    };

    /// The flags of a request: refused by its policy, or ended after attempts whose last
    /// outcome (and why it was not retried) the policy recorded, or, without a policy, by its
    /// Pingora error. A sent response with a status and no failure is `-`.
    pub fn of(
        refusal: Option<Refusal>,
        last: Option<Outcome>,
        stopped: Option<NoRetry>,
        error: Option<&PingoraError>,
    ) -> Self {
        if let Some(refusal) = refusal {
            return Self {
                cause: Cause::of_refusal(refusal),
                retry_limit: false,
            };
        }
        let cause = match (last, error) {
            // The last attempt's own outcome, unless the error is newer: the request timeout
            // or the client leaving after the attempt answered.
            (_, Some(e)) if !matches!(Cause::of_error(e), Cause::None) => Cause::of_error(e),
            (Some(outcome), _) => Cause::of_outcome(outcome),
            (None, _) => Cause::None,
        };
        let failed = last.is_some_and(Outcome::is_failure);
        let retry_limit = failed
            && matches!(
                stopped,
                Some(NoRetry::AttemptsExhausted | NoRetry::BudgetExhausted | NoRetry::MaxRetries)
            );
        Self { cause, retry_limit }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match (self.cause, self.retry_limit) {
            (Cause::None, false) => "-",
            (Cause::None, true) => "URX",
            (Cause::Overflow, false) => "UO",
            (Cause::Overflow, true) => "UO,URX",
            (Cause::NoHealthyUpstream, false) => "UH",
            (Cause::NoHealthyUpstream, true) => "UH,URX",
            (Cause::NoRoute, false) => "NR",
            (Cause::NoRoute, true) => "NR,URX",
            (Cause::Timeout, false) => "UT",
            (Cause::Timeout, true) => "UT,URX",
            (Cause::ConnectFailure, false) => "UF",
            (Cause::ConnectFailure, true) => "UF,URX",
            (Cause::UpstreamReset, false) => "UC",
            (Cause::UpstreamReset, true) => "UC,URX",
            (Cause::DownstreamReset, false) => "DC",
            (Cause::DownstreamReset, true) => "DC,URX",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Overflow;

    fn flags(
        refusal: Option<Refusal>,
        last: Option<Outcome>,
        stopped: Option<NoRetry>,
    ) -> &'static str {
        ResponseFlags::of(refusal, last, stopped, None).as_str()
    }

    #[test]
    fn refusals_map_to_overflow_no_healthy_upstream_and_no_route() {
        for kind in [
            Overflow::MaxRequests,
            Overflow::MaxPendingRequests,
            Overflow::MaxConnections,
        ] {
            assert_eq!(flags(Some(Refusal::Overflow(kind)), None, None), "UO");
        }
        assert_eq!(flags(Some(Refusal::NoEndpoints), None, None), "UH");
        assert_eq!(flags(Some(Refusal::UnknownPort(81)), None, None), "NR");
    }

    #[test]
    fn a_response_has_no_flag_whatever_its_status() {
        assert_eq!(flags(None, Some(Outcome::Response(200)), None), "-");
        assert_eq!(
            flags(
                None,
                Some(Outcome::Response(503)),
                Some(NoRetry::NotConfigured)
            ),
            "-"
        );
        assert_eq!(flags(None, None, None), "-");
    }

    #[test]
    fn missing_responses_map_to_timeout_connect_failure_and_reset() {
        assert_eq!(flags(None, Some(Outcome::Timeout), None), "UT");
        assert_eq!(flags(None, Some(Outcome::ConnectFailure), None), "UF");
        assert_eq!(flags(None, Some(Outcome::Reset), None), "UC");
    }

    #[test]
    fn a_failure_stopped_by_a_retry_limit_adds_urx() {
        for stop in [
            NoRetry::AttemptsExhausted,
            NoRetry::BudgetExhausted,
            NoRetry::MaxRetries,
        ] {
            assert_eq!(flags(None, Some(Outcome::Response(503)), Some(stop)), "URX");
            assert_eq!(
                flags(None, Some(Outcome::ConnectFailure), Some(stop)),
                "UF,URX"
            );
        }
        // Not a limit: the route does not retry this, or the body cannot be replayed.
        assert_eq!(
            flags(None, Some(Outcome::Reset), Some(NoRetry::NotRetriable)),
            "UC"
        );
        // A success is never URX.
        assert_eq!(
            flags(
                None,
                Some(Outcome::Response(200)),
                Some(NoRetry::AttemptsExhausted)
            ),
            "-"
        );
    }

    #[test]
    fn pingora_errors_of_unpoliced_requests_are_classified_alike() {
        let e = PingoraError::explain(ErrorType::ConnectRefused, "x");
        assert_eq!(ResponseFlags::of(None, None, None, Some(&e)).as_str(), "UF");
        let e = PingoraError::explain(ErrorType::ReadTimedout, "x");
        assert_eq!(ResponseFlags::of(None, None, None, Some(&e)).as_str(), "UT");
        let mut e = PingoraError::explain(ErrorType::ConnectionClosed, "x");
        e.esource = ErrorSource::Downstream;
        assert_eq!(ResponseFlags::of(None, None, None, Some(&e)).as_str(), "DC");
        let e = PingoraError::explain(ErrorType::HTTPStatus(503), "x");
        assert_eq!(ResponseFlags::of(None, None, None, Some(&e)).as_str(), "-");
    }
}
