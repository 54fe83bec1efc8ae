//! The `http` action: one HTTP request, checked against the expected status.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, OnceLock};

use domain::FieldError;
use reqwest::header::{HeaderName, HeaderValue};
use reqwest::{Method, Url};
use serde_json::{Map, Value};

use crate::args::{Args, kind};
use crate::deny::HttpDeny;
use crate::redact::{is_sensitive_header, redact_url, url_secrets};
use crate::secret::{Sensitive, Text};
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

/// `http` args: `{url, method, headers, body, expect_status}`. The URL, header values and the
/// body may be secret references.
#[derive(Clone, PartialEq, Eq)]
pub struct HttpArgs {
    /// An `http://` or `https://` URL (validated when written out; a secret's when resolved).
    pub url: Text,
    pub method: HttpMethod,
    /// Sent as given, after `Idempotency-Key`, which they may not set.
    pub headers: BTreeMap<String, Text>,
    pub body: Option<Text>,
    pub expect_status: ExpectStatus,
}

/// Header values, the body and URL credentials may be secrets: they are not shown.
impl fmt::Debug for HttpArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpArgs")
            .field("url", &self.url.describe(redact_url))
            .field("method", &self.method)
            .field("headers", &self.headers.keys().collect::<Vec<_>>())
            .field("body", &self.body)
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
        let url = a
            .text("url", true)
            .and_then(|t| match t.plain().map(check_url) {
                Some(Err(m)) => {
                    a.error("url", m);
                    None
                }
                _ => Some(t),
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
        let headers = a.text_map("headers");
        for (k, v) in &headers {
            if HeaderName::from_bytes(k.as_bytes()).is_err() {
                a.error("headers", format!("{k:?} is not a valid header name"));
            } else if k.eq_ignore_ascii_case(IDEMPOTENCY_KEY_HEADER) {
                a.error(
                    "headers",
                    format!("{IDEMPOTENCY_KEY_HEADER} is set by Steward and cannot be overridden"),
                );
            }
            if v.plain().is_some_and(|v| HeaderValue::from_str(v).is_err()) {
                a.error(
                    "headers",
                    format!(
                        "the value of {k:?} is not a valid header value (no control characters)"
                    ),
                );
            }
        }
        let body = a.text("body", false);
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

/// One client for Steward's own requests (webhooks), built on first use. HTTPS goes through rustls with the
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
    client_builder()?
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {}", error_chain(&e)))
}

/// What every client Steward builds shares: TLS, no idle connections, the user agent.
fn client_builder() -> Result<reqwest::ClientBuilder, String> {
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls_config()?.clone())
        .pool_max_idle_per_host(0)
        .user_agent(concat!("steward/", env!("CARGO_PKG_VERSION"))))
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

/// Redirects followed before the job fails.
const MAX_REDIRECTS: usize = 10;

/// Headers not carried to another origin (scheme, host, port) by a redirect, besides those
/// from secrets and those the redaction rule hides.
const CROSS_ORIGIN_DROPPED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "www-authenticate",
];

/// The TLS settings every client Steward builds uses (`http` jobs, webhooks, exporters): the
/// `ring` provider and the platform's trust store; built once.
pub fn tls_config() -> Result<&'static rustls::ClientConfig, String> {
    use rustls_platform_verifier::BuilderVerifierExt;
    static TLS: OnceLock<Result<rustls::ClientConfig, String>> = OnceLock::new();
    TLS.get_or_init(|| {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_platform_verifier())
            .map_err(|e| format!("cannot set up TLS: {e}"))?
            .with_no_client_auth())
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Why a hop could not be sent.
enum HopError {
    /// The destination is denied: no retry can help.
    Refused(String),
    /// The request cannot be made (a URL without a port, no TLS): no retry can help.
    Unusable(String),
    /// A retry may succeed.
    Failed(String),
}

/// A client for one request to `url`, after `deny` has passed its host and every address it
/// resolves to, connecting only to those addresses. It follows no redirect (each hop is
/// checked anew) and uses no proxy (a proxy would reach what the list denies).
async fn client_for(url: &Url, deny: &HttpDeny) -> Result<reqwest::Client, HopError> {
    let port = url
        .port_or_known_default()
        .ok_or_else(|| HopError::Unusable(format!("{} has no port", redact_url(url.as_str()))))?;
    let mut builder = client_builder()
        .map_err(HopError::Unusable)?
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy();
    let refused = |d: crate::deny::Denied| HopError::Refused(d.to_string());
    match url.host() {
        Some(url::Host::Ipv4(ip)) => deny.check_addr((ip, port).into()).map_err(refused)?,
        Some(url::Host::Ipv6(ip)) => deny.check_addr((ip, port).into()).map_err(refused)?,
        Some(url::Host::Domain(name)) => {
            deny.check_name(name, port).map_err(refused)?;
            let addrs: Vec<_> = tokio::net::lookup_host((name, port))
                .await
                .map_err(|e| HopError::Failed(format!("cannot resolve {name}: {e}")))?
                .collect();
            if addrs.is_empty() {
                return Err(HopError::Failed(format!("{name} resolves to no address")));
            }
            for a in &addrs {
                deny.check_addr(*a)
                    .map_err(|d| HopError::Refused(format!("{name} resolves to {d}")))?;
            }
            builder = builder.resolve_to_addrs(name, &addrs);
        }
        None => return Err(HopError::Refused("the URL names no host".into())),
    }
    builder.build().map_err(|e| {
        HopError::Refused(format!("cannot build the HTTP client: {}", error_chain(&e)))
    })
}

/// Sends the request, keeping a bounded tail of the response body as output. Redirects are
/// followed (up to 10), each destination checked against `http_deny`. Fails if the final
/// status is not expected.
pub(crate) async fn run(
    args: &HttpArgs,
    ctx: &JobContext,
    sensitive: &mut Sensitive,
) -> Result<JobOutput, ActionError> {
    let fatal = |message: String| ActionError::Fatal {
        message,
        output: String::new(),
    };
    let secrets = &ctx.guardrails.secrets;
    let url_text = sensitive.resolve(&args.url, secrets, false)?;
    for part in url_secrets(&url_text) {
        sensitive.add(&part);
    }
    if args.url.plain().is_none()
        && let Ok(u) = Url::parse(&url_text)
    {
        // An error names the host it could not resolve or reach: a secret URL's host is
        // part of the secret.
        if let Some(host) = u.host_str() {
            sensitive.add(host);
        }
        // A server that echoes what it was asked shows the path and query, not the URL.
        let path_and_query = &u[url::Position::BeforePath..url::Position::AfterQuery];
        if path_and_query != "/" {
            sensitive.add(path_and_query);
        }
        for (_, v) in u.query_pairs() {
            sensitive.add(&v);
        }
    }
    let what = format!("{} {}", args.method, args.url.describe(redact_url));
    if args.url.plain().is_none()
        && let Err(m) = check_url(&url_text)
    {
        return Err(fatal(format!("{what}: the secret's URL {m}")));
    }
    let mut url = Url::parse(&url_text).map_err(|e| fatal(format!("{what}: invalid URL: {e}")))?;
    let mut headers = reqwest::header::HeaderMap::new();
    // Not carried to another origin by a redirect.
    let mut private_headers = Vec::new();
    for (k, v) in &args.headers {
        if v.plain().is_none() || is_sensitive_header(k) {
            private_headers.push(k.clone());
        }
        let v = sensitive.resolve(v, secrets, is_sensitive_header(k))?;
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(&v),
        ) else {
            return Err(fatal(format!(
                "{what}: header {k}: the secret's value is not a valid header value"
            )));
        };
        headers.append(name, value);
    }
    // The attempt's place in its run's trace, unless the spec names another.
    if let Some(tp) = &ctx.traceparent
        && !headers.contains_key("traceparent")
        && let Ok(v) = reqwest::header::HeaderValue::from_str(&tp.to_string())
    {
        headers.insert("traceparent", v);
    }
    let mut body = match &args.body {
        Some(b) => Some(sensitive.resolve(b, secrets, false)?),
        None => None,
    };
    let secret_body = args.body.as_ref().is_some_and(|b| b.plain().is_none());
    let mut method = args.method.to_reqwest();
    let deny = &ctx.guardrails.http_deny;

    let mut tail = Tail::new(ctx.output_limit);
    let exchange = async {
        let mut hops = 0;
        let mut resp = loop {
            let client = client_for(&url, deny).await?;
            let mut req = client
                .request(method.clone(), url.clone())
                .header(IDEMPOTENCY_KEY_HEADER, &ctx.idempotency_key)
                .headers(headers.clone());
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            let resp = req
                .send()
                .await
                .map_err(|e| HopError::Failed(error_chain(&e.without_url())))?;
            let status = resp.status();
            let location = resp
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok());
            let follow = matches!(status.as_u16(), 301..=303 | 307 | 308);
            let (true, Some(location)) = (follow, location) else {
                break resp;
            };
            hops += 1;
            if hops > MAX_REDIRECTS {
                return Err(HopError::Failed(format!(
                    "more than {MAX_REDIRECTS} redirects"
                )));
            }
            let next = url
                .join(location)
                .map_err(|e| HopError::Failed(format!("redirected to an invalid URL: {e}")))?;
            if !matches!(next.scheme(), "http" | "https") {
                return Err(HopError::Refused(format!(
                    "redirected to a {}:// URL",
                    next.scheme()
                )));
            }
            // As reqwest does: after a 301, 302 or 303, what was not a GET or HEAD becomes a
            // GET, without the body and the headers that described it.
            if matches!(status.as_u16(), 301..=303)
                && method != Method::GET
                && method != Method::HEAD
            {
                method = Method::GET;
                body = None;
                headers.remove(reqwest::header::CONTENT_TYPE);
                headers.remove(reqwest::header::CONTENT_LENGTH);
            }
            if next.origin() != url.origin() {
                if body.is_some() && secret_body {
                    return Err(HopError::Refused(format!(
                        "a {} redirect to another origin would send the secret body there",
                        status.as_u16()
                    )));
                }
                for h in CROSS_ORIGIN_DROPPED {
                    headers.remove(*h);
                }
                for h in &private_headers {
                    headers.remove(h.as_str());
                }
            }
            url = next;
        };
        let status = resp.status();
        let read = async {
            while let Some(chunk) = resp.chunk().await? {
                tail.push(&chunk);
            }
            Ok::<_, reqwest::Error>(())
        }
        .await;
        Ok::<_, HopError>((status, read))
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
        Err(HopError::Refused(m)) => Err(ActionError::Fatal {
            message: format!("{what}: refused: {m}"),
            output,
        }),
        Err(HopError::Unusable(m)) => Err(ActionError::Fatal {
            message: format!("{what}: {m}"),
            output,
        }),
        Err(HopError::Failed(m)) => Err(failed(format!("{what}: {m}"), output)),
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
}
