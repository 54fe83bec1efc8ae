//! [`EStopStore`] for SQLite: the list as one JSON row with a version, the audit trail as rows.

use async_trait::async_trait;
use domain::estop::{AuditRecord, EStopList, Target};
use rusqlite::{Connection, OptionalExtension, params};
use store::sql::{self, Statement};
use store::{EStopStore, Result};

use crate::{SqliteStore, db_err, rows};
use store::codec::to_json;

fn version(c: &Connection) -> Result<i64> {
    c.prepare_cached("SELECT version FROM estop_list WHERE id = 1")
        .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)).optional())
        .map(|v| v.unwrap_or(0))
        .map_err(db_err)
}

fn append(c: &Connection, records: &[AuditRecord]) -> Result<()> {
    records.iter().try_for_each(|r| {
        rows::execute(
            c,
            &Statement {
                sql: sql::AUDIT_APPEND,
                params: sql::audit_params(r),
            },
        )
        .map(drop)
    })
}

#[async_trait]
impl EStopStore for SqliteStore {
    async fn estop_load(&self) -> Result<(EStopList, i64)> {
        self.read(|c| {
            let row: Option<(i64, String)> = c
                .prepare_cached("SELECT version, body FROM estop_list WHERE id = 1")
                .and_then(|mut s| s.query_row([], |r| Ok((r.get(0)?, r.get(1)?))).optional())
                .map_err(db_err)?;
            match row {
                None => Ok((EStopList::default(), 0)),
                Some((v, body)) => Ok((store::codec::estop_list(&body)?, v)),
            }
        })
        .await
    }

    async fn estop_save(
        &self,
        list: EStopList,
        expected_version: i64,
        audit: Vec<AuditRecord>,
    ) -> Result<i64> {
        self.write(move |c| {
            let next = store::rules::estop_next_version(version(c)?, expected_version)?;
            let body = to_json(&list)?;
            c.prepare_cached(
                "INSERT INTO estop_list (id, version, body) VALUES (1, ?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET version = excluded.version, body = excluded.body",
            )
            .and_then(|mut s| s.execute(params![next, body]))
            .map_err(db_err)?;
            append(c, &audit)?;
            Ok(next)
        })
        .await
    }

    async fn estop_version(&self) -> Result<i64> {
        self.read(version).await
    }

    async fn audit_append(&self, records: Vec<AuditRecord>) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        self.write(move |c| append(c, &records)).await
    }

    async fn audit_list(&self, target: Option<Target>, limit: u32) -> Result<Vec<AuditRecord>> {
        let limit = store::effective_audit_limit(limit);
        self.read(move |c| {
            let mut out = Vec::new();
            rows::query(
                c,
                "SELECT at, target, old_state, new_state, set_by, reason, source
                 FROM estop_audit WHERE $1 IS NULL OR target = $1
                 ORDER BY seq DESC LIMIT $2",
                &[target.map(|t| t.to_string()).into(), limit.into()],
                |r| {
                    out.push(sql::audit_record(r)?);
                    Ok(())
                },
            )?;
            Ok(out)
        })
        .await
    }
}
