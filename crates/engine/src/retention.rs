//! Retention (docs/operating.md, Retention): finished runs older than their workflow's
//! retention, and audit records older than theirs, deleted in the background in small batches
//! so that no batch holds the store's writer for long; and pruning by hand.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use domain::{RunId, Timestamp};
use store::Workflows;

use crate::{Engine, EngineError, Inner};

/// How long things are kept; `None` keeps them forever.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Finished runs, by the time they ended.
    pub runs: Option<Duration>,
    /// Per workflow, over `runs`.
    pub workflows: BTreeMap<String, Option<Duration>>,
    /// The e-stop audit trail and the access log.
    pub audit: Option<Duration>,
}

pub const DEFAULT_RUNS: Duration = Duration::from_secs(30 * 24 * 3600);
pub const DEFAULT_AUDIT: Duration = Duration::from_secs(365 * 24 * 3600);

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            runs: Some(DEFAULT_RUNS),
            workflows: BTreeMap::new(),
            audit: Some(DEFAULT_AUDIT),
        }
    }
}

impl Retention {
    /// The shortest time any finished run is kept, if any is ever pruned.
    pub fn shortest(&self) -> Option<Duration> {
        self.workflows
            .values()
            .chain(std::iter::once(&self.runs))
            .flatten()
            .min()
            .copied()
    }
}

/// Rows one delete removes at most: a batch holds the writer for a few milliseconds.
pub const BATCH: u32 = 100;
/// Between batches, the writer is left to the engine.
const PAUSE: Duration = Duration::from_millis(20);
/// How often retention looks for what is due.
const EVERY: Duration = Duration::from_secs(60);
/// The first look, after a start.
const FIRST: Duration = Duration::from_secs(10);

pub(crate) fn start(inner: &Arc<Inner>) {
    let r = &inner.opts.retention;
    if r.shortest().is_none() && r.audit.is_none() {
        return;
    }
    let i = inner.clone();
    inner
        .loops
        .spawn_component("retention", async move { run_loop(&i).await });
}

async fn run_loop(inner: &Arc<Inner>) {
    let mut wait = FIRST;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = inner.token.cancelled() => return,
        }
        wait = EVERY;
        let now = inner.now();
        let r = &inner.opts.retention;
        let overridden: Vec<String> = r.workflows.keys().cloned().collect();
        let mut scopes: Vec<(Workflows, Duration)> = r
            .workflows
            .iter()
            .filter_map(|(w, keep)| keep.map(|k| (Workflows::Only(w.clone()), k)))
            .collect();
        if let Some(keep) = r.runs {
            scopes.push((Workflows::AllBut(overridden), keep));
        }
        let mut deleted = 0;
        for (which, keep) in scopes {
            let before = Timestamp(now.0.saturating_sub(millis(keep)));
            match drain(inner, || {
                inner.store.prune_runs(before, &which, BATCH, false)
            })
            .await
            {
                Ok(n) => deleted += n,
                Err(e) => {
                    tracing::warn!(error = %e, "pruning finished runs failed; retrying later")
                }
            }
        }
        if deleted > 0 {
            tracing::info!(
                runs = deleted,
                "retention: finished runs past their retention deleted"
            );
        }
        if let Some(keep) = r.audit {
            let before = Timestamp(now.0.saturating_sub(millis(keep)));
            match drain(inner, || inner.audit.prune_audit(before, BATCH)).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    records = n,
                    "retention: audit records past their retention deleted"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "pruning audit records failed; retrying later")
                }
            }
        }
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Runs `batch` until it deletes less than a full batch, pausing between batches; the total.
async fn drain<'a, F, Fut>(inner: &Inner, mut batch: F) -> store::Result<u64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = store::Result<u64>> + 'a,
{
    let mut total = 0;
    loop {
        if inner.token.is_cancelled() {
            return Ok(total);
        }
        let n = batch().await?;
        total += n;
        if n < u64::from(BATCH) {
            return Ok(total);
        }
        tokio::time::sleep(PAUSE).await;
    }
}

impl Engine {
    /// Deletes the finished runs that ended before `before` (of `workflow` only, when given),
    /// in batches; with `dry_run`, only counts them. How many.
    pub async fn prune_runs(
        &self,
        before: Timestamp,
        workflow: Option<String>,
        dry_run: bool,
    ) -> Result<u64, EngineError> {
        let which = match workflow {
            Some(w) => Workflows::Only(w),
            None => Workflows::AllBut(Vec::new()),
        };
        let store = &self.inner.store;
        if dry_run {
            return Ok(store.prune_runs(before, &which, 0, true).await?);
        }
        Ok(drain(&self.inner, || {
            store.prune_runs(before, &which, BATCH, false)
        })
        .await?)
    }

    /// A run the store does not have: when its ID is older than what retention keeps, the
    /// error says it may have been pruned.
    pub(crate) fn missing(&self, id: RunId) -> EngineError {
        let now = self.inner.now();
        match (self.inner.opts.retention.shortest(), id.created_at()) {
            (Some(kept), Some(created)) if created.0 < now.0.saturating_sub(millis(kept)) => {
                EngineError::Pruned {
                    id,
                    created,
                    kept: domain::HumanDuration(kept),
                }
            }
            _ => EngineError::NotFound(id),
        }
    }
}
