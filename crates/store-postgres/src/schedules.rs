//! [`ScheduleStore`] for PostgreSQL: a schedule is one row; a fire's run is inserted in the
//! same transaction as the schedule's change, which names the version it read, so that two
//! nodes deciding the same fire store one run.

use async_trait::async_trait;
use domain::Timestamp;
use domain::schedule::{LastRun, ScheduleRecord};
use store::sql::{self, Statement, Value};
use store::{Result, ScheduleStore, StartedRun, Submitted};

use crate::rows::{self, PgRow, binds, refs};
use crate::{Conn, PgStore, db_err};

async fn write(
    c: &Conn,
    record: &ScheduleRecord,
    expected_version: Option<i64>,
    fire: Option<&StartedRun>,
) -> Result<(i64, Option<Submitted>)> {
    let (st, version) = sql::schedule_write(record, expected_version)?;
    if c.run(&st).await? == 0 {
        return Err(sql::schedule_conflict(
            &record.spec.schedule,
            expected_version,
        ));
    }
    let submitted = match fire {
        None => None,
        Some(f) => Some(rows::submit(c, &f.run, Some((&f.node.0, f.lease_until.0))).await?),
    };
    Ok((version, submitted))
}

#[async_trait]
impl ScheduleStore for PgStore {
    async fn schedule_write(
        &self,
        record: ScheduleRecord,
        expected_version: Option<i64>,
        fire: Option<StartedRun>,
    ) -> Result<(i64, Option<Submitted>)> {
        self.write(move |c| {
            Box::pin(async move { write(c, &record, expected_version, fire.as_ref()).await })
        })
        .await
    }

    async fn schedule_get(&self, name: &str) -> Result<Option<ScheduleRecord>> {
        let c = self.reader().await?;
        let params = [Value::Text(name.to_owned())];
        let b = binds(&params);
        let found = c
            .query(sql::SCHEDULE_GET, &refs(&b))
            .await
            .map_err(db_err)?;
        found
            .first()
            .map(|r| sql::schedule_record(&PgRow(r)))
            .transpose()
    }

    async fn schedule_list(&self) -> Result<Vec<ScheduleRecord>> {
        let c = self.reader().await?;
        let found = c.query(sql::SCHEDULE_LIST, &[]).await.map_err(db_err)?;
        found
            .iter()
            .map(|r| sql::schedule_record(&PgRow(r)))
            .collect()
    }

    async fn schedule_delete(&self, name: &str) -> Result<bool> {
        let name = name.to_owned();
        self.write(move |c| {
            Box::pin(async move {
                c.run(&Statement {
                    sql: sql::SCHEDULE_DELETE,
                    params: vec![name.into()],
                })
                .await
                .map(|n| n > 0)
            })
        })
        .await
    }

    async fn schedule_due(
        &self,
        now: Timestamp,
        limit: u32,
    ) -> Result<Vec<(ScheduleRecord, Option<LastRun>)>> {
        let c = self.reader().await?;
        let params = [now.0.into(), limit.into()];
        let b = binds(&params);
        let found = c
            .query(sql::SCHEDULE_DUE, &refs(&b))
            .await
            .map_err(db_err)?;
        found
            .iter()
            .map(|r| {
                let r = PgRow(r);
                Ok((sql::schedule_record(&r)?, sql::last_run(&r)?))
            })
            .collect()
    }

    async fn schedule_next_check(&self) -> Result<Option<Timestamp>> {
        let c = self.reader().await?;
        let found = c
            .query(sql::SCHEDULE_NEXT_CHECK, &[])
            .await
            .map_err(db_err)?;
        Ok(found
            .first()
            .and_then(|r| r.try_get::<_, Option<i64>>(0).ok().flatten())
            .map(Timestamp))
    }
}
