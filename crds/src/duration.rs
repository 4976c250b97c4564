//! Durations as the CRDs write them: `"250ms"`, `"10s"`, `"1m30s"`, `"1h"`.
//!
//! The accepted grammar is the subset of Go's `time.ParseDuration` that the schema's pattern
//! ([`DURATION_PATTERN`]) admits, so that CEL's `duration()` in the apiserver and this parser in
//! the operator always agree on what a string means.

use std::time::Duration;

/// The schema pattern for duration strings: one or more `<integer><unit>` groups, units `h`,
/// `m`, `s`, `ms`.
pub const DURATION_PATTERN: &str = r"^([0-9]{1,9}(ms|s|m|h))+$";

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (expected e.g. \"250ms\", \"10s\", \"1m30s\")")]
pub struct DurationError {
    input: String,
    reason: &'static str,
}

/// Parses a duration string such as `"1m30s"`.
pub fn parse_duration(input: &str) -> Result<Duration, DurationError> {
    let fail = |reason| DurationError {
        input: input.to_owned(),
        reason,
    };
    if input.is_empty() {
        return Err(fail("empty"));
    }
    let mut total = Duration::ZERO;
    let mut rest = input;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(fail("a number must come before each unit"));
        }
        if digits > 9 {
            return Err(fail("number too large"));
        }
        let (number, tail) = rest.split_at(digits);
        let value: u64 = number.parse().map_err(|_| fail("number too large"))?;
        let (unit, tail) = if let Some(t) = tail.strip_prefix("ms") {
            (Duration::from_millis(1), t)
        } else if let Some(t) = tail.strip_prefix('s') {
            (Duration::from_secs(1), t)
        } else if let Some(t) = tail.strip_prefix('m') {
            (Duration::from_secs(60), t)
        } else if let Some(t) = tail.strip_prefix('h') {
            (Duration::from_secs(3600), t)
        } else {
            return Err(fail("unit must be one of ms, s, m, h"));
        };
        let part = unit
            .checked_mul(u32::try_from(value).map_err(|_| fail("number too large"))?)
            .ok_or_else(|| fail("too long"))?;
        total = total.checked_add(part).ok_or_else(|| fail("too long"))?;
        rest = tail;
    }
    Ok(total)
}

/// Parses a duration and returns whole milliseconds, as the proxy config contract carries them.
pub fn parse_millis(input: &str) -> Result<u64, DurationError> {
    parse_duration(input).map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_go_style_durations() {
        assert_eq!(parse_millis("250ms"), Ok(250));
        assert_eq!(parse_millis("10s"), Ok(10_000));
        assert_eq!(parse_millis("1m30s"), Ok(90_000));
        assert_eq!(parse_millis("1h"), Ok(3_600_000));
        assert_eq!(parse_millis("0s"), Ok(0));
    }

    #[test]
    fn refuses_what_the_schema_pattern_refuses() {
        for bad in [
            "",
            "10",
            "s",
            "1.5s",
            "10 s",
            "-1s",
            "1d",
            "1sms",
            "9999999999s",
        ] {
            assert!(parse_millis(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn pattern_and_parser_agree() {
        let pattern = regex::Regex::new(DURATION_PATTERN).unwrap();
        for s in [
            "250ms",
            "1m30s",
            "0s",
            "1h2m3s4ms",
            "10",
            "1.5s",
            "ms",
            "1d",
            "",
        ] {
            assert_eq!(pattern.is_match(s), parse_duration(s).is_ok(), "{s:?}");
        }
    }
}
