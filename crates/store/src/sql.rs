//! What both SQL backends say to their database and how they read its answers, written once:
//! the statements each engine [`Transition`] becomes, the statements that end a run, the
//! queries that load one, and the decoding of their rows.
//!
//! Statements are written with PostgreSQL's `$N` placeholders; the SQLite backend binds the
//! same numbers as `?N` ([`sqlite_placeholders`]). Values are [`Value`]s, which each backend
//! binds in its own way; rows are read through [`Row`].

use std::borrow::Cow;

use domain::estop::{AuditRecord, EStopState, Target};
use domain::{
    BlockStatus, JobStatus, NodeId, Run, RunId, RunState, RunSummary, StopCause, Timestamp,
};

use crate::codec::{self, to_json};
use crate::{Error, Result, Transition};

/// A value bound to a statement's parameter.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Int(i64),
    Text(String),
    Null,
}

impl From<i64> for Value {
    fn from(v: i64) -> Value {
        Value::Int(v)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::Int(i64::from(v))
    }
}

impl From<&str> for Value {
    fn from(v: &str) -> Value {
        Value::Text(v.to_owned())
    }
}

impl From<String> for Value {
    fn from(v: String) -> Value {
        Value::Text(v)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

impl From<i32> for Value {
    fn from(v: i32) -> Value {
        Value::Int(i64::from(v))
    }
}

/// One statement with its parameters, `$1` first.
#[derive(Clone, Debug, PartialEq)]
pub struct Statement {
    pub sql: &'static str,
    pub params: Vec<Value>,
}

fn stmt(sql: &'static str, params: Vec<Value>) -> Statement {
    Statement { sql, params }
}

/// `sql` with `$N` written `?N`, as SQLite numbers its parameters. The statements here hold
/// no other `$`.
pub fn sqlite_placeholders(sql: &str) -> Cow<'_, str> {
    if sql.contains('$') {
        Cow::Owned(sql.replace('$', "?"))
    } else {
        Cow::Borrowed(sql)
    }
}

/// The lease fence every engine write starts with: it changes one row when `node` still holds
/// the run, none otherwise (see [`unfenced`]). `$1` the run, `$2` the node.
pub const FENCE: &str = "UPDATE runs SET version = version + 1 WHERE id = $1 AND lease_owner = $2";

/// Whether a run exists, for the error of a write the fence refused. `$1` the run.
pub const RUN_EXISTS: &str = "SELECT 1 FROM runs WHERE id = $1";

/// The error of a write the fence refused: the run belongs to another node now, or is gone.
pub fn unfenced(id: RunId, exists: bool) -> Error {
    if exists {
        Error::LeaseLost { run: id }
    } else {
        Error::NotFound(id)
    }
}

/// Gives up the lease on an unfinished run. `$1` the run, `$2` the node.
pub const RELEASE: &str =
    "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL, version = version + 1
     WHERE id = $1 AND lease_owner = $2";

/// Exec's write: `submitted` → `queued`, leased. `$1` the run, `$2` the node, `$3` until.
pub const QUEUE: &str = "UPDATE runs SET state = 'queued', lease_owner = $2, lease_expires_at = $3,
        version = version + 1
 WHERE id = $1";

/// Cancel's write for a run that is executing: the first request wins. `$1` the run, `$2` the
/// cause (JSON).
pub const REQUEST_CANCEL: &str =
    "UPDATE runs SET cancel_requested = COALESCE(cancel_requested, $2), version = version + 1
     WHERE id = $1";

/// The statements that end a run that never started (cancelled or expired before Exec).
pub fn finish_unstarted(
    id: RunId,
    state: RunState,
    now: Timestamp,
    cause: &StopCause,
) -> Result<Vec<Statement>> {
    let key = id.to_string();
    Ok(vec![
        stmt(
            "UPDATE runs SET state = $2, ended_at = $3, stop_cause = $4, error = $5,
                    version = version + 1
             WHERE id = $1",
            vec![
                key.clone().into(),
                state.as_str().into(),
                now.0.into(),
                to_json(cause)?.into(),
                cause.to_string().into(),
            ],
        ),
        stmt(
            "UPDATE blocks SET state = 'skipped' WHERE run_id = $1",
            vec![key.clone().into()],
        ),
        stmt(
            "UPDATE jobs SET state = 'skipped' WHERE run_id = $1",
            vec![key.into()],
        ),
    ])
}

/// The statements of the transitions of run `id`, in order, appended to `out`. They run after
/// the [`FENCE`], in its transaction.
pub fn transitions(id: RunId, ts: &[Transition], out: &mut Vec<Statement>) -> Result<()> {
    let key = id.to_string();
    let k = || Value::Text(key.clone());
    for t in ts {
        match t {
            Transition::RunRunning { at } => out.push(stmt(
                "UPDATE runs SET state = 'running', started_at = COALESCE(started_at, $2) WHERE id = $1",
                vec![k(), at.0.into()],
            )),
            Transition::RunPaused { .. } => out.push(stmt(
                "UPDATE runs SET state = 'paused' WHERE id = $1",
                vec![k()],
            )),
            Transition::BlockStarted { block, at } => out.push(stmt(
                "UPDATE blocks SET state = 'running', started_at = COALESCE(started_at, $3)
                 WHERE run_id = $1 AND idx = $2",
                vec![k(), (*block).into(), at.0.into()],
            )),
            Transition::JobStarted {
                key: jk,
                attempt,
                at,
            } => out.push(stmt(
                "UPDATE jobs SET state = 'running', attempts = $4, started_at = COALESCE(started_at, $5)
                 WHERE run_id = $1 AND block_idx = $2 AND idx = $3",
                vec![
                    k(),
                    jk.block.into(),
                    jk.job.into(),
                    (*attempt).into(),
                    at.0.into(),
                ],
            )),
            Transition::JobFinished {
                key: jk,
                state,
                at,
                error,
                exit_code,
                output,
            } => out.push(stmt(
                "UPDATE jobs SET state = $4, ended_at = $5, error = $6, exit_code = $7, output = $8
                 WHERE run_id = $1 AND block_idx = $2 AND idx = $3",
                vec![
                    k(),
                    jk.block.into(),
                    jk.job.into(),
                    state.as_str().into(),
                    at.0.into(),
                    error.clone().into(),
                    (*exit_code).into(),
                    output.clone().into(),
                ],
            )),
            Transition::JobInterrupted { key: jk, error } => out.push(stmt(
                "UPDATE jobs SET state = 'pending', error = $4
                 WHERE run_id = $1 AND block_idx = $2 AND idx = $3 AND state = 'running'",
                vec![k(), jk.block.into(), jk.job.into(), error.clone().into()],
            )),
            Transition::BlockFinished { block, state, at } => {
                out.push(stmt(
                    "UPDATE blocks SET state = $3, ended_at = $4 WHERE run_id = $1 AND idx = $2",
                    vec![k(), (*block).into(), state.as_str().into(), at.0.into()],
                ));
                out.push(stmt(
                    "UPDATE jobs SET state = 'skipped'
                     WHERE run_id = $1 AND block_idx = $2 AND state = 'pending'",
                    vec![k(), (*block).into()],
                ));
            }
            Transition::RunFinished {
                state,
                at,
                error,
                stop_cause,
            } => {
                let leftover = crate::leftover_state(*state).as_str();
                out.push(stmt(
                    "UPDATE runs SET state = $2, ended_at = $3, error = $4, stop_cause = $5,
                            cancel_requested = NULL, lease_owner = NULL, lease_expires_at = NULL
                     WHERE id = $1",
                    vec![
                        k(),
                        state.as_str().into(),
                        at.0.into(),
                        error.clone().into(),
                        stop_cause.as_ref().map(to_json).transpose()?.into(),
                    ],
                ));
                out.push(stmt(
                    "UPDATE blocks SET state = CASE state WHEN 'pending' THEN 'skipped' ELSE $2 END,
                            ended_at = COALESCE(ended_at, $3)
                     WHERE run_id = $1 AND state IN ('pending', 'running')",
                    vec![k(), leftover.into(), at.0.into()],
                ));
                out.push(stmt(
                    "UPDATE jobs SET state = CASE state WHEN 'pending' THEN 'skipped' ELSE $2 END,
                            ended_at = CASE state WHEN 'running' THEN $3 ELSE ended_at END
                     WHERE run_id = $1 AND state IN ('pending', 'running')",
                    vec![k(), leftover.into(), at.0.into()],
                ));
            }
            Transition::RunInterrupted { cause } => out.push(stmt(
                "UPDATE runs SET stop_cause = $2 WHERE id = $1",
                vec![k(), to_json(cause)?.into()],
            )),
        }
    }
    Ok(())
}

/// A row of a query's answer, as the decoders below read it. Column `i` counts from 0.
pub trait Row {
    fn int(&self, i: usize) -> Result<Option<i64>>;
    fn text(&self, i: usize) -> Result<Option<String>>;
}

fn req<T>(v: Option<T>, i: usize) -> Result<T> {
    v.ok_or_else(|| Error::Corrupt(format!("column {i} is NULL where a value is required")))
}

fn int(r: &dyn Row, i: usize) -> Result<i64> {
    req(r.int(i)?, i)
}

fn text(r: &dyn Row, i: usize) -> Result<String> {
    req(r.text(i)?, i)
}

fn ts(r: &dyn Row, i: usize) -> Result<Option<Timestamp>> {
    Ok(r.int(i)?.map(Timestamp))
}

fn json_opt<T: serde::de::DeserializeOwned>(r: &dyn Row, i: usize) -> Result<Option<T>> {
    r.text(i)?.as_deref().map(codec::json).transpose()
}

/// A run's row. `$1` the run.
pub const LOAD_RUN: &str =
    "SELECT spec, state, created_at, started_at, ended_at, expires_at, error, stop_cause,
            cancel_requested, lease_owner, lease_expires_at, cloned_from, submitted_by,
            schedule, nominal_time
     FROM runs WHERE id = $1";

/// A run's blocks, in order. `$1` the run.
pub const LOAD_BLOCKS: &str =
    "SELECT state, started_at, ended_at FROM blocks WHERE run_id = $1 ORDER BY idx";

/// A run's jobs, in order. `$1` the run.
pub const LOAD_JOBS: &str =
    "SELECT block_idx, state, attempts, started_at, ended_at, error, exit_code, output
     FROM jobs WHERE run_id = $1 ORDER BY block_idx, idx";

/// A run read from the rows of [`LOAD_RUN`], [`LOAD_BLOCKS`] and [`LOAD_JOBS`], in that order.
pub struct RunReader {
    run: Run,
}

impl RunReader {
    pub fn new(id: RunId, r: &dyn Row) -> Result<RunReader> {
        Ok(RunReader {
            run: Run {
                id,
                spec: codec::json(&text(r, 0)?)?,
                state: codec::run_state(&text(r, 1)?)?,
                created_at: Timestamp(int(r, 2)?),
                started_at: ts(r, 3)?,
                ended_at: ts(r, 4)?,
                expires_at: ts(r, 5)?,
                error: r.text(6)?,
                stop_cause: json_opt(r, 7)?,
                cancel_requested: json_opt(r, 8)?,
                lease_owner: r.text(9)?.map(NodeId),
                lease_expires_at: ts(r, 10)?,
                cloned_from: r.text(11)?.as_deref().map(codec::run_id).transpose()?,
                submitted_by: text(r, 12)?,
                schedule: scheduled_by(r, 13)?,
                blocks: Vec::new(),
            },
        })
    }

    pub fn block(&mut self, r: &dyn Row) -> Result<()> {
        self.run.blocks.push(BlockStatus {
            state: codec::job_state(&text(r, 0)?)?,
            started_at: ts(r, 1)?,
            ended_at: ts(r, 2)?,
            jobs: Vec::new(),
        });
        Ok(())
    }

    pub fn job(&mut self, r: &dyn Row) -> Result<()> {
        let bi = int(r, 0)?;
        let attempts = int(r, 2)?;
        let job = JobStatus {
            state: codec::job_state(&text(r, 1)?)?,
            attempts: u32::try_from(attempts)
                .map_err(|_| Error::Corrupt(format!("attempts {attempts} out of range")))?,
            started_at: ts(r, 3)?,
            ended_at: ts(r, 4)?,
            error: r.text(5)?,
            exit_code: r
                .int(6)?
                .map(|c| {
                    i32::try_from(c)
                        .map_err(|_| Error::Corrupt(format!("exit code {c} out of range")))
                })
                .transpose()?,
            output: text(r, 7)?,
        };
        let id = self.run.id;
        usize::try_from(bi)
            .ok()
            .and_then(|bi| self.run.blocks.get_mut(bi))
            .ok_or_else(|| Error::Corrupt(format!("run {id}: job of missing block {bi}")))?
            .jobs
            .push(job);
        Ok(())
    }

    pub fn finish(self) -> Run {
        self.run
    }
}

/// A run of a List page, from the columns `id, name, desc, labels (JSON text), state,
/// created_at, started_at, ended_at, error, stop_cause, submitted_by, schedule, nominal_time`.
pub fn summary(r: &dyn Row) -> Result<RunSummary> {
    Ok(RunSummary {
        id: codec::run_id(&text(r, 0)?)?,
        name: text(r, 1)?,
        desc: r.text(2)?.unwrap_or_default(),
        labels: codec::json(&text(r, 3)?)?,
        state: codec::run_state(&text(r, 4)?)?,
        created_at: Timestamp(int(r, 5)?),
        started_at: ts(r, 6)?,
        ended_at: ts(r, 7)?,
        error: r.text(8)?,
        stop_cause: json_opt(r, 9)?,
        submitted_by: text(r, 10)?,
        schedule: scheduled_by(r, 11)?,
    })
}

/// The columns `schedule, nominal_time` from `i` on.
fn scheduled_by(r: &dyn Row, i: usize) -> Result<Option<domain::ScheduledBy>> {
    Ok(match (r.text(i)?, ts(r, i + 1)?) {
        (Some(name), Some(nominal_time)) => Some(domain::ScheduledBy { name, nominal_time }),
        _ => None,
    })
}

/// The run ID in the first column.
pub fn run_id(r: &dyn Row) -> Result<RunId> {
    codec::run_id(&text(r, 0)?)
}

/// The columns `state, expires_at, created_at` that Exec decides on.
/// Runs per state: `state, count`.
pub const COUNT_BY_STATE: &str = "SELECT state, COUNT(*) FROM runs GROUP BY state";

/// A row of [`COUNT_BY_STATE`].
pub fn count_row(r: &dyn Row) -> Result<(RunState, u64)> {
    let n = int(r, 1)?;
    Ok((
        codec::run_state(&text(r, 0)?)?,
        u64::try_from(n).map_err(|_| Error::Corrupt(format!("a count of {n}")))?,
    ))
}

pub fn exec_row(r: &dyn Row) -> Result<(RunState, Option<i64>, i64)> {
    Ok((codec::run_state(&text(r, 0)?)?, r.int(1)?, int(r, 2)?))
}

/// The columns `state, lease_owner` that Cancel decides on.
pub fn cancel_row(r: &dyn Row) -> Result<(RunState, Option<NodeId>)> {
    Ok((codec::run_state(&text(r, 0)?)?, r.text(1)?.map(NodeId)))
}

/// A run due to expire and its stop cause, from the columns `id, expires_at, created_at`.
pub fn due_row(r: &dyn Row) -> Result<(RunId, StopCause)> {
    Ok((run_id(r)?, crate::rules::expired(int(r, 1)?, int(r, 2)?)))
}

/// A run leased to the renewing node and the cancel asked of it, from the columns
/// `id, cancel_requested` (see [`rules::renewal`](crate::rules::renewal)).
pub fn leased(r: &dyn Row) -> Result<(RunId, Option<StopCause>)> {
    Ok((run_id(r)?, json_opt(r, 1)?))
}

/// Appends one record to the e-stop audit trail.
pub const AUDIT_APPEND: &str =
    "INSERT INTO estop_audit (at, target, old_state, new_state, set_by, reason, source)
 VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// The parameters of [`AUDIT_APPEND`] for `r`.
pub fn audit_params(r: &AuditRecord) -> Vec<Value> {
    vec![
        r.at.clone().into(),
        r.target.to_string().into(),
        r.old_state.map(EStopState::as_str).into(),
        r.new_state.map(EStopState::as_str).into(),
        r.set_by.clone().into(),
        r.reason.clone().into(),
        r.source.clone().into(),
    ]
}

fn audit_state(s: Option<String>) -> Result<Option<EStopState>> {
    s.map(|s| {
        s.parse()
            .map_err(|e| Error::Corrupt(format!("e-stop audit: {e}")))
    })
    .transpose()
}

/// An audit record from the columns `at, target, old_state, new_state, set_by, reason, source`.
pub fn audit_record(r: &dyn Row) -> Result<AuditRecord> {
    Ok(AuditRecord {
        at: text(r, 0)?,
        target: text(r, 1)?
            .parse::<Target>()
            .map_err(|e| Error::Corrupt(format!("e-stop audit: {e}")))?,
        old_state: audit_state(r.text(2)?)?,
        new_state: audit_state(r.text(3)?)?,
        set_by: text(r, 4)?,
        reason: text(r, 5)?,
        source: text(r, 6)?,
    })
}

/// Stores a token. `$1` name, `$2` hash, `$3` role, `$4` scope (JSON), `$5` created by,
/// `$6` created at, `$7` expires at.
pub const TOKEN_CREATE: &str =
    "INSERT INTO tokens (name, hash, role, scope, created_by, created_at, expires_at)
 VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// The parameters of [`TOKEN_CREATE`].
pub fn token_params(t: &crate::TokenRecord) -> Result<Vec<Value>> {
    Ok(vec![
        t.name.clone().into(),
        t.hash.clone().into(),
        t.role.as_str().into(),
        to_json(&t.scope)?.into(),
        t.created_by.clone().into(),
        t.created_at.0.into(),
        t.expires_at.map(|e| e.0).into(),
    ])
}

/// The columns [`token`] reads, for `SELECT {TOKEN_COLUMNS} FROM tokens`.
pub const TOKEN_COLUMNS: &str =
    "name, hash, role, scope, created_by, created_at, expires_at, last_used_at";

/// A token from the columns of [`TOKEN_COLUMNS`].
pub fn token(r: &dyn Row) -> Result<crate::TokenRecord> {
    Ok(crate::TokenRecord {
        name: text(r, 0)?,
        hash: text(r, 1)?,
        role: text(r, 2)?.parse().map_err(Error::Corrupt)?,
        scope: codec::json(&text(r, 3)?)?,
        created_by: text(r, 4)?,
        created_at: Timestamp(int(r, 5)?),
        expires_at: ts(r, 6)?,
        last_used_at: ts(r, 7)?,
    })
}

/// Records a token's use. `$1` the name, `$2` when.
pub const TOKEN_USED: &str = "UPDATE tokens SET last_used_at = $2 WHERE name = $1 AND (last_used_at IS NULL OR last_used_at < $2)";

/// Deletes a token. `$1` the name.
pub const TOKEN_REVOKE: &str = "DELETE FROM tokens WHERE name = $1";

/// Appends to the access log.
pub const ACCESS_APPEND: &str =
    "INSERT INTO access_log (at, actor, call, target, allowed, peer, detail)
 VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// The parameters of [`ACCESS_APPEND`].
pub fn access_params(a: &crate::AccessRecord) -> Vec<Value> {
    vec![
        a.at.0.into(),
        a.actor.clone().into(),
        a.call.clone().into(),
        a.target.clone().into(),
        Value::Int(i64::from(a.allowed)),
        a.peer.clone().into(),
        a.detail.clone().into(),
    ]
}

/// The newest access log records. `$1` how many.
pub const ACCESS_LIST: &str =
    "SELECT at, actor, call, target, allowed, peer, detail FROM access_log
 ORDER BY seq DESC LIMIT $1";

/// An access record from the columns of [`ACCESS_LIST`].
pub fn access_record(r: &dyn Row) -> Result<crate::AccessRecord> {
    Ok(crate::AccessRecord {
        at: Timestamp(int(r, 0)?),
        actor: text(r, 1)?,
        call: text(r, 2)?,
        target: text(r, 3)?,
        allowed: int(r, 4)? != 0,
        peer: text(r, 5)?,
        detail: text(r, 6)?,
    })
}

/// Stores a new schedule unless the name is taken. `$1` name, `$2` spec, `$3` state,
/// `$4` next_check, `$5` last_run.
pub const SCHEDULE_INSERT: &str =
    "INSERT INTO schedules (name, spec, state, next_check, last_run, version)
     VALUES ($1, $2, $3, $4, $5, 1) ON CONFLICT (name) DO NOTHING";

/// Replaces a schedule stored at version `$6`; the parameters as [`SCHEDULE_INSERT`].
pub const SCHEDULE_UPDATE: &str =
    "UPDATE schedules SET spec = $2, state = $3, next_check = $4, last_run = $5,
                          version = version + 1
     WHERE name = $1 AND version = $6";

pub const SCHEDULE_GET: &str = "SELECT spec, state, version FROM schedules WHERE name = $1";
pub const SCHEDULE_LIST: &str = "SELECT spec, state, version FROM schedules ORDER BY name";
pub const SCHEDULE_DELETE: &str = "DELETE FROM schedules WHERE name = $1";
pub const SCHEDULE_NEXT_CHECK: &str = "SELECT MIN(next_check) FROM schedules";

/// Schedules due at `$1`, soonest first, at most `$2`, each with its newest run.
pub const SCHEDULE_DUE: &str = "SELECT s.spec, s.state, s.version, r.id, r.state, r.started_at
     FROM schedules s LEFT JOIN runs r ON r.id = s.last_run
     WHERE s.next_check <= $1 ORDER BY s.next_check LIMIT $2";

/// A schedule's write: [`SCHEDULE_INSERT`] without `expected_version`, else
/// [`SCHEDULE_UPDATE`] over it; and the version it stores.
pub fn schedule_write(
    record: &domain::schedule::ScheduleRecord,
    expected_version: Option<i64>,
) -> Result<(Statement, i64)> {
    let (sql, version) = match expected_version {
        None => (SCHEDULE_INSERT, 1),
        Some(v) => (SCHEDULE_UPDATE, v + 1),
    };
    Ok((
        stmt(sql, schedule_params(record, expected_version)?),
        version,
    ))
}

/// What a [`schedule_write`] that changed no row means.
pub fn schedule_conflict(name: &str, expected_version: Option<i64>) -> Error {
    Error::Conflict(match expected_version {
        None => format!("schedule {name} exists"),
        Some(_) => format!("schedule {name} changed or was deleted"),
    })
}

fn schedule_params(
    record: &domain::schedule::ScheduleRecord,
    expected_version: Option<i64>,
) -> Result<Vec<Value>> {
    let mut p = vec![
        Value::Text(record.spec.schedule.clone()),
        to_json(&record.spec)?.into(),
        to_json(&record.state)?.into(),
        record.state.next_check.map(|t| t.0).into(),
        record.state.last_run.map(|r| r.to_string()).into(),
    ];
    if let Some(v) = expected_version {
        p.push(v.into());
    }
    Ok(p)
}

/// A schedule from the columns `spec, state, version`.
pub fn schedule_record(r: &dyn Row) -> Result<domain::schedule::ScheduleRecord> {
    Ok(domain::schedule::ScheduleRecord {
        spec: codec::json(&text(r, 0)?)?,
        state: codec::json(&text(r, 1)?)?,
        version: int(r, 2)?,
    })
}

/// A schedule's newest run from the columns `id, state, started_at` of [`SCHEDULE_DUE`].
pub fn last_run(r: &dyn Row) -> Result<Option<domain::schedule::LastRun>> {
    let Some(id) = r.text(3)? else {
        return Ok(None);
    };
    Ok(Some(domain::schedule::LastRun {
        id: codec::run_id(&id)?,
        state: codec::run_state(&text(r, 4)?)?,
        started: r.int(5)?.is_some(),
    }))
}

/// The terminal run states, as SQL.
pub const FINISHED: &str = "('completed','failed','stopped','cancelled','expired')";

/// Deletes up to `$2` e-stop audit records older than `$1` (RFC 3339 text, which sorts as
/// time), oldest first.
pub const PRUNE_ESTOP_AUDIT: &str = "DELETE FROM estop_audit WHERE seq IN
     (SELECT seq FROM estop_audit WHERE at < $1 ORDER BY seq LIMIT $2)";

/// Deletes up to `$2` access-log records older than `$1` (unix ms), oldest first.
pub const PRUNE_ACCESS_LOG: &str = "DELETE FROM access_log WHERE seq IN
     (SELECT seq FROM access_log WHERE at < $1 ORDER BY seq LIMIT $2)";
