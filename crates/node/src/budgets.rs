//! Per-workflow error budgets: N failed runs within a window trip the e-stop for that
//! workflow, recorded in the audit trail like any operator change (source `error_budget`).
//!
//! The count comes from the store, not from memory: it covers the failures of every node
//! sharing the database and survives restarts. A trip starts the budget afresh: failures that
//! ended before the last `error_budget` change of the workflow's entry do not count again.

use std::collections::BTreeMap;

use domain::RunState;
use domain::estop::{EStopState, Snapshot, Target};
use engine::Engine;
use ratelimit::{ErrorBudget, Tripped};
use tokio::sync::broadcast::error::RecvError;

use crate::config::BudgetConfig;

pub const SOURCE: &str = "error_budget";

/// Watches run failures, as a supervised component, until the tasks stop; does nothing when
/// no budget is set.
pub fn watch(
    tasks: &tasks::Tasks,
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
    let cancel = tasks.token().clone();
    tasks.spawn_component("error budgets", async move {
        loop {
            let event = tokio::select! {
                e = events.recv() => e,
                () = cancel.cancelled() => return,
            };
            let id = match event {
                Ok(e) if e.state == RunState::Failed => e.id,
                Ok(_) => continue,
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "error budgets missed run events; the next failure counts them");
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
            let Some(budget) = budgets.get(&run.spec.name) else { continue };
            let trip = match check(&engine, &estop, &run.spec.name, budget, run.ended_at.unwrap_or(run.created_at)).await {
                Ok(Some(t)) => t,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(workflow = %run.spec.name, error = %e, "could not count the failures of an error budget");
                    continue;
                }
            };
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

/// Counts the failed runs of `workflow` in the store against `budget` at `now`.
async fn check(
    engine: &Engine,
    estop: &estop::EStopHandle,
    workflow: &str,
    budget: &ErrorBudget,
    now: domain::Timestamp,
) -> anyhow::Result<Option<Tripped>> {
    let target = Target::Workflow(workflow.to_owned());
    // Stopped already (by this budget through another node, or by an operator): nothing to do.
    if let Snapshot::Ok(list) = &*estop.snapshot()
        && list
            .entries
            .iter()
            .any(|e| e.target == target && e.state == EStopState::Stop)
    {
        return Ok(None);
    }
    let last_trip = estop
        .audit(Some(target), 100)
        .await?
        .into_iter()
        .find(|r| r.source == SOURCE)
        .and_then(|r| domain::Timestamp::parse_rfc3339(&r.at));
    let page = engine
        .list(&store::RunFilter {
            states: vec![RunState::Failed],
            name: Some(workflow.to_owned()),
            page_size: store::MAX_PAGE_SIZE,
            ..Default::default()
        })
        .await?;
    let failures: Vec<_> = page
        .runs
        .iter()
        .filter_map(|r| r.ended_at.map(|t| (t, r.id)))
        .collect();
    Ok(budget.check(workflow, &failures, now, last_trip))
}
