//! Steward's API on one listener: gRPC `steward.v1` and `grpc.health.v1`, the same calls as
//! HTTP/JSON under `/v1`, `/healthz`, `/readyz` and `/metrics`. This crate is the only place
//! that converts between wire and domain types; it never sees SQL.

use std::sync::Arc;

use axum::http::StatusCode;
use engine::Engine;
use tokio_util::sync::CancellationToken;

pub mod alerts;
pub mod auth;
mod browser;
pub mod conn;
pub mod convert;
mod grpc;
pub mod http;
pub mod local;
mod metrics;
pub mod schedules;
pub mod service;
pub mod tls;

pub use service::{ApiError, Service};

/// Serves `router` on `listener` until `shutdown` fires, at most `limits` connections at once
/// (see [`conn`]). Sets TCP_NODELAY on every connection: without it a response written in two
/// segments waits ~40 ms for a delayed ACK.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
    limits: conn::Limits,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
        conn::keepalive(tcp);
    });
    conn::serve(listener, router, shutdown, limits).await
}

/// Serves `router` over TLS on `listener` until `shutdown` fires. The listener holds its
/// connections to their limit, handshakes in progress included (see
/// [`tls::TlsListener::new`]); `limits` gives the deadlines.
pub async fn serve_tls(
    listener: tls::TlsListener,
    router: axum::Router,
    shutdown: CancellationToken,
    limits: conn::Limits,
) -> std::io::Result<()> {
    let limits = conn::Limits {
        max_connections: tokio::sync::Semaphore::MAX_PERMITS,
        ..limits
    };
    conn::serve(listener, router, shutdown, limits).await
}

/// Serves `router` (an [`Api::local_router`]) on the break-glass socket until `shutdown`.
pub async fn serve_local(
    listener: local::LocalListener,
    router: axum::Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    conn::serve(listener, router, shutdown, conn::Limits::local()).await
}

/// How a router learns who calls.
#[derive(Clone)]
enum Gate {
    /// A bearer token, checked by the authenticator.
    Tokens(Arc<auth::Authenticator>),
    /// The break-glass socket: the kernel vouched for the caller's user.
    Local,
}

/// What a request says about its caller, taken off it before anything is awaited.
struct Knock {
    credential: Option<Vec<u8>>,
    peer: String,
    /// The common name of a verified client certificate.
    client_cert: Option<String>,
    local: Option<local::LocalPeer>,
}

impl Knock {
    fn of(req: &axum::extract::Request) -> Knock {
        Knock {
            credential: req
                .headers()
                .get(axum::http::header::AUTHORIZATION)
                .map(|v| v.as_bytes().to_vec()),
            peer: peer_of(req),
            client_cert: req
                .extensions()
                .get::<axum::extract::ConnectInfo<tls::Peer>>()
                .and_then(|c| c.0.client.clone()),
            local: req
                .extensions()
                .get::<axum::extract::ConnectInfo<local::LocalPeer>>()
                .map(|c| c.0),
        }
    }
}

impl Gate {
    async fn caller(&self, knock: Knock) -> Result<auth::Caller, ApiError> {
        match self {
            Gate::Tokens(auth) => {
                auth.authenticate(
                    knock.credential.as_deref(),
                    knock.client_cert.as_deref(),
                    knock.peer,
                )
                .await
            }
            Gate::Local => {
                let peer = knock.local.ok_or_else(|| {
                    ApiError::new(tonic::Code::Unauthenticated, "no peer credentials")
                })?;
                Ok(auth::Caller {
                    principal: domain::auth::Principal {
                        name: peer.name(),
                        role: domain::auth::Role::Admin,
                        scope: domain::auth::Scope::default(),
                    },
                    peer: peer.describe(),
                })
            }
        }
    }
}

/// The client's address, as the listener recorded it.
fn peer_of(req: &axum::extract::Request) -> String {
    use axum::extract::ConnectInfo;
    let ext = req.extensions();
    ext.get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0)
        .or_else(|| ext.get::<ConnectInfo<tls::Peer>>().map(|c| c.0.addr))
        .map_or_else(|| "-".to_owned(), |a| a.to_string())
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub service: Service,
    health: tonic_health::server::HealthReporter,
    started: Arc<std::time::Instant>,
    previous_stop: Option<Arc<domain::StopCause>>,
    /// Why the last reload of the policy file was refused, while it stays refused.
    policy_alert: Option<Arc<std::sync::Mutex<Option<String>>>>,
    /// How `shell` jobs' processes are kept together, for `/readyz`.
    job_containment: Option<Arc<str>>,
}

impl AppState {
    fn readiness(&self) -> (StatusCode, serde_json::Value) {
        let (code, mut body) = self.readiness_status();
        if let (Some(c), Some(obj)) = (&self.job_containment, body.as_object_mut()) {
            obj.insert("job_containment".into(), c.as_ref().into());
        }
        (code, body)
    }

    fn readiness_status(&self) -> (StatusCode, serde_json::Value) {
        if let Some(alert) = self.service.estop.as_ref().and_then(|h| h.alert()) {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "estop_unreadable", "reason": format!("nothing runs: {alert}")}),
            );
        }
        if let Some(problem) = self.service.engine.store_problem() {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "store_failing", "reason": format!("the store refuses writes: {problem}; nothing new starts, finished work is kept until it is recorded")}),
            );
        }
        if self.service.engine.is_accepting() {
            match self.policy_alert() {
                // The policies in force still apply: ready, with the problem shown.
                Some(alert) => (
                    StatusCode::OK,
                    serde_json::json!({"status": "ready", "policy_alert": alert}),
                ),
                None => (StatusCode::OK, serde_json::json!({"status": "ready"})),
            }
        } else {
            let cause = self
                .service
                .engine
                .shutdown_cause()
                .map(|c| c.to_string())
                .unwrap_or_default();
            (
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"status": "shutting_down", "reason": format!("steward is stopping ({cause}) and accepts no new work")}),
            )
        }
    }

    fn policy_alert(&self) -> Option<String> {
        self.policy_alert
            .as_ref()
            .and_then(|a| a.lock().ok().and_then(|g| g.clone()))
    }
}

/// Pages for people served on the API's listener: their router, and which paths are theirs.
type Pages = (axum::Router, fn(&str) -> bool);

/// The API, built and ready to be served.
pub struct Api {
    state: AppState,
    /// Pages for people (the console) on the same listener, and the paths they own.
    console: Option<Pages>,
}

impl Api {
    pub async fn new(
        engine: Engine,
        estop: Option<estop::EStopHandle>,
        auth: Arc<auth::Authenticator>,
        shutdown: CancellationToken,
    ) -> Api {
        let health = tonic_health::server::HealthReporter::new();
        health
            .set_serving::<proto::v1::steward_server::StewardServer<Service>>()
            .await;
        Api {
            state: AppState {
                service: Service {
                    engine,
                    estop,
                    shutdown,
                    auth,
                },
                health,
                started: Arc::new(std::time::Instant::now()),
                previous_stop: None,
                policy_alert: None,
                job_containment: None,
            },
            console: None,
        }
    }

    /// The calls both faces share, for what else is served on the listener (the console).
    pub fn service(&self) -> Service {
        self.state.service.clone()
    }

    /// Serves `router` for the paths `owns` accepts (never gRPC, `/v1/...`, health, readiness
    /// or metrics) on the token listener; it authenticates its callers itself.
    pub fn set_console(&mut self, router: axum::Router, owns: fn(&str) -> bool) {
        self.console = Some((router, owns));
    }

    /// Where to read the policy file's alert (for `/metrics` and `/readyz`).
    pub fn set_policy_alert(&mut self, alert: Arc<std::sync::Mutex<Option<String>>>) {
        self.state.policy_alert = Some(alert);
    }

    /// How `shell` jobs' processes are kept together (shown by `/readyz`).
    pub fn set_job_containment(&mut self, containment: String) {
        self.state.job_containment = Some(containment.into());
    }

    /// How the previous process stopped, for `/metrics`.
    pub fn set_previous_stop(&mut self, cause: Option<domain::StopCause>) {
        self.state.previous_stop = cause.map(Arc::new);
    }

    /// Marks the gRPC health service NOT_SERVING (`/readyz` follows the engine by itself).
    pub async fn set_not_serving(&self) {
        self.state
            .health
            .set_not_serving::<proto::v1::steward_server::StewardServer<Service>>()
            .await;
        self.state
            .health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
    }

    /// One router for everything: requests with a gRPC content type go to tonic, the rest to
    /// the HTTP routes, where an unknown path answers 404 with a JSON error (never the gRPC
    /// fallback's empty 200, which a script with a typo would take for success). Every request
    /// but health, readiness and metrics is authenticated first: its caller goes on the
    /// request, or it is refused (401 / UNAUTHENTICATED) before any handler sees it.
    pub fn router(&self) -> axum::Router {
        self.gated(
            Gate::Tokens(self.state.service.auth.clone()),
            self.console.clone(),
        )
    }

    /// The same API for the break-glass socket: no token; the caller is an admin named after
    /// the local user the kernel reports (see [`local`]).
    pub fn local_router(&self) -> axum::Router {
        self.gated(Gate::Local, None)
    }

    fn gated(&self, gate: Gate, console: Option<Pages>) -> axum::Router {
        let steward = proto::v1::steward_server::StewardServer::new(self.state.service.clone())
            .max_decoding_message_size(http::MAX_BODY_BYTES);
        let estop = proto::v1::e_stop_server::EStopServer::new(self.state.service.clone());
        let admin = proto::v1::admin_server::AdminServer::new(self.state.service.clone());
        let schedules =
            proto::v1::schedules_server::SchedulesServer::new(self.state.service.clone())
                .max_decoding_message_size(http::MAX_BODY_BYTES);
        let health = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(self.state.health.clone()),
        );
        let grpc = tonic::service::Routes::new(steward)
            .add_service(estop)
            .add_service(admin)
            .add_service(schedules)
            .add_service(health)
            .prepare()
            .into_axum_router();
        let http = http::router(self.state.clone());
        let loopback_only = matches!(&gate, Gate::Tokens(a) if a.mode() == auth::AuthMode::None);
        axum::Router::new().fallback_service(tower::service_fn(
            move |mut req: axum::extract::Request| {
                let grpc_call = is_grpc(&req);
                let page = match &console {
                    Some((pages, owns))
                        if !grpc_call
                            && !req.uri().path().starts_with("/v1/")
                            && owns(req.uri().path()) =>
                    {
                        Some(pages.clone())
                    }
                    _ => None,
                };
                // A console page checks its forms itself (and is navigated to from other
                // sites); everything else is the API. gRPC needs only the rebinding check (a
                // rebound page is the server's origin and may send any content type; a
                // cross-site one may not send `application/grpc` without the CORS permission
                // this server never gives): with tokens on, nothing to check.
                let refusal = if is_open(&req, grpc_call) || (grpc_call && !loopback_only) {
                    None
                } else {
                    browser::refusal(&req, page.is_none(), loopback_only)
                };
                let to = if grpc_call {
                    grpc.clone()
                } else {
                    http.clone()
                };
                let gate = gate.clone();
                async move {
                    if let Some(e) = refusal {
                        if let Gate::Tokens(a) = &gate {
                            // The path as far as the access log keeps it.
                            let path = req.uri().path();
                            let path = &path[..domain::limits::floor_char_boundary(path, 128)];
                            let call = format!("{} {path}", req.method());
                            a.log_refusal("-", &call, "", &peer_of(&req), &e.message);
                        }
                        if grpc_call {
                            return Ok(tonic::Status::from(e).into_http());
                        }
                        return Ok(axum::response::IntoResponse::into_response(e));
                    }
                    if let Some(pages) = page {
                        return tower::ServiceExt::oneshot(pages, req).await;
                    }
                    if !is_open(&req, grpc_call) {
                        match gate.caller(Knock::of(&req)).await {
                            Ok(caller) => {
                                req.extensions_mut().insert(caller);
                            }
                            Err(e) if grpc_call => {
                                return Ok(tonic::Status::from(e).into_http());
                            }
                            Err(e) => return Ok(axum::response::IntoResponse::into_response(e)),
                        }
                    }
                    tower::ServiceExt::oneshot(to, req).await
                }
            },
        ))
    }
}

/// Health, readiness and metrics answer without a token (probes and scrapers have none).
fn is_open(req: &axum::extract::Request, grpc: bool) -> bool {
    let path = req.uri().path();
    if grpc {
        path.starts_with("/grpc.health.v1.Health/")
    } else {
        matches!(path, "/healthz" | "/readyz" | "/metrics")
    }
}

/// gRPC is told apart by its content type (`application/grpc`, `application/grpc+proto`...).
fn is_grpc(req: &axum::extract::Request) -> bool {
    req.headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}
