//! Opaque TCP relay: bytes are copied unchanged in both directions, with half-close.
//!
//! Each direction borrows a buffer only while bytes are flowing and frees it as soon as the
//! socket has nothing more to read, so an idle relayed connection holds no buffer at all (with
//! 10,000 mostly idle connections this is the difference between a few and a few hundred MiB).

use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll};

use socket2::SockRef;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::metrics::ConnectionTelemetry;

/// Largest chunk read at once.
const CHUNK: usize = 16 * 1024;

/// Relays between `client` and `upstream` until both directions are finished, counting bytes.
pub async fn relay(client: TcpStream, upstream: TcpStream, telemetry: &ConnectionTelemetry) {
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let up = async {
        let result = pump(&client, &upstream, |n| telemetry.from_client(n)).await;
        if result.is_err() {
            abort(&client, &upstream);
        }
    };
    let down = async {
        let result = pump(&upstream, &client, |n| telemetry.to_client(n)).await;
        if result.is_err() {
            abort(&client, &upstream);
        }
    };
    tokio::join!(up, down);
}

/// Copies `from` to `to` until `from` ends, then half-closes `to`.
async fn pump(from: &TcpStream, to: &TcpStream, count: impl Fn(u64)) -> std::io::Result<()> {
    loop {
        from.readable().await?;
        let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
        loop {
            match from.try_read_buf(&mut buf) {
                Ok(0) => {
                    // The peer finished sending: pass the FIN on, keep the other direction open.
                    let _ = SockRef::from(to).shutdown(Shutdown::Write);
                    return Ok(());
                }
                Ok(n) => {
                    write_all(to, &buf).await?;
                    count(n as u64);
                    buf.clear();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}

async fn write_all(to: &TcpStream, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        to.writable().await?;
        match to.try_write(bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A reset or error on one side ends both directions.
fn abort(a: &TcpStream, b: &TcpStream) {
    let _ = SockRef::from(a).shutdown(Shutdown::Both);
    let _ = SockRef::from(b).shutdown(Shutdown::Both);
}

/// Relays between two streams of any kind (a TLS session on either side) until both directions
/// are finished, counting the client's bytes as they pass.
///
/// Used where one side is encrypted: a TLS stream cannot be waited on for readability without
/// its buffers, so this path keeps tokio's copy buffers for the connection's life (an idle
/// mutual-TLS connection already holds rustls's buffers; plaintext keeps the buffer-free
/// [`relay`]). End of stream is passed on as a shutdown (a FIN, or TLS `close_notify`).
pub async fn relay_streams<C, U>(client: C, mut upstream: U, telemetry: &ConnectionTelemetry)
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut client = Counted {
        inner: client,
        telemetry,
    };
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        tracing::debug!(error = %e, "Relay ended with an error");
    }
}

/// A stream that counts the bytes read from it and written to it.
struct Counted<'t, S> {
    inner: S,
    telemetry: &'t ConnectionTelemetry,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.telemetry
                .from_client((buf.filled().len() - before) as u64);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.telemetry.to_client(n as u64);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
