//! Webhook notifications (docs/operating.md, Notifications) and error reports: failed and
//! stopped runs this node drove, schedule fires this node counted as missed, and e-stop
//! changes made or noticed on this node (operators, error budgets, hand edits of its file), so
//! that several nodes never report one change twice. Each webhook gets the event as JSON, or
//! as Slack's `{"text": ...}`. Deliveries are retried with backoff; a webhook that stays down
//! never slows the engine: events queue (bounded) and the overflow is dropped with a warning.

use std::time::Duration;

use domain::RunState;
use domain::estop::{AuditRecord, EStopState};
use engine::Engine;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{NotifyConfig, NotifyEvent, NotifyFormat};

/// Events waiting for delivery, across all webhooks.
const QUEUE: usize = 1024;
/// Tries per delivery, and the wait before the second (doubled each time).
const ATTEMPTS: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const TIMEOUT: Duration = Duration::from_secs(10);

/// One event, in both shapes.
#[derive(Clone, Debug)]
struct Note {
    event: NotifyEvent,
    /// A run's trace (W3C `traceparent`), sent as a header.
    traceparent: Option<String>,
    body: serde_json::Value,
    text: String,
}

/// Starts the notifier, as supervised components, until the tasks stop; does nothing without
/// webhooks.
pub fn start(
    tasks: &tasks::Tasks,
    engine: Engine,
    estop: estop::EStopHandle,
    node: String,
    hooks: Vec<NotifyConfig>,
) {
    if hooks.is_empty() {
        return;
    }
    let (tx, rx) = mpsc::channel::<(usize, Note)>(QUEUE);
    let cancel = tasks.token().clone();
    tasks.spawn_component("notifier", deliver(rx, hooks.clone(), cancel.clone()));
    let mut runs = engine.subscribe();
    let mut changes = estop.changes();
    let mut schedules = engine.schedule_events();
    tasks.spawn_component("notifier events", async move {
        loop {
            let note = tokio::select! {
                () = cancel.cancelled() => return,
                s = schedules.recv() => match s {
                    Ok(e) => match schedule_note(&node, &e) {
                        Some(note) => note,
                        None => continue,
                    },
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "notifications missed schedule events");
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                },
                e = runs.recv() => match e {
                    Ok(e) if matches!(e.state, RunState::Failed | RunState::Stopped) => {
                        match engine.status(e.id).await {
                            Ok(run) => run_note(&node, &run),
                            Err(err) => {
                                tracing::warn!(run_id = %e.id, error = %err, "could not read a run to notify of it");
                                continue;
                            }
                        }
                    }
                    Ok(_) => continue,
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "notifications missed run events");
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                },
                c = changes.recv() => match c {
                    Ok(rec) => estop_note(&node, &rec),
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "notifications missed e-stop changes");
                        continue;
                    }
                    Err(RecvError::Closed) => return,
                },
            };
            for (i, hook) in hooks.iter().enumerate() {
                if hook.events.contains(&note.event)
                    && tx.try_send((i, note.clone())).is_err()
                {
                    tracing::warn!(event = note.event.as_str(), "the notification queue is full; dropping one");
                }
            }
        }
    });
}

/// Reports each run this node drove that failed to Sentry (`sentry_dsn`), as a supervised
/// component; does nothing when `on` is false. Like webhooks, it never slows the engine: the
/// SDK queues (bounded) and sends from a thread of its own.
pub fn report_failed_runs(tasks: &tasks::Tasks, engine: Engine, node: String, on: bool) {
    if !on {
        return;
    }
    let mut runs = engine.subscribe();
    let cancel = tasks.token().clone();
    tasks.spawn_component("error reports", async move {
        loop {
            let e = tokio::select! {
                () = cancel.cancelled() => return,
                e = runs.recv() => e,
            };
            match e {
                Ok(e) if e.state == RunState::Failed => match engine.status(e.id).await {
                    Ok(run) => telemetry::report_failed_run(&run, &node),
                    Err(err) => {
                        tracing::warn!(run_id = %e.id, error = %err, "could not read a failed run to report it");
                    }
                },
                Ok(_) => {}
                Err(RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "error reports missed run events");
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
}

fn run_note(node: &str, run: &domain::Run) -> Note {
    let (event, what) = match run.state {
        RunState::Stopped => (NotifyEvent::RunStopped, "stopped"),
        _ => (NotifyEvent::RunFailed, "failed"),
    };
    let why = run
        .stop_cause
        .as_ref()
        .map(ToString::to_string)
        .or_else(|| run.error.clone())
        .unwrap_or_default();
    Note {
        event,
        traceparent: Some(domain::trace::run_traceparent(run.id)),
        body: json!({
            "event": event.as_str(),
            "node": node,
            "run_id": run.id.to_string(),
            "workflow": run.spec.name,
            "labels": run.spec.labels,
            "state": run.state.as_str(),
            "error": run.error,
            "stop_cause": run.stop_cause,
            "ended_at": run.ended_at.map(|t| t.to_rfc3339()),
        }),
        text: format!("steward: run {} of {} {what}: {why}", run.id, run.spec.name),
    }
}

/// Missed fires; other schedule events are not notified.
fn schedule_note(node: &str, e: &engine::ScheduleEvent) -> Option<Note> {
    let domain::schedule::FireOutcome::Missed { count, at_least } = e.outcome else {
        return None;
    };
    Some(Note {
        event: NotifyEvent::ScheduleMissed,
        traceparent: None,
        body: json!({
            "event": "schedule_missed",
            "node": node,
            "schedule": e.schedule,
            "workflow": e.workflow,
            "missed": count,
            "at_least": at_least,
            "newest_nominal_time": e.nominal.to_rfc3339(),
        }),
        text: format!("steward: schedule {} {}", e.schedule, e.outcome),
    })
}

fn estop_note(node: &str, r: &AuditRecord) -> Note {
    let state = |s: Option<EStopState>| s.map_or("none", EStopState::as_str);
    Note {
        event: NotifyEvent::Estop,
        traceparent: None,
        body: json!({
            "event": "estop",
            "node": node,
            "target": r.target.to_string(),
            "old_state": r.old_state.map(EStopState::as_str),
            "new_state": r.new_state.map(EStopState::as_str),
            "set_by": r.set_by,
            "reason": r.reason,
            "source": r.source,
            "at": r.at,
        }),
        text: format!(
            "steward: e-stop {}: {} -> {} by {} ({}): {}",
            r.target,
            state(r.old_state),
            state(r.new_state),
            r.set_by,
            r.source,
            r.reason
        ),
    }
}

/// Sends each queued event to its webhook, in order, retrying with backoff.
async fn deliver(
    mut rx: mpsc::Receiver<(usize, Note)>,
    hooks: Vec<NotifyConfig>,
    cancel: CancellationToken,
) {
    let client = match actions::shared_client() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "notifications are off: no HTTP client");
            return;
        }
    };
    loop {
        let (i, note) = tokio::select! {
            () = cancel.cancelled() => return,
            n = rx.recv() => match n {
                Some(n) => n,
                None => return,
            },
        };
        let Some(hook) = hooks.get(i) else { continue };
        let body = match hook.format {
            NotifyFormat::Json => note.body.clone(),
            NotifyFormat::Slack => json!({ "text": note.text }),
        };
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            let mut req = client.post(hook.url.clone()).json(&body).timeout(TIMEOUT);
            if let Some(tp) = &note.traceparent {
                req = req.header("traceparent", tp);
            }
            let sent = req.send().await;
            let failure = match sent {
                Ok(r) if r.status().is_success() => break,
                Ok(r) => format!("answered {}", r.status()),
                Err(e) => actions::error_chain(&e),
            };
            let host = hook.url.host_str().unwrap_or("?");
            if attempt == ATTEMPTS {
                tracing::error!(event = note.event.as_str(), host, error = %failure, attempts = ATTEMPTS, "a notification could not be delivered");
                break;
            }
            tracing::warn!(event = note.event.as_str(), host, error = %failure, attempt, "a notification failed; retrying");
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff *= 2;
        }
    }
}
