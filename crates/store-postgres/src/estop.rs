//! [`EStopStore`] for PostgreSQL: the list as one JSON row with a version, the audit trail as
//! rows. Saves from several nodes are serialized on the list's row.

use async_trait::async_trait;
use domain::estop::{AuditRecord, EStopList, Target};
use store::sql::{self, Statement};
use store::{EStopStore, Result};

use crate::rows::{PgRow, get};
use crate::{Conn, PgStore, db_err};
use store::codec::to_json;

async fn append(c: &Conn, records: &[AuditRecord]) -> Result<()> {
    let statements: Vec<Statement> = records
        .iter()
        .map(|r| Statement {
            sql: sql::AUDIT_APPEND,
            params: sql::audit_params(r),
        })
        .collect();
    c.run_all(&statements).await.map(drop)
}

#[async_trait]
impl EStopStore for PgStore {
    async fn estop_load(&self) -> Result<(EStopList, i64)> {
        let c = self.reader().await?;
        let row = c
            .query_opt("SELECT version, body FROM estop_list WHERE id = 1", &[])
            .await
            .map_err(db_err)?;
        match row {
            None => Ok((EStopList::default(), 0)),
            Some(r) => Ok((
                store::codec::estop_list(&get::<String>(&r, 1)?)?,
                get(&r, 0)?,
            )),
        }
    }

    async fn estop_save(
        &self,
        list: EStopList,
        expected_version: i64,
        audit: Vec<AuditRecord>,
    ) -> Result<i64> {
        self.write(move |c| {
            Box::pin(async move {
                // The first save of all: make the row exist, so that every save locks it.
                c.execute(
                    "INSERT INTO estop_list (id, version, body) VALUES (1, 0, '{\"entries\": []}')
                     ON CONFLICT (id) DO NOTHING",
                    &[],
                )
                .await
                .map_err(db_err)?;
                let current: i64 = get(
                    &c.query_one(
                        "SELECT version FROM estop_list WHERE id = 1 FOR UPDATE",
                        &[],
                    )
                    .await
                    .map_err(db_err)?,
                    0,
                )?;
                let next = store::rules::estop_next_version(current, expected_version)?;
                c.execute(
                    "UPDATE estop_list SET version = $1, body = $2 WHERE id = 1",
                    &[&next, &to_json(&list)?],
                )
                .await
                .map_err(db_err)?;
                append(c, &audit).await?;
                // Delivered to every listening node when this transaction commits.
                c.execute(
                    "SELECT pg_notify($1, $2)",
                    &[&crate::ESTOP_CHANNEL, &next.to_string()],
                )
                .await
                .map_err(db_err)?;
                Ok(next)
            })
        })
        .await
    }

    async fn estop_version(&self) -> Result<i64> {
        let c = self.reader().await?;
        let row = c
            .query_opt("SELECT version FROM estop_list WHERE id = 1", &[])
            .await
            .map_err(db_err)?;
        row.map_or(Ok(0), |r| get(&r, 0))
    }

    fn estop_notifications(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        Some(self.estop_notes.subscribe())
    }

    async fn audit_append(&self, records: Vec<AuditRecord>) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        self.write(move |c| Box::pin(async move { append(c, &records).await }))
            .await
    }

    async fn audit_list(&self, target: Option<Target>, limit: u32) -> Result<Vec<AuditRecord>> {
        let limit = i64::from(store::effective_audit_limit(limit));
        let c = self.reader().await?;
        let rows = c
            .query(
                "SELECT at, target, old_state, new_state, set_by, reason, source
                 FROM estop_audit WHERE $1::text IS NULL OR target = $1
                 ORDER BY seq DESC LIMIT $2",
                &[&target.map(|t| t.to_string()), &limit],
            )
            .await
            .map_err(db_err)?;
        rows.iter().map(|r| sql::audit_record(&PgRow(r))).collect()
    }
}
