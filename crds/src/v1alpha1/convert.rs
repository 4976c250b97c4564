//! Conversions from the CRDs' user-facing fields to the proxy config contract.
//!
//! The schema already refuses malformed durations and out-of-range numbers; these conversions
//! still check, because a CRD installed without validation (or an older schema) must not be
//! able to put a nonsense value into a proxy's config.

use super::circuit_breaker_policy::{CircuitBreakerPolicySpec, ConnectionPool, OutlierDetection};
use super::traffic_policy::{RetryBudget, RetryCondition, RetryPolicy};
use crate::contract;
use crate::duration::{DurationError, parse_millis};

/// A policy field that cannot be expressed in the proxy config.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// A duration string did not parse.
    #[error("{field}: {source}")]
    Duration {
        /// The field, as a path from `spec`.
        field: String,
        /// What was wrong.
        #[source]
        source: DurationError,
    },
    /// A number is outside what the field allows.
    #[error("{field}: {message}")]
    OutOfRange {
        /// The field, as a path from `spec`.
        field: String,
        /// What was wrong.
        message: String,
    },
}

fn millis(field: &str, value: &str) -> Result<u64, ConvertError> {
    parse_millis(value).map_err(|source| ConvertError::Duration {
        field: field.to_owned(),
        source,
    })
}

fn unsigned(field: &str, value: i32) -> Result<u32, ConvertError> {
    u32::try_from(value).map_err(|_| ConvertError::OutOfRange {
        field: field.to_owned(),
        message: format!("must not be negative, found {value}"),
    })
}

/// Converts a rule's retry policy; `field` is its path, such as `rules[0].retries`.
pub fn retries(field: &str, policy: &RetryPolicy) -> Result<contract::Retries, ConvertError> {
    let status_codes = policy
        .retriable_status_codes
        .iter()
        .map(|code| {
            u16::try_from(*code)
                .ok()
                .filter(|c| (100..=599).contains(c))
                .ok_or_else(|| ConvertError::OutOfRange {
                    field: format!("{field}.retriableStatusCodes"),
                    message: format!("{code} is not an HTTP status"),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(contract::Retries {
        attempts: unsigned(&format!("{field}.attempts"), policy.attempts)?,
        per_try_timeout_ms: policy
            .per_try_timeout
            .as_deref()
            .map(|t| millis(&format!("{field}.perTryTimeout"), t))
            .transpose()?,
        retry_on: policy.retry_on.iter().map(|c| retry_on(*c)).collect(),
        retriable_status_codes: status_codes,
        backoff_base_ms: millis(
            &format!("{field}.backoff.baseInterval"),
            &policy.backoff.base_interval,
        )?,
        backoff_max_ms: millis(
            &format!("{field}.backoff.maxInterval"),
            &policy.backoff.max_interval,
        )?,
        retry_non_idempotent: policy.retry_non_idempotent,
    })
}

fn retry_on(condition: RetryCondition) -> contract::RetryOn {
    match condition {
        RetryCondition::FiveXx => contract::RetryOn::FiveXx,
        RetryCondition::GatewayError => contract::RetryOn::GatewayError,
        RetryCondition::ConnectFailure => contract::RetryOn::ConnectFailure,
        RetryCondition::Reset => contract::RetryOn::Reset,
        RetryCondition::RetriableStatusCodes => contract::RetryOn::RetriableStatusCodes,
    }
}

/// Converts a retry budget.
pub fn retry_budget(budget: &RetryBudget) -> Result<contract::RetryBudget, ConvertError> {
    Ok(contract::RetryBudget {
        ratio: f64::from(unsigned("retryBudget.retryPercent", budget.retry_percent)?) / 100.0,
        min_retries_per_second: unsigned(
            "retryBudget.minRetriesPerSecond",
            budget.min_retries_per_second,
        )?,
        window_ms: millis("retryBudget.window", &budget.window)?,
    })
}

/// The budget that applies when a policy retries but names no budget.
pub fn default_retry_budget() -> contract::RetryBudget {
    contract::RetryBudget {
        ratio: 0.2,
        min_retries_per_second: 10,
        window_ms: 10_000,
    }
}

/// Converts a CircuitBreakerPolicy's spec.
pub fn circuit_breaker(
    spec: &CircuitBreakerPolicySpec,
) -> Result<contract::CircuitBreaker, ConvertError> {
    Ok(contract::CircuitBreaker {
        connection_pool: spec.connection_pool.as_ref().map(pool).transpose()?,
        outlier_detection: spec.outlier_detection.as_ref().map(outliers).transpose()?,
    })
}

fn pool(pool: &ConnectionPool) -> Result<contract::ConnectionPool, ConvertError> {
    Ok(contract::ConnectionPool {
        max_connections: unsigned("connectionPool.maxConnections", pool.max_connections)?,
        max_pending_requests: unsigned(
            "connectionPool.maxPendingRequests",
            pool.max_pending_requests,
        )?,
        max_requests: unsigned("connectionPool.maxRequests", pool.max_requests)?,
        max_retries: unsigned("connectionPool.maxRetries", pool.max_retries)?,
    })
}

fn outliers(od: &OutlierDetection) -> Result<contract::OutlierDetection, ConvertError> {
    Ok(contract::OutlierDetection {
        consecutive_5xx: unsigned(
            "outlierDetection.consecutive5xxErrors",
            od.consecutive_5xx_errors,
        )?,
        consecutive_gateway_errors: unsigned(
            "outlierDetection.consecutiveGatewayErrors",
            od.consecutive_gateway_errors,
        )?,
        interval_ms: millis("outlierDetection.interval", &od.interval)?,
        base_ejection_time_ms: millis("outlierDetection.baseEjectionTime", &od.base_ejection_time)?,
        max_ejection_time_ms: millis("outlierDetection.maxEjectionTime", &od.max_ejection_time)?,
        max_ejection_percent: unsigned(
            "outlierDetection.maxEjectionPercent",
            od.max_ejection_percent,
        )?,
    })
}
