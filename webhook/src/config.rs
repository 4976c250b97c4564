//! What the webhook injects by default: the settings `main` builds from flags and
//! [`crate::overrides`] refines per pod. A leaf: it names no other module of this crate.

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use tandem_crds::identity;

/// The webhook's defaults for every injected pod.
#[derive(Debug, Clone, PartialEq)]
pub struct InjectConfig {
    /// The proxy image, also used for the init container.
    pub proxy_image: String,
    /// Written to the `tandem.dev/proxy-version` annotation.
    pub proxy_version: String,
    /// `imagePullPolicy` of both containers; `None` leaves the Kubernetes default.
    pub image_pull_policy: Option<String>,
    /// The proxy's log filter.
    pub log_level: String,
    /// The proxy's requests and limits.
    pub resources: ProxyResources,
    /// Where proxies get their workload certificates; `None` turns identity off, and then
    /// neither the token nor the trust roots are mounted.
    pub identity: Option<IdentityConfig>,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            proxy_image: format!("tandem-proxy:{}", env!("CARGO_PKG_VERSION")),
            proxy_version: env!("CARGO_PKG_VERSION").to_owned(),
            image_pull_policy: None,
            log_level: "info".to_owned(),
            resources: ProxyResources::default(),
            identity: Some(IdentityConfig::default()),
        }
    }
}

/// Requests and limits of the proxy container; `None` leaves one unset.
#[derive(Debug, Clone, PartialEq)]
pub struct ProxyResources {
    /// CPU request.
    pub cpu_request: Option<Quantity>,
    /// CPU limit.
    pub cpu_limit: Option<Quantity>,
    /// Memory request.
    pub memory_request: Option<Quantity>,
    /// Memory limit.
    pub memory_limit: Option<Quantity>,
}

impl Default for ProxyResources {
    /// A small request and a memory limit; no CPU limit, so the proxy is never throttled
    /// below what the application it carries needs.
    fn default() -> Self {
        Self {
            cpu_request: Some(Quantity("10m".into())),
            cpu_limit: None,
            memory_request: Some(Quantity("32Mi".into())),
            memory_limit: Some(Quantity("256Mi".into())),
        }
    }
}

/// How an injected proxy reaches the signer (`tandem-identity`, in the operator).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityConfig {
    /// The signer's `host:port`, as the proxy dials it (`TANDEM_IDENTITY_ADDR`).
    pub addr: String,
    /// The name the signer's serving certificate carries, which the proxy verifies
    /// (`TANDEM_IDENTITY_NAME`). Separate from `addr` so the proxy may dial an IP address.
    pub name: String,
}

impl IdentityConfig {
    /// The in-cluster default: the signer's Service on its fixed port.
    pub fn default_addr() -> String {
        format!("{}:{}", identity::signer_dns_name(), identity::SIGNER_PORT)
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            addr: Self::default_addr(),
            name: identity::signer_dns_name(),
        }
    }
}
