//! The redaction rule (docs/security.md, Redaction): what every surface that shows a spec
//! hides even when the spec does not mark it as a secret. The job itself gets the real value;
//! a hidden value that shows up in the job's output or error is scrubbed as well.

use std::borrow::Cow;

use domain::WorkflowSpec;
use reqwest::Url;
use serde_json::{Map, Value};

use crate::secret::MASK;

/// `shell` env names holding one of these (any case) have their values hidden.
const SENSITIVE_ENV: &[&str] = &["TOKEN", "KEY", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL"];

/// `http` headers whose name holds one of these (any case) have their values hidden:
/// `Authorization`, `Proxy-Authorization`, `Cookie`, `Set-Cookie`, and the custom credential
/// headers (`X-Api-Key`, `X-Auth-Token`, `Private-Token`, `X-Vault-Token`...).
const SENSITIVE_HEADERS: &[&str] = &[
    "auth",
    "cookie",
    "token",
    "key",
    "secret",
    "password",
    "signature",
    "session",
];

/// URL query parameters whose name holds one of these (any case) have their values hidden.
const SENSITIVE_QUERY: &[&str] = &["token", "key", "secret", "password", "signature"];

pub fn is_sensitive_env(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    SENSITIVE_ENV.iter().any(|s| upper.contains(s))
}

pub fn is_sensitive_header(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SENSITIVE_HEADERS.iter().any(|h| lower.contains(h))
}

/// The password of a value that is a URL with credentials (`DATABASE_URL`).
pub(crate) fn url_password(value: &str) -> Option<String> {
    let u = Url::parse(value).ok()?;
    let p = u.password()?;
    Some(percent_decode(p).unwrap_or_else(|()| p.to_owned()))
}

fn is_sensitive_query(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SENSITIVE_QUERY.iter().any(|s| lower.contains(s))
}

/// The parts of `url` the rule hides: the user name and password, and the values of
/// sensitive query parameters, each as written and percent-decoded.
pub(crate) fn url_secrets(url: &str) -> Vec<String> {
    let Ok(u) = Url::parse(url) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut push = |raw: &str| {
        if raw.is_empty() {
            return;
        }
        out.push(raw.to_owned());
        if let Ok(decoded) = percent_decode(raw)
            && decoded != raw
        {
            out.push(decoded);
        }
    };
    push(u.username());
    if let Some(p) = u.password() {
        push(p);
    }
    for pair in u.query().unwrap_or_default().split('&') {
        let (k, raw) = pair.split_once('=').unwrap_or((pair, ""));
        let name = percent_decode(&k.replace('+', " ")).unwrap_or_else(|()| k.to_owned());
        if is_sensitive_query(&name) {
            push(raw);
            if let Ok(decoded) = percent_decode(&raw.replace('+', " ")) {
                push(&decoded);
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `s` percent-decoded, if the result is UTF-8.
fn percent_decode(s: &str) -> Result<String, ()> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(std::borrow::Cow::into_owned)
        .map_err(|_| ())
}

/// `url` as shown: user info replaced by `***`, sensitive query values by `***`. A string
/// that does not parse as a URL is hidden whole.
pub fn redact_url(url: &str) -> String {
    let Ok(mut u) = Url::parse(url) else {
        return MASK.to_owned();
    };
    if !u.username().is_empty() || u.password().is_some() {
        let _ = u.set_password(None);
        let _ = u.set_username(MASK);
    }
    if u.query_pairs().any(|(k, _)| is_sensitive_query(&k)) {
        let pairs: Vec<(String, String)> = u
            .query_pairs()
            .map(|(k, v)| {
                let v = if is_sensitive_query(&k) {
                    MASK.to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

/// A job's `args` as every surface shows them. Secret references (`{secret: NAME}`) are shown
/// as written: the name is not the secret.
pub fn redact_args(action: &str, args: &Map<String, Value>) -> Option<Map<String, Value>> {
    let mask = || Value::String(MASK.to_owned());
    match action {
        "shell" => {
            let Some(Value::Object(env)) = args.get("env") else {
                return None;
            };
            // A value hidden whole, or a URL shown without its credentials.
            let shown = |k: &str, v: &Value| match v {
                Value::String(_) if is_sensitive_env(k) => Some(mask()),
                Value::String(s) if url_password(s).is_some() => Some(Value::String(redact_url(s))),
                _ => None,
            };
            if !env.iter().any(|(k, v)| shown(k, v).is_some()) {
                return None;
            }
            let mut out = args.clone();
            if let Some(Value::Object(env)) = out.get_mut("env") {
                for (k, v) in env.iter_mut() {
                    if let Some(s) = shown(k, v) {
                        *v = s;
                    }
                }
            }
            Some(out)
        }
        "http" => {
            let mut out = None::<Map<String, Value>>;
            if let Some(Value::String(url)) = args.get("url") {
                let shown = redact_url(url);
                if &shown != url {
                    out.get_or_insert_with(|| args.clone())
                        .insert("url".into(), Value::String(shown));
                }
            }
            if let Some(Value::Object(headers)) = args.get("headers")
                && headers
                    .iter()
                    .any(|(k, v)| v.is_string() && is_sensitive_header(k))
            {
                let out = out.get_or_insert_with(|| args.clone());
                if let Some(Value::Object(headers)) = out.get_mut("headers") {
                    for (k, v) in headers.iter_mut() {
                        if v.is_string() && is_sensitive_header(k) {
                            *v = mask();
                        }
                    }
                }
            }
            out
        }
        _ => None,
    }
}

/// `spec` as every surface shows it: [`redact_args`] applied to each job. Borrows when nothing
/// is hidden.
pub fn redact_spec(spec: &WorkflowSpec) -> Cow<'_, WorkflowSpec> {
    let mut out: Option<WorkflowSpec> = None;
    for (bi, b) in spec.blocks.iter().enumerate() {
        for (ji, j) in b.jobs.iter().enumerate() {
            if let Some(args) = redact_args(&j.action, &j.args) {
                out.get_or_insert_with(|| spec.clone()).blocks[bi].jobs[ji].args = args;
            }
        }
    }
    match out {
        Some(s) => Cow::Owned(s),
        None => Cow::Borrowed(spec),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn urls() {
        assert_eq!(
            redact_url("https://u:p%40ss@example.com/x?api_key=abc&page=2&X-Amz-Signature=zz"),
            "https://***@example.com/x?api_key=***&page=2&X-Amz-Signature=***"
        );
        assert_eq!(
            redact_url("http://example.com/a?b=c"),
            "http://example.com/a?b=c"
        );
        assert_eq!(redact_url("not a url"), "***");
        let s = url_secrets("https://u:p%40ss@example.com/?token=t%2Bk&q=1");
        assert_eq!(s, ["p%40ss", "p@ss", "t%2Bk", "t+k", "u"]);
    }

    #[test]
    fn args() {
        let shell = json!({"argv": ["x"], "env": {"DB_PASSWORD": "hunter2", "db_key": {"secret": "k"}, "HOME": "/root"}});
        let out = redact_args("shell", shell.as_object().unwrap()).unwrap();
        assert_eq!(
            Value::Object(out),
            json!({"argv": ["x"], "env": {"DB_PASSWORD": "***", "db_key": {"secret": "k"}, "HOME": "/root"}})
        );
        let plain = json!({"argv": ["x"], "env": {"HOME": "/root"}});
        assert!(redact_args("shell", plain.as_object().unwrap()).is_none());
        let url = json!({"argv": ["x"], "env": {"DATABASE_URL": "postgres://app:pw-1234@db/app"}});
        let out = redact_args("shell", url.as_object().unwrap()).unwrap();
        assert_eq!(out["env"]["DATABASE_URL"], "postgres://***@db/app");

        let http = json!({"url": "https://a:b@h/", "headers": {"authorization": "Bearer x", "Accept": "*/*", "X-Api-Key": "k", "Cookie": {"secret": "c"}}, "body": "b"});
        let out = redact_args("http", http.as_object().unwrap()).unwrap();
        assert_eq!(
            Value::Object(out),
            json!({"url": "https://***@h/", "headers": {"authorization": "***", "Accept": "*/*", "X-Api-Key": "***", "Cookie": {"secret": "c"}}, "body": "b"})
        );
    }
}
