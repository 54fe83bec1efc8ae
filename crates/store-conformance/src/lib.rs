//! The conformance suite of the storage contract: every backend passes every case, each on a
//! fresh, empty store. A backend's test binary declares one test per case with
//! [`conformance_tests!`], so a failing case never hides the others:
//!
//! ```ignore
//! // Each factory returns (what keeps the store's resources alive, the store).
//! store_conformance::conformance_tests! {
//!     runs: fixture::runs,
//!     estop: fixture::estop,
//!     buckets: fixture::buckets,
//!     auth: fixture::auth,
//!     whole: fixture::whole, // the store itself, with every trait
//! }
//! ```
//!
//! Used only by tests (a dev-dependency of each backend).

#![allow(clippy::unwrap_used)] // test code: a failed step should panic with its location

use std::collections::BTreeMap;
use std::sync::Arc;

use domain::estop::{AuditRecord, EStopList, EStopState, Entry, Target};
use domain::{JobKey, JobState, NodeId, RunId, RunState, StopCause, Timestamp, WorkflowSpec};

use domain::schedule::{LastRun, ScheduleRecord, ScheduleSpec, ScheduleState};
use store::{
    CancelOutcome, EStopStore, Error, ExecOutcome, NewRun, RunFilter, RunStore, ScheduleStore,
    StartedRun, Submitted, Transition,
};

/// One `#[tokio::test]` per conformance case. `runs`, `estop`, `buckets` and `auth` name async
/// functions that return `(guard, store)`: a fresh, empty store, and whatever must live as
/// long as the test does (a temporary directory, a database server).
#[macro_export]
macro_rules! conformance_tests {
    (runs: $runs:path, estop: $estop:path, buckets: $buckets:path, auth: $auth:path,
     whole: $whole:path $(,)?) => {
        $crate::conformance_tests!(@cases $runs;
            submit_stores_a_pending_run,
            idempotency_key_returns_the_first_run,
            exec_moves_submitted_to_queued_once,
            submit_started_stores_a_queued_leased_run_once,
            exec_after_ttl_expires,
            expire_sweeps_only_due_runs,
            cancel_by_state,
            transitions_record_progress,
            run_finished_settles_leftovers,
            leases_fence_writes,
            a_fenced_write_leaves_the_others_of_its_batch,
            recover_and_claim,
            renew_reports_cancel_and_lost,
            list_filters_and_pages,
            count_by_state_counts_every_run_once,
            nowait_writes_land_before_the_next_awaited_write,
            unknown_runs_are_not_found,
        );
        $crate::conformance_tests!(@cases $estop;
            estop_starts_empty_at_version_zero,
            estop_save_replaces_the_list_and_appends_audit,
            estop_save_with_a_stale_version_conflicts_and_stores_nothing,
            estop_concurrent_saves_one_wins,
            audit_lists_newest_first_by_target_with_limit,
        );
        $crate::conformance_tests!(@cases $buckets;
            buckets_grant_once_per_key_and_refill,
        );
        $crate::conformance_tests!(@cases $auth;
            tokens_are_found_by_hash_listed_by_name_and_revoked,
            access_log_lists_newest_first_with_limit,
        );
        $crate::conformance_tests!(@cases $whole;
            schedules_are_created_once_and_written_over_their_version,
            a_fire_stores_its_run_with_the_schedule_change_or_nothing,
            due_schedules_come_soonest_first,
            prune_deletes_finished_runs_past_the_cutoff_of_their_workflows,
            paging_returns_no_run_twice_while_runs_are_added_and_pruned,
            audit_prune_deletes_only_old_records,
        );
    };
    (@cases $make:path; $($case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (_guard, store) = $make().await;
                $crate::$case(store).await;
            }
        )*
    };
}

const T0: Timestamp = Timestamp(1_800_000_000_000);
const HOUR: i64 = 3_600_000;

fn node(n: &str) -> NodeId {
    NodeId(n.to_owned())
}

/// A spec with `jobs` jobs in each of `blocks` blocks.
pub fn spec(name: &str, blocks: usize, jobs: usize) -> WorkflowSpec {
    let mut s = WorkflowSpec {
        name: name.to_owned(),
        ..Default::default()
    };
    for _ in 0..blocks {
        let mut b = domain::BlockSpec::default();
        for _ in 0..jobs {
            b.jobs.push(domain::JobSpec {
                action: "noop".into(),
                ..Default::default()
            });
        }
        s.blocks.push(b);
    }
    s
}

pub fn new_run(spec: WorkflowSpec) -> NewRun {
    NewRun {
        id: RunId::new_v7(),
        spec,
        created_at: T0,
        expires_at: Timestamp(T0.0 + HOUR),
        cloned_from: None,
        submitted_by: "ci".into(),
        schedule: None,
    }
}

pub async fn submit_stores_a_pending_run(s: Arc<dyn RunStore>) {
    let mut sp = spec("hello", 2, 3);
    sp.labels.insert("site".into(), "aap".into());
    let nr = new_run(sp.clone());
    let got = s.submit(nr.clone()).await.unwrap();
    assert!(got.created);
    assert_eq!(got.id, nr.id);
    let run = s.get(nr.id).await.unwrap();
    assert_eq!(run.state, RunState::Submitted);
    assert_eq!(run.spec, sp);
    assert_eq!(run.created_at, T0);
    assert_eq!(run.expires_at, Some(Timestamp(T0.0 + HOUR)));
    assert_eq!(run.submitted_by, "ci");
    assert_eq!(
        s.list(&RunFilter::default()).await.unwrap().runs[0].submitted_by,
        "ci"
    );
    assert_eq!(run.blocks.len(), 2);
    for b in &run.blocks {
        assert_eq!(b.state, JobState::Pending);
        assert_eq!(b.jobs.len(), 3);
        assert!(
            b.jobs
                .iter()
                .all(|j| j.state == JobState::Pending && j.attempts == 0)
        );
    }
    assert_eq!(run.lease_owner, None);
}

pub async fn idempotency_key_returns_the_first_run(s: Arc<dyn RunStore>) {
    let mut sp = spec("hello", 1, 1);
    sp.idempotency_key = Some("erase-aap-1".into());
    let first = s.submit(new_run(sp.clone())).await.unwrap();
    let again = s.submit(new_run(sp)).await.unwrap();
    assert_eq!(again.id, first.id);
    assert!(!again.created);
    let page = s.list(&RunFilter::default()).await.unwrap();
    assert_eq!(page.runs.len(), 1, "the second submit must store nothing");
}

pub async fn exec_moves_submitted_to_queued_once(s: Arc<dyn RunStore>) {
    let nr = new_run(spec("hello", 1, 1));
    s.submit(nr.clone()).await.unwrap();
    let until = Timestamp(T0.0 + 30_000);
    assert_eq!(
        s.exec(nr.id, &node("a"), T0, until).await.unwrap(),
        ExecOutcome::Queued
    );
    let run = s.get(nr.id).await.unwrap();
    assert_eq!(run.state, RunState::Queued);
    assert_eq!(run.lease_owner, Some(node("a")));
    assert_eq!(run.lease_expires_at, Some(until));
    assert_eq!(
        s.exec(nr.id, &node("b"), T0, until).await.unwrap(),
        ExecOutcome::AlreadyStarted(RunState::Queued)
    );
    assert_eq!(s.get(nr.id).await.unwrap().lease_owner, Some(node("a")));
}

pub async fn submit_started_stores_a_queued_leased_run_once(s: Arc<dyn RunStore>) {
    let mut sp = spec("hello", 2, 3);
    sp.labels.insert("site".into(), "aap".into());
    sp.idempotency_key = Some("erase-aap-2".into());
    let until = Timestamp(T0.0 + 30_000);
    let started = |sp: WorkflowSpec, n: &str| StartedRun {
        run: new_run(sp),
        node: node(n),
        lease_until: until,
    };
    let first = started(sp.clone(), "a");
    let got = s.submit_started(first.clone()).await.unwrap();
    assert_eq!(
        got,
        Submitted {
            id: first.run.id,
            created: true
        }
    );
    let run = s.get(got.id).await.unwrap();
    assert_eq!(run.state, RunState::Queued);
    assert_eq!(run.lease_owner, Some(node("a")));
    assert_eq!(run.lease_expires_at, Some(until));
    assert_eq!(run.spec, sp);
    assert_eq!(run.blocks.len(), 2);
    assert!(run.blocks.iter().all(|b| b.state == JobState::Pending
        && b.jobs.len() == 3
        && b.jobs.iter().all(|j| j.state == JobState::Pending)));
    let by_label = RunFilter {
        labels: [("site".to_owned(), "aap".to_owned())].into(),
        ..Default::default()
    };
    assert_eq!(s.list(&by_label).await.unwrap().runs.len(), 1);
    // Executing runs are what a node resumes.
    assert_eq!(
        s.recover(&node("a"), until, 10).await.unwrap(),
        vec![got.id]
    );
    // The same key again, from another node: the first run, as it is; nothing stored.
    let again = s.submit_started(started(sp.clone(), "b")).await.unwrap();
    assert_eq!(
        again,
        Submitted {
            id: got.id,
            created: false
        }
    );
    assert_eq!(s.get(got.id).await.unwrap().lease_owner, Some(node("a")));
    assert_eq!(
        s.list(&RunFilter::default()).await.unwrap().runs.len(),
        1,
        "the second call must store nothing"
    );
    // A key Submit stored without starting is answered as it is too: starting it is Exec's.
    let mut other = spec("hello", 1, 1);
    other.idempotency_key = Some("erase-aap-3".into());
    let submitted = s.submit(new_run(other.clone())).await.unwrap();
    let again = s.submit_started(started(other, "a")).await.unwrap();
    assert_eq!(again.id, submitted.id);
    assert!(!again.created);
    assert_eq!(s.get(again.id).await.unwrap().state, RunState::Submitted);
}

pub async fn exec_after_ttl_expires(s: Arc<dyn RunStore>) {
    let nr = new_run(spec("hello", 1, 2));
    s.submit(nr.clone()).await.unwrap();
    let late = Timestamp(T0.0 + HOUR);
    assert_eq!(
        s.exec(nr.id, &node("a"), late, late).await.unwrap(),
        ExecOutcome::Expired
    );
    let run = s.get(nr.id).await.unwrap();
    assert_eq!(run.state, RunState::Expired);
    assert_eq!(run.stop_cause, Some(StopCause::Expired { ttl_secs: 3600 }));
    assert!(
        run.blocks[0]
            .jobs
            .iter()
            .all(|j| j.state == JobState::Skipped)
    );
    assert_eq!(
        s.exec(nr.id, &node("a"), late, late).await.unwrap(),
        ExecOutcome::AlreadyStarted(RunState::Expired)
    );
}

pub async fn expire_sweeps_only_due_runs(s: Arc<dyn RunStore>) {
    let due = new_run(spec("hello", 1, 1));
    let mut fresh = new_run(spec("hello", 1, 1));
    fresh.expires_at = Timestamp(T0.0 + 2 * HOUR);
    s.submit(due.clone()).await.unwrap();
    s.submit(fresh.clone()).await.unwrap();
    let swept = s
        .expire_submitted(Timestamp(T0.0 + HOUR + 1))
        .await
        .unwrap();
    assert_eq!(swept, vec![due.id]);
    assert_eq!(s.get(due.id).await.unwrap().state, RunState::Expired);
    assert_eq!(s.get(fresh.id).await.unwrap().state, RunState::Submitted);
}

pub async fn cancel_by_state(s: Arc<dyn RunStore>) {
    let cause = StopCause::Cancelled {
        by: "ana".into(),
        reason: "wrong site".into(),
    };
    let idle = new_run(spec("hello", 1, 1));
    s.submit(idle.clone()).await.unwrap();
    assert_eq!(
        s.cancel(idle.id, cause.clone(), T0).await.unwrap(),
        CancelOutcome::Cancelled
    );
    let run = s.get(idle.id).await.unwrap();
    assert_eq!(run.state, RunState::Cancelled);
    assert_eq!(run.stop_cause, Some(cause.clone()));
    assert_eq!(
        s.cancel(idle.id, cause.clone(), T0).await.unwrap(),
        CancelOutcome::AlreadyFinished(RunState::Cancelled)
    );

    let busy = new_run(spec("hello", 1, 1));
    s.submit(busy.clone()).await.unwrap();
    s.exec(busy.id, &node("a"), T0, Timestamp(T0.0 + 1000))
        .await
        .unwrap();
    assert_eq!(
        s.cancel(busy.id, cause.clone(), T0).await.unwrap(),
        CancelOutcome::Requested {
            lease_owner: Some(node("a"))
        }
    );
    let run = s.get(busy.id).await.unwrap();
    assert_eq!(
        run.state,
        RunState::Queued,
        "the owning node carries the cancel out"
    );
    assert_eq!(run.cancel_requested, Some(cause));
}

pub async fn transitions_record_progress(s: Arc<dyn RunStore>) {
    let nr = new_run(spec("hello", 2, 2));
    let a = node("a");
    s.submit(nr.clone()).await.unwrap();
    s.exec(nr.id, &a, T0, Timestamp(T0.0 + 1000)).await.unwrap();
    let k = JobKey { block: 0, job: 1 };
    let t1 = Timestamp(T0.0 + 1);
    let t2 = Timestamp(T0.0 + 2);
    s.apply(
        &a,
        nr.id,
        vec![
            Transition::RunRunning { at: t1 },
            Transition::BlockStarted { block: 0, at: t1 },
            Transition::JobStarted {
                key: k,
                attempt: 1,
                at: t1,
            },
        ],
    )
    .await
    .unwrap();
    let run = s.get(nr.id).await.unwrap();
    assert_eq!(run.state, RunState::Running);
    assert_eq!(run.started_at, Some(t1));
    assert_eq!(run.blocks[0].state, JobState::Running);
    assert_eq!(run.blocks[0].jobs[1].state, JobState::Running);
    assert_eq!(run.blocks[0].jobs[1].attempts, 1);

    s.apply(
        &a,
        nr.id,
        vec![
            Transition::JobFinished {
                key: k,
                state: JobState::Failed,
                at: t2,
                error: Some("exit status 3".into()),
                exit_code: Some(3),
                output: "boom\n".into(),
            },
            Transition::BlockFinished {
                block: 0,
                state: JobState::Failed,
                at: t2,
            },
        ],
    )
    .await
    .unwrap();
    let run = s.get(nr.id).await.unwrap();
    let job = &run.blocks[0].jobs[1];
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.error.as_deref(), Some("exit status 3"));
    assert_eq!(job.exit_code, Some(3));
    assert_eq!(job.output, "boom\n");
    assert_eq!(job.started_at, Some(t1));
    assert_eq!(job.ended_at, Some(t2));
    assert_eq!(run.blocks[0].state, JobState::Failed);
    assert_eq!(
        run.blocks[0].jobs[0].state,
        JobState::Skipped,
        "pending jobs of a finished block are skipped"
    );
    assert_eq!(run.blocks[1].state, JobState::Pending);

    // A job interrupted by a shutdown goes back to pending, keeping its attempt count.
    let k2 = JobKey { block: 1, job: 0 };
    s.apply(
        &a,
        nr.id,
        vec![Transition::JobStarted {
            key: k2,
            attempt: 1,
            at: t2,
        }],
    )
    .await
    .unwrap();
    s.apply(
        &a,
        nr.id,
        vec![Transition::JobInterrupted {
            key: k2,
            error: "drained".into(),
        }],
    )
    .await
    .unwrap();
    let run = s.get(nr.id).await.unwrap();
    assert_eq!(run.blocks[1].jobs[0].state, JobState::Pending);
    assert_eq!(run.blocks[1].jobs[0].attempts, 1);
}

pub async fn run_finished_settles_leftovers(s: Arc<dyn RunStore>) {
    let nr = new_run(spec("hello", 2, 2));
    let a = node("a");
    s.submit(nr.clone()).await.unwrap();
    s.exec(nr.id, &a, T0, Timestamp(T0.0 + 1000)).await.unwrap();
    let k = JobKey { block: 0, job: 0 };
    let cause = StopCause::Cancelled {
        by: "ana".into(),
        reason: String::new(),
    };
    s.apply(
        &a,
        nr.id,
        vec![
            Transition::RunRunning { at: T0 },
            Transition::BlockStarted { block: 0, at: T0 },
            Transition::JobStarted {
                key: k,
                attempt: 1,
                at: T0,
            },
            Transition::RunFinished {
                state: RunState::Cancelled,
                at: Timestamp(T0.0 + 5),
                error: Some("cancelled".into()),
                stop_cause: Some(cause.clone()),
            },
        ],
    )
    .await
    .unwrap();
    let run = s.get(nr.id).await.unwrap();
    assert_eq!(run.state, RunState::Cancelled);
    assert_eq!(run.ended_at, Some(Timestamp(T0.0 + 5)));
    assert_eq!(run.stop_cause, Some(cause));
    assert_eq!(run.lease_owner, None);
    assert_eq!(run.blocks[0].state, JobState::Cancelled);
    assert_eq!(run.blocks[0].jobs[0].state, JobState::Cancelled);
    assert_eq!(run.blocks[0].jobs[1].state, JobState::Skipped);
    assert_eq!(run.blocks[1].state, JobState::Skipped);
    let err = s
        .apply(&a, nr.id, vec![Transition::RunRunning { at: T0 }])
        .await
        .unwrap_err();
    assert_eq!(
        err,
        Error::LeaseLost { run: nr.id },
        "a finished run is leased to nobody"
    );
}

pub async fn leases_fence_writes(s: Arc<dyn RunStore>) {
    let nr = new_run(spec("hello", 1, 1));
    s.submit(nr.clone()).await.unwrap();
    s.exec(nr.id, &node("a"), T0, Timestamp(T0.0 + 1000))
        .await
        .unwrap();
    let err = s
        .apply(&node("b"), nr.id, vec![Transition::RunRunning { at: T0 }])
        .await
        .unwrap_err();
    assert_eq!(err, Error::LeaseLost { run: nr.id });
    assert_eq!(
        s.get(nr.id).await.unwrap().state,
        RunState::Queued,
        "a fenced write changes nothing"
    );
}

pub async fn a_fenced_write_leaves_the_others_of_its_batch(s: Arc<dyn RunStore>) {
    let until = Timestamp(T0.0 + 1000);
    let mut runs = Vec::new();
    for _ in 0..4 {
        let nr = new_run(spec("hello", 1, 1));
        s.submit(nr.clone()).await.unwrap();
        s.exec(nr.id, &node("a"), T0, until).await.unwrap();
        runs.push(nr.id);
    }
    let key = JobKey { block: 0, job: 0 };
    let started = |at| {
        vec![
            Transition::RunRunning { at },
            Transition::JobStarted {
                key,
                attempt: 1,
                at,
            },
        ]
    };
    // Queued together, so that they go in one batch: node b holds no lease on runs[1].
    let (a, b) = (node("a"), node("b"));
    s.apply_nowait(&a, runs[0], started(T0));
    s.apply_nowait(&b, runs[1], started(T0));
    s.apply_nowait(&a, runs[2], started(T0));
    let (fenced, kept, last) = tokio::join!(
        s.apply(&b, runs[1], started(T0)),
        s.apply(&a, runs[3], started(T0)),
        s.apply(
            &a,
            runs[0],
            vec![Transition::JobFinished {
                key,
                state: JobState::Completed,
                at: T0,
                error: None,
                exit_code: None,
                output: String::new(),
            }],
        ),
    );
    assert_eq!(fenced.unwrap_err(), Error::LeaseLost { run: runs[1] });
    kept.unwrap();
    last.unwrap();
    let run = s.get(runs[1]).await.unwrap();
    assert_eq!(run.state, RunState::Queued, "fenced writes change nothing");
    assert_eq!(run.blocks[0].jobs[0].attempts, 0);
    for id in [runs[2], runs[3]] {
        let run = s.get(id).await.unwrap();
        assert_eq!(run.state, RunState::Running, "{id}");
        assert_eq!(run.blocks[0].jobs[0].state, JobState::Running);
    }
    let run = s.get(runs[0]).await.unwrap();
    assert_eq!(run.blocks[0].jobs[0].state, JobState::Completed);
    assert_eq!(run.blocks[0].jobs[0].attempts, 1);
}

pub async fn recover_and_claim(s: Arc<dyn RunStore>) {
    let (a, b) = (node("a"), node("b"));
    let mine = new_run(spec("hello", 1, 1));
    let theirs = new_run(spec("hello", 1, 1));
    let idle = new_run(spec("hello", 1, 1));
    for r in [&mine, &theirs, &idle] {
        s.submit(r.clone()).await.unwrap();
    }
    s.exec(mine.id, &a, T0, Timestamp(T0.0 + 1000))
        .await
        .unwrap();
    s.exec(theirs.id, &b, T0, Timestamp(T0.0 + 1000))
        .await
        .unwrap();

    let later = Timestamp(T0.0 + 60_000);
    assert_eq!(s.recover(&a, later, 100).await.unwrap(), vec![mine.id]);
    assert_eq!(s.get(mine.id).await.unwrap().lease_expires_at, Some(later));

    // b's lease is still live at T0 + 500: nothing to claim.
    assert!(
        s.claim_orphans(&a, Timestamp(T0.0 + 500), later, 100)
            .await
            .unwrap()
            .is_empty()
    );
    // ... and expired at T0 + 2000: a takes it over; submitted runs are never claimed.
    let claimed = s
        .claim_orphans(&a, Timestamp(T0.0 + 2000), later, 100)
        .await
        .unwrap();
    assert_eq!(claimed, vec![theirs.id]);
    assert_eq!(s.get(theirs.id).await.unwrap().lease_owner, Some(a.clone()));
    assert_eq!(s.get(idle.id).await.unwrap().lease_owner, None);

    // A released run is free for anyone at once.
    s.release(&a, mine.id).await.unwrap();
    assert_eq!(s.get(mine.id).await.unwrap().lease_owner, None);
    let claimed = s
        .claim_orphans(&b, Timestamp(T0.0 + 2000), later, 100)
        .await
        .unwrap();
    assert_eq!(claimed, vec![mine.id]);
}

pub async fn renew_reports_cancel_and_lost(s: Arc<dyn RunStore>) {
    let a = node("a");
    let r1 = new_run(spec("hello", 1, 1));
    let r2 = new_run(spec("hello", 1, 1));
    for r in [&r1, &r2] {
        s.submit(r.clone()).await.unwrap();
        s.exec(r.id, &a, T0, Timestamp(T0.0 + 1000)).await.unwrap();
    }
    let cause = StopCause::Cancelled {
        by: "ana".into(),
        reason: "x".into(),
    };
    s.cancel(r1.id, cause.clone(), T0).await.unwrap();
    s.release(&a, r2.id).await.unwrap();
    let until = Timestamp(T0.0 + 9000);
    let renewal = s.renew_leases(&a, &[r1.id, r2.id], until).await.unwrap();
    assert_eq!(renewal.cancel_requested, vec![(r1.id, cause)]);
    assert_eq!(renewal.lost, vec![r2.id]);
    assert_eq!(s.get(r1.id).await.unwrap().lease_expires_at, Some(until));
}

pub async fn count_by_state_counts_every_run_once(s: Arc<dyn RunStore>) {
    assert!(s.count_by_state().await.unwrap().is_empty());
    let mut ids = Vec::new();
    for _ in 0..3 {
        let nr = new_run(spec("w", 1, 1));
        ids.push(nr.id);
        s.submit(nr).await.unwrap();
    }
    s.exec(ids[0], &node("a"), T0, Timestamp(T0.0 + 1000))
        .await
        .unwrap();
    let mut counts = s.count_by_state().await.unwrap();
    counts.sort_by_key(|(st, _)| st.as_str());
    assert_eq!(counts, [(RunState::Queued, 1), (RunState::Submitted, 2)]);
}

pub async fn list_filters_and_pages(s: Arc<dyn RunStore>) {
    let mut ids = Vec::new();
    for i in 0..7 {
        let mut sp = spec(if i % 2 == 0 { "even" } else { "odd" }, 1, 1);
        sp.labels = BTreeMap::from([("site".to_owned(), format!("s{}", i % 3))]);
        sp.desc = format!("run {i}");
        let nr = new_run(sp);
        ids.push(nr.id);
        s.submit(nr).await.unwrap();
    }
    s.exec(ids[0], &node("a"), T0, Timestamp(T0.0 + 1000))
        .await
        .unwrap();

    let all = s.list(&RunFilter::default()).await.unwrap();
    let listed: Vec<RunId> = all.runs.iter().map(|r| r.id).collect();
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(listed, newest_first);
    assert_eq!(all.runs.last().map(|r| r.desc.as_str()), Some("run 0"));
    assert!(all.next_page_token.is_none());

    let even = s
        .list(&RunFilter {
            name: Some("even".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(even.runs.len(), 4);

    let site1 = s
        .list(&RunFilter {
            labels: BTreeMap::from([("site".to_owned(), "s1".to_owned())]),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        site1.runs.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![ids[4], ids[1]]
    );

    let queued = s
        .list(&RunFilter {
            states: vec![RunState::Queued],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(queued.runs.len(), 1);
    assert_eq!(queued.runs[0].id, ids[0]);

    let mut seen = Vec::new();
    let mut token = None;
    loop {
        let page = s
            .list(&RunFilter {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(page.runs.len() <= 3);
        seen.extend(page.runs.iter().map(|r| r.id));
        token = page.next_page_token;
        if token.is_none() {
            break;
        }
    }
    assert_eq!(seen, newest_first, "paging visits every run once, in order");
}

pub async fn nowait_writes_land_before_the_next_awaited_write(s: Arc<dyn RunStore>) {
    let a = node("a");
    let nr = new_run(spec("hello", 1, 1));
    s.submit(nr.clone()).await.unwrap();
    s.exec(nr.id, &a, T0, Timestamp(T0.0 + 1000)).await.unwrap();
    let k = JobKey { block: 0, job: 0 };
    s.apply_nowait(
        &a,
        nr.id,
        vec![Transition::JobStarted {
            key: k,
            attempt: 1,
            at: T0,
        }],
    );
    s.apply(&a, nr.id, vec![Transition::RunRunning { at: T0 }])
        .await
        .unwrap();
    let run = s.get(nr.id).await.unwrap();
    assert_eq!(run.blocks[0].jobs[0].state, JobState::Running);
    assert_eq!(run.blocks[0].jobs[0].attempts, 1);
}

pub async fn unknown_runs_are_not_found(s: Arc<dyn RunStore>) {
    let id = RunId::new_v7();
    assert_eq!(s.get(id).await.unwrap_err(), Error::NotFound(id));
    assert_eq!(
        s.exec(id, &node("a"), T0, T0).await.unwrap_err(),
        Error::NotFound(id)
    );
    let cause = StopCause::Cancelled {
        by: String::new(),
        reason: String::new(),
    };
    assert_eq!(
        s.cancel(id, cause, T0).await.unwrap_err(),
        Error::NotFound(id)
    );
    assert_eq!(
        s.apply(&node("a"), id, vec![Transition::RunRunning { at: T0 }])
            .await
            .unwrap_err(),
        Error::NotFound(id)
    );
}

// ---- the e-stop list and its audit trail ----

pub fn estop_target(t: &str) -> Target {
    t.parse().unwrap()
}

pub fn estop_entry(t: &str, state: EStopState, reason: &str, by: &str) -> Entry {
    Entry {
        target: estop_target(t),
        state,
        reason: reason.to_owned(),
        set_by: by.to_owned(),
        set_at: T0.to_rfc3339(),
    }
}

/// An audit record of `target` moving from `old` to `new`.
pub fn audit(
    target: &str,
    old: Option<EStopState>,
    new: Option<EStopState>,
    reason: &str,
) -> AuditRecord {
    AuditRecord {
        at: T0.to_rfc3339(),
        target: estop_target(target),
        old_state: old,
        new_state: new,
        set_by: "ana".into(),
        reason: reason.to_owned(),
        source: "api".into(),
    }
}

pub async fn estop_starts_empty_at_version_zero(s: Arc<dyn EStopStore>) {
    assert_eq!(s.estop_load().await.unwrap(), (EStopList::default(), 0));
    assert_eq!(s.estop_version().await.unwrap(), 0);
    assert!(s.audit_list(None, 0).await.unwrap().is_empty());
}

pub async fn estop_save_replaces_the_list_and_appends_audit(s: Arc<dyn EStopStore>) {
    use EStopState::{Go, Stop};
    let mut list = EStopList {
        entries: vec![
            estop_entry("*", Go, "", "steward"),
            estop_entry("site=aap", Stop, "INC-42", "ana"),
        ],
    };
    let rec = audit("site=aap", None, Some(Stop), "INC-42");
    let v1 = s
        .estop_save(list.clone(), 0, vec![rec.clone()])
        .await
        .unwrap();
    assert!(v1 > 0, "the version moves on");
    assert_eq!(s.estop_version().await.unwrap(), v1);
    assert_eq!(s.estop_load().await.unwrap(), (list.clone(), v1));
    assert_eq!(s.audit_list(None, 0).await.unwrap(), vec![rec.clone()]);

    list.clear(&estop_target("site=aap"));
    let rec2 = audit("site=aap", Some(Stop), None, "resolved");
    let v2 = s
        .estop_save(list.clone(), v1, vec![rec2.clone()])
        .await
        .unwrap();
    assert!(v2 > v1);
    assert_eq!(s.estop_load().await.unwrap(), (list, v2));
    assert_eq!(s.audit_list(None, 10).await.unwrap(), vec![rec2, rec]);
}

pub async fn estop_save_with_a_stale_version_conflicts_and_stores_nothing(s: Arc<dyn EStopStore>) {
    let first = EStopList {
        entries: vec![estop_entry("*", EStopState::Go, "", "steward")],
    };
    let v1 = s.estop_save(first.clone(), 0, vec![]).await.unwrap();
    let other = EStopList {
        entries: vec![estop_entry("*", EStopState::Stop, "late", "bob")],
    };
    let rec = audit("*", Some(EStopState::Go), Some(EStopState::Stop), "late");
    for stale in [0, v1 + 1] {
        let err = s
            .estop_save(other.clone(), stale, vec![rec.clone()])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Conflict(_)), "{err:?}");
    }
    assert_eq!(s.estop_load().await.unwrap(), (first, v1));
    assert!(
        s.audit_list(None, 0).await.unwrap().is_empty(),
        "a refused save appends no audit"
    );
}

pub async fn estop_concurrent_saves_one_wins(s: Arc<dyn EStopStore>) {
    let a = EStopList {
        entries: vec![estop_entry("a", EStopState::Stop, "a", "ana")],
    };
    let b = EStopList {
        entries: vec![estop_entry("b", EStopState::Stop, "b", "bob")],
    };
    let (ra, rb) = tokio::join!(
        s.estop_save(
            a.clone(),
            0,
            vec![audit("a", None, Some(EStopState::Stop), "a")]
        ),
        s.estop_save(
            b.clone(),
            0,
            vec![audit("b", None, Some(EStopState::Stop), "b")]
        ),
    );
    let (won, v) = match (ra, rb) {
        (Ok(v), Err(Error::Conflict(_))) => (a, v),
        (Err(Error::Conflict(_)), Ok(v)) => (b, v),
        other => panic!("exactly one save must win: {other:?}"),
    };
    assert_eq!(s.estop_load().await.unwrap(), (won, v));
    assert_eq!(s.audit_list(None, 0).await.unwrap().len(), 1);
}

pub async fn audit_lists_newest_first_by_target_with_limit(s: Arc<dyn EStopStore>) {
    use EStopState::{Go, Pause, Stop};
    let recs = vec![
        audit("site=aap", None, Some(Pause), "one"),
        audit("Erase", None, Some(Stop), "two"),
        audit("site=aap", Some(Pause), Some(Stop), "three"),
    ];
    s.audit_append(recs.clone()).await.unwrap();
    let mut hand = audit("*", Some(Go), None, "");
    hand.source = "file".into();
    hand.set_by = "hand edit".into();
    s.audit_append(vec![hand.clone()]).await.unwrap();
    s.audit_append(vec![]).await.unwrap();

    let all = s.audit_list(None, 0).await.unwrap();
    assert_eq!(
        all,
        vec![
            hand.clone(),
            recs[2].clone(),
            recs[1].clone(),
            recs[0].clone()
        ]
    );
    assert_eq!(s.audit_list(None, 2).await.unwrap(), all[..2].to_vec());
    assert_eq!(
        s.audit_list(Some(estop_target("site=aap")), 0)
            .await
            .unwrap(),
        vec![recs[2].clone(), recs[0].clone()]
    );
    assert_eq!(
        s.audit_list(Some(estop_target("*")), 0).await.unwrap(),
        vec![hand]
    );
    assert!(
        s.audit_list(Some(estop_target("Nothing")), 0)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.estop_version().await.unwrap(),
        0,
        "the audit trail alone does not change the list"
    );
}

pub async fn buckets_grant_once_per_key_and_refill(s: Arc<dyn store::BucketStore>) {
    let spec = ratelimit::BucketSpec {
        size: 1,
        refill: 1,
        every: std::time::Duration::from_secs(1800),
    };
    let first = s
        .bucket_take("erase", &spec, "run-a/b0/j0", T0)
        .await
        .unwrap();
    assert!(first.granted && !first.already);
    assert_eq!(first.tokens_left, 0);
    let again = s
        .bucket_take("erase", &spec, "run-a/b0/j0", Timestamp(T0.0 + 5))
        .await
        .unwrap();
    assert!(
        again.granted && again.already,
        "the same job gets its recorded grant, no new token"
    );
    let other = s
        .bucket_take("erase", &spec, "run-b/b0/j0", Timestamp(T0.0 + 60_000))
        .await
        .unwrap();
    assert!(!other.granted);
    assert_eq!(other.next_token_at, Timestamp(T0.0 + 1_800_000));
    let separate = s
        .bucket_take("other", &spec, "run-b/b0/j0", T0)
        .await
        .unwrap();
    assert!(separate.granted, "buckets are independent");
    let later = s
        .bucket_take("erase", &spec, "run-b/b0/j0", Timestamp(T0.0 + 1_800_000))
        .await
        .unwrap();
    assert!(
        later.granted && !later.already,
        "a token after the refill interval"
    );
}

fn token(name: &str, hash: &str, role: domain::auth::Role) -> store::TokenRecord {
    let mut scope = domain::auth::Scope::default();
    scope.add("site=aap").unwrap();
    store::TokenRecord {
        name: name.into(),
        hash: hash.into(),
        role,
        scope,
        created_by: "admin".into(),
        created_at: T0,
        expires_at: Some(T0.plus(std::time::Duration::from_secs(3600))),
        last_used_at: None,
    }
}

pub async fn tokens_are_found_by_hash_listed_by_name_and_revoked(s: Arc<dyn store::AuthStore>) {
    use domain::auth::Role;
    let ci = token("ci", "h-ci", Role::Submitter);
    let mut pager = token("pager", "h-pager", Role::Responder);
    pager.scope = domain::auth::Scope::default();
    pager.expires_at = None;
    s.token_create(pager.clone()).await.unwrap();
    s.token_create(ci.clone()).await.unwrap();
    assert_eq!(s.token_by_hash("h-ci").await.unwrap(), Some(ci.clone()));
    assert_eq!(s.token_by_hash("nope").await.unwrap(), None);
    assert_eq!(s.token_by_name("ci").await.unwrap(), Some(ci.clone()));
    assert_eq!(s.token_by_name("h-ci").await.unwrap(), None);

    // A name in use: refused, nothing stored.
    let again = token("ci", "h-other", Role::Admin);
    assert!(matches!(
        s.token_create(again).await,
        Err(Error::Conflict(_))
    ));
    assert_eq!(s.token_by_hash("h-other").await.unwrap(), None);
    assert_eq!(
        s.token_list().await.unwrap(),
        vec![ci.clone(), pager.clone()],
        "by name"
    );

    // Uses are recorded (queued), never moving back in time.
    s.token_used("ci", T0.plus(std::time::Duration::from_secs(5)));
    s.token_used("ci", T0.plus(std::time::Duration::from_secs(2)));
    assert!(!s.token_revoke("nobody").await.unwrap());
    let used = s.token_by_hash("h-ci").await.unwrap().unwrap();
    assert_eq!(
        used.last_used_at,
        Some(T0.plus(std::time::Duration::from_secs(5)))
    );

    assert!(s.token_revoke("ci").await.unwrap());
    assert!(!s.token_revoke("ci").await.unwrap());
    assert_eq!(s.token_by_hash("h-ci").await.unwrap(), None);
    assert_eq!(s.token_list().await.unwrap(), vec![pager]);
    // The name is free again; the old secret stays dead.
    s.token_create(token("ci", "h-ci2", Role::Viewer))
        .await
        .unwrap();
    assert_eq!(s.token_by_hash("h-ci").await.unwrap(), None);
}

pub async fn access_log_lists_newest_first_with_limit(s: Arc<dyn store::AuthStore>) {
    let rec = |i: i64, allowed: bool| store::AccessRecord {
        at: Timestamp(T0.0 + i),
        actor: format!("t{i}"),
        call: "Submit".into(),
        target: format!("run-{i}"),
        allowed,
        peer: "127.0.0.1:5000".into(),
        detail: if allowed {
            String::new()
        } else {
            "role viewer".into()
        },
    };
    s.access_append(vec![rec(1, true), rec(2, false)]);
    s.access_append(vec![rec(3, true)]);
    // Reading the log waits for the appends queued before it.
    assert_eq!(
        s.access_list(0).await.unwrap(),
        vec![rec(3, true), rec(2, false), rec(1, true)]
    );
    assert_eq!(s.access_list(1).await.unwrap(), vec![rec(3, true)]);
}

fn schedule_record(name: &str, next_check: Option<Timestamp>) -> ScheduleRecord {
    let spec = ScheduleSpec::parse(&format!(
        "schedule: {name}\ncron: \"0 * * * *\"\nworkflow: {{name: w, blocks: [{{jobs: [{{action: noop}}]}}]}}"
    ))
    .unwrap();
    ScheduleRecord {
        spec,
        state: ScheduleState {
            created_at: T0,
            created_by: "ci".into(),
            cursor: T0,
            next_check,
            ..ScheduleState::default()
        },
        version: 0,
    }
}

fn fire(record: &ScheduleRecord, nominal: Timestamp) -> StartedRun {
    let mut run = new_run(record.spec.workflow_for(nominal));
    run.schedule = Some(domain::ScheduledBy {
        name: record.spec.schedule.clone(),
        nominal_time: nominal,
    });
    StartedRun {
        run,
        node: node("a"),
        lease_until: Timestamp(T0.0 + HOUR),
    }
}

pub async fn schedules_are_created_once_and_written_over_their_version<S>(s: Arc<S>)
where
    S: RunStore + ScheduleStore,
{
    let mut rec = schedule_record("nightly", Some(T0));
    let (v, none) = s.schedule_write(rec.clone(), None, None).await.unwrap();
    assert_eq!((v, none), (1, None));
    assert!(matches!(
        s.schedule_write(rec.clone(), None, None).await,
        Err(Error::Conflict(_))
    ));
    let got = s.schedule_get("nightly").await.unwrap().unwrap();
    assert_eq!(
        (got.spec.clone(), got.state.clone(), got.version),
        (rec.spec.clone(), rec.state.clone(), 1)
    );
    rec.state.fired = 7;
    assert_eq!(
        s.schedule_write(rec.clone(), Some(1), None)
            .await
            .unwrap()
            .0,
        2
    );
    // A writer that read version 1 lost the race: nothing it wrote is stored.
    rec.state.fired = 99;
    assert!(matches!(
        s.schedule_write(rec.clone(), Some(1), None).await,
        Err(Error::Conflict(_))
    ));
    assert_eq!(
        s.schedule_get("nightly")
            .await
            .unwrap()
            .unwrap()
            .state
            .fired,
        7
    );
    s.schedule_write(schedule_record("alpha", None), None, None)
        .await
        .unwrap();
    let names: Vec<String> = s
        .schedule_list()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.spec.schedule)
        .collect();
    assert_eq!(names, ["alpha", "nightly"]);
    assert!(s.schedule_delete("nightly").await.unwrap());
    assert!(!s.schedule_delete("nightly").await.unwrap());
    assert_eq!(s.schedule_get("nightly").await.unwrap(), None);
    // Over a deleted schedule: a conflict, not a resurrection.
    assert!(matches!(
        s.schedule_write(rec, Some(2), None).await,
        Err(Error::Conflict(_))
    ));
}

pub async fn a_fire_stores_its_run_with_the_schedule_change_or_nothing<S>(s: Arc<S>)
where
    S: RunStore + ScheduleStore,
{
    let mut rec = schedule_record("hourly", Some(T0));
    rec.version = s.schedule_write(rec.clone(), None, None).await.unwrap().0;
    let nominal = Timestamp(T0.0 + HOUR);
    let f = fire(&rec, nominal);
    let mut next = rec.clone();
    next.state.cursor = nominal;
    next.state.last_run = Some(f.run.id);
    let (v, sub) = s
        .schedule_write(next.clone(), Some(rec.version), Some(f.clone()))
        .await
        .unwrap();
    let sub = sub.unwrap();
    assert!(sub.created);
    let run = s.get(sub.id).await.unwrap();
    assert_eq!(run.state, RunState::Queued);
    assert_eq!(run.lease_owner, Some(node("a")));
    assert_eq!(
        run.schedule,
        Some(domain::ScheduledBy {
            name: "hourly".into(),
            nominal_time: nominal
        })
    );
    assert_eq!(
        run.spec.idempotency_key.as_deref(),
        Some("schedule/hourly/2027-01-15T09:00:00.000Z")
    );
    let page = s
        .list(&RunFilter {
            schedule: Some("hourly".into()),
            ..RunFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(page.runs.len(), 1);
    assert_eq!(page.runs[0].schedule, run.schedule);
    assert!(
        s.list(&RunFilter {
            schedule: Some("other".into()),
            ..RunFilter::default()
        })
        .await
        .unwrap()
        .runs
        .is_empty()
    );
    // The same nominal time again (a second writer past the version check): the stored run
    // answers, nothing new is stored.
    let again = fire(&rec, nominal);
    let (_, sub2) = s
        .schedule_write(next.clone(), Some(v), Some(again))
        .await
        .unwrap();
    assert_eq!(
        sub2.unwrap(),
        store::Submitted {
            id: sub.id,
            created: false
        }
    );
    // A stale version stores neither the change nor the run.
    let late = fire(&rec, Timestamp(nominal.0 + HOUR));
    let late_id = late.run.id;
    assert!(matches!(
        s.schedule_write(next, Some(rec.version), Some(late)).await,
        Err(Error::Conflict(_))
    ));
    assert!(matches!(s.get(late_id).await, Err(Error::NotFound(_))));
    assert_eq!(
        s.list(&RunFilter {
            schedule: Some("hourly".into()),
            ..RunFilter::default()
        })
        .await
        .unwrap()
        .runs
        .len(),
        1
    );
}

pub async fn due_schedules_come_soonest_first<S>(s: Arc<S>)
where
    S: RunStore + ScheduleStore,
{
    assert_eq!(s.schedule_next_check().await.unwrap(), None);
    for (name, at) in [
        ("late", Some(Timestamp(T0.0 + 30))),
        ("paused", None),
        ("soon", Some(Timestamp(T0.0 + 10))),
        ("later", Some(Timestamp(T0.0 + HOUR))),
    ] {
        s.schedule_write(schedule_record(name, at), None, None)
            .await
            .unwrap();
    }
    assert_eq!(
        s.schedule_next_check().await.unwrap(),
        Some(Timestamp(T0.0 + 10))
    );
    let due = s.schedule_due(Timestamp(T0.0 + 60), 10).await.unwrap();
    let names: Vec<&str> = due.iter().map(|(r, _)| r.spec.schedule.as_str()).collect();
    assert_eq!(names, ["soon", "late"]);
    assert!(due.iter().all(|(_, last)| last.is_none()));
    assert_eq!(
        s.schedule_due(Timestamp(T0.0 + 60), 1).await.unwrap().len(),
        1
    );
    // The newest run comes with its state.
    let mut rec = s.schedule_get("soon").await.unwrap().unwrap();
    let f = fire(&rec, Timestamp(T0.0 + HOUR));
    let expected = rec.version;
    rec.state.last_run = Some(f.run.id);
    s.schedule_write(rec, Some(expected), Some(f.clone()))
        .await
        .unwrap();
    let due = s.schedule_due(Timestamp(T0.0 + 60), 10).await.unwrap();
    assert_eq!(
        due[0].1,
        Some(LastRun {
            id: f.run.id,
            state: RunState::Queued,
            started: false
        })
    );
}

/// A run of `name` with labels `site=aap`, finished (`state`) at `ended`.
async fn finished_run<S: RunStore>(s: &S, name: &str, state: RunState, ended: Timestamp) -> RunId {
    let mut sp = spec(name, 1, 1);
    sp.labels = BTreeMap::from([("site".to_owned(), "aap".to_owned())]);
    let nr = new_run(sp);
    let id = nr.id;
    s.submit(nr).await.unwrap();
    s.exec(id, &node("a"), T0, Timestamp(T0.0 + HOUR))
        .await
        .unwrap();
    s.apply(
        &node("a"),
        id,
        vec![
            Transition::RunRunning { at: T0 },
            Transition::RunFinished {
                state,
                at: ended,
                error: None,
                stop_cause: None,
            },
        ],
    )
    .await
    .unwrap();
    id
}

async fn exists<S: RunStore>(s: &S, id: RunId) -> bool {
    match s.get(id).await {
        Ok(_) => true,
        Err(Error::NotFound(_)) => false,
        Err(e) => panic!("{e}"),
    }
}

pub async fn prune_deletes_finished_runs_past_the_cutoff_of_their_workflows<S>(s: Arc<S>)
where
    S: RunStore,
{
    use store::Workflows::{AllBut, Only};
    let old = finished_run(&*s, "old", RunState::Completed, T0).await;
    let failed = finished_run(&*s, "old", RunState::Failed, T0).await;
    let newer = finished_run(&*s, "old", RunState::Completed, Timestamp(T0.0 + 2 * HOUR)).await;
    let kept = finished_run(&*s, "keep", RunState::Completed, T0).await;
    // Not finished: never pruned, however old.
    let running = new_run(spec("old", 1, 1));
    let running_id = running.id;
    s.submit(running).await.unwrap();
    s.exec(running_id, &node("a"), T0, Timestamp(T0.0 + HOUR))
        .await
        .unwrap();
    let submitted = new_run(spec("old", 1, 1));
    let submitted_id = submitted.id;
    s.submit(submitted).await.unwrap();
    let far = Timestamp(T0.0 + 100 * HOUR);

    // A dry run counts and changes nothing.
    let cutoff = Timestamp(T0.0 + HOUR);
    assert_eq!(
        s.prune_runs(cutoff, &AllBut(vec![]), 0, true)
            .await
            .unwrap(),
        3
    );
    assert!(exists(&*s, old).await && exists(&*s, kept).await);

    // One workflow, a batch at a time.
    assert_eq!(
        s.prune_runs(cutoff, &Only("old".into()), 1, false)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        s.prune_runs(cutoff, &Only("old".into()), 10, false)
            .await
            .unwrap(),
        1
    );
    assert!(!exists(&*s, old).await && !exists(&*s, failed).await);
    assert!(exists(&*s, newer).await && exists(&*s, kept).await);
    // Their labels went with them.
    let by_label = s
        .list(&RunFilter {
            labels: BTreeMap::from([("site".to_owned(), "aap".to_owned())]),
            ..Default::default()
        })
        .await
        .unwrap();
    let listed: Vec<RunId> = by_label.runs.iter().map(|r| r.id).collect();
    assert_eq!(listed, vec![kept, newer]);

    // Every workflow but one.
    assert_eq!(
        s.prune_runs(far, &AllBut(vec!["keep".into()]), 10, false)
            .await
            .unwrap(),
        1
    );
    assert!(!exists(&*s, newer).await);
    assert!(exists(&*s, kept).await);
    assert!(exists(&*s, running_id).await && exists(&*s, submitted_id).await);
    assert_eq!(
        s.prune_runs(far, &AllBut(vec![]), 10, false).await.unwrap(),
        1
    );
    assert!(exists(&*s, running_id).await && exists(&*s, submitted_id).await);
}

pub async fn paging_returns_no_run_twice_while_runs_are_added_and_pruned<S>(s: Arc<S>)
where
    S: RunStore,
{
    let mut made = Vec::new();
    for i in 0..30 {
        made.push(finished_run(&*s, "pager", RunState::Completed, Timestamp(T0.0 + i)).await);
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut token = None;
    let mut pages = 0;
    loop {
        let page = s
            .list(&RunFilter {
                labels: BTreeMap::from([("site".to_owned(), "aap".to_owned())]),
                page_size: 7,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap();
        for r in &page.runs {
            assert!(seen.insert(r.id), "run {} listed twice", r.id);
        }
        pages += 1;
        // Between pages: new runs come, the oldest go.
        finished_run(
            &*s,
            "pager",
            RunState::Completed,
            Timestamp(T0.0 + 1000 + pages),
        )
        .await;
        s.prune_runs(
            Timestamp(T0.0 + 3 * pages),
            &store::Workflows::AllBut(vec![]),
            100,
            false,
        )
        .await
        .unwrap();
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert!(pages >= 3, "{pages} pages");
    assert!(
        seen.iter().all(|id| made.contains(id)),
        "only runs older than the first page"
    );
}

pub async fn audit_prune_deletes_only_old_records<S>(s: Arc<S>)
where
    S: EStopStore + store::AuthStore + store::AuditPrune,
{
    let mut old = audit("site=aap", None, Some(EStopState::Stop), "old");
    old.at = Timestamp(T0.0).to_rfc3339();
    let mut new = audit("site=aap", Some(EStopState::Stop), None, "new");
    new.at = Timestamp(T0.0 + 2 * HOUR).to_rfc3339();
    s.audit_append(vec![old, new.clone()]).await.unwrap();
    let rec = |at: i64| store::AccessRecord {
        at: Timestamp(at),
        actor: "t".into(),
        call: "Submit".into(),
        target: String::new(),
        allowed: true,
        peer: String::new(),
        detail: String::new(),
    };
    s.access_append(vec![rec(T0.0), rec(T0.0 + 2 * HOUR)]);
    assert_eq!(s.access_list(0).await.unwrap().len(), 2);
    assert_eq!(s.prune_audit(Timestamp(T0.0 + HOUR), 100).await.unwrap(), 2);
    assert_eq!(s.audit_list(None, 0).await.unwrap(), vec![new]);
    assert_eq!(s.access_list(0).await.unwrap(), vec![rec(T0.0 + 2 * HOUR)]);
}
