//! The e-stop sources (docs/operating.md, The emergency stop) and the service that turns one of them into a watchable,
//! fail-closed [`Snapshot`](domain::estop::Snapshot).
//!
//! - [`Source`] is the contract a store of the e-stop list meets: load it, change it durably
//!   (each change appends an audit record with the old and new state), and say when it may have
//!   changed. [`FileSource`] (the default: `estop.json` in the data directory, watched with
//!   inotify), [`DbSource`] (the database, polled by version and woken by PostgreSQL's
//!   `LISTEN/NOTIFY`) and [`EtcdSource`] (a key per target, followed by a watch) implement it.
//! - [`EStop::start`] loads the list once, then re-reads it whenever the source says it may have
//!   changed and on a periodic tick (the fallback when events are lost), and publishes each new
//!   snapshot to subscribers of the [`EStopHandle`].
//!
//! **Fail closed.** A source that cannot be read or parsed yields
//! [`Snapshot::Unreadable`](domain::estop::Snapshot::Unreadable): every verdict is `stop`. The
//! service logs an error on every failed read and raises the alert ([`EStopHandle::alert`] for
//! health detail, [`EStopHandle::read_failures`] for a metric) until the source reads cleanly
//! again. Starting with an unreadable source is not an error: the service starts, everything is
//! stopped, and the alert says why.
//!
//! **The first start.** [`ensure_initial_file`] creates the file with one entry, `* go`, only on
//! a fresh install (the caller knows: say, the database did not exist before). On any later
//! start a missing file is left missing, so it reads as unreadable and stops everything: a file
//! that disappeared (a wrong path, a lost mount, a deletion) must not silently turn into "go".
//!
//! **Changing an unreadable file.** [`Source::set`] and [`Source::clear`] on a file that is
//! missing or malformed are refused with an error naming the file and the problem: they never
//! guess at the entries a damaged file held. An operator fixes or replaces the file by hand (the
//! change is picked up at once); after that, changes through the API work again.
//!
//! **Hand edits** of the file are audited when they are seen: the entries that differ from the
//! last list read are recorded with source `file`, `set_by` taken from the entry when the edit
//! changed it and `hand edit` otherwise. Edits made while steward is not running are not audited
//! (there is nothing to compare them with).

use std::path::PathBuf;

use async_trait::async_trait;
use domain::estop::{AuditRecord, EStopList, Entry, Target};

mod db;
mod etcd;
mod file;
mod service;
#[cfg(feature = "testing")]
pub mod testing;

pub use db::{DEFAULT_POLL as DEFAULT_DB_POLL, DbSource};
pub use etcd::{EtcdConfig, EtcdSource};
pub use file::{
    FileSource, INITIAL_REASON, MAX_ESTOP_FILE_BYTES, READ_TIMEOUT, ensure_initial_file,
    read_capped, read_capped_async, watch_file, write_durably, write_durably_private,
};
pub use service::{API_SOURCE, EStop, EStopHandle, EStopOptions};

/// Why an e-stop source could not be read or changed. Every variant names the file or store.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "e-stop file {} is missing; restore it or create it (for example `{{\"entries\": []}}`)",
        path.display()
    )]
    Missing { path: PathBuf },
    #[error("e-stop file {} cannot be read: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("e-stop file {} is malformed: {error}; fix or replace it by hand", path.display())]
    Malformed { path: PathBuf, error: String },
    #[error("e-stop file {} cannot be written: {error}", path.display())]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    /// etcd could not be reached, or refused.
    #[error("{what}: {error}")]
    Etcd { what: String, error: String },
    /// A read that did not answer in time.
    #[error("{what} did not answer within {after:?}")]
    Timeout {
        what: String,
        after: std::time::Duration,
    },
    /// The store holding the list or the audit trail failed.
    #[error("{what}: {error}")]
    Store { what: String, error: store::Error },
    /// The change was made and is in effect, but its audit record could not be stored.
    #[error(
        "the e-stop change to {} is in effect, but its audit record could not be stored: {error}",
        record.target
    )]
    AuditNotRecorded {
        record: Box<AuditRecord>,
        error: store::Error,
    },
    /// The request itself is wrong (a missing reason, an invalid list): fix it and ask again.
    #[error("{0}")]
    InvalidArgument(String),
}

/// A store of the e-stop list. Changes are durable when the future resolves `Ok`, and each one
/// appends an audit record (who, when, old state, new state, reason, `source`).
#[async_trait]
pub trait Source: Send + Sync + 'static {
    /// What and where the source is, for messages: "e-stop file /var/lib/steward/estop.json".
    fn describe(&self) -> String;

    /// Reads the whole list. An error means "unreadable": the service fails closed.
    async fn load(&self) -> Result<EStopList, SourceError>;

    /// Sets (or replaces) the entry for `entry.target`, durably, and audits it with `source`
    /// (`api`, `error_budget`, ...).
    async fn set(&self, entry: Entry, source: &str) -> Result<AuditRecord, SourceError>;

    /// Sets `entry` only if its target has no entry (the first start's `* = go`): `Ok(None)`
    /// when it has one, which is left as it is.
    async fn create(&self, entry: Entry, source: &str) -> Result<Option<AuditRecord>, SourceError> {
        if self.load().await?.get(&entry.target).is_some() {
            return Ok(None);
        }
        self.set(entry, source).await.map(Some)
    }

    /// Removes the entry for `target`, durably; `Ok(None)` when there was none (nothing is
    /// written or audited).
    async fn clear(
        &self,
        target: &Target,
        actor: &str,
        reason: &str,
        source: &str,
    ) -> Result<Option<AuditRecord>, SourceError>;

    /// Resolves when the list may have changed (a file event, a changed version, a watch or
    /// notification). Spurious wake-ups are fine; a source with no events may never resolve
    /// (the service re-reads on a tick anyway). Must be cancel-safe.
    async fn changed(&self);

    /// How long to let a burst of changes end after [`Source::changed`] before reading: a file
    /// written in place is truncated, then written. A source whose changes are whole (a
    /// transaction) reads at once.
    /// The audit records of changes this source noticed on its own since the last call (hand
    /// edits of a file), for whoever reports changes. Empty for sources whose every change
    /// goes through [`Source::set`] and [`Source::clear`].
    fn take_noticed(&self) -> Vec<AuditRecord> {
        Vec::new()
    }

    fn settle(&self) -> std::time::Duration {
        std::time::Duration::from_millis(30)
    }

    /// The audit trail, newest first (see `store::EStopStore::audit_list`).
    async fn audit(
        &self,
        target: Option<Target>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, SourceError>;
}

/// When `entry` was set: its own `set_at`, else now.
pub(crate) fn set_at(entry: &Entry, clock: &dyn domain::Clock) -> String {
    if entry.set_at.is_empty() {
        clock.now().to_rfc3339()
    } else {
        entry.set_at.clone()
    }
}

/// The audit record of setting `entry` where `old` was (none: no entry).
pub(crate) fn set_record(
    entry: &Entry,
    old: Option<&Entry>,
    at: &str,
    source: &str,
) -> AuditRecord {
    AuditRecord {
        at: at.to_owned(),
        target: entry.target.clone(),
        old_state: old.map(|o| o.state),
        new_state: Some(entry.state),
        set_by: entry.set_by.clone(),
        reason: entry.reason.clone(),
        source: source.to_owned(),
    }
}

/// The audit record of clearing `old`.
pub(crate) fn clear_record(
    old: &Entry,
    actor: &str,
    reason: &str,
    at: &str,
    source: &str,
) -> AuditRecord {
    AuditRecord {
        at: at.to_owned(),
        target: old.target.clone(),
        old_state: Some(old.state),
        new_state: None,
        set_by: actor.to_owned(),
        reason: reason.to_owned(),
        source: source.to_owned(),
    }
}

/// The audit trail, which every source keeps in the database.
pub(crate) async fn audit_trail(
    store: &dyn store::EStopStore,
    target: Option<Target>,
    limit: u32,
) -> Result<Vec<AuditRecord>, SourceError> {
    store
        .audit_list(target, limit)
        .await
        .map_err(|error| SourceError::Store {
            what: "the e-stop audit trail".into(),
            error,
        })
}

/// The audit records that take `old` to `new`, one per target whose entry differs, for a change
/// made outside steward (a hand edit of the file).
pub(crate) fn diff_audit(
    old: &EStopList,
    new: &EStopList,
    at: &str,
    source: &str,
    removed_reason: &str,
) -> Vec<AuditRecord> {
    let mut out = Vec::new();
    for e in &new.entries {
        let before = old.get(&e.target);
        if before == Some(e) {
            continue;
        }
        // The entry's set_by names who made this edit only if the edit changed it.
        let edited_by = !e.set_by.is_empty()
            && before.is_none_or(|b| b.set_by != e.set_by || b.set_at != e.set_at);
        out.push(AuditRecord {
            at: at.to_owned(),
            target: e.target.clone(),
            old_state: before.map(|b| b.state),
            new_state: Some(e.state),
            set_by: if edited_by {
                e.set_by.clone()
            } else {
                "hand edit".into()
            },
            reason: e.reason.clone(),
            source: source.to_owned(),
        });
    }
    for b in &old.entries {
        if new.get(&b.target).is_none() {
            out.push(AuditRecord {
                at: at.to_owned(),
                target: b.target.clone(),
                old_state: Some(b.state),
                new_state: None,
                set_by: "hand edit".into(),
                reason: removed_reason.to_owned(),
                source: source.to_owned(),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use domain::estop::EStopState;

    fn entry(t: &str, s: EStopState, by: &str, at: &str) -> Entry {
        Entry {
            target: t.parse().unwrap(),
            state: s,
            reason: "r".into(),
            set_by: by.into(),
            set_at: at.into(),
        }
    }

    #[test]
    fn diff_records_added_changed_and_removed_targets() {
        use EStopState::{Go, Pause, Stop};
        let old = EStopList {
            entries: vec![
                entry("*", Go, "steward", ""),
                entry("a", Stop, "ana", "2026-01-01T00:00:00Z"),
                entry("b", Pause, "", ""),
            ],
        };
        let new = EStopList {
            entries: vec![
                entry("*", Go, "steward", ""),
                // state changed, set_by left as it was: not ana's doing
                entry("a", Go, "ana", "2026-01-01T00:00:00Z"),
                entry("c", Stop, "bob", ""),
            ],
        };
        let recs = diff_audit(&old, &new, "T", "file", "gone");
        let got: Vec<_> = recs
            .iter()
            .map(|r| {
                (
                    r.target.to_string(),
                    r.old_state,
                    r.new_state,
                    r.set_by.as_str(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("a".into(), Some(Stop), Some(Go), "hand edit"),
                ("c".into(), None, Some(Stop), "bob"),
                ("b".into(), Some(Pause), None, "hand edit"),
            ]
        );
        assert_eq!(recs[2].reason, "gone");
        assert!(diff_audit(&old, &old, "T", "file", "").is_empty());
    }
}
