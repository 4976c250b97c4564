//! Node-local forwarders: what a host-network proxy (a `hostNetwork` DaemonSet, or
//! node-local-dns) gives pods in a real cluster, for processes that run on the machine here.
//!
//! The node namespace has no route to the machine ([`super::net`]), and the operator's signer
//! runs as a process on host loopback. So the node agent listens inside the node namespace on
//! [`net::GATEWAY`] (the next hop of every pod, so reachable from each one whatever its
//! routes) and carries each connection to a loopback address of the machine. The listening
//! socket is made on a thread that joins the node namespace and then ends
//! ([`net::listen_in`]), so no other thread changes namespace; a socket keeps the namespace it
//! was made in, so the accept loop and the outgoing connections (made by the runtime's
//! threads, in the machine's namespace) run as usual tokio I/O.

use std::net::SocketAddr;
use std::path::Path;

use tracing::Instrument as _;

use super::net;
use crate::{Error, Result};

/// A port of [`net::GATEWAY`] in the node namespace forwarded to an address on the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostForward {
    /// The port pods connect to, on [`net::GATEWAY`].
    pub port: u16,
    /// Where the connections go, from the machine's own namespace (usually loopback).
    pub target: SocketAddr,
}

impl HostForward {
    /// The address pods connect to.
    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::from((net::GATEWAY, self.port))
    }
}

/// Starts `forward` in node namespace `netns`: binds at once (so a taken port fails the
/// caller), then serves on a task of its own until aborted.
pub fn start(netns: &Path, forward: HostForward) -> Result<tokio::task::JoinHandle<()>> {
    let listener = net::listen_in(netns, forward.listen_addr())?;
    let listener = tokio::net::TcpListener::from_std(listener)
        .map_err(|e| Error::io(format!("register {}", forward.listen_addr()), e))?;
    let span =
        tracing::info_span!("forward", listen = %forward.listen_addr(), target = %forward.target);
    Ok(tokio::spawn(
        serve(listener, forward.target).instrument(span),
    ))
}

/// Accepts connections on `listener` and carries each, both ways, to `target`, until the task
/// is aborted. A connection the target refuses is closed; the listener carries on.
pub async fn serve(listener: tokio::net::TcpListener, target: SocketAddr) {
    loop {
        let (mut inbound, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::warn!(error = %e, "Accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let span = tracing::debug_span!("connection", %peer);
        tokio::spawn(
            async move {
                let mut outbound = match tokio::net::TcpStream::connect(target).await {
                    Ok(stream) => stream,
                    Err(e) => {
                        tracing::warn!(error = %e, "Target unreachable; closing");
                        return;
                    }
                };
                match tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await {
                    Ok((sent, received)) => tracing::debug!(sent, received, "Closed"),
                    Err(e) => tracing::debug!(error = %e, "Ended with an error"),
                }
            }
            .instrument(span),
        );
    }
}
