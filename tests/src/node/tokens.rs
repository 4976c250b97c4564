//! ServiceAccount tokens for projected volumes, as the kubelet's token manager makes them: one
//! TokenRequest per `serviceAccountToken` source, with the source's audience and lifetime and
//! bound to the pod (`boundObjectRef` kind Pod, name and UID, so the token dies with the pod and
//! a TokenReview names the pod), and a fresh one once 80 % of the lifetime has passed or the
//! token is 24 h old, whichever comes first (`pkg/kubelet/token/token_manager.go`,
//! `requiresRefresh`; the kubelet adds up to 10 s of jitter, which one node does not need).
//!
//! The schedule and the request body are pure functions; [`request`] is the one API call.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::{ServiceAccount, ServiceAccountTokenProjection};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

use crate::{Error, Result};

/// The lifetime the apiserver gives a projected token whose source names none.
pub const DEFAULT_EXPIRATION_SECONDS: i64 = 3_600;
/// A token is refreshed once it is this old, whatever its lifetime (the kubelet's `maxTTL`).
pub const MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// The pod a token is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundPod {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// Its UID.
    pub uid: String,
    /// Its ServiceAccount.
    pub service_account: String,
}

/// A token and when to replace it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// The JWT.
    pub value: String,
    /// When it must be replaced ([`refresh_at`]).
    pub refresh_at: SystemTime,
}

impl Token {
    /// Whether it is due for replacement at `now`.
    pub fn is_due(&self, now: SystemTime) -> bool {
        now >= self.refresh_at
    }
}

/// The TokenRequest the kubelet sends for `source` in `pod`: the source's audience (none: the
/// apiserver's own audiences), its lifetime (none: [`DEFAULT_EXPIRATION_SECONDS`]), bound to
/// the pod.
pub fn token_request(source: &ServiceAccountTokenProjection, pod: &BoundPod) -> Value {
    let audiences: Vec<&str> = source
        .audience
        .as_deref()
        .filter(|audience| !audience.is_empty())
        .into_iter()
        .collect();
    json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": audiences,
            "expirationSeconds": source.expiration_seconds.unwrap_or(DEFAULT_EXPIRATION_SECONDS),
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod.name,
                "uid": pod.uid,
            },
        },
    })
}

/// When a token that expires at `expires` after a lifetime of `lifetime` must be replaced: at
/// 80 % of its lifetime, or at 24 h of age if that comes first; never after it expires.
pub fn refresh_at(expires: SystemTime, lifetime: Duration) -> SystemTime {
    let issued = expires.checked_sub(lifetime).unwrap_or(expires);
    // 80 %, as 4/5 of the lifetime; saturating, so no lifetime can overflow it.
    let age = (lifetime / 5).saturating_mul(4).min(MAX_AGE);
    issued
        .checked_add(age)
        .map_or(expires, |due| due.min(expires))
}

/// Asks the apiserver for the token `source` describes, bound to `pod`.
pub async fn request(
    client: &kube::Client,
    source: &ServiceAccountTokenProjection,
    pod: &BoundPod,
) -> Result<Token> {
    let what = || {
        format!(
            "token for {}/{} (pod {}, audience {:?})",
            pod.namespace,
            pod.service_account,
            pod.name,
            source.audience.as_deref().unwrap_or_default()
        )
    };
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &pod.namespace);
    let created: TokenRequest = api
        .create_subresource(
            "token",
            &pod.service_account,
            &PostParams::default(),
            &token_request(source, pod),
        )
        .await
        .map_err(|e| Error::kube(what(), e))?;
    let status = created
        .status
        .ok_or_else(|| Error::Unexpected(format!("{}: no status", what())))?;
    // The lifetime the apiserver granted (it may raise what was asked) is in the answer's spec.
    let seconds = created
        .spec
        .expiration_seconds
        .or(source.expiration_seconds)
        .unwrap_or(DEFAULT_EXPIRATION_SECONDS);
    let lifetime = Duration::from_secs(u64::try_from(seconds).unwrap_or_default());
    let expires = SystemTime::from(status.expiration_timestamp.0);
    Ok(Token {
        value: status.token,
        refresh_at: refresh_at(expires, lifetime),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn pod() -> BoundPod {
        BoundPod {
            namespace: "shop".into(),
            name: "cart-1".into(),
            uid: "0f7c2c55-7a53-4c1b-9d3e-3c1d8c0c2b7e".into(),
            service_account: "cart".into(),
        }
    }

    #[test]
    fn a_token_is_refreshed_at_eighty_percent_of_its_lifetime() {
        let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let due = refresh_at(issued + HOUR, HOUR);
        assert_eq!(due, issued + Duration::from_secs(2880));
        let token = Token {
            value: "jwt".into(),
            refresh_at: due,
        };
        assert!(!token.is_due(issued + Duration::from_secs(2879)));
        assert!(token.is_due(issued + Duration::from_secs(2880)));
        assert!(token.is_due(issued + HOUR), "an expired token is due");
        // The shortest lifetime the apiserver grants: 600 s, refreshed after 480 s.
        let short = Duration::from_secs(600);
        assert_eq!(
            refresh_at(issued + short, short),
            issued + Duration::from_secs(480)
        );
    }

    #[test]
    fn a_token_older_than_a_day_is_refreshed_whatever_its_lifetime() {
        let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let year = Duration::from_secs(365 * 24 * 3600);
        assert_eq!(refresh_at(issued + year, year), issued + MAX_AGE);
        let two_days = 48 * HOUR;
        assert_eq!(refresh_at(issued + two_days, two_days), issued + MAX_AGE);
    }

    #[test]
    fn an_absurd_lifetime_is_not_a_panic_and_never_refreshes_after_expiry() {
        let expires = SystemTime::UNIX_EPOCH + HOUR;
        for lifetime in [
            Duration::MAX,
            Duration::from_secs(u64::MAX / 2),
            Duration::ZERO,
        ] {
            assert!(refresh_at(expires, lifetime) <= expires, "{lifetime:?}");
        }
    }

    #[test]
    fn the_request_carries_the_audience_the_lifetime_and_the_pod() {
        let source = ServiceAccountTokenProjection {
            audience: Some("tandem".into()),
            expiration_seconds: Some(3600),
            path: "token".into(),
        };
        let body = token_request(&source, &pod());
        assert_eq!(body["kind"], "TokenRequest");
        assert_eq!(body["spec"]["audiences"], json!(["tandem"]));
        assert_eq!(body["spec"]["expirationSeconds"], 3600);
        assert_eq!(
            body["spec"]["boundObjectRef"],
            json!({"apiVersion": "v1", "kind": "Pod", "name": "cart-1",
                   "uid": "0f7c2c55-7a53-4c1b-9d3e-3c1d8c0c2b7e"})
        );
        // The token request parses as the API type (field names are right).
        let typed: TokenRequest = serde_json::from_value(body).unwrap();
        let bound = typed.spec.bound_object_ref.unwrap();
        assert_eq!(bound.kind.as_deref(), Some("Pod"));
    }

    #[test]
    fn the_default_service_account_token_is_bound_too_and_keeps_the_apiservers_audience() {
        // What the ServiceAccount admission plugin projects as kube-api-access-*.
        let source = ServiceAccountTokenProjection {
            audience: None,
            expiration_seconds: Some(3607),
            path: "token".into(),
        };
        let body = token_request(&source, &pod());
        assert_eq!(body["spec"]["audiences"], json!([]));
        assert_eq!(body["spec"]["expirationSeconds"], 3607);
        assert_eq!(body["spec"]["boundObjectRef"]["name"], "cart-1");
        let unset = ServiceAccountTokenProjection {
            path: "token".into(),
            ..ServiceAccountTokenProjection::default()
        };
        assert_eq!(
            token_request(&unset, &pod())["spec"]["expirationSeconds"],
            DEFAULT_EXPIRATION_SECONDS
        );
    }
}
