//! The command line: every flag with its environment fallback (`TANDEM_WEBHOOK_*`), validated
//! into [`Settings`] before any port is bound. `main.rs` parses, logs and exits with 64 on a
//! message from [`Args::settings`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use tandem_crds::{identity, names};

use crate::bootstrap::BootstrapConfig;
use crate::config::{IdentityConfig, InjectConfig, ProxyResources};
use crate::overrides::{is_image_reference, is_quantity};
use crate::tls::CertPaths;
use crate::{CertSource, Settings};

/// Tandem's mutating admission webhook: injects the tandem-proxy sidecar into selected pods.
#[derive(Debug, Parser)]
#[command(name = "tandem-webhook", version)]
pub struct Args {
    /// Address to serve HTTPS on.
    #[arg(long, env = "TANDEM_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    listen: SocketAddr,
    /// PEM certificate chain (reloaded when it changes).
    #[arg(
        long,
        env = "TANDEM_WEBHOOK_TLS_CERT",
        default_value = "/etc/tandem-webhook/tls/tls.crt"
    )]
    tls_cert: PathBuf,
    /// PEM private key (reloaded when it changes).
    #[arg(
        long,
        env = "TANDEM_WEBHOOK_TLS_KEY",
        default_value = "/etc/tandem-webhook/tls/tls.key"
    )]
    tls_key: PathBuf,
    /// How often to check the certificate files for changes.
    #[arg(long, env = "TANDEM_WEBHOOK_CERT_RELOAD_INTERVAL", default_value = "5s",
          value_parser = humantime::parse_duration)]
    cert_reload_interval: Duration,
    /// Make and rotate the CA and serving certificate in a Secret, and keep the
    /// MutatingWebhookConfiguration's caBundle current (no cert-manager needed). Without it,
    /// the certificate is read from --tls-cert and --tls-key.
    #[arg(long, env = "TANDEM_WEBHOOK_SELF_SIGNED")]
    self_signed: bool,
    /// Namespace of the webhook's Service and certificate Secret.
    #[arg(long, env = "TANDEM_WEBHOOK_NAMESPACE", default_value = names::SYSTEM_NAMESPACE)]
    namespace: String,
    /// Secret holding the certificates in --self-signed mode.
    #[arg(
        long,
        env = "TANDEM_WEBHOOK_TLS_SECRET",
        default_value = "tandem-webhook-tls"
    )]
    tls_secret: String,
    /// The webhook's Service, whose DNS names the certificate carries.
    #[arg(long, env = "TANDEM_WEBHOOK_SERVICE", default_value = "tandem-webhook")]
    service: String,
    /// The MutatingWebhookConfiguration whose caBundle --self-signed keeps current.
    #[arg(
        long,
        env = "TANDEM_WEBHOOK_CONFIGURATION",
        default_value = "tandem-webhook"
    )]
    webhook_configuration: String,
    /// Further names (DNS names or IPs) for the --self-signed serving certificate.
    #[arg(long, env = "TANDEM_WEBHOOK_CERT_EXTRA_NAMES", value_delimiter = ',')]
    cert_extra_names: Vec<String>,
    /// Lifetime of a CA made by --self-signed.
    #[arg(long, env = "TANDEM_WEBHOOK_CA_VALIDITY", default_value = "3650days",
          value_parser = humantime::parse_duration)]
    ca_validity: Duration,
    /// Lifetime of a serving certificate made by --self-signed (renewed with a third left).
    #[arg(long, env = "TANDEM_WEBHOOK_CERT_VALIDITY", default_value = "90days",
          value_parser = humantime::parse_duration)]
    cert_validity: Duration,
    /// How often --self-signed checks the Secret.
    #[arg(long, env = "TANDEM_WEBHOOK_CERT_CHECK_INTERVAL", default_value = "1h",
          value_parser = humantime::parse_duration)]
    cert_check_interval: Duration,
    /// Largest AdmissionReview body accepted, in bytes.
    #[arg(long, env = "TANDEM_WEBHOOK_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    max_body_bytes: usize,
    /// How long open connections may take to finish at shutdown.
    #[arg(long, env = "TANDEM_WEBHOOK_SHUTDOWN_GRACE", default_value = "20s",
          value_parser = humantime::parse_duration)]
    shutdown_grace: Duration,
    /// Proxy image injected into pods (the tandem-init container uses it too).
    #[arg(long, env = "TANDEM_WEBHOOK_PROXY_IMAGE")]
    proxy_image: Option<String>,
    /// Value of the tandem.dev/proxy-version annotation.
    #[arg(long, env = "TANDEM_WEBHOOK_PROXY_VERSION", default_value = env!("CARGO_PKG_VERSION"))]
    proxy_version: String,
    /// imagePullPolicy of the injected containers (Always, IfNotPresent, Never).
    #[arg(long, env = "TANDEM_WEBHOOK_IMAGE_PULL_POLICY",
          value_parser = ["Always", "IfNotPresent", "Never"])]
    image_pull_policy: Option<String>,
    /// The proxy's default log filter.
    #[arg(long, env = "TANDEM_WEBHOOK_PROXY_LOG_LEVEL", default_value = "info")]
    proxy_log_level: String,
    /// The proxy's default CPU request ("" for none).
    #[arg(long, env = "TANDEM_WEBHOOK_PROXY_CPU_REQUEST", default_value = "10m")]
    proxy_cpu_request: String,
    /// The proxy's default CPU limit ("" for none).
    #[arg(long, env = "TANDEM_WEBHOOK_PROXY_CPU_LIMIT", default_value = "")]
    proxy_cpu_limit: String,
    /// The proxy's default memory request ("" for none).
    #[arg(
        long,
        env = "TANDEM_WEBHOOK_PROXY_MEMORY_REQUEST",
        default_value = "32Mi"
    )]
    proxy_memory_request: String,
    /// The proxy's default memory limit ("" for none).
    #[arg(
        long,
        env = "TANDEM_WEBHOOK_PROXY_MEMORY_LIMIT",
        default_value = "256Mi"
    )]
    proxy_memory_limit: String,
    /// The signer injected proxies get their workload certificates from, as host:port; an
    /// empty value turns identity off (no token, trust roots or signer address is injected).
    #[arg(long, env = "TANDEM_WEBHOOK_IDENTITY_ADDR",
          default_value_t = IdentityConfig::default_addr())]
    identity_addr: String,
    /// The name the signer's serving certificate carries, which proxies verify (so
    /// --identity-addr may be an IP address).
    #[arg(long, env = "TANDEM_WEBHOOK_IDENTITY_NAME",
          default_value_t = identity::signer_dns_name())]
    identity_name: String,
    /// Log as JSON lines (in the cluster) instead of text.
    #[arg(long, env = "TANDEM_WEBHOOK_LOG_JSON")]
    log_json: bool,
}

impl Args {
    /// Whether to log JSON lines (read before the settings, so that their errors are logged in
    /// the format asked for).
    pub fn log_json(&self) -> bool {
        self.log_json
    }

    /// The validated settings, or a message naming the flag at fault.
    pub fn settings(self) -> Result<Settings, String> {
        let quantity = |flag: &str, value: &str| match value.trim() {
            "" => Ok(None),
            text if is_quantity(text) => Ok(Some(Quantity(text.to_owned()))),
            text => Err(format!(
                "--{flag} {text:?} is not a Kubernetes quantity like 100m or 64Mi"
            )),
        };
        let defaults = InjectConfig::default();
        let proxy_image = self.proxy_image.unwrap_or(defaults.proxy_image);
        if !is_image_reference(&proxy_image) {
            return Err(format!(
                "--proxy-image {proxy_image:?} is not an image reference"
            ));
        }
        let identity = identity_config(&self.identity_addr, &self.identity_name)?;
        let certificates = if self.self_signed {
            CertSource::SelfSigned(BootstrapConfig {
                namespace: self.namespace,
                secret: self.tls_secret,
                service: self.service,
                webhook_configuration: self.webhook_configuration,
                extra_names: self.cert_extra_names,
                ca_validity: self.ca_validity,
                cert_validity: self.cert_validity,
                check_interval: self.cert_check_interval,
            })
        } else {
            CertSource::Files {
                paths: CertPaths {
                    cert: self.tls_cert,
                    key: self.tls_key,
                },
                reload_interval: self.cert_reload_interval,
            }
        };
        Ok(Settings {
            listen: self.listen,
            certificates,
            max_body_bytes: self.max_body_bytes,
            shutdown_grace: self.shutdown_grace,
            inject: InjectConfig {
                proxy_image,
                proxy_version: self.proxy_version,
                image_pull_policy: self.image_pull_policy,
                log_level: self.proxy_log_level,
                resources: ProxyResources {
                    cpu_request: quantity("proxy-cpu-request", &self.proxy_cpu_request)?,
                    cpu_limit: quantity("proxy-cpu-limit", &self.proxy_cpu_limit)?,
                    memory_request: quantity("proxy-memory-request", &self.proxy_memory_request)?,
                    memory_limit: quantity("proxy-memory-limit", &self.proxy_memory_limit)?,
                },
                identity,
            },
        })
    }
}

/// Identity bootstrap from `--identity-addr` and `--identity-name`: off when the address is
/// empty; otherwise a `host:port` and a DNS name, or a message naming the flag at fault.
fn identity_config(addr: &str, name: &str) -> Result<Option<IdentityConfig>, String> {
    let addr = addr.trim();
    if addr.is_empty() {
        return Ok(None);
    }
    let port_ok = addr
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok || addr.chars().any(char::is_whitespace) {
        return Err(format!(
            "--identity-addr {addr:?} is not host:port (or empty, for identity off)"
        ));
    }
    let name = name.trim();
    let dns = |label: &str| {
        !label.is_empty()
            && label.len() <= 63
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.len() > 253 || !name.split('.').all(dns) {
        return Err(format!("--identity-name {name:?} is not a DNS name"));
    }
    Ok(Some(IdentityConfig {
        addr: addr.to_owned(),
        name: name.to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_flags_default_to_the_signers_service() {
        let args = Args::parse_from(["tandem-webhook"]);
        let settings = args.settings().unwrap();
        assert_eq!(
            settings.inject.identity,
            Some(IdentityConfig {
                addr: "tandem-identity.tandem-system.svc:15030".into(),
                name: "tandem-identity.tandem-system.svc".into(),
            })
        );
    }

    #[test]
    fn an_empty_identity_addr_turns_identity_off_and_a_bad_one_is_refused() {
        let settings = Args::parse_from(["tandem-webhook", "--identity-addr="])
            .settings()
            .unwrap();
        assert_eq!(settings.inject.identity, None);
        let local = identity_config("169.254.1.1:15030", "tandem-identity.tandem-system.svc");
        assert_eq!(local.unwrap().unwrap().addr, "169.254.1.1:15030");
        for bad in ["tandem-identity", ":15030", "host:0", "host:port", "a b:1"] {
            let error = identity_config(bad, "x").unwrap_err();
            assert!(error.contains("--identity-addr"), "{bad}: {error}");
        }
        assert!(identity_config("h:1", "not a name").is_err());
        assert!(identity_config("h:1", "").is_err());
    }
}
