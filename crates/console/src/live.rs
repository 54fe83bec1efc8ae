//! Live pages: `GET /ui/events` tells an open page that something it may show changed (a run,
//! the e-stop list), at most every [`COALESCE`]; the page's script then fetches the page again
//! and swaps in its live part. The events carry nothing but a counter: what a page shows is
//! always rendered by the page itself, with the caller's rights. A feed whose session's token
//! is revoked (or expires) ends: before each event, and every [`RECHECK`] when quiet.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;

use crate::Inner;
use crate::session::Session;

/// Changes closer together than this make one event.
pub(crate) const COALESCE: Duration = Duration::from_millis(250);

/// How often, at most, a quiet feed checks that its session is still signed in.
pub(crate) const RECHECK: Duration = Duration::from_secs(5);

struct Feed {
    runs: tokio::sync::broadcast::Receiver<engine::RunEvent>,
    estop: Option<tokio::sync::watch::Receiver<Arc<domain::estop::Snapshot>>>,
    shutdown: tokio_util::sync::CancellationToken,
    sent: u64,
    inner: Arc<Inner>,
    /// Checked again before every event and every [`RECHECK`]: the feed of a session whose
    /// token was revoked ends.
    session: Session,
}

impl Feed {
    /// Waits for the next change, checking the session every [`RECHECK`]; `false` when the
    /// feed is over (shutdown, or the session no longer valid).
    async fn next_change(&mut self) -> bool {
        loop {
            tokio::select! {
                more = self.changed() => return more,
                () = tokio::time::sleep(RECHECK) => {
                    if !self.session.still_valid(&self.inner).await {
                        return false;
                    }
                }
            }
        }
    }

    /// Waits for the next change; `false` when the feed is over (shutdown).
    async fn changed(&mut self) -> bool {
        let estop = async {
            match &mut self.estop {
                Some(rx) => {
                    if rx.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = self.runs.recv() => !matches!(r, Err(RecvError::Closed)),
            () = estop => true,
            () = self.shutdown.cancelled() => false,
        }
    }
}

fn stream(feed: Feed) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(feed, |mut feed| async move {
        if !feed.next_change().await {
            return None;
        }
        // Whatever else changes in the next moment is in the same refresh.
        let _ = tokio::time::timeout(COALESCE, async {
            loop {
                if !feed.changed().await {
                    break;
                }
            }
        })
        .await;
        feed.runs = feed.runs.resubscribe();
        if !feed.session.still_valid(&feed.inner).await {
            return None;
        }
        feed.sent += 1;
        let ev = Event::default().event("change").data(feed.sent.to_string());
        Some((Ok(ev), feed))
    })
}

pub(crate) async fn events(State(inner): State<Arc<Inner>>, session: Session) -> Response {
    let feed = Feed {
        runs: inner.service.engine.subscribe(),
        estop: inner.service.estop.as_ref().map(|h| {
            let mut rx = h.subscribe();
            rx.mark_unchanged();
            rx
        }),
        shutdown: inner.service.shutdown.clone(),
        sent: 0,
        inner: inner.clone(),
        session,
    };
    Sse::new(stream(feed))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response()
}
