//! SQL for single requests; each function runs inside the caller's transaction. The
//! statements and decoders both backends share are in `store::sql`; what is here binds them
//! to a SQLite connection.

use std::fmt::Write as _;

use domain::{Run, RunId, RunState, StopCause, Timestamp};
use rusqlite::Connection;
use rusqlite::types::{ToSqlOutput, ValueRef};
use store::sql::{self, Statement, Value, sqlite_placeholders};
use store::{Result, RunFilter, RunPage, Transition};

use crate::db_err;

/// A SQLite row read through [`sql::Row`].
struct SqliteRow<'a, 'b>(&'a rusqlite::Row<'b>);

impl sql::Row for SqliteRow<'_, '_> {
    fn int(&self, i: usize) -> Result<Option<i64>> {
        self.0.get(i).map_err(db_err)
    }

    fn text(&self, i: usize) -> Result<Option<String>> {
        self.0.get(i).map_err(db_err)
    }
}

/// A [`Value`] bound to a SQLite parameter.
struct Bind<'a>(&'a Value);

impl rusqlite::ToSql for Bind<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self.0 {
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Null => ValueRef::Null,
        }))
    }
}

fn binds(params: &[Value]) -> impl rusqlite::Params + '_ {
    rusqlite::params_from_iter(params.iter().map(Bind))
}

/// Runs one statement; the number of rows it changed.
pub(crate) fn execute(c: &Connection, st: &Statement) -> Result<usize> {
    c.prepare_cached(&sqlite_placeholders(st.sql))
        .and_then(|mut s| s.execute(binds(&st.params)))
        .map_err(db_err)
}

pub(crate) fn execute_all(c: &Connection, sts: &[Statement]) -> Result<()> {
    sts.iter().try_for_each(|st| execute(c, st).map(drop))
}

/// Runs a query, handing each row to `each`.
pub(crate) fn query(
    c: &Connection,
    sql: &str,
    params: &[Value],
    mut each: impl FnMut(&dyn sql::Row) -> Result<()>,
) -> Result<()> {
    let mut stmt = c
        .prepare_cached(&sqlite_placeholders(sql))
        .map_err(db_err)?;
    let mut rows = stmt.query(binds(params)).map_err(db_err)?;
    while let Some(r) = rows.next().map_err(db_err)? {
        each(&SqliteRow(r))?;
    }
    Ok(())
}

/// The first row's value of `read`, if there is a row.
pub(crate) fn query_opt<T>(
    c: &Connection,
    sql: &str,
    params: &[Value],
    read: impl FnOnce(&dyn sql::Row) -> Result<T>,
) -> Result<Option<T>> {
    let mut stmt = c
        .prepare_cached(&sqlite_placeholders(sql))
        .map_err(db_err)?;
    let mut rows = stmt.query(binds(params)).map_err(db_err)?;
    match rows.next().map_err(db_err)? {
        Some(r) => read(&SqliteRow(r)).map(Some),
        None => Ok(None),
    }
}

pub(crate) fn collect_ids(c: &Connection, sql: &str, params: &[Value]) -> Result<Vec<RunId>> {
    let mut ids = Vec::new();
    query(c, sql, params, |r| {
        ids.push(sql::run_id(r)?);
        Ok(())
    })?;
    ids.sort();
    Ok(ids)
}

pub(crate) fn load_run(c: &Connection, id: RunId) -> Result<Run> {
    let key = [Value::Text(id.to_string())];
    let mut run = query_opt(c, sql::LOAD_RUN, &key, |r| sql::RunReader::new(id, r))?
        .ok_or(store::Error::NotFound(id))?;
    query(c, sql::LOAD_BLOCKS, &key, |r| run.block(r))?;
    query(c, sql::LOAD_JOBS, &key, |r| run.job(r))?;
    Ok(run.finish())
}

pub(crate) fn list_runs(c: &Connection, f: &RunFilter) -> Result<RunPage> {
    // With labels, the first one drives (its index is ordered by run ID, like the page; CROSS
    // JOIN keeps SQLite from reordering), the others are checked per run; unless only
    // unfinished states are asked for, which are few at any size: then the state index drives.
    // Without labels, the runs' own indexes serve.
    let mut labels = f.labels.iter();
    let first = if store::unfinished_only(&f.states) {
        None
    } else {
        labels.next()
    };
    let mut sql = String::from(
        "SELECT runs.id, name, json_extract(spec, '$.desc'), labels, state, created_at, started_at,
                ended_at, error, stop_cause, submitted_by, schedule, nominal_time FROM ",
    );
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    let id = if let Some((k, v)) = first {
        sql.push_str(
            "run_labels l CROSS JOIN runs ON runs.id = l.run_id WHERE l.key = ? AND l.value = ?",
        );
        args.push(k.clone().into());
        args.push(v.clone().into());
        "l.run_id"
    } else {
        sql.push_str("runs WHERE 1 = 1");
        "runs.id"
    };
    if !f.states.is_empty() {
        sql.push_str(" AND state IN (");
        for (i, s) in f.states.iter().enumerate() {
            sql.push_str(if i == 0 { "?" } else { ", ?" });
            args.push(s.as_str().to_owned().into());
        }
        sql.push(')');
    }
    if let Some(name) = &f.name {
        sql.push_str(" AND name = ?");
        args.push(name.clone().into());
    }
    if let Some(schedule) = &f.schedule {
        sql.push_str(" AND schedule = ?");
        args.push(schedule.clone().into());
    }
    for (k, v) in labels {
        // Key and value are bound as values: no user input is ever part of the SQL.
        sql.push_str(
            " AND EXISTS (SELECT 1 FROM run_labels x WHERE x.key = ? AND x.value = ? AND x.run_id = runs.id)",
        );
        args.push(k.clone().into());
        args.push(v.clone().into());
    }
    if let Some(token) = &f.page_token {
        let _ = write!(sql, " AND {id} < ?");
        args.push(token.clone().into());
    }
    let size = f.effective_page_size();
    let _ = write!(sql, " ORDER BY {id} DESC LIMIT {}", size + 1);
    let mut stmt = c.prepare_cached(&sql).map_err(db_err)?;
    let mut q = stmt
        .query(rusqlite::params_from_iter(args))
        .map_err(db_err)?;
    let mut runs = Vec::new();
    while let Some(r) = q.next().map_err(db_err)? {
        runs.push(sql::summary(&SqliteRow(r))?);
    }
    Ok(RunPage::from_overfetched(runs, size))
}

/// Ends a run that never started (cancelled or expired before Exec).
pub(crate) fn finish_unstarted(
    c: &Connection,
    id: RunId,
    state: RunState,
    now: Timestamp,
    cause: &StopCause,
) -> Result<()> {
    execute_all(c, &sql::finish_unstarted(id, state, now, cause)?)
}

pub(crate) fn apply(
    c: &Connection,
    node: &str,
    id: RunId,
    transitions: &[Transition],
) -> Result<()> {
    let key = Value::Text(id.to_string());
    let fenced = execute(
        c,
        &Statement {
            sql: sql::FENCE,
            params: vec![key.clone(), node.into()],
        },
    )?;
    if fenced == 0 {
        let exists = query_opt(c, sql::RUN_EXISTS, &[key], |_| Ok(()))?;
        return Err(sql::unfenced(id, exists.is_some()));
    }
    let mut statements = Vec::with_capacity(transitions.len() + 2);
    sql::transitions(id, transitions, &mut statements)?;
    execute_all(c, &statements)
}
