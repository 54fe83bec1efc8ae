//! The storage contract. Backends (`store-sqlite`, later `store-postgres`) implement
//! [`RunStore`] and [`EStopStore`] and pass the conformance suite (crate `store-conformance`). Nothing here knows SQL.
//!
//! Durability contract: when a method's future resolves `Ok`, the change is durable (fsynced).
//! [`RunStore::apply_nowait`] queues transitions that are committed, in order, no later than
//! the next change made through an awaited method of the same store handle.

use std::collections::BTreeMap;

use async_trait::async_trait;
use domain::auth::{Role, Scope};
use domain::estop::{AuditRecord, EStopList, Target};
use domain::schedule::{LastRun, ScheduleRecord};
use domain::{
    JobKey, JobState, NodeId, Run, RunId, RunState, RunSummary, StopCause, Timestamp, WorkflowSpec,
};

pub mod codec;
pub mod rules;
pub mod sql;
pub mod writer;

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("run {0} not found")]
    NotFound(RunId),
    /// The run is driven by another node now; drop it.
    #[error("run {run} is not leased to this node")]
    LeaseLost { run: RunId },
    /// A passing fault (busy database, lost connection): try again.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data that cannot be read: a bug or a damaged database.
    #[error("store holds data it cannot read: {0}")]
    Corrupt(String),
    /// Someone else changed the record since it was read (optimistic concurrency): read it
    /// again and retry.
    #[error("conflicting change: {0}")]
    Conflict(String),
    #[error("store is closed")]
    Closed,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A run to store, as Submit or Clone makes it.
#[derive(Clone, Debug)]
pub struct NewRun {
    pub id: RunId,
    pub spec: WorkflowSpec,
    pub created_at: Timestamp,
    pub expires_at: Timestamp,
    pub cloned_from: Option<RunId>,
    /// The token that submitted it.
    pub submitted_by: String,
    /// The schedule fire that created it.
    pub schedule: Option<domain::ScheduledBy>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Submitted {
    pub id: RunId,
    /// False when the idempotency key named a run stored before: nothing new was stored.
    pub created: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ExecOutcome {
    /// Moved from `submitted` to `queued`, leased to the caller.
    Queued,
    /// Exec came after the submit TTL: the run is now `expired`.
    Expired,
    /// The run was executing or finished already; nothing changed.
    AlreadyStarted(RunState),
}

#[derive(Clone, Debug, PartialEq)]
pub enum CancelOutcome {
    /// The run had not started: it is `cancelled` now.
    Cancelled,
    /// The run is executing: its node will stop it (`lease_owner`, if any, drives it).
    Requested { lease_owner: Option<NodeId> },
    /// Already finished; nothing changed.
    AlreadyFinished(RunState),
}

#[derive(Clone, Debug, Default)]
pub struct RunFilter {
    pub states: Vec<RunState>,
    pub name: Option<String>,
    /// Every pair must be among the run's labels.
    pub labels: BTreeMap<String, String>,
    /// Runs created by this schedule's fires.
    pub schedule: Option<String>,
    /// 1..=1000; 0 means 100.
    pub page_size: u32,
    /// From a previous page's `next_page_token`.
    pub page_token: Option<String>,
}

/// Whether `states` asks for unfinished runs only: few at any size (retention keeps finished
/// ones), so the state index is the one to read first.
pub fn unfinished_only(states: &[RunState]) -> bool {
    !states.is_empty() && states.iter().all(|s| !s.is_terminal())
}

pub const MAX_PAGE_SIZE: u32 = 1000;
pub const DEFAULT_PAGE_SIZE: u32 = 100;

impl RunFilter {
    pub fn effective_page_size(&self) -> u32 {
        match self.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(MAX_PAGE_SIZE),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct RunPage {
    /// Newest first.
    pub runs: Vec<RunSummary>,
    pub next_page_token: Option<String>,
}

impl RunPage {
    /// A page of `size` from up to `size + 1` runs read newest first: the one past the page
    /// says there is a next page, which starts after the page's last run.
    pub fn from_overfetched(mut runs: Vec<RunSummary>, size: u32) -> RunPage {
        let size = size as usize;
        let next_page_token = if runs.len() > size {
            runs.truncate(size);
            runs.last().map(|r| r.id.to_string())
        } else {
            None
        };
        RunPage {
            runs,
            next_page_token,
        }
    }
}

/// What the unfinished jobs and blocks of a run become when it ends in `state`.
pub fn leftover_state(state: RunState) -> JobState {
    match state {
        RunState::Stopped => JobState::Stopped,
        RunState::Cancelled => JobState::Cancelled,
        _ => JobState::Skipped,
    }
}

/// A change the engine makes to a run it holds the lease of.
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    /// `queued`/`paused` → `running` (sets `started_at` the first time).
    RunRunning {
        at: Timestamp,
    },
    RunPaused {
        at: Timestamp,
    },
    BlockStarted {
        block: u32,
        at: Timestamp,
    },
    /// A job attempt starts: state `running`, `attempts` = `attempt`.
    JobStarted {
        key: JobKey,
        attempt: u32,
        at: Timestamp,
    },
    JobFinished {
        key: JobKey,
        state: JobState,
        at: Timestamp,
        error: Option<String>,
        exit_code: Option<i32>,
        output: String,
    },
    /// An in-flight job was interrupted (shutdown) and must run again: back to `pending`.
    JobInterrupted {
        key: JobKey,
        error: String,
    },
    /// Ends a block; its `pending` jobs become `skipped`.
    BlockFinished {
        block: u32,
        state: JobState,
        at: Timestamp,
    },
    /// Ends the run: terminal state, lease released; unfinished blocks and jobs become `skipped`.
    RunFinished {
        state: RunState,
        at: Timestamp,
        error: Option<String>,
        stop_cause: Option<StopCause>,
    },
    /// Records why the run was interrupted without ending it (e.g. a shutdown).
    RunInterrupted {
        cause: StopCause,
    },
}

/// What the engine learns when it renews its leases.
#[derive(Clone, Debug, Default)]
pub struct LeaseRenewal {
    /// Runs of this node that a client asked to cancel.
    pub cancel_requested: Vec<(RunId, StopCause)>,
    /// Runs this node believed it held that are no longer leased to it.
    pub lost: Vec<RunId>,
}

#[async_trait]
pub trait RunStore: Send + Sync + 'static {
    // ---- used by the API through the engine ----

    /// Stores a run in `submitted`, or returns the run already stored under its idempotency key.
    async fn submit(&self, run: NewRun) -> Result<Submitted>;

    /// Stores a run `queued` and leased (Submit and Exec in one durable write), or returns
    /// the run already stored under its idempotency key, as it is: nothing new is stored.
    async fn submit_started(&self, run: StartedRun) -> Result<Submitted>;

    async fn get(&self, id: RunId) -> Result<Run>;

    async fn list(&self, filter: &RunFilter) -> Result<RunPage>;

    /// How many runs are in each state (states with none left out), from the index on state.
    async fn count_by_state(&self) -> Result<Vec<(RunState, u64)>>;

    /// `submitted` → `queued` leased to `node` until `lease_until`, unless it expired at `now`.
    async fn exec(
        &self,
        id: RunId,
        node: &NodeId,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<ExecOutcome>;

    /// Cancels a run that has not started, or records the request for the node driving it.
    async fn cancel(&self, id: RunId, cause: StopCause, now: Timestamp) -> Result<CancelOutcome>;

    /// Marks every `submitted` run whose TTL passed before `now` as `expired`.
    async fn expire_submitted(&self, now: Timestamp) -> Result<Vec<RunId>>;

    // ---- used by the engine ----

    /// Executing runs leased to `node` (say, before a restart), with their leases extended.
    async fn recover(
        &self,
        node: &NodeId,
        lease_until: Timestamp,
        limit: u32,
    ) -> Result<Vec<RunId>>;

    /// Executing runs with no lease or an expired one, now leased to `node`.
    async fn claim_orphans(
        &self,
        node: &NodeId,
        now: Timestamp,
        lease_until: Timestamp,
        limit: u32,
    ) -> Result<Vec<RunId>>;

    /// Extends every lease `node` holds; reports cancel requests and leases it lost.
    async fn renew_leases(
        &self,
        node: &NodeId,
        held: &[RunId],
        lease_until: Timestamp,
    ) -> Result<LeaseRenewal>;

    /// Gives up the lease on a run that stays unfinished (drain), so any node may resume it.
    async fn release(&self, node: &NodeId, id: RunId) -> Result<()>;

    /// Applies transitions to a run leased to `node`, durably.
    async fn apply(&self, node: &NodeId, id: RunId, transitions: Vec<Transition>) -> Result<()>;

    /// Queues transitions without waiting for them to be durable (see the crate docs).
    fn apply_nowait(&self, node: &NodeId, id: RunId, transitions: Vec<Transition>);

    /// Finished runs that ended before `before`, of the workflows `which` names, oldest first,
    /// at most `limit`: deleted with their blocks and jobs (or, with `dry_run`, counted, all of
    /// them). How many.
    async fn prune_runs(
        &self,
        before: Timestamp,
        which: &Workflows,
        limit: u32,
        dry_run: bool,
    ) -> Result<u64>;

    /// Lets go of resources (the SQLite writer thread) after pending writes are committed.
    async fn close(&self) -> Result<()>;
}

/// Which workflows a prune covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Workflows {
    /// Only this one.
    Only(String),
    /// Every workflow but these (those with a retention of their own).
    AllBut(Vec<String>),
}

/// Pruning the audit trails: the e-stop audit and the access log.
#[async_trait]
pub trait AuditPrune: Send + Sync + 'static {
    /// Deletes up to `limit` records, oldest first, of each trail that are older than
    /// `before`; how many.
    async fn prune_audit(&self, before: Timestamp, limit: u32) -> Result<u64>;
}

/// A run stored already started: created `queued` and leased to `node`, in the same write
/// that stores it (a Submit with `start`, a schedule's fire).
#[derive(Clone, Debug)]
pub struct StartedRun {
    pub run: NewRun,
    pub node: NodeId,
    pub lease_until: Timestamp,
}

impl NewRun {
    /// The run as Submit stores it: `submitted`, every block and job pending, no lease.
    pub fn as_stored(&self) -> Run {
        let mut run = Run::created(self.id, self.spec.clone(), self.created_at, self.expires_at);
        run.cloned_from = self.cloned_from;
        run.submitted_by = self.submitted_by.clone();
        run.schedule = self.schedule.clone();
        run
    }
}

impl StartedRun {
    /// The run as this write stores it.
    pub fn as_stored(&self) -> Run {
        let mut run = self.run.as_stored();
        run.state = RunState::Queued;
        run.lease_owner = Some(self.node.clone());
        run.lease_expires_at = Some(self.lease_until);
        run
    }
}

/// Schedules, shared by every node of a database. A record's `version` changes on every write:
/// a write names the version it read, and fails with [`Error::Conflict`] if another node (or
/// call) wrote in between, so that each fire is decided once.
#[async_trait]
pub trait ScheduleStore: Send + Sync + 'static {
    /// Stores `record`: a new schedule when `expected_version` is `None` ([`Error::Conflict`]
    /// if the name is taken), else over the one stored at `expected_version`
    /// ([`Error::Conflict`] if it changed or is gone). With `fire`, in the same transaction,
    /// stores the fire's run, unless a run already holds its idempotency key (then that run is
    /// answered, `created: false`). Returns the new version and the fire's run.
    async fn schedule_write(
        &self,
        record: ScheduleRecord,
        expected_version: Option<i64>,
        fire: Option<StartedRun>,
    ) -> Result<(i64, Option<Submitted>)>;

    async fn schedule_get(&self, name: &str) -> Result<Option<ScheduleRecord>>;

    /// Every schedule, by name.
    async fn schedule_list(&self) -> Result<Vec<ScheduleRecord>>;

    /// Deletes the schedule (its runs stay); `false` when there is none.
    async fn schedule_delete(&self, name: &str) -> Result<bool>;

    /// Up to `limit` schedules whose `next_check` is at or before `now`, soonest first, each
    /// with its newest run as it is now.
    async fn schedule_due(
        &self,
        now: Timestamp,
        limit: u32,
    ) -> Result<Vec<(ScheduleRecord, Option<LastRun>)>>;

    /// The soonest `next_check` of all schedules.
    async fn schedule_next_check(&self) -> Result<Option<Timestamp>>;
}

/// The e-stop list held in the database (crate `estop`'s `DbSource`) and the e-stop audit
/// trail (every source writes it). The list is one document with a version that every save
/// increments.
#[async_trait]
pub trait EStopStore: Send + Sync + 'static {
    /// The stored list and its version; an empty list and version 0 when it was never saved.
    /// A stored list that does not parse is [`Error::Corrupt`].
    async fn estop_load(&self) -> Result<(EStopList, i64)>;

    /// Replaces the whole list and appends `audit`, in one transaction, if the stored version
    /// is still `expected_version`; otherwise nothing is stored and the result is
    /// [`Error::Conflict`]. Returns the new version.
    async fn estop_save(
        &self,
        list: EStopList,
        expected_version: i64,
        audit: Vec<AuditRecord>,
    ) -> Result<i64>;

    /// The stored version alone (cheap: for change polling).
    async fn estop_version(&self) -> Result<i64>;

    /// A signal from the database itself that the list may have changed (PostgreSQL's
    /// `LISTEN/NOTIFY`): the value changes on every save, by any node. `None` where the backend
    /// has no such signal and the version is polled. Signals can be lost (a reconnect); readers
    /// poll the version as well.
    fn estop_notifications(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }

    /// Appends records to the audit trail (changes that did not go through `estop_save`, such as
    /// writes to and hand edits of the e-stop file).
    async fn audit_append(&self, records: Vec<AuditRecord>) -> Result<()>;

    /// The newest `limit` records (0 means [`DEFAULT_PAGE_SIZE`], at most [`MAX_PAGE_SIZE`]),
    /// newest first; only those of `target` when given.
    async fn audit_list(&self, target: Option<Target>, limit: u32) -> Result<Vec<AuditRecord>>;
}

/// The number of audit records [`EStopStore::audit_list`] returns for `limit`.
pub fn effective_audit_limit(limit: u32) -> u32 {
    match limit {
        0 => DEFAULT_PAGE_SIZE,
        n => n.min(MAX_PAGE_SIZE),
    }
}

/// What a `token_bucket` job got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BucketTake {
    pub granted: bool,
    /// The grant was recorded before (the same job, re-run after a crash): no new token taken.
    pub already: bool,
    pub tokens_left: u64,
    /// When the next token is due (when not granted).
    pub next_token_at: Timestamp,
}

impl BucketTake {
    /// The answer to a job that was granted a token before (re-run after a crash): granted
    /// again, no token taken.
    pub fn regranted(
        spec: &ratelimit::BucketSpec,
        state: Option<ratelimit::BucketState>,
        now: Timestamp,
    ) -> BucketTake {
        BucketTake {
            granted: true,
            already: true,
            tokens_left: spec.refilled(state, now).tokens,
            next_token_at: now,
        }
    }

    /// The answer to a first take.
    pub fn first(take: &ratelimit::Take) -> BucketTake {
        BucketTake {
            granted: take.granted,
            already: false,
            tokens_left: take.state.tokens,
            next_token_at: take.next_token_at,
        }
    }
}

/// Named token buckets shared by every run and node, persisted: a restart neither refills
/// nor forgets them.
#[async_trait]
pub trait BucketStore: Send + Sync + 'static {
    /// Takes one token from `bucket` for the job whose idempotency key is `grant_key`, once:
    /// asking again with the same key answers the recorded grant without taking another token.
    async fn bucket_take(
        &self,
        bucket: &str,
        spec: &ratelimit::BucketSpec,
        grant_key: &str,
        now: Timestamp,
    ) -> Result<BucketTake>;
}

/// An API token as stored: never its secret, only the secret's SHA-256 (hex).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    /// The public name: the actor recorded for everything the token does.
    pub name: String,
    pub hash: String,
    pub role: Role,
    pub scope: Scope,
    pub created_by: String,
    pub created_at: Timestamp,
    pub expires_at: Option<Timestamp>,
    pub last_used_at: Option<Timestamp>,
}

/// One line of the access log: a mutating call or a refusal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessRecord {
    pub at: Timestamp,
    /// The token's name; `-` when the call carried no valid token.
    pub actor: String,
    /// The call, as the role table names it (`Submit`, `EStopSet stop`...).
    pub call: String,
    /// What it acted on: a run ID, an e-stop target, a token name; empty when nothing.
    pub target: String,
    pub allowed: bool,
    /// The client's address.
    pub peer: String,
    /// Why it was refused, or what it did.
    pub detail: String,
}

/// API tokens and the access log, shared by every node of a database.
#[async_trait]
pub trait AuthStore: Send + Sync + 'static {
    /// Stores a new token. A name in use is [`Error::Conflict`].
    async fn token_create(&self, token: TokenRecord) -> Result<()>;

    /// The token whose secret hashes to `hash`, if there is one.
    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>>;

    /// The token named `name`, if there is one (a client certificate names its token).
    async fn token_by_name(&self, name: &str) -> Result<Option<TokenRecord>>;

    /// Every token, by name.
    async fn token_list(&self) -> Result<Vec<TokenRecord>>;

    /// Deletes the token named `name`; `false` when there is none.
    async fn token_revoke(&self, name: &str) -> Result<bool>;

    /// Records that the token was used at `at` (queued like [`RunStore::apply_nowait`]).
    fn token_used(&self, name: &str, at: Timestamp);

    /// Appends to the access log (queued like [`RunStore::apply_nowait`]).
    fn access_append(&self, records: Vec<AccessRecord>);

    /// The newest `limit` records (0 means [`DEFAULT_PAGE_SIZE`], at most
    /// [`MAX_PAGE_SIZE`]), newest first, appends queued through this handle before the call
    /// included.
    async fn access_list(&self, limit: u32) -> Result<Vec<AccessRecord>>;
}
