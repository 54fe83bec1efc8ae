#![allow(clippy::unwrap_used)]

//! Schedules against a real SQLite file. Downtime and long intervals run on tokio's paused
//! time; what depends on runs overlapping runs on the wall clock with intervals of seconds
//! (on paused time the clock would race ahead while the store's writer thread commits).

use std::sync::Arc;
use std::time::Duration;

use domain::estop::{EStopList, EStopState, Entry, Snapshot, Target};
use domain::schedule::{FireOutcome, ScheduleSpec, SkipReason};
use domain::{NodeId, RunState, RunSummary, StopCause, SystemClock, Timestamp};
use engine::{Engine, EngineOptions, TokioClock};
use store::RunFilter;
use store_sqlite::SqliteStore;

/// 2027-01-15T08:00:00Z: on the hour.
const T0: Timestamp = Timestamp(1_800_000_000_000);
const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;

fn engine_with(
    dir: &tempfile::TempDir,
    clock: Arc<dyn domain::Clock>,
    estop: engine::EStopFeed,
) -> Engine {
    let store = Arc::new(SqliteStore::open(&dir.path().join("steward.db")).unwrap());
    let e = Engine::new(
        EngineOptions::new(NodeId("test".into())),
        store,
        clock,
        estop,
    );
    e.start();
    e
}

fn engine_at(dir: &tempfile::TempDir, at: Timestamp) -> Engine {
    engine_with(
        dir,
        Arc::new(TokioClock::starting_at(at)),
        engine::estop_all_go(),
    )
}

fn schedule(yaml: &str) -> ScheduleSpec {
    ScheduleSpec::parse(yaml).unwrap()
}

/// The schedule's runs, oldest first.
async fn runs_of(e: &Engine, name: &str) -> Vec<RunSummary> {
    let mut runs = e
        .list(&RunFilter {
            schedule: Some(name.into()),
            page_size: 1000,
            ..RunFilter::default()
        })
        .await
        .unwrap()
        .runs;
    runs.reverse();
    runs
}

/// Nominal times of `runs`, relative to `base`.
fn nominals(runs: &[RunSummary], base: Timestamp) -> Vec<i64> {
    runs.iter()
        .map(|r| r.schedule.as_ref().unwrap().nominal_time.0 - base.0)
        .collect()
}

/// Polls (each poll a second of the engine's time) until `done` holds.
async fn until<F>(e: &Engine, name: &str, what: &str, done: F) -> Vec<RunSummary>
where
    F: Fn(&[RunSummary]) -> bool,
{
    for _ in 0..1200 {
        let runs = runs_of(e, name).await;
        if done(&runs) {
            return runs;
        }
        if !all_ended(&runs) {
            // A run is under way: the store's writer is a thread of its own, which a paused
            // clock does not wait for. Give it real time before the clock moves on (a
            // blocking task holds the paused clock still while it runs), or on a loaded
            // machine the clock races past the run's next fires while it commits.
            tokio::task::spawn_blocking(|| {
                let (tx, rx) = std::sync::mpsc::channel::<()>();
                let _ = rx.recv_timeout(Duration::from_millis(20));
                drop(tx);
            })
            .await
            .unwrap();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    panic!(
        "{what}: {:?}\n{:?}",
        runs_of(e, name).await,
        e.schedule_get(name).await.map(|v| v.record.state)
    );
}

fn all_ended(runs: &[RunSummary]) -> bool {
    runs.iter().all(|r| r.state.is_terminal())
}

#[tokio::test(start_paused = true)]
async fn after_three_hours_down_the_fires_inside_a_two_hour_window_run_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine_at(&dir, T0);
    e.schedule_create(
        schedule("schedule: hourly\ncron: \"0 * * * *\"\ncatchup_window: 2h\noverlap: buffer_one\nworkflow: {name: w, blocks: [{jobs: [{action: noop}]}]}"),
        "ci",
    )
    .await
    .unwrap();
    let mode = domain::stop::ShutdownMode::Now;
    e.shutdown(
        mode,
        StopCause::StopCommand { mode },
        Duration::from_secs(1),
    )
    .await;
    drop(e);

    // Back 3 h 30 s later: 09:00 is past the window, 10:00 and 11:00 are inside it.
    let e = engine_at(&dir, Timestamp(T0.0 + 3 * HOUR + 30_000));
    let runs = until(&e, "hourly", "two completed runs", |r| {
        r.len() >= 2 && all_ended(r)
    })
    .await;
    assert_eq!(nominals(&runs, T0), [2 * HOUR, 3 * HOUR]);
    assert!(runs.iter().all(|r| r.state == RunState::Completed));
    assert!(runs[0].created_at < runs[1].created_at, "in order");
    let view = e.schedule_get("hourly").await.unwrap();
    let st = &view.record.state;
    assert_eq!((st.fired, st.missed, st.skipped), (2, 1, 0));
    assert!(
        st.history
            .iter()
            .any(|h| h.nominal == Timestamp(T0.0 + HOUR)
                && h.outcome
                    == FireOutcome::Missed {
                        count: 1,
                        at_least: false
                    })
    );
    assert_eq!(view.upcoming[0].0, Timestamp(T0.0 + 4 * HOUR));
}

/// A schedule of every 2 s whose job takes 3 s, under `overlap`, for 5 fires (wall clock).
async fn overlapping(
    overlap: &str,
) -> (Vec<RunSummary>, domain::schedule::ScheduleState, Timestamp) {
    let dir = tempfile::tempdir().unwrap();
    let e = engine_with(&dir, Arc::new(SystemClock), engine::estop_all_go());
    let view = e
        .schedule_create(
            schedule(&format!("schedule: o\nevery: 2s\noverlap: {overlap}\nworkflow: {{name: w, blocks: [{{jobs: [{{action: sleep, args: {{duration: 3s}}}}]}}]}}")),
            "ci",
        )
        .await
        .unwrap();
    let first = view.upcoming[0].0;
    // Fires at +0, +2, +4, +6 and +8 s; paused at +9.
    let pause_at = first.0 + 9_000 - SystemClock.now_millis();
    tokio::time::sleep(Duration::from_millis(u64::try_from(pause_at).unwrap())).await;
    e.schedule_pause("o", "test over", "ci").await.unwrap();
    let runs = until(&e, "o", "every run ended", all_ended).await;
    let st = e.schedule_get("o").await.unwrap().record.state;
    (runs, st, first)
}

trait NowMillis {
    fn now_millis(&self) -> i64;
}

impl NowMillis for SystemClock {
    fn now_millis(&self) -> i64 {
        domain::Clock::now(self).0
    }
}

const S: i64 = 1000;

#[tokio::test]
async fn overlap_skip_skips_fires_while_the_last_run_is_running() {
    let (runs, st, first) = overlapping("skip").await;
    assert_eq!(nominals(&runs, first), [0, 4 * S, 8 * S]);
    assert_eq!(st.skipped, 2);
    assert!(st.history.iter().any(|h| matches!(
        h.outcome,
        FireOutcome::Skipped {
            reason: SkipReason::Overlap { .. }
        }
    )));
}

#[tokio::test]
async fn overlap_allow_runs_alongside() {
    let (runs, st, first) = overlapping("allow").await;
    assert_eq!(nominals(&runs, first), [0, 2 * S, 4 * S, 6 * S, 8 * S]);
    assert!(runs.iter().all(|r| r.state == RunState::Completed));
    assert_eq!(st.skipped, 0);
}

#[tokio::test]
async fn overlap_buffer_one_runs_one_waiting_fire_after_the_last_run() {
    let (runs, st, first) = overlapping("buffer_one").await;
    // +0 runs to +3; +2 waits and runs then, to about +6; +4 waits; +6 finds the buffer full.
    assert_eq!(nominals(&runs, first)[..3], [0, 2 * S, 4 * S]);
    assert!(st.skipped >= 1, "{st:?}");
    for pair in runs.windows(2) {
        assert!(
            pair[1].started_at.unwrap() >= pair[0].ended_at.unwrap(),
            "one run at a time: {pair:?}"
        );
    }
    assert!(runs.iter().all(|r| r.state == RunState::Completed));
}

#[tokio::test]
async fn overlap_cancel_previous_cancels_the_running_one() {
    let (runs, _st, first) = overlapping("cancel_previous").await;
    assert_eq!(nominals(&runs, first), [0, 2 * S, 4 * S, 6 * S, 8 * S]);
    for r in &runs[..4] {
        assert_eq!(r.state, RunState::Cancelled, "{r:?}");
        let cause = r.stop_cause.as_ref().unwrap().to_string();
        assert!(cause.contains("cancel_previous"), "{cause}");
    }
    assert_eq!(runs[4].state, RunState::Completed);
}

fn list(state: EStopState) -> Arc<Snapshot> {
    Arc::new(Snapshot::Ok(EStopList {
        entries: vec![
            Entry {
                target: Target::All,
                state: EStopState::Go,
                reason: String::new(),
                set_by: String::new(),
                set_at: String::new(),
            },
            Entry {
                target: Target::Workflow("backup".into()),
                state,
                reason: "INC-7".into(),
                set_by: "oncall".into(),
                set_at: String::new(),
            },
        ],
    }))
}

#[tokio::test]
async fn estop_stop_skips_fires_and_pause_holds_them_until_go() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(list(EStopState::Stop));
    let e = engine_with(&dir, Arc::new(SystemClock), rx);
    e.schedule_create(
        schedule("schedule: nightly\nevery: 1s\nworkflow: {name: backup, blocks: [{jobs: [{action: noop}]}]}"),
        "ci",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(runs_of(&e, "nightly").await.is_empty(), "nothing runs");
    let st = e.schedule_get("nightly").await.unwrap().record.state;
    assert!(st.skipped >= 2, "{st:?}");
    assert_eq!((st.missed, st.fired), (0, 0));
    match &st.history[0].outcome {
        FireOutcome::Skipped {
            reason: SkipReason::EStop { target, reason },
        } => {
            assert_eq!(target, "backup");
            assert!(reason.contains("INC-7"), "{reason}");
        }
        other => panic!("{other:?}"),
    }

    // Pause: the next fire creates its run, held; the ones after it overlap it.
    let paused_at = domain::Clock::now(&SystemClock);
    tx.send(list(EStopState::Pause)).unwrap();
    let runs = until(&e, "nightly", "a held run", |r| !r.is_empty()).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held = e.status(runs[0].id).await.unwrap();
    assert!(
        matches!(held.state, RunState::Paused | RunState::Queued),
        "{held:?}"
    );
    assert_eq!(held.started_at, None);
    assert_eq!(runs_of(&e, "nightly").await.len(), 1, "one held fire");

    // Go: the held run goes on; the stopped fires never run.
    tx.send(list(EStopState::Go)).unwrap();
    until(&e, "nightly", "the held run completed", |r| {
        r[0].state == RunState::Completed
    })
    .await;
    let st = e.schedule_get("nightly").await.unwrap().record.state;
    let runs = runs_of(&e, "nightly").await;
    assert!(
        runs.iter()
            .all(|r| r.schedule.as_ref().unwrap().nominal_time.0 > paused_at.0 - 1000),
        "no stopped fire ran later: {runs:?}"
    );
    assert!(st.skipped >= 2);
}

#[tokio::test]
async fn a_fire_held_by_pause_past_its_window_is_cancelled_and_counted_missed() {
    let dir = tempfile::tempdir().unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(list(EStopState::Pause));
    let e = engine_with(&dir, Arc::new(SystemClock), rx);
    e.schedule_create(
        schedule("schedule: held\nevery: 2s\ncatchup_window: 10s\nworkflow: {name: backup, blocks: [{jobs: [{action: noop}]}]}"),
        "ci",
    )
    .await
    .unwrap();
    let runs = until(&e, "held", "a held run", |r| !r.is_empty()).await;
    // Looked at on every fire: once 10 s past its nominal time, still held, it is let go.
    let first = runs[0].id;
    for _ in 0..30 {
        if e.status(first).await.unwrap().state == RunState::Cancelled {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let run = e.status(first).await.unwrap();
    assert_eq!(run.state, RunState::Cancelled, "{run:?}");
    assert!(
        run.stop_cause
            .unwrap()
            .to_string()
            .contains("catch-up window")
    );
    let st = e.schedule_get("held").await.unwrap().record.state;
    assert!(st.missed >= 1, "{st:?}");
}

#[tokio::test(start_paused = true)]
async fn pause_resume_backfill_and_trigger() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine_at(&dir, T0);
    e.schedule_create(
        schedule(
            "schedule: p\nevery: 10m\nworkflow: {name: w, blocks: [{jobs: [{action: noop}]}]}",
        ),
        "ci",
    )
    .await
    .unwrap();
    until(&e, "p", "the first fire", |r| r.len() == 1 && all_ended(r)).await;
    let paused = e.schedule_pause("p", "maintenance", "ops").await.unwrap();
    let paused_at = paused.record.state.paused.as_ref().unwrap().at;
    assert!(
        paused.upcoming.is_empty(),
        "a paused schedule shows no next fires"
    );
    tokio::time::sleep(Duration::from_secs(30 * 60)).await;
    let resumed = e.schedule_resume("p", "ops").await.unwrap();
    let resumed_at = resumed.record.state.cursor;
    assert!(resumed_at.0 - paused_at.0 >= 30 * MINUTE);
    tokio::time::sleep(Duration::from_secs(5)).await;
    // Nothing fired while paused, and resuming replays none of it.
    for n in nominals(&runs_of(&e, "p").await, Timestamp(0)) {
        assert!(
            n <= paused_at.0 || n > resumed_at.0,
            "{n} fired inside the pause"
        );
    }

    // A backfill runs them, in order, one after another; the first has a run already.
    let from = Timestamp(T0.0 + 10 * MINUTE);
    let to = Timestamp(T0.0 + 40 * MINUTE);
    let (_, n) = e.schedule_backfill("p", from, to, "ops").await.unwrap();
    assert_eq!(n, 4);
    let runs = until(&e, "p", "the backfill", |r| {
        all_ended(r)
            && nominals(r, T0)
                .iter()
                .filter(|n| (10 * MINUTE..=40 * MINUTE).contains(n))
                .count()
                == 4
    })
    .await;
    let mut seen = nominals(&runs, T0);
    let total = seen.len();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), total, "no nominal time ran twice: {runs:?}");
    assert_eq!(
        e.schedule_get("p").await.unwrap().record.state.backfill,
        None
    );
    let err = e
        .schedule_backfill("p", T0, Timestamp(T0.0 + 1000 * HOUR), "ops")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("future"), "{err}");

    // Trigger: one run now, marked as the schedule's.
    let id = e.schedule_trigger("p", "ops").await.unwrap();
    assert_eq!(e.status(id).await.unwrap().schedule.unwrap().name, "p");
    assert!(matches!(
        e.schedule_get("nope").await,
        Err(engine::EngineError::ScheduleNotFound(_))
    ));
    assert!(matches!(
        e.schedule_create(
            schedule(
                "schedule: p\nevery: 1m\nworkflow: {name: w, blocks: [{jobs: [{action: noop}]}]}"
            ),
            "ci"
        )
        .await,
        Err(engine::EngineError::ScheduleExists(_))
    ));
}
