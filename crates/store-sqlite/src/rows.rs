//! SQL for single requests; each function runs inside the caller's transaction.

use std::fmt::Write as _;

use domain::{
    BlockStatus, JobStatus, NodeId, Run, RunId, RunState, RunSummary, StopCause, Timestamp,
};
use rusqlite::{Connection, OptionalExtension, Params, params};
use store::{Error, Result, RunFilter, RunPage, Transition, codec};

use crate::db_err;
use store::codec::to_json;

fn ts(v: Option<i64>) -> Option<Timestamp> {
    v.map(Timestamp)
}

pub(crate) fn collect_ids(c: &Connection, sql: &str, p: impl Params) -> Result<Vec<RunId>> {
    let mut stmt = c.prepare_cached(sql).map_err(db_err)?;
    let ids = stmt
        .query_map(p, |r| r.get::<_, String>(0))
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(db_err)?;
    ids.iter().map(|s| codec::run_id(s)).collect()
}

pub(crate) fn load_run(c: &Connection, id: RunId) -> Result<Run> {
    let key = id.to_string();
    type RunRow = (
        String,
        String,
        i64,
        Option<i64>,
        Option<i64>,
        Option<i64>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<String>,
        Option<i64>,
        Option<String>,
    );
    let row: Option<RunRow> = c
        .prepare_cached(
            "SELECT spec, state, created_at, started_at, ended_at, expires_at, error, stop_cause,
                    cancel_requested, lease_owner, lease_expires_at, cloned_from
             FROM runs WHERE id = ?1",
        )
        .and_then(|mut s| {
            s.query_row([&key], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                    r.get(10)?,
                    r.get(11)?,
                ))
            })
            .optional()
        })
        .map_err(db_err)?;
    let (
        spec,
        state,
        created,
        started,
        ended,
        expires,
        error,
        stop,
        cancel,
        owner,
        lease_exp,
        cloned,
    ) = row.ok_or(Error::NotFound(id))?;

    let mut blocks: Vec<BlockStatus> = Vec::new();
    {
        let mut stmt = c
            .prepare_cached(
                "SELECT state, started_at, ended_at FROM blocks WHERE run_id = ?1 ORDER BY idx",
            )
            .map_err(db_err)?;
        let mut q = stmt.query([&key]).map_err(db_err)?;
        while let Some(r) = q.next().map_err(db_err)? {
            let state: String = r.get(0).map_err(db_err)?;
            blocks.push(BlockStatus {
                state: codec::job_state(&state)?,
                started_at: ts(r.get(1).map_err(db_err)?),
                ended_at: ts(r.get(2).map_err(db_err)?),
                jobs: Vec::new(),
            });
        }
    }
    {
        let mut stmt = c
            .prepare_cached(
                "SELECT block_idx, state, attempts, started_at, ended_at, error, exit_code, output
                 FROM jobs WHERE run_id = ?1 ORDER BY block_idx, idx",
            )
            .map_err(db_err)?;
        let mut q = stmt.query([&key]).map_err(db_err)?;
        while let Some(r) = q.next().map_err(db_err)? {
            let bi: i64 = r.get(0).map_err(db_err)?;
            let bi = usize::try_from(bi).unwrap_or(usize::MAX);
            let state: String = r.get(1).map_err(db_err)?;
            let job = JobStatus {
                state: codec::job_state(&state)?,
                attempts: r.get(2).map_err(db_err)?,
                started_at: ts(r.get(3).map_err(db_err)?),
                ended_at: ts(r.get(4).map_err(db_err)?),
                error: r.get(5).map_err(db_err)?,
                exit_code: r.get(6).map_err(db_err)?,
                output: r.get(7).map_err(db_err)?,
            };
            blocks
                .get_mut(bi)
                .ok_or_else(|| Error::Corrupt(format!("run {id}: job of missing block {bi}")))?
                .jobs
                .push(job);
        }
    }
    Ok(Run {
        id,
        spec: codec::json(&spec)?,
        state: codec::run_state(&state)?,
        created_at: Timestamp(created),
        started_at: ts(started),
        ended_at: ts(ended),
        expires_at: ts(expires),
        error,
        stop_cause: stop.as_deref().map(codec::json).transpose()?,
        lease_owner: owner.map(NodeId),
        lease_expires_at: ts(lease_exp),
        cloned_from: cloned.as_deref().map(codec::run_id).transpose()?,
        cancel_requested: cancel.as_deref().map(codec::json).transpose()?,
        blocks,
    })
}

pub(crate) fn list_runs(c: &Connection, f: &RunFilter) -> Result<RunPage> {
    let mut sql = String::from(
        "SELECT id, name, json_extract(spec, '$.desc'), labels, state, created_at, started_at, ended_at,
                error, stop_cause FROM runs WHERE 1 = 1",
    );
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
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
    for (k, v) in &f.labels {
        // Key and value are bound as values: no user input is ever part of a JSON path.
        sql.push_str(
            " AND EXISTS (SELECT 1 FROM json_each(runs.labels) AS l WHERE l.key = ? AND l.value = ?)",
        );
        args.push(k.clone().into());
        args.push(v.clone().into());
    }
    if let Some(token) = &f.page_token {
        sql.push_str(" AND id < ?");
        args.push(token.clone().into());
    }
    let size = f.effective_page_size();
    let _ = write!(sql, " ORDER BY id DESC LIMIT {}", size + 1);
    let mut stmt = c.prepare_cached(&sql).map_err(db_err)?;
    let mut q = stmt
        .query(rusqlite::params_from_iter(args))
        .map_err(db_err)?;
    let mut runs = Vec::new();
    while let Some(r) = q.next().map_err(db_err)? {
        let id: String = r.get(0).map_err(db_err)?;
        let labels: String = r.get(3).map_err(db_err)?;
        let state: String = r.get(4).map_err(db_err)?;
        let stop: Option<String> = r.get(9).map_err(db_err)?;
        runs.push(RunSummary {
            id: codec::run_id(&id)?,
            name: r.get(1).map_err(db_err)?,
            desc: r
                .get::<_, Option<String>>(2)
                .map_err(db_err)?
                .unwrap_or_default(),
            labels: codec::json(&labels)?,
            state: codec::run_state(&state)?,
            created_at: Timestamp(r.get(5).map_err(db_err)?),
            started_at: ts(r.get(6).map_err(db_err)?),
            ended_at: ts(r.get(7).map_err(db_err)?),
            error: r.get(8).map_err(db_err)?,
            stop_cause: stop.as_deref().map(codec::json).transpose()?,
        });
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
    let key = id.to_string();
    let cause_json = to_json(cause)?;
    c.prepare_cached(
        "UPDATE runs SET state = ?2, ended_at = ?3, stop_cause = ?4, error = ?5, version = version + 1 WHERE id = ?1",
    )
    .and_then(|mut s| s.execute(params![key, state.as_str(), now.0, cause_json, cause.to_string()]))
    .map_err(db_err)?;
    c.prepare_cached("UPDATE blocks SET state = 'skipped' WHERE run_id = ?1")
        .and_then(|mut s| s.execute([&key]))
        .map_err(db_err)?;
    c.prepare_cached("UPDATE jobs SET state = 'skipped' WHERE run_id = ?1")
        .and_then(|mut s| s.execute([&key]))
        .map_err(db_err)?;
    Ok(())
}

pub(crate) fn apply(
    c: &Connection,
    node: &str,
    id: RunId,
    transitions: &[Transition],
) -> Result<()> {
    let key = id.to_string();
    let fenced = c
        .prepare_cached("UPDATE runs SET version = version + 1 WHERE id = ?1 AND lease_owner = ?2")
        .and_then(|mut s| s.execute(params![key, node]))
        .map_err(db_err)?;
    if fenced == 0 {
        let exists: Option<i64> = c
            .prepare_cached("SELECT 1 FROM runs WHERE id = ?1")
            .and_then(|mut s| s.query_row([&key], |r| r.get(0)).optional())
            .map_err(db_err)?;
        return Err(if exists.is_some() {
            Error::LeaseLost { run: id }
        } else {
            Error::NotFound(id)
        });
    }
    for t in transitions {
        let res = match t {
            Transition::RunRunning { at } => c
                .prepare_cached(
                    "UPDATE runs SET state = 'running', started_at = COALESCE(started_at, ?2) WHERE id = ?1",
                )
                .and_then(|mut s| s.execute(params![key, at.0])),
            Transition::RunPaused { .. } => c
                .prepare_cached("UPDATE runs SET state = 'paused' WHERE id = ?1")
                .and_then(|mut s| s.execute(params![key])),
            Transition::BlockStarted { block, at } => c
                .prepare_cached(
                    "UPDATE blocks SET state = 'running', started_at = COALESCE(started_at, ?3)
                     WHERE run_id = ?1 AND idx = ?2",
                )
                .and_then(|mut s| s.execute(params![key, block, at.0])),
            Transition::JobStarted { key: jk, attempt, at } => c
                .prepare_cached(
                    "UPDATE jobs SET state = 'running', attempts = ?4, started_at = COALESCE(started_at, ?5)
                     WHERE run_id = ?1 AND block_idx = ?2 AND idx = ?3",
                )
                .and_then(|mut s| s.execute(params![key, jk.block, jk.job, attempt, at.0])),
            Transition::JobFinished { key: jk, state, at, error, exit_code, output } => c
                .prepare_cached(
                    "UPDATE jobs SET state = ?4, ended_at = ?5, error = ?6, exit_code = ?7, output = ?8
                     WHERE run_id = ?1 AND block_idx = ?2 AND idx = ?3",
                )
                .and_then(|mut s| {
                    s.execute(params![key, jk.block, jk.job, state.as_str(), at.0, error, exit_code, output])
                }),
            Transition::JobInterrupted { key: jk, error } => c
                .prepare_cached(
                    "UPDATE jobs SET state = 'pending', error = ?4
                     WHERE run_id = ?1 AND block_idx = ?2 AND idx = ?3 AND state = 'running'",
                )
                .and_then(|mut s| s.execute(params![key, jk.block, jk.job, error])),
            Transition::BlockFinished { block, state, at } => c
                .prepare_cached(
                    "UPDATE blocks SET state = ?3, ended_at = ?4 WHERE run_id = ?1 AND idx = ?2",
                )
                .and_then(|mut s| s.execute(params![key, block, state.as_str(), at.0]))
                .and_then(|_| {
                    c.prepare_cached(
                        "UPDATE jobs SET state = 'skipped' WHERE run_id = ?1 AND block_idx = ?2 AND state = 'pending'",
                    )
                    .and_then(|mut s| s.execute(params![key, block]))
                }),
            Transition::RunFinished { state, at, error, stop_cause } => {
                let leftover = store::leftover_state(*state).as_str();
                let stop_cause = stop_cause.as_ref().map(to_json).transpose()?;
                c.prepare_cached(
                    "UPDATE runs SET state = ?2, ended_at = ?3, error = ?4, stop_cause = ?5, cancel_requested = NULL,
                            lease_owner = NULL, lease_expires_at = NULL
                     WHERE id = ?1",
                )
                .and_then(|mut s| {
                    s.execute(params![key, state.as_str(), at.0, error, stop_cause])
                })
                .and_then(|_| {
                    c.prepare_cached(
                        "UPDATE blocks SET state = CASE state WHEN 'pending' THEN 'skipped' ELSE ?2 END,
                                ended_at = COALESCE(ended_at, ?3)
                         WHERE run_id = ?1 AND state IN ('pending', 'running')",
                    )
                    .and_then(|mut s| s.execute(params![key, leftover, at.0]))
                })
                .and_then(|_| {
                    c.prepare_cached(
                        "UPDATE jobs SET state = CASE state WHEN 'pending' THEN 'skipped' ELSE ?2 END,
                                ended_at = CASE state WHEN 'running' THEN ?3 ELSE ended_at END
                         WHERE run_id = ?1 AND state IN ('pending', 'running')",
                    )
                    .and_then(|mut s| s.execute(params![key, leftover, at.0]))
                })
            }
            Transition::RunInterrupted { cause } => {
                let cause = to_json(cause)?;
                c.prepare_cached("UPDATE runs SET stop_cause = ?2 WHERE id = ?1")
                    .and_then(|mut s| s.execute(params![key, cause]))
            }
        };
        res.map_err(db_err)?;
    }
    Ok(())
}
