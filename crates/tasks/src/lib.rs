//! Supervised background tasks.
//!
//! Every long-lived component of a node (the e-stop service, the policy watcher, the engine's
//! lease, claim and expiry loops, the notifier...) runs as a named task spawned through
//! [`Tasks::spawn_component`]: tracked (shutdown waits for it), cancelled through the shared
//! token, and supervised: a component that ends before it was told to stop, or panics, is
//! reported as [`StopCause::Fatal`] naming it, and the node stops in order. Nothing that must
//! run for the life of the node can disappear silently.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use domain::StopCause;
use futures::FutureExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A node's task center: cheap to clone.
#[derive(Clone)]
pub struct Tasks {
    tracker: TaskTracker,
    token: CancellationToken,
    fatal: mpsc::UnboundedSender<StopCause>,
}

/// Where fatal stop causes arrive: the first one is why the node stops.
pub struct Failures(mpsc::UnboundedReceiver<StopCause>);

impl Failures {
    /// The next component failure. Never resolves while every component runs.
    pub async fn next(&mut self) -> StopCause {
        match self.0.recv().await {
            Some(c) => c,
            None => std::future::pending().await,
        }
    }
}

impl Tasks {
    pub fn new() -> (Tasks, Failures) {
        Tasks::with(TaskTracker::new(), CancellationToken::new())
    }

    /// Tasks on an existing tracker, stopped by an existing token.
    pub fn with(tracker: TaskTracker, token: CancellationToken) -> (Tasks, Failures) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Tasks {
                tracker,
                token,
                fatal: tx,
            },
            Failures(rx),
        )
    }

    /// Fired when the components must stop.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }

    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Runs `fut`, a component that lives until [`Tasks::token`] is cancelled. If it ends
    /// before that, or panics, the failure is reported as `StopCause::Fatal { component }`.
    pub fn spawn_component<F>(&self, component: &'static str, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let token = self.token.clone();
        let fatal = self.fatal.clone();
        self.tracker.spawn(async move {
            let outcome = AssertUnwindSafe(fut).catch_unwind().await;
            if token.is_cancelled() {
                return;
            }
            let message = match outcome {
                Ok(()) => "it ended unexpectedly".to_owned(),
                Err(panic) => format!("it panicked: {}", panic_message(&*panic)),
            };
            tracing::error!(component, %message, "a background component failed: the node stops");
            let _ = fatal.send(StopCause::Fatal {
                component: component.to_owned(),
                message,
            });
        });
    }

    /// Reports a reason the node must stop that a component found (the store lost, say),
    /// alongside the component failures.
    pub fn report(&self, cause: StopCause) {
        let _ = self.fatal.send(cause);
    }

    /// Stops every component and waits until all tasks have ended.
    pub async fn shutdown(&self) {
        self.token.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_component_that_ends_or_panics_is_fatal_and_a_cancelled_one_is_not() {
        let (tasks, mut failures) = Tasks::new();
        tasks.spawn_component("quitter", async {});
        assert_eq!(
            failures.next().await,
            StopCause::Fatal {
                component: "quitter".into(),
                message: "it ended unexpectedly".into()
            }
        );
        tasks.spawn_component("crasher", async { panic!("boom") });
        match failures.next().await {
            StopCause::Fatal { component, message } => {
                assert_eq!(component, "crasher");
                assert!(message.contains("boom"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let token = tasks.token().clone();
        tasks.spawn_component("steady", async move { token.cancelled().await });
        tasks.shutdown().await;
        // Every task has ended: a failure would be queued by now.
        assert!(
            failures.0.try_recv().is_err(),
            "a component told to stop is no failure"
        );
    }
}
