#![allow(clippy::unwrap_used)]

//! The same operations, fed to SQLite and to PostgreSQL, give the same answers and leave the
//! same runs behind: a pseudo-random mix of every call the API and the engine make.

use std::sync::Arc;

use domain::{JobKey, JobState, NodeId, RunId, RunState, StopCause, Timestamp};
use store::{RunFilter, RunStore, Transition};
use store_conformance::{new_run, spec};
use store_postgres::PgStore;
use store_postgres::testing::PgServer;
use store_sqlite::SqliteStore;
use tokio_util::task::TaskTracker;

/// xorshift64*: the same sequence on every run of the test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap()
    }
}

const T0: i64 = 1_800_000_000_000;

fn random_transition(rng: &mut Rng, at: Timestamp) -> Transition {
    let key = JobKey {
        block: u32::try_from(rng.below(3)).unwrap(),
        job: u32::try_from(rng.below(3)).unwrap(),
    };
    let block = key.block;
    match rng.below(9) {
        0 => Transition::RunRunning { at },
        1 => Transition::RunPaused { at },
        2 => Transition::BlockStarted { block, at },
        3 => Transition::JobStarted {
            key,
            attempt: u32::try_from(rng.below(3)).unwrap() + 1,
            at,
        },
        4 => Transition::JobFinished {
            key,
            state: [JobState::Completed, JobState::Failed][rng.below(2)],
            at,
            error: (rng.below(2) == 0).then(|| "exit 1".to_owned()),
            exit_code: Some(i32::try_from(rng.below(3)).unwrap()),
            output: "out".repeat(rng.below(4)),
        },
        5 => Transition::JobInterrupted {
            key,
            error: "interrupted".into(),
        },
        6 => Transition::BlockFinished {
            block,
            state: [JobState::Completed, JobState::Failed][rng.below(2)],
            at,
        },
        7 => Transition::RunFinished {
            state: [RunState::Completed, RunState::Failed, RunState::Stopped][rng.below(3)],
            at,
            error: Some("done".into()),
            stop_cause: (rng.below(2) == 0).then(|| StopCause::LostStore {
                message: "x".into(),
            }),
        },
        _ => Transition::RunInterrupted {
            cause: StopCause::Fatal {
                component: "test".into(),
                message: "x".into(),
            },
        },
    }
}

/// Results compared by value; errors by kind (their messages name the backend).
fn same<T: std::fmt::Debug + PartialEq>(
    step: usize,
    what: &str,
    a: store::Result<T>,
    b: store::Result<T>,
) {
    match (&a, &b) {
        (Ok(x), Ok(y)) => assert_eq!(x, y, "step {step} {what}"),
        (Err(x), Err(y)) => assert_eq!(
            std::mem::discriminant(x),
            std::mem::discriminant(y),
            "step {step} {what}: {x:?} vs {y:?}"
        ),
        _ => panic!("step {step} {what}: sqlite {a:?}, postgres {b:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_and_postgres_agree_on_every_operation() {
    let pg = PgServer::start().await;
    let tracker = TaskTracker::new();
    let dir = tempfile::tempdir().unwrap();
    let lite: Arc<dyn RunStore> = Arc::new(SqliteStore::open(&dir.path().join("s.db")).unwrap());
    let post: Arc<dyn RunStore> = Arc::new(
        PgStore::connect(&pg.fresh_db().await, &tracker)
            .await
            .unwrap(),
    );
    let nodes = [NodeId("a".into()), NodeId("b".into())];
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let mut ids: Vec<RunId> = Vec::new();
    for step in 0..1500 {
        let now = Timestamp(T0 + i64::try_from(step).unwrap() * 1000);
        let node = &nodes[rng.below(2)];
        let pick = |rng: &mut Rng, ids: &[RunId]| {
            if ids.is_empty() || rng.below(20) == 0 {
                RunId::new_v7() // unknown to both
            } else {
                ids[rng.below(ids.len())]
            }
        };
        match rng.below(10) {
            0 | 1 => {
                let mut s = spec(
                    ["erase", "roll"][rng.below(2)],
                    rng.below(3) + 1,
                    rng.below(3) + 1,
                );
                if rng.below(3) == 0 {
                    s.idempotency_key = Some(format!("key-{}", rng.below(10)));
                }
                if rng.below(2) == 0 {
                    s.labels
                        .insert("site".into(), ["aap", "bbb"][rng.below(2)].into());
                }
                let mut nr = new_run(s);
                nr.created_at = now;
                nr.expires_at = Timestamp(now.0 + i64::try_from(rng.below(200)).unwrap() * 1000);
                let (a, b) = (lite.submit(nr.clone()).await, post.submit(nr.clone()).await);
                if a.as_ref().is_ok_and(|s| s.created) {
                    ids.push(nr.id);
                }
                same(step, "submit", a, b);
            }
            2 => {
                let id = pick(&mut rng, &ids);
                let until = Timestamp(now.0 + 5000);
                same(
                    step,
                    "exec",
                    lite.exec(id, node, now, until).await,
                    post.exec(id, node, now, until).await,
                );
            }
            3..=5 => {
                let id = pick(&mut rng, &ids);
                let ts: Vec<Transition> = (0..rng.below(4) + 1)
                    .map(|_| random_transition(&mut rng, now))
                    .collect();
                same(
                    step,
                    "apply",
                    lite.apply(node, id, ts.clone()).await,
                    post.apply(node, id, ts).await,
                );
            }
            6 => {
                let id = pick(&mut rng, &ids);
                let cause = StopCause::Cancelled {
                    by: "ana".into(),
                    reason: "r".into(),
                };
                same(
                    step,
                    "cancel",
                    lite.cancel(id, cause.clone(), now).await,
                    post.cancel(id, cause, now).await,
                );
            }
            7 => same(
                step,
                "expire",
                lite.expire_submitted(now).await,
                post.expire_submitted(now).await,
            ),
            8 => {
                let until = Timestamp(now.0 + 5000);
                let (mut a, mut b) = (
                    lite.claim_orphans(node, now, until, 5).await.unwrap(),
                    post.claim_orphans(node, now, until, 5).await.unwrap(),
                );
                a.sort();
                b.sort();
                assert_eq!(a, b, "step {step} claim");
                let (mut a, mut b) = (
                    lite.recover(node, until, 100).await.unwrap(),
                    post.recover(node, until, 100).await.unwrap(),
                );
                a.sort();
                b.sort();
                assert_eq!(a, b, "step {step} recover");
            }
            _ => {
                let id = pick(&mut rng, &ids);
                if rng.below(2) == 0 {
                    same(
                        step,
                        "release",
                        lite.release(node, id).await,
                        post.release(node, id).await,
                    );
                } else {
                    let held: Vec<RunId> =
                        ids.iter().copied().filter(|_| rng.below(3) == 0).collect();
                    let until = Timestamp(now.0 + 5000);
                    let (a, b) = (
                        lite.renew_leases(node, &held, until).await.unwrap(),
                        post.renew_leases(node, &held, until).await.unwrap(),
                    );
                    let norm = |mut r: store::LeaseRenewal| {
                        r.cancel_requested.sort_by_key(|(id, _)| *id);
                        r.lost.sort();
                        (r.cancel_requested, r.lost)
                    };
                    assert_eq!(norm(a), norm(b), "step {step} renew");
                }
            }
        }
    }
    assert!(ids.len() > 100, "the mix stored runs: {}", ids.len());
    for id in &ids {
        assert_eq!(
            lite.get(*id).await.unwrap(),
            post.get(*id).await.unwrap(),
            "run {id}"
        );
    }
    let filters = [
        RunFilter::default(),
        RunFilter {
            states: vec![RunState::Queued, RunState::Running],
            ..Default::default()
        },
        RunFilter {
            name: Some("erase".into()),
            page_size: 7,
            ..Default::default()
        },
        RunFilter {
            labels: [("site".to_owned(), "aap".to_owned())].into(),
            page_size: 5,
            ..Default::default()
        },
    ];
    for mut f in filters {
        loop {
            let (a, b) = (lite.list(&f).await.unwrap(), post.list(&f).await.unwrap());
            assert_eq!(format!("{:?}", a.runs), format!("{:?}", b.runs), "{f:?}");
            assert_eq!(a.next_page_token, b.next_page_token);
            match a.next_page_token {
                Some(t) => f.page_token = Some(t),
                None => break,
            }
        }
    }
}
