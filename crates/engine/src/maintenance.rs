//! Recovery at start, the background loops (leases, orphans, expiry), and shutdown.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use domain::{RunId, RunState, StopCause};
use tokio::time::Instant;

use crate::driver::spawn_run;
use crate::{Halt, Inner, ShutdownMode};

/// How often a shutdown that waits for in-flight work says so.
const REPORT_EVERY: Duration = Duration::from_secs(5);

/// How often the store is probed while it refuses writes.
const STORE_PROBE: Duration = Duration::from_secs(1);

pub(crate) fn start(inner: &Arc<Inner>) {
    let i = inner.clone();
    inner.tracker.spawn(async move { recover(&i).await });
    let i = inner.clone();
    inner
        .loops
        .spawn_component("lease renewal", async move { renew_loop(&i).await });
    let i = inner.clone();
    inner
        .loops
        .spawn_component("orphan claims", async move { claim_loop(&i).await });
    let i = inner.clone();
    inner
        .loops
        .spawn_component("expiry", async move { expire_loop(&i).await });
}

/// Resumes every unfinished run this node held before it stopped (or crashed).
async fn recover(inner: &Arc<Inner>) {
    let started = Instant::now();
    let until = inner.now().plus(inner.opts.lease_ttl);
    match inner
        .store
        .recover(&inner.opts.node_id, until, u32::MAX)
        .await
    {
        Ok(ids) => {
            let n = ids.len();
            for id in ids {
                spawn_run(inner, id);
            }
            if n > 0 {
                tracing::info!(runs = n, elapsed = ?started.elapsed(), "resuming unfinished runs");
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "recovering unfinished runs failed; the orphan claimer retries")
        }
    }
    // Runs a drain released (and runs of dead nodes) need not wait for the first claim tick.
    loop {
        let now = inner.now();
        match inner
            .store
            .claim_orphans(
                &inner.opts.node_id,
                now,
                now.plus(inner.opts.lease_ttl),
                10_000,
            )
            .await
        {
            Ok(ids) if ids.is_empty() => break,
            Ok(ids) => {
                tracing::info!(runs = ids.len(), elapsed = ?started.elapsed(), "resuming runs with no live lease");
                for id in ids {
                    spawn_run(inner, id);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming runs with no live lease failed; the claim loop retries");
                break;
            }
        }
    }
}

/// Waits `period`, or returns false when the engine stops.
async fn tick(inner: &Inner, period: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(period) => true,
        () = inner.token.cancelled() => false,
    }
}

fn held_runs(inner: &Inner) -> Vec<RunId> {
    inner
        .active
        .lock()
        .map(|a| a.keys().copied().collect())
        .unwrap_or_default()
}

async fn renew_loop(inner: &Arc<Inner>) {
    let normal = (inner.opts.lease_ttl / 3).max(Duration::from_millis(100));
    // Every lease this node holds runs at least to `lease_ttl` after the last renewal.
    let mut renewed = Instant::now();
    let mut lost = false;
    loop {
        // A renewal is a write: while the store refuses writes it is also the probe that
        // finds it taking them again, so it comes sooner.
        let period = if inner.store_problem.borrow().is_some() {
            normal.min(STORE_PROBE)
        } else {
            normal
        };
        if !tick(inner, period).await {
            break;
        }
        let held = held_runs(inner);
        // A window for tests: runs that end between the snapshot and the renewal.
        if let Some(pause) = crate::failpoints::pause("engine::renew_after_snapshot") {
            tokio::time::sleep(pause).await;
        }
        let until = inner.now().plus(inner.opts.lease_ttl);
        match inner
            .store
            .renew_leases(&inner.opts.node_id, &held, until)
            .await
        {
            Ok(renewal) => {
                renewed = Instant::now();
                inner.store_recovered();
                for (id, cause) in renewal.cancel_requested {
                    inner.halt_run(
                        id,
                        Halt::End {
                            state: RunState::Cancelled,
                            cause,
                        },
                    );
                }
                for id in renewal.lost {
                    lost_lease(inner, id).await;
                }
            }
            Err(e) => {
                if !matches!(e, store::Error::Closed) {
                    inner.store_failed(&e);
                }
                tracing::warn!(error = %e, "renewing leases failed; retrying");
                let unrenewed = renewed.elapsed();
                if inner.opts.shared_store && !lost && unrenewed >= inner.opts.lease_ttl {
                    // Other nodes may take over this node's runs now: driving them on could
                    // run a job twice.
                    lost = true;
                    let message = format!(
                        "no lease renewal for {:.1} s (lease_ttl {:.1} s): {e}",
                        unrenewed.as_secs_f64(),
                        inner.opts.lease_ttl.as_secs_f64()
                    );
                    tracing::error!(%message, "the leases lapsed: this node stops driving its runs");
                    inner.loops.report(StopCause::LostStore { message });
                }
            }
        }
    }
}

/// A renewal did not extend `id`'s lease. Most often the run just ended on this node (its
/// lease is released with its last write) after the list of held runs was taken: that is no
/// loss. Only a run that another node holds now is reported as lost.
async fn lost_lease(inner: &Inner, id: RunId) {
    let me = &inner.opts.node_id;
    match inner.store.get(id).await {
        Ok(run) if run.state.is_terminal() => {
            tracing::debug!(run_id = %id, state = %run.state, "run ended while its lease was renewed");
        }
        Ok(run) => match &run.lease_owner {
            Some(owner) if owner == me => {
                tracing::debug!(run_id = %id, "lease still held after all; renewed on the next tick");
            }
            Some(owner) => {
                tracing::warn!(run_id = %id, other_node = %owner.0, "lease lost to another node; letting go of the run");
                inner.halt_run(id, Halt::Abandon);
            }
            None => {
                tracing::info!(run_id = %id, state = %run.state, "the run is no longer leased to this node; letting go");
                inner.halt_run(id, Halt::Abandon);
            }
        },
        Err(store::Error::NotFound(_)) => {
            tracing::info!(run_id = %id, "the run is gone from the store; letting go");
            inner.halt_run(id, Halt::Abandon);
        }
        Err(e) => {
            tracing::warn!(run_id = %id, error = %e, "cannot tell whether the lease was lost; renewing on the next tick");
        }
    }
}

async fn claim_loop(inner: &Arc<Inner>) {
    while tick(inner, inner.opts.claim_interval).await {
        // A node that is stopping (drain or end of round) takes on no more runs.
        if inner.no_new_jobs.is_cancelled() || inner.no_new_blocks.is_cancelled() {
            inner.token.cancelled().await;
            return;
        }
        let now = inner.now();
        let until = now.plus(inner.opts.lease_ttl);
        match inner
            .store
            .claim_orphans(&inner.opts.node_id, now, until, 1000)
            .await
        {
            Ok(ids) => {
                if !ids.is_empty() {
                    tracing::info!(runs = ids.len(), "claimed runs with no live lease");
                }
                for id in ids {
                    spawn_run(inner, id);
                }
            }
            Err(e) => tracing::warn!(error = %e, "claiming orphaned runs failed; retrying"),
        }
        // Runs leased to this node that no task drives: their task gave up on a store error
        // (a lost connection, say). Their leases are renewed with the others', so no node
        // would claim them: drive them again, from their first unfinished job.
        match inner.store.recover(&inner.opts.node_id, until, 1000).await {
            Ok(ids) => {
                let held = held_runs(inner);
                let undriven: Vec<RunId> =
                    ids.into_iter().filter(|id| !held.contains(id)).collect();
                if !undriven.is_empty() {
                    tracing::info!(
                        runs = undriven.len(),
                        "resuming runs of this node that stopped on a store error"
                    );
                }
                for id in undriven {
                    spawn_run(inner, id);
                }
            }
            Err(e) => tracing::warn!(error = %e, "looking for undriven runs failed; retrying"),
        }
    }
}

async fn expire_loop(inner: &Arc<Inner>) {
    while tick(inner, inner.opts.expire_interval).await {
        match inner.store.expire_submitted(inner.now()).await {
            Ok(ids) => {
                for id in ids {
                    tracing::info!(run_id = %id, "run expired: never executed within the submit TTL");
                    inner.emit(id, RunState::Expired);
                }
            }
            Err(e) => tracing::warn!(error = %e, "expiring submitted runs failed; retrying"),
        }
    }
}

fn record_cause(inner: &Inner, cause: StopCause) {
    if let Ok(mut c) = inner.shutdown_cause.lock()
        && c.is_none()
    {
        tracing::info!(%cause, kind = cause.kind(), "shutdown begins");
        *c = Some(cause);
    }
    inner.accepting.store(false, Ordering::SeqCst);
}

fn is_now(cause: &StopCause) -> bool {
    matches!(
        cause,
        StopCause::Signal {
            mode: ShutdownMode::Now,
            ..
        } | StopCause::StopCommand {
            mode: ShutdownMode::Now
        }
    )
}

fn interrupt_all(inner: &Inner, cause: &StopCause) {
    for id in held_runs(inner) {
        inner.halt_run(
            id,
            Halt::Interrupt {
                cause: cause.clone(),
            },
        );
    }
}

pub(crate) fn stop_now(inner: &Inner, cause: StopCause) {
    // A `now` that escalates a drain or an end of round asked for by a signal or `steward
    // stop` decides how the process stops: it replaces that first cause. Any other first
    // cause (a fatal error, a lost store) stays: it is why the process stops.
    if let Ok(mut c) = inner.shutdown_cause.lock()
        && c.as_ref().is_some_and(|c| {
            matches!(c, StopCause::Signal { .. } | StopCause::StopCommand { .. }) && !is_now(c)
        })
    {
        tracing::info!(%cause, kind = cause.kind(), "shutdown escalated");
        *c = Some(cause.clone());
    }
    record_cause(inner, cause.clone());
    inner.no_new_jobs.cancel();
    inner.no_new_blocks.cancel();
    interrupt_all(inner, &cause);
}

pub(crate) async fn shutdown(
    inner: &Arc<Inner>,
    mode: ShutdownMode,
    cause: StopCause,
    grace: Duration,
) {
    record_cause(inner, cause.clone());
    match mode {
        ShutdownMode::Now => stop_now(inner, cause.clone()),
        ShutdownMode::Drain => {
            inner.no_new_jobs.cancel();
            inner.no_new_blocks.cancel();
        }
        ShutdownMode::EndOfRound => inner.no_new_blocks.cancel(),
    }
    let started = Instant::now();
    let deadline = (mode == ShutdownMode::Drain).then(|| started + grace);
    let mut last_report = started;
    let mut escalated = mode == ShutdownMode::Now;
    loop {
        // Armed before the check, so that a run ending in between is not missed.
        let ended = inner.run_ended.notified();
        tokio::pin!(ended);
        ended.as_mut().enable();
        let active = held_runs(inner);
        if active.is_empty() {
            break;
        }
        let now = Instant::now();
        if !escalated && deadline.is_some_and(|d| now >= d) {
            tracing::warn!(runs = active.len(), grace = ?grace, "grace period over; interrupting in-flight jobs");
            interrupt_all(inner, &cause);
            escalated = true;
        }
        if now.duration_since(last_report) >= REPORT_EVERY {
            let running_jobs = inner
                .opts
                .max_running_jobs
                .max(1)
                .saturating_sub(inner.job_slots.available_permits());
            tracing::info!(runs = active.len(), running_jobs, waited = ?now.duration_since(started), "still waiting for in-flight work");
            last_report = now;
        }
        let mut wake = last_report + REPORT_EVERY;
        if let (false, Some(d)) = (escalated, deadline) {
            wake = wake.min(d);
        }
        tokio::select! {
            () = &mut ended => {}
            () = tokio::time::sleep_until(wake) => {}
        }
    }
    inner.token.cancel();
    inner.tracker.close();
    inner.tracker.wait().await;
    tracing::info!(elapsed = ?started.elapsed(), "engine stopped");
}
