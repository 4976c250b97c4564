//! The admin server (:15020): `/live`, `/ready`, `/metrics`, `/config`.
//!
//! `/config` shows the active version (and which source it came from: `activeSource`) and,
//! under `sources`, each source's last good version, its generation, when it was loaded and
//! its last error; the stream's also says whether it is connected, since when, and the
//! operator's address.
//!
//! It listens on its own port, never through the capture listeners: the inbound listener
//! refuses connections whose original destination is one of the proxy's ports.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora::apps::http_app::{HttpServer, ServeHttp};
use pingora::protocols::http::ServerSession;
use serde_json::json;

use tandem_crds::contract::ConfigSource;

use crate::config::ReloadError;
use crate::server::Shared;

/// The admin endpoints.
pub struct Admin {
    shared: Arc<Shared>,
}

impl Admin {
    /// The admin app wrapped in Pingora's HTTP server.
    pub fn server(shared: Arc<Shared>) -> HttpServer<Admin> {
        HttpServer::new_app(Admin { shared })
    }

    fn config(&self) -> serde_json::Value {
        let active = self.shared.config.active();
        let error = self.shared.config.last_error();
        json!({
            "path": self.shared.config.path().display().to_string(),
            "ready": self.shared.ready().is_ok(),
            "version": active.as_ref().map(|a| a.config.version.clone()),
            "hash": active.as_ref().map(|a| a.hash.clone()),
            "loadedAt": active.as_ref().map(|a| rfc3339(a.loaded_at)),
            "config": active.as_ref().and_then(|a| serde_json::to_value(&a.config).ok()),
            "policies": active.as_ref().and_then(|a| serde_json::to_value(a.policies.snapshot()).ok()),
            "authorization": active.as_ref().map(|a| json!({
                "defaultPolicy": a.authz.default_policy().as_str(),
                "trustDomain": a.authz.trust_domain(),
                "policies": a.config.authorization.policies.len(),
            })),
            "generation": active.as_ref().map(|a| a.generation()),
            "activeSource": active.as_ref().map(|a| a.source.as_str()),
            "lastError": error.map(|e| reload_error(&e)),
            "sources": {
                "file": self.source(ConfigSource::File),
                "stream": self.stream(),
            },
            "identity": self.shared.identity.snapshot(),
        })
    }

    /// One source's last good version and last error.
    fn source(&self, source: ConfigSource) -> serde_json::Value {
        let state = self.shared.config.source(source);
        let good = state.good.as_ref();
        json!({
            "version": good.map(|g| g.version.clone()),
            "generation": good.map(|g| g.generation),
            "hash": good.map(|g| g.hash.clone()),
            "loadedAt": good.map(|g| rfc3339(g.at)),
            "lastError": state.last_error.as_ref().map(reload_error),
        })
    }

    /// The stream's source section, with its connection.
    fn stream(&self) -> serde_json::Value {
        let Some(stream) = &self.shared.stream else {
            return json!({ "enabled": false });
        };
        let mut section = self.source(ConfigSource::Stream);
        let status = stream.state.status();
        if let Some(section) = section.as_object_mut() {
            section.insert("enabled".into(), true.into());
            section.insert("operator".into(), stream.state.operator.clone().into());
            section.insert("connected".into(), status.connected.into());
            section.insert("since".into(), status.since.map(rfc3339).into());
            section.insert("reconnects".into(), status.reconnects.into());
            section.insert(
                "lastDisconnect".into(),
                status
                    .last_error
                    .as_ref()
                    .map(|(message, at)| json!({"message": message, "at": rfc3339(*at)}))
                    .into(),
            );
        }
        section
    }
}

fn reload_error(e: &ReloadError) -> serde_json::Value {
    json!({"message": e.message, "at": rfc3339(e.at)})
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Vec<u8>>) -> Response<Vec<u8>> {
    let body = body.into();
    let mut response = Response::new(body);
    *response.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        response.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = response.body().len();
    response
        .headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    response
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        match session.req_header().uri.path() {
            "/live" => respond(StatusCode::OK, "text/plain", "live\n"),
            "/ready" => match self.shared.ready() {
                Ok(()) => respond(StatusCode::OK, "text/plain", "ready\n"),
                Err(why) => respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("not ready: {why}\n"),
                ),
            },
            "/metrics" => {
                self.shared
                    .metrics
                    .ready
                    .set(i64::from(self.shared.ready().is_ok()));
                let active = self.shared.config.active();
                respond(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    self.shared
                        .metrics
                        .encode(active.as_deref().map(|a| &a.policies)),
                )
            }
            "/config" => {
                let body = serde_json::to_vec_pretty(&self.config()).unwrap_or_default();
                respond(StatusCode::OK, "application/json", body)
            }
            _ => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found; try /live, /ready, /metrics, /config\n",
            ),
        }
    }
}
