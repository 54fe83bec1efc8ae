#![allow(clippy::unwrap_used)]

use store::{EStopStore, RunStore};
use store_sqlite::SqliteStore;

#[tokio::test]
async fn a_second_handle_sees_estop_saves() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("steward.db");
    let a = SqliteStore::open(&path).unwrap();
    let b = SqliteStore::open(&path).unwrap();
    assert_eq!(b.estop_version().await.unwrap(), 0);
    let list = domain::estop::EStopList {
        entries: vec![store_conformance::estop_entry(
            "*",
            domain::estop::EStopState::Stop,
            "INC-1",
            "ana",
        )],
    };
    let v = a.estop_save(list.clone(), 0, vec![]).await.unwrap();
    assert_eq!(b.estop_version().await.unwrap(), v);
    assert_eq!(b.estop_load().await.unwrap(), (list, v));
    a.close().await.unwrap();
    b.close().await.unwrap();
}

#[tokio::test]
async fn reopening_keeps_runs_and_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("steward.db");
    let nr = store_conformance::new_run(store_conformance::spec("hello", 1, 2));
    {
        let s = SqliteStore::open(&path).unwrap();
        s.submit(nr.clone()).await.unwrap();
        s.close().await.unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    let run = s.get(nr.id).await.unwrap();
    assert_eq!(run.spec, nr.spec);
}

#[tokio::test]
async fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("steward.db");
    {
        let c = rusqlite::Connection::open(&path).unwrap();
        c.execute_batch("PRAGMA user_version = 99").unwrap();
    }
    let err = SqliteStore::open(&path).err().unwrap();
    assert!(err.to_string().contains("newer than this steward"), "{err}");
}

#[tokio::test]
async fn writes_after_close_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("steward.db")).unwrap();
    s.close().await.unwrap();
    let nr = store_conformance::new_run(store_conformance::spec("hello", 1, 1));
    assert_eq!(s.submit(nr).await.unwrap_err(), store::Error::Closed);
}

#[tokio::test]
async fn buckets_survive_a_reopen() {
    use store::BucketStore;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("steward.db");
    let spec = ratelimit::BucketSpec {
        size: 1,
        refill: 1,
        every: std::time::Duration::from_secs(1800),
    };
    let t0 = domain::Timestamp(1_800_000_000_000);
    {
        let s = SqliteStore::open(&path).unwrap();
        assert!(
            s.bucket_take("erase", &spec, "a", t0)
                .await
                .unwrap()
                .granted
        );
        s.close().await.unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    let t = s
        .bucket_take("erase", &spec, "b", domain::Timestamp(t0.0 + 1000))
        .await
        .unwrap();
    assert!(!t.granted, "a restart does not refill the bucket");
    assert!(
        s.bucket_take("erase", &spec, "a", domain::Timestamp(t0.0 + 1000))
            .await
            .unwrap()
            .already
    );
}
