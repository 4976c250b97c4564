//! Opaque TCP relay: bytes are copied unchanged in both directions, with half-close.
//!
//! Each direction borrows a buffer only while bytes are flowing and frees it as soon as the
//! socket has nothing more to read, so an idle relayed connection holds no buffer at all (with
//! 10,000 mostly idle connections this is the difference between a few and a few hundred MiB).

use std::net::Shutdown;

use socket2::SockRef;
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
