//! What the engine counts for `/metrics` (docs/operating.md, Metrics), through
//! `prometheus-client`. Label values are bounded: workflow names past
//! [`MAX_WORKFLOW_LABELS`] distinct ones are counted as `other`, and no run ID is ever a label.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Distinct workflow names given a series of their own.
pub const MAX_WORKFLOW_LABELS: usize = 200;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RunLabels {
    workflow: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: String,
}

type Histograms = Family<ActionLabels, Histogram, fn() -> Histogram>;

fn seconds_buckets() -> Histogram {
    // 100 µs to about 25 min.
    Histogram::new(exponential_buckets(0.0001, 2.5, 19))
}

/// The engine's metrics. Cheap to update from any task.
pub struct Metrics {
    registry: Registry,
    runs_finished: Family<RunLabels, Counter>,
    job_attempts: Family<ActionLabels, Counter>,
    job_failures: Family<ActionLabels, Counter>,
    job_duration: Histograms,
    start_latency: Histogram,
    commit_latency: Histogram,
    schedule_fires: Counter,
    schedule_missed: Counter,
    schedule_skipped: Family<ReasonLabels, Counter>,
    schedule_lateness: Histogram,
    workflows: Mutex<HashSet<String>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let runs_finished = Family::<RunLabels, Counter>::default();
        registry.register(
            "steward_runs_finished",
            "Runs this node finished, by workflow and terminal state",
            runs_finished.clone(),
        );
        let job_attempts = Family::<ActionLabels, Counter>::default();
        registry.register(
            "steward_job_attempts",
            "Job attempts started, by action",
            job_attempts.clone(),
        );
        let job_failures = Family::<ActionLabels, Counter>::default();
        registry.register(
            "steward_job_failures",
            "Job attempts that failed or timed out, by action",
            job_failures.clone(),
        );
        let job_duration: Histograms = Family::new_with_constructor(seconds_buckets);
        registry.register(
            "steward_job_duration_seconds",
            "How long job attempts ran, by action",
            job_duration.clone(),
        );
        let start_latency = seconds_buckets();
        registry.register(
            "steward_run_start_latency_seconds",
            "From a run's Submit to its first job's start",
            start_latency.clone(),
        );
        let commit_latency = seconds_buckets();
        registry.register(
            "steward_commit_latency_seconds",
            "Durable writes of a run's progress, from the request to the commit",
            commit_latency.clone(),
        );
        let schedule_fires = Counter::default();
        registry.register(
            "steward_schedule_fires",
            "Schedule fires that started a run (triggers not included)",
            schedule_fires.clone(),
        );
        let schedule_missed = Counter::default();
        registry.register(
            "steward_schedule_missed",
            "Schedule fires past their catch-up window: counted, not run",
            schedule_missed.clone(),
        );
        let schedule_skipped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "steward_schedule_skipped",
            "Schedule fires that ran nothing, by reason (estop, overlap, policy, invalid)",
            schedule_skipped.clone(),
        );
        let schedule_lateness = seconds_buckets();
        registry.register(
            "steward_schedule_fire_lateness_seconds",
            "From a fire's due time (nominal time plus jitter) to its decision",
            schedule_lateness.clone(),
        );
        Metrics {
            registry,
            schedule_fires,
            schedule_missed,
            schedule_skipped,
            schedule_lateness,
            runs_finished,
            job_attempts,
            job_failures,
            job_duration,
            start_latency,
            commit_latency,
            workflows: Mutex::new(HashSet::new()),
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// `name` as a label value: itself, or `other` once the bound is reached.
    fn workflow(&self, name: &str) -> String {
        let Ok(mut seen) = self.workflows.lock() else {
            return "other".to_owned();
        };
        if seen.contains(name) {
            return name.to_owned();
        }
        if seen.len() < MAX_WORKFLOW_LABELS {
            seen.insert(name.to_owned());
            return name.to_owned();
        }
        "other".to_owned()
    }

    pub(crate) fn run_finished(&self, workflow: &str, state: domain::RunState) {
        self.runs_finished
            .get_or_create(&RunLabels {
                workflow: self.workflow(workflow),
                state: state.to_string(),
            })
            .inc();
    }

    pub(crate) fn job_started(&self, action: &str) {
        self.job_attempts
            .get_or_create(&ActionLabels {
                action: action.to_owned(),
            })
            .inc();
    }

    pub(crate) fn job_ended(&self, action: &str, took: Duration, failed: bool) {
        let labels = ActionLabels {
            action: action.to_owned(),
        };
        self.job_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if failed {
            self.job_failures.get_or_create(&labels).inc();
        }
    }

    pub(crate) fn run_started(&self, since_submit: Duration) {
        self.start_latency.observe(since_submit.as_secs_f64());
    }

    pub(crate) fn committed(&self, took: Duration) {
        self.commit_latency.observe(took.as_secs_f64());
    }

    pub(crate) fn schedule_fired(&self, lateness: Option<Duration>) {
        self.schedule_fires.inc();
        if let Some(l) = lateness {
            self.schedule_lateness.observe(l.as_secs_f64());
        }
    }

    pub(crate) fn schedule_missed(&self, n: u64) {
        if n > 0 {
            self.schedule_missed.inc_by(n);
        }
    }

    pub(crate) fn schedule_skipped(&self, reason: &'static str) {
        self.schedule_skipped
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workflow_labels_are_bounded() {
        let m = Metrics::new();
        for i in 0..MAX_WORKFLOW_LABELS + 10 {
            m.run_finished(&format!("w{i}"), domain::RunState::Completed);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, m.registry()).unwrap();
        assert!(text.contains("workflow=\"other\""), "{text}");
        assert!(!text.contains(&format!("w{}", MAX_WORKFLOW_LABELS + 5)));
    }
}
