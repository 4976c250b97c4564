//! Opens N keep-alive HTTP/1.1 connections to an address, sends one request on each (with a
//! Host header), then holds them all open until Ctrl-C: for measuring the proxy's memory per
//! connection.
//!
//! `cargo run --release -p tandem-proxy --example hold_connections -- 127.0.0.1:15001 127.0.0.1:18999 10000`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let target = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:15001".into());
    let host = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "127.0.0.1:18999".into());
    let n: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10_000);
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut held = Vec::with_capacity(n);
    let mut ok = 0usize;
    for i in 0..n {
        let mut tcp = tokio::net::TcpStream::connect(&target).await?;
        tcp.write_all(request.as_bytes()).await?;
        let mut buf = [0u8; 512];
        let got = tcp.read(&mut buf).await?;
        if buf[..got].starts_with(b"HTTP/1.1 200") {
            ok += 1;
        }
        held.push(tcp);
        if (i + 1) % 2_000 == 0 {
            eprintln!("{} connections open, {ok} answered 200", i + 1);
        }
    }
    println!("holding {n} connections ({ok} answered 200); Ctrl-C to stop");
    tokio::signal::ctrl_c().await?;
    Ok(())
}
