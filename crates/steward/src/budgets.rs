//! Per-workflow error budgets: N failed runs within a window trip the e-stop for that
//! workflow, recorded in the audit trail like any operator change (source `error_budget`).

use std::collections::BTreeMap;

use domain::RunState;
use domain::estop::{EStopState, Target};
use engine::Engine;
use ratelimit::{ErrorBudget, ErrorBudgets};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::BudgetConfig;

pub const SOURCE: &str = "error_budget";

/// Watches run failures on `tracker` until `cancel`; does nothing when no budget is set.
pub fn watch(
    tracker: &TaskTracker,
    cancel: CancellationToken,
    engine: Engine,
    estop: estop::EStopHandle,
    config: &BTreeMap<String, BudgetConfig>,
) {
    if config.is_empty() {
        return;
    }
    let budgets: BTreeMap<String, ErrorBudget> = config
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                ErrorBudget {
                    failures: v.failures,
                    window: v.window,
                },
            )
        })
        .collect();
    let mut events = engine.subscribe();
    tracker.spawn(async move {
        let mut budgets = ErrorBudgets::new(budgets);
        loop {
            let event = tokio::select! {
                e = events.recv() => e,
                () = cancel.cancelled() => return,
            };
            let id = match event {
                Ok(e) if e.state == RunState::Failed => e.id,
                Ok(_) => continue,
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "error budgets missed run events; some failures may not count");
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            let run = match engine.status(id).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(run_id = %id, error = %e, "could not read a failed run for its error budget");
                    continue;
                }
            };
            let at = run.ended_at.unwrap_or(run.created_at);
            let Some(trip) = budgets.record_failure(&run.spec.name, id, at) else { continue };
            tracing::error!(workflow = %run.spec.name, %trip, "error budget exhausted: stopping the workflow");
            let set = estop
                .set_from(
                    Target::Workflow(run.spec.name.clone()),
                    EStopState::Stop,
                    trip.to_string(),
                    SOURCE.into(),
                    SOURCE,
                )
                .await;
            if let Err(e) = set {
                tracing::error!(workflow = %run.spec.name, error = %e, "could not set the e-stop for an exhausted error budget");
            }
        }
    });
}
