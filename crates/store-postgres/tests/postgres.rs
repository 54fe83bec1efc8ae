#![allow(clippy::unwrap_used)]

//! The store contract on a real PostgreSQL server, and what only several nodes sharing it see.

use std::sync::Arc;

use store::{BucketStore, EStopStore, RunStore};
use store_postgres::PgStore;
use store_postgres::testing::PgServer;
use tokio_util::task::TaskTracker;

async fn open(url: &str, tracker: &TaskTracker) -> Arc<PgStore> {
    Arc::new(PgStore::connect(url, tracker).await.unwrap())
}

use domain::{NodeId, Timestamp};
use store_conformance::{new_run, spec};

const T0: Timestamp = Timestamp(1_800_000_000_000);

/// `n` handles on one database, as `n` nodes would have.
async fn nodes(pg: &PgServer, n: usize, tracker: &TaskTracker) -> Vec<Arc<PgStore>> {
    let url = pg.fresh_db().await;
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(open(&url, tracker).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_claiming_orphans_at_once_never_claim_one_run_twice() {
    let pg = PgServer::start().await;
    let tracker = TaskTracker::new();
    let stores = nodes(&pg, 4, &tracker).await;
    let dead = NodeId("dead".into());
    let mut ids = Vec::new();
    for _ in 0..200 {
        let nr = new_run(spec("hello", 1, 1));
        stores[0].submit(nr.clone()).await.unwrap();
        stores[0]
            .exec(nr.id, &dead, T0, Timestamp(T0.0 + 1000))
            .await
            .unwrap();
        ids.push(nr.id);
    }
    // The dead node's leases have run out: four nodes claim in small bites, all at once.
    let later = Timestamp(T0.0 + 5000);
    let claims = futures::future::join_all(stores.iter().enumerate().map(|(i, s)| {
        let s = s.clone();
        async move {
            let me = NodeId(format!("n{i}"));
            let mut mine = Vec::new();
            loop {
                let got = s
                    .claim_orphans(&me, later, Timestamp(later.0 + 60_000), 7)
                    .await
                    .unwrap();
                if got.is_empty() {
                    return (me, mine);
                }
                mine.extend(got);
            }
        }
    }))
    .await;
    let mut all: Vec<_> = claims.iter().flat_map(|(_, m)| m.clone()).collect();
    all.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(all, want, "every orphan claimed exactly once");
    for (me, mine) in &claims {
        for id in mine {
            assert_eq!(
                stores[3].get(*id).await.unwrap().lease_owner.as_ref(),
                Some(me)
            );
        }
    }
    // The dead node's late write is fenced off.
    let err = stores[0]
        .apply(
            &dead,
            ids[0],
            vec![store::Transition::RunRunning { at: later }],
        )
        .await
        .unwrap_err();
    assert_eq!(err, store::Error::LeaseLost { run: ids[0] });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_idempotency_key_submitted_on_two_nodes_at_once_stores_one_run() {
    let pg = PgServer::start().await;
    let tracker = TaskTracker::new();
    let stores = nodes(&pg, 2, &tracker).await;
    for i in 0..20 {
        let mut s = spec("hello", 2, 2);
        s.idempotency_key = Some(format!("key-{i}"));
        let (a, b) = (new_run(s.clone()), new_run(s));
        let (ra, rb) = tokio::join!(stores[0].submit(a), stores[1].submit(b));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        assert_eq!(ra.id, rb.id, "both nodes answer the same run");
        assert!(ra.created ^ rb.created, "exactly one stored it");
        assert_eq!(stores[1].get(ra.id).await.unwrap().blocks.len(), 2);
    }
    let page = stores[0].list(&store::RunFilter::default()).await.unwrap();
    assert_eq!(page.runs.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_sharing_a_bucket_never_hand_out_a_token_twice() {
    let pg = PgServer::start().await;
    let tracker = TaskTracker::new();
    let stores = nodes(&pg, 4, &tracker).await;
    let bucket = ratelimit::BucketSpec {
        size: 5,
        refill: 1,
        every: std::time::Duration::from_secs(3600),
    };
    let takes = futures::future::join_all((0..40).map(|i| {
        let s = stores[i % 4].clone();
        let bucket = bucket.clone();
        async move {
            s.bucket_take("erase", &bucket, &format!("job-{i}"), T0)
                .await
                .unwrap()
        }
    }))
    .await;
    assert_eq!(takes.iter().filter(|t| t.granted).count(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn estop_saves_from_two_nodes_at_once_one_wins_and_both_see_it() {
    use domain::estop::{EStopList, EStopState};
    let pg = PgServer::start().await;
    let tracker = TaskTracker::new();
    let stores = nodes(&pg, 2, &tracker).await;
    let list = |reason: &str| EStopList {
        entries: vec![store_conformance::estop_entry(
            "site=aap",
            EStopState::Stop,
            reason,
            "ana",
        )],
    };
    let (a, b) = tokio::join!(
        stores[0].estop_save(list("from a"), 0, Vec::new()),
        stores[1].estop_save(list("from b"), 0, Vec::new())
    );
    assert!(a.is_ok() ^ b.is_ok(), "{a:?} {b:?}");
    let loser = if a.is_ok() { b } else { a };
    assert!(matches!(loser, Err(store::Error::Conflict(_))), "{loser:?}");
    let (seen_a, va) = stores[0].estop_load().await.unwrap();
    let (seen_b, vb) = stores[1].estop_load().await.unwrap();
    assert_eq!((va, vb), (1, 1));
    assert_eq!(seen_a, seen_b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_starting_together_migrate_once() {
    let pg = PgServer::start().await;
    let tracker = TaskTracker::new();
    let url = pg.fresh_db().await;
    let opened = futures::future::join_all((0..4).map(|_| PgStore::connect(&url, &tracker))).await;
    for s in opened {
        s.unwrap();
    }
}

#[test]
fn database_urls_are_checked_and_their_passwords_hidden() {
    use store_postgres::redacted_url;
    assert_eq!(
        redacted_url("postgres://steward:s3cret@db.example:5432/steward").unwrap(),
        "postgres://steward:***@db.example:5432/steward"
    );
    assert_eq!(
        redacted_url("postgresql://steward@127.0.0.1/steward").unwrap(),
        "postgresql://steward@127.0.0.1/steward"
    );
    // Percent-encoded, with an '@' of its own, or as a parameter: hidden all the same.
    for (url, shown) in [
        (
            "postgres://steward:p%40ss%3Aw0rd@db:5432/steward",
            "postgres://steward:***@db:5432/steward",
        ),
        (
            "postgres://steward:p@ss@db/steward?sslmode=disable",
            "postgres://steward:***@db/steward?sslmode=disable",
        ),
        (
            "postgres://steward@db/steward?password=hunter2&application_name=x",
            "postgres://steward@db/steward?password=***&application_name=x",
        ),
    ] {
        let r = redacted_url(url).unwrap();
        assert_eq!(r, shown);
        for secret in ["p%40ss", "w0rd", "hunter2", "p@ss"] {
            assert!(!r.contains(secret), "{url}: {r}");
        }
    }
    for (bad, why) in [
        ("mysql://x@y/z", "postgres://"),
        ("postgres://steward@127.0.0.1:5432", "names no database"),
        ("postgres://steward@127.0.0.1:port/x", "invalid"),
    ] {
        let err = redacted_url(bad).unwrap_err();
        assert!(err.contains(why), "{bad}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_estop_save_on_one_node_notifies_the_others() {
    use domain::estop::{EStopList, EStopState};
    let pg = PgServer::start().await;
    let tracker = TaskTracker::new();
    let stores = nodes(&pg, 2, &tracker).await;
    let mut notes = stores[1]
        .estop_notifications()
        .expect("postgres signals e-stop changes");
    // Both nodes' listeners are subscribed: their sessions last ran LISTEN.
    let (client, conn) = tokio_postgres::connect(&pg.url("postgres"), tokio_postgres::NoTls)
        .await
        .unwrap();
    let wait = async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let row = client
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'LISTEN steward_estop'",
                    &[],
                )
                .await
                .unwrap();
            if row.get::<_, i64>(0) >= 2 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the listeners never subscribed"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::pin!(conn);
    tokio::select! {
        () = wait => {}
        r = &mut conn => panic!("connection ended: {r:?}"),
    }
    let before = *notes.borrow_and_update();
    let list = EStopList {
        entries: vec![store_conformance::estop_entry(
            "*",
            EStopState::Stop,
            "INC-1",
            "ana",
        )],
    };
    stores[0].estop_save(list, 0, Vec::new()).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(30), notes.changed())
        .await
        .expect("the other node hears of the save")
        .unwrap();
    assert!(*notes.borrow() > before);
}
