//! [`EStopStore`] for SQLite: the list as one JSON row with a version, the audit trail as rows.

use async_trait::async_trait;
use domain::estop::{AuditRecord, EStopList, EStopState, Target};
use rusqlite::{Connection, OptionalExtension, params};
use store::{EStopStore, Error, Result};

use crate::{SqliteStore, db_err};
use store::codec::to_json;

fn version(c: &Connection) -> Result<i64> {
    c.prepare_cached("SELECT version FROM estop_list WHERE id = 1")
        .and_then(|mut s| s.query_row([], |r| r.get::<_, i64>(0)).optional())
        .map(|v| v.unwrap_or(0))
        .map_err(db_err)
}

fn append(c: &Connection, records: &[AuditRecord]) -> Result<()> {
    let mut stmt = c
        .prepare_cached(
            "INSERT INTO estop_audit (at, target, old_state, new_state, set_by, reason, source)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )
        .map_err(db_err)?;
    for r in records {
        stmt.execute(params![
            r.at,
            r.target.to_string(),
            r.old_state.map(EStopState::as_str),
            r.new_state.map(EStopState::as_str),
            r.set_by,
            r.reason,
            r.source,
        ])
        .map_err(db_err)?;
    }
    Ok(())
}

fn parse_state(s: Option<String>) -> Result<Option<EStopState>> {
    s.map(|s| {
        s.parse()
            .map_err(|e| Error::Corrupt(format!("e-stop audit: {e}")))
    })
    .transpose()
}

fn row_to_record(r: &rusqlite::Row<'_>) -> Result<AuditRecord> {
    let target: String = r.get(1).map_err(db_err)?;
    Ok(AuditRecord {
        at: r.get(0).map_err(db_err)?,
        target: target
            .parse::<Target>()
            .map_err(|e| Error::Corrupt(format!("e-stop audit: {e}")))?,
        old_state: parse_state(r.get(2).map_err(db_err)?)?,
        new_state: parse_state(r.get(3).map_err(db_err)?)?,
        set_by: r.get(4).map_err(db_err)?,
        reason: r.get(5).map_err(db_err)?,
        source: r.get(6).map_err(db_err)?,
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
                Some((v, body)) => {
                    let list = EStopList::parse(&body)
                        .map_err(|e| Error::Corrupt(format!("the stored e-stop list: {e}")))?;
                    Ok((list, v))
                }
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
            let current = version(c)?;
            if current != expected_version {
                return Err(Error::Conflict(format!(
                    "the e-stop list is at version {current}, not {expected_version}: it changed since it was read"
                )));
            }
            let next = current + 1;
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
            let mut stmt = c
                .prepare_cached(
                    "SELECT at, target, old_state, new_state, set_by, reason, source
                     FROM estop_audit WHERE ?1 IS NULL OR target = ?1
                     ORDER BY seq DESC LIMIT ?2",
                )
                .map_err(db_err)?;
            let mut rows = stmt
                .query(params![target.map(|t| t.to_string()), limit])
                .map_err(db_err)?;
            let mut out = Vec::new();
            while let Some(r) = rows.next().map_err(db_err)? {
                out.push(row_to_record(r)?);
            }
            Ok(out)
        })
        .await
    }
}
