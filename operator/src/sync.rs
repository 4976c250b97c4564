//! Cache sync: the operator decides nothing from a partial view of the cluster.
//!
//! A store is empty until its watch has listed once. A pass run on an empty Pod store would
//! find no injected pods and delete every proxy ConfigMap; one run on an empty Service store
//! would mark every policy `TargetNotFound`. So nothing acts before every store has synced: the
//! replica does not campaign for the Lease (it would hold it without being able to act), the
//! reconciler runs no pass (no render, write, delete or status update) and `/readyz` answers
//! 503. A watch that cannot list — a missing RBAC right, a CRD not installed yet, an
//! unreachable apiserver — keeps its store unsynced and is retried with backoff; the watches
//! still pending are logged every `log_every`, so the cause is visible.
//!
//! Sync happens once: a later re-list (after an apiserver restart) swaps the new objects into a
//! store whole, when the list is complete, so a store never goes back to empty.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::Result;
use crate::server::Health;
use crate::stores::Stores;

/// Waits until every store has synced, then marks `/readyz` ready and opens `gate`. Logs the
/// watches still pending every `log_every`. Returns early, with the gate closed, when
/// `shutdown` turns true; fails if a watch ended before its store synced (it never will).
pub async fn open_when_synced(
    stores: Stores,
    health: Arc<Health>,
    gate: watch::Sender<bool>,
    log_every: Duration,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let started = Instant::now();
    let ready = stores.wait_until_ready();
    tokio::pin!(ready);
    let mut log = tokio::time::interval_at(started + log_every, log_every);
    loop {
        tokio::select! {
            synced = &mut ready => {
                synced?;
                break;
            }
            _ = log.tick() => warn!(
                pending = ?stores.pending(),
                waited_s = started.elapsed().as_secs(),
                "Waiting for caches to sync; nothing is written until they have"
            ),
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        }
    }
    health.ready.store(true, Ordering::Relaxed);
    gate.send_replace(true);
    info!(elapsed_ms = started.elapsed().as_millis(), "Caches synced");
    Ok(())
}

/// Waits until `gate` opens: `true` then, `false` if `shutdown` comes first or the gate can
/// never open (its sender is gone).
pub async fn wait_open(
    gate: &mut watch::Receiver<bool>,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        opened = gate.wait_for(|open| *open) => opened.is_ok(),
        _ = shutdown.wait_for(|stop| *stop) => false,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use prometheus_client::registry::Registry;

    use super::*;
    use crate::stores::WATCHES;

    fn health() -> Arc<Health> {
        Arc::new(Health {
            ready: AtomicBool::new(false),
            registry: Registry::default(),
        })
    }

    #[tokio::test]
    async fn the_gate_opens_only_after_every_watch_has_listed_once() {
        let (stores, mut writers) = Stores::new();
        let (gate_tx, mut gate) = watch::channel(false);
        let (_stop_tx, stop) = watch::channel(false);
        let health = health();
        let task = tokio::spawn(open_when_synced(
            stores.clone(),
            health.clone(),
            gate_tx,
            Duration::from_secs(3600),
            stop,
        ));
        assert_eq!(stores.pending(), WATCHES);

        // Every list but the last completes: still closed, /readyz still 503.
        let (last, others) = WATCHES.split_last().unwrap();
        for name in others {
            writers.list_event(name, false);
            writers.list_event(name, true);
        }
        assert_eq!(stores.pending(), [*last]);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!*gate.borrow());
        assert!(!health.ready.load(Ordering::Relaxed));

        // A list that has begun but not ended does not count.
        writers.list_event(last, false);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!*gate.borrow());

        writers.list_event(last, true);
        let (_stop_tx2, mut stop) = watch::channel(false);
        assert!(wait_open(&mut gate, &mut stop).await);
        assert!(health.ready.load(Ordering::Relaxed));
        assert!(stores.pending().is_empty());
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn an_opened_gate_stays_open_once_its_sender_is_gone() {
        // The sync task ends, dropping the sender, right after opening the gate; the
        // reconciler and the election start later and must still see it open.
        let (gate_tx, mut gate) = watch::channel(false);
        gate_tx.send_replace(true);
        drop(gate_tx);
        let (_stop_tx, mut stop) = watch::channel(false);
        assert!(wait_open(&mut gate, &mut stop).await);
        assert!(wait_open(&mut gate, &mut stop).await);
    }

    #[tokio::test]
    async fn shutdown_before_sync_leaves_the_gate_closed() {
        let (stores, _writers) = Stores::new();
        let (gate_tx, mut gate) = watch::channel(false);
        let (stop_tx, stop) = watch::channel(false);
        let health = health();
        let task = tokio::spawn(open_when_synced(
            stores,
            health.clone(),
            gate_tx,
            Duration::from_secs(3600),
            stop.clone(),
        ));
        stop_tx.send_replace(true);
        task.await.unwrap().unwrap();
        let mut stop = stop;
        assert!(!wait_open(&mut gate, &mut stop).await);
        assert!(!health.ready.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_watch_that_ends_before_syncing_is_an_error_not_a_silent_stall() {
        let (stores, writers) = Stores::new();
        let (gate_tx, mut gate) = watch::channel(false);
        let (_stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(open_when_synced(
            stores,
            health(),
            gate_tx,
            Duration::from_secs(3600),
            stop,
        ));
        drop(writers);
        assert!(matches!(task.await.unwrap(), Err(crate::Error::WatchEnded)));
        let (_stop_tx, mut stop) = watch::channel(false);
        assert!(!wait_open(&mut gate, &mut stop).await);
    }
}
