//! The group-commit writer both backends use: one connection commits whatever has queued up
//! while the previous commit was in flight, in one transaction, each request in its own
//! savepoint so that one failing request does not undo the others (a request alone in its
//! batch needs none: its transaction is rolled back if it fails). Requests are committed in
//! the order they were queued, which is what [`RunStore::apply_nowait`](crate::RunStore::apply_nowait)
//! relies on.
//!
//! A backend supplies a [`WriteConn`]: how to run a statement and a request on its connection.
//! The SQLite backend drives [`run`] on a thread of its own (its calls block); the PostgreSQL
//! backend on the runtime.

use std::future::Future;
use std::sync::RwLock;

use tokio::sync::{mpsc, oneshot};

/// A crash window for the kill -9 tests: with the `failpoints` feature,
/// `FAILPOINTS=NAME=return` (or counts such as `20*off->return`) kills the process here with
/// SIGKILL, exactly like `kill -9` from outside.
macro_rules! crash_point {
    ($name:literal) => {
        fail::fail_point!($name, |_| {
            tracing::error!(
                failpoint = $name,
                "fail point reached: killing this process with SIGKILL"
            );
            let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
            std::process::abort()
        })
    };
}

use crate::{Error, Result};

/// The most requests in one transaction.
pub const MAX_BATCH: usize = 1024;

/// Told whether the batch that held a request committed; hands the answer to whoever waits.
pub type Finish = Box<dyn FnOnce(Result<()>) + Send>;

/// A write connection as the writer sees it.
pub trait WriteConn: Send {
    /// A queued request: it runs on the connection and says whether it succeeded (its
    /// savepoint, or its transaction when it is alone, is then kept).
    type Job: Send + 'static;

    /// Opens the batch's transaction and its first savepoint: `BEGIN; SAVEPOINT op` or the
    /// backend's equal.
    const BEGIN: &'static str;

    /// Opens the transaction of a batch of one request, which needs no savepoint: `BEGIN` or
    /// the backend's equal.
    const BEGIN_ALONE: &'static str;

    /// Makes the connection usable (a backend that reconnects does it here). An error fails
    /// the batch, none of whose requests then run.
    fn ready(&mut self) -> impl Future<Output = Result<()>> + Send;

    /// Runs statements without parameters (transaction control).
    fn execute(&mut self, sql: &str) -> impl Future<Output = Result<()>> + Send;

    /// Runs the transaction control `lead` (opening the batch, or closing the previous
    /// request's savepoint and opening the next), then one request. A backend with round
    /// trips sends both together (PostgreSQL pipelines them), so that moving between
    /// requests costs none of its own. Returns how `lead` went, whether the request succeeded
    /// (the writer then keeps it, or else rolls back its savepoint or its transaction) and its
    /// finisher.
    fn run(
        &mut self,
        lead: &str,
        job: Self::Job,
    ) -> impl Future<Output = (Result<()>, bool, Finish)> + Send;

    /// The finisher of a request that does not run (its batch's transaction did not start).
    fn refuse(job: Self::Job) -> impl Future<Output = Finish> + Send;

    /// Whether `job` may run in a group ([`WriteConn::run_group`]) with the requests next to
    /// it. None may by default.
    fn groupable(_job: &Self::Job) -> bool {
        false
    }

    /// Runs `lead`, then consecutive groupable requests in the one savepoint `lead` opened.
    /// Each finisher gets its own request's result: a request that failed changed nothing,
    /// and the others are kept. Returns how `lead` went, whether the savepoint is kept, and
    /// the finishers in order.
    ///
    /// By default each request runs alone, in a savepoint of its own inside the group's; a
    /// backend with round trips sends the group at once instead (PostgreSQL).
    fn run_group(
        &mut self,
        lead: &str,
        jobs: Vec<Self::Job>,
    ) -> impl Future<Output = (Result<()>, bool, Vec<Finish>)> + Send {
        async move {
            let mut finishers = Vec::with_capacity(jobs.len());
            let mut jobs = jobs.into_iter();
            let mut step = format!("{lead}; SAVEPOINT one");
            let mut kept = true;
            for job in jobs.by_ref() {
                let (led, ok, fin) = self.run(&step, job).await;
                finishers.push(fin);
                if let Err(e) = led {
                    for job in jobs {
                        finishers.push(Self::refuse(job).await);
                    }
                    // A failed step of transaction control fails the batch.
                    return (Err(e), false, finishers);
                }
                let close = if ok {
                    "RELEASE SAVEPOINT one"
                } else {
                    "ROLLBACK TO SAVEPOINT one; RELEASE SAVEPOINT one"
                };
                step = format!("{close}; SAVEPOINT one");
                kept = ok;
            }
            let close = if kept {
                "RELEASE SAVEPOINT one"
            } else {
                "ROLLBACK TO SAVEPOINT one; RELEASE SAVEPOINT one"
            };
            match self.execute(close).await {
                Ok(()) => (Ok(()), true, finishers),
                Err(e) => (Err(e), false, finishers),
            }
        }
    }
}

/// Commits batches from `rx` until every sender is gone.
pub async fn run<C: WriteConn>(conn: &mut C, rx: &mut mpsc::UnboundedReceiver<C::Job>) {
    let mut batch: Vec<C::Job> = Vec::with_capacity(MAX_BATCH);
    let mut finishers: Vec<Finish> = Vec::with_capacity(MAX_BATCH);
    while let Some(job) = rx.recv().await {
        batch.push(job);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.ready().await {
            tracing::error!(error = %e, "a write batch could not start");
            for job in batch.drain(..) {
                let fin = C::refuse(job).await;
                fin(Err(e.clone()));
            }
            continue;
        }
        // Each request goes with the transaction control before it: the batch's BEGIN for
        // the first, the previous savepoint's close and the next one's opening for the rest.
        // The last close goes with COMMIT, whose result is the batch's: if anything in the
        // transaction went wrong, nothing of it is kept.
        let n = batch.len();
        // A request alone in its batch needs no savepoint: the transaction is its own, and
        // rolling it back undoes the request and nothing else. A savepoint costs SQLite a copy
        // of every page the request changes, and PostgreSQL two statements.
        let alone = n == 1 && !C::groupable(&batch[0]);
        let begin = if alone { C::BEGIN_ALONE } else { C::BEGIN };
        let mut lead = begin.to_owned();
        let mut res = Ok(());
        let mut jobs = batch.drain(..).peekable();
        let mut i = 0;
        while let Some(job) = jobs.next() {
            let (led, ok) = if C::groupable(&job) {
                let mut group = vec![job];
                while let Some(next) = jobs.next_if(C::groupable) {
                    group.push(next);
                }
                i += group.len() - 1;
                let (led, ok, fins) = conn.run_group(&lead, group).await;
                finishers.extend(fins);
                (led, ok)
            } else {
                let (led, ok, fin) = conn.run(&lead, job).await;
                finishers.push(fin);
                (led, ok)
            };
            i += 1;
            // A failed step of transaction control fails the batch: what a savepoint holds
            // is no longer known (a later rollback to it could undo a request already told
            // it went through), so nothing of the batch is kept.
            if let Err(e) = led {
                if lead == begin {
                    tracing::error!(error = %e, "a write batch could not start");
                } else {
                    tracing::error!(error = %e, "moving to the next savepoint failed");
                }
                res = Err(e);
                break;
            }
            let close = if ok {
                "RELEASE SAVEPOINT op"
            } else {
                "ROLLBACK TO SAVEPOINT op; RELEASE SAVEPOINT op"
            };
            if i < n {
                lead = format!("{close}; SAVEPOINT op");
            } else if alone && !ok {
                // The request failed: undone with its transaction, its own error is its
                // answer. (A database may have rolled it back already, after an I/O error:
                // then the ROLLBACK finds no transaction, which changes nothing.)
                if let Err(e) = conn.execute("ROLLBACK").await {
                    tracing::debug!(error = %e, "rolling back a failed request");
                }
            } else {
                // Every request of the batch has run (on PostgreSQL, sent pipelined); nothing
                // of it is durable yet.
                crash_point!("store::writer_before_commit");
                let end = if alone {
                    "COMMIT".to_owned()
                } else {
                    format!("{close}; COMMIT")
                };
                res = conn.execute(&end).await;
                if res.is_ok() {
                    // Durable, and nobody told: no caller has acted on it.
                    crash_point!("store::writer_after_commit");
                }
            }
        }
        for job in jobs {
            finishers.push(C::refuse(job).await);
        }
        if let Err(e) = &res {
            tracing::error!(error = %e, "committing a batch failed");
            let _ = conn.execute("ROLLBACK").await;
        }
        for fin in finishers.drain(..) {
            fin(res.clone());
        }
    }
}

/// The sending side of a writer: requests go in until it is closed.
pub struct Writer<J> {
    tx: RwLock<Option<mpsc::UnboundedSender<J>>>,
}

impl<J> Writer<J> {
    /// A writer and the receiver to hand to [`run`].
    pub fn new() -> (Writer<J>, mpsc::UnboundedReceiver<J>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Writer {
                tx: RwLock::new(Some(tx)),
            },
            rx,
        )
    }

    pub fn send(&self, job: J) -> Result<()> {
        let guard = self.tx.read().map_err(|_| Error::Closed)?;
        let tx = guard.as_ref().ok_or(Error::Closed)?;
        tx.send(job).map_err(|_| Error::Closed)
    }

    /// Takes no more requests; [`run`] ends once the queued ones are committed.
    pub fn close(&self) {
        let sender = self.tx.write().ok().and_then(|mut w| w.take());
        drop(sender);
    }
}

/// The outcome of a request whose caller waits on `reply`: it gets `result` once the batch
/// committed, or the commit's error.
pub fn answer<R: Send + 'static>(
    result: Result<R>,
    reply: oneshot::Sender<Result<R>>,
) -> (bool, Finish) {
    let ok = result.is_ok();
    let fin: Finish = Box::new(move |committed| {
        let _ = reply.send(committed.and(result));
    });
    (ok, fin)
}

/// The outcome of a request nobody waits for: a failure is logged as `what`.
pub fn log_failure(result: Result<()>, what: &'static str) -> (bool, Finish) {
    let ok = result.is_ok();
    let fin: Finish = Box::new(move |committed| {
        if let Err(e) = committed.and(result) {
            tracing::warn!(error = %e, what, "a queued write failed");
        }
    });
    (ok, fin)
}

/// The answer a waiting caller gets from `reply`.
pub async fn reply<R>(reply: oneshot::Receiver<Result<R>>) -> Result<R> {
    reply.await.map_err(|_| Error::Closed)?
}
