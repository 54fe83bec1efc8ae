//! The `http` action: one HTTP request, checked against the expected status.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use domain::FieldError;
use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Method, Url};
use serde_json::{Map, Value};

use crate::args::{Args, kind};
use crate::tail::Tail;
use crate::{ActionError, JobContext, JobOutput};

pub(crate) const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpMethod {
    Get,
    Head,
    Post,
    Put,
    Patch,
    Delete,
    Options,
}

impl HttpMethod {
    pub const ALL: &[HttpMethod] = &[
        HttpMethod::Get,
        HttpMethod::Head,
        HttpMethod::Post,
        HttpMethod::Put,
        HttpMethod::Patch,
        HttpMethod::Delete,
        HttpMethod::Options,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Head => "HEAD",
            HttpMethod::Post => "POST",
            HttpMethod::Put => "PUT",
            HttpMethod::Patch => "PATCH",
            HttpMethod::Delete => "DELETE",
            HttpMethod::Options => "OPTIONS",
        }
    }

    fn to_reqwest(self) -> Method {
        match self {
            HttpMethod::Get => Method::GET,
            HttpMethod::Head => Method::HEAD,
            HttpMethod::Post => Method::POST,
            HttpMethod::Put => Method::PUT,
            HttpMethod::Patch => Method::PATCH,
            HttpMethod::Delete => Method::DELETE,
            HttpMethod::Options => Method::OPTIONS,
        }
    }
}

impl fmt::Display for HttpMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which response statuses count as success.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpectStatus {
    /// Any 2xx (the default).
    Success,
    /// Exactly these (`expect_status: 404` or `expect_status: [200, 409]`).
    OneOf(Vec<u16>),
}

impl ExpectStatus {
    pub fn accepts(&self, status: u16) -> bool {
        match self {
            ExpectStatus::Success => (200..300).contains(&status),
            ExpectStatus::OneOf(codes) => codes.contains(&status),
        }
    }
}

impl fmt::Display for ExpectStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectStatus::Success => f.write_str("2xx"),
            ExpectStatus::OneOf(codes) if codes.len() == 1 => write!(f, "{}", codes[0]),
            ExpectStatus::OneOf(codes) => {
                f.write_str("one of ")?;
                for (i, c) in codes.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{c}")?;
                }
                Ok(())
            }
        }
    }
}

/// `http` args: `{url, method, headers, body, expect_status}`.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpArgs {
    /// An `http://` or `https://` URL (validated).
    pub url: String,
    pub method: HttpMethod,
    /// Sent as given, after `Idempotency-Key`, which they may not set.
    pub headers: BTreeMap<String, String>,
    pub body: Option<String>,
    pub expect_status: ExpectStatus,
}

/// Header values, the body and URL credentials may be secrets: they are not shown.
impl fmt::Debug for HttpArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpArgs")
            .field("url", &redact_url(&self.url))
            .field("method", &self.method)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("body_len", &self.body.as_ref().map(String::len))
            .field("expect_status", &self.expect_status)
            .finish()
    }
}

impl HttpArgs {
    pub(crate) fn parse(
        map: &Map<String, Value>,
        job_path: &str,
    ) -> Result<HttpArgs, Vec<FieldError>> {
        let mut a = Args::new(
            map,
            job_path,
            &["url", "method", "headers", "body", "expect_status"],
        );
        let url = a.string("url", true).and_then(|s| match check_url(s) {
            Ok(()) => Some(s.to_owned()),
            Err(m) => {
                a.error("url", m);
                None
            }
        });
        let method = match a.string("method", false) {
            None => Some(HttpMethod::Get),
            Some(s) => {
                let m = HttpMethod::ALL
                    .iter()
                    .copied()
                    .find(|m| m.as_str().eq_ignore_ascii_case(s));
                if m.is_none() {
                    let all: Vec<_> = HttpMethod::ALL.iter().map(|m| m.as_str()).collect();
                    a.error(
                        "method",
                        format!("unknown method {s:?}; expected one of: {}", all.join(", ")),
                    );
                }
                m
            }
        };
        let headers = a.string_map("headers");
        for (k, v) in &headers {
            if HeaderName::from_bytes(k.as_bytes()).is_err() {
                a.error("headers", format!("{k:?} is not a valid header name"));
            } else if k.eq_ignore_ascii_case(IDEMPOTENCY_KEY_HEADER) {
                a.error(
                    "headers",
                    format!("{IDEMPOTENCY_KEY_HEADER} is set by Steward and cannot be overridden"),
                );
            }
            if HeaderValue::from_str(v).is_err() {
                a.error(
                    "headers",
                    format!(
                        "the value of {k:?} is not a valid header value (no control characters)"
                    ),
                );
            }
        }
        let body = a.string("body", false).map(str::to_owned);
        let expect_status = parse_expect_status(&mut a);
        let args = match (url, method, expect_status) {
            (Some(url), Some(method), Some(expect_status)) => Some(HttpArgs {
                url,
                method,
                headers,
                body,
                expect_status,
            }),
            _ => None,
        };
        a.finish(args)
    }
}

fn check_url(s: &str) -> Result<(), String> {
    let url = Url::parse(s).map_err(|e| format!("is not a valid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "must be an http:// or https:// URL, not {}://",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("must name a host".into());
    }
    Ok(())
}

fn parse_expect_status(a: &mut Args<'_>) -> Option<ExpectStatus> {
    const MSG: &str = "must be an HTTP status code (100-599) or a non-empty list of them";
    let Some(v) = a.get("expect_status") else {
        return Some(ExpectStatus::Success);
    };
    let code = |v: &Value| {
        v.as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| (100..=599).contains(n))
    };
    match v {
        Value::Array(items) if !items.is_empty() => {
            let codes: Vec<u16> = items.iter().filter_map(code).collect();
            if codes.len() == items.len() {
                return Some(ExpectStatus::OneOf(codes));
            }
            let bad = items
                .iter()
                .find(|v| code(v).is_none())
                .map_or(String::new(), |v| v.to_string());
            a.error("expect_status", format!("{MSG}; {bad} is not"));
            None
        }
        other => match code(other) {
            Some(c) => Some(ExpectStatus::OneOf(vec![c])),
            None => {
                let got = if other.is_number() {
                    other.to_string()
                } else {
                    kind(other).to_owned()
                };
                a.error("expect_status", format!("{MSG}, not {got}"));
                None
            }
        },
    }
}

/// The URL without its password, for messages and logs.
fn redact_url(s: &str) -> String {
    match Url::parse(s) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("REDACTED"));
            url.to_string()
        }
        Ok(url) => url.to_string(),
        Err(_) => "<invalid URL>".into(),
    }
}

/// One client for every `http` job, built on first use. HTTPS goes through rustls with the
/// `ring` provider and the platform's trust store, handed to reqwest as a ready config so that
/// no process-wide rustls provider is installed. Idle connections are not kept: a pooled
/// connection belongs to the tokio runtime that opened it, and jobs are few and far between.
pub fn shared_client() -> Result<&'static reqwest::Client, String> {
    static CLIENT: OnceLock<Result<reqwest::Client, String>> = OnceLock::new();
    CLIENT
        .get_or_init(build_client)
        .as_ref()
        .map_err(Clone::clone)
}

fn build_client() -> Result<reqwest::Client, String> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_platform_verifier())
        .map_err(|e| format!("cannot set up TLS: {e}"))?
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .pool_max_idle_per_host(0)
        .user_agent(concat!("steward/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {}", error_chain(&e)))
}

/// An error and its causes, `: `-separated (reqwest's own message is often just "error sending request").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cause = c.source();
    }
    s
}

/// Sends the request, keeping a bounded tail of the response body as output. Redirects are
/// followed (up to 10). Fails if the final status is not expected.
pub(crate) async fn run(args: &HttpArgs, ctx: &JobContext) -> Result<JobOutput, ActionError> {
    let fatal = |message: String| ActionError::Fatal {
        message,
        output: String::new(),
    };
    let client = shared_client().map_err(fatal)?;
    let url = Url::parse(&args.url).map_err(|e| fatal(format!("invalid URL: {e}")))?;
    let what = format!("{} {}", args.method, redact_url(&args.url));

    let mut req = client
        .request(args.method.to_reqwest(), url)
        .header(IDEMPOTENCY_KEY_HEADER, &ctx.idempotency_key);
    for (k, v) in &args.headers {
        req = req.header(k, v);
    }
    if let Some(body) = &args.body {
        req = req.body(body.clone());
    }

    let mut tail = Tail::new(ctx.output_limit);
    let exchange = async {
        let mut resp = req.send().await?;
        let status = resp.status();
        let body = async {
            while let Some(chunk) = resp.chunk().await? {
                tail.push(&chunk);
            }
            Ok::<_, reqwest::Error>(())
        }
        .await;
        Ok::<_, reqwest::Error>((status, body))
    };
    let outcome = tokio::select! {
        biased;
        () = ctx.cancel.cancelled() => None,
        r = exchange => Some(r),
    };
    let output = tail.into_string();
    let Some(outcome) = outcome else {
        return Err(ActionError::Cancelled { output });
    };
    let failed = |message: String, output: String| ActionError::Failed {
        message,
        exit_code: None,
        output,
    };
    match outcome {
        Err(e) => Err(failed(
            format!("{what}: {}", error_chain(&e.without_url())),
            output,
        )),
        Ok((status, _)) if !args.expect_status.accepts(status.as_u16()) => Err(failed(
            format!(
                "{what}: unexpected HTTP status {status} (expected {})",
                args.expect_status
            ),
            output,
        )),
        Ok((status, Err(e))) => Err(failed(
            format!(
                "{what}: status {status}, then reading the body failed: {}",
                error_chain(&e.without_url())
            ),
            output,
        )),
        Ok((_, Ok(()))) => Ok(JobOutput {
            exit_code: None,
            output,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_builds_with_tls() {
        shared_client().unwrap();
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("https://u:secret@example.com/x"),
            "https://u:REDACTED@example.com/x"
        );
        assert_eq!(redact_url("http://example.com/"), "http://example.com/");
    }
}
