//! The HTTP/JSON face of the API: the same calls and messages as gRPC (proto3 JSON mapping).

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::Json;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use domain::WorkflowSpec;
use futures::StreamExt;
use proto::v1 as pb;
use serde::Deserialize;

use crate::AppState;
use crate::auth::Caller;
use crate::service::{ApiError, Service};

/// Room for the largest spec (`domain::spec::MAX_SPEC_BYTES`) and its envelope.
pub const MAX_BODY_BYTES: usize = domain::spec::MAX_SPEC_BYTES + 1024 * 1024;

pub fn http_status(code: tonic::Code) -> StatusCode {
    use tonic::Code;
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => StatusCode::CONFLICT,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// `{"code": "NOT_FOUND", "message": "...", "violations": [...]}`
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = format!("{:?}", self.code);
        let code = screaming_snake(&code);
        let body = serde_json::json!({
            "code": code,
            "message": self.message,
            "violations": self.violations,
        });
        (http_status(self.code), Json(body)).into_response()
    }
}

fn screaming_snake(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// A spec from a request body: `{"spec": WorkReq}` (the SubmitRequest message), or a
/// workflow file as is (YAML or JSON, the schema of docs/workflows.md).
fn spec_from_body(body: &str) -> Result<WorkflowSpec, ApiError> {
    submit_from_body(body).map(|(spec, _)| spec)
}

/// The spec of a Submit body, and whether a `SubmitRequest` envelope asks to start it.
fn submit_from_body(body: &str) -> Result<(WorkflowSpec, bool), ApiError> {
    // Depth before any parser sees the text (a `{"spec": ...}` envelope is a level).
    domain::limits::check_depth(body, domain::limits::MAX_SPEC_DEPTH).map_err(|e| {
        ApiError::invalid_spec(&domain::SpecError(vec![domain::FieldError::new("spec", e)]))
    })?;
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(body)
        && m.contains_key("spec")
    {
        let req: pb::SubmitRequest = serde_json::from_str(body)
            .map_err(|e| ApiError::new(tonic::Code::InvalidArgument, format!("body: {e}")))?;
        return Ok((Service::wire_spec(req.spec)?, req.start));
    }
    let spec = WorkflowSpec::parse_unchecked(body).map_err(|e| ApiError::invalid_spec(&e))?;
    Ok((spec, false))
}

/// A schedule from a request body: `{"spec": ScheduleSpec}` (the ScheduleRequest message), or
/// a schedule file as is (YAML or JSON, the schema of docs/schedules.md).
fn schedule_from_body(body: &str) -> Result<domain::schedule::ScheduleSpec, domain::SpecError> {
    let one = |m: String| domain::SpecError(vec![domain::FieldError::new("schedule", m)]);
    domain::limits::check_depth(body, domain::limits::MAX_SPEC_DEPTH).map_err(one)?;
    if let Ok(serde_json::Value::Object(m)) = serde_json::from_str::<serde_json::Value>(body)
        && m.contains_key("spec")
    {
        let req: pb::ScheduleRequest =
            serde_json::from_str(body).map_err(|e| one(format!("body: {e}")))?;
        return crate::convert::schedule_from_wire(req.spec);
    }
    domain::schedule::ScheduleSpec::parse(body)
}

async fn prune(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Text(body): Text,
) -> Result<Json<pb::PruneResponse>, ApiError> {
    let req: pb::PruneRequest = serde_json::from_str(&body)
        .map_err(|e| ApiError::new(tonic::Code::InvalidArgument, format!("body: {e}")))?;
    st.service.prune(&who, req).await.map(Json)
}

async fn schedule_create(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Text(body): Text,
) -> Result<Json<pb::Schedule>, ApiError> {
    let spec = schedule_from_body(&body);
    st.service
        .schedule_create(&who, spec, false)
        .await
        .map(Json)
}

async fn schedule_update(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Path(name): Path<String>,
    Text(body): Text,
) -> Result<Json<pb::Schedule>, ApiError> {
    let spec = schedule_from_body(&body).and_then(|s| {
        if s.schedule == name {
            Ok(s)
        } else {
            Err(domain::SpecError(vec![domain::FieldError::new(
                "schedule",
                format!(
                    "{:?} does not match the path's {:?}",
                    domain::limits::clip(&s.schedule),
                    domain::limits::clip(&name)
                ),
            )]))
        }
    });
    st.service.schedule_create(&who, spec, true).await.map(Json)
}

async fn schedule_list(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
) -> Result<Json<pb::ScheduleListResponse>, ApiError> {
    st.service.schedule_list(&who).await.map(Json)
}

async fn schedule_get(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<pb::Schedule>, ApiError> {
    st.service.schedule_get(&who, &name).await.map(Json)
}

async fn schedule_delete(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<pb::ScheduleDeleteResponse>, ApiError> {
    st.service.schedule_delete(&who, &name).await.map(Json)
}

async fn schedule_pause(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Path(name): Path<String>,
    Text(body): Text,
) -> Result<Json<pb::Schedule>, ApiError> {
    let body: CancelBody = if body.trim().is_empty() {
        CancelBody::default()
    } else {
        serde_json::from_str(&body)
            .map_err(|e| ApiError::new(tonic::Code::InvalidArgument, format!("body: {e}")))?
    };
    st.service
        .schedule_pause(&who, &name, &body.reason)
        .await
        .map(Json)
}

async fn schedule_resume(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<pb::Schedule>, ApiError> {
    st.service.schedule_resume(&who, &name).await.map(Json)
}

async fn schedule_trigger(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<pb::SubmitResponse>, ApiError> {
    st.service.schedule_trigger(&who, &name).await.map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackfillBody {
    from: String,
    to: String,
}

async fn schedule_backfill(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Path(name): Path<String>,
    Text(body): Text,
) -> Result<Json<pb::ScheduleBackfillResponse>, ApiError> {
    let body: BackfillBody = serde_json::from_str(&body)
        .map_err(|e| ApiError::new(tonic::Code::InvalidArgument, format!("body: {e}")))?;
    st.service
        .schedule_backfill(
            &who,
            pb::ScheduleBackfillRequest {
                name,
                from: body.from,
                to: body.to,
            },
        )
        .await
        .map(Json)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SubmitQuery {
    /// `true`: Submit and Exec in one write (needs the spec's idempotency key).
    #[serde(default)]
    start: bool,
}

/// `POST /v1/runs` with the spec as the body; `?start=true` also starts it.
async fn submit(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    query: Result<Query<SubmitQuery>, axum::extract::rejection::QueryRejection>,
    Text(body): Text,
) -> Result<Json<pb::SubmitResponse>, ApiError> {
    let Query(q) = query.map_err(query_error)?;
    let (spec, start) = submit_from_body(&body)?;
    st.service
        .submit(&who, spec, q.start || start)
        .await
        .map(Json)
}

async fn validate(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Text(body): Text,
) -> Result<Json<pb::ValidateResponse>, ApiError> {
    st.service.validate(&who, spec_from_body(&body)).map(Json)
}

async fn exec(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<pb::ExecResponse>, ApiError> {
    st.service.exec(&who, &id).await.map(Json)
}

async fn status(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<pb::Run>, ApiError> {
    st.service.status(&who, &id).await.map(Json)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// Comma-separated states.
    state: Option<String>,
    name: Option<String>,
    /// Comma-separated `key=value` pairs.
    label: Option<String>,
    page_size: Option<u32>,
    page_token: Option<String>,
    schedule: Option<String>,
}

async fn list(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<pb::ListResponse>, ApiError> {
    let Query(q) = query.map_err(query_error)?;
    let mut labels = BTreeMap::new();
    for pair in q
        .label
        .iter()
        .flat_map(|l| l.split(','))
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').ok_or_else(|| {
            ApiError::new(
                tonic::Code::InvalidArgument,
                format!(
                    "label: {} is not of the form key=value",
                    domain::limits::clip(pair)
                ),
            )
        })?;
        labels.insert(k.to_owned(), v.to_owned());
    }
    let req = pb::ListRequest {
        states: q
            .state
            .iter()
            .flat_map(|s| s.split(','))
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        name: q.name.unwrap_or_default(),
        labels: labels.into_iter().collect(),
        page_size: q.page_size.unwrap_or(0),
        page_token: q.page_token.unwrap_or_default(),
        schedule: q.schedule.unwrap_or_default(),
    };
    st.service.list(&who, req).await.map(Json)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CancelBody {
    #[serde(default)]
    reason: String,
}

async fn cancel(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Path(id): Path<String>,
    Text(body): Text,
) -> Result<Json<pb::CancelResponse>, ApiError> {
    let body: CancelBody = if body.trim().is_empty() {
        CancelBody::default()
    } else {
        serde_json::from_str(&body)
            .map_err(|e| ApiError::new(tonic::Code::InvalidArgument, format!("body: {e}")))?
    };
    st.service.cancel(&who, &id, &body.reason).await.map(Json)
}

async fn clone_run(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<pb::SubmitResponse>, ApiError> {
    st.service.clone_run(&who, &id).await.map(Json)
}

/// Server-sent events: one `run` event per change, the last when the run is terminal.
async fn watch(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let stream = st.service.watch(&who, &id).await?;
    let events = stream.map(|r| {
        let ev = match r {
            Ok(run) => Event::default().event("run").json_data(run),
            Err(e) => Event::default()
                .event("error")
                .json_data(serde_json::json!({"message": e.message})),
        };
        Ok::<_, Infallible>(ev.unwrap_or_else(|_| Event::default().event("error")))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn estop_list(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
) -> Result<Json<pb::EStopListResponse>, ApiError> {
    st.service.estop_list(&who).map(Json)
}

fn json_body<T: serde::de::DeserializeOwned + Default>(body: &str) -> Result<T, ApiError> {
    if body.trim().is_empty() {
        return Ok(T::default());
    }
    serde_json::from_str(body)
        .map_err(|e| ApiError::new(tonic::Code::InvalidArgument, format!("body: {e}")))
}

/// `POST /v1/estop` with `{"target": "site=aap", "state": "stop", "reason": "INC-42"}`.
async fn estop_set(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Text(body): Text,
) -> Result<Json<pb::AuditRecord>, ApiError> {
    let req: pb::EStopSetRequest = json_body(&body)?;
    st.service.estop_set(&who, req).await.map(Json)
}

/// `POST /v1/estop/clear` with `{"target": "site=aap", "reason": "..."}`.
async fn estop_clear(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Text(body): Text,
) -> Result<Json<pb::EStopClearResponse>, ApiError> {
    let req: pb::EStopClearRequest = json_body(&body)?;
    st.service.estop_clear(&who, req).await.map(Json)
}

/// `?target=&limit=`: an empty value is the same as none.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    target: Option<String>,
    limit: Option<String>,
}

async fn estop_audit(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<pb::EStopAuditResponse>, ApiError> {
    let Query(q) = query.map_err(query_error)?;
    let limit = match q.limit.as_deref().map(str::trim) {
        None | Some("") => 0,
        Some(l) => l.parse().map_err(|_| {
            ApiError::new(
                tonic::Code::InvalidArgument,
                format!("limit: {} is not a whole number", domain::limits::clip(l)),
            )
        })?,
    };
    let req = pb::EStopAuditRequest {
        target: q.target.unwrap_or_default(),
        limit,
    };
    st.service.estop_audit(&who, req).await.map(Json)
}

/// `POST /v1/tokens` with `{"name": "ci", "role": "submitter", "scopes": ["workflow=deploy"],
/// "expires_in": "30d"}`.
async fn create_token(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Text(body): Text,
) -> Result<Json<pb::CreateTokenResponse>, ApiError> {
    let req: pb::CreateTokenRequest = json_body(&body)?;
    st.service.create_token(&who, req).await.map(Json)
}

async fn list_tokens(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
) -> Result<Json<pb::ListTokensResponse>, ApiError> {
    st.service.list_tokens(&who).await.map(Json)
}

async fn revoke_token(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<pb::RevokeTokenResponse>, ApiError> {
    st.service.revoke_token(&who, &name).await.map(Json)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct AccessQuery {
    limit: Option<u32>,
}

async fn access_log(
    State(st): State<AppState>,
    Extension(who): Extension<Caller>,
    query: Result<Query<AccessQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<pb::AccessLogResponse>, ApiError> {
    let Query(q) = query.map_err(query_error)?;
    let req = pb::AccessLogRequest {
        limit: q.limit.unwrap_or(0),
    };
    st.service.access_log(&who, req).await.map(Json)
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(st): State<AppState>) -> Response {
    let (code, body) = st.readiness();
    (code, Json(body)).into_response()
}

async fn metrics(State(st): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::render(&st).await,
    )
        .into_response()
}

/// Any path no route serves: a clear 404, naming the path (cut to a bounded length).
async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        tonic::Code::NotFound,
        format!(
            "no such path: {}; the API's paths are under /v1 (see docs/api.md)",
            domain::limits::clip(uri.path())
        ),
    )
}

/// A request's body as text. Axum refuses a body over [`MAX_BODY_BYTES`], or one that is not
/// UTF-8, with a line of plain text; through this extractor such a body gets the API's error
/// body, as every other refusal does. A body that takes longer than
/// [`BODY_TIMEOUT`](crate::conn::BODY_TIMEOUT) to arrive is refused with 408.
pub(crate) struct Text(pub(crate) String);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Text {
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        use axum::extract::rejection::StringRejection;
        let read =
            tokio::time::timeout(crate::conn::BODY_TIMEOUT, String::from_request(req, state));
        let rejection = match read.await {
            Ok(Ok(text)) => return Ok(Self(text)),
            Ok(Err(rejection)) => rejection,
            Err(_) => {
                let mut r = ApiError::new(
                    tonic::Code::InvalidArgument,
                    format!(
                        "the request body did not arrive within {} s",
                        crate::conn::BODY_TIMEOUT.as_secs()
                    ),
                )
                .into_response();
                *r.status_mut() = StatusCode::REQUEST_TIMEOUT;
                return Err(r);
            }
        };
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!(
                "the request body is larger than the limit of {} MiB",
                MAX_BODY_BYTES / (1024 * 1024)
            )
        } else if matches!(rejection, StringRejection::InvalidUtf8(_)) {
            "the request body is not UTF-8 text".to_owned()
        } else {
            format!(
                "the request body could not be read: {}",
                rejection.body_text()
            )
        };
        let mut r = ApiError::new(tonic::Code::InvalidArgument, message).into_response();
        *r.status_mut() = status;
        Err(r)
    }
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let mut r = ApiError::new(
        tonic::Code::InvalidArgument,
        format!(
            "{method} is not served at {}",
            domain::limits::clip(uri.path())
        ),
    )
    .into_response();
    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    r
}

pub fn router(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/v1/runs", post(submit).get(list))
        .route("/v1/runs/{id}", get(status))
        .route("/v1/runs/{id}/exec", post(exec))
        .route("/v1/runs/{id}/cancel", post(cancel))
        .route("/v1/runs/{id}/clone", post(clone_run))
        .route("/v1/runs/{id}/watch", get(watch))
        .route("/v1/validate", post(validate))
        .route("/v1/schedules", post(schedule_create).get(schedule_list))
        .route(
            "/v1/schedules/{name}",
            get(schedule_get)
                .put(schedule_update)
                .delete(schedule_delete),
        )
        .route("/v1/schedules/{name}/pause", post(schedule_pause))
        .route("/v1/schedules/{name}/resume", post(schedule_resume))
        .route("/v1/schedules/{name}/trigger", post(schedule_trigger))
        .route("/v1/schedules/{name}/backfill", post(schedule_backfill))
        .route("/v1/estop", get(estop_list).post(estop_set))
        .route("/v1/estop/clear", post(estop_clear))
        .route("/v1/estop/audit", get(estop_audit))
        .route("/v1/alerts/alertmanager", post(crate::alerts::alertmanager))
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/tokens/{name}", axum::routing::delete(revoke_token))
        .route("/v1/access", get(access_log))
        .route("/v1/prune", post(prune))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// A query string that does not parse: axum's reason, whose words quote what the client sent
/// (a parameter's name, its value). Each word is kept to [`MAX_ECHO_LEN`] bytes, so that the
/// reason stays whole and the echo short.
///
/// [`MAX_ECHO_LEN`]: domain::limits::MAX_ECHO_LEN
fn query_error(e: axum::extract::rejection::QueryRejection) -> ApiError {
    use domain::limits::{MAX_ECHO_LEN, floor_char_boundary};
    let text = e.body_text();
    let mut out = String::with_capacity(text.len().min(MAX_REJECTION_LEN + 4));
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let end = floor_char_boundary(word, MAX_ECHO_LEN);
        out.push_str(&word[..end]);
        if end < word.len() {
            out.push('…');
        }
    }
    // Many short words can still repeat much of the query.
    if out.len() > MAX_REJECTION_LEN {
        out.truncate(floor_char_boundary(&out, MAX_REJECTION_LEN));
        out.push('…');
    }
    ApiError::new(tonic::Code::InvalidArgument, out)
}

/// The most of a framework's reason for refusing a query that an error repeats.
const MAX_REJECTION_LEN: usize = 512;

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that never finishes arriving is refused with 408 once `BODY_TIMEOUT` has passed.
    #[tokio::test(start_paused = true)]
    async fn a_body_that_never_arrives_is_refused_in_time() {
        use axum::extract::FromRequest as _;
        let never = futures::stream::pending::<Result<axum::body::Bytes, std::io::Error>>();
        let req = axum::http::Request::post("/v1/runs")
            .body(axum::body::Body::from_stream(never))
            .unwrap();
        let started = tokio::time::Instant::now();
        let Err(refused) = Text::from_request(req, &()).await else {
            panic!("a body that never came was read");
        };
        assert_eq!(refused.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(started.elapsed(), crate::conn::BODY_TIMEOUT);
    }
}
