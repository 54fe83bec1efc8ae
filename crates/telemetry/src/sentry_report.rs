//! Errors to Sentry: `error` lines and panics through `sentry-tracing` and the panic
//! integration, and each failed run as an event of its own. What is sent is what the API shows
//! a viewer: the workflow, its labels, the failing job's error (already scrubbed of secret
//! values when the attempt ended), never a spec, an argument or an environment.

use std::sync::Arc;

/// Sentry tags are cut at this many bytes (Sentry's own limit is 200).
const TAG_MAX: usize = 200;
/// A failed run's error is cut at this many bytes.
const ERROR_MAX: usize = 8 * 1024;

/// `sentry_dsn`: checked when read; shown with its key hidden.
#[derive(Clone)]
pub struct SentryDsn(sentry::types::Dsn);

impl std::fmt::Debug for SentryDsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SentryDsn({self})")
    }
}

impl std::str::FromStr for SentryDsn {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse::<sentry::types::Dsn>().map(SentryDsn).map_err(|e| {
            format!("{e}: expected a Sentry DSN such as https://KEY@sentry.example/42")
        })
    }
}

/// `scheme://***@host[:port]/project`: where events go, without the key that lets anyone send
/// them.
impl std::fmt::Display for SentryDsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = &self.0;
        write!(
            f,
            "{}://***@{}:{}{}{}",
            d.scheme(),
            d.host(),
            d.port(),
            d.path(),
            d.project_id()
        )
    }
}

/// Sends through Steward's own HTTP client (rustls with `ring`), on the SDK's transport thread.
struct Transport(reqwest::Client);

impl sentry::TransportFactory for Transport {
    fn create_transport_with_options(
        &self,
        options: sentry::TransportOptions,
    ) -> Arc<dyn sentry::Transport> {
        Arc::new(
            sentry::transports::ReqwestHttpTransportOptions::from(options)
                .with_client(self.0.clone())
                .build(),
        )
    }
}

pub(crate) fn init(
    dsn: &SentryDsn,
    node: Option<String>,
) -> anyhow::Result<sentry::ClientInitGuard> {
    let client = actions::shared_client()
        .map_err(|e| anyhow::anyhow!("sentry_dsn: {e}"))?
        .clone();
    let mut options = sentry::ClientOptions::default();
    options.dsn = Some(dsn.0.clone());
    options.release = Some(concat!("steward@", env!("CARGO_PKG_VERSION")).into());
    options.server_name = node.map(Into::into);
    options.send_default_pii = false;
    options.transport = Some(Arc::new(Transport(client)));
    Ok(sentry::init(options))
}

/// Reports a failed run: one event, grouped by workflow and failing job, tagged with the
/// workflow, the run ID, the node and each label (`label.KEY`). Does nothing without Sentry.
pub fn report_failed_run(run: &domain::Run, node: &str) {
    if sentry::Hub::current().client().is_none() {
        return;
    }
    let failed_job = run.blocks.iter().enumerate().find_map(|(b, block)| {
        block
            .jobs
            .iter()
            .position(|j| j.state == domain::JobState::Failed)
            .map(|j| (b, j))
    });
    let job = failed_job.map_or_else(String::new, |(b, j)| format!("blocks[{b}].jobs[{j}]"));
    let action = failed_job
        .and_then(|(b, j)| run.spec.blocks.get(b)?.jobs.get(j))
        .map_or("", |j| j.action.as_str());
    let error = run.error.as_deref().unwrap_or("failed");
    let mut event = sentry::protocol::Event {
        level: sentry::Level::Error,
        message: Some(format!(
            "run of {} failed: {}",
            run.spec.name,
            cut(error.lines().next().unwrap_or(""), TAG_MAX)
        )),
        fingerprint: vec![
            "steward-run-failed".into(),
            run.spec.name.clone().into(),
            job.clone().into(),
        ]
        .into(),
        ..Default::default()
    };
    let mut tag = |k: String, v: &str| {
        event.tags.insert(k, cut(v, TAG_MAX).to_owned());
    };
    tag("workflow".into(), &run.spec.name);
    tag("run_id".into(), &run.id.to_string());
    tag("node".into(), node);
    if !job.is_empty() {
        tag("job".into(), &job);
        tag("action".into(), action);
    }
    for (k, v) in &run.spec.labels {
        tag(format!("label.{k}"), v);
    }
    event
        .extra
        .insert("error".into(), cut(error, ERROR_MAX).into());
    event.extra.insert(
        "traceparent".into(),
        domain::trace::run_traceparent(run.id).into(),
    );
    // The run's own trace, so that the event links to the run's spans.
    event.contexts.insert(
        "trace".into(),
        sentry::protocol::TraceContext {
            trace_id: domain::trace::trace_id(run.id).into(),
            span_id: domain::trace::root_span_id(run.id).into(),
            ..Default::default()
        }
        .into(),
    );
    sentry::capture_event(event);
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dsn_is_checked_and_shown_without_its_key() {
        let d: SentryDsn = "https://abc123@sentry.example:9000/42".parse().unwrap();
        assert_eq!(d.to_string(), "https://***@sentry.example:9000/42");
        let d: SentryDsn = "https://abc123@sentry.example/42".parse().unwrap();
        assert_eq!(d.to_string(), "https://***@sentry.example:443/42");
        assert!(!format!("{d:?}").contains("abc123"));
        let err = "not a dsn".parse::<SentryDsn>().unwrap_err();
        assert!(err.contains("expected a Sentry DSN"), "{err}");
    }

    #[test]
    fn cut_keeps_whole_characters() {
        assert_eq!(cut("ééé", 3), "é");
        assert_eq!(cut("abc", 10), "abc");
    }
}
