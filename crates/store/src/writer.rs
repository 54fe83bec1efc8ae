//! The group-commit writer both backends use: one connection commits whatever has queued up
//! while the previous commit was in flight, in one transaction, each request in its own
//! savepoint so that one failing request does not undo the others. Requests are committed in
//! the order they were queued, which is what [`RunStore::apply_nowait`](crate::RunStore::apply_nowait)
//! relies on.
//!
//! A backend supplies a [`WriteConn`]: how to run a statement and a request on its connection.
//! The SQLite backend drives [`run`] on a thread of its own (its calls block); the PostgreSQL
//! backend on the runtime.

use std::future::Future;
use std::sync::RwLock;

use tokio::sync::{mpsc, oneshot};

use crate::{Error, Result};

/// The most requests in one transaction.
pub const MAX_BATCH: usize = 1024;

/// Told whether the batch that held a request committed; hands the answer to whoever waits.
pub type Finish = Box<dyn FnOnce(Result<()>) + Send>;

/// A write connection as the writer sees it.
pub trait WriteConn: Send {
    /// A queued request: it runs on the connection and says whether its savepoint is kept.
    type Job: Send + 'static;

    /// Opens the batch's transaction and its first savepoint: `BEGIN; SAVEPOINT op` or the
    /// backend's equal.
    const BEGIN: &'static str;

    /// Makes the connection usable (a backend that reconnects does it here). An error fails
    /// the batch, none of whose requests then run.
    fn ready(&mut self) -> impl Future<Output = Result<()>> + Send;

    /// Runs statements without parameters (transaction control).
    fn execute(&mut self, sql: &str) -> impl Future<Output = Result<()>> + Send;

    /// Runs one request: whether it succeeded (its savepoint is released, or else rolled back)
    /// and its finisher.
    fn run(&mut self, job: Self::Job) -> impl Future<Output = (bool, Finish)> + Send;

    /// The finisher of a request that does not run (its batch's transaction did not start).
    fn refuse(job: Self::Job) -> impl Future<Output = Finish> + Send;
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
        let begun = match conn.ready().await {
            Ok(()) => conn.execute(C::BEGIN).await,
            Err(e) => Err(e),
        };
        if let Err(e) = begun {
            tracing::error!(error = %e, "a write batch could not start");
            let _ = conn.execute("ROLLBACK").await;
            for job in batch.drain(..) {
                let fin = C::refuse(job).await;
                fin(Err(e.clone()));
            }
            continue;
        }
        // Closing one savepoint and opening the next is one call; so is the last close with
        // COMMIT, whose result is the batch's: if anything in the transaction went wrong,
        // nothing of it is kept.
        let n = batch.len();
        let mut res = Ok(());
        for (i, job) in batch.drain(..).enumerate() {
            let (ok, fin) = conn.run(job).await;
            finishers.push(fin);
            let close = if ok {
                "RELEASE SAVEPOINT op"
            } else {
                "ROLLBACK TO SAVEPOINT op; RELEASE SAVEPOINT op"
            };
            if i + 1 < n {
                if let Err(e) = conn.execute(&format!("{close}; SAVEPOINT op")).await {
                    // The transaction is aborted: the rest fail, and so does the commit.
                    tracing::error!(error = %e, "moving to the next savepoint failed");
                }
            } else {
                res = conn.execute(&format!("{close}; COMMIT")).await;
            }
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
