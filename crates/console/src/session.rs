//! Signing in: the token a person types is checked like any API call's, then kept in a session
//! cookie (HttpOnly, SameSite=Strict, Secure under TLS) and checked again on every request, so
//! a revoked token signs its pages out at once and every node of a cluster accepts the cookie.
//! Every form carries a CSRF value derived from the token (or, for callers without one, from
//! a per-process key), and a POST from another site is refused before it is read.

use std::sync::Arc;

use api::auth::Caller;
use askama::Template;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::Inner;
use crate::pages::{Html, page_error};

pub(crate) const COOKIE: &str = "steward_session";

/// The cookie's name under TLS: a `__Host-` cookie can only have been set by this host, over
/// HTTPS, for every path, so no sibling domain or plain-HTTP page can plant one.
pub(crate) const TLS_COOKIE: &str = "__Host-steward_session";

fn cookie_name(inner: &Inner) -> &'static str {
    if inner.settings.tls {
        TLS_COOKIE
    } else {
        COOKIE
    }
}

/// A signed-in person: who they are, and the CSRF value their forms carry.
pub(crate) struct Session {
    pub(crate) caller: Caller,
    pub(crate) csrf: String,
    /// What it was authenticated by (the cookie's token, a client certificate's name), to
    /// check again while a page stays open ([`Session::still_valid`]).
    credential: Option<String>,
    cert: Option<String>,
}

/// The session cookie's token, if the request has exactly one: two cookies of the name mean
/// one was planted (a narrower path sorts first), and neither is trusted.
fn cookie_token(headers: &HeaderMap, name: &str) -> Option<String> {
    let mut found = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == name && !v.is_empty()).then(|| v.to_owned())
        });
    let first = found.next()?;
    found.next().is_none().then_some(first)
}

/// The peer address and the verified client certificate's name, as the listener recorded them.
fn peer_of(parts: &Parts) -> (String, Option<String>) {
    let ext = &parts.extensions;
    if let Some(ConnectInfo(p)) = ext.get::<ConnectInfo<api::tls::Peer>>() {
        return (p.addr.to_string(), p.client.clone());
    }
    let addr = ext
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "-".to_owned(), |c| c.0.to_string());
    (addr, None)
}

fn hex32(digest: &[u8]) -> String {
    digest.iter().take(16).fold(String::new(), |mut s, b| {
        use std::fmt::Write as _;
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The CSRF value for a session: from its token (the same on every node), else from the
/// process's key and the caller's name.
fn csrf_for(inner: &Inner, token: Option<&str>, name: &str) -> String {
    let mut h = Sha256::new();
    match token {
        Some(t) => {
            h.update(b"steward-console-csrf\0");
            h.update(t.as_bytes());
        }
        None => {
            h.update(inner.csrf_key);
            h.update(name.as_bytes());
        }
    }
    hex32(&h.finalize())
}

/// Compares without stopping at the first difference.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl FromRequestParts<Arc<Inner>> for Session {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        inner: &Arc<Inner>,
    ) -> Result<Session, Response> {
        let token = cookie_token(&parts.headers, cookie_name(inner));
        let (peer, cert) = peer_of(parts);
        let credential = token.as_ref().map(|t| format!("Bearer {t}"));
        match inner
            .service
            .auth
            .authenticate(
                credential.as_deref().map(str::as_bytes),
                cert.as_deref(),
                peer,
            )
            .await
        {
            Ok(caller) => {
                let csrf = csrf_for(inner, token.as_deref(), caller.name());
                Ok(Session {
                    caller,
                    csrf,
                    credential,
                    cert,
                })
            }
            Err(_) if token.is_some() => {
                // A token that stopped working (revoked, expired): sign in again.
                Err((clear_cookie(inner), Redirect::to("/signin?expired=1")).into_response())
            }
            Err(_) => Err(Redirect::to("/signin").into_response()),
        }
    }
}

impl Session {
    /// Whether what signed this session in still does (a token revoked or expired since does
    /// not): asked by what outlives a request, the live updates.
    pub(crate) async fn still_valid(&self, inner: &Inner) -> bool {
        inner
            .service
            .auth
            .authenticate(
                self.credential.as_deref().map(str::as_bytes),
                self.cert.as_deref(),
                self.caller.peer.clone(),
            )
            .await
            .is_ok()
    }

    /// The refusal of a form that did not come from one of this site's pages; `None`: it did.
    pub(crate) fn refuse_form(&self, headers: &HeaderMap, csrf: &str) -> Option<Response> {
        (!same_site(headers) || !same(csrf, &self.csrf)).then(|| {
            page_error(
                StatusCode::FORBIDDEN,
                "This form did not come from this console, or the page was open too long: go back, reload the page and try again.",
            )
        })
    }
}

/// `Sec-Fetch-Site`, when the browser sends it, says the request came from this site.
fn same_site(headers: &HeaderMap) -> bool {
    headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| matches!(v, "same-origin" | "none"))
}

fn session_cookie(inner: &Inner, token: &str) -> (header::HeaderName, HeaderValue) {
    let secure = if inner.settings.tls { "; Secure" } else { "" };
    let name = cookie_name(inner);
    let v = format!("{name}={token}; Path=/; HttpOnly; SameSite=Strict{secure}");
    (
        header::SET_COOKIE,
        HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static("")),
    )
}

fn clear_cookie(inner: &Inner) -> [(header::HeaderName, HeaderValue); 1] {
    let secure = if inner.settings.tls { "; Secure" } else { "" };
    let name = cookie_name(inner);
    let v = format!("{name}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0{secure}");
    [(
        header::SET_COOKIE,
        HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static("")),
    )]
}

#[derive(Template)]
#[template(path = "signin.html")]
struct SignIn {
    error: String,
}

#[derive(Deserialize)]
pub(crate) struct SignInQuery {
    #[serde(default)]
    expired: Option<String>,
}

pub(crate) async fn signin_page(
    axum::extract::Query(q): axum::extract::Query<SignInQuery>,
) -> Response {
    let error = if q.expired.is_some() {
        "Your token is no longer accepted (revoked or expired): sign in again.".to_owned()
    } else {
        String::new()
    };
    Html::render(&SignIn { error })
}

#[derive(Deserialize)]
pub(crate) struct SignInForm {
    token: String,
}

/// Checks the token as the API would; on success, the cookie and the overview.
pub(crate) async fn signin(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    ConnectInfoOpt(peer): ConnectInfoOpt,
    crate::pages::PageForm(form): crate::pages::PageForm<SignInForm>,
) -> Response {
    if !same_site(&headers) {
        return page_error(
            StatusCode::FORBIDDEN,
            "Sign in from this console's own page.",
        );
    }
    let token = form.token.trim();
    // A token is `stw_` and base64url: anything else cannot be one, and must not reach a
    // header value.
    let plausible = !token.is_empty()
        && token.len() <= 256
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'));
    let credential = format!("Bearer {token}");
    let checked = if plausible {
        inner
            .service
            .auth
            .authenticate(Some(credential.as_bytes()), None, peer)
            .await
            .map_err(|e| {
                if e.code == tonic::Code::Unauthenticated {
                    e.message
                } else {
                    // The store's own words are not for someone who is not signed in.
                    tracing::warn!(error = %e.message, "the console could not check a token");
                    "it cannot be checked now; try again in a moment".to_owned()
                }
            })
    } else {
        Err("that is not a Steward token (they start with stw_)".to_owned())
    };
    match checked {
        Ok(_) => ([session_cookie(&inner, token)], Redirect::to("/")).into_response(),
        Err(why) => {
            let mut r = Html::render(&SignIn {
                error: format!("That token was not accepted: {why}"),
            });
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            r
        }
    }
}

#[derive(Deserialize)]
pub(crate) struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

pub(crate) async fn signout(
    State(inner): State<Arc<Inner>>,
    session: Session,
    headers: HeaderMap,
    crate::pages::PageForm(form): crate::pages::PageForm<CsrfForm>,
) -> Response {
    if let Some(r) = session.refuse_form(&headers, &form.csrf) {
        return r;
    }
    (clear_cookie(&inner), Redirect::to("/signin")).into_response()
}

/// The peer address, when the listener recorded one.
pub(crate) struct ConnectInfoOpt(pub(crate) String);

impl<S: Send + Sync> FromRequestParts<S> for ConnectInfoOpt {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ConnectInfoOpt(peer_of(parts).0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; steward_session=stw_abc; b=2"),
        );
        assert_eq!(cookie_token(&h, COOKIE).as_deref(), Some("stw_abc"));
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("steward_session="));
        assert_eq!(cookie_token(&h, COOKIE), None);
        // Two of them: one was planted, neither counts.
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("steward_session=stw_planted; steward_session=stw_mine"),
        );
        assert_eq!(cookie_token(&h, COOKIE), None);
    }

    #[test]
    fn comparison() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "ab"));
    }
}
