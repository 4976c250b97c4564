//! Protocol detection: a pure classifier over the first bytes a client sends, and where a
//! redirected connection was going.
//!
//! Detection only ever looks at bytes the client has already sent; it never waits for a client
//! that stays silent. The waiting strategy (connect upstream at once and let whichever side
//! speaks first decide) lives in [`crate::connection`].

use std::net::SocketAddr;

use pingora::protocols::SocketDigest;

/// The original destination of a connection redirected by iptables, or `None` when it was not
/// redirected (no `SO_ORIGINAL_DST`, or it is the listener's own address).
pub fn redirected_destination(socket: &SocketDigest) -> Option<SocketAddr> {
    let original = *socket.original_dst()?.as_inet()?;
    let local = *socket.local_addr()?.as_inet()?;
    (original != local).then_some(original)
}

/// The HTTP/2 connection preface (RFC 9113 §3.4), sent first by an h2c prior-knowledge client.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How many bytes detection needs at most to decide.
pub const PROBE_LEN: usize = H2_PREFACE.len();

/// HTTP/1.1 methods, each followed by a space on the request line.
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"TRACE ",
    b"CONNECT ",
];

/// What the first bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    /// An HTTP/1.x request line.
    Http1,
    /// The HTTP/2 prior-knowledge preface.
    Http2,
    /// Anything else (TLS, a database protocol, …): relayed as opaque TCP.
    Opaque,
    /// A prefix of an HTTP method or of the preface: more bytes are needed to decide.
    NeedMore,
}

/// Classifies the first bytes of a connection.
pub fn classify(bytes: &[u8]) -> Detected {
    if bytes.is_empty() {
        return Detected::NeedMore;
    }
    if let Some(found) = match_prefix(bytes, H2_PREFACE) {
        return if found {
            Detected::Http2
        } else {
            Detected::NeedMore
        };
    }
    for method in METHODS {
        if let Some(found) = match_prefix(bytes, method) {
            return if found {
                Detected::Http1
            } else {
                Detected::NeedMore
            };
        }
    }
    Detected::Opaque
}

/// `Some(true)` if `bytes` starts with `token`, `Some(false)` if `bytes` is a strict prefix of
/// it, `None` if they differ.
fn match_prefix(bytes: &[u8], token: &[u8]) -> Option<bool> {
    let n = bytes.len().min(token.len());
    if bytes[..n] != token[..n] {
        return None;
    }
    Some(bytes.len() >= token.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_http1() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Detected::Http1);
        assert_eq!(classify(b"POST /x HTTP/1.1\r\n"), Detected::Http1);
        assert_eq!(classify(b"OPTIONS * HTTP/1.1"), Detected::Http1);
    }

    #[test]
    fn the_preface_is_http2() {
        assert_eq!(classify(H2_PREFACE), Detected::Http2);
        assert_eq!(classify(&H2_PREFACE[..10]), Detected::NeedMore);
    }

    #[test]
    fn prefixes_ask_for_more() {
        assert_eq!(classify(b""), Detected::NeedMore);
        assert_eq!(classify(b"GE"), Detected::NeedMore);
        assert_eq!(classify(b"P"), Detected::NeedMore);
        assert_eq!(classify(b"OPTIONS"), Detected::NeedMore);
    }

    #[test]
    fn tls_and_binary_protocols_are_opaque() {
        assert_eq!(classify(&[0x16, 0x03, 0x01, 0x02, 0x00]), Detected::Opaque);
        assert_eq!(classify(b"\x00\x00\x00\x08"), Detected::Opaque);
        assert_eq!(classify(b"GETX"), Detected::Opaque);
        assert_eq!(classify(b"get / HTTP/1.1"), Detected::Opaque);
        assert_eq!(classify(b"EHLO example.com\r\n"), Detected::Opaque);
    }
}
