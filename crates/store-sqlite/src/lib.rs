//! The embedded SQLite backend.
//!
//! One writer thread owns the write connection and commits whatever has queued up while the
//! previous commit was being fsynced: one transaction (and one fsync) per batch, each request
//! in its own savepoint so that one failing request does not undo the others (group commit;
//! a request alone in its batch needs none).
//! Reads go to a small pool of WAL reader connections on the blocking thread pool.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use async_trait::async_trait;
use domain::{NodeId, Run, RunId, RunState, StopCause, Timestamp};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use store::codec::to_json;
use store::rules::{CancelDecision, ExecDecision};
use store::sql::{self, Statement, Value};
use store::writer::{self, Finish, WriteConn, Writer};
use store::{
    CancelOutcome, Error, ExecOutcome, LeaseRenewal, NewRun, Result, RunFilter, RunPage, RunStore,
    Submitted, Transition, Workflows,
};
use tokio::sync::oneshot;

mod auth;
pub mod backup;
mod buckets;
mod estop;
mod rows;
mod schedules;

const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_init.sql"),
    include_str!("../migrations/0002_estop.sql"),
    include_str!("../migrations/0003_buckets.sql"),
    include_str!("../migrations/0004_auth.sql"),
    include_str!("../migrations/0005_schedules.sql"),
    include_str!("../migrations/0006_retention_labels.sql"),
];
const READERS: usize = 4;
/// Prepared statements each connection keeps. A run's writes and reads use a few dozen
/// distinct statements; SQLite's parser costs more than executing most of them, so every one
/// must stay prepared (rusqlite keeps 16 by default, and past that they were parsed again).
const STATEMENT_CACHE: usize = 256;

/// A request in the writer's batch. Given no connection, it runs nothing and only hands back
/// its finisher: the batch's transaction could not start, and nothing may run outside one.
type WriteJob = Box<dyn FnOnce(Option<&Connection>) -> (bool, Finish) + Send>;

pub struct SqliteStore {
    path: PathBuf,
    writer: Writer<WriteJob>,
    writer_thread: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<Mutex<Vec<Connection>>>,
    /// At most READERS reads at once, so they reuse the pooled connections instead of each
    /// opening its own (opening costs far more than a point read).
    read_slots: Arc<tokio::sync::Semaphore>,
}

pub(crate) fn db_err(e: rusqlite::Error) -> Error {
    use rusqlite::ffi::ErrorCode;
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) =>
        {
            Error::Unavailable(e.to_string())
        }
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(f.code, ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) =>
        {
            Error::Corrupt(e.to_string())
        }
        rusqlite::Error::FromSqlConversionFailure(..) | rusqlite::Error::InvalidColumnType(..) => {
            Error::Corrupt(e.to_string())
        }
        _ => Error::Unavailable(e.to_string()),
    }
}

/// Keeps every statement a connection runs prepared, with one plan: the statement cache holds
/// them all, and the query planner's stability guarantee (QPSG) stops SQLite from preparing a
/// statement again each time a new value is bound to it. Without QPSG, a read such as "a run's
/// blocks in order" was parsed and planned anew at every call, because the plan of `WHERE
/// run_id = ?1 ORDER BY idx` may depend on the value; no statement here gains from a plan
/// made for its values.
fn keep_plans(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

/// A connection for reads (the pool's).
fn open_reader(path: &Path) -> Result<Connection> {
    let c = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(db_err)?;
    c.busy_timeout(std::time::Duration::from_secs(10))
        .map_err(db_err)?;
    keep_plans(&c).map_err(db_err)?;
    Ok(c)
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    keep_plans(conn)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA synchronous = FULL;
         PRAGMA foreign_keys = ON;
         PRAGMA temp_store = MEMORY;",
    )?;
    Ok(())
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let current: usize = conn
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
        .map_err(db_err)?
        .try_into()
        .unwrap_or(0);
    if current > MIGRATIONS.len() {
        return Err(Error::Corrupt(format!(
            "database schema version {current} is newer than this steward ({}); upgrade steward",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        let tx = conn.transaction().map_err(db_err)?;
        tx.execute_batch(sql).map_err(db_err)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
            .map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        tracing::info!(version = i + 1, "applied database migration");
    }
    Ok(())
}

/// The write connection. Its calls block: the writer runs on a thread of its own, and each
/// future below is ready when first polled.
struct WriteConnection(Connection);

impl WriteConn for WriteConnection {
    type Job = WriteJob;
    const BEGIN: &'static str = "BEGIN IMMEDIATE; SAVEPOINT op";
    const BEGIN_ALONE: &'static str = "BEGIN IMMEDIATE";

    fn ready(&mut self) -> impl Future<Output = Result<()>> + Send {
        std::future::ready(Ok(()))
    }

    fn execute(&mut self, sql: &str) -> impl Future<Output = Result<()>> + Send {
        std::future::ready(control(&self.0, sql))
    }

    fn run(
        &mut self,
        lead: &str,
        job: WriteJob,
    ) -> impl Future<Output = (Result<()>, bool, Finish)> + Send {
        // No round trips to save: the lead first, and the request only if it went through.
        std::future::ready(match control(&self.0, lead) {
            Ok(()) => {
                let (ok, fin) = job(Some(&self.0));
                (Ok(()), ok, fin)
            }
            Err(e) => (Err(e), false, job(None).1),
        })
    }

    fn refuse(job: WriteJob) -> impl Future<Output = Finish> + Send {
        std::future::ready(job(None).1)
    }
}

/// Runs the writer's transaction control: `BEGIN IMMEDIATE; SAVEPOINT op`, `RELEASE SAVEPOINT
/// op; SAVEPOINT op` and the like, a handful of fixed statements joined by `;` (none holds a
/// `;` of its own). Each is prepared once and kept, not parsed again at every request.
fn control(c: &Connection, sql: &str) -> Result<()> {
    sql.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .try_for_each(|s| {
            c.prepare_cached(s)
                .and_then(|mut st| st.execute([]))
                .map(drop)
        })
        .map_err(db_err)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let mut conn = Connection::open(path).map_err(db_err)?;
        configure(&conn).map_err(db_err)?;
        migrate(&mut conn)?;
        let (writer, mut rx) = Writer::new();
        let thread = std::thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                futures::executor::block_on(store::writer::run(
                    &mut WriteConnection(conn),
                    &mut rx,
                ));
            })
            .map_err(|e| Error::Unavailable(format!("starting the writer thread: {e}")))?;
        Ok(SqliteStore {
            path: path.to_owned(),
            writer,
            writer_thread: Mutex::new(Some(thread)),
            readers: Arc::new(Mutex::new(Vec::new())),
            read_slots: Arc::new(tokio::sync::Semaphore::new(READERS)),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` in the next batch; resolves once the batch is durable.
    async fn write<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.writer.send(Box::new(move |conn| {
            writer::answer(conn.map_or(Err(Error::Closed), f), tx)
        }))?;
        writer::reply(rx).await
    }

    fn write_nowait<F>(&self, what: &'static str, f: F)
    where
        F: FnOnce(&Connection) -> Result<()> + Send + 'static,
    {
        let job: WriteJob =
            Box::new(move |conn| writer::log_failure(conn.map_or(Err(Error::Closed), f), what));
        if let Err(e) = self.writer.send(job) {
            tracing::warn!(error = %e, what, "could not queue a write");
        }
    }

    async fn read<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
    {
        let _slot = self.read_slots.acquire().await.map_err(|_| Error::Closed)?;
        let pool = self.readers.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool.lock().ok().and_then(|mut p| p.pop());
            let conn = match conn {
                Some(c) => c,
                None => open_reader(&path)?,
            };
            let r = f(&conn);
            if let Ok(mut p) = pool.lock()
                && p.len() < READERS
            {
                p.push(conn);
            }
            r
        })
        .await
        .map_err(|e| Error::Unavailable(format!("read task failed: {e}")))?
    }
}

/// Stores a run in `submitted`, or answers the run already stored under its idempotency key.
/// Stores `run` as `submitted`, or, with `lease` (the node and until when), as `queued` and
/// leased to that node; unless its idempotency key names a run already, which is answered.
pub(crate) fn insert_run(
    c: &Connection,
    run: &NewRun,
    lease: Option<(&NodeId, Timestamp)>,
) -> Result<Submitted> {
    if let Some(key) = &run.spec.idempotency_key {
        let existing: Option<String> = c
            .prepare_cached("SELECT id FROM runs WHERE idempotency_key = ?1")
            .and_then(|mut s| s.query_row([key], |r| r.get(0)).optional())
            .map_err(db_err)?;
        if let Some(id) = existing {
            let id = id.parse().map_err(|e| Error::Corrupt(format!("{e}")))?;
            return Ok(Submitted { id, created: false });
        }
    }
    let id = run.id.to_string();
    let labels = to_json(&run.spec.labels)?;
    let spec = to_json(&run.spec)?;
    c.prepare_cached(
        "INSERT INTO runs (id, name, labels, idempotency_key, spec, state, created_at, expires_at,
                           cloned_from, submitted_by, schedule, nominal_time, lease_owner,
                           lease_expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?12, ?6, ?7, ?8, ?9, ?10, ?11, ?13, ?14)",
    )
    .and_then(|mut s| {
        s.execute(params![
            id,
            run.spec.name,
            labels,
            run.spec.idempotency_key,
            spec,
            run.created_at.0,
            run.expires_at.0,
            run.cloned_from.map(|c| c.to_string()),
            run.submitted_by,
            run.schedule.as_ref().map(|s| s.name.as_str()),
            run.schedule.as_ref().map(|s| s.nominal_time.0),
            if lease.is_some() {
                "queued"
            } else {
                "submitted"
            },
            lease.map(|(node, _)| node.0.as_str()),
            lease.map(|(_, until)| until.0),
        ])
    })
    .map_err(db_err)?;
    let mut label = c
        .prepare_cached("INSERT INTO run_labels (run_id, key, value) VALUES (?1, ?2, ?3)")
        .map_err(db_err)?;
    for (k, v) in &run.spec.labels {
        label.execute(params![id, k, v]).map_err(db_err)?;
    }
    let mut block = c
        .prepare_cached("INSERT INTO blocks (run_id, idx, state) VALUES (?1, ?2, 'pending')")
        .map_err(db_err)?;
    let mut job = c
        .prepare_cached(
            "INSERT INTO jobs (run_id, block_idx, idx, state) VALUES (?1, ?2, ?3, 'pending')",
        )
        .map_err(db_err)?;
    for (bi, b) in (0_i64..).zip(run.spec.blocks.iter()) {
        block.execute(params![id, bi]).map_err(db_err)?;
        for ji in 0..b.jobs.len() as i64 {
            job.execute(params![id, bi, ji]).map_err(db_err)?;
        }
    }
    Ok(Submitted {
        id: run.id,
        created: true,
    })
}

const EXECUTING: &str = "('queued','running','paused')";

#[async_trait]
impl RunStore for SqliteStore {
    async fn submit(&self, run: NewRun) -> Result<Submitted> {
        self.write(move |c| insert_run(c, &run, None)).await
    }

    async fn submit_started(&self, run: store::StartedRun) -> Result<Submitted> {
        self.write(move |c| insert_run(c, &run.run, Some((&run.node, run.lease_until))))
            .await
    }

    async fn get(&self, id: RunId) -> Result<Run> {
        self.read(move |c| rows::load_run(c, id)).await
    }

    async fn list(&self, filter: &RunFilter) -> Result<RunPage> {
        let filter = filter.clone();
        self.read(move |c| rows::list_runs(c, &filter)).await
    }

    async fn count_by_state(&self) -> Result<Vec<(RunState, u64)>> {
        self.read(|c| {
            let mut out = Vec::new();
            rows::query(c, sql::COUNT_BY_STATE, &[], |r| {
                out.push(sql::count_row(r)?);
                Ok(())
            })?;
            Ok(out)
        })
        .await
    }

    async fn exec(
        &self,
        id: RunId,
        node: &NodeId,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<ExecOutcome> {
        let node = node.0.clone();
        self.write(move |c| {
            let key = Value::Text(id.to_string());
            let (state, expires_at, created_at) = rows::query_opt(
                c,
                "SELECT state, expires_at, created_at FROM runs WHERE id = $1",
                std::slice::from_ref(&key),
                sql::exec_row,
            )?
            .ok_or(Error::NotFound(id))?;
            match store::rules::exec(state, expires_at, created_at, now) {
                ExecDecision::AlreadyStarted(state) => Ok(ExecOutcome::AlreadyStarted(state)),
                ExecDecision::Expire(cause) => {
                    rows::finish_unstarted(c, id, RunState::Expired, now, &cause)?;
                    Ok(ExecOutcome::Expired)
                }
                ExecDecision::Queue => {
                    rows::execute(
                        c,
                        &Statement {
                            sql: sql::QUEUE,
                            params: vec![key, node.into(), lease_until.0.into()],
                        },
                    )?;
                    Ok(ExecOutcome::Queued)
                }
            }
        })
        .await
    }

    async fn cancel(&self, id: RunId, cause: StopCause, now: Timestamp) -> Result<CancelOutcome> {
        self.write(move |c| {
            let key = Value::Text(id.to_string());
            let (state, owner) = rows::query_opt(
                c,
                "SELECT state, lease_owner FROM runs WHERE id = $1",
                std::slice::from_ref(&key),
                sql::cancel_row,
            )?
            .ok_or(Error::NotFound(id))?;
            match store::rules::cancel(state) {
                CancelDecision::AlreadyFinished(state) => Ok(CancelOutcome::AlreadyFinished(state)),
                CancelDecision::CancelNow => {
                    rows::finish_unstarted(c, id, RunState::Cancelled, now, &cause)?;
                    Ok(CancelOutcome::Cancelled)
                }
                CancelDecision::Request => {
                    rows::execute(
                        c,
                        &Statement {
                            sql: sql::REQUEST_CANCEL,
                            params: vec![key, to_json(&cause)?.into()],
                        },
                    )?;
                    Ok(CancelOutcome::Requested { lease_owner: owner })
                }
            }
        })
        .await
    }

    async fn expire_submitted(&self, now: Timestamp) -> Result<Vec<RunId>> {
        self.write(move |c| {
            let mut due = Vec::new();
            rows::query(
                c,
                "SELECT id, expires_at, created_at FROM runs
                 WHERE state = 'submitted' AND expires_at <= $1 LIMIT 10000",
                &[now.0.into()],
                |r| {
                    due.push(sql::due_row(r)?);
                    Ok(())
                },
            )?;
            for (id, cause) in &due {
                rows::finish_unstarted(c, *id, RunState::Expired, now, cause)?;
            }
            Ok(due.into_iter().map(|(id, _)| id).collect())
        })
        .await
    }

    async fn recover(
        &self,
        node: &NodeId,
        lease_until: Timestamp,
        limit: u32,
    ) -> Result<Vec<RunId>> {
        let node = node.0.clone();
        self.write(move |c| {
            let sql = format!(
                "UPDATE runs SET lease_expires_at = $2
                 WHERE id IN (SELECT id FROM runs WHERE lease_owner = $1 AND state IN {EXECUTING} ORDER BY id LIMIT $3)
                 RETURNING id"
            );
            rows::collect_ids(c, &sql, &[node.into(), lease_until.0.into(), limit.into()])
        })
        .await
    }

    async fn claim_orphans(
        &self,
        node: &NodeId,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
    ) -> Result<Vec<RunId>> {
        let node = node.0.clone();
        self.write(move |c| {
            let sql = format!(
                "UPDATE runs SET lease_owner = $1, lease_expires_at = $3, version = version + 1
                 WHERE id IN (SELECT id FROM runs WHERE state IN {EXECUTING}
                              AND (lease_owner IS NULL OR lease_expires_at < $2) ORDER BY id LIMIT $4)
                 RETURNING id"
            );
            rows::collect_ids(
                c,
                &sql,
                &[node.into(), now.0.into(), lease_until.0.into(), limit.into()],
            )
        })
        .await
    }

    async fn renew_leases(
        &self,
        node: &NodeId,
        held: &[RunId],
        lease_until: Timestamp,
    ) -> Result<LeaseRenewal> {
        let node = node.0.clone();
        let held = held.to_vec();
        self.write(move |c| {
            let mut leased = Vec::new();
            rows::query(
                c,
                &format!(
                    "UPDATE runs SET lease_expires_at = $2 WHERE lease_owner = $1 AND state IN {EXECUTING}
                     RETURNING id, cancel_requested"
                ),
                &[node.into(), lease_until.0.into()],
                |r| {
                    leased.push(sql::leased(r)?);
                    Ok(())
                },
            )?;
            Ok(store::rules::renewal(leased, &held))
        })
        .await
    }

    async fn release(&self, node: &NodeId, id: RunId) -> Result<()> {
        let node = node.0.clone();
        self.write(move |c| {
            rows::execute(
                c,
                &Statement {
                    sql: sql::RELEASE,
                    params: vec![id.to_string().into(), node.into()],
                },
            )
            .map(drop)
        })
        .await
    }

    async fn apply(&self, node: &NodeId, id: RunId, transitions: Vec<Transition>) -> Result<()> {
        let node = node.0.clone();
        self.write(move |c| rows::apply(c, &node, id, &transitions))
            .await
    }

    fn apply_nowait(&self, node: &NodeId, id: RunId, transitions: Vec<Transition>) {
        let node = node.0.clone();
        self.write_nowait("apply", move |c| rows::apply(c, &node, id, &transitions));
    }

    async fn prune_runs(
        &self,
        before: Timestamp,
        which: &Workflows,
        limit: u32,
        dry_run: bool,
    ) -> Result<u64> {
        // Names are bound as values: one, or a JSON array of those left out.
        let (scope, name) = match which {
            Workflows::Only(n) => ("name = ?2", n.clone()),
            Workflows::AllBut(names) => (
                "name NOT IN (SELECT value FROM json_each(?2))",
                to_json(names)?,
            ),
        };
        let finished = store::sql::FINISHED;
        let due = format!("ended_at < ?1 AND state IN {finished} AND {scope}");
        if dry_run {
            let sql = format!("SELECT COUNT(*) FROM runs WHERE {due}");
            return self
                .read(move |c| {
                    c.query_row(&sql, params![before.0, name], |r| r.get::<_, i64>(0))
                        .map(|n| u64::try_from(n).unwrap_or(0))
                        .map_err(db_err)
                })
                .await;
        }
        let sql = format!(
            "DELETE FROM runs WHERE id IN (SELECT id FROM runs WHERE {due} ORDER BY ended_at LIMIT ?3)"
        );
        self.write(move |c| {
            c.prepare_cached(&sql)
                .and_then(|mut s| s.execute(params![before.0, name, limit]))
                .map(|n| n as u64)
                .map_err(db_err)
        })
        .await
    }

    async fn close(&self) -> Result<()> {
        self.writer.close();
        let thread = self.writer_thread.lock().ok().and_then(|mut t| t.take());
        if let Some(t) = thread {
            tokio::task::spawn_blocking(move || t.join())
                .await
                .map_err(|e| Error::Unavailable(format!("joining the writer: {e}")))?
                .map_err(|_| Error::Unavailable("the writer thread panicked".into()))?;
        }
        Ok(())
    }
}

#[async_trait]
impl store::AuditPrune for SqliteStore {
    async fn prune_audit(&self, before: Timestamp, limit: u32) -> Result<u64> {
        self.write(move |c| {
            let audit = rows::execute(
                c,
                &Statement {
                    sql: store::sql::PRUNE_ESTOP_AUDIT,
                    params: vec![before.to_rfc3339().into(), limit.into()],
                },
            )?;
            let access = rows::execute(
                c,
                &Statement {
                    sql: store::sql::PRUNE_ACCESS_LOG,
                    params: vec![before.0.into(), limit.into()],
                },
            )?;
            Ok((audit + access) as u64)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` runs of 2 blocks of 2 jobs each, stored through the store.
    async fn stored_runs(s: &SqliteStore, n: usize) -> Vec<RunId> {
        let mut ids = Vec::new();
        for _ in 0..n {
            let nr = store_conformance::new_run(store_conformance::spec("plans", 2, 2));
            ids.push(s.submit(nr).await.expect("submit").id);
        }
        ids
    }

    /// SQLite syncs with `fdatasync` (see `.cargo/config.toml`): the flag reaches the bundled
    /// SQLite's build only through the workspace's configuration, so tests built without it
    /// (cargo started outside the workspace, or `LIBSQLITE3_FLAGS` set to something else in the
    /// environment) fail here instead of passing on a SQLite that syncs with `fsync`. Cargo
    /// hands the same value to this crate and to `libsqlite3-sys`'s build script, which builds
    /// again when it changes.
    #[test]
    fn sqlite_is_built_to_sync_with_fdatasync() {
        let flags = option_env!("LIBSQLITE3_FLAGS").unwrap_or("");
        assert!(
            flags.split_whitespace().any(|f| f == "-DHAVE_FDATASYNC=1"),
            "LIBSQLITE3_FLAGS is {flags:?}: build from the workspace, whose .cargo/config.toml sets it"
        );
    }

    #[tokio::test]
    async fn a_read_is_planned_once_whatever_values_it_is_given() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("steward.db");
        let s = SqliteStore::open(&path).expect("open");
        let ids = stored_runs(&s, 3).await;
        let c = open_reader(&path).expect("reader");
        for id in &ids {
            let run = rows::load_run(&c, *id).expect("load");
            assert_eq!(run.blocks.len(), 2);
        }
        for sql in [sql::LOAD_RUN, sql::LOAD_BLOCKS, sql::LOAD_JOBS] {
            let st = c
                .prepare_cached(&sql::sqlite_placeholders(sql))
                .expect("cached");
            assert_eq!(
                st.get_status(rusqlite::StatementStatus::RePrepare),
                0,
                "prepared again on a new value: {sql}"
            );
        }
        s.close().await.expect("close");
    }

    fn append_access(c: &Connection, call: &str) -> Result<()> {
        c.execute(
            "INSERT INTO access_log (at, actor, call, target, allowed, peer, detail)
             VALUES (1, 'a', ?1, '-', 1, '-', '')",
            [call],
        )
        .map(drop)
        .map_err(db_err)
    }

    async fn calls(s: &SqliteStore) -> Vec<String> {
        s.read(|c| {
            let mut st = c
                .prepare("SELECT call FROM access_log ORDER BY seq")
                .map_err(db_err)?;
            let out = st
                .query_map([], |r| r.get::<_, String>(0))
                .and_then(Iterator::collect)
                .map_err(db_err)?;
            Ok(out)
        })
        .await
        .expect("read")
    }

    /// A request that fails after it wrote: alone in its batch (no savepoint), or among
    /// others (each in its savepoint), it leaves nothing and the others keep their writes.
    #[tokio::test]
    async fn a_request_that_fails_after_writing_leaves_nothing_alone_or_in_a_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SqliteStore::open(&dir.path().join("steward.db")).expect("open");
        let failing = |call: &'static str| {
            move |c: &Connection| -> Result<()> {
                append_access(c, call)?;
                Err(Error::Conflict(format!("{call} failed after writing")))
            }
        };
        let err = s.write(failing("alone")).await.unwrap_err();
        assert_eq!(err, Error::Conflict("alone failed after writing".into()));
        s.write(|c| append_access(c, "after")).await.expect("after");
        assert_eq!(calls(&s).await, ["after"]);

        // Three requests in one batch: queued while the writer is held by a request of its
        // own, so that they are taken together.
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let holder = s.write(move |_| {
            let _ = started_tx.send(());
            let _ = go_rx.recv_timeout(std::time::Duration::from_secs(10));
            Ok(())
        });
        let queue = async {
            while started_rx.try_recv().is_err() {
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            s.write_nowait("first", |c| append_access(c, "first"));
            s.write_nowait("middle", failing("middle"));
            s.write_nowait("last", |c| append_access(c, "last"));
            let _ = go_tx.send(());
        };
        let (held, ()) = tokio::join!(holder, queue);
        held.expect("holder");
        // Committed in order: once this one is, the batch before it is too.
        s.write(|_| Ok(())).await.expect("after the batch");
        assert_eq!(calls(&s).await, ["after", "first", "last"]);
        s.close().await.expect("close");
    }

    #[test]
    fn transaction_control_runs_each_statement_and_a_rollback_undoes_the_savepoint() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = Connection::open(dir.path().join("t.db")).expect("open");
        configure(&c).expect("configure");
        migrate(&mut c).expect("migrate");
        let count = |c: &Connection| -> i64 {
            c.query_row("SELECT count(*) FROM access_log", [], |r| r.get(0))
                .expect("count")
        };
        let append = |c: &Connection| {
            c.execute(
                "INSERT INTO access_log (at, actor, call, target, allowed, peer, detail)
                 VALUES (1, 'a', 'Submit', '-', 1, '-', '')",
                [],
            )
            .expect("insert")
        };
        control(&c, "BEGIN IMMEDIATE; SAVEPOINT op").expect("begin");
        append(&c);
        control(&c, "RELEASE SAVEPOINT op; SAVEPOINT op").expect("release");
        append(&c);
        control(&c, "ROLLBACK TO SAVEPOINT op; RELEASE SAVEPOINT op").expect("rollback");
        control(&c, "COMMIT").expect("commit");
        assert_eq!(
            count(&c),
            1,
            "the kept savepoint stays, the rolled back one goes"
        );
        // The same control again, from the statement cache.
        control(&c, "BEGIN IMMEDIATE; SAVEPOINT op").expect("begin again");
        append(&c);
        control(&c, "RELEASE SAVEPOINT op; COMMIT").expect("commit again");
        assert_eq!(count(&c), 2);
        assert!(control(&c, "COMMIT").is_err(), "no transaction to commit");
    }
}
