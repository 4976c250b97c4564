//! What happened to one attempt, as every part of the engine classifies it.

/// The result of one attempt to an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response head arrived with this status.
    Response(u16),
    /// No connection could be established (refused, unreachable, connect timeout). Nothing of
    /// the request reached the endpoint.
    ConnectFailure,
    /// The connection was reset or closed before a complete response head arrived.
    Reset,
    /// The per-try timeout fired before a response head arrived.
    Timeout,
}

impl Outcome {
    /// Whether the endpoint failed this attempt: a 5xx or no response at all. This is what
    /// outlier detection counts towards `consecutive5xx` and what the load balancer penalises.
    pub fn is_failure(self) -> bool {
        match self {
            Self::Response(status) => (500..=599).contains(&status),
            Self::ConnectFailure | Self::Reset | Self::Timeout => true,
        }
    }

    /// Whether this is a gateway error: 502, 503, 504, or no response at all (which the proxy
    /// itself answers with 502, 503 or 504), as Envoy's `consecutive_gateway_failure` counts.
    pub fn is_gateway_error(self) -> bool {
        match self {
            Self::Response(status) => matches!(status, 502..=504),
            Self::ConnectFailure | Self::Reset | Self::Timeout => true,
        }
    }

    /// Whether no response arrived at all.
    pub fn is_no_response(self) -> bool {
        !matches!(self, Self::Response(_))
    }

    /// A short name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Response(status) if (500..=599).contains(&status) => "5xx",
            Self::Response(_) => "response",
            Self::ConnectFailure => "connect-failure",
            Self::Reset => "reset",
            Self::Timeout => "timeout",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_missing_response_is_both_a_failure_and_a_gateway_error() {
        for o in [Outcome::ConnectFailure, Outcome::Reset, Outcome::Timeout] {
            assert!(o.is_failure() && o.is_gateway_error() && o.is_no_response());
        }
    }

    #[test]
    fn only_502_to_504_are_gateway_errors_among_responses() {
        assert!(Outcome::Response(503).is_gateway_error());
        assert!(!Outcome::Response(500).is_gateway_error());
        assert!(Outcome::Response(500).is_failure());
        assert!(!Outcome::Response(404).is_failure());
        assert!(!Outcome::Response(200).is_failure());
    }
}
