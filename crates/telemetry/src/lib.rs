//! What a node tells the outside about itself, set up once at start ([`init`]):
//! - **logs** on stderr, as text for a person or JSON for a collector, filtered by `RUST_LOG`;
//! - **traces** over OTLP/HTTP when an endpoint is set: the `run` and `job` spans the engine
//!   makes (`engine::otel`), batched by the `otlp` pipeline on a thread of its own, so that a
//!   slow or absent collector costs runs nothing (a full queue drops spans);
//! - **errors** to Sentry when a DSN is set: every `error` line, panics, and each failed run
//!   ([`report_failed_run`]), with breadcrumbs from the lines before it.
//!
//! The log and Sentry are `tracing` layers, each with a filter of its own; spans are not
//! `tracing`'s: `RUST_LOG` quiets the log without losing them.

mod json_log;
mod log_out;
mod sentry_report;

use std::borrow::Cow;
use std::time::Duration;

use anyhow::Context as _;
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
    spans: Option<std::sync::Arc<otlp::Pipeline>>,
    _sentry: Option<sentry::ClientInitGuard>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(p) = self.spans.take()
            && let Err(e) = p.shutdown(FLUSH_TIMEOUT)
        {
            tracing::warn!(error = %e, "the last spans could not be exported");
        }
    }
}

/// Installs the process's `tracing` subscriber and the exporters. Called once, before anything
/// logs; a second call fails.
pub fn init(settings: Settings) -> anyhow::Result<Guard> {
    let spans = settings
        .otlp_endpoint
        .as_ref()
        .map(|e| span_pipeline(e, settings.node_id.as_deref(), |k| std::env::var(k).ok()))
        .transpose()?;
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
    // Without Sentry the log's filter is the whole subscriber's: what it leaves out is never
    // made (a callsite it disables costs a branch), and a span costs nothing more for being
    // filtered. Sentry sees `info` and up whatever `RUST_LOG` says, so then the filter is the
    // log's own.
    let (targets, env, own) = match log_filter(std::env::var("RUST_LOG").ok().as_deref()) {
        f if errors.is_some() => (None, None, Some(f)),
        LogFilter::Targets(t) => (Some(t), None, None),
        LogFilter::Env(e) => (None, Some(e), None),
    };
    let installed = tracing_subscriber::registry()
        .with(targets)
        .with(env)
        .with(log_layer(settings.json, own))
        .with(errors)
        .try_init()
        .context("installing the log subscriber")
        .and_then(|()| match &spans {
            Some(p) if otlp::install(p.clone()).is_err() => {
                Err(anyhow::anyhow!("the span pipeline is already installed"))
            }
            _ => Ok(()),
        });
    if let Err(e) = installed {
        // Its thread is not left running.
        if let Some(p) = &spans {
            let _ = p.shutdown(Duration::ZERO);
        }
        return Err(e);
    }
    Ok(Guard {
        spans,
        _sentry: sentry,
    })
}

/// What `RUST_LOG` lets into the log.
#[derive(Debug)]
#[expect(clippy::large_enum_variant, reason = "made once, at start")]
enum LogFilter {
    /// Targets and levels only (`info`, `info,engine=debug`): decided per callsite once, and
    /// nothing to do when a span is entered or left.
    Targets(tracing_subscriber::filter::Targets),
    /// With span or field directives (`[run{workflow=erase}]=debug`): `EnvFilter`, which
    /// looks each span up as it is entered and left.
    Env(tracing_subscriber::EnvFilter),
}

/// The filter `spec` (`RUST_LOG`) asks for, read by `EnvFilter`'s rules: `info` when it is
/// unset or does not parse. When every directive is a plain `LEVEL`, `TARGET` or
/// `TARGET=LEVEL`, which `Targets` reads exactly as `EnvFilter` does, it is a `Targets`.
fn log_filter(spec: Option<&str>) -> LogFilter {
    use tracing_subscriber::filter::Targets;
    let info = || LogFilter::Targets(Targets::new().with_default(tracing::Level::INFO));
    let Some(spec) = spec else {
        return info();
    };
    let Ok(env) = tracing_subscriber::EnvFilter::try_new(spec) else {
        return info();
    };
    if plain(spec)
        && let Ok(t) = spec.parse::<Targets>()
    {
        return LogFilter::Targets(t);
    }
    LogFilter::Env(env)
}

/// Whether every directive of `spec` is `LEVEL`, `TARGET` or `TARGET=LEVEL`, with targets of
/// letters, digits, `_`, `-` and `:` only, and nothing else (no spaces, no empty directive).
fn plain(spec: &str) -> bool {
    let name = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':'))
    };
    !spec.is_empty()
        && spec.split(',').all(|d| match d.split_once('=') {
            Some((target, level)) => {
                name(target) && level.parse::<tracing::level_filters::LevelFilter>().is_ok()
            }
            None => name(d),
        })
}

type BoxedLayer<S> = Box<dyn tracing_subscriber::Layer<S> + Send + Sync>;

/// The log on stderr; `filter`, when given, is its own (else the subscriber's filters it).
fn log_layer<S>(json: bool, filter: Option<LogFilter>) -> BoxedLayer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    use std::io::IsTerminal as _;
    use tracing_subscriber::field::MakeExt as _;
    type BoxedFilter<S> = Box<dyn tracing_subscriber::layer::Filter<S> + Send + Sync>;
    let filter: Option<BoxedFilter<S>> = filter.map(|f| match f {
        LogFilter::Targets(t) => Box::new(t) as BoxedFilter<S>,
        LogFilter::Env(e) => Box::new(e) as BoxedFilter<S>,
    });
    let layer = tracing_subscriber::fmt::layer().with_writer(log_out::LogOut::stderr());
    if json {
        let layer = layer
            .fmt_fields(json_log::JsonSpanFields)
            .event_format(json_log::JsonEvents);
        return match filter {
            Some(f) => layer.with_filter(f).boxed(),
            None => layer.boxed(),
        };
    }
    // Colours only on a terminal; every field escaped, so that a value holding a newline (a
    // reason, a path) cannot forge a line of its own.
    let layer = layer.with_ansi(std::io::stderr().is_terminal()).fmt_fields(
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
    );
    match filter {
        Some(f) => layer.with_filter(f).boxed(),
        None => layer.boxed(),
    }
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

/// The span pipeline: `otlp`'s batching (OpenTelemetry's `OTEL_BSP_*` settings) in front of
/// an OTLP/HTTP transport whose client is Steward's (rustls with `ring`, the platform's roots).
/// `env` reads the environment (a test's, in tests).
fn span_pipeline(
    endpoint: &url::Url,
    node: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<std::sync::Arc<otlp::Pipeline>> {
    let config = otlp::Config::from_env(&env).context("otlp_endpoint: the batching settings")?;
    let headers = otlp_headers(&env)?;
    let transport = HttpTransport {
        client: blocking_client()?,
        url: traces_url(endpoint),
        headers,
    };
    let mut resource: Vec<otlp::Attr> = vec![
        ("service.name", "steward".into()),
        ("service.version", env!("CARGO_PKG_VERSION").into()),
    ];
    if let Some(node) = node {
        resource.push(("service.instance.id", node.to_owned().into()));
    }
    resource.extend(resource_attributes(&env)?);
    otlp::Pipeline::start(config, resource, "steward", transport)
        .context("otlp_endpoint: starting the export thread")
}

/// The resource attributes `OTEL_RESOURCE_ATTRIBUTES` adds (`key=value,key=value`, values
/// percent-encoded), such as `deployment.environment=prod`. Steward's own (`service.name`,
/// `service.version`, `service.instance.id`) are not replaced.
fn resource_attributes(env: impl Fn(&str) -> Option<String>) -> anyhow::Result<Vec<otlp::Attr>> {
    const VAR: &str = "OTEL_RESOURCE_ATTRIBUTES";
    const OWN: [&str; 3] = ["service.name", "service.version", "service.instance.id"];
    // They go with every export: bounded in number and length.
    const MAX_ATTRS: usize = 64;
    const MAX_LEN: usize = 1024;
    let Some(list) = env(VAR) else {
        return Ok(Vec::new());
    };
    let mut out: Vec<otlp::Attr> = Vec::new();
    for (n, key, value) in otel_list(VAR, &list)? {
        if key.is_empty() || key.len() > MAX_LEN || value.len() > MAX_LEN {
            anyhow::bail!(
                "{VAR}: entry {n}: a key must be 1 to {MAX_LEN} bytes and a value at most {MAX_LEN}"
            );
        }
        if OWN.contains(&key) {
            continue;
        }
        if out.len() == MAX_ATTRS {
            anyhow::bail!("{VAR}: more than {MAX_ATTRS} attributes");
        }
        // An attribute's key is `&'static str`: these few are made once, at start, and kept
        // for the life of the process.
        let key: &'static str = Box::leak(key.to_owned().into_boxed_str());
        out.push((key, value.into()));
    }
    Ok(out)
}

/// The entries of one of OpenTelemetry's list variables (`key=value,key=value`, values
/// percent-encoded), empty ones left out: each with its place in the list (from 1), its key
/// and its value decoded. An error names the variable and the entry, never a value.
fn otel_list<'a>(var: &str, list: &'a str) -> anyhow::Result<Vec<(usize, &'a str, String)>> {
    let mut out = Vec::new();
    for (i, entry) in list.split(',').enumerate() {
        if entry.trim().is_empty() {
            continue;
        }
        let n = i + 1;
        let Some((key, value)) = entry.split_once('=') else {
            anyhow::bail!("{var}: entry {n} has no `=` (the format is key=value,key=value)");
        };
        let value = percent_encoding::percent_decode_str(value.trim())
            .decode_utf8()
            .map_err(|_| {
                anyhow::anyhow!("{var}: entry {n}: the value is not UTF-8 once decoded")
            })?;
        out.push((n, key.trim(), value.into_owned()));
    }
    Ok(out)
}

/// The headers every export carries: `OTEL_EXPORTER_OTLP_HEADERS`, then
/// `OTEL_EXPORTER_OTLP_TRACES_HEADERS` (which wins for a name in both), each a list of
/// `name=value` separated by commas, values percent-encoded (OpenTelemetry's format). Values
/// are often API keys: an error names the variable, the entry and the header, never a value.
fn otlp_headers(
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<reqwest::header::HeaderMap> {
    use reqwest::header::{HeaderName, HeaderValue};
    let mut map = reqwest::header::HeaderMap::new();
    for var in [
        "OTEL_EXPORTER_OTLP_HEADERS",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
    ] {
        let Some(list) = env(var) else { continue };
        for (n, name, value) in otel_list(var, &list)? {
            // Not echoed: a mistyped entry (`Authorization: Bearer …=`) may hold the value.
            let header = HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                anyhow::anyhow!("{var}: entry {n}: the name is not a valid header name")
            })?;
            if value.trim().is_empty() {
                // As OpenTelemetry's SDKs do: a header without a value is not sent.
                continue;
            }
            let mut value = HeaderValue::from_str(&value).map_err(|_| {
                anyhow::anyhow!(
                    "{var}: entry {n} ({header}): the value is not a valid header value"
                )
            })?;
            value.set_sensitive(true);
            map.insert(header, value);
        }
    }
    // What is sent is OTLP's protobuf, whatever a variable says.
    map.insert(
        reqwest::header::CONTENT_TYPE,
        reqwest::header::HeaderValue::from_static("application/x-protobuf"),
    );
    Ok(map)
}

/// Posts each batch to the collector, one at a time, on the pipeline's thread.
struct HttpTransport {
    client: reqwest::blocking::Client,
    url: url::Url,
    headers: reqwest::header::HeaderMap,
}

impl otlp::Transport for HttpTransport {
    fn send(&mut self, body: &[u8]) -> Result<(), otlp::SendError> {
        let response = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .body(body.to_vec())
            .send()
            .map_err(|e| otlp::SendError {
                message: error_chain(&e.without_url()),
                // Not sent, or no answer: the collector may take it on another try.
                retry: Some(None),
            })?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Read (a bounded part of) the answer, so that the connection is kept for the next.
        let mut response = response;
        let _ = std::io::copy(
            &mut std::io::Read::take(&mut response, 64 * 1024),
            &mut std::io::sink(),
        );
        if status.is_success() {
            return Ok(());
        }
        // OTLP/HTTP: these mean "later"; any other refusal is about the batch itself.
        let retry = matches!(status.as_u16(), 429 | 502 | 503 | 504).then_some(retry_after);
        Err(otlp::SendError {
            message: format!("the collector answered {status}"),
            retry,
        })
    }
}

/// An error and its causes, `: `-separated (reqwest's own message is only the outermost).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        next = cause.source();
    }
    s
}

/// A blocking client for the exporter's thread. It owns a runtime of its own, which may be
/// neither built nor dropped on an async thread: it is built on a thread of its own.
fn blocking_client() -> anyhow::Result<reqwest::blocking::Client> {
    let tls = actions::tls_config().map_err(anyhow::Error::msg)?.clone();
    std::thread::Builder::new()
        .name("otlp-client".into())
        .spawn(move || {
            // The client's own runtime thread, started here, inherits the export's lower
            // priority.
            otlp::lower_thread_priority();
            reqwest::blocking::Client::builder()
                .tls_backend_preconfigured(tls)
                .timeout(EXPORT_TIMEOUT)
                // A redirect would carry the export's headers (an API key) to wherever it
                // points: a collector's address is configured, never followed.
                .redirect(reqwest::redirect::Policy::none())
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

    fn env(pairs: &[(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        let pairs = pairs.to_vec();
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn export_headers_are_opentelemetrys_list_with_the_traces_variable_winning() {
        let h = otlp_headers(env(&[
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "api-key=abc%20def, x-tenant=one,,empty=,content-type=text/plain",
            ),
            ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=two"),
        ]))
        .unwrap();
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h["api-key"], "abc def");
        assert!(h["api-key"].is_sensitive());
        assert_eq!(h["x-tenant"], "two");
        assert!(
            !h.contains_key("empty"),
            "a header without a value is not sent"
        );
        assert_eq!(h["content-type"], "application/x-protobuf");
        assert_eq!(otlp_headers(env(&[])).unwrap().len(), 1);
    }

    #[test]
    fn a_bad_export_header_is_refused_by_entry_without_its_value() {
        for (list, want) in [
            (
                "a=1,novalue",
                "OTEL_EXPORTER_OTLP_HEADERS: entry 2 has no `=`",
            ),
            (
                "bad name=secret1",
                "entry 1: the name is not a valid header name",
            ),
            (
                "Authorization: Basic secret4=",
                "entry 1: the name is not a valid header name",
            ),
            (
                "api-key=secret2%0a",
                "entry 1 (api-key): the value is not a valid header value",
            ),
            (
                "api-key=secret3%ff",
                "OTEL_EXPORTER_OTLP_HEADERS: entry 1: the value is not UTF-8 once decoded",
            ),
        ] {
            let e = otlp_headers(env(&[("OTEL_EXPORTER_OTLP_HEADERS", list)]))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{list}: {e}");
            assert!(!e.contains("secret"), "{list}: the value is shown: {e}");
        }
    }

    #[test]
    fn resource_attributes_come_from_the_standard_variable_and_steward_keeps_its_own() {
        let a = resource_attributes(env(&[(
            "OTEL_RESOURCE_ATTRIBUTES",
            "deployment.environment=prod, team=ops%2Finfra,,service.name=other",
        )]))
        .unwrap();
        assert_eq!(
            a,
            vec![
                ("deployment.environment", "prod".to_owned().into()),
                ("team", "ops/infra".to_owned().into()),
            ]
        );
        for (bad, want) in [
            ("a=1,b", "entry 2 has no `=`"),
            ("=x", "entry 1: a key must be 1 to 1024 bytes"),
            ("k=%ff", "entry 1: the value is not UTF-8"),
        ] {
            let e = resource_attributes(env(&[("OTEL_RESOURCE_ATTRIBUTES", bad)]))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("OTEL_RESOURCE_ATTRIBUTES: ") && e.contains(want),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn a_bad_batching_setting_stops_the_pipeline_from_starting() {
        let url = url::Url::parse("http://127.0.0.1:4318").unwrap();
        let e = span_pipeline(&url, None, env(&[("OTEL_BSP_MAX_QUEUE_SIZE", "lots")])).unwrap_err();
        let e = format!("{e:#}");
        assert!(
            e.contains("OTEL_BSP_MAX_QUEUE_SIZE=\"lots\": not a whole number"),
            "{e}"
        );
    }

    #[test]
    fn rust_log_with_targets_and_levels_only_is_a_targets_filter() {
        use tracing::Level;
        use tracing_subscriber::filter::LevelFilter;
        let targets = |spec| match log_filter(spec) {
            LogFilter::Targets(t) => t,
            LogFilter::Env(e) => panic!("{spec:?}: an EnvFilter {e}"),
        };
        // Unset, or not parsed by EnvFilter's rules: `info`, as before.
        for spec in [
            None,
            Some("no such level=x"),
            Some("=debug"),
            Some("*=debug"),
        ] {
            let t = targets(spec);
            assert_eq!(t.default_level(), Some(LevelFilter::INFO), "{spec:?}");
            assert!(!t.would_enable("engine", &Level::DEBUG), "{spec:?}");
        }
        let t = targets(Some("WARN,engine=debug,api::auth=off,steward"));
        assert!(t.would_enable("engine::driver", &Level::DEBUG));
        assert!(!t.would_enable("engine::driver", &Level::TRACE));
        assert!(!t.would_enable("node::serve", &Level::INFO));
        assert!(t.would_enable("node::serve", &Level::WARN));
        assert!(!t.would_enable("api::auth", &Level::ERROR));
        assert!(
            t.would_enable("steward", &Level::TRACE),
            "a bare target: all of it"
        );
        // Anything else is EnvFilter's to read, as it always was: span and field directives,
        // and the odd cases whose meaning only EnvFilter's rules give (an empty directive,
        // spaces, nothing at all).
        for spec in [
            "[run]=debug",
            "engine[job{attempt}]=trace",
            "[{run_id=\"x\"}]=debug",
            ",",
            "",
            " warn ",
        ] {
            assert!(
                matches!(log_filter(Some(spec)), LogFilter::Env(_)),
                "{spec:?} is EnvFilter's"
            );
        }
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(escape_control("a\nb\u{1b}[31m"), "a\\nb\\u{1b}[31m");
        assert!(matches!(escape_control("plain"), Cow::Borrowed(_)));
    }
}
