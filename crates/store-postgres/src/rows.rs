//! SQL for single requests; each function runs inside the caller's transaction. The
//! statements and decoders both backends share are in `store::sql`; what is here binds them
//! to a PostgreSQL connection.

use std::fmt::Write as _;

use deadpool_postgres::GenericClient;
use domain::{Run, RunId, RunState, StopCause, Timestamp};
use store::sql::{self, Statement, Value};
use store::{Error, NewRun, Result, RunFilter, RunPage, Submitted, codec};
use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type};

use crate::{Conn, PgStatement, db_err};
use store::codec::to_json;

pub(crate) fn get<'a, T: FromSql<'a>>(row: &'a Row, i: usize) -> Result<T> {
    row.try_get(i).map_err(|e| Error::Corrupt(e.to_string()))
}

/// A PostgreSQL row read through [`sql::Row`].
pub(crate) struct PgRow<'a>(pub(crate) &'a Row);

impl sql::Row for PgRow<'_> {
    fn int(&self, i: usize) -> Result<Option<i64>> {
        match self.0.columns().get(i).map(|c| c.type_()) {
            Some(&Type::INT4) => Ok(get::<Option<i32>>(self.0, i)?.map(i64::from)),
            Some(&Type::INT2) => Ok(get::<Option<i16>>(self.0, i)?.map(i64::from)),
            _ => get(self.0, i),
        }
    }

    fn text(&self, i: usize) -> Result<Option<String>> {
        get(self.0, i)
    }
}

/// The first row, if any, to read through [`sql::Row`].
pub(crate) fn first(rows: &[Row]) -> Option<PgRow<'_>> {
    rows.first().map(PgRow)
}

/// A [`Value`] bound to a PostgreSQL parameter of whatever integer or text type it has.
#[derive(Debug)]
pub(crate) struct Bind<'a>(&'a Value);

impl ToSql for Bind<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut tokio_postgres::types::private::BytesMut,
    ) -> std::result::Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self.0 {
            Value::Null => Ok(IsNull::Yes),
            Value::Text(s) => s.to_sql(ty, out),
            Value::Int(v) => match *ty {
                Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
                Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
                _ => v.to_sql(ty, out),
            },
        }
    }

    fn accepts(ty: &Type) -> bool {
        <i64 as ToSql>::accepts(ty)
            || <i32 as ToSql>::accepts(ty)
            || <i16 as ToSql>::accepts(ty)
            || <String as ToSql>::accepts(ty)
    }

    tokio_postgres::types::to_sql_checked!();
}

pub(crate) fn binds(params: &[Value]) -> Vec<Bind<'_>> {
    params.iter().map(Bind).collect()
}

pub(crate) fn refs<'a>(binds: &'a [Bind<'_>]) -> Vec<&'a (dyn ToSql + Sync)> {
    binds.iter().map(|b| b as &(dyn ToSql + Sync)).collect()
}

pub(crate) async fn collect_ids(c: &Conn, sql: &str, params: &[Value]) -> Result<Vec<RunId>> {
    let mut ids = c
        .rows(sql, params)
        .await?
        .iter()
        .map(|r| sql::run_id(&PgRow(r)))
        .collect::<Result<Vec<_>>>()?;
    ids.sort();
    Ok(ids)
}

/// The statement that stores `run` as `submitted`, or, with `lease` (the node and until
/// when), as `queued` and leased to that node, unless its idempotency key names a run
/// already: then it stores nothing and returns no row (it returns the run's ID otherwise).
///
/// One statement, one round trip: the run, its labels, blocks and jobs are inserted by the
/// data-modifying parts of one `WITH`, each reading the run's row from the first (none when
/// the key was taken, and then nothing is inserted).
pub(crate) fn submit_statement(run: &NewRun, lease: Option<(&str, i64)>) -> Result<PgStatement> {
    fn p<T: ToSql + Sync + Send + 'static>(v: T) -> Box<dyn ToSql + Sync + Send> {
        Box::new(v)
    }
    let labels = to_json(&run.spec.labels)?;
    let spec = to_json(&run.spec)?;
    let (keys, values): (Vec<String>, Vec<String>) = run
        .spec
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .unzip();
    let per_block: Vec<i64> = run
        .spec
        .blocks
        .iter()
        .map(|b| i64::try_from(b.jobs.len()).unwrap_or(i64::MAX))
        .collect();
    let state = if lease.is_some() {
        "queued"
    } else {
        "submitted"
    };
    Ok(PgStatement {
        sql: "WITH r AS (
                 INSERT INTO runs (id, name, labels, idempotency_key, spec, state, created_at,
                                   expires_at, cloned_from, submitted_by, schedule, nominal_time,
                                   lease_owner, lease_expires_at)
                 VALUES ($1, $2, $3::text::jsonb, $4, $5, $12, $6, $7, $8, $9, $10, $11, $13, $14)
                 ON CONFLICT (idempotency_key) DO NOTHING
                 RETURNING id),
             l AS (
                 INSERT INTO run_labels (run_id, key, value)
                 SELECT r.id, t.k, t.v FROM r, unnest($15::text[], $16::text[]) AS t(k, v)),
             b AS (
                 INSERT INTO blocks (run_id, idx, state)
                 SELECT r.id, n.ord - 1, 'pending'
                 FROM r, unnest($17::bigint[]) WITH ORDINALITY AS n(jobs, ord)),
             j AS (
                 INSERT INTO jobs (run_id, block_idx, idx, state)
                 SELECT r.id, n.ord - 1, g, 'pending'
                 FROM r, unnest($17::bigint[]) WITH ORDINALITY AS n(jobs, ord),
                      generate_series(0, n.jobs - 1) AS g)
             SELECT id FROM r",
        params: vec![
            p(run.id.to_string()),
            p(run.spec.name.clone()),
            p(labels),
            p(run.spec.idempotency_key.clone()),
            p(spec),
            p(run.created_at.0),
            p(run.expires_at.0),
            p(run.cloned_from.map(|c| c.to_string())),
            p(run.submitted_by.clone()),
            p(run.schedule.as_ref().map(|s| s.name.clone())),
            p(run.schedule.as_ref().map(|s| s.nominal_time.0)),
            p(state),
            p(lease.map(|(node, _)| node.to_owned())),
            p(lease.map(|(_, until)| until)),
            p(keys),
            p(values),
            p(per_block),
        ],
    })
}

/// What a Submit's statement ([`submit_statement`]) stored: `inserted` rows say the run was
/// stored, none that its idempotency key names a run already, which is looked up.
pub(crate) async fn submitted(c: &Conn, run: &NewRun, inserted: u64) -> Result<Submitted> {
    if inserted > 0 {
        return Ok(Submitted {
            id: run.id,
            created: true,
        });
    }
    let row = c
        .query_one(
            "SELECT id FROM runs WHERE idempotency_key = $1",
            &[&run.spec.idempotency_key],
        )
        .await
        .map_err(db_err)?;
    Ok(Submitted {
        id: codec::run_id(&get::<String>(&row, 0)?)?,
        created: false,
    })
}

/// Stores `run` ([`submit_statement`]): the run stored, or the one its key names.
pub(crate) async fn submit(
    c: &Conn,
    run: &NewRun,
    lease: Option<(&str, i64)>,
) -> Result<Submitted> {
    let st = submit_statement(run, lease)?;
    let inserted = c.query(st.sql, &st.refs()).await.map_err(db_err)?;
    submitted(c, run, inserted.len() as u64).await
}

/// The run `id` as one snapshot, in one round trip: the transaction's start, the reads of the
/// run, its blocks and its jobs (statements prepared once per connection), and the end are
/// sent together and answered in order.
pub(crate) async fn load_run(c: &deadpool_postgres::ClientWrapper, id: RunId) -> Result<Run> {
    let (head, blocks, jobs) = tokio::try_join!(
        c.prepare_cached(sql::LOAD_RUN),
        c.prepare_cached(sql::LOAD_BLOCKS),
        c.prepare_cached(sql::LOAD_JOBS),
    )
    .map_err(db_err)?;
    let key = [Value::Text(id.to_string())];
    let binds = binds(&key);
    let key = refs(&binds);
    // Each request goes out when its future is first polled, and `join!` polls all of them
    // once before any can be answered: the ROLLBACK (a read-only snapshot has nothing to
    // keep) is sent with the rest even when a read fails, so the connection always goes back
    // to its pool outside a transaction.
    let (begin, head, blocks, jobs, end) = tokio::join!(
        c.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"),
        c.query(&head, &key),
        c.query(&blocks, &key),
        c.query(&jobs, &key),
        c.batch_execute("ROLLBACK"),
    );
    begin.map_err(db_err)?;
    let (head, blocks, jobs) = (
        head.map_err(db_err)?,
        blocks.map_err(db_err)?,
        jobs.map_err(db_err)?,
    );
    end.map_err(db_err)?;
    let mut run = sql::RunReader::new(id, &first(&head).ok_or(Error::NotFound(id))?)?;
    for r in &blocks {
        run.block(&PgRow(r))?;
    }
    for r in &jobs {
        run.job(&PgRow(r))?;
    }
    Ok(run.finish())
}

pub(crate) async fn list_runs<C: GenericClient>(c: &C, f: &RunFilter) -> Result<RunPage> {
    // With labels, the first one drives (its index is ordered by run ID, like the page); the
    // others are checked per run. Without, the runs' own indexes serve.
    let mut labels = f.labels.iter();
    let first = if store::unfinished_only(&f.states) {
        None
    } else {
        labels.next()
    };
    // The page's IDs first, from what an index holds alone (the planner then never trades an
    // ordered index scan for a filtered walk of the primary key), then their rows.
    let mut sql = String::from("SELECT ");
    let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut push = |sql: &mut String, fmt: &str, v: Box<dyn ToSql + Sync + Send>| {
        args.push(v);
        sql.push_str(&fmt.replace('?', &format!("${}", args.len())));
    };
    let id = if let Some((k, v)) = first {
        sql.push_str("l.run_id FROM run_labels l JOIN runs ON runs.id = l.run_id WHERE TRUE");
        push(&mut sql, " AND l.key = ?", Box::new(k.clone()));
        push(&mut sql, " AND l.value = ?", Box::new(v.clone()));
        "l.run_id"
    } else {
        sql.push_str("runs.id FROM runs WHERE TRUE");
        "runs.id"
    };
    match f.states.as_slice() {
        [] => {}
        // An equality, so that the index on (state, id) reads the page in order.
        [one] => push(
            &mut sql,
            " AND state = ?",
            Box::new(one.as_str().to_owned()),
        ),
        many => {
            let states: Vec<String> = many.iter().map(|s| s.as_str().to_owned()).collect();
            push(&mut sql, " AND state = ANY(?)", Box::new(states));
        }
    }
    if let Some(name) = &f.name {
        push(&mut sql, " AND name = ?", Box::new(name.clone()));
    }
    if let Some(schedule) = &f.schedule {
        push(&mut sql, " AND schedule = ?", Box::new(schedule.clone()));
    }
    for (k, v) in labels {
        push(
            &mut sql,
            " AND EXISTS (SELECT 1 FROM run_labels x WHERE x.key = ?",
            Box::new(k.clone()),
        );
        push(
            &mut sql,
            " AND x.value = ? AND x.run_id = runs.id)",
            Box::new(v.clone()),
        );
    }
    if let Some(token) = &f.page_token {
        push(&mut sql, &format!(" AND {id} < ?"), Box::new(token.clone()));
    }
    let size = f.effective_page_size();
    let _ = write!(sql, " ORDER BY {id} DESC LIMIT {}", size + 1);
    let sql = format!(
        "SELECT runs.id, name, (spec::jsonb) ->> 'desc', labels::text, state, created_at, started_at,
                ended_at, error, stop_cause, submitted_by, schedule, nominal_time
         FROM runs WHERE runs.id IN ({sql}) ORDER BY runs.id DESC"
    );
    let params: Vec<&(dyn ToSql + Sync)> = args
        .iter()
        .map(|a| a.as_ref() as &(dyn ToSql + Sync))
        .collect();
    let rows = c.query(&sql, &params).await.map_err(db_err)?;
    let runs = rows
        .iter()
        .map(|r| sql::summary(&PgRow(r)))
        .collect::<Result<Vec<_>>>()?;
    Ok(RunPage::from_overfetched(runs, size))
}

/// Ends a run that never started (cancelled or expired before Exec).
pub(crate) async fn finish_unstarted(
    c: &Conn,
    id: RunId,
    state: RunState,
    now: Timestamp,
    cause: &StopCause,
) -> Result<()> {
    c.run_all(&sql::finish_unstarted(id, state, now, cause)?)
        .await
        .map(drop)
}

/// An engine's transitions alone: `statements` are the lease fence, then the writes (sent
/// together once the fence held); they run in order, in the caller's savepoint. The fence's
/// row lock is held to the end of the batch's transaction, so no other node can claim the run
/// between the check and the writes. When the fence finds the run is not this node's, the
/// request fails, and the caller rolls its savepoint, the writes in it, back.
pub(crate) async fn apply_alone(c: &Conn, id: RunId, statements: &[Statement]) -> Result<()> {
    // Here, where a request is known to have failed in its group, the writes go only behind
    // a fence that held: a stale node's writes never wait on the rows of the node that holds
    // the run now.
    let Some((fence, writes)) = statements.split_first() else {
        return Ok(());
    };
    if c.run(fence).await? == 0 {
        let exists = c
            .rows(sql::RUN_EXISTS, &[Value::Text(id.to_string())])
            .await?;
        return Err(sql::unfenced(id, !exists.is_empty()));
    }
    c.run_all(writes).await.map(drop)
}
