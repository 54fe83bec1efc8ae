//! A run's spans. Each time a node drives a run (its first start, every resume) is a `run`
//! span, and each job attempt a `job` span under it; all of them belong to the run's trace,
//! whose ID is the run's ID (`domain::trace`), under the run's root span. So a run that a
//! crash moved to another node is still one trace, and nothing about the trace is stored.
//! Without an exporter (no `otlp_endpoint`) a span records nothing.

use domain::RunId;
use domain::trace::TraceParent;

/// The span of this node's driving of `run`, under the run's root.
pub(crate) fn run_span(
    run: RunId,
    node: &std::sync::Arc<str>,
    workflow: Option<&str>,
) -> otlp::Span {
    let mut span = otlp::Span::start(
        "run",
        domain::trace::trace_id(run),
        domain::trace::root_span_id(run),
        // The root is derived from the run ID, never made (or sent) by this process.
        true,
    );
    if span.is_recording() {
        span.set("steward.run_id", otlp::Value::Uuid(run.as_bytes()));
        span.set("steward.node", node.clone());
        if let Some(w) = workflow {
            span.set("workflow", w.to_owned());
        }
    }
    span
}

/// The span of one job attempt, under its run's span (`parent`; the run's root when spans are
/// not recorded).
pub(crate) fn job_span(
    run: RunId,
    parent: Option<[u8; 8]>,
    job: &str,
    action: &'static str,
    attempt: u32,
) -> otlp::Span {
    let Some(parent) = parent else {
        return otlp::Span::default();
    };
    let mut span = otlp::Span::start("job", domain::trace::trace_id(run), parent, false);
    if span.is_recording() {
        span.set("job", job.to_owned());
        span.set("action", action);
        span.set("attempt", attempt);
    }
    span
}

/// The place in the trace a job attempt hands on (`TRACEPARENT`, the `traceparent` header):
/// its own span when spans are recorded, else the run's root.
pub(crate) fn traceparent(span: &otlp::Span, run: RunId) -> TraceParent {
    match span.id() {
        Some(span_id) => TraceParent {
            trace_id: domain::trace::trace_id(run),
            span_id,
            sampled: true,
        },
        None => TraceParent::of_run(run),
    }
}
