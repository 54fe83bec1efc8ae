//! The service that keeps the current [`Snapshot`] of one [`Source`] and publishes changes.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use domain::Clock;
use domain::estop::{AuditRecord, EStopState, Entry, Snapshot, Target, Verdict};
use tokio::sync::{Mutex, watch};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::{Source, SourceError};

/// A read that fails right after a good one is tried once more after this long before the list
/// counts as unreadable (a writer caught mid-write).
const SETTLE: Duration = Duration::from_millis(30);

/// The source of changes made through [`EStopHandle::set`] and [`EStopHandle::clear`].
pub const API_SOURCE: &str = "api";

#[derive(Clone, Debug)]
pub struct EStopOptions {
    /// The state of runs that no entry matches (docs/operating.md, The emergency stop: `stop`, fail closed).
    pub unlisted: EStopState,
    /// How often the list is re-read even when the source reports no change (lost events,
    /// sources without events).
    pub reread: Duration,
    /// How long the list may go without a read that confirms it is current before everything
    /// is treated as `stop` (a source that hangs, a lost network). Longer than `reread`.
    pub stale_after: Duration,
}

impl Default for EStopOptions {
    fn default() -> Self {
        EStopOptions {
            unlisted: EStopState::Stop,
            reread: Duration::from_secs(1),
            stale_after: Duration::from_secs(5),
        }
    }
}

/// Starts the e-stop service; see [`EStop::start`].
pub struct EStop;

impl EStop {
    /// Loads the list once (an unreadable source gives [`Snapshot::Unreadable`], logged and
    /// alerted, never an error), then runs, as the supervised component `e-stop`, the task
    /// that re-reads it whenever the source reports a change and every `opts.reread`, until
    /// the tasks' token is cancelled; and, as `e-stop staleness`, the watchdog that stops
    /// everything when no read has confirmed the list for `opts.stale_after`.
    pub async fn start(
        source: Arc<dyn Source>,
        clock: Arc<dyn Clock>,
        opts: EStopOptions,
        tasks: &tasks::Tasks,
    ) -> EStopHandle {
        let (tx, _) = watch::channel(Arc::new(Snapshot::Unreadable(
            "the e-stop list has not been read yet".into(),
        )));
        let shared = Arc::new(Shared {
            source,
            clock,
            unlisted: opts.unlisted,
            tx,
            reload: Mutex::new(()),
            failures: AtomicU64::new(0),
            changes: tokio::sync::broadcast::channel(CHANGES).0,
            counts: std::sync::Mutex::default(),
            stale_after: opts.stale_after.max(Duration::from_millis(10)),
            confirmed: std::sync::Mutex::new(tokio::time::Instant::now()),
        });
        shared.reload(false).await;
        let task = shared.clone();
        let reread = opts.reread.max(Duration::from_millis(10));
        let cancel = tasks.token().clone();
        tasks.spawn_component("e-stop", async move { task.run(reread, cancel).await });
        let task = shared.clone();
        let cancel = tasks.token().clone();
        tasks.spawn_component(
            "e-stop staleness",
            async move { task.watchdog(cancel).await },
        );
        EStopHandle { shared }
    }
}

struct Shared {
    source: Arc<dyn Source>,
    clock: Arc<dyn Clock>,
    unlisted: EStopState,
    tx: watch::Sender<Arc<Snapshot>>,
    /// One reload at a time, so that publishing follows the order of reads.
    reload: Mutex<()>,
    failures: AtomicU64,
    /// Every change made or noticed here (see [`EStopHandle::changes`]).
    changes: tokio::sync::broadcast::Sender<AuditRecord>,
    /// How many of them, by source and new state (see [`EStopHandle::change_counts`]).
    counts: std::sync::Mutex<std::collections::BTreeMap<(String, String), u64>>,
    /// See [`EStopOptions::stale_after`].
    stale_after: Duration,
    /// When a read last confirmed the list.
    confirmed: std::sync::Mutex<tokio::time::Instant>,
}

impl Shared {
    /// Tells subscribers of a change, and counts it.
    fn announce(&self, rec: AuditRecord) {
        if let Ok(mut c) = self.counts.lock() {
            let state = rec
                .new_state
                .map_or_else(|| "cleared".to_owned(), |s| s.to_string());
            *c.entry((rec.source.clone(), state)).or_default() += 1;
        }
        let _ = self.changes.send(rec);
    }
}

/// Changes a slow subscriber of [`EStopHandle::changes`] may fall behind by.
const CHANGES: usize = 256;

impl Shared {
    async fn run(self: Arc<Self>, reread: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(reread);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tick.tick().await; // the first tick is now: the list was just read
        loop {
            let event = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = self.source.changed() => true,
                _ = tick.tick() => false,
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = async {
                    if event {
                        tokio::time::sleep(self.source.settle()).await;
                    }
                    self.reload(true).await;
                } => {}
            }
        }
    }

    /// Stops everything when no read has confirmed the list for `stale_after`; the next read
    /// that succeeds publishes the list again.
    async fn watchdog(self: Arc<Self>, cancel: CancellationToken) {
        let period = (self.stale_after / 5).max(Duration::from_millis(10));
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(period) => {}
            }
            let stale = || {
                self.confirmed
                    .lock()
                    .map_or(true, |t| t.elapsed() > self.stale_after)
            };
            if !stale() {
                continue;
            }
            let why = format!(
                "{} has not been confirmed current for {:?}: everything is stopped until it is",
                self.source.describe(),
                self.stale_after
            );
            let published = self.tx.send_if_modified(|cur| {
                // Checked again under the lock: a read that just succeeded wins.
                if matches!(**cur, Snapshot::Ok(_)) && stale() {
                    *cur = Arc::new(Snapshot::Unreadable(why.clone()));
                    true
                } else {
                    false
                }
            });
            if published {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(source = %self.source.describe(), stale_after = ?self.stale_after, "the e-stop list cannot be confirmed current: everything is stopped until it can");
            }
        }
    }

    /// One read, bounded by `stale_after`.
    async fn load(&self) -> Result<domain::estop::EStopList, SourceError> {
        match tokio::time::timeout(self.stale_after, self.source.load()).await {
            Ok(Ok(list)) => {
                if let Ok(mut t) = self.confirmed.lock() {
                    *t = tokio::time::Instant::now();
                }
                Ok(list)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SourceError::Timeout {
                what: self.source.describe(),
                after: self.stale_after,
            }),
        }
    }

    /// Reads the list and publishes it if it changed. With `confirm`, a failure right after a
    /// good read is checked once more after [`SETTLE`] (a writer caught mid-write).
    async fn reload(&self, confirm: bool) {
        let _one = self.reload.lock().await;
        let was_ok = matches!(**self.tx.borrow(), Snapshot::Ok(_));
        let mut res = self.load().await;
        if let Err(e) = &res
            && confirm
            && was_ok
        {
            self.failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                source = %self.source.describe(),
                error = %e,
                "the e-stop list cannot be read; reading it again"
            );
            tokio::time::sleep(SETTLE).await;
            res = self.load().await;
        }
        let snap = match res {
            Ok(list) => {
                if !was_ok {
                    tracing::info!(
                        source = %self.source.describe(),
                        entries = list.entries.len(),
                        "the e-stop list is readable"
                    );
                }
                Snapshot::Ok(list)
            }
            Err(e) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    source = %self.source.describe(),
                    error = %e,
                    "the e-stop list cannot be read: everything is stopped until it can"
                );
                Snapshot::Unreadable(e.to_string())
            }
        };
        self.tx.send_if_modified(|cur| {
            if **cur == snap {
                false
            } else {
                *cur = Arc::new(snap);
                true
            }
        });
        for rec in self.source.take_noticed() {
            self.announce(rec);
        }
    }
}

/// A cheap-clone handle on the e-stop service.
#[derive(Clone)]
pub struct EStopHandle {
    shared: Arc<Shared>,
}

impl EStopHandle {
    /// The list as last read.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.tx.borrow().clone()
    }

    /// Sees every new snapshot (only changes are published).
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.shared.tx.subscribe()
    }

    /// The effective state of a run of workflow `name` with `labels`, and why.
    pub fn verdict(&self, name: &str, labels: &BTreeMap<String, String>) -> Verdict {
        self.snapshot().verdict(name, labels, self.shared.unlisted)
    }

    /// The state of runs no entry matches.
    pub fn unlisted(&self) -> EStopState {
        self.shared.unlisted
    }

    /// While the list is unreadable: why (for health detail and `status`). `None` when it
    /// reads cleanly.
    pub fn alert(&self) -> Option<String> {
        match &*self.snapshot() {
            Snapshot::Ok(_) => None,
            Snapshot::Unreadable(e) => Some(e.clone()),
        }
    }

    /// Failed reads since start (a counter for metrics).
    pub fn read_failures(&self) -> u64 {
        self.shared.failures.load(Ordering::Relaxed)
    }

    /// The source, for messages: "e-stop file /var/lib/steward/estop.json".
    pub fn describe(&self) -> String {
        self.shared.source.describe()
    }

    /// Sets `target` to `state` (replacing its entry), durably and audited as `actor`, with
    /// source `api`; the new list is published before this returns. `pause` and `stop` need a
    /// reason.
    pub async fn set(
        &self,
        target: Target,
        state: EStopState,
        reason: String,
        actor: String,
    ) -> Result<AuditRecord, SourceError> {
        self.set_from(target, state, reason, actor, API_SOURCE)
            .await
    }

    /// [`EStopHandle::set`], recorded in the audit trail as coming from `source` (for
    /// example `error_budget` when a workflow's error budget trips the e-stop).
    pub async fn set_from(
        &self,
        target: Target,
        state: EStopState,
        reason: String,
        actor: String,
        source: &str,
    ) -> Result<AuditRecord, SourceError> {
        let (reason, actor) = (reason.trim().to_owned(), actor.trim().to_owned());
        if state != EStopState::Go && reason.is_empty() {
            return Err(SourceError::InvalidArgument(format!(
                "reason: setting {target} to {state} needs a reason (say why, e.g. an incident id)"
            )));
        }
        check_actor(&actor)?;
        let entry = self.entry(target, state, reason, actor);
        let res = self.shared.source.set(entry, source).await;
        self.published(res.as_ref().ok()).await;
        res
    }

    /// Sets `target` to `state` as `actor` only if it has no entry (another node or an
    /// operator may have set one meanwhile: that one stays); `Ok(None)` then.
    pub async fn create(
        &self,
        target: Target,
        state: EStopState,
        reason: String,
        actor: String,
    ) -> Result<Option<AuditRecord>, SourceError> {
        check_actor(&actor)?;
        let entry = self.entry(target, state, reason, actor);
        let res = self.shared.source.create(entry, API_SOURCE).await;
        self.published(res.as_ref().ok().and_then(Option::as_ref))
            .await;
        res
    }

    /// An entry set now by `actor`.
    fn entry(&self, target: Target, state: EStopState, reason: String, actor: String) -> Entry {
        Entry {
            target,
            state,
            reason,
            set_by: actor,
            set_at: self.shared.clock.now().to_rfc3339(),
        }
    }

    /// After a change through this handle: the new list is published before the caller hears
    /// back, and the change (`None`: nothing changed) is announced.
    async fn published(&self, change: Option<&AuditRecord>) {
        self.shared.reload(false).await;
        if let Some(rec) = change {
            self.shared.announce(rec.clone());
        }
    }

    /// Removes the entry of `target` (runs it matched fall back to other entries or to the
    /// unlisted state), durably and audited; `Ok(None)` when there was no such entry.
    pub async fn clear(
        &self,
        target: Target,
        actor: String,
        reason: String,
    ) -> Result<Option<AuditRecord>, SourceError> {
        let actor = actor.trim().to_owned();
        check_actor(&actor)?;
        let res = self
            .shared
            .source
            .clear(&target, &actor, reason.trim(), API_SOURCE)
            .await;
        self.published(res.as_ref().ok().and_then(Option::as_ref))
            .await;
        res
    }

    /// Every change made through this handle (operators through the API and CLI, error
    /// budgets) and every hand edit of the list that this node's source noticed, as its audit
    /// record. Changes made through other nodes are theirs to report.
    pub fn changes(&self) -> tokio::sync::broadcast::Receiver<AuditRecord> {
        self.shared.changes.subscribe()
    }

    /// The changes counted since start, by source (`api`, `file`, `error_budget`,
    /// `alertmanager`...) and new state (`cleared` for a removed entry).
    pub fn change_counts(&self) -> Vec<((String, String), u64)> {
        self.shared
            .counts
            .lock()
            .map(|c| c.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }

    /// The audit trail, newest first: `limit` records (0 means 100, at most 1000), only those
    /// of `target` when given.
    pub async fn audit(
        &self,
        target: Option<Target>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, SourceError> {
        self.shared.source.audit(target, limit).await
    }

    /// Re-reads the list now and publishes it if it changed.
    pub async fn reload(&self) {
        self.shared.reload(false).await;
    }
}

fn check_actor(actor: &str) -> Result<(), SourceError> {
    if actor.is_empty() {
        return Err(SourceError::InvalidArgument(
            "actor: an e-stop change must name who makes it".into(),
        ));
    }
    Ok(())
}
