//! The e-stop list in the database (the same store as runs): polled by version, and woken at
//! once by the database's change signal where it has one (PostgreSQL's `LISTEN/NOTIFY`).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use domain::Clock;
use domain::estop::{AuditRecord, EStopList, Entry, Target};
use store::EStopStore;

use crate::{Source, SourceError};

/// How often a [`DbSource`] checks the stored version by default.
pub const DEFAULT_POLL: Duration = Duration::from_millis(250);

/// Saves that lose a race with another writer are retried this many times.
const SAVE_ATTEMPTS: usize = 5;

/// The e-stop list in the database, through [`EStopStore`]. Every change is one transaction
/// (the list and its audit record), fenced by the list's version; `changed()` resolves when
/// the stored version differs from the one last loaded.
pub struct DbSource {
    store: Arc<dyn EStopStore>,
    clock: Arc<dyn Clock>,
    poll: Duration,
    /// The database's change signal, where it has one: a change is seen at once instead of
    /// at the next poll.
    notes: tokio::sync::Mutex<Option<tokio::sync::watch::Receiver<u64>>>,
    /// The version last loaded (-1 before the first load).
    seen: AtomicI64,
}

impl DbSource {
    /// `poll`: how often `changed()` checks the version ([`DEFAULT_POLL`] is a good value).
    pub fn new(store: Arc<dyn EStopStore>, clock: Arc<dyn Clock>, poll: Duration) -> DbSource {
        DbSource {
            notes: tokio::sync::Mutex::new(store.estop_notifications()),
            store,
            clock,
            poll: poll.max(Duration::from_millis(1)),
            seen: AtomicI64::new(-1),
        }
    }

    /// A source that only polls, even where the database signals changes (to compare the two).
    pub fn poll_only(
        store: Arc<dyn EStopStore>,
        clock: Arc<dyn Clock>,
        poll: Duration,
    ) -> DbSource {
        let s = DbSource::new(store, clock, poll);
        DbSource {
            notes: tokio::sync::Mutex::new(None),
            ..s
        }
    }

    fn err(&self, error: store::Error) -> SourceError {
        SourceError::Store {
            what: self.describe(),
            error,
        }
    }

    /// Applies `change` to the stored list and saves it with the audit record it returns,
    /// retrying when another writer got in between. `None` from `change`: nothing to do.
    async fn modify<F>(&self, change: F) -> Result<Option<AuditRecord>, SourceError>
    where
        F: Fn(&mut EStopList) -> Option<AuditRecord> + Send + Sync,
    {
        let mut last_err = None;
        for _ in 0..SAVE_ATTEMPTS {
            let (mut list, version) = self.store.estop_load().await.map_err(|e| self.err(e))?;
            let Some(record) = change(&mut list) else {
                return Ok(None);
            };
            list.check().map_err(SourceError::InvalidArgument)?;
            match self
                .store
                .estop_save(list, version, vec![record.clone()])
                .await
            {
                Ok(_) => return Ok(Some(record)),
                Err(e @ store::Error::Conflict(_)) => {
                    tracing::debug!(error = %e, "the e-stop list changed while saving; retrying");
                    last_err = Some(e);
                }
                Err(e) => return Err(self.err(e)),
            }
        }
        Err(self.err(
            last_err
                .unwrap_or_else(|| store::Error::Conflict("the e-stop list kept changing".into())),
        ))
    }
}

#[async_trait]
impl Source for DbSource {
    fn describe(&self) -> String {
        "the e-stop list in the database".into()
    }

    async fn load(&self) -> Result<EStopList, SourceError> {
        match self.store.estop_load().await {
            Ok((list, version)) => {
                self.seen.store(version, Ordering::Relaxed);
                Ok(list)
            }
            Err(e) => {
                // Any version read after this counts as a change: recover at once.
                self.seen.store(-1, Ordering::Relaxed);
                Err(self.err(e))
            }
        }
    }

    async fn set(&self, entry: Entry, source: &str) -> Result<AuditRecord, SourceError> {
        let at = crate::set_at(&entry, self.clock.as_ref());
        let rec = self
            .modify(|list| {
                let old = list.set(entry.clone());
                Some(crate::set_record(&entry, old.as_ref(), &at, source))
            })
            .await?;
        rec.ok_or_else(|| SourceError::InvalidArgument("nothing was set".into()))
    }

    async fn clear(
        &self,
        target: &Target,
        actor: &str,
        reason: &str,
        source: &str,
    ) -> Result<Option<AuditRecord>, SourceError> {
        let at = self.clock.now().to_rfc3339();
        self.modify(|list| {
            let old = list.clear(target)?;
            Some(crate::clear_record(&old, actor, reason, &at, source))
        })
        .await
    }

    fn settle(&self) -> Duration {
        // A save is one transaction: there is no half-written list to wait out.
        Duration::ZERO
    }

    async fn changed(&self) {
        let mut notes = self.notes.lock().await;
        loop {
            match notes.as_mut() {
                Some(rx) => tokio::select! {
                    r = rx.changed() => match r {
                        Ok(()) => return,
                        // The store is gone: poll from now on.
                        Err(_) => *notes = None,
                    },
                    () = tokio::time::sleep(self.poll) => {}
                },
                None => tokio::time::sleep(self.poll).await,
            }
            match self.store.estop_version().await {
                Ok(v) if v == self.seen.load(Ordering::Relaxed) => {}
                // A new version, or a store that fails: the next load says which.
                _ => return,
            }
        }
    }

    async fn audit(
        &self,
        target: Option<Target>,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, SourceError> {
        crate::audit_trail(self.store.as_ref(), target, limit).await
    }
}
