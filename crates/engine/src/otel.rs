//! A run's spans in OpenTelemetry terms. Each time a node drives a run (its first start, every
//! resume) is a `run` span, and each job attempt a `job` span under it; all of them belong to
//! the run's trace, whose ID is the run's ID (`domain::trace`), under the run's root span. So a
//! run that a crash moved to another node is still one trace, and nothing about the trace is
//! stored. Without an exporter (no `otlp_endpoint`) these calls cost next to nothing.

use domain::RunId;
use opentelemetry::trace::{
    SpanContext, SpanId, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Puts `span` (a run's `run` span) under the run's root, in the run's trace.
pub(crate) fn adopt_run_span(span: &tracing::Span, run: RunId, node: &domain::NodeId) {
    let root = SpanContext::new(
        TraceId::from_bytes(domain::trace::trace_id(run)),
        SpanId::from_bytes(domain::trace::root_span_id(run)),
        TraceFlags::SAMPLED,
        true,
        TraceState::NONE,
    );
    // Refused only without an exporter: then there is nothing to adopt into.
    if span
        .set_parent(opentelemetry::Context::new().with_remote_span_context(root))
        .is_ok()
    {
        span.set_attribute("steward.node", node.to_string());
        span.set_attribute("steward.run_id", run.to_string());
    }
}

/// The `traceparent` a job attempt hands on (`TRACEPARENT`, the `traceparent` header): its own
/// span when spans are exported, else the run's root.
pub(crate) fn traceparent(span: &tracing::Span, run: RunId) -> String {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        domain::trace::traceparent(
            sc.trace_id().to_bytes(),
            sc.span_id().to_bytes(),
            sc.is_sampled(),
        )
    } else {
        domain::trace::run_traceparent(run)
    }
}

/// Marks a job attempt's span failed.
pub(crate) fn failed(span: &tracing::Span, error: &str) {
    span.set_status(Status::error(error.to_owned()));
}
