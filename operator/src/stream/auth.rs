//! Who is calling: the proxy's projected token, reviewed as certify reviews it
//! ([`signer::authenticate`]), narrowed to what the stream serves (a pod of a workload), and
//! remembered briefly so a reconnect storm costs one TokenReview per pod, not per attempt.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kube::Client;
use sha2::{Digest, Sha256};

use crate::hub::PodKey;
use crate::render::WorkloadKey;
use crate::signer::{self, PodBinding, Refusal};
use tandem_crds::identity::SpiffeId;

/// How long a successful review is trusted at most (a token's own expiry cuts it shorter).
/// A pod deleted meanwhile keeps its open watch until it drops the connection; the hub
/// forgets it at the next pass, and its token is refused again after this.
pub const REVIEW_TTL: Duration = Duration::from_secs(60);
/// Reviews remembered at most; past it, expired ones are dropped, then all (a cache, not a
/// register: a forgotten token is just reviewed again).
const MAX_CACHED: usize = 50_000;

/// The pod a reviewed token belongs to, and its workload: the one view it may see.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The pod's workload (its namespace and ServiceAccount).
    pub workload: WorkloadKey,
    /// The pod.
    pub pod: PodKey,
}

/// Step 1 of every stream call, pure: the caller a review vouches for. The stream needs the
/// pod (watches and applied reports are counted per pod), so a token that is not bound to one
/// (not a projected token) is refused.
pub fn caller_of(id: &SpiffeId, binding: Option<PodBinding>) -> Result<Caller, Refusal> {
    let Some(binding) = binding else {
        return Err(Refusal::PodNotFound(format!(
            "the token of {id} is not bound to a pod: the config stream serves the proxy's \
             projected token (audience tandem)"
        )));
    };
    Ok(Caller {
        workload: WorkloadKey {
            namespace: id.namespace.clone(),
            service_account: id.service_account.clone(),
        },
        pod: PodKey {
            namespace: id.namespace.clone(),
            name: binding.name,
        },
    })
}

/// Reviews tokens against the apiserver and remembers the callers of accepted ones.
pub struct Authenticator {
    client: Client,
    trust_domain: String,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
}

struct Cached {
    caller: Caller,
    until: Instant,
}

impl Authenticator {
    /// Reviews with `client`; identities are in `trust_domain`.
    pub fn new(client: Client, trust_domain: String) -> Self {
        Self {
            client,
            trust_domain,
            cache: Mutex::default(),
        }
    }

    /// The caller of `token`: remembered, or reviewed now. Refusals are not remembered (a
    /// pod that was not yet visible may be a moment later).
    pub async fn caller(&self, token: &str) -> Result<Caller, Refusal> {
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some(caller) = self.remembered(&key, now) {
            return Ok(caller);
        }
        let (id, binding) = signer::authenticate(&self.client, token, &self.trust_domain).await?;
        let caller = caller_of(&id, binding)?;
        let until = now + trusted_for(signer::unverified_expiry(token), SystemTime::now());
        self.remember(key, caller.clone(), until, now);
        Ok(caller)
    }

    fn remembered(&self, key: &[u8; 32], now: Instant) -> Option<Caller> {
        let cache = lock(&self.cache);
        cache
            .get(key)
            .filter(|c| c.until > now)
            .map(|c| c.caller.clone())
    }

    fn remember(&self, key: [u8; 32], caller: Caller, until: Instant, now: Instant) {
        let mut cache = lock(&self.cache);
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, c| c.until > now);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(key, Cached { caller, until });
    }
}

/// How long an accepted token is trusted: [`REVIEW_TTL`], cut at its `exp` claim (the review
/// accepted the token, so its claims are the apiserver's; a token without one gets the TTL).
pub fn trusted_for(expiry: Option<i64>, now: SystemTime) -> Duration {
    let Some(expiry) = expiry else {
        return REVIEW_TTL;
    };
    let now = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let left = u64::try_from(expiry.saturating_sub(now)).unwrap_or(0);
    REVIEW_TTL.min(Duration::from_secs(left))
}

// A poisoned lock means a panic while holding it, which a map operation cannot cause; the map
// is still consistent.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_bound_token_gives_its_pod_and_its_workload() {
        let id = SpiffeId::new("cluster.local", "shop", "web");
        let binding = PodBinding {
            name: "web-1".into(),
            uid: "u-1".into(),
        };
        let caller = caller_of(&id, Some(binding)).unwrap();
        assert_eq!(caller.workload.namespace, "shop");
        assert_eq!(caller.workload.service_account, "web");
        assert_eq!(caller.pod.name, "web-1");
        let refusal = caller_of(&id, None).unwrap_err();
        assert_eq!(refusal.reason(), "PodNotFound");
        assert!(refusal.message().contains("not bound to a pod"));
    }

    #[test]
    fn a_review_is_trusted_for_a_minute_at_most_and_never_past_the_token() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(trusted_for(None, now), REVIEW_TTL);
        assert_eq!(trusted_for(Some(1_000_000 + 3600), now), REVIEW_TTL);
        assert_eq!(
            trusted_for(Some(1_000_000 + 10), now),
            Duration::from_secs(10)
        );
        assert_eq!(trusted_for(Some(999_000), now), Duration::ZERO);
    }
}
