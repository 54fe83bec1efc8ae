//! [`AuthStore`] for SQLite: the statements are `store::sql`'s.

use async_trait::async_trait;
use domain::Timestamp;
use store::sql::{self, Statement, Value};
use store::{AccessRecord, AuthStore, Error, Result, TokenRecord};

use crate::{SqliteStore, rows};

#[async_trait]
impl AuthStore for SqliteStore {
    async fn token_create(&self, token: TokenRecord) -> Result<()> {
        self.write(move |c| {
            let taken = rows::query_opt(
                c,
                "SELECT 1 FROM tokens WHERE name = $1",
                &[token.name.clone().into()],
                |_| Ok(()),
            )?;
            if taken.is_some() {
                return Err(Error::Conflict(format!(
                    "a token named {:?} exists",
                    token.name
                )));
            }
            rows::execute(
                c,
                &Statement {
                    sql: sql::TOKEN_CREATE,
                    params: sql::token_params(&token)?,
                },
            )
            .map(drop)
        })
        .await
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        let hash = Value::Text(hash.to_owned());
        self.read(move |c| {
            rows::query_opt(
                c,
                &format!("SELECT {} FROM tokens WHERE hash = $1", sql::TOKEN_COLUMNS),
                &[hash],
                sql::token,
            )
        })
        .await
    }

    async fn token_by_name(&self, name: &str) -> Result<Option<TokenRecord>> {
        let name = Value::Text(name.to_owned());
        self.read(move |c| {
            rows::query_opt(
                c,
                &format!("SELECT {} FROM tokens WHERE name = $1", sql::TOKEN_COLUMNS),
                &[name],
                sql::token,
            )
        })
        .await
    }

    async fn token_list(&self) -> Result<Vec<TokenRecord>> {
        self.read(|c| {
            let mut out = Vec::new();
            rows::query(
                c,
                &format!("SELECT {} FROM tokens ORDER BY name", sql::TOKEN_COLUMNS),
                &[],
                |r| {
                    out.push(sql::token(r)?);
                    Ok(())
                },
            )?;
            Ok(out)
        })
        .await
    }

    async fn token_revoke(&self, name: &str) -> Result<bool> {
        let name = Value::Text(name.to_owned());
        self.write(move |c| {
            rows::execute(
                c,
                &Statement {
                    sql: sql::TOKEN_REVOKE,
                    params: vec![name],
                },
            )
            .map(|n| n > 0)
        })
        .await
    }

    fn token_used(&self, name: &str, at: Timestamp) {
        let params = vec![name.into(), at.0.into()];
        self.write_nowait("token use", move |c| {
            rows::execute(
                c,
                &Statement {
                    sql: sql::TOKEN_USED,
                    params,
                },
            )
            .map(drop)
        });
    }

    fn access_append(&self, records: Vec<AccessRecord>) {
        self.write_nowait("access log", move |c| {
            records.iter().try_for_each(|a| {
                rows::execute(
                    c,
                    &Statement {
                        sql: sql::ACCESS_APPEND,
                        params: sql::access_params(a),
                    },
                )
                .map(drop)
            })
        });
    }

    async fn access_list(&self, limit: u32) -> Result<Vec<AccessRecord>> {
        let limit = store::effective_audit_limit(limit);
        // Appends are queued: the log read after a call holds that call's line.
        self.write(|_| Ok(())).await?;
        self.read(move |c| {
            let mut out = Vec::new();
            rows::query(c, sql::ACCESS_LIST, &[limit.into()], |r| {
                out.push(sql::access_record(r)?);
                Ok(())
            })?;
            Ok(out)
        })
        .await
    }
}
