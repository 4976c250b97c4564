//! Reports the active version to the operator (`POST` the applied call) after every change,
//! latest only: the store's watch channel coalesces changes, so a slow or absent operator never
//! queues anything and never blocks a swap. A failed report is retried at the next change or
//! the next connect of the watch.

use std::sync::Arc;

use tandem_crds::contract::AppliedReport;
use tandem_crds::contract::stream::APPLIED_PATH;
use tokio::sync::{Notify, watch};

use super::operator::{Operator, StreamError};
use crate::error::chain;

/// The answer of the applied call (its body, if any, is not needed).
#[derive(serde::Deserialize)]
struct Ignored {}

/// Reports until the store is gone.
pub async fn run(
    operator: Arc<Operator>,
    mut applied: watch::Receiver<Option<AppliedReport>>,
    connected: Arc<Notify>,
) {
    let mut sent: Option<AppliedReport> = None;
    loop {
        let latest = applied.borrow_and_update().clone();
        if let Some(report) = latest.filter(|l| sent.as_ref() != Some(l)) {
            match send(&operator, &report).await {
                Ok(()) => {
                    tracing::debug!(version = %report.version, source = %report.source, "Applied version reported");
                    sent = Some(report);
                }
                Err(error) => {
                    tracing::debug!(error = %chain(&error), version = %report.version, "Cannot report the applied version; retrying at the next change or connect");
                }
            }
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            () = connected.notified() => {}
        }
    }
}

async fn send(operator: &Operator, report: &AppliedReport) -> Result<(), StreamError> {
    let _: Ignored = operator.post(APPLIED_PATH, report).await?;
    Ok(())
}
