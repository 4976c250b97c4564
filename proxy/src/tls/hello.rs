//! The SNI and ALPN of a TLS ClientHello, read from peeked bytes.
//!
//! The inbound listener must know whether a connection is Tandem's mutual TLS (SNI = our own
//! DNS identity) before it decides to terminate it or to pass the application's own TLS through
//! untouched, so nothing may be consumed from the socket. The peeked bytes are fed to a
//! throw-away `rustls::server::Acceptor`, which parses the record layer and the ClientHello
//! (fragmented records included) exactly as the real handshake will.

use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// The most bytes peeked for a ClientHello (a hello with many extensions fits in a few KiB).
pub const MAX_HELLO: usize = 16 * 1024;

/// How long a client that started a TLS record may take to send the rest of its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_millis(500);

/// What a ClientHello asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Hello {
    /// The server name (SNI), if sent.
    pub sni: Option<String>,
    /// The ALPN protocols offered, in the client's order.
    pub alpn: Vec<Vec<u8>>,
}

/// What the bytes so far are.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A complete ClientHello.
    Hello(Hello),
    /// The start of a TLS handshake record; more bytes are needed.
    NeedMore,
    /// Not a TLS ClientHello.
    NotTls,
}

/// Whether the first byte starts a TLS handshake record.
pub fn starts_tls(bytes: &[u8]) -> bool {
    bytes.first() == Some(&0x16)
}

/// Parses the bytes a client has sent so far.
pub fn parse(mut bytes: &[u8]) -> Parsed {
    if !starts_tls(bytes) {
        return Parsed::NotTls;
    }
    let mut acceptor = rustls::server::Acceptor::default();
    while !bytes.is_empty() {
        match acceptor.read_tls(&mut bytes) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => {
            let hello = accepted.client_hello();
            Parsed::Hello(Hello {
                sni: hello.server_name().map(str::to_owned),
                alpn: hello
                    .alpn()
                    .map(|offered| offered.map(<[u8]>::to_vec).collect())
                    .unwrap_or_default(),
            })
        }
        Ok(None) => Parsed::NeedMore,
        Err(_) => Parsed::NotTls,
    }
}

/// Peeks at `client` until its ClientHello is complete. `None`: not TLS, or a hello that is
/// incomplete after [`HELLO_TIMEOUT`] or larger than [`MAX_HELLO`] (treated as foreign TLS).
pub async fn peek(client: &TcpStream) -> std::io::Result<Option<Hello>> {
    let mut buf = vec![0u8; MAX_HELLO];
    let deadline = Instant::now() + HELLO_TIMEOUT;
    loop {
        let n = client.peek(&mut buf).await?;
        let Some(bytes) = buf.get(..n) else {
            return Ok(None);
        };
        match parse(bytes) {
            Parsed::Hello(hello) => return Ok(Some(hello)),
            Parsed::NotTls => return Ok(None),
            Parsed::NeedMore if n == 0 || n >= MAX_HELLO || Instant::now() >= deadline => {
                return Ok(None);
            }
            Parsed::NeedMore => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The first flight of a real rustls client.
    fn client_hello(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn a_client_hello_gives_its_sni_and_alpn() {
        let bytes = client_hello("web.shop.sa.cluster.local", &[b"h2", b"tandem/1"]);
        assert_eq!(
            parse(&bytes),
            Parsed::Hello(Hello {
                sni: Some("web.shop.sa.cluster.local".into()),
                alpn: vec![b"h2".to_vec(), b"tandem/1".to_vec()],
            })
        );
    }

    #[test]
    fn a_partial_hello_asks_for_more_and_plaintext_is_not_tls() {
        let bytes = client_hello("example.com", &[]);
        assert_eq!(parse(&bytes[..20]), Parsed::NeedMore);
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Parsed::NotTls);
        assert_eq!(parse(&[0x16, 0xff, 0xff, 0, 1, 0]), Parsed::NotTls);
    }
}
