#![allow(clippy::unwrap_used)]

//! The engine in process, on a real SQLite file.

use std::sync::Arc;
use std::time::Duration;

use domain::estop::{EStopList, EStopState, Entry, Snapshot};
use domain::{Clock, JobState, NodeId, RunId, RunState, StopCause, SystemClock, WorkflowSpec};
use engine::{Engine, EngineError, EngineOptions, ShutdownMode};
use store_sqlite::SqliteStore;

struct Fixture {
    _dir: tempfile::TempDir,
    engine: Engine,
    estop: tokio::sync::watch::Sender<Arc<Snapshot>>,
}

fn entry(target: &str, state: EStopState) -> Entry {
    Entry {
        target: target.parse().unwrap(),
        state,
        reason: format!("INC-{target}"),
        set_by: "ana".into(),
        set_at: String::new(),
    }
}

impl Fixture {
    fn set_estop(&self, entries: Vec<Entry>) {
        self.estop
            .send_replace(Arc::new(Snapshot::Ok(EStopList { entries })));
    }
}

fn fixture(tweak: impl FnOnce(&mut EngineOptions)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("steward.db")).unwrap());
    let mut opts = EngineOptions::new(NodeId("test".into()));
    opts.kill_grace = Duration::from_millis(200);
    tweak(&mut opts);
    let (estop, feed) = tokio::sync::watch::channel(Arc::new(Snapshot::Ok(EStopList {
        entries: vec![entry("*", EStopState::Go)],
    })));
    let engine = Engine::new(opts, store, Arc::new(SystemClock), feed);
    engine.start();
    Fixture {
        _dir: dir,
        engine,
        estop,
    }
}

fn spec(yaml: &str) -> WorkflowSpec {
    WorkflowSpec::parse(yaml).unwrap()
}

async fn wait_terminal(engine: &Engine, id: RunId) -> domain::Run {
    for _ in 0..1000 {
        let run = engine.status(id).await.unwrap();
        if run.state.is_terminal() {
            return run;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("run {id} did not finish");
}

/// The Exec of a handshake starts the run from what its Submit stored, without reading it back;
/// a run that ended in between (cancelled) is answered as it stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_starts_from_what_submit_stored() {
    let f = fixture(|_| {});
    let s = spec("name: kept\nblocks:\n  - jobs: [{action: noop}]\n");
    let sub = f.engine.submit(s).await.unwrap();
    // Read back, the run would be this one, whose job fails.
    let failing = spec(
        "name: kept\nblocks:\n  - jobs: [{action: shell, args: {argv: [sh, -c, 'exit 3']}}]\n",
    );
    let db = rusqlite::Connection::open(f._dir.path().join("steward.db")).unwrap();
    let changed = db
        .execute(
            "UPDATE runs SET spec = ?1 WHERE id = ?2",
            (serde_json::to_string(&failing).unwrap(), sub.id.to_string()),
        )
        .unwrap();
    assert_eq!(changed, 1);
    assert_eq!(f.engine.status(sub.id).await.unwrap().spec, failing);
    f.engine.exec(sub.id).await.unwrap();
    assert_eq!(
        wait_terminal(&f.engine, sub.id).await.state,
        RunState::Completed
    );

    let sub = f
        .engine
        .submit(spec("name: kept\nblocks:\n  - jobs: [{action: noop}]\n"))
        .await
        .unwrap();
    f.engine.cancel(sub.id, "ana", "not now").await.unwrap();
    match f.engine.exec(sub.id).await {
        Err(EngineError::AlreadyExists { state, .. }) => assert_eq!(state, RunState::Cancelled),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_run_in_order_and_complete() {
    let f = fixture(|_| {});
    let s = spec(
        "name: hello\nblocks:\n  - jobs: [{action: noop}]\n  - concurrency: 3\n    jobs: [{action: noop}, {action: noop}, {action: noop}]\n",
    );
    let sub = f.engine.submit(s).await.unwrap();
    assert_eq!(
        f.engine.status(sub.id).await.unwrap().state,
        RunState::Submitted
    );
    f.engine.exec(sub.id).await.unwrap();
    let run = wait_terminal(&f.engine, sub.id).await;
    assert_eq!(run.state, RunState::Completed);
    assert!(run.started_at.is_some() && run.ended_at.is_some());
    for b in &run.blocks {
        assert_eq!(b.state, JobState::Completed);
        assert!(
            b.jobs
                .iter()
                .all(|j| j.state == JobState::Completed && j.attempts == 1)
        );
    }
    assert!(
        run.blocks[0].ended_at <= run.blocks[1].started_at,
        "blocks run one after another"
    );
    assert!(matches!(
        f.engine.exec(sub.id).await,
        Err(EngineError::AlreadyExists {
            state: RunState::Completed,
            ..
        })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_job_fails_its_block_and_run_and_skips_the_rest() {
    let f = fixture(|_| {});
    let s = spec(
        "name: hello\nblocks:\n  - jobs:\n      - {action: shell, args: {argv: [sh, -c, 'echo oops; exit 3']}}\n      - {action: noop}\n  - jobs: [{action: noop}]\n",
    );
    let id = f.engine.submit(s).await.unwrap().id;
    f.engine.exec(id).await.unwrap();
    let run = wait_terminal(&f.engine, id).await;
    assert_eq!(run.state, RunState::Failed);
    let job = &run.blocks[0].jobs[0];
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.exit_code, Some(3));
    assert!(job.output.contains("oops"));
    assert!(
        run.error.as_deref().unwrap().contains("blocks[0].jobs[0]"),
        "{:?}",
        run.error
    );
    assert_eq!(run.blocks[0].jobs[1].state, JobState::Skipped);
    assert_eq!(run.blocks[1].state, JobState::Skipped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_then_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("tries");
    let f = fixture(|_| {});
    let script = format!(
        "echo x >> {m}; test $(wc -l < {m}) -ge 3",
        m = marker.display()
    );
    let s = spec(&format!(
        "name: hello\nblocks:\n  - jobs:\n      - action: shell\n        args: {{argv: [sh, -c, '{script}']}}\n        retry: {{attempts: 5, initial_backoff: 10ms, max_backoff: 20ms}}\n"
    ));
    let id = f.engine.submit(s).await.unwrap().id;
    f.engine.exec(id).await.unwrap();
    let run = wait_terminal(&f.engine, id).await;
    assert_eq!(run.state, RunState::Completed);
    assert_eq!(run.blocks[0].jobs[0].attempts, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_fails_the_job() {
    let f = fixture(|_| {});
    let s = spec(
        "name: hello\nblocks:\n  - jobs:\n      - {action: sleep, args: {duration: 60s}, timeout: 50ms}\n",
    );
    let id = f.engine.submit(s).await.unwrap().id;
    f.engine.exec(id).await.unwrap();
    let run = wait_terminal(&f.engine, id).await;
    assert_eq!(run.state, RunState::Failed);
    assert!(
        run.blocks[0].jobs[0]
            .error
            .as_deref()
            .unwrap()
            .contains("timed out")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_ends_a_running_run_and_a_submitted_one() {
    let f = fixture(|_| {});
    let s = spec(
        "name: hello\nblocks:\n  - jobs: [{action: sleep, args: {duration: 60s}}]\n  - jobs: [{action: noop}]\n",
    );
    let id = f.engine.submit(s.clone()).await.unwrap().id;
    f.engine.exec(id).await.unwrap();
    for _ in 0..500 {
        if f.engine.status(id).await.unwrap().blocks[0].jobs[0].state == JobState::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f.engine.cancel(id, "ana", "wrong site").await.unwrap();
    let run = wait_terminal(&f.engine, id).await;
    assert_eq!(run.state, RunState::Cancelled);
    assert_eq!(run.blocks[0].jobs[0].state, JobState::Cancelled);
    assert_eq!(run.blocks[1].jobs[0].state, JobState::Skipped);
    assert!(run.error.unwrap().contains("wrong site"));

    let idle = f.engine.submit(s).await.unwrap().id;
    assert_eq!(
        f.engine.cancel(idle, "ana", "").await.unwrap(),
        RunState::Cancelled
    );
    assert!(matches!(
        f.engine.exec(idle).await,
        Err(EngineError::AlreadyExists { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_cap_limits_jobs_across_runs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let f = fixture(|o| o.max_running_jobs = 2);
    // Each job records how many jobs are running when it starts (via a counter directory).
    let counter = dir.path().join("running");
    std::fs::create_dir(&counter).unwrap();
    let script = format!(
        "touch {c}/$$; ls {c} | wc -l >> {l}; sleep 0.2; rm {c}/$$",
        c = counter.display(),
        l = log.display()
    );
    let s = spec(&format!(
        "name: hello\nblocks:\n  - concurrency: 5\n    jobs: [{j}, {j}, {j}]\n",
        j = format!("{{action: shell, args: {{argv: [sh, -c, '{script}']}}}}")
    ));
    let a = f.engine.submit(s.clone()).await.unwrap().id;
    let b = f.engine.submit(s).await.unwrap().id;
    f.engine.exec(a).await.unwrap();
    f.engine.exec(b).await.unwrap();
    assert_eq!(wait_terminal(&f.engine, a).await.state, RunState::Completed);
    assert_eq!(wait_terminal(&f.engine, b).await.state, RunState::Completed);
    let seen: Vec<u32> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| l.trim().parse().unwrap())
        .collect();
    assert_eq!(seen.len(), 6);
    assert!(
        seen.iter().all(|&n| n <= 2),
        "never more than 2 jobs at once: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_submissions_are_refused() {
    let f = fixture(|o| o.submit_ttl = Duration::from_millis(50));
    let id = f
        .engine
        .submit(spec("name: hello\nblocks:\n  - jobs: [{action: noop}]\n"))
        .await
        .unwrap()
        .id;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(matches!(
        f.engine.exec(id).await,
        Err(EngineError::FailedPrecondition(_))
    ));
    assert_eq!(f.engine.status(id).await.unwrap().state, RunState::Expired);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_in_flight_jobs_finish_and_leaves_the_rest_unfinished() {
    let f = fixture(|_| {});
    let s = spec(
        "name: hello\nblocks:\n  - jobs: [{action: sleep, args: {duration: 300ms}}]\n  - jobs: [{action: noop}]\n",
    );
    let id = f.engine.submit(s).await.unwrap().id;
    f.engine.exec(id).await.unwrap();
    for _ in 0..500 {
        if f.engine.status(id).await.unwrap().blocks[0].jobs[0].state == JobState::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let cause = domain::StopCause::Signal {
        signal: "SIGTERM".into(),
        mode: ShutdownMode::Drain,
    };
    f.engine
        .shutdown(ShutdownMode::Drain, cause.clone(), Duration::from_secs(10))
        .await;
    let run = f.engine.status(id).await.unwrap();
    assert_eq!(
        run.blocks[0].jobs[0].state,
        JobState::Completed,
        "the in-flight job finished"
    );
    assert_eq!(
        run.blocks[1].jobs[0].state,
        JobState::Pending,
        "nothing new started"
    );
    assert_eq!(run.state, RunState::Running);
    assert_eq!(run.stop_cause, Some(cause));
    assert_eq!(run.lease_owner, None, "released for any node to resume");
    assert!(matches!(
        f.engine
            .submit(spec("name: x\nblocks: [{jobs: [{action: noop}]}]"))
            .await,
        Err(EngineError::Unavailable(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_leaves_runs_waiting_for_a_slot_queued_and_unrun() {
    let f = fixture(|o| o.max_running_jobs = 1);
    let s = spec("name: hello\nblocks:\n  - jobs: [{action: sleep, args: {duration: 300ms}}]\n");
    let first = f.engine.submit(s.clone()).await.unwrap().id;
    let waiting = f.engine.submit(s).await.unwrap().id;
    f.engine.exec(first).await.unwrap();
    for _ in 0..500 {
        if f.engine.status(first).await.unwrap().blocks[0].jobs[0].state == JobState::Running {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    f.engine.exec(waiting).await.unwrap();
    // The second run's block has started: its job is waiting for the slot the first one holds.
    wait_block(&f.engine, waiting, 0, JobState::Running).await;
    let cause = domain::StopCause::Signal {
        signal: "SIGTERM".into(),
        mode: ShutdownMode::Drain,
    };
    f.engine
        .shutdown(ShutdownMode::Drain, cause, Duration::from_secs(10))
        .await;
    assert_eq!(
        f.engine.status(first).await.unwrap().state,
        RunState::Completed
    );
    let run = f.engine.status(waiting).await.unwrap();
    assert_eq!(
        run.state,
        RunState::Queued,
        "a run that never got a slot is left queued"
    );
    assert_eq!(
        run.blocks[0].jobs[0].state,
        JobState::Pending,
        "and its job never ran"
    );
    assert_eq!(run.lease_owner, None);
}

async fn wait_block(engine: &Engine, id: RunId, block: usize, state: JobState) {
    for _ in 0..2000 {
        if engine.status(id).await.unwrap().blocks[block].state == state {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("block {block} of {id} never became {state}");
}

async fn wait_job(engine: &Engine, id: RunId, block: usize, job: usize, state: JobState) {
    for _ in 0..2000 {
        if engine.status(id).await.unwrap().blocks[block].jobs[job].state == state {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("job {block}/{job} of {id} never became {state}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estop_stop_refuses_new_work_and_stops_running_runs_for_good() {
    let f = fixture(|_| {});
    let s = spec(
        "name: Erase\nlabels: {site: aap}\nblocks:\n  - jobs: [{action: sleep, args: {duration: 60s}}, {action: noop}]\n",
    );
    let running = f.engine.submit(s.clone()).await.unwrap().id;
    let idle = f.engine.submit(s.clone()).await.unwrap().id;
    f.engine.exec(running).await.unwrap();
    wait_job(&f.engine, running, 0, 0, JobState::Running).await;

    f.set_estop(vec![
        entry("*", EStopState::Go),
        entry("site=aap", EStopState::Stop),
    ]);
    let run = wait_terminal(&f.engine, running).await;
    assert_eq!(run.state, RunState::Stopped);
    assert_eq!(
        run.blocks[0].jobs[0].state,
        JobState::Stopped,
        "the in-flight job was cancelled"
    );
    assert_eq!(
        run.blocks[0].jobs[1].state,
        JobState::Skipped,
        "never started"
    );
    match run.stop_cause.unwrap() {
        StopCause::EStop {
            target,
            set_by,
            reason,
            ..
        } => {
            assert_eq!(
                (target.as_str(), set_by.as_str(), reason.as_str()),
                ("site=aap", "ana", "INC-site=aap")
            );
        }
        other => panic!("{other:?}"),
    }
    for err in [
        f.engine.exec(idle).await.unwrap_err(),
        f.engine.submit(s).await.unwrap_err(),
    ] {
        let msg = err.to_string();
        assert!(matches!(err, EngineError::FailedPrecondition(_)), "{msg}");
        assert!(
            msg.contains("site=aap") && msg.contains("ana") && msg.contains("INC-site=aap"),
            "{msg}"
        );
    }
    assert_eq!(
        f.engine.status(idle).await.unwrap().state,
        RunState::Submitted,
        "a refused Exec changes nothing"
    );

    f.set_estop(vec![entry("*", EStopState::Go)]);
    f.engine.exec(idle).await.unwrap();
    assert_ne!(
        f.engine.status(idle).await.unwrap().state,
        RunState::Submitted,
        "Exec is accepted again after go"
    );
    // The engine acts on the go: a run executed after it starts its job. Whatever the go could
    // have done to the stopped run, it has done by now.
    wait_job(&f.engine, idle, 0, 0, JobState::Running).await;
    assert_eq!(
        f.engine.status(running).await.unwrap().state,
        RunState::Stopped,
        "stopped stays stopped"
    );
    f.engine.cancel(idle, "test", "done").await.unwrap();
    assert_eq!(
        wait_terminal(&f.engine, idle).await.state,
        RunState::Cancelled
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estop_pause_then_go_resumes_without_rerunning_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let f = fixture(|_| {});
    let job = format!(
        "{{action: shell, args: {{argv: [sh, -c, 'sleep 0.2; echo $STEWARD_IDEMPOTENCY_KEY >> {}']}}}}",
        log.display()
    );
    let id = f
        .engine
        .submit(spec(&format!(
            "name: Roll\nblocks:\n  - jobs: [{job}, {job}, {job}]\n"
        )))
        .await
        .unwrap()
        .id;
    f.engine.exec(id).await.unwrap();
    wait_job(&f.engine, id, 0, 0, JobState::Running).await;
    f.set_estop(vec![
        entry("*", EStopState::Go),
        entry("Roll", EStopState::Pause),
    ]);
    wait_job(&f.engine, id, 0, 0, JobState::Completed).await;
    for _ in 0..2000 {
        if f.engine.status(id).await.unwrap().state == RunState::Paused {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The pause is held a while after the in-flight job ended, so that a job started in spite
    // of it would be seen: its start would be recorded before the go below.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let run = f.engine.status(id).await.unwrap();
    assert_eq!(run.state, RunState::Paused);
    assert_eq!(
        run.blocks[0].jobs[1].state,
        JobState::Pending,
        "nothing new starts while paused"
    );

    let go_at = SystemClock.now();
    f.set_estop(vec![entry("*", EStopState::Go)]);
    let run = wait_terminal(&f.engine, id).await;
    assert_eq!(run.state, RunState::Completed);
    assert!(run.blocks[0].jobs.iter().all(|j| j.attempts == 1));
    // Every job has run now, once: none of the held ones started before the go.
    for (ji, job) in run.blocks[0].jobs.iter().enumerate().skip(1) {
        assert!(
            job.started_at.is_some_and(|t| t >= go_at),
            "job {ji} started while paused: {:?} before the go at {go_at:?}",
            job.started_at
        );
    }
    assert_eq!(
        std::fs::read_to_string(&log).unwrap().lines().count(),
        3,
        "every job ran exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estop_targets_and_fail_closed() {
    let f = fixture(|_| {});
    let noop = |name: &str, site: &str| {
        spec(&format!(
            "name: {name}\nlabels: {{site: {site}}}\nblocks:\n  - jobs: [{{action: noop}}]\n"
        ))
    };
    // By name, by label, and the most restrictive entry wins.
    f.set_estop(vec![
        entry("*", EStopState::Go),
        entry("Erase", EStopState::Stop),
        entry("site=bbb", EStopState::Pause),
    ]);
    assert!(f.engine.submit(noop("Erase", "aap")).await.is_err());
    assert!(f.engine.submit(noop("Other", "aap")).await.is_ok());
    assert!(
        f.engine.submit(noop("Other", "bbb")).await.is_ok(),
        "pause does not refuse submits"
    );
    f.set_estop(vec![
        entry("*", EStopState::Go),
        entry("site=bbb", EStopState::Pause),
        entry("Erase", EStopState::Go),
        entry("site=aap", EStopState::Stop),
    ]);
    assert!(
        f.engine.submit(noop("Erase", "aap")).await.is_err(),
        "stop beats go"
    );
    // Unlisted runs are refused (fail closed), and so is everything when the list is unreadable.
    f.set_estop(vec![entry("Hello", EStopState::Go)]);
    let err = f
        .engine
        .submit(noop("Other", "aap"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no e-stop entry matches"), "{err}");
    assert!(f.engine.submit(noop("Hello", "aap")).await.is_ok());
    f.estop.send_replace(Arc::new(Snapshot::Unreadable(
        "estop.json: expected value at line 1".into(),
    )));
    let err = f
        .engine
        .submit(noop("Hello", "aap"))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot be read") && err.contains("estop.json"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_error_budget_stops_starting_jobs_once_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("ran");
    let f = fixture(|_| {});
    let job = format!(
        "{{action: shell, args: {{argv: [sh, -c, 'echo x >> {}; exit 1']}}}}",
        log.display()
    );
    let s = spec(&format!(
        "name: Flaky\nblocks:\n  - concurrency: 1\n    max_failures: 2\n    jobs: [{job}, {job}, {job}, {job}, {job}]\n  - jobs: [{{action: noop}}]\n"
    ));
    let id = f.engine.submit(s).await.unwrap().id;
    f.engine.exec(id).await.unwrap();
    let run = wait_terminal(&f.engine, id).await;
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(
        std::fs::read_to_string(&log).unwrap().lines().count(),
        3,
        "exactly 3 of the 5 jobs ran"
    );
    let states: Vec<JobState> = run.blocks[0].jobs.iter().map(|j| j.state).collect();
    assert_eq!(
        states,
        [
            JobState::Failed,
            JobState::Failed,
            JobState::Failed,
            JobState::Skipped,
            JobState::Skipped
        ]
    );
    assert!(run.error.unwrap().contains("over the block's budget of 2"));
    assert_eq!(run.blocks[1].jobs[0].state, JobState::Skipped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_buckets_grant_once_per_job_and_refuse_when_empty() {
    let f = fixture(|o| {
        o.buckets.insert(
            "erase".into(),
            ratelimit::BucketSpec {
                size: 1,
                refill: 1,
                every: Duration::from_secs(1800),
            },
        );
    });
    let s = spec(
        "name: Erase\nblocks:\n  - jobs: [{action: token_bucket, args: {bucket: erase}}]\n  - jobs: [{action: noop}]\n",
    );
    let first = f.engine.submit(s.clone()).await.unwrap().id;
    f.engine.exec(first).await.unwrap();
    assert_eq!(
        wait_terminal(&f.engine, first).await.state,
        RunState::Completed
    );
    let second = f.engine.submit(s).await.unwrap().id;
    f.engine.exec(second).await.unwrap();
    let run = wait_terminal(&f.engine, second).await;
    assert_eq!(run.state, RunState::Failed);
    let err = run.blocks[0].jobs[0].error.clone().unwrap();
    assert!(
        err.contains("rate limit") && err.contains("\"erase\""),
        "{err}"
    );
    assert_eq!(run.blocks[0].jobs[0].attempts, 1, "no retry: the run fails");
    // Waiting is bounded by `wait`.
    let waited = spec(
        "name: Erase\nblocks:\n  - jobs: [{action: token_bucket, args: {bucket: erase, wait: 200ms}}]\n",
    );
    let id = f.engine.submit(waited).await.unwrap().id;
    f.engine.exec(id).await.unwrap();
    let run = wait_terminal(&f.engine, id).await;
    assert!(
        run.blocks[0].jobs[0]
            .error
            .clone()
            .unwrap()
            .contains("waited"),
        "{run:?}"
    );
    // Unknown buckets are refused at submit, naming the field.
    let bad =
        spec("name: Erase\nblocks:\n  - jobs: [{action: token_bucket, args: {bucket: nope}}]\n");
    let err = f.engine.submit(bad).await.unwrap_err().to_string();
    assert!(
        err.contains("blocks[0].jobs[0].args.bucket") && err.contains("configured buckets: erase"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_concurrency_and_the_global_cap_apply_together() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let f = fixture(|o| o.max_running_jobs = 3);
    // Each job records, as it starts, how many jobs of its run and of all runs are running.
    let all = dir.path().join("all");
    std::fs::create_dir(&all).unwrap();
    let script = format!(
        "mkdir -p {a}/$STEWARD_RUN_ID; touch {a}/$STEWARD_RUN_ID/$$ {a}/$$; echo $(ls {a}/$STEWARD_RUN_ID | wc -l) $(ls -p {a} | grep -v / | wc -l) >> {l}; sleep 0.2; rm {a}/$STEWARD_RUN_ID/$$ {a}/$$",
        a = all.display(),
        l = log.display()
    );
    let j = format!("{{action: shell, args: {{argv: [sh, -c, '{script}']}}}}");
    let s = spec(&format!(
        "name: hello\nblocks:\n  - concurrency: 2\n    jobs: [{j}, {j}, {j}, {j}]\n"
    ));
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = f.engine.submit(s.clone()).await.unwrap().id;
        f.engine.exec(id).await.unwrap();
        ids.push(id);
    }
    for id in ids {
        assert_eq!(
            wait_terminal(&f.engine, id).await.state,
            RunState::Completed
        );
    }
    let seen: Vec<(u32, u32)> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| {
            let (a, b) = l.trim().split_once(' ').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    assert_eq!(seen.len(), 12);
    assert!(
        seen.iter().all(|&(run, node)| run <= 2 && node <= 3),
        "at most 2 jobs of a run (its block's concurrency) and 3 in all (the cap): {seen:?}"
    );
    assert!(
        seen.iter().any(|&(_, node)| node >= 2),
        "jobs of different runs did overlap: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_bucket_job_waits_for_a_refill_within_its_wait() {
    let f = fixture(|o| {
        o.buckets.insert(
            "roll".into(),
            ratelimit::BucketSpec {
                size: 1,
                refill: 1,
                every: Duration::from_millis(500),
            },
        );
    });
    let s = spec(
        "name: Roll\nblocks:\n  - jobs: [{action: token_bucket, args: {bucket: roll, wait: 10s}}]\n",
    );
    let mut ids = Vec::new();
    for _ in 0..3 {
        let id = f.engine.submit(s.clone()).await.unwrap().id;
        f.engine.exec(id).await.unwrap();
        ids.push(id);
    }
    let started = std::time::Instant::now();
    for id in &ids {
        let run = wait_terminal(&f.engine, *id).await;
        assert_eq!(run.state, RunState::Completed, "{run:?}");
    }
    // One token at once, then one per refill: the last run waited for two refills.
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
}
