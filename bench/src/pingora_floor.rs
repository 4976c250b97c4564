//! The bare Pingora proxy: a minimal `ProxyHttp` forwarding every request to one upstream
//! with stock settings (one worker thread, default buffers). It is the floor tandem-proxy's
//! cost is judged against: whatever tandem-proxy costs above it is ours.

use std::net::SocketAddr;

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::prelude::{HttpPeer, ProxyHttp, Server, Session, http_proxy_service};

/// Forwards to one upstream over plaintext HTTP/1.1 (the upstream pool keeps connections).
pub struct Forward {
    upstream: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Forward {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut Self::CTX,
    ) -> pingora::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.upstream, false, String::new())))
    }
}

/// Errors starting the floor proxy.
#[derive(Debug, thiserror::Error)]
pub enum FloorError {
    /// Pingora refused to build its server.
    #[error("pingora server: {0}")]
    Server(String),
}

/// Runs the floor proxy on `listen` (HTTP/1.1 and h2c prior knowledge) until killed.
pub fn run(listen: SocketAddr, upstream: SocketAddr) -> Result<(), FloorError> {
    let mut server = Server::new(None).map_err(|e| FloorError::Server(e.to_string()))?;
    server.bootstrap();
    let mut service = http_proxy_service(&server.configuration, Forward { upstream });
    service.add_tcp(&listen.to_string());
    if let Some(proxy) = service.app_logic_mut() {
        let mut options = HttpServerOptions::default();
        options.h2c = true;
        proxy.server_options = Some(options);
    }
    server.add_service(service);
    server.run_forever()
}
