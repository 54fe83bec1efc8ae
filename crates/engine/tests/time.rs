#![allow(clippy::unwrap_used)]

//! Time as an input: the engine on tokio's paused time with a clock that follows it. Waits of
//! minutes and hours pass at once; the timestamps the engine records show them.

use std::sync::Arc;
use std::time::Duration;

use domain::{JobState, NodeId, RunId, RunState, Timestamp, WorkflowSpec};
use engine::{Engine, EngineError, EngineOptions, TokioClock};
use store_sqlite::SqliteStore;

const T0: Timestamp = Timestamp(1_800_000_000_000);
const MINUTE: i64 = 60_000;

fn engine(dir: &tempfile::TempDir, tweak: impl FnOnce(&mut EngineOptions)) -> Engine {
    let store = Arc::new(SqliteStore::open(&dir.path().join("steward.db")).unwrap());
    let mut opts = EngineOptions::new(NodeId("test".into()));
    tweak(&mut opts);
    let e = Engine::new(
        opts,
        store,
        Arc::new(TokioClock::starting_at(T0)),
        engine::estop_all_go(),
    );
    e.start();
    e
}

async fn wait_terminal(engine: &Engine, id: RunId) -> domain::Run {
    loop {
        let run = engine.status(id).await.unwrap();
        if run.state.is_terminal() {
            return run;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_ten_minute_retry_backoff_passes_at_once() {
    let real = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&dir, |_| {});
    let marker = dir.path().join("failed-once");
    let spec = WorkflowSpec::parse(&format!(
        "name: hello\nblocks:\n  - jobs:\n      - action: shell\n        args: {{argv: [sh, -c, 'if [ -e {m} ]; then exit 0; fi; touch {m}; exit 1']}}\n        retry: {{attempts: 2, initial_backoff: 10m, max_backoff: 10m}}\n",
        m = marker.display()
    ))
    .unwrap();
    let id = e.submit(spec).await.unwrap().id;
    e.exec(id).await.unwrap();
    let run = wait_terminal(&e, id).await;
    assert_eq!(run.state, RunState::Completed, "{run:?}");
    let job = &run.blocks[0].jobs[0];
    assert_eq!((job.state, job.attempts), (JobState::Completed, 2));
    let waited = run.ended_at.unwrap().0 - run.started_at.unwrap().0;
    assert!(
        waited >= 10 * MINUTE,
        "the backoff is in the record: {waited} ms"
    );
    assert!(
        real.elapsed() < Duration::from_secs(20),
        "and took no real time: {:?}",
        real.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn a_one_hour_submit_ttl_expires_at_once() {
    let real = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let e = engine(&dir, |o| o.submit_ttl = Duration::from_secs(3600));
    let spec = WorkflowSpec::parse("name: hello\nblocks:\n  - jobs: [{action: noop}]\n").unwrap();
    let late = e.submit(spec.clone()).await.unwrap().id;
    let on_time = e.submit(spec).await.unwrap().id;

    // Well inside the hour: paused time leaps to the next timer whenever the runtime waits on
    // the database's thread, so a call can end minutes of virtual time after it began.
    tokio::time::sleep(Duration::from_secs(30 * 60)).await;
    e.exec(on_time).await.unwrap();
    assert_eq!(wait_terminal(&e, on_time).await.state, RunState::Completed);

    tokio::time::sleep(Duration::from_secs(31 * 60)).await;
    let err = e.exec(late).await.unwrap_err();
    assert!(
        matches!(err, EngineError::FailedPrecondition(ref m) if m.contains("1h")),
        "{err:?}"
    );
    let run = e.status(late).await.unwrap();
    assert_eq!(run.state, RunState::Expired);
    assert!(run.ended_at.unwrap().0 - run.created_at.0 >= 60 * MINUTE);
    assert!(
        real.elapsed() < Duration::from_secs(20),
        "no real hour: {:?}",
        real.elapsed()
    );
}
