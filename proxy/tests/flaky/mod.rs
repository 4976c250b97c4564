//! Upstream servers that misbehave on command, for the resilience tests.
//!
//! Each [`Flaky`] is a real HTTP/1.1 server on a loopback port (keep-alive, `Content-Length`
//! bodies). Its [`Mode`] can change at any time; every request it receives is counted, so tests
//! observe attempt counts and which endpoint served directly. Responses carry `x-served-by`.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How a server answers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Mode {
    /// 200 to everything.
    Healthy,
    /// 503 to every request (before answering 200 again, see [`Flaky::set`]).
    Fail(u16),
    /// This status to every `n`th request (the `n`th, `2n`th, …), 200 otherwise.
    FailEveryNth(u64, u16),
    /// 503 to a fraction of requests (deterministically spread: request `i` fails when
    /// `floor(i × fraction)` grows).
    FailFraction(f64),
    /// 200 after this delay.
    Slow(Duration),
    /// Reads the request, then resets the connection without answering.
    ResetBeforeResponse,
    /// Sends the response head and half the body, then resets the connection.
    ResetMidResponse,
}

/// A misbehaving upstream server.
pub struct Flaky {
    name: String,
    addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    requests: Arc<AtomicU64>,
    task: Mutex<Option<JoinHandle<()>>>,
}

impl Flaky {
    /// Starts a server named `name` on a loopback port.
    pub async fn start(name: &str, mode: Mode) -> Arc<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = Arc::new(Self {
            name: name.to_owned(),
            addr,
            mode: Arc::new(Mutex::new(mode)),
            requests: Arc::new(AtomicU64::new(0)),
            task: Mutex::new(None),
        });
        server.serve(listener);
        server
    }

    fn serve(self: &Arc<Self>, listener: TcpListener) {
        let me = Arc::clone(self);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let me = Arc::clone(&me);
                tokio::spawn(async move {
                    let _ = me.connection(stream).await;
                });
            }
        });
        *self.task.lock().unwrap() = Some(task);
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The server's name, as `x-served-by` carries it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Requests received so far (answered or not).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// Changes how the server answers from the next request on.
    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Stops listening: new connections are refused. Open connections are not closed.
    pub fn refuse(&self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }

    /// Listens again on the same port after [`refuse`](Self::refuse).
    pub async fn resume(self: &Arc<Self>) {
        let listener = TcpListener::bind(self.addr).await.unwrap();
        self.serve(listener);
    }

    async fn connection(&self, mut stream: TcpStream) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(4096);
        loop {
            let Some((head_len, body_len, close)) = read_request(&mut stream, &mut buf).await?
            else {
                return Ok(());
            };
            // The body, if any, is read and dropped.
            while buf.len() < head_len + body_len {
                let mut chunk = [0u8; 8192];
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    return Ok(());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            buf.drain(..head_len + body_len);
            let n = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
            let mode = *self.mode.lock().unwrap();
            let status = match mode {
                Mode::Healthy => 200,
                Mode::Fail(status) => status,
                Mode::FailEveryNth(every, status) => {
                    if n.is_multiple_of(every.max(1)) {
                        status
                    } else {
                        200
                    }
                }
                Mode::FailFraction(f) => {
                    #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
                    let fails = ((n as f64) * f).floor() > (((n - 1) as f64) * f).floor();
                    if fails { 503 } else { 200 }
                }
                Mode::Slow(delay) => {
                    tokio::time::sleep(delay).await;
                    200
                }
                Mode::ResetBeforeResponse => {
                    stream.set_zero_linger()?;
                    return Ok(());
                }
                Mode::ResetMidResponse => {
                    let body = "x".repeat(100);
                    let head = self.head(200, body.len());
                    stream.write_all(head.as_bytes()).await?;
                    stream.write_all(&body.as_bytes()[..50]).await?;
                    stream.flush().await?;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    stream.set_zero_linger()?;
                    return Ok(());
                }
            };
            let body = format!("{} {}\n", self.name, status);
            let response = format!("{}{}", self.head(status, body.len()), body);
            stream.write_all(response.as_bytes()).await?;
            if close {
                return Ok(());
            }
        }
    }

    fn head(&self, status: u16, len: usize) -> String {
        format!(
            "HTTP/1.1 {status} {}\r\ncontent-length: {len}\r\nx-served-by: {}\r\n\r\n",
            reason(status),
            self.name
        )
    }
}

impl Drop for Flaky {
    fn drop(&mut self) {
        if let Some(task) = self.task.lock().unwrap().take() {
            task.abort();
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// Reads one request head into `buf`; returns its length, the body's `Content-Length` and
/// whether the client asked to close, or `None` when the peer closed between requests.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<(usize, usize, bool)>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let body_len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            let close = head
                .lines()
                .any(|l| l.replace(' ', "") == "connection:close");
            return Ok(Some((end + 4, body_len, close)));
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A response as the test client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
}

impl Response {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request over a fresh connection to `proxy`, with `host` as its authority, and
/// reads the whole response (the connection is closed after it).
pub async fn send(
    proxy: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<Response> {
    let mut stream = TcpStream::connect(proxy).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await?;
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> std::io::Result<Response> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no response head"))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no status"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&raw[end + 4..]).into_owned(),
    })
}
