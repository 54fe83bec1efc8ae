//! One task per executing run: blocks in order, the jobs of a block concurrently.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use actions::{ActionCall, ActionError, JobContext, JobOutput};
use domain::{JobKey, JobSpec, JobState, Run, RunId, RunState, StopCause};
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use store::Transition;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::failpoints::crash_point;
use crate::{ActiveRun, EStopFeed, Halt, Inner, estop_cause, estop_changed};
use domain::estop::EStopState;

/// The first wait before a refused commit is tried again; it doubles up to the max.
const COMMIT_BACKOFF_FIRST: std::time::Duration = std::time::Duration::from_millis(50);
const COMMIT_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(5);
/// How long an attempt's start waits to be written with its outcome: an attempt that ends
/// within it (an in-process action, a quick call) costs one write instead of two; a longer one
/// has its start queued then (or later, while the driver awaits a commit). The start is never
/// waited for, so nothing is less durable.
const START_RECORD_WAIT: std::time::Duration = std::time::Duration::from_millis(1);
/// The first wait before a job this node could not start is tried again; doubles up to max.
const NOT_STARTED_BACKOFF_FIRST: std::time::Duration = std::time::Duration::from_millis(200);
const NOT_STARTED_BACKOFF_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Starts driving `id` unless this node drives it already.
pub(crate) fn spawn_run(inner: &Arc<Inner>, id: RunId) {
    if let Some((token, halt)) = register(inner, id) {
        launch(inner, id, token, halt, None);
    }
}

/// A run registered as active before the write that starts it, so that a cancel or an e-stop
/// that comes between that write and the driver's start finds it (and is not missed by a
/// driver that starts from memory, [`Reserved::start`]). Dropped unstarted, it is
/// unregistered.
pub(crate) struct Reserved {
    inner: Arc<Inner>,
    id: RunId,
    slot: Option<Slot>,
}

/// An active run's cancellation token and halt slot.
type Slot = (CancellationToken, Arc<Mutex<Option<Halt>>>);

/// Registers `id` ahead of its start; none when a driver of it is active already.
pub(crate) fn reserve(inner: &Arc<Inner>, id: RunId) -> Option<Reserved> {
    register(inner, id).map(|slot| Reserved {
        inner: inner.clone(),
        id,
        slot: Some(slot),
    })
}

impl Reserved {
    /// Drives the run from `run`, as this node has just stored or queued it, instead of
    /// reading it back.
    pub(crate) fn start(mut self, run: Run) {
        if let Some((token, halt)) = self.slot.take() {
            launch(&self.inner, self.id, token, halt, Some(run));
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.slot.is_some() {
            if let Ok(mut active) = self.inner.active.lock() {
                active.remove(&self.id);
            }
            self.inner.run_ended.notify_waiters();
        }
    }
}

/// Adds `id` to the active runs: its cancellation token and halt slot; none when it is there.
fn register(inner: &Arc<Inner>, id: RunId) -> Option<Slot> {
    let token = inner.token.child_token();
    let halt = Arc::new(Mutex::new(None));
    let Ok(mut active) = inner.active.lock() else {
        return None;
    };
    if active.contains_key(&id) {
        return None;
    }
    active.insert(
        id,
        ActiveRun {
            token: token.clone(),
            halt: halt.clone(),
        },
    );
    Some((token, halt))
}

fn launch(
    inner: &Arc<Inner>,
    id: RunId,
    token: CancellationToken,
    halt: Arc<Mutex<Option<Halt>>>,
    loaded: Option<Run>,
) {
    let task_inner = inner.clone();
    // Every line about the run carries its ID and its workflow: known here when the run is,
    // else recorded once it is read (recording a field later costs more than naming it now).
    let span = match &loaded {
        Some(run) => tracing::info_span!("run", run_id = %id, workflow = run.spec.name.as_str()),
        None => tracing::info_span!("run", run_id = %id, workflow = tracing::field::Empty),
    };
    inner.tracker.spawn(
        async move {
            // Exported, this driving of the run is a span of the run's trace; it ends with the
            // task.
            let run_span = crate::otel::run_span(
                id,
                &task_inner.node_attr,
                loaded.as_ref().map(|r| r.spec.name.as_str()),
            );
            let driver = Driver {
                inner: &task_inner,
                id,
                token,
                halt,
                marked_running: AtomicBool::new(false),
                paused: AtomicBool::new(false),
                ident: std::sync::OnceLock::new(),
                created_at: std::sync::OnceLock::new(),
                held: Mutex::new(Vec::new()),
                span_id: run_span.id(),
                span: Mutex::new(run_span),
            };
            if let Err(e) = driver.drive(loaded).await {
                match e {
                    store::Error::LeaseLost { .. } => tracing::warn!("another node holds this run now; letting go"),
                    e => tracing::error!(error = %e, "driving the run failed; it resumes when its lease expires or on restart"),
                }
            }
            if let Ok(mut active) = task_inner.active.lock() {
                active.remove(&id);
            }
            task_inner.run_ended.notify_waiters();
        }
        .instrument(span),
    );
}

enum Outcome {
    Completed(JobOutput),
    Failed {
        error: String,
        exit_code: Option<i32>,
        output: String,
    },
    /// Cancelled while running: the halt decides what it becomes.
    Cancelled {
        output: String,
    },
    /// Never started (cancelled or drained while waiting for a slot).
    NotStarted,
}

struct JobResult {
    key: JobKey,
    outcome: Outcome,
    /// The attempt's start (and the run's, for its first job), when the attempt ended before
    /// it was queued on its own ([`START_RECORD_WAIT`]): written with the outcome, first.
    started: Vec<Transition>,
}

enum Flow {
    /// The block completed; go on with the next.
    Next,
    /// The run was finished (failed, or completed on its last block) and committed.
    Finished,
    /// The run must stop here without finishing; what is left to record of its block comes
    /// along.
    Halted(Vec<Transition>),
}

struct Driver<'a> {
    inner: &'a Arc<Inner>,
    id: RunId,
    token: CancellationToken,
    halt: Arc<Mutex<Option<Halt>>>,
    marked_running: AtomicBool,
    /// Shown as `paused` because of the e-stop.
    paused: AtomicBool,
    /// The run's name and labels: what e-stop entries select on.
    ident: std::sync::OnceLock<(String, std::collections::BTreeMap<String, String>)>,
    /// When the run was submitted: the start latency is measured from it.
    created_at: std::sync::OnceLock<domain::Timestamp>,
    /// Attempts' starts (the first with the run's) not yet queued, oldest first, each held
    /// for [`START_RECORD_WAIT`] to go with its attempt's outcome. Whatever queues one queues
    /// those before it too, and a pause queues them all first: the store sees the run
    /// `running`, and starts, in the order they happened.
    held: Mutex<Vec<(JobKey, Vec<Transition>)>>,
    /// This driving's span (recording nothing without an exporter), and its ID.
    span: Mutex<otlp::Span>,
    span_id: Option<[u8; 8]>,
}

impl Driver<'_> {
    fn node(&self) -> &domain::NodeId {
        &self.inner.opts.node_id
    }

    /// Does `f` to the run's span when it is recorded (else nothing is made for it).
    fn with_span(&self, f: impl FnOnce(&mut otlp::Span)) {
        if self.span_id.is_some()
            && let Ok(mut span) = self.span.lock()
        {
            f(&mut span);
        }
    }

    /// Adds an event to the run's span, when it is recorded; `attrs` is only made then.
    fn span_event(&self, name: &'static str, attrs: impl FnOnce() -> Vec<otlp::Attr>) {
        self.with_span(|span| span.event(name, attrs()));
    }

    async fn drive(&self, loaded: Option<Run>) -> store::Result<()> {
        // `read`: the run span was made without the workflow, which is only known now.
        let (run, read) = match loaded {
            Some(run) => (run, false),
            None => (self.inner.store.get(self.id).await?, true),
        };
        if !run.state.is_executing() || run.lease_owner.as_ref() != Some(self.node()) {
            return Ok(());
        }
        self.marked_running
            .store(run.state == RunState::Running, Ordering::SeqCst);
        self.paused
            .store(run.state == RunState::Paused, Ordering::SeqCst);
        let _ = self
            .ident
            .set((run.spec.name.clone(), run.spec.labels.clone()));
        let _ = self.created_at.set(run.created_at);
        if read {
            tracing::Span::current().record("workflow", run.spec.name.as_str());
            self.with_span(|span| span.set("workflow", run.spec.name.clone()));
        }
        if let Some(cause) = run.cancel_requested.clone() {
            return self.end(RunState::Cancelled, cause).await;
        }
        let calls = match actions::validate_spec(&run.spec) {
            Ok(c) => c,
            Err(e) => {
                // Specs are validated at submit; this means the actions changed under a stored run.
                let error = format!("the stored spec is no longer valid: {e}");
                tracing::error!(%error, "failing the run");
                return self
                    .finish(RunState::Failed, Some(error), None, vec![])
                    .await;
            }
        };
        let Some(first) = run.first_unfinished_block() else {
            return self.finish(RunState::Completed, None, None, vec![]).await;
        };
        for (bi, block_calls) in calls.iter().enumerate().skip(first) {
            let fresh = run.blocks[bi].state == JobState::Pending;
            if fresh
                && (self.inner.no_new_blocks.is_cancelled()
                    || self.inner.no_new_jobs.is_cancelled())
            {
                return self.interrupt().await;
            }
            let last = bi + 1 == run.blocks.len();
            match self.drive_block(&run, bi, block_calls, last).await? {
                Flow::Next => {}
                Flow::Finished => return Ok(()),
                Flow::Halted(pending) => return self.halted(pending).await,
            }
        }
        Ok(())
    }

    async fn drive_block(
        &self,
        run: &Run,
        bi: usize,
        calls: &[ActionCall],
        last: bool,
    ) -> store::Result<Flow> {
        let block = &run.blocks[bi];
        let spec = &run.spec.blocks[bi];
        let b = u32::try_from(bi).unwrap_or(u32::MAX);
        let mut queue: VecDeque<usize> = block
            .jobs
            .iter()
            .enumerate()
            .filter(|(_, j)| matches!(j.state, JobState::Pending | JobState::Running))
            .map(|(i, _)| i)
            .collect();
        let mut failures = block
            .jobs
            .iter()
            .filter(|j| j.state == JobState::Failed)
            .count();
        let budget = spec.max_failures as usize;
        let mut first_error = block.jobs.iter().enumerate().find_map(|(ji, j)| {
            (j.state == JobState::Failed)
                .then(|| job_error(bi, ji, spec.jobs[ji].desc.as_str(), j.error.as_deref()))
        });
        if block.state == JobState::Pending {
            let at = self.inner.now();
            self.inner.store.apply_nowait(
                self.node(),
                self.id,
                vec![Transition::BlockStarted { block: b, at }],
            );
        }
        if queue.is_empty() || failures > budget {
            // Everything was done before a restart: only the block's end is left to record.
            let mut ts = Vec::new();
            let at = self.inner.now();
            let finished = self.settle(&mut ts, bi, failures, budget, first_error, last, at);
            self.commit_alone(ts).await?;
            return Ok(match finished {
                Some(Some(state)) => {
                    self.finished(state);
                    Flow::Finished
                }
                _ => Flow::Next,
            });
        }
        let concurrency = spec.concurrency.max(1) as usize;
        let mut in_flight = FuturesUnordered::new();
        // Outcomes that arrived while a commit was being retried, not yet recorded.
        let mut stash: Vec<JobResult> = Vec::new();
        let mut feed: EStopFeed = self.inner.estop.clone();
        feed.mark_unchanged();
        loop {
            let gate = self.gate();
            while gate == EStopState::Go
                && failures <= budget
                && in_flight.len() < concurrency
                && !self.token.is_cancelled()
                && !self.inner.no_new_jobs.is_cancelled()
            {
                let Some(ji) = queue.pop_front() else { break };
                let key = JobKey {
                    block: b,
                    job: u32::try_from(ji).unwrap_or(u32::MAX),
                };
                in_flight.push(self.run_job(
                    key,
                    &calls[ji],
                    &spec.jobs[ji],
                    block.jobs[ji].attempts,
                ));
            }
            if in_flight.is_empty() && stash.is_empty() {
                let held_by_pause = gate == EStopState::Pause
                    && !queue.is_empty()
                    && failures <= budget
                    && !self.token.is_cancelled()
                    && !self.inner.no_new_jobs.is_cancelled();
                if held_by_pause {
                    tokio::select! {
                        () = estop_changed(&mut feed) => continue,
                        () = self.token.cancelled() => {}
                        () = self.inner.no_new_jobs.cancelled() => {}
                    }
                }
                break;
            }
            // Wake on an outcome, or on an e-stop change (which may cancel the in-flight jobs).
            let mut results = std::mem::take(&mut stash);
            if results.is_empty() {
                let first = tokio::select! {
                    r = in_flight.next() => match r {
                        Some(r) => r,
                        None => break,
                    },
                    () = estop_changed(&mut feed) => continue,
                };
                results.push(first);
            }
            while let Some(Some(r)) = in_flight.next().now_or_never() {
                results.push(r);
            }
            let at = self.inner.now();
            let mut ts = Vec::with_capacity(results.len() + 2);
            for mut r in results {
                ts.append(&mut r.started);
                let ji = r.key.job as usize;
                match r.outcome {
                    Outcome::Completed(out) => ts.push(Transition::JobFinished {
                        key: r.key,
                        state: JobState::Completed,
                        at,
                        error: None,
                        exit_code: out.exit_code,
                        output: out.output,
                    }),
                    Outcome::Failed {
                        error,
                        exit_code,
                        output,
                    } => {
                        failures += 1;
                        tracing::warn!(job = %r.key.idempotency_key(self.id), %error, failures, budget, "job failed");
                        if first_error.is_none() {
                            first_error =
                                Some(job_error(bi, ji, &spec.jobs[ji].desc, Some(&error)));
                        }
                        ts.push(Transition::JobFinished {
                            key: r.key,
                            state: JobState::Failed,
                            at,
                            error: Some(error),
                            exit_code,
                            output,
                        });
                    }
                    Outcome::Cancelled { output } => {
                        // Not done: it runs again when the run resumes.
                        queue.push_front(ji);
                        ts.push(self.cancelled_job(r.key, at, output));
                    }
                    Outcome::NotStarted => queue.push_front(ji),
                }
            }
            let settled = in_flight.is_empty() && !self.token.is_cancelled();
            let mut finished = None;
            if settled && (failures > budget || queue.is_empty()) {
                finished =
                    self.settle(&mut ts, bi, failures, budget, first_error.clone(), last, at);
            }
            if ts.is_empty() {
                continue;
            }
            if finished.is_none() && in_flight.is_empty() && stash.is_empty() && self.ending() {
                // Nothing runs any more and the run ends here (stopped, cancelled): its jobs'
                // ends and its own are one write.
                return Ok(Flow::Halted(ts));
            }
            crash_point!("engine::job_before_commit");
            self.commit(ts, &mut in_flight, &mut stash).await?;
            crash_point!("engine::job_after_commit");
            match finished {
                Some(Some(state)) => {
                    self.finished(state);
                    self.span_event("run finished", || vec![("state", state.as_str().into())]);
                    tracing::info!(%state, "run finished");
                    return Ok(Flow::Finished);
                }
                Some(None) => {
                    self.inner.emit(self.id, RunState::Running);
                    return Ok(Flow::Next);
                }
                None => self.inner.emit(self.id, RunState::Running),
            }
        }
        // Nothing in flight and the block is not done: cancelled or draining.
        Ok(Flow::Halted(Vec::new()))
    }

    /// Ends block `bi`: pushes its end (and the run's, if it failed or was the last block).
    /// Returns `Some(Some(state))` when the run ended, `Some(None)` when the next block is due.
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &self,
        ts: &mut Vec<Transition>,
        bi: usize,
        failures: usize,
        budget: usize,
        first_error: Option<String>,
        last: bool,
        at: domain::Timestamp,
    ) -> Option<Option<RunState>> {
        let block = u32::try_from(bi).unwrap_or(u32::MAX);
        if failures > budget {
            ts.push(Transition::BlockFinished {
                block,
                state: JobState::Failed,
                at,
            });
            let error = first_error.unwrap_or_else(|| format!("blocks[{bi}] failed"));
            let error = if budget > 0 {
                format!("{error} ({failures} failures, over the block's budget of {budget})")
            } else {
                error
            };
            ts.push(Transition::RunFinished {
                state: RunState::Failed,
                at,
                error: Some(error),
                stop_cause: None,
            });
            return Some(Some(RunState::Failed));
        }
        ts.push(Transition::BlockFinished {
            block,
            state: JobState::Completed,
            at,
        });
        if last {
            ts.push(Transition::RunFinished {
                state: RunState::Completed,
                at,
                error: None,
                stop_cause: None,
            });
            return Some(Some(RunState::Completed));
        }
        Some(None)
    }

    /// Checks the e-stop: `stop` halts the run and cancels its in-flight jobs at once; `pause`
    /// shows the run paused and starts nothing new; `go` lets it go on.
    fn gate(&self) -> EStopState {
        let Some((name, labels)) = self.ident.get() else {
            return EStopState::Go;
        };
        let v = self
            .inner
            .estop
            .borrow()
            .verdict(name, labels, self.inner.opts.estop_unlisted);
        match v.state {
            EStopState::Stop => {
                if !self.token.is_cancelled() {
                    // The run's end line says why; a stop of a thousand runs is a thousand
                    // lines already.
                    tracing::debug!(verdict = %v, "e-stop: stopping the run and cancelling its in-flight jobs");
                    if let Ok(mut h) = self.halt.lock()
                        && h.is_none()
                    {
                        *h = Some(Halt::End {
                            state: RunState::Stopped,
                            cause: estop_cause(&v),
                        });
                    }
                    self.token.cancel();
                }
            }
            EStopState::Pause => {
                if !self.paused.swap(true, Ordering::SeqCst) {
                    tracing::info!(verdict = %v, "e-stop: pausing the run; in-flight jobs finish, nothing new starts");
                    self.span_event("e-stop: paused", || vec![("verdict", v.to_string().into())]);
                    let at = self.inner.now();
                    // Held starts first: a `running` written after this would hide the pause.
                    let mut ts = self.take_held_all();
                    ts.push(Transition::RunPaused { at });
                    self.inner.store.apply_nowait(self.node(), self.id, ts);
                    self.inner.emit(self.id, RunState::Paused);
                }
            }
            EStopState::Go => {
                if self.paused.swap(false, Ordering::SeqCst) {
                    tracing::info!("e-stop: resuming the run");
                    self.span_event("e-stop: resumed", Vec::new);
                    let at = self.inner.now();
                    self.inner.store.apply_nowait(
                        self.node(),
                        self.id,
                        vec![Transition::RunRunning { at }],
                    );
                    self.marked_running.store(true, Ordering::SeqCst);
                    self.inner.emit(self.id, RunState::Running);
                }
            }
        }
        v.state
    }

    /// Runs one attempt of an action; `token_bucket` is run here, against the shared buckets.
    async fn run_call(
        &self,
        call: &ActionCall,
        ctx: &JobContext,
    ) -> Result<JobOutput, ActionError> {
        let ActionCall::TokenBucket(args) = call else {
            return call.run(ctx).await;
        };
        let Some(spec) = self.inner.opts.buckets.get(&args.bucket) else {
            return Err(ActionError::Fatal {
                message: format!("bucket {:?} is not configured", args.bucket),
                output: String::new(),
            });
        };
        let started = self.inner.now();
        let deadline = started.plus(args.wait.unwrap_or_default());
        loop {
            let now = self.inner.now();
            let take = self
                .inner
                .buckets
                .bucket_take(&args.bucket, spec, &ctx.idempotency_key, now)
                .await
                .map_err(|e| ActionError::Failed {
                    message: format!("taking a token from bucket {:?}: {e}", args.bucket),
                    exit_code: None,
                    output: String::new(),
                })?;
            if take.granted {
                let how = if take.already {
                    "holds its token"
                } else {
                    "took a token"
                };
                return Ok(JobOutput {
                    exit_code: None,
                    output: format!(
                        "{how} from bucket {:?}; {} left",
                        args.bucket, take.tokens_left
                    ),
                });
            }
            if now >= deadline {
                return Err(ActionError::Fatal {
                    message: format!(
                        "rate limit: bucket {:?} has no token (next one at {}); waited {}",
                        args.bucket,
                        take.next_token_at,
                        domain::HumanDuration(std::time::Duration::from_millis(
                            u64::try_from(now.0 - started.0).unwrap_or(0)
                        ))
                    ),
                    output: String::new(),
                });
            }
            let until = take.next_token_at.min(deadline);
            let nap = std::time::Duration::from_millis(
                u64::try_from((until.0 - now.0).max(1)).unwrap_or(1),
            );
            tokio::select! {
                () = tokio::time::sleep(nap) => {}
                () = ctx.cancel.cancelled() => return Err(ActionError::Cancelled { output: String::new() }),
            }
        }
    }

    /// One job, with its retries; returns without committing its outcome.
    async fn run_job(
        &self,
        key: JobKey,
        call: &ActionCall,
        spec: &JobSpec,
        prior_attempts: u32,
    ) -> JobResult {
        let outcome = self.attempts(key, call, spec, prior_attempts).await;
        // The attempt's start, if still held, goes with its outcome; older held starts of
        // other jobs are queued now, ahead of it.
        let (earlier, started) = self.take_held_through(key);
        if !earlier.is_empty() {
            self.inner.store.apply_nowait(self.node(), self.id, earlier);
        }
        JobResult {
            key,
            outcome,
            started,
        }
    }

    async fn attempts(
        &self,
        key: JobKey,
        call: &ActionCall,
        spec: &JobSpec,
        prior_attempts: u32,
    ) -> Outcome {
        let inner = self.inner;
        let retry = spec.retry.clone().unwrap_or_default();
        let idempotency_key = key.idempotency_key(self.id);
        let mut attempt = prior_attempts;
        // Attempts made before a restart count against the retry budget, but the job always
        // gets one more: the last of them may have been cut short by the crash, not failed.
        let used = prior_attempts.min(retry.attempts.saturating_sub(1));
        let mut failed = 0u32;
        let mut not_started_backoff = NOT_STARTED_BACKOFF_FIRST;
        loop {
            let permit = tokio::select! {
                p = inner.job_slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return Outcome::NotStarted,
                },
                () = self.token.cancelled() => return if failed == 0 { Outcome::NotStarted } else { Outcome::Cancelled { output: String::new() } },
                () = inner.no_new_jobs.cancelled() => return if failed == 0 { Outcome::NotStarted } else { Outcome::Cancelled { output: String::new() } },
            };
            // Nothing new starts while the store refuses writes: its start and its outcome
            // could not be recorded.
            if inner.store_problem.borrow().is_some() {
                drop(permit);
                tokio::select! {
                    () = inner.store_writable() => continue,
                    () = self.token.cancelled() => {}
                    () = inner.no_new_jobs.cancelled() => {}
                }
                return if failed == 0 {
                    Outcome::NotStarted
                } else {
                    Outcome::Cancelled {
                        output: String::new(),
                    }
                };
            }
            // Checked before every dispatch, not only at run start.
            if inner.no_new_jobs.is_cancelled()
                || self.token.is_cancelled()
                || self.gate() != EStopState::Go
            {
                return if failed == 0 {
                    Outcome::NotStarted
                } else {
                    Outcome::Cancelled {
                        output: String::new(),
                    }
                };
            }
            attempt += 1;
            let at = inner.now();
            let mut ts = Vec::with_capacity(2);
            let first_start = !self.marked_running.swap(true, Ordering::SeqCst);
            if first_start {
                ts.push(Transition::RunRunning { at });
            }
            ts.push(Transition::JobStarted { key, attempt, at });
            // The start is not waited for (a crash may lose it either way). Held a moment, it
            // goes with the outcome of an attempt that ends at once: one write, not two.
            self.hold(key, ts);
            let mut holding = true;
            if first_start {
                inner.emit(self.id, RunState::Running);
                if let Some(created) = self.created_at.get() {
                    inner.metrics.run_started(std::time::Duration::from_millis(
                        u64::try_from(at.0 - created.0).unwrap_or(0),
                    ));
                }
            }
            crash_point!("engine::job_started");
            // Exported, the attempt is a span of the run's trace, under the run span. (Lines
            // written inside the attempt carry its job key through the `job` span that
            // `ActionCall::run` makes, and the run's fields through the run span.)
            let mut job_span = crate::otel::job_span(
                self.id,
                self.span_id,
                idempotency_key.as_str(),
                call.action(),
                attempt,
            );
            let ctx = JobContext {
                run_id: self.id,
                idempotency_key: idempotency_key.clone(),
                attempt,
                cancel: self.token.child_token(),
                kill_grace: inner.opts.kill_grace,
                output_limit: inner.opts.output_limit,
                supervisor: inner.opts.supervisor.clone(),
                guardrails: inner.opts.guardrails.clone(),
                run_as: inner.run_as_for(self.ident.get().map_or("", |(name, _)| name)),
                traceparent: Some(crate::otel::traceparent(&job_span, self.id)),
            };
            let mut timed_out = false;
            let began = std::time::Instant::now();
            let result = {
                let fut = self.run_call(call, &ctx);
                tokio::pin!(fut);
                let timeout = async {
                    match spec.timeout {
                        Some(t) => tokio::time::sleep(t.0).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::pin!(timeout);
                // A test may hold starts longer (`engine::start_held=return(MS)`).
                let record = tokio::time::sleep(
                    crate::failpoints::pause("engine::start_held").unwrap_or(START_RECORD_WAIT),
                );
                tokio::pin!(record);
                loop {
                    tokio::select! {
                        biased;
                        r = &mut fut => break r,
                        () = &mut timeout => {
                            timed_out = true;
                            ctx.cancel.cancel();
                            break fut.await;
                        }
                        () = &mut record, if holding => {
                            self.record_start(key);
                            holding = false;
                        }
                    }
                }
            };
            drop(permit);
            match &result {
                Ok(_) => {}
                Err(ActionError::Failed { message, .. } | ActionError::Fatal { message, .. }) => {
                    job_span.fail(message);
                }
                Err(ActionError::Cancelled { .. }) if timed_out => job_span.fail("timed out"),
                Err(ActionError::Cancelled { .. }) => job_span.fail("cancelled"),
                Err(ActionError::NotStarted { message }) => job_span.fail(message),
            }
            drop(job_span);
            if !matches!(result, Err(ActionError::NotStarted { .. })) {
                let failed = timed_out
                    || matches!(
                        result,
                        Err(ActionError::Failed { .. } | ActionError::Fatal { .. })
                    );
                inner.metrics.job_started(call.action());
                inner
                    .metrics
                    .job_ended(call.action(), began.elapsed(), failed);
            }
            let (error, exit_code, output) = match result {
                Ok(out) => return Outcome::Completed(out),
                Err(ActionError::NotStarted { message }) => {
                    // Nothing ran: the next try is the same attempt.
                    self.record_start(key);
                    attempt -= 1;
                    tracing::warn!(job = %idempotency_key, %message, retry_in = ?not_started_backoff, "the job could not be started on this node; trying again");
                    tokio::select! {
                        () = tokio::time::sleep(not_started_backoff) => {}
                        () = self.token.cancelled() => return Outcome::NotStarted,
                        () = inner.no_new_jobs.cancelled() => return Outcome::NotStarted,
                    }
                    not_started_backoff = (not_started_backoff * 2).min(NOT_STARTED_BACKOFF_MAX);
                    continue;
                }
                Err(ActionError::Cancelled { output }) if timed_out => {
                    let t = spec.timeout.map(|t| t.to_string()).unwrap_or_default();
                    (format!("timed out after {t}"), None, output)
                }
                Err(ActionError::Cancelled { output }) => return Outcome::Cancelled { output },
                Err(ActionError::Fatal { message, output }) => {
                    return Outcome::Failed {
                        error: message,
                        exit_code: None,
                        output,
                    };
                }
                Err(ActionError::Failed {
                    message,
                    exit_code,
                    output,
                }) => (message, exit_code, output),
            };
            failed += 1;
            if used + failed >= retry.attempts {
                let error = if retry.attempts > 1 {
                    format!("{error} (attempt {} of {})", used + failed, retry.attempts)
                } else {
                    error
                };
                return Outcome::Failed {
                    error,
                    exit_code,
                    output,
                };
            }
            self.record_start(key);
            let backoff = retry.backoff_before(used + failed + 1);
            tracing::info!(job = %idempotency_key, attempt, %error, backoff = ?backoff, "job attempt failed; retrying");
            self.span_event("job attempt failed; retrying", || {
                vec![
                    ("job", idempotency_key.to_string().into()),
                    ("attempt", attempt.into()),
                    ("error", error.clone().into()),
                ]
            });
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.token.cancelled() => return Outcome::Cancelled { output },
                () = inner.no_new_jobs.cancelled() => return Outcome::Cancelled { output },
            }
        }
    }

    /// Holds an attempt's start ([`Driver::held`]).
    fn hold(&self, key: JobKey, ts: Vec<Transition>) {
        match self.held.lock() {
            Ok(mut held) => held.push((key, ts)),
            Err(_) => self.inner.store.apply_nowait(self.node(), self.id, ts),
        }
    }

    /// Takes every held start, oldest first.
    fn take_held_all(&self) -> Vec<Transition> {
        self.held.lock().map_or_else(
            |_| Vec::new(),
            |mut held| held.drain(..).flat_map(|(_, ts)| ts).collect(),
        )
    }

    /// Takes `key`'s held start and those older than it: (the older ones, oldest first;
    /// `key`'s). Both are empty when `key`'s start is not held.
    fn take_held_through(&self, key: JobKey) -> (Vec<Transition>, Vec<Transition>) {
        let Ok(mut held) = self.held.lock() else {
            return (Vec::new(), Vec::new());
        };
        let Some(at) = held.iter().position(|(h, _)| *h == key) else {
            return (Vec::new(), Vec::new());
        };
        let mut taken = held.drain(..=at);
        let older = taken.by_ref().take(at).flat_map(|(_, ts)| ts).collect();
        let own = taken.next().map(|(_, ts)| ts).unwrap_or_default();
        (older, own)
    }

    /// Queues an attempt's start ([`START_RECORD_WAIT`]), and the older ones held, if it is
    /// still held.
    fn record_start(&self, key: JobKey) {
        let (mut ts, own) = self.take_held_through(key);
        ts.extend(own);
        if !ts.is_empty() {
            self.inner.store.apply_nowait(self.node(), self.id, ts);
        }
    }

    /// Commits `ts` durably. A store that refuses the write (a full disk, a lost database)
    /// does not lose it: the write is retried with backoff until the store takes it, while
    /// the jobs still in flight are awaited (their outcomes kept in `stash` for the next
    /// commit) and still hear a cancel. It gives up only when the run is halted and nothing
    /// is in flight any more, or the engine stops: the run then resumes from what the store
    /// holds, on this node or another.
    async fn commit<F>(
        &self,
        ts: Vec<Transition>,
        in_flight: &mut FuturesUnordered<F>,
        stash: &mut Vec<JobResult>,
    ) -> store::Result<()>
    where
        F: std::future::Future<Output = JobResult>,
    {
        let mut backoff = COMMIT_BACKOFF_FIRST;
        loop {
            let began = std::time::Instant::now();
            let error = match self
                .inner
                .store
                .apply(self.node(), self.id, ts.clone())
                .await
            {
                Ok(()) => {
                    self.inner.metrics.committed(began.elapsed());
                    self.inner.store_recovered();
                    return Ok(());
                }
                Err(
                    e @ (store::Error::LeaseLost { .. }
                    | store::Error::Closed
                    | store::Error::NotFound(_)),
                ) => return Err(e),
                Err(e) => e,
            };
            self.inner.store_failed(&error);
            if self.inner.token.is_cancelled()
                || (self.token.is_cancelled() && in_flight.is_empty())
            {
                tracing::error!(%error, "the store refuses the run's progress and the run is stopping: it resumes from what the store holds");
                return Err(error);
            }
            tracing::warn!(%error, retry_in = ?backoff, "committing the run's progress failed; keeping it and trying again");
            let nap = tokio::time::sleep(backoff);
            tokio::pin!(nap);
            loop {
                tokio::select! {
                    () = &mut nap => break,
                    Some(r) = in_flight.next(), if !in_flight.is_empty() => stash.push(r),
                    () = self.token.cancelled(), if !self.token.is_cancelled() => break,
                    () = self.inner.token.cancelled() => break,
                }
            }
            backoff = (backoff * 2).min(COMMIT_BACKOFF_MAX);
        }
    }

    /// [`Driver::commit`] with no jobs in flight.
    async fn commit_alone(&self, ts: Vec<Transition>) -> store::Result<()> {
        let mut none = FuturesUnordered::<std::future::Ready<JobResult>>::new();
        let mut stash = Vec::new();
        self.commit(ts, &mut none, &mut stash).await
    }

    /// What an in-flight job that was cancelled becomes, given why.
    fn cancelled_job(&self, key: JobKey, at: domain::Timestamp, output: String) -> Transition {
        let halt = self.halt.lock().ok().and_then(|h| h.clone());
        match halt {
            Some(Halt::End { state, cause }) => Transition::JobFinished {
                key,
                state: if state == RunState::Stopped {
                    JobState::Stopped
                } else {
                    JobState::Cancelled
                },
                at,
                error: Some(cause.to_string()),
                exit_code: None,
                output,
            },
            Some(Halt::Interrupt { cause }) => Transition::JobInterrupted {
                key,
                error: format!("interrupted: {cause}"),
            },
            _ => Transition::JobInterrupted {
                key,
                error: format!("interrupted: {}", self.shutdown_cause()),
            },
        }
    }

    fn shutdown_cause(&self) -> StopCause {
        self.inner
            .shutdown_cause
            .lock()
            .ok()
            .and_then(|c| c.clone())
            .unwrap_or(StopCause::Fatal {
                component: "engine".into(),
                message: "stopped".into(),
            })
    }

    /// The block loop ended early: act on the halt (or the shutdown).
    /// Whether the run, once nothing of it runs, ends (stopped, cancelled) rather than pauses
    /// for a resume.
    fn ending(&self) -> bool {
        self.token.is_cancelled()
            && self
                .halt
                .lock()
                .is_ok_and(|h| matches!(*h, Some(Halt::End { .. })))
    }

    /// Ends, interrupts or lets go of the run, recording `pending` (its block's last job
    /// outcomes) first, or with its end.
    async fn halted(&self, pending: Vec<Transition>) -> store::Result<()> {
        let halt = self.halt.lock().ok().and_then(|h| h.clone());
        if let Some(Halt::End { state, cause }) = halt {
            return self
                .finish(state, Some(cause.to_string()), Some(cause), pending)
                .await;
        }
        if !pending.is_empty() {
            self.commit_alone(pending).await?;
        }
        match halt {
            Some(Halt::Abandon) => Ok(()),
            _ => self.interrupt().await,
        }
    }

    async fn end(&self, state: RunState, cause: StopCause) -> store::Result<()> {
        self.finish(state, Some(cause.to_string()), Some(cause), vec![])
            .await
    }

    async fn finish(
        &self,
        state: RunState,
        error: Option<String>,
        stop_cause: Option<StopCause>,
        mut ts: Vec<Transition>,
    ) -> store::Result<()> {
        let at = self.inner.now();
        let cause = stop_cause.as_ref().map(ToString::to_string);
        ts.push(Transition::RunFinished {
            state,
            at,
            error,
            stop_cause,
        });
        self.commit_alone(ts).await?;
        self.finished(state);
        self.span_event("run finished", || {
            let mut attrs = vec![("state", state.as_str().into())];
            if let Some(cause) = &cause {
                attrs.push(("cause", cause.to_string().into()));
            }
            attrs
        });
        match cause {
            Some(cause) => tracing::info!(%state, %cause, "run finished"),
            None => tracing::info!(%state, "run finished"),
        }
        Ok(())
    }

    /// Tells watchers, and counts, that the run ended in `state`.
    fn finished(&self, state: RunState) {
        self.inner.emit(self.id, state);
        let name = self.ident.get().map_or("", |(name, _)| name.as_str());
        self.inner.metrics.run_finished(name, state);
    }

    /// Leaves the run unfinished, for this or another node to resume.
    async fn interrupt(&self) -> store::Result<()> {
        if !self.marked_running.load(Ordering::SeqCst) {
            // Never started a job: leave it queued, untouched, for any node to take.
            return self.inner.store.release(self.node(), self.id).await;
        }
        let cause = match self.halt.lock().ok().and_then(|h| h.clone()) {
            Some(Halt::Interrupt { cause }) => cause,
            _ => self.shutdown_cause(),
        };
        tracing::info!(%cause, "run interrupted; it resumes at its first unfinished job");
        self.span_event("run interrupted", || {
            vec![("cause", cause.to_string().into())]
        });
        self.commit_alone(vec![Transition::RunInterrupted { cause }])
            .await?;
        self.inner.store.release(self.node(), self.id).await
    }
}

fn job_error(bi: usize, ji: usize, desc: &str, error: Option<&str>) -> String {
    let what = if desc.is_empty() {
        String::new()
    } else {
        format!(" ({desc})")
    };
    format!(
        "blocks[{bi}].jobs[{ji}]{what} failed: {}",
        error.unwrap_or("unknown error")
    )
}
