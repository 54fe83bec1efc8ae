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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance() {
    let pg = PgServer::start().await;
    let tracker = TaskTracker::new();
    store::conformance::run_all(|| async {
        open(&pg.fresh_db().await, &tracker).await as Arc<dyn RunStore>
    })
    .await;
    store::conformance::run_estop_all(|| async {
        open(&pg.fresh_db().await, &tracker).await as Arc<dyn EStopStore>
    })
    .await;
    store::conformance::run_bucket_all(|| async {
        open(&pg.fresh_db().await, &tracker).await as Arc<dyn BucketStore>
    })
    .await;
}
