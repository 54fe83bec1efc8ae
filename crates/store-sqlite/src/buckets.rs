//! [`BucketStore`] for SQLite: each take is one transaction in the writer's batch.

use async_trait::async_trait;
use domain::Timestamp;
use ratelimit::{BucketSpec, BucketState};
use rusqlite::{OptionalExtension, params};
use store::{BucketStore, BucketTake, Result};

use crate::{SqliteStore, db_err};

#[async_trait]
impl BucketStore for SqliteStore {
    async fn bucket_take(
        &self,
        bucket: &str,
        spec: &BucketSpec,
        grant_key: &str,
        now: Timestamp,
    ) -> Result<BucketTake> {
        let (bucket, spec, grant_key) = (bucket.to_owned(), spec.clone(), grant_key.to_owned());
        self.write(move |c| {
            let state: Option<BucketState> = c
                .prepare_cached("SELECT tokens, refilled_at FROM buckets WHERE name = ?1")
                .and_then(|mut s| {
                    s.query_row([&bucket], |r| {
                        Ok(BucketState {
                            tokens: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                            refilled_at: Timestamp(r.get(1)?),
                        })
                    })
                    .optional()
                })
                .map_err(db_err)?;
            let granted_before: Option<i64> = c
                .prepare_cached("SELECT granted_at FROM bucket_grants WHERE grant_key = ?1 AND bucket = ?2")
                .and_then(|mut s| s.query_row(params![grant_key, bucket], |r| r.get(0)).optional())
                .map_err(db_err)?;
            if granted_before.is_some() {
                return Ok(BucketTake::regranted(&spec, state, now));
            }
            let take = spec.take(state, now);
            c.prepare_cached(
                "INSERT INTO buckets (name, tokens, refilled_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name) DO UPDATE SET tokens = excluded.tokens, refilled_at = excluded.refilled_at",
            )
            .and_then(|mut s| {
                s.execute(params![
                    bucket,
                    i64::try_from(take.state.tokens).unwrap_or(i64::MAX),
                    take.state.refilled_at.0
                ])
            })
            .map_err(db_err)?;
            if take.granted {
                c.prepare_cached("INSERT INTO bucket_grants (grant_key, bucket, granted_at) VALUES (?1, ?2, ?3)")
                    .and_then(|mut s| s.execute(params![grant_key, bucket, now.0]))
                    .map_err(db_err)?;
            }
            Ok(BucketTake::first(&take))
        })
        .await
    }
}
