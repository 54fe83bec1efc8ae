//! The engine: drives runs. It never sees SQL, gRPC or HTTP: it talks to a [`store::RunStore`]
//! and is called by the API layer through the cheap-clone [`Engine`] handle.
//!
//! Each executing run is driven by one task (spawned on the engine's `TaskTracker`), which runs
//! its blocks in order and the jobs of a block concurrently. A job's outcome is committed
//! durably before anything that depends on it starts; job starts are queued without waiting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::estop::{Because, EStopState, Snapshot, Verdict};
use domain::{
    Clock, FieldError, NodeId, Run, RunId, RunState, SpecError, StopCause, Timestamp, WorkflowSpec,
};
use store::{CancelOutcome, ExecOutcome, NewRun, RunFilter, RunPage, RunStore};
use tokio::sync::{Semaphore, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

mod driver;
mod failpoints;
mod maintenance;
pub mod metrics;
mod otel;
mod retention;
mod schedules;
mod submitted;

use crate::failpoints::crash_point;

pub use retention::Retention;

pub use schedules::{ScheduleEvent, ScheduleView, UPCOMING};

pub use domain::stop::ShutdownMode;

/// A clock that follows tokio's time from a starting instant: with tokio's time paused (tests),
/// every wait of the engine (retry backoff, timeouts, leases, TTL sweeps) and every timestamp
/// it records advance together, so an hour passes in no time and stays consistent.
#[derive(Clone, Copy, Debug)]
pub struct TokioClock {
    start: Timestamp,
    at: tokio::time::Instant,
}

impl TokioClock {
    /// Reads `start` at tokio's current instant.
    pub fn starting_at(start: Timestamp) -> TokioClock {
        TokioClock {
            start,
            at: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        let ms = i64::try_from(self.at.elapsed().as_millis()).unwrap_or(i64::MAX);
        Timestamp(self.start.0.saturating_add(ms))
    }
}

/// The e-stop list as the engine sees it: the latest snapshot, and a wake-up on every change.
pub type EStopFeed = tokio::sync::watch::Receiver<Arc<Snapshot>>;

/// A feed that never changes (tests, benchmarks, embedding without an e-stop source).
pub fn estop_fixed(snapshot: Snapshot) -> EStopFeed {
    let (_tx, rx) = tokio::sync::watch::channel(Arc::new(snapshot));
    rx
}

/// A fixed list with one entry, `* = go`.
pub fn estop_all_go() -> EStopFeed {
    estop_fixed(Snapshot::Ok(domain::estop::EStopList {
        entries: vec![domain::estop::Entry {
            target: domain::estop::Target::All,
            state: EStopState::Go,
            reason: String::new(),
            set_by: String::new(),
            set_at: String::new(),
        }],
    }))
}

/// Resolves on the next change of the feed; never, once its source is gone.
pub(crate) async fn estop_changed(feed: &mut EStopFeed) {
    if feed.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The stop cause a `stop` verdict records on a run.
pub fn estop_cause(v: &Verdict) -> StopCause {
    match &v.because {
        Because::Entry { entry } => StopCause::EStop {
            target: entry.target.to_string(),
            state: entry.state.to_string(),
            reason: entry.reason.clone(),
            set_by: entry.set_by.clone(),
        },
        Because::Unlisted => StopCause::EStop {
            target: "(no matching entry)".into(),
            state: v.state.to_string(),
            reason: "no e-stop entry matches this run, and unlisted runs stop (fail closed)".into(),
            set_by: "steward".into(),
        },
        Because::Unreadable { error } => StopCause::EStop {
            target: "(e-stop list unreadable)".into(),
            state: v.state.to_string(),
            reason: error.clone(),
            set_by: "steward".into(),
        },
    }
}

#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub node_id: NodeId,
    /// Jobs running at once on this node, over all runs.
    pub max_running_jobs: usize,
    /// A submitted run not executed within this becomes `expired`.
    pub submit_ttl: Duration,
    /// How long a node holds a run without renewing; renewed every third of it.
    pub lease_ttl: Duration,
    /// Between SIGTERM and SIGKILL for a cancelled job's process group.
    pub kill_grace: Duration,
    /// Bytes of output kept per job.
    pub output_limit: usize,
    /// How often to look for unleased runs (Exec on another node, a dead node's runs).
    pub claim_interval: Duration,
    /// How often to expire submitted runs past their TTL.
    pub expire_interval: Duration,
    /// The e-stop state of a run that no entry matches (fail closed: `stop`).
    pub estop_unlisted: EStopState,
    /// The token buckets `token_bucket` jobs may name.
    pub buckets: std::collections::BTreeMap<String, ratelimit::BucketSpec>,
    /// The policies checked at Submit, reloaded by whoever holds the sender; `None` checks none.
    pub policies: Option<PolicyFeed>,
    /// Keeps each `shell` job's processes together and records them, so that what a crash
    /// left running is ended before a job runs again; `None`: process groups only.
    pub supervisor: Option<Arc<actions::Supervisor>>,
    /// Other nodes share the store and take over runs whose leases lapse (PostgreSQL). Then a
    /// node that could not renew its leases for a whole `lease_ttl` must stop driving its
    /// runs: [`Engine::failure`] answers `StopCause::LostStore`.
    pub shared_store: bool,
    /// What every job is held to: Steward's own files (Submit refuses a `write_file` job
    /// that would write them, and the action checks again when it runs), the secrets jobs
    /// may name (Submit refuses an unknown one), where `http` jobs may not connect.
    pub guardrails: Arc<actions::Guardrails>,
    /// The user `shell` jobs run as, unless their workflow's policy names one.
    pub run_as: Option<domain::RunAs>,
    /// How long finished runs and audit records are kept.
    pub retention: Retention,
}

/// The policy set in force, swapped whole on a reload.
pub type PolicyFeed = tokio::sync::watch::Receiver<Arc<policy::PolicySet>>;

impl EngineOptions {
    pub fn new(node_id: NodeId) -> EngineOptions {
        EngineOptions {
            node_id,
            max_running_jobs: 256,
            submit_ttl: Duration::from_secs(3600),
            lease_ttl: Duration::from_secs(30),
            kill_grace: Duration::from_secs(10),
            output_limit: 16 * 1024,
            claim_interval: Duration::from_secs(2),
            expire_interval: Duration::from_secs(5),
            estop_unlisted: EStopState::Stop,
            buckets: std::collections::BTreeMap::new(),
            policies: None,
            supervisor: None,
            shared_store: false,
            guardrails: Arc::default(),
            run_as: None,
            retention: Retention::default(),
        }
    }
}

/// What the API layer can get back; each variant says what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid spec: {0}")]
    InvalidSpec(SpecError),
    /// The spec breaks the policies of its workflow: every violation, each naming its policy.
    #[error("refused by policy: {0}")]
    Policy(policy::PolicyError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("run {0} not found")]
    NotFound(RunId),
    /// Not found, and older than retention keeps runs: it was most likely pruned.
    #[error(
        "run {id} not found: it was created {created}, and retention ({kept}) deletes finished runs that long after they end; runs that old are pruned"
    )]
    Pruned {
        id: RunId,
        created: Timestamp,
        kept: domain::HumanDuration,
    },
    #[error("schedule {0} not found")]
    ScheduleNotFound(String),
    #[error("schedule {0} exists already; use update to change it")]
    ScheduleExists(String),
    /// Exec of a run that is executing or finished: nothing was done.
    #[error("run {id} is already {state}; nothing was done")]
    AlreadyExists { id: RunId, state: RunState },
    /// Submit with an idempotency key that an earlier run with a different spec holds.
    #[error(
        "idempotency_key {key:?} is already used by run {existing} with a different spec; nothing was stored (use a new key, or submit the same spec to get run {existing})"
    )]
    KeyReused { key: String, existing: RunId },
    #[error("{0}")]
    FailedPrecondition(String),
    /// Shutting down or the store is unreachable: try again (elsewhere).
    #[error("{0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<store::Error> for EngineError {
    fn from(e: store::Error) -> Self {
        match e {
            store::Error::NotFound(id) => EngineError::NotFound(id),
            store::Error::Unavailable(_) | store::Error::Closed | store::Error::Conflict(_) => {
                EngineError::Unavailable(e.to_string())
            }
            store::Error::LeaseLost { .. } | store::Error::Corrupt(_) => {
                EngineError::Internal(e.to_string())
            }
        }
    }
}

/// A change clients may want to hear about (Watch).
#[derive(Clone, Debug, PartialEq)]
pub struct RunEvent {
    pub id: RunId,
    pub state: RunState,
}

/// Why a run task must let go of its run before it is done.
#[derive(Clone, Debug)]
pub(crate) enum Halt {
    /// End the run now (cancel, e-stop): in-flight jobs are cancelled, the run is terminal.
    End { state: RunState, cause: StopCause },
    /// Leave the run unfinished for later (shutdown): in-flight jobs are interrupted.
    Interrupt { cause: StopCause },
    /// Another node holds the run now: touch nothing.
    Abandon,
}

pub(crate) struct ActiveRun {
    token: CancellationToken,
    halt: Arc<Mutex<Option<Halt>>>,
}

pub(crate) struct Inner {
    pub(crate) opts: EngineOptions,
    /// The node ID as the `steward.node` attribute of run spans: shared, not copied per run.
    pub(crate) node_attr: Arc<str>,
    pub(crate) store: Arc<dyn RunStore>,
    pub(crate) buckets: Arc<dyn store::BucketStore>,
    pub(crate) schedules: Arc<dyn store::ScheduleStore>,
    pub(crate) audit: Arc<dyn store::AuditPrune>,
    /// Wakes the scheduler: a schedule of this node changed.
    pub(crate) schedule_changed: tokio::sync::Notify,
    pub(crate) schedule_events: broadcast::Sender<ScheduleEvent>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) job_slots: Arc<Semaphore>,
    pub(crate) active: Mutex<HashMap<RunId, ActiveRun>>,
    pub(crate) events: broadcast::Sender<RunEvent>,
    pub(crate) tracker: TaskTracker,
    /// Cancels every task of the engine: the last step of a shutdown.
    pub(crate) token: CancellationToken,
    /// Fired when a shutdown begins: start no new jobs.
    pub(crate) no_new_jobs: CancellationToken,
    /// Fired on end-of-round: start no new blocks.
    pub(crate) no_new_blocks: CancellationToken,
    pub(crate) estop: EStopFeed,
    pub(crate) accepting: AtomicBool,
    pub(crate) shutdown_cause: Mutex<Option<StopCause>>,
    /// Why the store refuses writes, while it does (`None`: writes go through).
    pub(crate) store_problem: tokio::sync::watch::Sender<Option<String>>,
    /// The background loops (leases, claims, expiry), supervised.
    pub(crate) loops: tasks::Tasks,
    pub(crate) loop_failures: tokio::sync::Mutex<tasks::Failures>,
    /// Notified whenever a run task ends: what the shutdown waits on.
    pub(crate) run_ended: tokio::sync::Notify,
    pub(crate) metrics: Arc<metrics::Metrics>,
    /// The last count of runs by state, and when it was taken.
    pub(crate) counts: Mutex<Option<Counted>>,
    /// Runs this node's Submit stored, for their Exec to start without reading them back.
    pub(crate) submitted: submitted::SubmittedRuns,
}

/// Runs by state, and when they were counted.
pub(crate) type Counted = (std::time::Instant, Vec<(RunState, u64)>);

/// How old [`Engine::count_by_state_recent`] may be.
pub const COUNTS_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(1);

/// The cheap-clone handle to the engine.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<Inner>,
}

impl Engine {
    pub fn new<S: RunStore + store::BucketStore + store::ScheduleStore + store::AuditPrune>(
        opts: EngineOptions,
        store: Arc<S>,
        clock: Arc<dyn Clock>,
        estop: EStopFeed,
    ) -> Engine {
        let buckets: Arc<dyn store::BucketStore> = store.clone();
        let schedules: Arc<dyn store::ScheduleStore> = store.clone();
        let audit: Arc<dyn store::AuditPrune> = store.clone();
        let store: Arc<dyn RunStore> = store;
        let (events, _) = broadcast::channel(4096);
        let tracker = TaskTracker::new();
        let token = CancellationToken::new();
        let (loops, loop_failures) = tasks::Tasks::with(tracker.clone(), token.clone());
        Engine {
            inner: Arc::new(Inner {
                node_attr: Arc::from(opts.node_id.to_string()),
                loops,
                loop_failures: tokio::sync::Mutex::new(loop_failures),
                run_ended: tokio::sync::Notify::new(),
                metrics: Arc::new(metrics::Metrics::new()),
                counts: Mutex::new(None),
                submitted: submitted::SubmittedRuns::default(),
                job_slots: Arc::new(Semaphore::new(opts.max_running_jobs.max(1))),
                opts,
                store,
                buckets,
                schedules,
                audit,
                schedule_changed: tokio::sync::Notify::new(),
                schedule_events: broadcast::channel(1024).0,
                clock,
                active: Mutex::new(HashMap::new()),
                events,
                tracker,
                token,
                no_new_jobs: CancellationToken::new(),
                no_new_blocks: CancellationToken::new(),
                accepting: AtomicBool::new(true),
                shutdown_cause: Mutex::new(None),
                store_problem: tokio::sync::watch::channel(None).0,
                estop,
            }),
        }
    }

    pub fn options(&self) -> &EngineOptions {
        &self.inner.opts
    }

    /// Starts recovery and the background loops (leases, orphans, expiry).
    pub fn start(&self) {
        maintenance::start(&self.inner);
        schedules::start(&self.inner);
        retention::start(&self.inner);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<RunEvent> {
        self.inner.events.subscribe()
    }

    /// True until a shutdown begins.
    pub fn is_accepting(&self) -> bool {
        self.inner.accepting.load(Ordering::SeqCst)
    }

    /// Every policy's verdict on `spec`, when policies are checked.
    pub fn policy_verdicts(&self, spec: &WorkflowSpec) -> Option<policy::Verdicts> {
        let feed = self.inner.opts.policies.as_ref()?;
        let set = feed.borrow().clone();
        let verdicts = set.check(spec);
        if verdicts.passed() {
            return Some(verdicts);
        }
        // Messages quote values: again, quoting them as every surface shows them.
        Some(set.check_shown(spec, &actions::redact_spec(spec)))
    }

    /// Submit's checks without storing anything: the spec's problems, and every policy's verdict.
    pub fn validate(
        &self,
        spec: &WorkflowSpec,
    ) -> (Result<(), SpecError>, Option<policy::Verdicts>) {
        let checked = actions::validate_spec(spec).and_then(|calls| {
            self.check_guardrails(&calls)?;
            self.check_buckets(&calls).map_err(|e| match e {
                EngineError::InvalidSpec(s) => s,
                other => SpecError(vec![domain::FieldError::new("spec", other.to_string())]),
            })
        });
        (checked, self.policy_verdicts(spec))
    }

    /// The node's guardrails: no `write_file` job may write Steward's own files, and every
    /// secret a job names must be there now.
    fn check_guardrails(&self, calls: &[Vec<actions::ActionCall>]) -> Result<(), SpecError> {
        let guardrails = &self.inner.opts.guardrails;
        let mut errs = Vec::new();
        for (bi, row) in calls.iter().enumerate() {
            for (ji, call) in row.iter().enumerate() {
                if let actions::ActionCall::WriteFile(a) = call
                    && let Some(what) = guardrails.protected.covering(&a.path)
                {
                    errs.push(domain::FieldError::new(
                        format!("blocks[{bi}].jobs[{ji}].args.path"),
                        format!(
                            "{} is {what}; a job may not write Steward's own files",
                            a.path.display()
                        ),
                    ));
                }
                for (field, name) in call.secret_refs() {
                    if let Err(e) = guardrails.secrets.get(name) {
                        errs.push(domain::FieldError::new(
                            format!("blocks[{bi}].jobs[{ji}].args.{field}"),
                            e.to_string(),
                        ));
                    }
                }
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(SpecError(errs))
        }
    }

    /// Every `token_bucket` job must name a configured bucket.
    fn check_buckets(&self, calls: &[Vec<actions::ActionCall>]) -> Result<(), EngineError> {
        let mut errs = Vec::new();
        for (bi, row) in calls.iter().enumerate() {
            for (ji, call) in row.iter().enumerate() {
                if let actions::ActionCall::TokenBucket(a) = call
                    && !self.inner.opts.buckets.contains_key(&a.bucket)
                {
                    let known: Vec<&str> =
                        self.inner.opts.buckets.keys().map(String::as_str).collect();
                    let hint = if known.is_empty() {
                        format!(
                            "no buckets are configured; add [buckets.{}] to steward.toml",
                            a.bucket
                        )
                    } else {
                        format!("configured buckets: {}", known.join(", "))
                    };
                    errs.push(domain::FieldError::new(
                        format!("blocks[{bi}].jobs[{ji}].args.bucket"),
                        format!("unknown bucket {:?}; {hint}", a.bucket),
                    ));
                }
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(EngineError::InvalidSpec(SpecError(errs)))
        }
    }

    /// A run's effective e-stop state now, and why.
    pub fn verdict(&self, spec: &WorkflowSpec) -> Verdict {
        self.inner.verdict(spec)
    }

    /// Why the engine is stopping, once a shutdown began.
    pub fn shutdown_cause(&self) -> Option<StopCause> {
        self.inner
            .shutdown_cause
            .lock()
            .ok()
            .and_then(|c| c.clone())
    }

    /// Why the store refuses this node's writes, while it does: nothing new is dispatched
    /// then, and finished work is kept and committed again until the store takes it.
    /// What the engine counts, for `/metrics`.
    pub fn metrics(&self) -> &Arc<metrics::Metrics> {
        &self.inner.metrics
    }

    pub fn store_problem(&self) -> Option<String> {
        self.inner.store_problem.borrow().clone()
    }

    /// Resolves when one of the engine's background loops ends before the engine is stopped,
    /// or panics (a `StopCause::Fatal` naming it), or when a shared store stayed out of reach
    /// past the leases (`StopCause::LostStore`). The node must then stop.
    pub async fn failure(&self) -> StopCause {
        self.inner.loop_failures.lock().await.next().await
    }

    /// Runs this node is driving now.
    pub fn active_runs(&self) -> usize {
        self.inner.active.lock().map(|a| a.len()).unwrap_or(0)
    }

    /// Jobs running on this node now.
    pub fn running_jobs(&self) -> usize {
        self.inner.opts.max_running_jobs.max(1) - self.inner.job_slots.available_permits()
    }

    fn check_accepting(&self) -> Result<(), EngineError> {
        if self.is_accepting() {
            Ok(())
        } else {
            let cause = self
                .inner
                .shutdown_cause
                .lock()
                .ok()
                .and_then(|c| c.clone());
            Err(EngineError::Unavailable(match cause {
                Some(c) => format!(
                    "steward is shutting down ({c}); try again on another node or after the restart"
                ),
                None => "steward is shutting down; try again later".into(),
            }))
        }
    }

    /// Validates and stores a spec; runs nothing (handshake step 1). Nobody in particular
    /// submits it (authentication off); see [`Engine::submit_as`].
    pub async fn submit(&self, spec: WorkflowSpec) -> Result<store::Submitted, EngineError> {
        Ok(self.submit_as(spec, "").await?.0)
    }

    /// [`Engine::submit`] for the token named `by`, recorded as the run's submitter.
    pub async fn submit_as(
        &self,
        spec: WorkflowSpec,
        by: &str,
    ) -> Result<(store::Submitted, RunState), EngineError> {
        self.submit_inner(spec, None, by, false).await
    }

    /// Submit and Exec in one durable write, for a client that names its run by an
    /// idempotency key (it can find the run again without the handshake). A key that names a
    /// run already answers that run: started now if it was only submitted, else as it stands.
    /// Returns the run's state after the call.
    pub async fn submit_started_as(
        &self,
        spec: WorkflowSpec,
        by: &str,
    ) -> Result<(store::Submitted, RunState), EngineError> {
        if spec.idempotency_key.is_none() {
            return Err(EngineError::InvalidSpec(SpecError(vec![FieldError::new(
                "idempotency_key",
                "a run started by Submit (start: true) needs an idempotency key, by which the client finds it again after a lost answer; set one, or Submit then Exec",
            )])));
        }
        let (submitted, state) = self.submit_inner(spec, None, by, true).await?;
        if state != RunState::Submitted {
            return Ok((submitted, state));
        }
        match self.exec(submitted.id).await {
            Ok(()) => Ok((submitted, RunState::Queued)),
            // Started by a concurrent call in between: as a retry, that is success.
            Err(EngineError::AlreadyExists { state, .. }) => Ok((submitted, state)),
            Err(e) => Err(e),
        }
    }

    async fn submit_inner(
        &self,
        spec: WorkflowSpec,
        cloned_from: Option<RunId>,
        by: &str,
        start: bool,
    ) -> Result<(store::Submitted, RunState), EngineError> {
        self.check_accepting()?;
        let calls = actions::validate_spec(&spec).map_err(EngineError::InvalidSpec)?;
        self.check_guardrails(&calls)
            .map_err(EngineError::InvalidSpec)?;
        self.check_buckets(&calls)?;
        if let Some(verdicts) = self.policy_verdicts(&spec) {
            verdicts.into_result().map_err(EngineError::Policy)?;
        }
        self.inner.refuse_if_stopped(&spec)?;
        let now = self.inner.clock.now();
        let key = spec.idempotency_key.clone();
        let run = NewRun {
            id: RunId::new_v7(),
            spec: spec.clone(),
            created_at: now,
            expires_at: now.plus(self.inner.opts.submit_ttl),
            cloned_from,
            submitted_by: by.to_owned(),
            schedule: None,
        };
        // A run started here: its driver's slot, registered before the write (a cancel right
        // after it finds the run), and the run as stored, to start from without reading it.
        let mut started_here = None;
        // A run only submitted: as stored, for its Exec.
        let kept = (!start).then(|| run.as_stored());
        let submitted = if start {
            let started = store::StartedRun {
                run,
                node: self.inner.opts.node_id.clone(),
                lease_until: now.plus(self.inner.opts.lease_ttl),
            };
            started_here = Some((
                driver::reserve(&self.inner, started.run.id),
                started.as_stored(),
            ));
            self.inner.store.submit_started(started).await?
        } else {
            self.inner.store.submit(run).await?
        };
        let mut state = if start {
            RunState::Queued
        } else {
            RunState::Submitted
        };
        if !submitted.created
            && let Some(key) = key
        {
            // The same key answers with the same run only for the same spec: a different
            // spec under a used key is a client bug that must not pass silently.
            let existing = self.inner.store.get(submitted.id).await?;
            if existing.spec != spec {
                return Err(EngineError::KeyReused {
                    key,
                    existing: submitted.id,
                });
            }
            state = existing.state;
        }
        if submitted.created
            && let Some((reserved, run)) = started_here
        {
            // Stored and leased, not yet started nor answered: a restart resumes it, and the
            // client's retry (same key) finds it.
            crash_point!("engine::submit_started_after_commit");
            if let Some(d) = failpoints::pause("engine::before_driver_start") {
                tokio::time::sleep(d).await;
            }
            self.inner.emit(submitted.id, RunState::Queued);
            tracing::debug!(run_id = %submitted.id, "run submitted and queued");
            match reserved {
                Some(r) => r.start(run),
                None => driver::spawn_run(&self.inner, submitted.id),
            }
        } else if submitted.created {
            if let Some(run) = kept {
                self.inner.submitted.keep(run);
            }
            self.inner.emit(submitted.id, RunState::Submitted);
            tracing::debug!(run_id = %submitted.id, "run submitted");
        }
        Ok((submitted, state))
    }

    /// Starts a submitted run (handshake step 2).
    pub async fn exec(&self, id: RunId) -> Result<(), EngineError> {
        self.check_accepting()?;
        // As this node's Submit stored it (the write below tells whether it is still only
        // submitted), else as stored now. A refusal is decided on the run as stored now: it
        // may have ended since.
        let run = match self.inner.submitted.take(id) {
            Some(run) if self.inner.refuse_if_stopped(&run.spec).is_ok() => run,
            _ => {
                let run = self.get(id).await?;
                if run.state == RunState::Submitted {
                    self.inner.refuse_if_stopped(&run.spec)?;
                }
                run
            }
        };
        let now = self.inner.clock.now();
        let lease = now.plus(self.inner.opts.lease_ttl);
        // Registered before the write: a cancel right after it finds the run.
        let reserved = driver::reserve(&self.inner, id);
        match self
            .inner
            .store
            .exec(id, &self.inner.opts.node_id, now, lease)
            .await?
        {
            ExecOutcome::Queued => {
                self.inner.emit(id, RunState::Queued);
                tracing::debug!(run_id = %id, "run queued");
                // Only a `submitted` run is queued, and nothing changes one but this (a
                // cancel or an expiry would have ended it first): the run above, queued.
                let mut run = run;
                run.state = RunState::Queued;
                run.lease_owner = Some(self.inner.opts.node_id.clone());
                run.lease_expires_at = Some(lease);
                match reserved {
                    Some(r) => r.start(run),
                    None => driver::spawn_run(&self.inner, id),
                }
                Ok(())
            }
            ExecOutcome::Expired => {
                self.inner.emit(id, RunState::Expired);
                Err(EngineError::FailedPrecondition(format!(
                    "run {id} was not executed within the submit TTL ({}) and has expired; clone it to run it",
                    domain::HumanDuration(self.inner.opts.submit_ttl)
                )))
            }
            ExecOutcome::AlreadyStarted(RunState::Expired) => {
                Err(EngineError::FailedPrecondition(format!(
                    "run {id} was not executed within the submit TTL ({}) and has expired; clone it to run it",
                    domain::HumanDuration(self.inner.opts.submit_ttl)
                )))
            }
            ExecOutcome::AlreadyStarted(state) => Err(EngineError::AlreadyExists { id, state }),
        }
    }

    pub async fn status(&self, id: RunId) -> Result<Run, EngineError> {
        self.get(id).await
    }

    /// The run, or why there is none.
    async fn get(&self, id: RunId) -> Result<Run, EngineError> {
        match self.inner.store.get(id).await {
            Ok(r) => Ok(r),
            Err(store::Error::NotFound(id)) => Err(self.missing(id)),
            Err(e) => Err(e.into()),
        }
    }

    /// How many runs are in each state.
    pub async fn count_by_state(&self) -> Result<Vec<(RunState, u64)>, EngineError> {
        Ok(self.inner.store.count_by_state().await?)
    }

    /// [`Engine::count_by_state`], at most [`COUNTS_MAX_AGE`] old: for what anyone may ask
    /// for often (`/metrics`, open console pages), so that asking costs the store one count a
    /// second at most.
    pub async fn count_by_state_recent(&self) -> Result<Vec<(RunState, u64)>, EngineError> {
        if let Ok(c) = self.inner.counts.lock()
            && let Some((at, counts)) = c.as_ref()
            && at.elapsed() < COUNTS_MAX_AGE
        {
            return Ok(counts.clone());
        }
        let counts = self.count_by_state().await?;
        if let Ok(mut c) = self.inner.counts.lock() {
            *c = Some((std::time::Instant::now(), counts.clone()));
        }
        Ok(counts)
    }

    pub async fn list(&self, filter: &RunFilter) -> Result<RunPage, EngineError> {
        if let Some(t) = &filter.page_token {
            t.parse::<RunId>().map_err(|_| {
                EngineError::InvalidArgument(format!(
                    "page_token {} is not one this server gave out",
                    domain::limits::clip(t)
                ))
            })?;
        }
        if filter.page_size > store::MAX_PAGE_SIZE {
            return Err(EngineError::InvalidArgument(format!(
                "page_size {} is over the limit of {}",
                filter.page_size,
                store::MAX_PAGE_SIZE
            )));
        }
        Ok(self.inner.store.list(filter).await?)
    }

    /// Cancels a run: at once if it has not started, else through the node that drives it.
    pub async fn cancel(&self, id: RunId, by: &str, reason: &str) -> Result<RunState, EngineError> {
        let cause = StopCause::Cancelled {
            by: by.to_owned(),
            reason: reason.to_owned(),
        };
        let now = self.inner.clock.now();
        let outcome = match self.inner.store.cancel(id, cause.clone(), now).await {
            Err(store::Error::NotFound(id)) => return Err(self.missing(id)),
            other => other?,
        };
        match outcome {
            CancelOutcome::Cancelled => {
                self.inner.emit(id, RunState::Cancelled);
                Ok(RunState::Cancelled)
            }
            CancelOutcome::Requested { .. } => {
                // The run may be ours; if not, its node hears of it when it renews its leases.
                self.inner.halt_run(
                    id,
                    Halt::End {
                        state: RunState::Cancelled,
                        cause,
                    },
                );
                Ok(self.inner.store.get(id).await?.state)
            }
            CancelOutcome::AlreadyFinished(state) => Err(EngineError::FailedPrecondition(format!(
                "run {id} already finished ({state}); nothing to cancel"
            ))),
        }
    }

    /// Submits a new run with the spec of an old one (its idempotency key dropped).
    /// Submits a copy of run `id`'s spec (without its idempotency key) for the token named
    /// `by`.
    pub async fn clone_run(&self, id: RunId, by: &str) -> Result<RunId, EngineError> {
        let run = self.get(id).await?;
        let mut spec = run.spec;
        spec.idempotency_key = None;
        Ok(self.submit_inner(spec, Some(id), by, false).await?.0.id)
    }

    /// Stops the engine (docs/operating.md, Stopping). The first cause wins; calling again with `Now`
    /// escalates a drain in progress. Returns when every task has ended.
    pub async fn shutdown(&self, mode: ShutdownMode, cause: StopCause, grace: Duration) {
        maintenance::shutdown(&self.inner, mode, cause, grace).await;
    }

    /// Escalates a shutdown in progress to `now`: in-flight jobs are cancelled at once.
    pub fn stop_now(&self, cause: StopCause) {
        maintenance::stop_now(&self.inner, cause);
    }
}

impl Inner {
    /// Who a `shell` job of `workflow` runs as: its policy's `run_as`, else the node's.
    fn run_as_for(&self, workflow: &str) -> Option<domain::RunAs> {
        let from_policy = self
            .opts
            .policies
            .as_ref()
            .and_then(|feed| feed.borrow().run_as(workflow).cloned());
        from_policy.or_else(|| self.opts.run_as.clone())
    }

    pub(crate) fn now(&self) -> Timestamp {
        self.clock.now()
    }

    /// A write failed: the store is failing until a write goes through.
    pub(crate) fn store_failed(&self, e: &store::Error) {
        let problem = e.to_string();
        self.store_problem.send_if_modified(|p| {
            if p.as_ref() == Some(&problem) {
                return false;
            }
            if p.is_none() {
                tracing::error!(error = %e, "the store refuses writes: nothing new is dispatched, finished work is kept and committed again");
            }
            *p = Some(problem);
            true
        });
    }

    /// A write went through.
    pub(crate) fn store_recovered(&self) {
        self.store_problem.send_if_modified(|p| {
            if p.take().is_some() {
                tracing::info!("the store takes writes again");
                true
            } else {
                false
            }
        });
    }

    /// Resolves once the store takes writes (at once when it does).
    pub(crate) async fn store_writable(&self) {
        let mut rx = self.store_problem.subscribe();
        let _ = rx.wait_for(Option::is_none).await;
    }

    pub(crate) fn verdict(&self, spec: &WorkflowSpec) -> Verdict {
        self.estop
            .borrow()
            .verdict(&spec.name, &spec.labels, self.opts.estop_unlisted)
    }

    /// Submit and Exec of work the e-stop stops are refused, naming the entry.
    fn refuse_if_stopped(&self, spec: &WorkflowSpec) -> Result<(), EngineError> {
        let v = self.verdict(spec);
        if v.state == EStopState::Stop {
            return Err(EngineError::FailedPrecondition(format!("refused: {v}")));
        }
        Ok(())
    }

    pub(crate) fn emit(&self, id: RunId, state: RunState) {
        let _ = self.events.send(RunEvent { id, state });
    }

    /// Tells the task driving `id` (if it is ours) to let go. The first halt wins.
    pub(crate) fn halt_run(&self, id: RunId, halt: Halt) -> bool {
        let Ok(active) = self.active.lock() else {
            return false;
        };
        let Some(run) = active.get(&id) else {
            return false;
        };
        if let Ok(mut h) = run.halt.lock()
            && h.is_none()
        {
            *h = Some(halt);
        }
        run.token.cancel();
        true
    }
}
