#![allow(clippy::unwrap_used)]

//! The storage contract on SQLite: one test per conformance case, each on a fresh database file.

use std::sync::Arc;

use store::{AuthStore, BucketStore, EStopStore, RunStore};
use store_sqlite::SqliteStore;

fn open() -> (tempfile::TempDir, Arc<SqliteStore>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(&dir.path().join("steward.db")).unwrap());
    (dir, store)
}

async fn runs() -> (tempfile::TempDir, Arc<dyn RunStore>) {
    let (dir, s) = open();
    (dir, s)
}

async fn estop() -> (tempfile::TempDir, Arc<dyn EStopStore>) {
    let (dir, s) = open();
    (dir, s)
}

async fn buckets() -> (tempfile::TempDir, Arc<dyn BucketStore>) {
    let (dir, s) = open();
    (dir, s)
}

async fn auth() -> (tempfile::TempDir, Arc<dyn AuthStore>) {
    let (g, s) = open();
    (g, s)
}

async fn whole() -> (tempfile::TempDir, Arc<SqliteStore>) {
    open()
}

store_conformance::conformance_tests! {
    runs: runs,
    estop: estop,
    buckets: buckets,
    auth: auth,
    whole: whole,
}
