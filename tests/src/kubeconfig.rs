//! Kubeconfig files: rendered here, read back by kube-rs, kubectl and our own binaries.

use base64::Engine as _;
use serde_json::json;

use crate::{Error, Result};

/// How a kubeconfig's user proves who it is.
#[derive(Clone, Debug)]
pub enum Credentials {
    /// A client certificate and key, PEM (the admin and kube-controller-manager).
    ClientCert {
        /// Certificate, PEM.
        cert_pem: String,
        /// Private key, PEM.
        key_pem: String,
    },
    /// A bearer token (a ServiceAccount's, from the TokenRequest API).
    Token(String),
}

/// Renders a kubeconfig with one cluster, one user and one current context, certificates
/// embedded so the file stands alone.
pub fn render(server: &str, ca_pem: &str, user: &str, credentials: &Credentials) -> Result<String> {
    let user_entry = match credentials {
        Credentials::ClientCert { cert_pem, key_pem } => json!({
            "client-certificate-data": base64(cert_pem.as_bytes()),
            "client-key-data": base64(key_pem.as_bytes()),
        }),
        Credentials::Token(token) => json!({ "token": token }),
    };
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "tandem-local",
            "cluster": {
                "server": server,
                "certificate-authority-data": base64(ca_pem.as_bytes()),
            },
        }],
        "users": [{ "name": user, "user": user_entry }],
        "contexts": [{
            "name": "tandem-local",
            "context": { "cluster": "tandem-local", "user": user },
        }],
        "current-context": "tandem-local",
    });
    serde_yaml::to_string(&config).map_err(Error::Yaml)
}

/// Standard base64 with padding, as kubeconfig's `*-data` fields expect.
fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_kubeconfig_is_read_by_kube_rs() {
        let text = render(
            "https://127.0.0.1:6443",
            "CA",
            "operator",
            &Credentials::Token("t0k".into()),
        )
        .unwrap();
        let parsed = kube::config::Kubeconfig::from_yaml(&text).unwrap();
        assert_eq!(parsed.current_context.as_deref(), Some("tandem-local"));
        let user = parsed.auth_infos[0].auth_info.as_ref().unwrap();
        assert!(user.token.is_some());
        let cluster = parsed.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
        assert_eq!(cluster.certificate_authority_data.as_deref(), Some("Q0E="));
    }
}
