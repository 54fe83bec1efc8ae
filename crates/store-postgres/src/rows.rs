//! SQL for single requests; each function runs inside the caller's transaction.

use std::fmt::Write as _;

use deadpool_postgres::GenericClient;
use domain::{
    BlockStatus, JobStatus, NodeId, Run, RunId, RunState, RunSummary, StopCause, Timestamp,
};
use store::{Error, NewRun, Result, RunFilter, RunPage, Submitted, Transition, codec};
use tokio_postgres::Row;
use tokio_postgres::types::{FromSql, ToSql};

use crate::{Conn, db_err};
use store::codec::to_json;

pub(crate) fn get<'a, T: FromSql<'a>>(row: &'a Row, i: usize) -> Result<T> {
    row.try_get(i).map_err(|e| Error::Corrupt(e.to_string()))
}

fn ts(v: Option<i64>) -> Option<Timestamp> {
    v.map(Timestamp)
}

fn count(v: i64) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Corrupt(format!("count {v} out of range")))
}

pub(crate) async fn collect_ids(
    c: &Conn,
    sql: &str,
    p: &[&(dyn ToSql + Sync)],
) -> Result<Vec<RunId>> {
    let rows = c.query(sql, p).await.map_err(db_err)?;
    let mut ids = rows
        .iter()
        .map(|r| codec::run_id(&get::<String>(r, 0)?))
        .collect::<Result<Vec<_>>>()?;
    ids.sort();
    Ok(ids)
}

pub(crate) async fn submit(c: &Conn, run: NewRun) -> Result<Submitted> {
    let id = run.id.to_string();
    let labels = to_json(&run.spec.labels)?;
    let spec = to_json(&run.spec)?;
    // A concurrent Submit of the same key on another node: whoever inserts first wins, and
    // the other finds that run.
    let inserted = c
        .execute(
            "INSERT INTO runs (id, name, labels, idempotency_key, spec, state, created_at,
                               expires_at, cloned_from)
             VALUES ($1, $2, $3::text::jsonb, $4, $5, 'submitted', $6, $7, $8)
             ON CONFLICT (idempotency_key) DO NOTHING",
            &[
                &id,
                &run.spec.name,
                &labels,
                &run.spec.idempotency_key,
                &spec,
                &run.created_at.0,
                &run.expires_at.0,
                &run.cloned_from.map(|c| c.to_string()),
            ],
        )
        .await
        .map_err(db_err)?;
    if inserted == 0 {
        let row = c
            .query_one(
                "SELECT id FROM runs WHERE idempotency_key = $1",
                &[&run.spec.idempotency_key],
            )
            .await
            .map_err(db_err)?;
        return Ok(Submitted {
            id: codec::run_id(&get::<String>(&row, 0)?)?,
            created: false,
        });
    }
    let n_blocks = i64::try_from(run.spec.blocks.len()).unwrap_or(i64::MAX);
    c.execute(
        "INSERT INTO blocks (run_id, idx, state)
         SELECT $1, b, 'pending' FROM generate_series(0, $2::bigint - 1) AS b",
        &[&id, &n_blocks],
    )
    .await
    .map_err(db_err)?;
    let per_block: Vec<i64> = run
        .spec
        .blocks
        .iter()
        .map(|b| i64::try_from(b.jobs.len()).unwrap_or(i64::MAX))
        .collect();
    c.execute(
        "INSERT INTO jobs (run_id, block_idx, idx, state)
         SELECT $1, b.ord - 1, j, 'pending'
         FROM unnest($2::bigint[]) WITH ORDINALITY AS b(n, ord), generate_series(0, b.n - 1) AS j",
        &[&id, &per_block],
    )
    .await
    .map_err(db_err)?;
    Ok(Submitted {
        id: run.id,
        created: true,
    })
}

pub(crate) async fn load_run<C: GenericClient>(c: &C, id: RunId) -> Result<Run> {
    let key = id.to_string();
    let row = c
        .query_opt(
            "SELECT spec, state, created_at, started_at, ended_at, expires_at, error, stop_cause,
                    cancel_requested, lease_owner, lease_expires_at, cloned_from
             FROM runs WHERE id = $1",
            &[&key],
        )
        .await
        .map_err(db_err)?
        .ok_or(Error::NotFound(id))?;
    let mut blocks: Vec<BlockStatus> = Vec::new();
    for r in c
        .query(
            "SELECT state, started_at, ended_at FROM blocks WHERE run_id = $1 ORDER BY idx",
            &[&key],
        )
        .await
        .map_err(db_err)?
    {
        blocks.push(BlockStatus {
            state: codec::job_state(&get::<String>(&r, 0)?)?,
            started_at: ts(get(&r, 1)?),
            ended_at: ts(get(&r, 2)?),
            jobs: Vec::new(),
        });
    }
    for r in c
        .query(
            "SELECT block_idx, state, attempts, started_at, ended_at, error, exit_code, output
             FROM jobs WHERE run_id = $1 ORDER BY block_idx, idx",
            &[&key],
        )
        .await
        .map_err(db_err)?
    {
        let bi: i64 = get(&r, 0)?;
        let bi = usize::try_from(bi).unwrap_or(usize::MAX);
        let job = JobStatus {
            state: codec::job_state(&get::<String>(&r, 1)?)?,
            attempts: count(get(&r, 2)?)?,
            started_at: ts(get(&r, 3)?),
            ended_at: ts(get(&r, 4)?),
            error: get(&r, 5)?,
            exit_code: get(&r, 6)?,
            output: get(&r, 7)?,
        };
        blocks
            .get_mut(bi)
            .ok_or_else(|| Error::Corrupt(format!("run {id}: job of missing block {bi}")))?
            .jobs
            .push(job);
    }
    let stop: Option<String> = get(&row, 7)?;
    let cancel: Option<String> = get(&row, 8)?;
    let cloned: Option<String> = get(&row, 11)?;
    Ok(Run {
        id,
        spec: codec::json(&get::<String>(&row, 0)?)?,
        state: codec::run_state(&get::<String>(&row, 1)?)?,
        created_at: Timestamp(get(&row, 2)?),
        started_at: ts(get(&row, 3)?),
        ended_at: ts(get(&row, 4)?),
        expires_at: ts(get(&row, 5)?),
        error: get(&row, 6)?,
        stop_cause: stop.as_deref().map(codec::json).transpose()?,
        lease_owner: get::<Option<String>>(&row, 9)?.map(NodeId),
        lease_expires_at: ts(get(&row, 10)?),
        cloned_from: cloned.as_deref().map(codec::run_id).transpose()?,
        cancel_requested: cancel.as_deref().map(codec::json).transpose()?,
        blocks,
    })
}

pub(crate) async fn list_runs<C: GenericClient>(c: &C, f: &RunFilter) -> Result<RunPage> {
    let mut sql = String::from(
        "SELECT id, name, (spec::jsonb) ->> 'desc', labels::text, state, created_at, started_at,
                ended_at, error, stop_cause FROM runs WHERE TRUE",
    );
    let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    let mut push = |sql: &mut String, fmt: &str, v: Box<dyn ToSql + Sync + Send>| {
        args.push(v);
        sql.push_str(&fmt.replace('?', &format!("${}", args.len())));
    };
    if !f.states.is_empty() {
        let states: Vec<String> = f.states.iter().map(|s| s.as_str().to_owned()).collect();
        push(&mut sql, " AND state = ANY(?)", Box::new(states));
    }
    if let Some(name) = &f.name {
        push(&mut sql, " AND name = ?", Box::new(name.clone()));
    }
    if !f.labels.is_empty() {
        push(
            &mut sql,
            " AND labels @> ?::text::jsonb",
            Box::new(to_json(&f.labels)?),
        );
    }
    if let Some(token) = &f.page_token {
        push(&mut sql, " AND id < ?", Box::new(token.clone()));
    }
    let size = f.effective_page_size();
    let _ = write!(sql, " ORDER BY id DESC LIMIT {}", size + 1);
    let params: Vec<&(dyn ToSql + Sync)> = args
        .iter()
        .map(|a| a.as_ref() as &(dyn ToSql + Sync))
        .collect();
    let rows = c.query(&sql, &params).await.map_err(db_err)?;
    let mut runs = Vec::with_capacity(rows.len());
    for r in &rows {
        let stop: Option<String> = get(r, 9)?;
        runs.push(RunSummary {
            id: codec::run_id(&get::<String>(r, 0)?)?,
            name: get(r, 1)?,
            desc: get::<Option<String>>(r, 2)?.unwrap_or_default(),
            labels: codec::json(&get::<String>(r, 3)?)?,
            state: codec::run_state(&get::<String>(r, 4)?)?,
            created_at: Timestamp(get(r, 5)?),
            started_at: ts(get(r, 6)?),
            ended_at: ts(get(r, 7)?),
            error: get(r, 8)?,
            stop_cause: stop.as_deref().map(codec::json).transpose()?,
        });
    }
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
    let key = id.to_string();
    c.execute(
        "UPDATE runs SET state = $2, ended_at = $3, stop_cause = $4, error = $5,
                version = version + 1
         WHERE id = $1",
        &[
            &key,
            &state.as_str(),
            &now.0,
            &to_json(cause)?,
            &cause.to_string(),
        ],
    )
    .await
    .map_err(db_err)?;
    c.execute(
        "UPDATE blocks SET state = 'skipped' WHERE run_id = $1",
        &[&key],
    )
    .await
    .map_err(db_err)?;
    c.execute(
        "UPDATE jobs SET state = 'skipped' WHERE run_id = $1",
        &[&key],
    )
    .await
    .map_err(db_err)?;
    Ok(())
}

pub(crate) async fn apply(
    c: &Conn,
    node: &str,
    id: RunId,
    transitions: &[Transition],
) -> Result<()> {
    let key = id.to_string();
    // The lease fence: this row lock is held to the end of the batch's transaction, so no
    // other node can claim the run between the check and the writes.
    let fenced = c
        .execute(
            "UPDATE runs SET version = version + 1 WHERE id = $1 AND lease_owner = $2",
            &[&key, &node],
        )
        .await
        .map_err(db_err)?;
    if fenced == 0 {
        let exists = c
            .query_opt("SELECT 1 FROM runs WHERE id = $1", &[&key])
            .await
            .map_err(db_err)?;
        return Err(if exists.is_some() {
            Error::LeaseLost { run: id }
        } else {
            Error::NotFound(id)
        });
    }
    // The writes, sent together: they run in order, in this transaction, behind the fence.
    let mut owned: Vec<(&'static str, Vec<Param>)> = Vec::new();
    for t in transitions {
        statements(&key, t, &mut owned)?;
    }
    let stmts: Vec<(&str, Vec<&(dyn ToSql + Sync)>)> = owned
        .iter()
        .map(|(sql, ps)| {
            (
                *sql,
                ps.iter()
                    .map(|p| p.as_ref() as &(dyn ToSql + Sync))
                    .collect(),
            )
        })
        .collect();
    c.execute_all(&stmts).await.map_err(db_err)
}

type Param = Box<dyn ToSql + Sync + Send>;

fn p<T: ToSql + Sync + Send + 'static>(v: T) -> Param {
    Box::new(v)
}

/// The SQL for one transition, appended to `out`.
fn statements(key: &str, t: &Transition, out: &mut Vec<(&'static str, Vec<Param>)>) -> Result<()> {
    let k = || p(key.to_owned());
    match t {
        Transition::RunRunning { at } => out.push((
            "UPDATE runs SET state = 'running', started_at = COALESCE(started_at, $2) WHERE id = $1",
            vec![k(), p(at.0)],
        )),
        Transition::RunPaused { .. } => {
            out.push(("UPDATE runs SET state = 'paused' WHERE id = $1", vec![k()]));
        }
        Transition::BlockStarted { block, at } => out.push((
            "UPDATE blocks SET state = 'running', started_at = COALESCE(started_at, $3)
             WHERE run_id = $1 AND idx = $2",
            vec![k(), p(i64::from(*block)), p(at.0)],
        )),
        Transition::JobStarted {
            key: jk,
            attempt,
            at,
        } => out.push((
            "UPDATE jobs SET state = 'running', attempts = $4, started_at = COALESCE(started_at, $5)
             WHERE run_id = $1 AND block_idx = $2 AND idx = $3",
            vec![
                k(),
                p(i64::from(jk.block)),
                p(i64::from(jk.job)),
                p(i64::from(*attempt)),
                p(at.0),
            ],
        )),
        Transition::JobFinished {
            key: jk,
            state,
            at,
            error,
            exit_code,
            output,
        } => out.push((
            "UPDATE jobs SET state = $4, ended_at = $5, error = $6, exit_code = $7, output = $8
             WHERE run_id = $1 AND block_idx = $2 AND idx = $3",
            vec![
                k(),
                p(i64::from(jk.block)),
                p(i64::from(jk.job)),
                p(state.as_str()),
                p(at.0),
                p(error.clone()),
                p(*exit_code),
                p(output.clone()),
            ],
        )),
        Transition::JobInterrupted { key: jk, error } => out.push((
            "UPDATE jobs SET state = 'pending', error = $4
             WHERE run_id = $1 AND block_idx = $2 AND idx = $3 AND state = 'running'",
            vec![
                k(),
                p(i64::from(jk.block)),
                p(i64::from(jk.job)),
                p(error.clone()),
            ],
        )),
        Transition::BlockFinished { block, state, at } => {
            out.push((
                "UPDATE blocks SET state = $3, ended_at = $4 WHERE run_id = $1 AND idx = $2",
                vec![k(), p(i64::from(*block)), p(state.as_str()), p(at.0)],
            ));
            out.push((
                "UPDATE jobs SET state = 'skipped'
                 WHERE run_id = $1 AND block_idx = $2 AND state = 'pending'",
                vec![k(), p(i64::from(*block))],
            ));
        }
        Transition::RunFinished {
            state,
            at,
            error,
            stop_cause,
        } => {
            let leftover = store::leftover_state(*state).as_str();
            out.push((
                "UPDATE runs SET state = $2, ended_at = $3, error = $4, stop_cause = $5,
                        cancel_requested = NULL, lease_owner = NULL, lease_expires_at = NULL
                 WHERE id = $1",
                vec![
                    k(),
                    p(state.as_str()),
                    p(at.0),
                    p(error.clone()),
                    p(stop_cause.as_ref().map(to_json).transpose()?),
                ],
            ));
            out.push((
                "UPDATE blocks SET state = CASE state WHEN 'pending' THEN 'skipped' ELSE $2 END,
                        ended_at = COALESCE(ended_at, $3)
                 WHERE run_id = $1 AND state IN ('pending', 'running')",
                vec![k(), p(leftover), p(at.0)],
            ));
            out.push((
                "UPDATE jobs SET state = CASE state WHEN 'pending' THEN 'skipped' ELSE $2 END,
                        ended_at = CASE state WHEN 'running' THEN $3 ELSE ended_at END
                 WHERE run_id = $1 AND state IN ('pending', 'running')",
                vec![k(), p(leftover), p(at.0)],
            ));
        }
        Transition::RunInterrupted { cause } => out.push((
            "UPDATE runs SET stop_cause = $2 WHERE id = $1",
            vec![k(), p(to_json(cause)?)],
        )),
    }
    Ok(())
}
