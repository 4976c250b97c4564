//! Real upstream servers: HTTP/1.1 + h2c (one hyper server, auto-detected), TCP echo, and a
//! server-first TCP server. Each takes an already bound std listener, so a test can bind it
//! on loopback or inside a network namespace.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Binds 127.0.0.1:0.
pub fn bind_local() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap()
}

fn tokio_listener(l: std::net::TcpListener) -> tokio::net::TcpListener {
    l.set_nonblocking(true).unwrap();
    tokio::net::TcpListener::from_std(l).unwrap()
}

/// Headers echoed back as `echo-<name>`.
pub const TRACE_HEADERS: [&str; 5] = [
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
];

/// An HTTP server (HTTP/1.1 and h2c prior knowledge) answering `<name> <method> <path>`.
/// `/slow` answers after one second; `/echo` streams the request body back as it arrives.
pub fn http(name: &'static str, listener: std::net::TcpListener) -> SocketAddr {
    let addr = listener.local_addr().unwrap();
    let listener = tokio_listener(listener);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| handle(name, req));
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

async fn handle(
    name: &'static str,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<BoxBody<Bytes, hyper::Error>>, Infallible> {
    let path = req.uri().path().to_owned();
    let mut builder = Response::builder()
        .header("x-upstream", name)
        .header("x-version", format!("{:?}", req.version()));
    for h in TRACE_HEADERS {
        if let Some(v) = req.headers().get(h) {
            builder = builder.header(format!("echo-{h}"), v.clone());
        }
    }
    if path == "/echo" {
        if let Some(ct) = req.headers().get("content-type") {
            builder = builder.header("content-type", ct.clone());
        }
        return Ok(builder.body(req.into_body().boxed()).unwrap());
    }
    if path == "/slow" {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let body = format!("{name} {} {path}", req.method());
    Ok(builder
        .body(
            Full::new(Bytes::from(body))
                .map_err(|n: Infallible| match n {})
                .boxed(),
        )
        .unwrap())
}

/// A TCP echo server.
pub fn tcp_echo(listener: std::net::TcpListener) -> SocketAddr {
    let addr = listener.local_addr().unwrap();
    let listener = tokio_listener(listener);
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A server-first TCP server (like SMTP): it greets, then answers each line with `250 <line>`.
pub fn server_first(listener: std::net::TcpListener) -> SocketAddr {
    let addr = listener.local_addr().unwrap();
    let listener = tokio_listener(listener);
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                if tcp.write_all(b"220 tandem-test ready\r\n").await.is_err() {
                    return;
                }
                let mut buf = vec![0u8; 1024];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let line = String::from_utf8_lossy(&buf[..n]).trim_end().to_owned();
                            if tcp
                                .write_all(format!("250 {line}\r\n").as_bytes())
                                .await
                                .is_err()
                            {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// An HTTP server that answers every request with `status` and an empty body.
pub fn status(status: u16, listener: std::net::TcpListener) -> SocketAddr {
    let addr = listener.local_addr().unwrap();
    let listener = tokio_listener(listener);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| async move {
                    Ok::<_, Infallible>(
                        Response::builder()
                            .status(status)
                            .body(Full::new(Bytes::new()))
                            .unwrap(),
                    )
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}
