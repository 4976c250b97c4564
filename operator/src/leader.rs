//! Leader election on a `coordination.k8s.io/v1` Lease, so that two replicas are safe.
//!
//! The algorithm is client-go's: the holder renews the Lease every `retry_period`; the others
//! watch it and take it over when its record has not changed for `lease_duration`, measured on
//! their own clock (never by comparing clocks across machines). Writes carry the
//! `resourceVersion` they read, so two candidates cannot both win. A leader that cannot renew
//! for `renew_deadline` (shorter than `lease_duration`) steps down before anyone else may take
//! over. With the defaults (8 s lease, 2 s period) a new leader takes over at most about 12 s
//! after the old one dies, and at once when it shuts down cleanly (it releases the Lease).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

/// How the election runs.
#[derive(Clone, Debug)]
pub struct ElectionSettings {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (its pod name).
    pub identity: String,
    /// How long a Lease stays valid without renewal.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it steps down.
    pub renew_deadline: Duration,
    /// How often the Lease is read and renewed.
    pub retry_period: Duration,
}

impl ElectionSettings {
    /// Defaults that give a takeover within 15 seconds.
    pub fn new(name: &str, namespace: &str, identity: &str) -> Self {
        Self {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            identity: identity.to_owned(),
            lease_duration: Duration::from_secs(8),
            renew_deadline: Duration::from_secs(5),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// The last Lease record seen, and when (on the local clock) it last changed.
#[derive(Clone, Debug, PartialEq)]
struct Observed {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    at: Instant,
}

/// What to do with the Lease as read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// We hold it: renew.
    Renew,
    /// It is free or expired: take it.
    Acquire,
    /// Someone else holds a live Lease.
    Follow,
}

fn decide(identity: &str, observed: &Observed, now: Instant, lease_duration: Duration) -> Action {
    match observed.holder.as_deref() {
        Some(holder) if holder == identity => Action::Renew,
        None | Some("") => Action::Acquire,
        Some(_) if now.duration_since(observed.at) > lease_duration => Action::Acquire,
        Some(_) => Action::Follow,
    }
}

/// Runs the election until `shutdown` turns true, publishing leadership on `leader`. On
/// shutdown a leader releases the Lease so that the other replica takes over at once.
pub async fn run(
    api: Api<Lease>,
    settings: ElectionSettings,
    leader: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut observed: Option<Observed> = None;
    let mut last_renewal: Option<Instant> = None;
    loop {
        // A round that hangs (an apiserver that accepts but never answers) counts as failed
        // once the renew deadline has passed, so a leader cut off this way still steps down
        // before another replica may take over.
        let round = tokio::time::timeout(
            settings.renew_deadline,
            step(&api, &settings, &mut observed),
        );
        let held = match round.await {
            Ok(Ok(held)) => held,
            Ok(Err(error)) => {
                warn!(%error, lease = %settings.name, "Lease update failed");
                false
            }
            Err(_) => {
                warn!(lease = %settings.name, timeout_ms = settings.renew_deadline.as_millis(), "Lease update timed out");
                false
            }
        };
        let now = Instant::now();
        if held {
            last_renewal = Some(now);
        }
        // A leader that cannot renew keeps leading until the renew deadline, then steps down
        // before another replica may take over.
        let leading = held
            || (*leader.borrow()
                && last_renewal.is_some_and(|t| now.duration_since(t) < settings.renew_deadline));
        if leading != *leader.borrow() {
            info!(identity = %settings.identity, leading, "Leadership changed");
            leader.send_replace(leading);
        }
        tokio::select! {
            () = tokio::time::sleep(settings.retry_period) => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    if *leader.borrow() {
        leader.send_replace(false);
        if let Err(error) = release(&api, &settings).await {
            warn!(%error, "Could not release the Lease; the other replica waits for it to expire");
        } else {
            info!(identity = %settings.identity, "Released the Lease");
        }
    }
}

/// One round: reads the Lease and renews or acquires it. Returns whether we hold it now.
async fn step(
    api: &Api<Lease>,
    settings: &ElectionSettings,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let now = Instant::now();
    let Some(lease) = api.get_opt(&settings.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(settings.name.clone()),
                namespace: Some(settings.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(held_spec(settings, None, true)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let seen = Observed {
        holder: spec.holder_identity.clone(),
        renew_time: spec.renew_time.clone(),
        at: now,
    };
    let changed = observed
        .as_ref()
        .is_none_or(|o| o.holder != seen.holder || o.renew_time != seen.renew_time);
    if changed {
        *observed = Some(seen);
    }
    let Some(current) = observed.as_ref() else {
        return Ok(false);
    };
    let action = decide(&settings.identity, current, now, settings.lease_duration);
    if action == Action::Follow {
        return Ok(false);
    }
    let mut next = lease;
    next.spec = Some(held_spec(settings, Some(&spec), action == Action::Acquire));
    match api
        .replace(&settings.name, &PostParams::default(), &next)
        .await
    {
        Ok(_) => {
            if action == Action::Acquire {
                info!(identity = %settings.identity, "Acquired the Lease");
            }
            Ok(true)
        }
        // Someone else wrote first: follow them.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
        Err(error) => Err(error),
    }
}

fn held_spec(settings: &ElectionSettings, old: Option<&LeaseSpec>, acquire: bool) -> LeaseSpec {
    let now = MicroTime(Timestamp::now());
    let transitions = old.and_then(|s| s.lease_transitions).unwrap_or(0);
    LeaseSpec {
        holder_identity: Some(settings.identity.clone()),
        lease_duration_seconds: i32::try_from(settings.lease_duration.as_secs()).ok(),
        acquire_time: if acquire {
            Some(now.clone())
        } else {
            old.and_then(|s| s.acquire_time.clone())
        },
        renew_time: Some(now),
        lease_transitions: Some(if acquire && old.is_some() {
            transitions + 1
        } else {
            transitions
        }),
        ..LeaseSpec::default()
    }
}

async fn release(api: &Api<Lease>, settings: &ElectionSettings) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&settings.name).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    api.replace(&settings.name, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observed(holder: Option<&str>, at: Instant) -> Observed {
        Observed {
            holder: holder.map(str::to_owned),
            renew_time: None,
            at,
        }
    }

    #[test]
    fn the_holder_renews_its_own_lease() {
        let now = Instant::now();
        let lease = Duration::from_secs(8);
        assert_eq!(
            decide("a", &observed(Some("a"), now), now, lease),
            Action::Renew
        );
    }

    #[test]
    fn a_live_lease_of_another_replica_is_followed() {
        let start = Instant::now();
        let lease = Duration::from_secs(8);
        let now = start + Duration::from_secs(7);
        assert_eq!(
            decide("b", &observed(Some("a"), start), now, lease),
            Action::Follow
        );
    }

    #[test]
    fn a_lease_unchanged_for_its_duration_is_taken_over() {
        let start = Instant::now();
        let lease = Duration::from_secs(8);
        let now = start + Duration::from_secs(9);
        assert_eq!(
            decide("b", &observed(Some("a"), start), now, lease),
            Action::Acquire
        );
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let now = Instant::now();
        let lease = Duration::from_secs(8);
        assert_eq!(
            decide("b", &observed(None, now), now, lease),
            Action::Acquire
        );
        assert_eq!(
            decide("b", &observed(Some(""), now), now, lease),
            Action::Acquire
        );
    }
}
