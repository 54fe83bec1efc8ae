//! [`BucketStore`] for PostgreSQL: each take locks its bucket's row, so nodes taking from one
//! bucket at once are serialized and never hand out a token twice.

use async_trait::async_trait;
use domain::Timestamp;
use ratelimit::{BucketSpec, BucketState};
use store::{BucketStore, BucketTake, Result};

use crate::rows::get;
use crate::{PgStore, db_err};

#[async_trait]
impl BucketStore for PgStore {
    async fn bucket_take(
        &self,
        bucket: &str,
        spec: &BucketSpec,
        grant_key: &str,
        now: Timestamp,
    ) -> Result<BucketTake> {
        let (bucket, spec, grant_key) = (bucket.to_owned(), spec.clone(), grant_key.to_owned());
        self.write(move |c| {
            Box::pin(async move {
                // A bucket never taken from has a row with tokens -1 (it starts full): the row
                // exists before it is locked, so two nodes' first takes are serialized too.
                c.execute(
                    "INSERT INTO buckets (name, tokens, refilled_at) VALUES ($1, -1, 0)
                     ON CONFLICT (name) DO NOTHING",
                    &[&bucket],
                )
                .await
                .map_err(db_err)?;
                let row = c
                    .query_one(
                        "SELECT tokens, refilled_at FROM buckets WHERE name = $1 FOR UPDATE",
                        &[&bucket],
                    )
                    .await
                    .map_err(db_err)?;
                let tokens: i64 = get(&row, 0)?;
                let state = match u64::try_from(tokens) {
                    Ok(tokens) => Some(BucketState {
                        tokens,
                        refilled_at: Timestamp(get(&row, 1)?),
                    }),
                    Err(_) => None,
                };
                let granted_before = c
                    .query_opt(
                        "SELECT granted_at FROM bucket_grants WHERE grant_key = $1 AND bucket = $2",
                        &[&grant_key, &bucket],
                    )
                    .await
                    .map_err(db_err)?;
                if granted_before.is_some() {
                    return Ok(BucketTake::regranted(&spec, state, now));
                }
                let take = spec.take(state, now);
                c.execute(
                    "UPDATE buckets SET tokens = $2, refilled_at = $3 WHERE name = $1",
                    &[
                        &bucket,
                        &i64::try_from(take.state.tokens).unwrap_or(i64::MAX),
                        &take.state.refilled_at.0,
                    ],
                )
                .await
                .map_err(db_err)?;
                if take.granted {
                    c.execute(
                        "INSERT INTO bucket_grants (grant_key, bucket, granted_at) VALUES ($1, $2, $3)",
                        &[&grant_key, &bucket, &now.0],
                    )
                    .await
                    .map_err(db_err)?;
                }
                Ok(BucketTake::first(&take))
            })
        })
        .await
    }
}
