#![allow(clippy::unwrap_used)]

//! Retention on tokio's paused time against a real SQLite file: finished runs go when their
//! workflow's retention has passed since they ended; running ones never; a pruned ID says so.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use domain::{NodeId, RunId, RunState, Timestamp, WorkflowSpec};
use engine::{Engine, EngineError, EngineOptions, Retention, TokioClock};
use store_sqlite::SqliteStore;

const T0: Timestamp = Timestamp(1_800_000_000_000);

async fn run(e: &Engine, yaml: &str) -> RunId {
    let id = e
        .submit(WorkflowSpec::parse(yaml).unwrap())
        .await
        .unwrap()
        .id;
    e.exec(id).await.unwrap();
    id
}

async fn gone(e: &Engine, id: RunId) -> bool {
    match e.status(id).await {
        Ok(_) => false,
        Err(EngineError::NotFound(_) | EngineError::Pruned { .. }) => true,
        Err(other) => panic!("{other}"),
    }
}

#[tokio::test(start_paused = true)]
async fn finished_runs_go_after_their_workflows_retention_and_running_ones_stay() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("steward.db")).unwrap());
    let mut opts = EngineOptions::new(NodeId("test".into()));
    opts.retention = Retention {
        runs: Some(Duration::from_secs(3600)),
        workflows: BTreeMap::from([
            ("fast".to_owned(), Some(Duration::from_secs(600))),
            ("forever".to_owned(), None),
        ]),
        audit: None,
    };
    let e = Engine::new(
        opts,
        store,
        Arc::new(TokioClock::starting_at(T0)),
        engine::estop_all_go(),
    );
    e.start();
    let noop = |name: &str| format!("name: {name}\nblocks:\n  - jobs: [{{action: noop}}]\n");
    let slow = run(&e, &noop("slow")).await;
    let fast = run(&e, &noop("fast")).await;
    let forever = run(&e, &noop("forever")).await;
    let long = run(
        &e,
        "name: slow\nblocks:\n  - jobs: [{action: sleep, args: {duration: 5h}}]\n",
    )
    .await;
    for id in [slow, fast, forever] {
        for _ in 0..100 {
            if e.status(id).await.unwrap().state.is_terminal() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // 30 minutes on: only `fast` (10 minutes) is past its retention.
    tokio::time::sleep(Duration::from_secs(30 * 60)).await;
    assert!(gone(&e, fast).await);
    assert!(!gone(&e, slow).await && !gone(&e, forever).await);

    // 2 hours on: `slow` (the default, 1 hour) too; `forever` and the running run stay.
    tokio::time::sleep(Duration::from_secs(90 * 60)).await;
    assert!(gone(&e, slow).await);
    assert!(!gone(&e, forever).await);
    assert_eq!(e.status(long).await.unwrap().state, RunState::Running);

    // A pruned ID answers NOT_FOUND, saying that runs that old are pruned.
    let err = e.status(slow).await.unwrap_err();
    assert!(matches!(err, EngineError::Pruned { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("retention (10m) deletes finished runs") && text.contains("pruned"),
        "{text}"
    );

    // By hand: a dry run counts, changes nothing; then it deletes.
    let later = Timestamp(e.status(forever).await.unwrap().ended_at.unwrap().0 + 1);
    assert_eq!(
        e.prune_runs(later, Some("forever".into()), true)
            .await
            .unwrap(),
        1
    );
    assert!(!gone(&e, forever).await);
    assert_eq!(
        e.prune_runs(later, Some("forever".into()), false)
            .await
            .unwrap(),
        1
    );
    assert!(gone(&e, forever).await);
}
