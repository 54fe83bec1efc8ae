#![allow(clippy::unwrap_used)]

//! The storage contract on a real PostgreSQL server: one test per conformance case, each on a
//! server of its own (a server starts in about a second).

use std::sync::Arc;

use store::{AuthStore, BucketStore, EStopStore, RunStore};
use store_postgres::PgStore;
use store_postgres::testing::PgServer;
use tokio_util::task::TaskTracker;

/// What must outlive the store: the server and the tracker of the store's tasks.
type Guard = (PgServer, TaskTracker);

async fn open() -> (Guard, Arc<PgStore>) {
    let pg = PgServer::start().await;
    let tracker = TaskTracker::new();
    let store = Arc::new(
        PgStore::connect(&pg.fresh_db().await, &tracker)
            .await
            .unwrap(),
    );
    ((pg, tracker), store)
}

async fn runs() -> (Guard, Arc<dyn RunStore>) {
    let (g, s) = open().await;
    (g, s)
}

async fn estop() -> (Guard, Arc<dyn EStopStore>) {
    let (g, s) = open().await;
    (g, s)
}

async fn buckets() -> (Guard, Arc<dyn BucketStore>) {
    let (g, s) = open().await;
    (g, s)
}

async fn auth() -> (Guard, Arc<dyn AuthStore>) {
    let (g, s) = open().await;
    (g, s)
}

store_conformance::conformance_tests! {
    runs: runs,
    estop: estop,
    buckets: buckets,
    auth: auth,
    whole: open,
}
