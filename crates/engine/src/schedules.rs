//! Schedules (docs/schedules.md): the loop that fires them, and the calls the API makes.
//!
//! Every node runs the loop. A fire is decided from the schedule as read, and stored with the
//! schedule's new state (its cursor past the fire) in one write that names the version it
//! read: when two nodes decide the same fire, one write goes through and the other is a
//! conflict that changes nothing. The fire's run carries the idempotency key
//! `schedule/NAME/NOMINAL_TIME` as well, so no nominal time ever has two runs.

use std::sync::Arc;
use std::time::Duration;

use domain::estop::{Because, EStopState};
use domain::schedule::{
    self, Backfill, FireOutcome, LastRun, Overlap, PauseInfo, ScheduleRecord, ScheduleSpec,
    ScheduleState, SkipReason, Timing,
};
use domain::{RunId, RunState, ScheduledBy, Timestamp, WorkflowSpec};
use futures::StreamExt;
use store::{NewRun, StartedRun};

use crate::failpoints::crash_point;
use crate::{Engine, EngineError, Inner, driver};

/// Schedules one pass reads at most.
const BATCH: u32 = 512;
/// Fires of one pass decided at once (each is one write; the store commits them together).
const CONCURRENT_FIRES: usize = 64;
/// The longest the loop sleeps: how soon a node sees schedules another node changed.
const POLL: Duration = Duration::from_secs(1);
/// Tries of an API change that lost a race with a fire.
const WRITE_TRIES: usize = 8;

/// Something about a schedule that notifications report.
#[derive(Clone, Debug, PartialEq)]
pub struct ScheduleEvent {
    pub schedule: String,
    pub workflow: String,
    pub nominal: Timestamp,
    pub outcome: FireOutcome,
}

pub(crate) fn start(inner: &Arc<Inner>) {
    let i = inner.clone();
    inner
        .loops
        .spawn_component("scheduler", async move { run_loop(&i).await });
}

async fn run_loop(inner: &Arc<Inner>) {
    loop {
        // A pass that could not store what it decided leaves its schedule due: wait before
        // the next, rather than spin while the store refuses writes.
        let mut failed = false;
        if inner.accepting.load(std::sync::atomic::Ordering::SeqCst) {
            let now = inner.now();
            match inner.schedules.schedule_due(now, BATCH).await {
                Ok(due) => {
                    let full = due.len() == BATCH as usize;
                    let stored: Vec<bool> = futures::stream::iter(due)
                        .map(|(record, last)| pass(inner, record, last))
                        .buffer_unordered(CONCURRENT_FIRES)
                        .collect()
                        .await;
                    failed = stored.contains(&false);
                    if full && !failed {
                        continue;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading due schedules failed; retrying");
                    failed = true;
                }
            }
        }
        let wait = match inner.schedules.schedule_next_check().await {
            _ if failed => POLL,
            Ok(Some(t)) => {
                Duration::from_millis(u64::try_from(t.0 - inner.now().0).unwrap_or(0)).min(POLL)
            }
            _ => POLL,
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = inner.schedule_changed.notified() => {}
            () = inner.token.cancelled() => return,
        }
    }
}

/// What a pass decided to do once its write went through.
#[derive(Default)]
struct After {
    run: Option<RunId>,
    cancel: Vec<(RunId, String)>,
    events: Vec<ScheduleEvent>,
    missed: u64,
    skipped: Vec<&'static str>,
    lateness: Option<Duration>,
}

/// Looks at one due schedule: its missed fires, the fire due now, and when to look again.
/// False when what it decided could not be stored (it is decided again on a later pass).
async fn pass(inner: &Arc<Inner>, record: ScheduleRecord, last: Option<LastRun>) -> bool {
    let name = record.spec.schedule.clone();
    let timing = match record.spec.timing() {
        Ok(t) => t,
        Err(e) => {
            // Only a database written by another release (or damaged) holds one: it stops
            // firing, and says why, until it is updated.
            tracing::error!(schedule = %name, error = %e, "a stored schedule cannot be read; it will not fire until it is updated");
            let expected = record.version;
            let mut record = record;
            let now = inner.now();
            record.state.next_check = None;
            record.state.record(
                now,
                now,
                FireOutcome::Skipped {
                    reason: SkipReason::Invalid {
                        message: format!("the stored schedule cannot be read: {e}"),
                    },
                },
            );
            return inner
                .schedules
                .schedule_write(record, Some(expected), None)
                .await
                .is_ok();
        }
    };
    let now = inner.now();
    let expected = record.version;
    let spec = record.spec;
    let mut st = record.state;
    let mut after = After::default();
    let mut busy = last.filter(|l| !l.state.is_terminal());

    // A fire held by an e-stop `pause` past its catch-up window does not run late.
    if let (Some(l), Some(n)) = (busy, st.last_nominal)
        && l.state == RunState::Paused
        && !l.started
        && n.plus(spec.catchup_window.0) < now
    {
        after.cancel.push((
            l.id,
            "held by an e-stop pause past the schedule's catch-up window".into(),
        ));
        missed(&spec, &mut st, &mut after, n, now, 1, false);
        busy = None;
    }

    let mut to_fire = None;
    if let Some(n) = st.buffered
        && busy.is_none()
    {
        st.buffered = None;
        to_fire = Some(n);
    }
    if to_fire.is_none() {
        let d = schedule::due(&spec, &timing, st.cursor, now);
        st.cursor = d.cursor;
        if let Some(newest) = d.newest_missed {
            missed(
                &spec,
                &mut st,
                &mut after,
                newest,
                now,
                d.missed,
                d.missed_at_least,
            );
        }
        if let Some(n) = d.fire {
            after.lateness = Some(Duration::from_millis(
                u64::try_from(now.0 - spec.due_at(n).0).unwrap_or(0),
            ));
            match (busy, spec.overlap) {
                (None, _) | (Some(_), Overlap::Allow) => to_fire = Some(n),
                (Some(l), Overlap::CancelPrevious) => {
                    after.cancel.push((
                        l.id,
                        format!("overlap: cancel_previous, for the fire at {n}"),
                    ));
                    to_fire = Some(n);
                }
                (Some(_), Overlap::BufferOne) if st.buffered.is_none() => {
                    st.buffered = Some(n);
                    st.record(n, now, FireOutcome::Buffered);
                }
                (Some(l), Overlap::Skip | Overlap::BufferOne) => {
                    skip(
                        &mut st,
                        &mut after,
                        n,
                        now,
                        SkipReason::Overlap { run: l.id },
                    );
                }
            }
        }
    }
    if to_fire.is_none()
        && let Some(b) = st.backfill
        && (busy.is_none() || spec.overlap == Overlap::Allow)
    {
        to_fire = Some(b.next);
        st.backfill = timing
            .next_after(b.next)
            .filter(|n| *n <= b.to)
            .map(|next| Backfill { next, to: b.to });
    }

    let fire = to_fire.and_then(|n| {
        let workflow = spec.workflow_for(n);
        match fire_check(inner, &workflow) {
            Err(reason) => {
                skip(&mut st, &mut after, n, now, reason);
                None
            }
            Ok(()) => {
                let id = RunId::new_v7();
                st.last_run = Some(id);
                st.last_nominal = Some(n);
                st.record(n, now, FireOutcome::Started { run: id });
                after.run = Some(id);
                Some(inner.fire_run(id, &spec.schedule, n, workflow, now))
            }
        }
    });
    st.next_check = schedule::next_check(&spec, &timing, &st, now, to_fire.is_some());
    let record = ScheduleRecord {
        spec,
        state: st,
        version: expected,
    };
    if fire.is_some() {
        crash_point!("schedule::before_fire_commit");
    }
    match inner
        .schedules
        .schedule_write(record.clone(), Some(expected), fire)
        .await
    {
        Ok((version, submitted)) => {
            if let Some(s) = submitted
                && !s.created
            {
                // The nominal time had a run already (a backfill over a fire that ran): the
                // schedule names that run, not the one it did not create.
                point_at_existing(inner, record, version, after.run, s.id).await;
            }
            if let Some(s) = submitted
                && s.created
            {
                crash_point!("schedule::after_fire_commit");
                inner.emit(s.id, RunState::Queued);
                tracing::debug!(schedule = %name, run_id = %s.id, "schedule fired");
                driver::spawn_run(inner, s.id);
                inner.metrics.schedule_fired(after.lateness);
            }
            inner.metrics.schedule_missed(after.missed);
            for reason in after.skipped {
                inner.metrics.schedule_skipped(reason);
            }
            for event in after.events {
                let _ = inner.schedule_events.send(event);
            }
            let engine = Engine {
                inner: inner.clone(),
            };
            for (id, reason) in after.cancel {
                if let Err(e) = engine
                    .cancel(id, &format!("schedule/{name}"), &reason)
                    .await
                {
                    tracing::debug!(schedule = %name, run_id = %id, error = %e, "cancelling a schedule's previous run");
                }
            }
        }
        Err(store::Error::Conflict(_)) => {
            // Another node (or an API call) changed the schedule first: it is read again on
            // the next pass.
            tracing::debug!(schedule = %name, "schedule changed while firing; looking again");
        }
        Err(e) => {
            tracing::warn!(schedule = %name, error = %e, "storing a schedule's fire failed; retrying");
            return false;
        }
    }
    true
}

async fn point_at_existing(
    inner: &Inner,
    mut record: ScheduleRecord,
    version: i64,
    meant: Option<RunId>,
    existing: RunId,
) {
    let st = &mut record.state;
    st.last_run = Some(existing);
    for h in &mut st.history {
        if let FireOutcome::Started { run } = &mut h.outcome
            && Some(*run) == meant
        {
            *run = existing;
        }
    }
    st.fired = st.fired.saturating_sub(1);
    if let Err(e) = inner
        .schedules
        .schedule_write(record, Some(version), None)
        .await
    {
        tracing::debug!(error = %e, "pointing a schedule at its existing run");
    }
}

fn missed(
    spec: &ScheduleSpec,
    st: &mut ScheduleState,
    after: &mut After,
    newest: Timestamp,
    now: Timestamp,
    count: u64,
    at_least: bool,
) {
    let outcome = FireOutcome::Missed { count, at_least };
    tracing::warn!(schedule = %spec.schedule, missed = count, newest = %newest, "schedule fires missed: past the catch-up window");
    st.record(newest, now, outcome.clone());
    after.missed += count;
    after.events.push(ScheduleEvent {
        schedule: spec.schedule.clone(),
        workflow: spec.workflow.name.clone(),
        nominal: newest,
        outcome,
    });
}

fn skip(
    st: &mut ScheduleState,
    after: &mut After,
    nominal: Timestamp,
    now: Timestamp,
    reason: SkipReason,
) {
    after.skipped.push(reason.label());
    st.record(nominal, now, FireOutcome::Skipped { reason });
}

/// Whether a fire of `workflow` may run now: the e-stop, Submit's checks, the policies.
fn fire_check(inner: &Arc<Inner>, workflow: &WorkflowSpec) -> Result<(), SkipReason> {
    {
        let v = inner.verdict(workflow);
        if v.state == EStopState::Stop {
            let target = match &v.because {
                Because::Entry { entry } => entry.target.to_string(),
                Because::Unlisted | Because::Unreadable { .. } => String::new(),
            };
            return Err(SkipReason::EStop {
                target,
                reason: v.to_string(),
            });
        }
        let engine = Engine {
            inner: inner.clone(),
        };
        let (checked, verdicts) = engine.validate(workflow);
        if let Err(e) = checked {
            return Err(SkipReason::Invalid {
                message: format!("invalid workflow: {e}"),
            });
        }
        if let Some(v) = verdicts
            && let Err(e) = v.into_result()
        {
            return Err(SkipReason::Policy {
                message: format!("refused by policy: {e}"),
            });
        }
        Ok(())
    }
}

impl Inner {
    fn fire_run(
        &self,
        id: RunId,
        schedule: &str,
        nominal: Timestamp,
        workflow: WorkflowSpec,
        now: Timestamp,
    ) -> StartedRun {
        StartedRun {
            run: NewRun {
                id,
                spec: workflow,
                created_at: now,
                expires_at: now.plus(self.opts.submit_ttl),
                cloned_from: None,
                submitted_by: format!("schedule/{schedule}"),
                schedule: Some(ScheduledBy {
                    name: schedule.to_owned(),
                    nominal_time: nominal,
                }),
            },
            node: self.opts.node_id.clone(),
            lease_until: now.plus(self.opts.lease_ttl),
        }
    }
}

/// A schedule and what `steward schedule show` says about it.
#[derive(Clone, Debug)]
pub struct ScheduleView {
    pub record: ScheduleRecord,
    /// The next fires' nominal times, each on the schedule's wall clock as well.
    pub upcoming: Vec<(Timestamp, String)>,
}

/// Fires `steward schedule show` lists.
pub const UPCOMING: usize = 5;

impl Engine {
    /// Hears about missed fires (notifications).
    pub fn schedule_events(&self) -> tokio::sync::broadcast::Receiver<ScheduleEvent> {
        self.inner.schedule_events.subscribe()
    }

    /// What a schedule must pass to be stored: its own checks, Submit's checks of its workflow,
    /// and the policies.
    fn check_schedule(&self, spec: &ScheduleSpec) -> Result<Timing, EngineError> {
        spec.validate().map_err(EngineError::InvalidSpec)?;
        let (checked, verdicts) = self.validate(&spec.workflow);
        checked.map_err(|e| {
            EngineError::InvalidSpec(domain::SpecError(
                e.0.into_iter()
                    .map(|f| domain::FieldError::new(format!("workflow.{}", f.path), f.message))
                    .collect(),
            ))
        })?;
        if let Some(v) = verdicts {
            v.into_result().map_err(EngineError::Policy)?;
        }
        spec.timing()
            .map_err(|e| EngineError::InvalidArgument(format!("cron: {e}")))
    }

    pub fn view(&self, record: ScheduleRecord) -> ScheduleView {
        let upcoming = match record.spec.timing() {
            Ok(t) if record.state.paused.is_none() => t
                .upcoming(record.state.cursor, UPCOMING)
                .into_iter()
                .map(|n| (n, t.local(n)))
                .collect(),
            _ => Vec::new(),
        };
        ScheduleView { record, upcoming }
    }

    /// Stores a new schedule; its first fire is its first nominal time after now.
    pub async fn schedule_create(
        &self,
        spec: ScheduleSpec,
        by: &str,
    ) -> Result<ScheduleView, EngineError> {
        let timing = self.check_schedule(&spec)?;
        let now = self.inner.now();
        let mut state = ScheduleState {
            created_at: now,
            created_by: by.to_owned(),
            updated_at: now,
            updated_by: by.to_owned(),
            cursor: now,
            ..ScheduleState::default()
        };
        state.next_check = schedule::next_check(&spec, &timing, &state, now, false);
        let name = spec.schedule.clone();
        let mut record = ScheduleRecord {
            spec,
            state,
            version: 0,
        };
        match self
            .inner
            .schedules
            .schedule_write(record.clone(), None, None)
            .await
        {
            Ok((version, _)) => {
                record.version = version;
                self.inner.schedule_changed.notify_waiters();
                tracing::info!(schedule = %name, by, "schedule created");
                Ok(self.view(record))
            }
            Err(store::Error::Conflict(_)) => Err(EngineError::ScheduleExists(name)),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn schedule_get(&self, name: &str) -> Result<ScheduleView, EngineError> {
        Ok(self.view(self.load_schedule(name).await?))
    }

    pub async fn schedule_list(&self) -> Result<Vec<ScheduleView>, EngineError> {
        Ok(self
            .inner
            .schedules
            .schedule_list()
            .await?
            .into_iter()
            .map(|r| self.view(r))
            .collect())
    }

    async fn load_schedule(&self, name: &str) -> Result<ScheduleRecord, EngineError> {
        self.inner
            .schedules
            .schedule_get(name)
            .await?
            .ok_or_else(|| EngineError::ScheduleNotFound(name.to_owned()))
    }

    /// Reads the schedule, lets `change` change it, and writes it back over the version read;
    /// again if a fire came in between. `change` may refuse.
    async fn change_schedule<T>(
        &self,
        name: &str,
        mut change: impl FnMut(&mut ScheduleRecord, Timestamp) -> Result<T, EngineError>,
    ) -> Result<(ScheduleView, T), EngineError> {
        for _ in 0..WRITE_TRIES {
            let mut record = self.load_schedule(name).await?;
            let now = self.inner.now();
            let out = change(&mut record, now)?;
            let timing = record
                .spec
                .timing()
                .map_err(|e| EngineError::Internal(format!("schedule {name}: {e}")))?;
            record.state.next_check =
                schedule::next_check(&record.spec, &timing, &record.state, now, false);
            let expected = record.version;
            match self
                .inner
                .schedules
                .schedule_write(record.clone(), Some(expected), None)
                .await
            {
                Ok((version, _)) => {
                    record.version = version;
                    self.inner.schedule_changed.notify_waiters();
                    return Ok((self.view(record), out));
                }
                Err(store::Error::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(EngineError::Unavailable(format!(
            "schedule {name} kept changing while this change was made; try again"
        )))
    }

    /// Replaces a schedule's spec; its fires count from now (none is replayed), its counters
    /// and history stay.
    pub async fn schedule_update(
        &self,
        spec: ScheduleSpec,
        by: &str,
    ) -> Result<ScheduleView, EngineError> {
        self.check_schedule(&spec)?;
        let name = spec.schedule.clone();
        let (view, ()) = self
            .change_schedule(&name, |r, now| {
                r.spec = spec.clone();
                r.state.updated_at = now;
                r.state.updated_by = by.to_owned();
                r.state.cursor = r.state.cursor.max(now);
                Ok(())
            })
            .await?;
        tracing::info!(schedule = %name, by, "schedule updated");
        Ok(view)
    }

    /// Stops a schedule's fires until [`Engine::schedule_resume`]; a run it started goes on.
    pub async fn schedule_pause(
        &self,
        name: &str,
        reason: &str,
        by: &str,
    ) -> Result<ScheduleView, EngineError> {
        let (view, ()) = self
            .change_schedule(name, |r, now| {
                r.state.paused = Some(PauseInfo {
                    reason: reason.to_owned(),
                    by: by.to_owned(),
                    at: now,
                });
                Ok(())
            })
            .await?;
        tracing::info!(schedule = %name, by, reason, "schedule paused");
        Ok(view)
    }

    /// Fires again from now on: the fires skipped while paused are not replayed (see
    /// [`Engine::schedule_backfill`]).
    pub async fn schedule_resume(&self, name: &str, by: &str) -> Result<ScheduleView, EngineError> {
        let (view, ()) = self
            .change_schedule(name, |r, now| {
                if r.state.paused.take().is_some() {
                    r.state.cursor = r.state.cursor.max(now);
                }
                Ok(())
            })
            .await?;
        tracing::info!(schedule = %name, by, "schedule resumed");
        Ok(view)
    }

    pub async fn schedule_delete(&self, name: &str, by: &str) -> Result<(), EngineError> {
        if self.inner.schedules.schedule_delete(name).await? {
            tracing::info!(schedule = %name, by, "schedule deleted");
            Ok(())
        } else {
            Err(EngineError::ScheduleNotFound(name.to_owned()))
        }
    }

    /// Runs every nominal time from `from` to `to` (both included), in order, one after
    /// another, whatever the catch-up window; a nominal time that has a run already is not run
    /// again. Returns how many fires it covers.
    pub async fn schedule_backfill(
        &self,
        name: &str,
        from: Timestamp,
        to: Timestamp,
        by: &str,
    ) -> Result<(ScheduleView, usize), EngineError> {
        let (view, n) = self
            .change_schedule(name, |r, now| {
                if let Some(b) = r.state.backfill {
                    return Err(EngineError::FailedPrecondition(format!(
                        "schedule {name} is backfilling already (up to {}); wait for it to end",
                        b.to
                    )));
                }
                if to > now {
                    return Err(EngineError::InvalidArgument(format!(
                        "--to {to} is in the future; a backfill covers past fires only"
                    )));
                }
                let timing = r
                    .spec
                    .timing()
                    .map_err(|e| EngineError::Internal(format!("schedule {name}: {e}")))?;
                let n = schedule::backfill_count(&timing, from, to)
                    .map_err(EngineError::InvalidArgument)?;
                r.state.backfill = timing
                    .next_after(Timestamp(from.0.saturating_sub(1)))
                    .filter(|first| *first <= to)
                    .map(|next| Backfill { next, to });
                Ok(n)
            })
            .await?;
        tracing::info!(schedule = %name, by, fires = n, from = %from, to = %to, "schedule backfill");
        Ok((view, n))
    }

    /// Starts one run of the schedule's workflow now, outside its timing and its overlap
    /// policy. Refused, like Submit, when the e-stop stops the workflow or a policy refuses it.
    pub async fn schedule_trigger(&self, name: &str, by: &str) -> Result<RunId, EngineError> {
        self.check_accepting()?;
        for _ in 0..WRITE_TRIES {
            let record = self.load_schedule(name).await?;
            let now = self.inner.now();
            let workflow = record.spec.workflow_for(now);
            self.inner.refuse_if_stopped(&workflow)?;
            let (checked, verdicts) = self.validate(&workflow);
            checked.map_err(EngineError::InvalidSpec)?;
            if let Some(v) = verdicts {
                v.into_result().map_err(EngineError::Policy)?;
            }
            let id = RunId::new_v7();
            let expected = record.version;
            let mut next = record;
            next.state.last_run = Some(id);
            next.state.last_nominal = Some(now);
            next.state
                .record(now, now, FireOutcome::Triggered { run: id });
            let fire = self.inner.fire_run(id, name, now, workflow, now);
            match self
                .inner
                .schedules
                .schedule_write(next, Some(expected), Some(fire))
                .await
            {
                Ok((_, Some(s))) if s.created => {
                    self.inner.emit(s.id, RunState::Queued);
                    tracing::info!(schedule = %name, by, run_id = %s.id, "schedule triggered");
                    driver::spawn_run(&self.inner, s.id);
                    return Ok(s.id);
                }
                Ok((_, Some(s))) => return Ok(s.id),
                Ok((_, None)) => {
                    return Err(EngineError::Internal("the trigger stored no run".into()));
                }
                Err(store::Error::Conflict(_)) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(EngineError::Unavailable(format!(
            "schedule {name} kept changing while it was triggered; try again"
        )))
    }
}
