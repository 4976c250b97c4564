//! The issuer Secret (`tandem-identity-issuer` in the operator's namespace): created once,
//! watched for ever, its expiry checked hourly.
//!
//! Every replica runs this task (every replica signs). The first time the watch has listed and
//! found no Secret, the replica generates a root and an issuer ([`crate::ca::generate`]) and
//! *creates* the Secret: of two replicas racing, one create wins, the other gets AlreadyExists
//! and simply receives the winner's Secret from its watch. A Secret a user supplies (for
//! example cert-manager's, same layout) is used as it is. A changed Secret is loaded at once,
//! so a rotation needs no restart; a Secret that cannot be used is refused with a Warning
//! Event and the last good issuer keeps signing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt};
use tandem_crds::identity::{ISSUER_CERT_KEY, ISSUER_KEY_KEY, ISSUER_ROOTS_KEY, ISSUER_SECRET};
use tandem_crds::names::OPERATOR_FIELD_MANAGER;
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};
use tracing::{error, info, warn};

use crate::ca::{self, Authority, Material};
use crate::metrics::IdentityMetrics;

/// Warn when the issuer or a root expires within this.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often expiry is checked.
pub const EXPIRY_CHECK_EVERY: Duration = Duration::from_secs(3600);

/// The issuer as the rest of the operator sees it: `None` until a usable Secret is loaded.
pub type CurrentAuthority = watch::Receiver<Option<Arc<Authority>>>;

/// The three PEM values of a Secret, if it has them.
pub fn material_of(secret: &Secret) -> Result<Material, String> {
    let data = secret.data.clone().unwrap_or_default();
    let text = |key: &str| -> Result<String, String> {
        let bytes = data
            .get(key)
            .ok_or_else(|| format!("the Secret has no {key}"))?;
        String::from_utf8(bytes.0.clone()).map_err(|_| format!("{key} is not PEM text"))
    };
    Ok(Material {
        cert_pem: text(ISSUER_CERT_KEY)?,
        key_pem: text(ISSUER_KEY_KEY)?,
        roots_pem: text(ISSUER_ROOTS_KEY)?,
    })
}

/// The Secret holding `material`, as the operator creates it.
pub fn secret_of(namespace: &str, material: &Material) -> Secret {
    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    let mut secret = Secret {
        data: Some(BTreeMap::from([
            (ISSUER_CERT_KEY.to_owned(), bytes(&material.cert_pem)),
            (ISSUER_KEY_KEY.to_owned(), bytes(&material.key_pem)),
            (ISSUER_ROOTS_KEY.to_owned(), bytes(&material.roots_pem)),
        ])),
        type_: Some("kubernetes.io/tls".to_owned()),
        ..Secret::default()
    };
    secret.metadata.name = Some(ISSUER_SECRET.to_owned());
    secret.metadata.namespace = Some(namespace.to_owned());
    secret.metadata.labels = Some(BTreeMap::from([(
        crate::stores::MANAGED_BY_LABEL.to_owned(),
        OPERATOR_FIELD_MANAGER.to_owned(),
    )]));
    secret
}

/// Keeps `current` holding the issuer from the Secret in `namespace` until the watch ends;
/// wakes `changed` whenever the trust anchors change (the reconciler distributes them).
pub async fn run(
    client: Client,
    namespace: String,
    identity: String,
    current: watch::Sender<Option<Arc<Authority>>>,
    changed: Arc<Notify>,
    metrics: IdentityMetrics,
) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: OPERATOR_FIELD_MANAGER.to_owned(),
            instance: Some(identity),
        },
    );
    let config = watcher::Config::default().fields(&format!("metadata.name={ISSUER_SECRET}"));
    let mut stream = std::pin::pin!(watcher::watcher(secrets.clone(), config).default_backoff());
    let mut listed_once = false;
    let mut seen_in_list = false;
    let mut loaded: Option<(Material, Secret)> = None;
    let mut expiry_check = tokio::time::interval(EXPIRY_CHECK_EVERY);
    expiry_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            event = stream.next() => match event {
                Some(event) => event,
                None => break,
            },
            _ = expiry_check.tick() => {
                let authority = current.borrow().clone();
                if let (Some(authority), Some((_, secret))) = (authority, &loaded) {
                    warn_if_expiring(&authority, secret, &recorder).await;
                }
                continue;
            }
        };
        let secret = match event {
            Ok(Event::Init) => {
                seen_in_list = false;
                continue;
            }
            Ok(Event::InitApply(secret) | Event::Apply(secret)) => {
                seen_in_list = true;
                secret
            }
            Ok(Event::InitDone) => {
                if !listed_once && !seen_in_list {
                    create(&secrets, &namespace).await;
                }
                listed_once = true;
                continue;
            }
            Ok(Event::Delete(_)) => {
                warn!(secret = ISSUER_SECRET, %namespace, "Issuer Secret deleted; still signing with the last one loaded until it comes back (or the operator restarts and makes a new one)");
                continue;
            }
            Err(error) => {
                warn!(%error, secret = ISSUER_SECRET, "Issuer Secret watch failed; retrying with backoff");
                continue;
            }
        };
        let material = match material_of(&secret) {
            Ok(material) => material,
            Err(reason) => {
                refuse(&secret, &reason, &recorder).await;
                continue;
            }
        };
        if loaded.as_ref().is_some_and(|(m, _)| *m == material) {
            continue;
        }
        match Authority::load(&material) {
            Ok(authority) => {
                let roots_changed = current
                    .borrow()
                    .as_ref()
                    .is_none_or(|old| old.roots_pem != authority.roots_pem);
                info!(
                    issuer_fingerprint = %authority.issuer.fingerprint,
                    issuer_subject = %authority.issuer.subject,
                    issuer_not_after = %authority.issuer.not_after,
                    roots = authority.roots.len(),
                    root_fingerprints = ?authority.roots.iter().map(|r| r.fingerprint.as_str()).collect::<Vec<_>>(),
                    "Loaded the identity issuer"
                );
                metrics.expiries(&authority.issuer, &authority.roots);
                let authority = Arc::new(authority);
                warn_if_expiring(&authority, &secret, &recorder).await;
                current.send_replace(Some(authority));
                loaded = Some((material, secret));
                if roots_changed {
                    changed.notify_one();
                }
            }
            Err(error) => refuse(&secret, &error.to_string(), &recorder).await,
        }
    }
    warn!(secret = ISSUER_SECRET, "Issuer Secret watch ended");
}

/// Generates the material and creates the Secret; AlreadyExists means another replica won
/// the race, and its Secret arrives through the watch.
async fn create(secrets: &Api<Secret>, namespace: &str) {
    let material = match ca::generate(OffsetDateTime::now_utc()) {
        Ok(material) => material,
        Err(error) => {
            error!(%error, "Could not generate the identity CA");
            return;
        }
    };
    match secrets
        .create(&PostParams::default(), &secret_of(namespace, &material))
        .await
    {
        Ok(_) => {
            info!(secret = ISSUER_SECRET, %namespace, "Created the identity issuer Secret with a new root and issuer")
        }
        Err(kube::Error::Api(status)) if status.code == 409 => {
            info!(secret = ISSUER_SECRET, %namespace, "Another replica created the issuer Secret first; using it");
        }
        Err(error) => {
            error!(%error, secret = ISSUER_SECRET, %namespace, "Could not create the issuer Secret; nothing can be signed until it exists");
        }
    }
}

/// Logs and publishes why a Secret is not used; the last good issuer stays.
async fn refuse(secret: &Secret, reason: &str, recorder: &Recorder) {
    warn!(secret = %secret.name_any(), %reason, "Issuer Secret not usable; keeping the last good issuer");
    publish(
        recorder,
        secret,
        "IssuerInvalid",
        &format!("Not used: {reason}"),
    )
    .await;
}

/// Logs and publishes a Warning Event when the issuer or a root expires within 30 days.
async fn warn_if_expiring(authority: &Authority, secret: &Secret, recorder: &Recorder) {
    let now = OffsetDateTime::now_utc();
    for (kind, cert) in authority.expiring(now, EXPIRY_WARNING) {
        let days = (cert.not_after - now).whole_days();
        warn!(kind, fingerprint = %cert.fingerprint, subject = %cert.subject, not_after = %cert.not_after, days_left = days, "Identity certificate expires soon");
        let note = if cert.not_after <= now {
            format!(
                "The {kind} certificate {} ({}) expired at {}",
                cert.subject, cert.fingerprint, cert.not_after
            )
        } else {
            format!(
                "The {kind} certificate {} ({}) expires at {} ({days} days): rotate it (operator/README.md, \"Rotating the trust anchor\")",
                cert.subject, cert.fingerprint, cert.not_after
            )
        };
        publish(recorder, secret, "CertificateExpiring", &note).await;
    }
}

async fn publish(recorder: &Recorder, secret: &Secret, reason: &str, note: &str) {
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: reason.to_owned(),
        note: Some(note.chars().take(1000).collect()),
        action: "LoadIssuer".to_owned(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &secret.object_ref(&())).await {
        warn!(%error, "Could not publish an Event");
    }
}
