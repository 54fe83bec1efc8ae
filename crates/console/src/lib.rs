//! The operator console (docs/console.md): server-rendered pages at `/` on the API's listener,
//! for people who do not know the tooling. The emergency stop is a button on every page for
//! the roles that may use it; every form works without JavaScript, and a small script
//! (`static/console.js`) refreshes the live parts of a page when the server says something
//! changed (server-sent events).
//!
//! Everything a page does goes through `api::Service`, so a page can do exactly what its
//! signed-in token may do through the API, and is logged the same way. Templates are askama's
//! (compile-time checked, escaping on by default).

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::{get, post};

mod live;
mod pages;
mod session;

/// What the console shows besides what the API serves.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// This node's name.
    pub node_id: String,
    /// The listener speaks TLS: the session cookie is `Secure`.
    pub tls: bool,
    /// The effective configuration, secrets redacted (`steward serve --print-config`).
    pub config_text: String,
    /// Why the last reload of the policy file was refused, while it stays refused.
    pub policy_alert: Option<Arc<Mutex<Option<String>>>>,
    /// How `shell` jobs' processes are kept together.
    pub job_containment: String,
}

pub(crate) struct Inner {
    pub(crate) service: api::Service,
    pub(crate) settings: Settings,
    /// Keys the CSRF values of callers without a token of their own (a client certificate,
    /// `auth = "none"`): random per process.
    pub(crate) csrf_key: [u8; 32],
}

/// The console, ready to be routed.
#[derive(Clone)]
pub struct Console {
    inner: Arc<Inner>,
}

impl Console {
    pub fn new(service: api::Service, settings: Settings) -> Console {
        let mut csrf_key = [0u8; 32];
        if let Err(e) = getrandom::fill(&mut csrf_key) {
            // Tokens still key their own values; only certificate and anonymous callers
            // lose the per-process key, and SameSite=Strict still holds.
            tracing::warn!(error = %e, "no randomness for the console's CSRF key");
        }
        Console {
            inner: Arc::new(Inner {
                service,
                settings,
                csrf_key,
            }),
        }
    }

    /// Whether `path` is one of the console's (the API serves the rest).
    pub fn owns(path: &str) -> bool {
        const PREFIXES: &[&str] = &["/runs", "/estop", "/audit", "/policies", "/health", "/ui/"];
        path == "/"
            || path == "/signin"
            || path == "/signout"
            || PREFIXES.iter().any(|p| {
                path.strip_prefix(p).is_some_and(|rest| {
                    rest.is_empty() || rest.starts_with('/') || p.ends_with('/')
                })
            })
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/", get(pages::overview))
            .route("/signin", get(session::signin_page).post(session::signin))
            .route("/signout", post(session::signout))
            .route("/runs", get(pages::runs))
            .route("/runs/{id}", get(pages::run))
            .route("/runs/{id}/{action}", post(pages::run_action))
            .route("/estop", get(pages::estop))
            .route("/estop/new", get(pages::estop_new))
            .route("/estop/review", post(pages::estop_review))
            .route("/estop/set", post(pages::estop_set))
            .route("/estop/clear", post(pages::estop_clear))
            .route("/audit", get(pages::audit))
            .route("/policies", get(pages::policies))
            .route("/health", get(pages::health))
            .route("/ui/events", get(live::events))
            .route("/ui/console.js", get(pages::script))
            .route("/ui/console.css", get(pages::style))
            .fallback(pages::not_found)
            .layer(axum::middleware::map_response(pages::headers))
            .layer(axum::extract::DefaultBodyLimit::max(pages::MAX_FORM_BYTES))
            .with_state(self.inner.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        for p in [
            "/",
            "/signin",
            "/runs",
            "/runs/abc",
            "/estop/new",
            "/ui/console.js",
            "/health",
        ] {
            assert!(Console::owns(p), "{p}");
        }
        for p in [
            "/v1/runs",
            "/healthz",
            "/readyz",
            "/metrics",
            "/runsx",
            "/nope",
            "/steward.v1.Steward/Submit",
        ] {
            assert!(!Console::owns(p), "{p}");
        }
    }
}
