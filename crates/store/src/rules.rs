//! The run-state rules every backend applies, as pure decisions: a backend reads the row,
//! asks here what to do, and writes what it is told. Written once, so the backends cannot
//! drift apart on what Exec, Cancel or expiry mean.

use domain::{RunId, RunState, StopCause, Timestamp};

use crate::LeaseRenewal;

/// What Exec does to a run, given what is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecDecision {
    /// Not `submitted` any more: nothing changes; answer with its state.
    AlreadyStarted(RunState),
    /// Its submit TTL has passed: it becomes `expired` with this cause.
    Expire(StopCause),
    /// It becomes `queued`, leased to the caller.
    Queue,
}

/// Exec of a run stored in `state`, created at `created_at` and expiring at `expires_at`.
pub fn exec(
    state: RunState,
    expires_at: Option<i64>,
    created_at: i64,
    now: Timestamp,
) -> ExecDecision {
    if state != RunState::Submitted {
        return ExecDecision::AlreadyStarted(state);
    }
    match expires_at {
        Some(e) if e <= now.0 => ExecDecision::Expire(expired(e, created_at)),
        _ => ExecDecision::Queue,
    }
}

/// What Cancel does to a run, given its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelDecision {
    /// Already finished: nothing changes.
    AlreadyFinished(RunState),
    /// Never executed: it ends `cancelled` at once, its blocks and jobs `skipped`.
    CancelNow,
    /// Executing: the request is recorded (the first one wins) for the node that drives it.
    Request,
}

pub fn cancel(state: RunState) -> CancelDecision {
    if state.is_terminal() {
        CancelDecision::AlreadyFinished(state)
    } else if state == RunState::Submitted {
        CancelDecision::CancelNow
    } else {
        CancelDecision::Request
    }
}

/// The stop cause of a run that expired: its TTL, from when it was created to when it expired
/// (both in milliseconds).
pub fn expired(expires_at: i64, created_at: i64) -> StopCause {
    StopCause::Expired {
        ttl_secs: u64::try_from(expires_at.saturating_sub(created_at) / 1000).unwrap_or(0),
    }
}

/// What a lease renewal tells the node: `leased` are the executing runs still leased to it,
/// each with the cancel asked of it if any; `held` the runs it believed it held.
pub fn renewal(leased: Vec<(RunId, Option<StopCause>)>, held: &[RunId]) -> LeaseRenewal {
    let ours: std::collections::HashSet<RunId> = leased.iter().map(|(id, _)| *id).collect();
    LeaseRenewal {
        cancel_requested: leased
            .into_iter()
            .filter_map(|(id, cause)| cause.map(|c| (id, c)))
            .collect(),
        lost: held
            .iter()
            .filter(|id| !ours.contains(id))
            .copied()
            .collect(),
    }
}

/// The version an e-stop save stores, found the list at `current` when it expected
/// `expected`: the next one, or a conflict when someone saved in between.
pub fn estop_next_version(current: i64, expected: i64) -> crate::Result<i64> {
    if current == expected {
        Ok(current + 1)
    } else {
        Err(crate::Error::Conflict(format!(
            "the e-stop list is at version {current}, not {expected}: it changed since it was read"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_queues_a_submitted_run_once_and_expires_a_late_one() {
        let now = Timestamp(10_000);
        assert_eq!(
            exec(RunState::Submitted, Some(20_000), 0, now),
            ExecDecision::Queue
        );
        assert_eq!(exec(RunState::Submitted, None, 0, now), ExecDecision::Queue);
        assert_eq!(
            exec(RunState::Submitted, Some(10_000), 4_000, now),
            ExecDecision::Expire(StopCause::Expired { ttl_secs: 6 })
        );
        assert_eq!(
            exec(RunState::Running, Some(0), 0, now),
            ExecDecision::AlreadyStarted(RunState::Running)
        );
    }

    #[test]
    fn cancel_by_state() {
        assert_eq!(cancel(RunState::Submitted), CancelDecision::CancelNow);
        assert_eq!(cancel(RunState::Paused), CancelDecision::Request);
        assert_eq!(
            cancel(RunState::Completed),
            CancelDecision::AlreadyFinished(RunState::Completed)
        );
        assert_eq!(expired(5_000, 9_000), StopCause::Expired { ttl_secs: 0 });
    }
}
