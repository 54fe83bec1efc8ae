//! What a node tells the outside about itself, set up once at start ([`init`]):
//! - **logs** on stderr, as text for a person or JSON for a collector, filtered by `RUST_LOG`;
//! - **traces** over OTLP/HTTP when an endpoint is set: the `run` and `job` spans the engine
//!   makes (`engine::otel`), batched on a thread of their own, so that a slow or absent
//!   collector costs runs nothing (a full queue drops spans);
//! - **errors** to Sentry when a DSN is set: every `error` line, panics, and each failed run
//!   ([`report_failed_run`]), with breadcrumbs from the lines before it.
//!
//! Each part is a `tracing` layer with a filter of its own: `RUST_LOG` quiets the log without
//! losing spans.

mod json_log;
mod sentry_report;

use std::borrow::Cow;
use std::time::Duration;

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

pub use sentry_report::{SentryDsn, report_failed_run};

/// How long exporting one batch of spans may take before it is given up.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stopping node waits for its last spans and events to leave.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// What [`init`] sets up.
#[derive(Debug, Default)]
pub struct Settings {
    /// JSON lines (for a collector) instead of text (for a person).
    pub json: bool,
    /// Where spans go (OTLP over HTTP, protobuf); `None`: spans are not exported.
    pub otlp_endpoint: Option<url::Url>,
    /// Where errors go; `None`: nowhere but the log.
    pub sentry_dsn: Option<SentryDsn>,
    /// This node's name, when known: the resource's `service.instance.id`, Sentry's server name.
    pub node_id: Option<String>,
}

/// Keeps the exporters running; dropping it flushes what they hold (bounded in time).
#[must_use = "dropping the guard stops exporting"]
pub struct Guard {
    tracer: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    _sentry: Option<sentry::ClientInitGuard>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(t) = self.tracer.take()
            && let Err(e) = t.shutdown_with_timeout(FLUSH_TIMEOUT)
        {
            tracing::warn!(error = %e, "the last spans could not be exported");
        }
    }
}

/// Installs the process's `tracing` subscriber and the exporters. Called once, before anything
/// logs; a second call fails.
pub fn init(settings: Settings) -> anyhow::Result<Guard> {
    let tracer = settings
        .otlp_endpoint
        .as_ref()
        .map(|e| tracer_provider(e, settings.node_id.as_deref()))
        .transpose()?;
    let spans = tracer.as_ref().map(|p| {
        // Only the engine's spans (runs and job attempts) make up a run's trace; the events
        // inside them become span events.
        // No busy/idle timing and no OpenTelemetry context made current on entry (a run span
        // is entered at every poll; a job's parent and its `traceparent` come from the spans
        // themselves), no thread, target or source location attributes: a span costs what it
        // says.
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("steward"))
            .with_tracked_inactivity(false)
            .with_context_activation(false)
            .with_threads(false)
            .with_target(false)
            .with_location(false)
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("engine", tracing::Level::INFO),
            )
    });
    let sentry = settings
        .sentry_dsn
        .as_ref()
        .map(|dsn| sentry_report::init(dsn, settings.node_id.clone()))
        .transpose()?;
    // `error` lines become events; the `info` and `warn` lines before them, breadcrumbs.
    let errors = sentry.as_ref().map(|_| {
        sentry_tracing::ErrorLayer::new()
            .with_filter(tracing::level_filters::LevelFilter::ERROR)
            .and_then(
                sentry_tracing::BreadcrumbLayer::new()
                    .with_filter(tracing::level_filters::LevelFilter::INFO),
            )
    });
    tracing_subscriber::registry()
        .with(log_layer(settings.json))
        .with(spans)
        .with(errors)
        .try_init()
        .context("installing the log subscriber")?;
    Ok(Guard {
        tracer,
        _sentry: sentry,
    })
}

type BoxedLayer = Box<dyn tracing_subscriber::Layer<tracing_subscriber::Registry> + Send + Sync>;

/// The log on stderr, filtered by `RUST_LOG` (default `info`).
fn log_layer(json: bool) -> BoxedLayer {
    use std::io::IsTerminal as _;
    use tracing_subscriber::field::MakeExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    if json {
        return layer
            .fmt_fields(json_log::JsonSpanFields)
            .event_format(json_log::JsonEvents)
            .with_filter(filter)
            .boxed();
    }
    // Colours only on a terminal; every field escaped, so that a value holding a newline (a
    // reason, a path) cannot forge a line of its own.
    layer
        .with_ansi(std::io::stderr().is_terminal())
        .fmt_fields(
            tracing_subscriber::fmt::format::debug_fn(|w, field, value| {
                let raw = format!("{value:?}");
                let text = escape_control(&raw);
                if field.name() == "message" {
                    write!(w, "{text}")
                } else {
                    write!(w, "{field}={text}")
                }
            })
            .delimited(" "),
        )
        .with_filter(filter)
        .boxed()
}

/// Control characters as escapes (`\n`, `\u{1b}`): a log line stays one line, and no field
/// can drive the terminal that shows it.
pub fn escape_control(s: &str) -> Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

/// The URL spans are posted to: an endpoint given without a path gets OTLP's `/v1/traces`.
pub fn traces_url(endpoint: &url::Url) -> url::Url {
    let mut url = endpoint.clone();
    if url.path().is_empty() || url.path() == "/" {
        url.set_path("/v1/traces");
    }
    url
}

/// The span pipeline: a batch processor (its own thread; `OTEL_BSP_*` tune it) in front of an
/// OTLP/HTTP exporter whose client is Steward's (rustls with `ring`, the platform's roots).
fn tracer_provider(
    endpoint: &url::Url,
    node: Option<&str>,
) -> anyhow::Result<opentelemetry_sdk::trace::SdkTracerProvider> {
    use opentelemetry_otlp::{WithExportConfig as _, WithHttpConfig as _};
    let client = blocking_client()?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(traces_url(endpoint).as_str())
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .context("otlp_endpoint: setting up the span exporter")?;
    let mut resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("steward")
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ));
    if let Some(node) = node {
        resource = resource.with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            node.to_owned(),
        ));
    }
    let processor = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter).build();
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource.build())
        .build())
}

/// A blocking client for the exporter's thread. It owns a runtime of its own, which may be
/// neither built nor dropped on an async thread: it is built on a thread of its own.
fn blocking_client() -> anyhow::Result<reqwest::blocking::Client> {
    let tls = actions::tls_config().map_err(anyhow::Error::msg)?.clone();
    std::thread::Builder::new()
        .name("otlp-client".into())
        .spawn(move || {
            reqwest::blocking::Client::builder()
                .tls_backend_preconfigured(tls)
                .timeout(EXPORT_TIMEOUT)
                .user_agent(concat!("steward/", env!("CARGO_PKG_VERSION")))
                .build()
        })
        .context("otlp_endpoint: starting the client thread")?
        .join()
        .map_err(|_| anyhow::anyhow!("otlp_endpoint: building the HTTP client panicked"))?
        .context("otlp_endpoint: building the HTTP client")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_without_a_path_posts_to_v1_traces() {
        let u = |s: &str| traces_url(&url::Url::parse(s).unwrap()).to_string();
        assert_eq!(
            u("http://127.0.0.1:4318"),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(u("https://otel.example/"), "https://otel.example/v1/traces");
        assert_eq!(
            u("https://otel.example/custom/path"),
            "https://otel.example/custom/path"
        );
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_control("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
        assert!(matches!(escape_control("plain"), Cow::Borrowed(_)));
    }
}
