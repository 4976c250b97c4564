//! `--self-signed`: serving certificates without cert-manager.
//!
//! The webhook keeps a CA and a serving certificate in the Secret `tandem-webhook-tls`
//! (`tls.crt`, `tls.key`, `ca.crt`, `ca.key`, and `ca-previous.crt` after a CA rotation),
//! writes the CA into the `caBundle` of both entries of its MutatingWebhookConfiguration, and
//! serves the certificate from memory. Every `check_interval` each replica reads the Secret
//! again: the first to find the serving certificate in its last third of life renews it (an
//! optimistic-concurrency update, so two replicas never both win), the others pick it up.
//! A CA in its last third is replaced and the previous CA stays in the bundle until it
//! expires, so certificates signed by either verify while replicas catch up.
//!
//! [`plan`] and [`secret_for`] are pure and unit-tested; [`reconcile`] and [`maintain`] do the
//! I/O and are exercised against a real apiserver by the local-cluster tests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use time::OffsetDateTime;
use tracing::{info, warn};

use crate::certs::{CertError, Issued, issue_serving, new_ca, service_dns_names};
use crate::metrics::Metrics;
use crate::tls::{CertPaths, CertResolver, certified_key, error_chain};

const TLS_CRT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const CA_CRT: &str = "ca.crt";
const CA_KEY: &str = "ca.key";
const CA_PREVIOUS_CRT: &str = "ca-previous.crt";
/// Annotations recording validity (Unix seconds) and names, so no X.509 parser is needed.
const ANNOTATION_PREFIX: &str = "tandem.dev/";

/// Where the certificates live and how long they last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapConfig {
    /// Namespace of the Secret and the Service (`tandem-system`).
    pub namespace: String,
    /// The Secret holding the CA and the serving certificate.
    pub secret: String,
    /// The webhook's Service, whose DNS names the certificate carries.
    pub service: String,
    /// The MutatingWebhookConfiguration whose `caBundle` is kept current.
    pub webhook_configuration: String,
    /// Further names (DNS names or IP addresses) for the serving certificate, for an
    /// apiserver that calls the webhook by URL (the local cluster: `127.0.0.1`).
    pub extra_names: Vec<String>,
    /// Lifetime of a new CA.
    pub ca_validity: Duration,
    /// Lifetime of a new serving certificate.
    pub cert_validity: Duration,
    /// How often the Secret is checked.
    pub check_interval: Duration,
}

impl BootstrapConfig {
    /// The names the serving certificate carries: the Service's, then the extra ones.
    pub fn certificate_names(&self) -> Vec<String> {
        let mut names = service_dns_names(&self.service, &self.namespace);
        names.extend(self.extra_names.iter().cloned());
        names
    }
}

/// Why the certificates could not be kept current.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The apiserver refused or failed a call.
    #[error("could not {action}")]
    Kube {
        /// What was being done.
        action: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// A certificate could not be made.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The stored pair does not load into rustls.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// Other replicas kept winning the update race.
    #[error("the Secret kept changing under us; will try again")]
    Contended,
}

fn kube_error(action: impl Into<String>) -> impl FnOnce(kube::Error) -> BootstrapError {
    let action = action.into();
    move |source| BootstrapError::Kube { action, source }
}

/// What the Secret holds, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The CA (certificate and key).
    pub ca: Issued,
    /// The serving certificate and key.
    pub serving: Issued,
    /// The DNS names the serving certificate was issued for.
    pub dns_names: Vec<String>,
    /// The CA before the last CA rotation, still trusted until it expires.
    pub previous_ca_pem: Option<String>,
}

/// What a replica should do with the Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Everything is current.
    Keep,
    /// Issue a new serving certificate with the stored CA.
    RenewServing,
    /// Make a new CA (keeping the old one in the bundle) and a serving certificate.
    NewCa,
}

/// Decides what to do given what is stored (`None`: no Secret, or one we cannot read).
pub fn plan(stored: Option<&Stored>, dns_names: &[String], now: OffsetDateTime) -> Plan {
    match stored {
        None => Plan::NewCa,
        Some(stored) if stored.ca.needs_renewal(now) => Plan::NewCa,
        Some(stored) if stored.serving.needs_renewal(now) || stored.dns_names != dns_names => {
            Plan::RenewServing
        }
        Some(_) => Plan::Keep,
    }
}

/// Reads a Secret written by [`secret_for`]; `None` if anything is missing or unreadable.
pub fn read_secret(secret: &Secret) -> Option<Stored> {
    let data = secret.data.as_ref()?;
    let text = |key: &str| {
        data.get(key)
            .and_then(|bytes| String::from_utf8(bytes.0.clone()).ok())
    };
    let annotations = secret.metadata.annotations.as_ref()?;
    let instant = |key: &str| {
        let seconds = annotations
            .get(&format!("{ANNOTATION_PREFIX}{key}"))?
            .parse()
            .ok()?;
        OffsetDateTime::from_unix_timestamp(seconds).ok()
    };
    Some(Stored {
        ca: Issued {
            cert_pem: text(CA_CRT)?,
            key_pem: text(CA_KEY)?,
            not_before: instant("ca-not-before")?,
            not_after: instant("ca-not-after")?,
        },
        serving: Issued {
            cert_pem: text(TLS_CRT)?,
            key_pem: text(TLS_KEY)?,
            not_before: instant("cert-not-before")?,
            not_after: instant("cert-not-after")?,
        },
        dns_names: annotations
            .get(&format!("{ANNOTATION_PREFIX}cert-dns-names"))?
            .split(',')
            .map(str::to_owned)
            .collect(),
        previous_ca_pem: text(CA_PREVIOUS_CRT),
    })
}

/// The Secret holding `stored`, named and placed per `config`.
pub fn secret_for(
    config: &BootstrapConfig,
    stored: &Stored,
    resource_version: Option<String>,
) -> Secret {
    let bytes = |text: &str| ByteString(text.as_bytes().to_vec());
    let mut data = BTreeMap::from([
        (TLS_CRT.to_owned(), bytes(&stored.serving.cert_pem)),
        (TLS_KEY.to_owned(), bytes(&stored.serving.key_pem)),
        (CA_CRT.to_owned(), bytes(&stored.ca.cert_pem)),
        (CA_KEY.to_owned(), bytes(&stored.ca.key_pem)),
    ]);
    if let Some(previous) = &stored.previous_ca_pem {
        data.insert(CA_PREVIOUS_CRT.to_owned(), bytes(previous));
    }
    let annotation = |key: &str, value: String| (format!("{ANNOTATION_PREFIX}{key}"), value);
    let annotations = BTreeMap::from([
        annotation(
            "ca-not-before",
            stored.ca.not_before.unix_timestamp().to_string(),
        ),
        annotation(
            "ca-not-after",
            stored.ca.not_after.unix_timestamp().to_string(),
        ),
        annotation(
            "cert-not-before",
            stored.serving.not_before.unix_timestamp().to_string(),
        ),
        annotation(
            "cert-not-after",
            stored.serving.not_after.unix_timestamp().to_string(),
        ),
        annotation("cert-dns-names", stored.dns_names.join(",")),
    ]);
    Secret {
        metadata: ObjectMeta {
            name: Some(config.secret.clone()),
            namespace: Some(config.namespace.clone()),
            resource_version,
            annotations: Some(annotations),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/name".to_owned(),
                    "tandem-webhook".to_owned(),
                ),
                ("app.kubernetes.io/part-of".to_owned(), "tandem".to_owned()),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(data),
        ..Secret::default()
    }
}

/// The `caBundle`: the current CA, and the previous one while replicas may still serve a
/// certificate it signed.
pub fn ca_bundle(stored: &Stored) -> String {
    let mut bundle = stored.ca.cert_pem.clone();
    if let Some(previous) = &stored.previous_ca_pem {
        bundle.push_str(previous);
    }
    bundle
}

/// What `plan` asks for, built from what is stored.
fn renewed(
    config: &BootstrapConfig,
    stored: Option<&Stored>,
    plan: &Plan,
    dns_names: &[String],
    now: OffsetDateTime,
) -> Result<Option<Stored>, CertError> {
    let (ca, previous_ca_pem) = match (plan, stored) {
        (Plan::Keep, _) => return Ok(None),
        (Plan::RenewServing, Some(stored)) => (stored.ca.clone(), stored.previous_ca_pem.clone()),
        // A CA rotation keeps the outgoing CA trusted (if it has not expired yet).
        (_, stored) => (
            new_ca(now, config.ca_validity)?,
            stored
                .filter(|s| s.ca.not_after > now)
                .map(|s| s.ca.cert_pem.clone()),
        ),
    };
    let serving = issue_serving(&ca, dns_names, now, config.cert_validity)?;
    Ok(Some(Stored {
        ca,
        serving,
        dns_names: dns_names.to_vec(),
        previous_ca_pem,
    }))
}

// ---------------------------------------------------------------------------------------------
// I/O

/// Brings the Secret and the caBundle up to date and returns what the Secret now holds.
pub async fn reconcile(
    client: &kube::Client,
    config: &BootstrapConfig,
) -> Result<Stored, BootstrapError> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &config.namespace);
    let dns_names = config.certificate_names();
    for _ in 0..5 {
        let now = OffsetDateTime::now_utc();
        let existing = secrets
            .get_opt(&config.secret)
            .await
            .map_err(kube_error(format!(
                "read Secret {}/{}",
                config.namespace, config.secret
            )))?;
        let stored = existing.as_ref().and_then(read_secret);
        if existing.is_some() && stored.is_none() {
            warn!(secret = %config.secret, "The certificate Secret is unreadable; replacing it");
        }
        let plan = plan(stored.as_ref(), &dns_names, now);
        let Some(next) = renewed(config, stored.as_ref(), &plan, &dns_names, now)? else {
            let stored = stored.ok_or(BootstrapError::Contended)?;
            patch_ca_bundle(client, config, &ca_bundle(&stored)).await?;
            return Ok(stored);
        };
        let version = existing
            .as_ref()
            .and_then(|s| s.metadata.resource_version.clone());
        let secret = secret_for(config, &next, version);
        let written = match &existing {
            Some(_) => {
                secrets
                    .replace(&config.secret, &PostParams::default(), &secret)
                    .await
            }
            None => secrets.create(&PostParams::default(), &secret).await,
        };
        match written {
            Ok(_) => {
                info!(?plan, not_after = %next.serving.not_after, "Wrote new webhook certificates");
                patch_ca_bundle(client, config, &ca_bundle(&next)).await?;
                return Ok(next);
            }
            // Another replica wrote first: read its result and start over.
            Err(kube::Error::Api(status)) if status.is_conflict() || status.is_already_exists() => {
                continue;
            }
            Err(error) => return Err(kube_error("write the certificate Secret")(error)),
        }
    }
    Err(BootstrapError::Contended)
}

/// Sets `caBundle` on every entry of the MutatingWebhookConfiguration that lacks it.
async fn patch_ca_bundle(
    client: &kube::Client,
    config: &BootstrapConfig,
    bundle: &str,
) -> Result<(), BootstrapError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let name = &config.webhook_configuration;
    for _ in 0..5 {
        let mut current = api.get(name).await.map_err(kube_error(format!(
            "read MutatingWebhookConfiguration {name}"
        )))?;
        let wanted = ByteString(bundle.as_bytes().to_vec());
        let mut changed = false;
        for webhook in current.webhooks.iter_mut().flatten() {
            if webhook.client_config.ca_bundle.as_ref() != Some(&wanted) {
                webhook.client_config.ca_bundle = Some(wanted.clone());
                changed = true;
            }
        }
        if !changed {
            return Ok(());
        }
        match api.replace(name, &PostParams::default(), &current).await {
            Ok(_) => {
                info!(%name, "Updated the caBundle");
                return Ok(());
            }
            Err(kube::Error::Api(status)) if status.is_conflict() => continue,
            Err(error) => return Err(kube_error(format!("update the caBundle of {name}"))(error)),
        }
    }
    Err(BootstrapError::Contended)
}

/// Keeps the certificates current and the resolver serving them, for as long as the task
/// lives. Failures are logged and retried sooner than the regular check.
pub async fn maintain(
    client: kube::Client,
    config: BootstrapConfig,
    resolver: Arc<CertResolver>,
    metrics: Arc<Metrics>,
) {
    let retry = config.check_interval.min(Duration::from_secs(10));
    let paths = CertPaths {
        cert: format!("Secret {}/{} {TLS_CRT}", config.namespace, config.secret).into(),
        key: format!("Secret {}/{} {TLS_KEY}", config.namespace, config.secret).into(),
    };
    let mut serving: Option<String> = None;
    loop {
        let wait = match reconcile(&client, &config).await.and_then(|stored| {
            let changed = serving.as_deref() != Some(stored.serving.cert_pem.as_str());
            if changed {
                let key = certified_key(
                    stored.serving.cert_pem.as_bytes(),
                    stored.serving.key_pem.as_bytes(),
                    &paths,
                )?;
                resolver.set(key);
                serving = Some(stored.serving.cert_pem.clone());
            }
            Ok(changed)
        }) {
            Ok(changed) => {
                if changed {
                    metrics.certificate_reload(true);
                    info!(secret = %config.secret, "Serving the certificate from the Secret");
                }
                config.check_interval
            }
            Err(error) => {
                metrics.certificate_reload(false);
                warn!(error = %error_chain(&error), "Could not keep the certificates current");
                retry
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn config() -> BootstrapConfig {
        BootstrapConfig {
            namespace: "tandem-system".into(),
            secret: "tandem-webhook-tls".into(),
            service: "tandem-webhook".into(),
            webhook_configuration: "tandem-webhook".into(),
            extra_names: Vec::new(),
            ca_validity: 3650 * DAY,
            cert_validity: 90 * DAY,
            check_interval: Duration::from_secs(3600),
        }
    }

    fn names() -> Vec<String> {
        service_dns_names("tandem-webhook", "tandem-system")
    }

    fn fresh(now: OffsetDateTime) -> Stored {
        renewed(&config(), None, &Plan::NewCa, &names(), now)
            .unwrap()
            .unwrap()
    }

    #[test]
    fn no_secret_means_a_new_ca() {
        assert_eq!(plan(None, &names(), OffsetDateTime::now_utc()), Plan::NewCa);
    }

    #[test]
    fn a_fresh_secret_is_kept_and_an_ageing_certificate_renewed() {
        let now = OffsetDateTime::now_utc();
        let stored = fresh(now);
        assert_eq!(plan(Some(&stored), &names(), now), Plan::Keep);
        let later = now + time::Duration::days(70);
        assert_eq!(plan(Some(&stored), &names(), later), Plan::RenewServing);
        let other = service_dns_names("renamed", "tandem-system");
        assert_eq!(plan(Some(&stored), &other, now), Plan::RenewServing);
        let much_later = now + time::Duration::days(2600);
        assert_eq!(plan(Some(&stored), &names(), much_later), Plan::NewCa);
    }

    #[test]
    fn the_secret_round_trips() {
        let stored = fresh(OffsetDateTime::now_utc());
        let secret = secret_for(&config(), &stored, Some("42".into()));
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        let read = read_secret(&secret).unwrap();
        // Validity is stored to the second.
        assert_eq!(read.serving.cert_pem, stored.serving.cert_pem);
        assert_eq!(read.ca.key_pem, stored.ca.key_pem);
        assert_eq!(
            read.serving.not_after.unix_timestamp(),
            stored.serving.not_after.unix_timestamp()
        );
        assert_eq!(read.dns_names, names());
    }

    #[test]
    fn renewing_the_serving_certificate_keeps_the_ca() {
        let now = OffsetDateTime::now_utc();
        let stored = fresh(now);
        let later = now + time::Duration::days(70);
        let next = renewed(
            &config(),
            Some(&stored),
            &Plan::RenewServing,
            &names(),
            later,
        )
        .unwrap()
        .unwrap();
        assert_eq!(next.ca, stored.ca);
        assert_ne!(next.serving.cert_pem, stored.serving.cert_pem);
        assert_eq!(ca_bundle(&next), stored.ca.cert_pem);
    }

    #[test]
    fn a_ca_rotation_keeps_the_old_ca_in_the_bundle() {
        let now = OffsetDateTime::now_utc();
        let stored = fresh(now);
        let later = now + time::Duration::days(2600);
        let next = renewed(&config(), Some(&stored), &Plan::NewCa, &names(), later)
            .unwrap()
            .unwrap();
        assert_ne!(next.ca.cert_pem, stored.ca.cert_pem);
        let bundle = ca_bundle(&next);
        assert!(bundle.contains(&next.ca.cert_pem) && bundle.contains(&stored.ca.cert_pem));
    }

    #[test]
    fn a_secret_missing_a_field_reads_as_nothing() {
        let stored = fresh(OffsetDateTime::now_utc());
        let mut secret = secret_for(&config(), &stored, None);
        secret.data.as_mut().unwrap().remove(CA_KEY);
        assert_eq!(read_secret(&secret), None);
    }
}
