//! `tandem-webhook`: parse flags, start tracing, run, map the outcome to an exit code.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use tandem_webhook::inject::ProxyResources;
use tandem_webhook::overrides::{is_image_reference, is_quantity};
use tandem_webhook::tls::{CertPaths, error_chain};
use tandem_webhook::{InjectConfig, Settings};

/// Exit code for bad configuration (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

/// Tandem's mutating admission webhook: injects the tandem-proxy sidecar into selected pods.
#[derive(Debug, Parser)]
#[command(name = "tandem-webhook", version)]
struct Args {
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
    /// Log as JSON lines (in the cluster) instead of text.
    #[arg(long, env = "TANDEM_WEBHOOK_LOG_JSON")]
    log_json: bool,
}

impl Args {
    /// The validated settings, or a message naming the flag at fault.
    fn settings(self) -> Result<Settings, String> {
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
        Ok(Settings {
            listen: self.listen,
            cert: CertPaths {
                cert: self.tls_cert,
                key: self.tls_key,
            },
            cert_reload_interval: self.cert_reload_interval,
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
            },
        })
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(args.log_json);
    let settings = match args.settings() {
        Ok(settings) => settings,
        Err(message) => {
            tracing::error!(%message, "Invalid configuration");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            tracing::error!(%error, "Could not start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(tandem_webhook::run(settings, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %error_chain(&error), "tandem-webhook failed");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TANDEM_WEBHOOK_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    if json {
        builder.json().init()
    } else {
        builder.init()
    }
}

/// Completes on SIGTERM (the kubelet stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            // Without a SIGTERM handler, Ctrl-C still stops the server.
            Err(error) => {
                tracing::warn!(%error, "Cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("Shutting down");
}
