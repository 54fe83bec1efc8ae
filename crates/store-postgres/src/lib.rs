//! The PostgreSQL backend: several `steward serve` nodes share one database (docs/operating.md, Several nodes on PostgreSQL).
//!
//! Like the SQLite backend, one writer connection commits whatever has queued up while the
//! previous commit was in flight: one transaction per batch, each request in its own
//! savepoint so that one failing request does not undo the others (group commit; a request
//! alone in its batch needs none). Round trips
//! are what a write costs here, so the writer pipelines: each request goes out behind its
//! savepoint step, and consecutive planned requests (statements known before they run: the
//! engine's writes, Submits, access-log lines) go out together as one group in one savepoint,
//! undone and run one by one should any of them fail. Writes from
//! one store handle are committed in the order they were made, which is what
//! [`RunStore::apply_nowait`] relies on. Reads go to a small pool of connections; a run is read
//! in one `REPEATABLE READ` snapshot.
//!
//! **Several nodes.** Every write the engine makes is fenced by the run's lease (`lease_owner`
//! must still be this node, checked in the same transaction), orphan claims skip rows another
//! node is claiming (`FOR UPDATE SKIP LOCKED`), a second Submit of an idempotency key on another
//! node finds the first (`ON CONFLICT DO NOTHING`), and e-stop saves are serialized on the list's
//! row. A lost connection fails the requests of its batch with [`Error::Unavailable`]; the next
//! batch reconnects. Schema migrations are numbered like SQLite's and applied under an advisory
//! lock, so nodes starting together migrate once.

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use domain::{NodeId, Run, RunId, RunState, StopCause, Timestamp};
use futures::future::BoxFuture;
use store::codec::to_json;
use store::rules::{CancelDecision, ExecDecision};
use store::sql::{self, Statement, Value};
use store::writer::{self, Finish, WriteConn, Writer};
use store::{
    CancelOutcome, Error, ExecOutcome, LeaseRenewal, NewRun, Result, RunFilter, RunPage, RunStore,
    Submitted, Transition,
};
use tokio::sync::oneshot;
use tokio_postgres::{Client, NoTls};
use tokio_util::task::TaskTracker;

mod auth;
mod buckets;
mod estop;
mod rows;
mod schedules;
#[cfg(feature = "testing")]
pub mod testing;

const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_init.sql"),
    include_str!("../migrations/0002_estop.sql"),
    include_str!("../migrations/0003_buckets.sql"),
    include_str!("../migrations/0004_auth.sql"),
    include_str!("../migrations/0005_schedules.sql"),
    include_str!("../migrations/0006_retention_labels.sql"),
];
/// Any fixed number: the advisory lock that serializes migrations between nodes.
const MIGRATION_LOCK: i64 = 0x0053_7465_7761_7264;
const READERS: usize = 8;
/// How long the writer waits before trying an unreachable database again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

/// A request that runs on the connection and says whether its savepoint is kept; given no
/// connection, it runs nothing and only hands back its finisher.
type RunJob = Box<dyn for<'a> FnOnce(Option<&'a Conn>) -> BoxFuture<'a, (bool, Finish)> + Send>;

/// Turns a planned request's result into whether its savepoint is kept, and its finisher.
type Done = Box<dyn FnOnce(Result<Outcome>) -> (bool, Finish) + Send>;

/// A request in the writer's batch.
enum WriteJob {
    /// Any request. Given no connection, it runs nothing and only hands back its finisher:
    /// the batch's transaction could not start, and nothing may run outside one.
    Run(RunJob),
    /// Statements known in advance (the engine's transitions, an access-log line), so that
    /// consecutive ones go to the database at once ([`WriteConn::run_group`]).
    Planned(Planned),
}

struct Planned {
    what: Plan,
    done: Done,
}

/// What a planned request is.
enum Plan {
    /// The engine's transitions of a run it holds the lease of: the lease fence first (it
    /// changes no row when the run is not this node's, and then the request fails), then the
    /// writes.
    Apply {
        id: RunId,
        statements: Vec<Statement>,
    },
    /// Writes nothing refuses (an access-log line, a token's last use).
    Append(Vec<Statement>),
    /// A run to store ([`rows::submit_statement`]); `lease` to store it started.
    Submit {
        run: Box<NewRun>,
        lease: Option<(String, i64)>,
        statement: PgStatement,
    },
}

/// What a planned request learned.
enum Outcome {
    Done,
    /// The run a Submit stored, or the one its key named.
    Stored(Submitted),
}

impl Planned {
    /// The engine's transitions of a run it holds the lease of.
    fn apply(
        node: &NodeId,
        id: RunId,
        transitions: &[Transition],
        done: Done,
    ) -> std::result::Result<Planned, (Error, Done)> {
        let mut statements = Vec::with_capacity(transitions.len() + 3);
        statements.push(Statement {
            sql: sql::FENCE,
            params: vec![Value::Text(id.to_string()), node.0.clone().into()],
        });
        match sql::transitions(id, transitions, &mut statements) {
            Ok(()) => Ok(Planned {
                what: Plan::Apply { id, statements },
                done,
            }),
            Err(e) => Err((e, done)),
        }
    }

    /// Its statements, bound, to send with a group's.
    fn bind<'a>(&'a self, binds: &'a [Vec<rows::Bind<'a>>], out: &mut Vec<Bound<'a>>) {
        match &self.what {
            Plan::Apply { statements, .. } | Plan::Append(statements) => {
                for (st, b) in statements.iter().zip(binds) {
                    out.push((st.sql, rows::refs(b)));
                }
            }
            Plan::Submit { statement, .. } => out.push((statement.sql, statement.refs())),
        }
    }

    fn binds(&self) -> Vec<Vec<rows::Bind<'_>>> {
        match &self.what {
            Plan::Apply { statements, .. } | Plan::Append(statements) => statements
                .iter()
                .map(|st| rows::binds(&st.params))
                .collect(),
            Plan::Submit { .. } => Vec::new(),
        }
    }

    fn len(&self) -> usize {
        match &self.what {
            Plan::Apply { statements, .. } | Plan::Append(statements) => statements.len(),
            Plan::Submit { .. } => 1,
        }
    }

    /// What the results of its statements, sent with a group's, say: its outcome when it
    /// went through as planned; none when it must run alone to find out (a fence that found
    /// the run is another node's, a failed statement, an idempotency key taken).
    fn judge(&self, results: &[Result<u64>]) -> Option<Outcome> {
        if !results.iter().all(Result::is_ok) {
            return None;
        }
        match &self.what {
            Plan::Apply { .. } => {
                matches!(results.first(), Some(Ok(n)) if *n > 0).then_some(Outcome::Done)
            }
            Plan::Append(_) => Some(Outcome::Done),
            Plan::Submit { run, .. } => {
                matches!(results.first(), Some(Ok(1))).then_some(Outcome::Stored(Submitted {
                    id: run.id,
                    created: true,
                }))
            }
        }
    }
}

impl Planned {
    /// The finishers of a group that failed as a whole, each told `e`.
    fn fail_all(planned: Vec<Planned>, refused: Vec<Finish>, e: &Error) -> Vec<Finish> {
        planned
            .into_iter()
            .map(|a| (a.done)(Err(e.clone())).1)
            .chain(refused)
            .collect()
    }
}

impl Plan {
    /// Runs it alone (its group was undone), in the caller's savepoint.
    async fn alone(&self, c: &Conn) -> Result<Outcome> {
        match self {
            Plan::Apply { id, statements } => rows::apply_alone(c, *id, statements)
                .await
                .map(|()| Outcome::Done),
            Plan::Append(statements) => c.run_all(statements).await.map(|_| Outcome::Done),
            Plan::Submit { run, lease, .. } => {
                let lease = lease.as_ref().map(|(n, u)| (n.as_str(), *u));
                rows::submit(c, run, lease).await.map(Outcome::Stored)
            }
        }
    }
}

/// A statement and its parameters, ready to send.
pub(crate) type Bound<'a> = (&'a str, Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)>);

/// A statement with parameters of PostgreSQL's own types (arrays), which the shared
/// `store::sql::Value`s do not cover.
pub(crate) struct PgStatement {
    pub(crate) sql: &'static str,
    pub(crate) params: Vec<Box<dyn tokio_postgres::types::ToSql + Sync + Send>>,
}

impl PgStatement {
    pub(crate) fn refs(&self) -> Vec<&(dyn tokio_postgres::types::ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect()
    }
}

/// The writer's connection, with its statements prepared once and kept.
pub(crate) struct Conn {
    client: Client,
    statements: Mutex<std::collections::HashMap<String, tokio_postgres::Statement>>,
}

type Params<'a> = &'a [&'a (dyn tokio_postgres::types::ToSql + Sync)];

impl Conn {
    fn new(client: Client) -> Conn {
        Conn {
            client,
            statements: Mutex::new(std::collections::HashMap::new()),
        }
    }

    async fn prepared(
        &self,
        sql: &str,
    ) -> std::result::Result<tokio_postgres::Statement, tokio_postgres::Error> {
        let cached = self
            .statements
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(sql)
            .cloned();
        if let Some(st) = cached {
            return Ok(st);
        }
        let st = self.client.prepare(sql).await?;
        self.statements
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(sql.to_owned(), st.clone());
        Ok(st)
    }

    pub(crate) async fn execute(
        &self,
        sql: &str,
        p: Params<'_>,
    ) -> std::result::Result<u64, tokio_postgres::Error> {
        let st = self.prepared(sql).await?;
        self.client.execute(&st, p).await
    }

    pub(crate) async fn query(
        &self,
        sql: &str,
        p: Params<'_>,
    ) -> std::result::Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
        let st = self.prepared(sql).await?;
        self.client.query(&st, p).await
    }

    pub(crate) async fn query_opt(
        &self,
        sql: &str,
        p: Params<'_>,
    ) -> std::result::Result<Option<tokio_postgres::Row>, tokio_postgres::Error> {
        let st = self.prepared(sql).await?;
        self.client.query_opt(&st, p).await
    }

    pub(crate) async fn query_one(
        &self,
        sql: &str,
        p: Params<'_>,
    ) -> std::result::Result<tokio_postgres::Row, tokio_postgres::Error> {
        let st = self.prepared(sql).await?;
        self.client.query_one(&st, p).await
    }

    /// The rows of a query with shared parameters.
    pub(crate) async fn rows(
        &self,
        sql: &str,
        params: &[Value],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let binds = rows::binds(params);
        self.query(sql, &rows::refs(&binds)).await.map_err(db_err)
    }

    /// Runs one shared statement; the number of rows it changed.
    pub(crate) async fn run(&self, st: &Statement) -> Result<u64> {
        let binds = rows::binds(&st.params);
        self.execute(st.sql, &rows::refs(&binds))
            .await
            .map_err(db_err)
    }

    /// Runs `stmts` in order, sent together (pipelined): one round trip for all of them once
    /// they are prepared. The rows each changed, or the first error.
    pub(crate) async fn run_all(&self, stmts: &[Statement]) -> Result<Vec<u64>> {
        let binds: Vec<Vec<rows::Bind<'_>>> =
            stmts.iter().map(|st| rows::binds(&st.params)).collect();
        let bound: Vec<Bound<'_>> = stmts
            .iter()
            .zip(&binds)
            .map(|(st, b)| (st.sql, rows::refs(b)))
            .collect();
        self.pipeline(&bound).await.into_iter().collect()
    }

    /// Runs `stmts` in order, sent together (pipelined); each one's result (the rows it
    /// changed or returned). After a failed statement the transaction is aborted, and the
    /// ones behind it fail too.
    pub(crate) async fn pipeline(&self, stmts: &[Bound<'_>]) -> Vec<Result<u64>> {
        use std::future::Future;
        use std::task::Poll;
        let mut prepared = Vec::with_capacity(stmts.len());
        for (sql, _) in stmts {
            match self.prepared(sql).await {
                Ok(p) => prepared.push(p),
                Err(e) => {
                    let e = db_err(e);
                    return stmts.iter().map(|_| Err(e.clone())).collect();
                }
            }
        }
        let mut futs: Vec<_> = prepared
            .iter()
            .zip(stmts)
            .map(|(st, (_, p))| Box::pin(self.client.execute(st, p)))
            .collect();
        // Each statement goes out when its future is first polled: poll them all once, in
        // order; then take the answers, which come in the same order.
        let mut early: Vec<Option<std::result::Result<u64, tokio_postgres::Error>>> =
            futs.iter().map(|_| None).collect();
        std::future::poll_fn(|cx| {
            for (f, e) in futs.iter_mut().zip(early.iter_mut()) {
                if let Poll::Ready(r) = f.as_mut().poll(cx) {
                    *e = Some(r);
                }
            }
            Poll::Ready(())
        })
        .await;
        let mut out = Vec::with_capacity(futs.len());
        for (f, e) in futs.into_iter().zip(early) {
            let r = match e {
                Some(r) => r,
                None => f.await,
            };
            out.push(r.map_err(db_err));
        }
        out
    }

    async fn batch_execute(&self, sql: &str) -> std::result::Result<(), tokio_postgres::Error> {
        self.client.batch_execute(sql).await
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }
}

pub struct PgStore {
    url: String,
    created_schema: bool,
    /// Bumped on every e-stop change any node commits (`LISTEN steward_estop`).
    estop_notes: tokio::sync::watch::Sender<u64>,
    /// Ends the listener on close.
    listener: tokio_util::sync::CancellationToken,
    writer: Writer<WriteJob>,
    writer_done: Mutex<Option<oneshot::Receiver<()>>>,
    readers: deadpool_postgres::Pool,
}

pub(crate) fn db_err(e: tokio_postgres::Error) -> Error {
    use tokio_postgres::error::SqlState;
    if e.is_closed() {
        return Error::Unavailable(format!("the database connection is closed: {e}"));
    }
    match e.code() {
        Some(c) if *c == SqlState::DATA_CORRUPTED || *c == SqlState::INDEX_CORRUPTED => {
            Error::Corrupt(db_message(&e))
        }
        Some(_) => Error::Unavailable(db_message(&e)),
        // Not from the server: a column that does not convert is stored data we cannot read.
        None if e.to_string().contains("deserializing") => Error::Corrupt(with_source(&e)),
        None => Error::Unavailable(with_source(&e)),
    }
}

fn with_source(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(s) => format!("{e}: {s}"),
        None => e.to_string(),
    }
}

fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => format!("{}: {}", d.severity(), d.message()),
        None => with_source(e),
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> Error {
    match e {
        deadpool_postgres::PoolError::Backend(e) => db_err(e),
        other => Error::Unavailable(format!("the database connection pool: {other}")),
    }
}

/// Connects one client and drives its connection on `tracker`.
async fn connect(url: &str, tracker: &TaskTracker) -> Result<Client> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.map_err(db_err)?;
    tracker.spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!(error = %e, "a database connection ended");
        }
    });
    Ok(client)
}

/// Checks a database URL (`postgres://user:password@host:port/db`) and returns it with the
/// password hidden, for logs and printed configs.
pub fn redacted_url(url: &str) -> std::result::Result<String, String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("expected a postgres:// URL".into());
    }
    let c: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
    if c.get_dbname().is_none() {
        return Err("the URL names no database (postgres://user@host:port/DATABASE)".into());
    }
    Ok(hide_password(url))
}

/// `url` with the password of its user info and any `password=` parameter shown as `***`.
/// Works on the text as written (percent-encoded or not), not on the decoded password: a
/// decoded `p@ss` does not appear in `p%40ss`, and would be printed.
fn hide_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_owned(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// Brings the schema up to date; returns whether it created it (an empty database).
async fn migrate(client: &mut Client) -> Result<bool> {
    let tx = client.transaction().await.map_err(db_err)?;
    // Everything below, creating the version table included, one node at a time.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db_err)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS steward_schema (version BIGINT NOT NULL)")
        .await
        .map_err(db_err)?;
    let current: Option<i64> = tx
        .query_opt("SELECT version FROM steward_schema", &[])
        .await
        .map_err(db_err)?
        .map(|r| r.get(0));
    if current.is_none() {
        tx.execute("INSERT INTO steward_schema (version) VALUES (0)", &[])
            .await
            .map_err(db_err)?;
    }
    let current = usize::try_from(current.unwrap_or(0)).unwrap_or(usize::MAX);
    if current > MIGRATIONS.len() {
        return Err(Error::Corrupt(format!(
            "database schema version {current} is newer than this steward ({}); upgrade steward",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.batch_execute(sql).await.map_err(db_err)?;
        let v = i64::try_from(i + 1).unwrap_or(i64::MAX);
        tx.execute("UPDATE steward_schema SET version = $1", &[&v])
            .await
            .map_err(db_err)?;
        tracing::info!(version = v, "applied database migration");
    }
    tx.commit().await.map_err(db_err)?;
    Ok(current == 0)
}

/// The writer's connection, connected again when it was lost.
struct WriteConnection {
    url: String,
    tracker: TaskTracker,
    conn: Conn,
    /// After a failed connect: no new attempt before this.
    retry_at: Option<tokio::time::Instant>,
}

impl WriteConn for WriteConnection {
    type Job = WriteJob;
    const BEGIN: &'static str = "BEGIN; SAVEPOINT op";
    const BEGIN_ALONE: &'static str = "BEGIN";

    async fn ready(&mut self) -> Result<()> {
        if !self.conn.is_closed() {
            return Ok(());
        }
        if let Some(at) = self.retry_at.take() {
            tokio::time::sleep_until(at).await;
        }
        match connect(&self.url, &self.tracker).await {
            Ok(c) => {
                tracing::info!("reconnected the database writer");
                self.conn = Conn::new(c);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "the database is unreachable");
                self.retry_at = Some(tokio::time::Instant::now() + RECONNECT_PAUSE);
                Err(e)
            }
        }
    }

    async fn execute(&mut self, sql: &str) -> Result<()> {
        self.conn.batch_execute(sql).await.map_err(db_err)
    }

    fn groupable(job: &WriteJob) -> bool {
        matches!(job, WriteJob::Planned(_))
    }

    /// The group's statements are sent at once, behind the lead: one round trip for all of
    /// them. Should any request fail (its fence finds the run is not this node's, or a
    /// statement fails), the group's savepoint is rolled back and its requests run again one
    /// by one, each in a savepoint of its own, so that each gets its own result.
    async fn run_group(
        &mut self,
        lead: &str,
        jobs: Vec<WriteJob>,
    ) -> (Result<()>, bool, Vec<Finish>) {
        let conn = &self.conn;
        let mut planned = Vec::with_capacity(jobs.len());
        // Only planned requests are grouped (`groupable`); any other would be refused.
        let mut refused = Vec::new();
        for job in jobs {
            match job {
                WriteJob::Planned(a) => planned.push(a),
                other => refused.push(Self::refuse(other).await),
            }
        }
        let binds: Vec<_> = planned.iter().map(Planned::binds).collect();
        let mut stmts = Vec::new();
        for (p, b) in planned.iter().zip(&binds) {
            p.bind(b, &mut stmts);
        }
        let (led, results) = tokio::join!(conn.batch_execute(lead), conn.pipeline(&stmts));
        drop(stmts);
        drop(binds);
        if let Err(e) = led {
            let e = db_err(e);
            return (
                Err(e.clone()),
                false,
                Planned::fail_all(planned, refused, &e),
            );
        }
        let mut at = 0;
        let mut outcomes = Vec::with_capacity(planned.len());
        for a in &planned {
            let n = a.len();
            outcomes.push(a.judge(&results[at..at + n]));
            at += n;
        }
        let all = outcomes.iter().all(Option::is_some);
        if all {
            let fins = planned
                .into_iter()
                .zip(outcomes.into_iter().flatten())
                .map(|(a, o)| (a.done)(Ok(o)).1)
                .chain(refused)
                .collect();
            return (Ok(()), true, fins);
        }
        // The rare case: some request failed. Undo the group, then one at a time.
        if let Err(e) = conn.batch_execute("ROLLBACK TO SAVEPOINT op").await {
            let e = db_err(e);
            return (
                Err(e.clone()),
                false,
                Planned::fail_all(planned, refused, &e),
            );
        }
        let mut fins = refused;
        let mut planned = planned.into_iter();
        while let Some(a) = planned.next() {
            let Planned { what, done } = a;
            let r = match conn.batch_execute("SAVEPOINT one").await {
                Ok(()) => what.alone(conn).await,
                Err(e) => Err(db_err(e)),
            };
            let (ok, fin) = done(r);
            fins.push(fin);
            let close = if ok {
                "RELEASE SAVEPOINT one"
            } else {
                "ROLLBACK TO SAVEPOINT one; RELEASE SAVEPOINT one"
            };
            if let Err(e) = conn.batch_execute(close).await {
                // The writer fails the whole batch (see `store::writer::run`).
                let e = db_err(e);
                fins.extend(Planned::fail_all(planned.collect(), Vec::new(), &e));
                return (Err(e), false, fins);
            }
        }
        (Ok(()), true, fins)
    }

    async fn run(&mut self, lead: &str, job: WriteJob) -> (Result<()>, bool, Finish) {
        let job = match job {
            WriteJob::Run(job) => job,
            planned @ WriteJob::Planned(_) => {
                let (led, ok, mut fins) = self.run_group(lead, vec![planned]).await;
                let fin = fins.pop().unwrap_or_else(|| Box::new(|_| {}));
                return (led, ok, fin);
            }
        };
        // Pipelined: the lead is sent first (`join` polls it first, and a request is sent on
        // its first poll), the request's statements right behind it, with no wait between.
        // A lead that fails leaves the transaction aborted, and the statements behind it fail
        // with it. (BEGIN does not fail on a live connection; on a lost one, nothing behind
        // it reaches the server either.)
        let conn = &self.conn;
        let (led, (ok, fin)) = tokio::join!(conn.batch_execute(lead), job(Some(conn)));
        (led.map_err(db_err), ok, fin)
    }

    async fn refuse(job: WriteJob) -> Finish {
        match job {
            WriteJob::Run(job) => job(None).await.1,
            WriteJob::Planned(a) => (a.done)(Err(Error::Closed)).1,
        }
    }
}

/// The channel e-stop saves notify on.
pub(crate) const ESTOP_CHANNEL: &str = "steward_estop";

/// Listens for e-stop changes until `cancel`, reconnecting when the connection is lost. Every
/// notification, and every (re)connect (a change may have been missed meanwhile), bumps `notes`.
async fn listen_loop(
    url: String,
    notes: tokio::sync::watch::Sender<u64>,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        match listen(&url, &notes, &cancel).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "listening for e-stop changes failed; reconnecting")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            () = cancel.cancelled() => return,
        }
    }
}

async fn listen(
    url: &str,
    notes: &tokio::sync::watch::Sender<u64>,
    cancel: &tokio_util::sync::CancellationToken,
) -> std::result::Result<(), String> {
    use futures::StreamExt;
    let (client, mut conn) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(|e| with_source(&e))?;
    // The connection's messages, notifications among them; polling them drives the connection.
    let mut messages = futures::stream::poll_fn(move |cx| conn.poll_message(cx));
    let sql = format!("LISTEN {ESTOP_CHANNEL}");
    let subscribe = client.batch_execute(&sql);
    tokio::pin!(subscribe);
    let mut subscribed = false;
    loop {
        tokio::select! {
            r = &mut subscribe, if !subscribed => {
                r.map_err(|e| with_source(&e))?;
                subscribed = true;
                notes.send_modify(|n| *n += 1);
            }
            m = messages.next() => match m {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => {
                    notes.send_modify(|n| *n += 1);
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(with_source(&e)),
                None => return Err("the connection closed".into()),
            },
            () = cancel.cancelled() => return Ok(()),
        }
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host:port/db`), brings the schema up to date, and
    /// starts the writer on `tracker`. Closing the store ([`RunStore::close`]) ends the writer.
    pub async fn connect(url: &str, tracker: &TaskTracker) -> Result<PgStore> {
        let mut client = connect(url, tracker).await?;
        let created_schema = migrate(&mut client).await?;
        let cfg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| Error::Unavailable(format!("database url: {e}")))?;
        let mgr = deadpool_postgres::Manager::from_config(
            cfg,
            NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let readers = deadpool_postgres::Pool::builder(mgr)
            .max_size(READERS)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Unavailable(format!("building the connection pool: {e}")))?;
        let (estop_notes, _) = tokio::sync::watch::channel(0);
        let listener = tokio_util::sync::CancellationToken::new();
        tracker.spawn(listen_loop(
            url.to_owned(),
            estop_notes.clone(),
            listener.clone(),
        ));
        let (writer, mut rx) = Writer::new();
        let (done_tx, done_rx) = oneshot::channel();
        let mut conn = WriteConnection {
            url: url.to_owned(),
            tracker: tracker.clone(),
            conn: Conn::new(client),
            retry_at: None,
        };
        tracker.spawn(async move {
            store::writer::run(&mut conn, &mut rx).await;
            let _ = done_tx.send(());
        });
        Ok(PgStore {
            url: url.to_owned(),
            created_schema,
            estop_notes,
            listener,
            writer,
            writer_done: Mutex::new(Some(done_rx)),
            readers,
        })
    }

    /// The URL without its password, for logs.
    pub fn describe(&self) -> String {
        redacted_url(&self.url).unwrap_or_else(|_| "postgres".into())
    }

    /// Whether this connect found an empty database and created the schema (a fresh install).
    pub fn created_schema(&self) -> bool {
        self.created_schema
    }

    /// Runs `f` in the next batch; resolves once the batch is committed.
    async fn write<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: for<'a> FnOnce(&'a Conn) -> BoxFuture<'a, Result<R>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.writer.send(WriteJob::Run(Box::new(move |conn| {
            Box::pin(async move {
                let r = match conn {
                    Some(c) => f(c).await,
                    None => Err(Error::Closed),
                };
                writer::answer(r, tx)
            })
        })))?;
        writer::reply(rx).await
    }

    /// Stores a run (see [`rows::submit_statement`]), as a planned request: it goes to the
    /// database with the engine's writes of its batch.
    async fn write_submit(&self, run: NewRun, lease: Option<(String, i64)>) -> Result<Submitted> {
        let statement =
            rows::submit_statement(&run, lease.as_ref().map(|(n, u)| (n.as_str(), *u)))?;
        let (tx, rx) = oneshot::channel();
        let done: Done = Box::new(move |r: Result<Outcome>| {
            let r = r.and_then(|o| match o {
                Outcome::Stored(s) => Ok(s),
                Outcome::Done => Err(Error::Corrupt("a Submit stored no run".into())),
            });
            writer::answer(r, tx)
        });
        self.writer.send(WriteJob::Planned(Planned {
            what: Plan::Submit {
                run: Box::new(run),
                lease,
                statement,
            },
            done,
        }))?;
        writer::reply(rx).await
    }

    /// Queues statements nobody waits for and nothing refuses (see [`Planned`]); a failure is
    /// logged as `what`.
    fn write_planned_nowait(&self, what: &'static str, statements: Vec<Statement>) {
        let job = WriteJob::Planned(Planned {
            what: Plan::Append(statements),
            done: Box::new(move |r: Result<Outcome>| writer::log_failure(r.map(drop), what)),
        });
        if let Err(e) = self.writer.send(job) {
            tracing::warn!(error = %e, what, "could not queue a write");
        }
    }

    async fn reader(&self) -> Result<deadpool_postgres::Object> {
        self.readers.get().await.map_err(pool_err)
    }
}

const EXECUTING: &str = "('queued','running','paused')";

#[async_trait]
impl RunStore for PgStore {
    async fn submit(&self, run: NewRun) -> Result<Submitted> {
        self.write_submit(run, None).await
    }

    async fn submit_started(&self, run: store::StartedRun) -> Result<Submitted> {
        self.write_submit(run.run, Some((run.node.0, run.lease_until.0)))
            .await
    }

    async fn get(&self, id: RunId) -> Result<Run> {
        let c = self.reader().await?;
        rows::load_run(&c, id).await
    }

    async fn list(&self, filter: &RunFilter) -> Result<RunPage> {
        let c = self.reader().await?;
        rows::list_runs(&c, filter).await
    }

    async fn count_by_state(&self) -> Result<Vec<(RunState, u64)>> {
        let c = self.reader().await?;
        let found = c.query(sql::COUNT_BY_STATE, &[]).await.map_err(db_err)?;
        found
            .iter()
            .map(|r| sql::count_row(&rows::PgRow(r)))
            .collect()
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
            Box::pin(async move {
                let key = Value::Text(id.to_string());
                let row = c
                    .rows(
                        "SELECT state, expires_at, created_at FROM runs WHERE id = $1 FOR UPDATE",
                        std::slice::from_ref(&key),
                    )
                    .await?;
                let (state, expires_at, created_at) =
                    sql::exec_row(&rows::first(&row).ok_or(Error::NotFound(id))?)?;
                match store::rules::exec(state, expires_at, created_at, now) {
                    ExecDecision::AlreadyStarted(state) => Ok(ExecOutcome::AlreadyStarted(state)),
                    ExecDecision::Expire(cause) => {
                        rows::finish_unstarted(c, id, RunState::Expired, now, &cause).await?;
                        Ok(ExecOutcome::Expired)
                    }
                    ExecDecision::Queue => {
                        c.run(&Statement {
                            sql: sql::QUEUE,
                            params: vec![key, node.into(), lease_until.0.into()],
                        })
                        .await?;
                        Ok(ExecOutcome::Queued)
                    }
                }
            })
        })
        .await
    }

    async fn cancel(&self, id: RunId, cause: StopCause, now: Timestamp) -> Result<CancelOutcome> {
        self.write(move |c| {
            Box::pin(async move {
                let key = Value::Text(id.to_string());
                let row = c
                    .rows(
                        "SELECT state, lease_owner FROM runs WHERE id = $1 FOR UPDATE",
                        std::slice::from_ref(&key),
                    )
                    .await?;
                let (state, owner) =
                    sql::cancel_row(&rows::first(&row).ok_or(Error::NotFound(id))?)?;
                match store::rules::cancel(state) {
                    CancelDecision::AlreadyFinished(state) => {
                        Ok(CancelOutcome::AlreadyFinished(state))
                    }
                    CancelDecision::CancelNow => {
                        rows::finish_unstarted(c, id, RunState::Cancelled, now, &cause).await?;
                        Ok(CancelOutcome::Cancelled)
                    }
                    CancelDecision::Request => {
                        c.run(&Statement {
                            sql: sql::REQUEST_CANCEL,
                            params: vec![key, to_json(&cause)?.into()],
                        })
                        .await?;
                        Ok(CancelOutcome::Requested { lease_owner: owner })
                    }
                }
            })
        })
        .await
    }

    async fn expire_submitted(&self, now: Timestamp) -> Result<Vec<RunId>> {
        self.write(move |c| {
            Box::pin(async move {
                let due = c
                    .rows(
                        "SELECT id, expires_at, created_at FROM runs
                         WHERE state = 'submitted' AND expires_at <= $1
                         LIMIT 10000 FOR UPDATE SKIP LOCKED",
                        &[now.0.into()],
                    )
                    .await?;
                let mut ids = Vec::with_capacity(due.len());
                for row in &due {
                    let (id, cause) = sql::due_row(&rows::PgRow(row))?;
                    rows::finish_unstarted(c, id, RunState::Expired, now, &cause).await?;
                    ids.push(id);
                }
                Ok(ids)
            })
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
            Box::pin(async move {
                let sql = format!(
                    "UPDATE runs SET lease_expires_at = $2
                     WHERE id IN (SELECT id FROM runs WHERE lease_owner = $1 AND state IN {EXECUTING}
                                  ORDER BY id LIMIT $3 FOR UPDATE)
                     RETURNING id"
                );
                rows::collect_ids(c, &sql, &[node.into(), lease_until.0.into(), limit.into()]).await
            })
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
            Box::pin(async move {
                let sql = format!(
                    "UPDATE runs SET lease_owner = $1, lease_expires_at = $3, version = version + 1
                     WHERE id IN (SELECT id FROM runs WHERE state IN {EXECUTING}
                                  AND (lease_owner IS NULL OR lease_expires_at < $2)
                                  ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED)
                     RETURNING id"
                );
                rows::collect_ids(
                    c,
                    &sql,
                    &[
                        node.into(),
                        now.0.into(),
                        lease_until.0.into(),
                        limit.into(),
                    ],
                )
                .await
            })
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
            Box::pin(async move {
                let leased = c
                    .rows(
                        &format!(
                            "UPDATE runs SET lease_expires_at = $2
                             WHERE lease_owner = $1 AND state IN {EXECUTING}
                             RETURNING id, cancel_requested"
                        ),
                        &[node.into(), lease_until.0.into()],
                    )
                    .await?
                    .iter()
                    .map(|r| sql::leased(&rows::PgRow(r)))
                    .collect::<Result<Vec<_>>>()?;
                Ok(store::rules::renewal(leased, &held))
            })
        })
        .await
    }

    async fn release(&self, node: &NodeId, id: RunId) -> Result<()> {
        let node = node.0.clone();
        self.write(move |c| {
            Box::pin(async move {
                c.run(&Statement {
                    sql: sql::RELEASE,
                    params: vec![id.to_string().into(), node.into()],
                })
                .await
                .map(drop)
            })
        })
        .await
    }

    async fn apply(&self, node: &NodeId, id: RunId, transitions: Vec<Transition>) -> Result<()> {
        let (tx, rx) = oneshot::channel();
        let done: Done = Box::new(move |r: Result<Outcome>| writer::answer(r.map(drop), tx));
        let apply = Planned::apply(node, id, &transitions, done).map_err(|(e, _)| e)?;
        self.writer.send(WriteJob::Planned(apply))?;
        writer::reply(rx).await
    }

    fn apply_nowait(&self, node: &NodeId, id: RunId, transitions: Vec<Transition>) {
        let done: Done =
            Box::new(move |r: Result<Outcome>| writer::log_failure(r.map(drop), "apply"));
        match Planned::apply(node, id, &transitions, done) {
            Ok(apply) => {
                if let Err(e) = self.writer.send(WriteJob::Planned(apply)) {
                    tracing::warn!(error = %e, "could not queue a write");
                }
            }
            Err((e, done)) => {
                let (_, fin) = done(Err(e));
                fin(Ok(()));
            }
        }
    }

    async fn prune_runs(
        &self,
        before: Timestamp,
        which: &store::Workflows,
        limit: u32,
        dry_run: bool,
    ) -> Result<u64> {
        let (scope, names): (&str, Vec<String>) = match which {
            store::Workflows::Only(n) => ("name = ANY($2)", vec![n.clone()]),
            store::Workflows::AllBut(names) => ("NOT (name = ANY($2))", names.clone()),
        };
        let due = format!(
            "ended_at < $1 AND state IN {} AND {scope}",
            store::sql::FINISHED
        );
        if dry_run {
            let c = self.reader().await?;
            let row = c
                .query_one(
                    &format!("SELECT COUNT(*) FROM runs WHERE {due}"),
                    &[&before.0, &names],
                )
                .await
                .map_err(db_err)?;
            return Ok(u64::try_from(rows::get::<i64>(&row, 0)?).unwrap_or(0));
        }
        let sql = format!(
            "DELETE FROM runs WHERE id IN (SELECT id FROM runs WHERE {due} ORDER BY ended_at LIMIT $3)"
        );
        let limit = i64::from(limit);
        self.write(move |c| {
            Box::pin(async move {
                c.execute(&sql, &[&before.0, &names, &limit])
                    .await
                    .map_err(db_err)
            })
        })
        .await
    }

    async fn close(&self) -> Result<()> {
        self.writer.close();
        let done = self.writer_done.lock().ok().and_then(|mut d| d.take());
        if let Some(done) = done {
            let _ = done.await;
        }
        self.readers.close();
        self.listener.cancel();
        Ok(())
    }
}

#[async_trait]
impl store::AuditPrune for PgStore {
    async fn prune_audit(&self, before: Timestamp, limit: u32) -> Result<u64> {
        self.write(move |c| {
            Box::pin(async move {
                let audit = c
                    .run(&Statement {
                        sql: sql::PRUNE_ESTOP_AUDIT,
                        params: vec![before.to_rfc3339().into(), limit.into()],
                    })
                    .await?;
                let access = c
                    .run(&Statement {
                        sql: sql::PRUNE_ACCESS_LOG,
                        params: vec![before.0.into(), limit.into()],
                    })
                    .await?;
                Ok(audit + access)
            })
        })
        .await
    }
}
