//! [`ScheduleStore`] for SQLite: a schedule is one row; a fire's run is inserted in the same
//! transaction as the schedule's change.

use async_trait::async_trait;
use domain::Timestamp;
use domain::schedule::{LastRun, ScheduleRecord};
use rusqlite::Connection;
use store::sql::{self, Statement, Value};
use store::{Result, ScheduleStore, StartedRun, Submitted};

use crate::{SqliteStore, insert_run, rows};

fn write(
    c: &Connection,
    record: &ScheduleRecord,
    expected_version: Option<i64>,
    fire: Option<&StartedRun>,
) -> Result<(i64, Option<Submitted>)> {
    let (st, version) = sql::schedule_write(record, expected_version)?;
    if rows::execute(c, &st)? == 0 {
        return Err(sql::schedule_conflict(
            &record.spec.schedule,
            expected_version,
        ));
    }
    let submitted = fire
        .map(|f| insert_run(c, &f.run, Some((&f.node, f.lease_until))))
        .transpose()?;
    Ok((version, submitted))
}

#[async_trait]
impl ScheduleStore for SqliteStore {
    async fn schedule_write(
        &self,
        record: ScheduleRecord,
        expected_version: Option<i64>,
        fire: Option<StartedRun>,
    ) -> Result<(i64, Option<Submitted>)> {
        self.write(move |c| write(c, &record, expected_version, fire.as_ref()))
            .await
    }

    async fn schedule_get(&self, name: &str) -> Result<Option<ScheduleRecord>> {
        let name = Value::Text(name.to_owned());
        self.read(move |c| {
            rows::query_opt(
                c,
                sql::SCHEDULE_GET,
                std::slice::from_ref(&name),
                sql::schedule_record,
            )
        })
        .await
    }

    async fn schedule_list(&self) -> Result<Vec<ScheduleRecord>> {
        self.read(|c| {
            let mut out = Vec::new();
            rows::query(c, sql::SCHEDULE_LIST, &[], |r| {
                out.push(sql::schedule_record(r)?);
                Ok(())
            })?;
            Ok(out)
        })
        .await
    }

    async fn schedule_delete(&self, name: &str) -> Result<bool> {
        let name = name.to_owned();
        self.write(move |c| {
            rows::execute(
                c,
                &Statement {
                    sql: sql::SCHEDULE_DELETE,
                    params: vec![name.into()],
                },
            )
            .map(|n| n > 0)
        })
        .await
    }

    async fn schedule_due(
        &self,
        now: Timestamp,
        limit: u32,
    ) -> Result<Vec<(ScheduleRecord, Option<LastRun>)>> {
        self.read(move |c| {
            let mut out = Vec::new();
            rows::query(c, sql::SCHEDULE_DUE, &[now.0.into(), limit.into()], |r| {
                out.push((sql::schedule_record(r)?, sql::last_run(r)?));
                Ok(())
            })?;
            Ok(out)
        })
        .await
    }

    async fn schedule_next_check(&self) -> Result<Option<Timestamp>> {
        self.read(|c| {
            let mut next = None;
            rows::query(c, sql::SCHEDULE_NEXT_CHECK, &[], |r| {
                next = r.int(0)?.map(Timestamp);
                Ok(())
            })?;
            Ok(next)
        })
        .await
    }
}
