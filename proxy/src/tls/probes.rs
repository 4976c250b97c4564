//! The kubelet's plaintext probes on a strict workload.
//!
//! The kubelet is not a meshed client: its HTTP probes reach the pod in plaintext. A `strict`
//! workload refuses plaintext, which would fail every `httpGet` probe on an application port.
//! As Linkerd does, the proxy lets exactly the pod's declared probes through: the webhook lists
//! each `httpGet` probe's port and path (`TANDEM_APP_PROBES`, JSON
//! `[{"port":8080,"path":"/healthz"}]`), and on such a port a plaintext HTTP/1 connection is
//! admitted, each request on it served only if it is a `GET` or `HEAD` of a listed path (else
//! 403). Everything else in plaintext stays refused. The set is fixed at start (a pod's probes
//! cannot change without a new pod), so the check is a scan of a few entries, with no lock.

use serde::Deserialize;

/// One probe: a port and a path.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppProbe {
    /// The container port the kubelet probes.
    pub port: u16,
    /// The path it asks for (query cut).
    pub path: String,
}

/// The pod's HTTP probes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppProbes(Vec<AppProbe>);

impl AppProbes {
    /// Parses the webhook's JSON; an empty value is no probes.
    pub fn parse(value: &str) -> Result<Self, String> {
        let value = value.trim();
        if value.is_empty() {
            return Ok(Self::default());
        }
        let probes: Vec<AppProbe> = serde_json::from_str(value)
            .map_err(|e| format!("not a JSON list of {{port, path}}: {e}"))?;
        if let Some(bad) = probes.iter().find(|p| !p.path.starts_with('/')) {
            return Err(format!("probe path {:?} does not start with /", bad.path));
        }
        Ok(Self(probes))
    }

    /// Whether any probe is declared.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a connection to `port` may carry a probe (`None`: the port is not known before
    /// the request's authority is read, as on a connection that was not redirected).
    pub fn covers(&self, port: Option<u16>) -> bool {
        match port {
            Some(port) => self.0.iter().any(|p| p.port == port),
            None => !self.is_empty(),
        }
    }

    /// Whether this request is one of the probes.
    pub fn allows(&self, port: u16, method: &http::Method, path: &str) -> bool {
        (method == http::Method::GET || method == http::Method::HEAD)
            && self.0.iter().any(|p| p.port == port && p.path == path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_webhooks_list_parses_and_only_its_gets_are_allowed() {
        let probes = AppProbes::parse(r#"[{"port":8080,"path":"/healthz"}]"#).unwrap();
        assert!(probes.covers(Some(8080)));
        assert!(!probes.covers(Some(9090)));
        assert!(probes.covers(None));
        assert!(probes.allows(8080, &http::Method::GET, "/healthz"));
        assert!(probes.allows(8080, &http::Method::HEAD, "/healthz"));
        assert!(!probes.allows(8080, &http::Method::POST, "/healthz"));
        assert!(!probes.allows(8080, &http::Method::GET, "/healthz/x"));
        assert!(!probes.allows(9090, &http::Method::GET, "/healthz"));
    }

    #[test]
    fn no_probes_cover_nothing_and_bad_lists_are_refused() {
        let none = AppProbes::parse("").unwrap();
        assert!(!none.covers(None));
        assert!(!none.covers(Some(8080)));
        assert!(AppProbes::parse("8080:/healthz").is_err());
        assert!(AppProbes::parse(r#"[{"port":8080,"path":"healthz"}]"#).is_err());
        assert!(AppProbes::parse(r#"[{"port":70000,"path":"/"}]"#).is_err());
    }
}
