//! [`AuthStore`] for PostgreSQL: the statements are `store::sql`'s; every node reads the same
//! table, so a token created or revoked on one is seen by all.

use async_trait::async_trait;
use domain::Timestamp;
use store::sql::{self, Statement, Value};
use store::{AccessRecord, AuthStore, Error, Result, TokenRecord};

use crate::rows::{PgRow, binds, refs};
use crate::{PgStore, db_err};

#[async_trait]
impl AuthStore for PgStore {
    async fn token_create(&self, token: TokenRecord) -> Result<()> {
        self.write(move |c| {
            Box::pin(async move {
                let n = c
                    .run(&Statement {
                        sql: "INSERT INTO tokens (name, hash, role, scope, created_by, created_at, expires_at)
                              VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (name) DO NOTHING",
                        params: sql::token_params(&token)?,
                    })
                    .await?;
                if n == 0 {
                    return Err(Error::Conflict(format!(
                        "a token named {:?} exists",
                        token.name
                    )));
                }
                Ok(())
            })
        })
        .await
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        let c = self.reader().await?;
        let params = [Value::Text(hash.to_owned())];
        let b = binds(&params);
        let rows = c
            .query(
                &format!("SELECT {} FROM tokens WHERE hash = $1", sql::TOKEN_COLUMNS),
                &refs(&b),
            )
            .await
            .map_err(db_err)?;
        rows.first().map(|r| sql::token(&PgRow(r))).transpose()
    }

    async fn token_by_name(&self, name: &str) -> Result<Option<TokenRecord>> {
        let c = self.reader().await?;
        let params = [Value::Text(name.to_owned())];
        let b = binds(&params);
        let rows = c
            .query(
                &format!("SELECT {} FROM tokens WHERE name = $1", sql::TOKEN_COLUMNS),
                &refs(&b),
            )
            .await
            .map_err(db_err)?;
        rows.first().map(|r| sql::token(&PgRow(r))).transpose()
    }

    async fn token_list(&self) -> Result<Vec<TokenRecord>> {
        let c = self.reader().await?;
        let rows = c
            .query(
                &format!("SELECT {} FROM tokens ORDER BY name", sql::TOKEN_COLUMNS),
                &[],
            )
            .await
            .map_err(db_err)?;
        rows.iter().map(|r| sql::token(&PgRow(r))).collect()
    }

    async fn token_revoke(&self, name: &str) -> Result<bool> {
        let name = Value::Text(name.to_owned());
        self.write(move |c| {
            Box::pin(async move {
                c.run(&Statement {
                    sql: sql::TOKEN_REVOKE,
                    params: vec![name],
                })
                .await
                .map(|n| n > 0)
            })
        })
        .await
    }

    fn token_used(&self, name: &str, at: Timestamp) {
        let params = vec![name.into(), at.0.into()];
        self.write_planned_nowait(
            "token use",
            vec![Statement {
                sql: sql::TOKEN_USED,
                params,
            }],
        );
    }

    fn access_append(&self, records: Vec<AccessRecord>) {
        let statements = records
            .iter()
            .map(|a| Statement {
                sql: sql::ACCESS_APPEND,
                params: sql::access_params(a),
            })
            .collect();
        self.write_planned_nowait("access log", statements);
    }

    async fn access_list(&self, limit: u32) -> Result<Vec<AccessRecord>> {
        let limit = [Value::from(store::effective_audit_limit(limit))];
        // Appends are queued: the log read after a call holds that call's line.
        self.write(|_| Box::pin(async { Ok(()) })).await?;
        let c = self.reader().await?;
        let b = binds(&limit);
        let rows = c.query(sql::ACCESS_LIST, &refs(&b)).await.map_err(db_err)?;
        rows.iter().map(|r| sql::access_record(&PgRow(r))).collect()
    }
}
