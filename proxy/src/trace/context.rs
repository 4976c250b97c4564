//! Trace context on the wire: W3C `traceparent` (<https://www.w3.org/TR/trace-context/>) and
//! Zipkin's B3, as the single `b3` header and as the multi `x-b3-*` headers
//! (<https://github.com/openzipkin/b3-propagation>).
//!
//! Reading borrows the header values and decodes the ids into fixed arrays: nothing is
//! allocated. Writing builds each value in a stack buffer; the only allocation is the header
//! value itself. A context that breaks its format's rules (wrong length, upper-case or non-hex
//! digits, an all-zero id, W3C version `ff`, a repeated `traceparent`) is treated as absent, as
//! the W3C spec says, so the request is traced as if it carried none.
//!
//! Which one counts when several are present: a valid `traceparent`, else `b3`, else the
//! `x-b3-*` headers. The context is written back in the form it came in (the other formats'
//! headers pass through untouched); a trace the proxy starts is written as `traceparent`.
//! `tracestate` is never read or written here: it passes through unchanged.

use http::{HeaderMap, HeaderValue};

/// A 128-bit trace id.
pub type TraceId = [u8; 16];
/// A 64-bit span id.
pub type SpanId = [u8; 8];

/// The W3C header.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C vendor header, passed through unchanged.
pub const TRACESTATE: &str = "tracestate";
/// B3's single header.
pub const B3: &str = "b3";
/// B3's multi headers.
pub const B3_TRACE_ID: &str = "x-b3-traceid";
/// B3's multi headers.
pub const B3_SPAN_ID: &str = "x-b3-spanid";
/// B3's multi headers.
pub const B3_PARENT_SPAN_ID: &str = "x-b3-parentspanid";
/// B3's multi headers.
pub const B3_SAMPLED: &str = "x-b3-sampled";
/// B3's multi headers (`1`: debug, which implies sampled).
pub const B3_FLAGS: &str = "x-b3-flags";

/// The header form a context came in, and is written back in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `traceparent`.
    W3c,
    /// `b3: {trace}-{span}[-{sampled}[-{parent}]]`; `short` when its trace id had 16 digits.
    B3Single {
        /// A 64-bit trace id, written back as 16 digits.
        short: bool,
    },
    /// `x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`, ….
    B3Multi {
        /// A 64-bit trace id, written back as 16 digits.
        short: bool,
    },
}

/// A trace context received with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    /// The trace.
    pub trace_id: TraceId,
    /// The caller's span: the parent of the proxy's span.
    pub span_id: SpanId,
    /// The caller's sampling decision; `None` when it deferred (B3 without a sampling state).
    pub sampled: Option<bool>,
    /// How it came.
    pub format: Format,
}

/// What a request carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Incoming {
    /// No (valid) trace context.
    None,
    /// A whole context.
    Context(Context),
    /// B3's sampling state alone (`b3: 0`, `x-b3-sampled: 1` with no ids): a decision for a
    /// trace that has no ids yet.
    Decision(bool),
}

impl Incoming {
    /// Reads the request's trace headers (see the module docs for precedence).
    pub fn extract(headers: &HeaderMap) -> Self {
        if let Some(context) =
            single(headers, TRACEPARENT).and_then(|v| parse_traceparent(v.as_bytes()))
        {
            return Self::Context(context);
        }
        if let Some(value) = single(headers, B3) {
            let parsed = parse_b3_single(value.as_bytes());
            if parsed != Self::None {
                return parsed;
            }
        }
        parse_b3_multi(headers)
    }
}

/// The header's value when it appears exactly once (a repeated trace header is ambiguous).
fn single<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h HeaderValue> {
    let mut all = headers.get_all(name).iter();
    let first = all.next()?;
    all.next().is_none().then_some(first)
}

/// Parses `traceparent`: `{version}-{trace-id}-{parent-id}-{flags}`. Version `00` is exactly
/// 55 characters; a later version may append fields after a `-`, which are ignored (the spec's
/// forward compatibility). Version `ff` is invalid.
pub fn parse_traceparent(value: &[u8]) -> Option<Context> {
    if value.len() < 55 {
        return None;
    }
    let version: [u8; 1] = hex(&value[0..2])?;
    match version[0] {
        0xff => return None,
        0x00 if value.len() != 55 => return None,
        _ if value.len() > 55 && value[55] != b'-' => return None,
        _ => {}
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let trace_id: TraceId = nonzero(hex(&value[3..35])?)?;
    let span_id: SpanId = nonzero(hex(&value[36..52])?)?;
    let flags: [u8; 1] = hex(&value[53..55])?;
    Some(Context {
        trace_id,
        span_id,
        sampled: Some(flags[0] & 1 == 1),
        format: Format::W3c,
    })
}

/// Parses `b3`: a sampling state alone (`0`, `1`, `d`), or `{trace}-{span}`, optionally followed
/// by `-{sampling state}` and then `-{parent span}` (which the proxy does not need).
pub fn parse_b3_single(value: &[u8]) -> Incoming {
    if let Some(sampled) = b3_sampling(value) {
        return Incoming::Decision(sampled);
    }
    let mut parts = value.split(|&b| b == b'-');
    let (Some(trace), Some(span)) = (parts.next(), parts.next()) else {
        return Incoming::None;
    };
    let sampled = match parts.next() {
        None => None,
        Some(state) => match b3_sampling(state) {
            Some(sampled) => Some(sampled),
            None => return Incoming::None,
        },
    };
    if let Some(parent) = parts.next()
        && hex::<8>(parent).and_then(nonzero).is_none()
    {
        return Incoming::None;
    }
    if parts.next().is_some() {
        return Incoming::None;
    }
    let (Some((trace_id, short)), Some(span_id)) =
        (b3_trace_id(trace), hex(span).and_then(nonzero))
    else {
        return Incoming::None;
    };
    Incoming::Context(Context {
        trace_id,
        span_id,
        sampled,
        format: Format::B3Single { short },
    })
}

/// Reads the `x-b3-*` headers: ids from `x-b3-traceid` and `x-b3-spanid`, the decision from
/// `x-b3-flags: 1` (debug) or `x-b3-sampled` (`1`/`0`, or the legacy `true`/`false`).
pub fn parse_b3_multi(headers: &HeaderMap) -> Incoming {
    let debug = single(headers, B3_FLAGS).is_some_and(|v| v.as_bytes() == b"1");
    let sampled = if debug {
        Some(true)
    } else {
        single(headers, B3_SAMPLED).and_then(|v| match v.as_bytes() {
            b"1" | b"true" => Some(true),
            b"0" | b"false" => Some(false),
            _ => None,
        })
    };
    let trace = single(headers, B3_TRACE_ID).and_then(|v| b3_trace_id(v.as_bytes()));
    let span = single(headers, B3_SPAN_ID).and_then(|v| hex(v.as_bytes()).and_then(nonzero));
    match (trace, span, sampled) {
        (Some((trace_id, short)), Some(span_id), _) => Incoming::Context(Context {
            trace_id,
            span_id,
            sampled,
            format: Format::B3Multi { short },
        }),
        (None, None, Some(sampled)) => Incoming::Decision(sampled),
        _ => Incoming::None,
    }
}

/// A B3 sampling state: `1` (accept), `d` (debug, which is sampled) or `0` (deny).
fn b3_sampling(state: &[u8]) -> Option<bool> {
    match state {
        b"1" | b"d" => Some(true),
        b"0" => Some(false),
        _ => None,
    }
}

/// A B3 trace id: 32 digits, or 16 (a 64-bit id, widened with leading zeros). Returns whether
/// it was short.
fn b3_trace_id(digits: &[u8]) -> Option<(TraceId, bool)> {
    match digits.len() {
        32 => Some((nonzero(hex(digits)?)?, false)),
        16 => {
            let low: [u8; 8] = nonzero(hex(digits)?)?;
            let mut id = [0; 16];
            id[8..].copy_from_slice(&low);
            Some((id, true))
        }
        _ => None,
    }
}

/// Decodes exactly `2 * N` lower-case hex digits.
fn hex<const N: usize>(digits: &[u8]) -> Option<[u8; N]> {
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (nibble(pair[0])? << 4) | nibble(pair[1])?;
    }
    Some(out)
}

fn nibble(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        _ => None,
    }
}

/// An id of all zeros is invalid in both formats.
fn nonzero<const N: usize>(id: [u8; N]) -> Option<[u8; N]> {
    id.iter().any(|&b| b != 0).then_some(id)
}

const DIGITS: &[u8; 16] = b"0123456789abcdef";

/// Writes `bytes` as lower-case hex into `out` (twice as long).
pub fn encode_hex(bytes: &[u8], out: &mut [u8]) {
    for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0xf)];
    }
}

/// An id as lower-case hex, on the stack (for the access log).
pub struct Hex<const N: usize>([u8; N]);

impl<const N: usize> Hex<N> {
    /// `id`, whose length must be `N / 2`.
    pub fn of(id: &[u8]) -> Self {
        let mut out = [b'0'; N];
        encode_hex(id, &mut out);
        Self(out)
    }

    /// The digits.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

/// `00-{trace}-{span}-{01|00}`.
pub fn traceparent(trace_id: &TraceId, span_id: &SpanId, sampled: bool) -> HeaderValue {
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    encode_hex(trace_id, &mut out[3..35]);
    encode_hex(span_id, &mut out[36..52]);
    if sampled {
        out[54] = b'1';
    }
    header_value(&out)
}

/// `{trace}-{span}-{1|0}[-{parent}]`, the trace id as wide as it came.
pub fn b3_single(
    trace_id: &TraceId,
    short: bool,
    span_id: &SpanId,
    sampled: bool,
    parent: Option<&SpanId>,
) -> HeaderValue {
    let mut out = [0u8; 32 + 1 + 16 + 2 + 17];
    let trace = if short { &trace_id[8..] } else { &trace_id[..] };
    let mut len = trace.len() * 2;
    encode_hex(trace, &mut out[..len]);
    out[len] = b'-';
    encode_hex(span_id, &mut out[len + 1..len + 17]);
    len += 17;
    out[len] = b'-';
    out[len + 1] = if sampled { b'1' } else { b'0' };
    len += 2;
    if let Some(parent) = parent {
        out[len] = b'-';
        encode_hex(parent, &mut out[len + 1..len + 17]);
        len += 17;
    }
    header_value(&out[..len])
}

/// An id as a header value, `N` digits.
pub fn hex_value<const N: usize>(id: &[u8]) -> HeaderValue {
    header_value(&Hex::<N>::of(id).0)
}

fn header_value(ascii: &[u8]) -> HeaderValue {
    // Hex digits and dashes are always a valid header value.
    HeaderValue::from_bytes(ascii).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.append(*k, HeaderValue::from_static(v));
        }
        map
    }

    fn context(incoming: Incoming) -> Context {
        match incoming {
            Incoming::Context(c) => c,
            other => panic!("not a context: {other:?}"),
        }
    }

    #[test]
    fn a_traceparent_gives_its_ids_and_sampled_flag() {
        let c = parse_traceparent(TP.as_bytes()).unwrap();
        assert_eq!(
            Hex::<32>::of(&c.trace_id).as_str(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(Hex::<16>::of(&c.span_id).as_str(), "00f067aa0ba902b7");
        assert_eq!(c.sampled, Some(true));
        assert_eq!(c.format, Format::W3c);
        let off = parse_traceparent(
            &TP.as_bytes()[..53]
                .iter()
                .chain(b"00")
                .copied()
                .collect::<Vec<_>>(),
        )
        .unwrap();
        assert_eq!(off.sampled, Some(false));
        // Only bit 0 is the sampled flag.
        let other_bits = TP.replace("-01", "-02");
        assert_eq!(
            parse_traceparent(other_bits.as_bytes()).unwrap().sampled,
            Some(false)
        );
    }

    #[test]
    fn malformed_traceparents_are_absent() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-011",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert_eq!(parse_traceparent(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_traceparent_version_may_carry_more_fields() {
        let future = format!("cc{}-what-comes-next", &TP[2..]);
        let c = parse_traceparent(future.as_bytes()).unwrap();
        assert_eq!(c.sampled, Some(true));
    }

    #[test]
    fn a_repeated_traceparent_is_absent_and_b3_is_read_instead() {
        let h = headers(&[
            ("traceparent", TP),
            ("traceparent", TP),
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0"),
        ]);
        let c = context(Incoming::extract(&h));
        assert_eq!(c.format, Format::B3Single { short: false });
        assert_eq!(c.sampled, Some(false));
    }

    #[test]
    fn traceparent_wins_over_b3() {
        let h = headers(&[
            ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
            ("traceparent", TP),
        ]);
        assert_eq!(context(Incoming::extract(&h)).format, Format::W3c);
        assert_eq!(Incoming::extract(&HeaderMap::new()), Incoming::None);
    }

    #[test]
    fn b3_single_forms() {
        let c = context(parse_b3_single(
            b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1",
        ));
        assert_eq!(c.sampled, None, "deferred");
        let c = context(parse_b3_single(
            b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-d-05e3ac9a4f6e3b90",
        ));
        assert_eq!(c.sampled, Some(true), "debug is sampled");
        let short = context(parse_b3_single(b"a3ce929d0e0e4736-e457b5a2e4d86bd1-1"));
        assert_eq!(short.format, Format::B3Single { short: true });
        assert_eq!(
            Hex::<32>::of(&short.trace_id).as_str(),
            "0000000000000000a3ce929d0e0e4736"
        );
        assert_eq!(parse_b3_single(b"0"), Incoming::Decision(false));
        assert_eq!(parse_b3_single(b"1"), Incoming::Decision(true));
        assert_eq!(parse_b3_single(b"d"), Incoming::Decision(true));
        for bad in [
            &b"80f198ee56343ba864fe8b2a57d3eff7"[..],
            b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-2",
            b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-0000000000000000",
            b"80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90-x",
            b"80f198ee56343ba864fe8b2a57d3eff-e457b5a2e4d86bd1",
            b"00000000000000000000000000000000-e457b5a2e4d86bd1",
            b"80f198ee56343ba864fe8b2a57d3eff7-E457B5A2E4D86BD1",
            b"",
        ] {
            assert_eq!(
                parse_b3_single(bad),
                Incoming::None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn b3_multi_forms() {
        let h = headers(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
        ]);
        let c = context(Incoming::extract(&h));
        assert_eq!(
            (c.sampled, c.format),
            (Some(true), Format::B3Multi { short: false })
        );
        let h = headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "false"),
            ("x-b3-flags", "1"),
        ]);
        let c = context(Incoming::extract(&h));
        assert_eq!(
            (c.sampled, c.format),
            (Some(true), Format::B3Multi { short: true }),
            "debug wins"
        );
        let h = headers(&[("x-b3-sampled", "0")]);
        assert_eq!(Incoming::extract(&h), Incoming::Decision(false));
        let h = headers(&[("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7")]);
        assert_eq!(
            Incoming::extract(&h),
            Incoming::None,
            "a trace id without a span id"
        );
    }

    #[test]
    fn written_contexts_read_back_the_same() {
        let trace: TraceId = *b"0123456789abcdef";
        let span: SpanId = *b"spanid!!";
        let tp = traceparent(&trace, &span, true);
        let c = parse_traceparent(tp.as_bytes()).unwrap();
        assert_eq!(
            (c.trace_id, c.span_id, c.sampled),
            (trace, span, Some(true))
        );
        assert!(tp.to_str().unwrap().ends_with("-01"));
        assert!(
            traceparent(&trace, &span, false)
                .to_str()
                .unwrap()
                .ends_with("-00")
        );
        let parent: SpanId = *b"parent!!";
        let b3 = b3_single(&trace, false, &span, true, Some(&parent));
        let c = context(parse_b3_single(b3.as_bytes()));
        assert_eq!(
            (c.trace_id, c.span_id, c.sampled),
            (trace, span, Some(true))
        );
        let mut short_trace = [0u8; 16];
        short_trace[8..].copy_from_slice(b"shorttid");
        let b3 = b3_single(&short_trace, true, &span, false, None);
        assert_eq!(b3.len(), 16 + 1 + 16 + 2);
        let c = context(parse_b3_single(b3.as_bytes()));
        assert_eq!((c.trace_id, c.sampled), (short_trace, Some(false)));
        assert_eq!(
            hex_value::<16>(&span).to_str().unwrap(),
            Hex::<16>::of(&span).as_str()
        );
    }
}
