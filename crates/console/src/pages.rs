//! The pages: each handler asks `api::Service` as the signed-in caller and renders a template.

use std::collections::BTreeMap;
use std::sync::Arc;

use api::ApiError;
use askama::Template;
use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use domain::auth::Call;
use domain::estop::{EStopState, Target};
use proto::v1 as pb;
use serde::Deserialize;

use crate::Inner;
use crate::session::Session;

/// A stop of `*`, or of a target matching more than this many active runs (running, paused,
/// queued), or more than could be counted, needs the target typed a second time.
pub(crate) const CONFIRM_ABOVE: u64 = 50;

/// Runs looked at for a blast radius (the rest are counted as "more").
const BLAST_SCAN: usize = 20_000;

/// Active runs whose lease the health page reads.
const LEASES_READ: usize = 100;

/// Runs per page of the run list.
const PAGE_SIZE: u32 = 50;

/// Renders templates as responses.
pub(crate) struct Html;

impl Html {
    pub(crate) fn render<T: Template>(t: &T) -> Response {
        match t.render() {
            Ok(body) => {
                ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response()
            }
            Err(e) => {
                tracing::error!(error = %e, "a console page failed to render");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "the page failed to render",
                )
                    .into_response()
            }
        }
    }
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    status: u16,
    message: &'a str,
}

/// The largest form the console takes: its forms hold a few short fields.
pub(crate) const MAX_FORM_BYTES: usize = 64 * 1024;

/// A submitted form. Axum refuses a form that is too large or does not parse with a line of
/// plain text; through this extractor the person who sent it gets a page that says what went
/// wrong, like every other refusal.
pub(crate) struct PageForm<T>(pub(crate) T);

impl<T, S> axum::extract::FromRequest<S> for PageForm<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Response> {
        let read =
            tokio::time::timeout(api::conn::BODY_TIMEOUT, Form::<T>::from_request(req, state));
        match read.await {
            Ok(Ok(Form(form))) => Ok(Self(form)),
            Err(_) => Err(page_error(
                StatusCode::REQUEST_TIMEOUT,
                &format!(
                    "The form did not arrive within {} s: send it again.",
                    api::conn::BODY_TIMEOUT.as_secs()
                ),
            )),
            Ok(Err(rejection)) => {
                let status = rejection.status();
                let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
                    format!(
                        "The form is larger than {} KiB; the console's forms are much smaller.",
                        MAX_FORM_BYTES / 1024
                    )
                } else {
                    format!("The form could not be read: {}", rejection.body_text())
                };
                Err(page_error(status, &message))
            }
        }
    }
}

/// A page that says what went wrong and how to go on.
pub(crate) fn page_error(status: StatusCode, message: &str) -> Response {
    let mut r = Html::render(&ErrorPage {
        status: status.as_u16(),
        message,
    });
    *r.status_mut() = status;
    r
}

fn api_error(e: &ApiError) -> Response {
    use tonic::Code;
    let status = match e.code {
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::FailedPrecondition | Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    page_error(status, &e.message)
}

/// Security headers on every answer: no framing, no inline script or style, nothing cached.
pub(crate) async fn headers(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

// ---- what every page shows ----

/// The e-stop banner: red for any `stop` entry (or an unreadable list), amber for `pause`.
pub(crate) struct Banner {
    /// `stop`, `pause` or empty.
    pub(crate) level: &'static str,
    pub(crate) text: String,
}

/// The frame around every page.
pub(crate) struct Chrome {
    pub(crate) user: String,
    pub(crate) role: String,
    pub(crate) csrf: String,
    /// May set `stop` or `pause`: the Emergency stop button is shown.
    pub(crate) can_stop: bool,
    /// An operator or admin: the policies and health pages are offered.
    pub(crate) operator: bool,
    pub(crate) banner: Banner,
    /// Which navigation entry is current.
    pub(crate) nav: &'static str,
    /// The page updates itself while it is open.
    pub(crate) live: bool,
    /// Where the page is, for a form to come back to.
    pub(crate) here: String,
    pub(crate) alerts: Vec<String>,
}

fn allowed(s: &Session, call: &Call) -> bool {
    s.caller.principal.check(call).is_ok()
}

fn banner(inner: &Inner) -> Banner {
    let Some(h) = &inner.service.estop else {
        return Banner {
            level: "",
            text: String::new(),
        };
    };
    match &*h.snapshot() {
        domain::estop::Snapshot::Unreadable(e) => Banner {
            level: "stop",
            text: format!("The e-stop list cannot be read, so nothing runs: {e}"),
        },
        domain::estop::Snapshot::Ok(list) => {
            let describe = |state: EStopState| {
                list.entries
                    .iter()
                    .filter(|e| e.state == state)
                    .map(|e| {
                        let mut s = format!("{}", e.target);
                        if !e.reason.is_empty() {
                            s.push_str(&format!(" ({})", e.reason));
                        }
                        if !e.set_by.is_empty() {
                            s.push_str(&format!(" by {}", e.set_by));
                        }
                        s
                    })
                    .collect::<Vec<_>>()
            };
            let stops = describe(EStopState::Stop);
            let pauses = describe(EStopState::Pause);
            if !stops.is_empty() {
                Banner {
                    level: "stop",
                    text: format!("STOPPED: {}", stops.join("; ")),
                }
            } else if !pauses.is_empty() {
                Banner {
                    level: "pause",
                    text: format!("PAUSED: {}", pauses.join("; ")),
                }
            } else {
                Banner {
                    level: "",
                    text: String::new(),
                }
            }
        }
    }
}

/// What needs a person's attention now.
fn alerts(inner: &Inner) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(a) = inner.service.estop.as_ref().and_then(|h| h.alert()) {
        out.push(format!("The e-stop list cannot be read: {a}"));
    }
    if let Some(a) = inner
        .settings
        .policy_alert
        .as_ref()
        .and_then(|a| a.lock().ok().and_then(|g| g.clone()))
    {
        out.push(format!(
            "A change to the policy file was refused (the policies loaded before stay in force): {a}"
        ));
    }
    if let Some(p) = inner.service.engine.store_problem() {
        out.push(format!(
            "The store refuses writes: {p}; nothing new starts until it takes them"
        ));
    }
    if !inner.service.engine.is_accepting() {
        out.push("This node is shutting down and accepts no new work.".to_owned());
    }
    out
}

fn chrome(inner: &Inner, s: &Session, nav: &'static str, live: bool, here: String) -> Chrome {
    Chrome {
        user: s.caller.name().to_owned(),
        role: s.caller.principal.role.to_string(),
        csrf: s.csrf.clone(),
        can_stop: allowed(
            s,
            &Call::EStopSet {
                state: EStopState::Stop,
            },
        ),
        operator: may_see_configuration(s),
        banner: banner(inner),
        nav,
        live,
        here,
        alerts: alerts(inner),
    }
}

/// `return_to` if it is one of the console's own pages, else the overview.
fn local_path(p: &str) -> String {
    let path = p.split('?').next().unwrap_or_default();
    let plain = p.bytes().all(|b| b.is_ascii_graphic());
    if plain
        && p.starts_with('/')
        && !p.starts_with("//")
        && !p.contains('\\')
        && crate::Console::owns(path)
    {
        p.to_owned()
    } else {
        "/".to_owned()
    }
}

fn labels_text(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every run in `states` (newest first), up to `max`; whether there were more.
async fn runs_in(
    inner: &Inner,
    s: &Session,
    states: &[&str],
    max: usize,
) -> Result<(Vec<pb::RunSummary>, bool), ApiError> {
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let page = inner
            .service
            .list(
                &s.caller,
                pb::ListRequest {
                    states: states.iter().map(|s| (*s).to_owned()).collect(),
                    page_size: 1000,
                    page_token: token,
                    ..Default::default()
                },
            )
            .await?;
        out.extend(page.runs);
        if out.len() > max || (out.len() == max && !page.next_page_token.is_empty()) {
            out.truncate(max);
            return Ok((out, true));
        }
        if page.next_page_token.is_empty() {
            return Ok((out, false));
        }
        token = page.next_page_token;
    }
}

fn verdict_state(inner: &Inner, name: &str, labels: &BTreeMap<String, String>) -> EStopState {
    inner
        .service
        .estop
        .as_ref()
        .map_or(EStopState::Go, |h| h.verdict(name, labels).state)
}

// ---- overview ----

/// Runs sharing a workflow or a label, and the e-stop state that holds them.
pub(crate) struct Group {
    pub(crate) key: String,
    pub(crate) running: u64,
    pub(crate) paused: u64,
    pub(crate) queued: u64,
    /// The most restrictive effective state among them.
    pub(crate) estop: &'static str,
    /// A target that selects the group, for the Emergency stop form.
    pub(crate) target: String,
}

#[derive(Template)]
#[template(path = "overview.html")]
struct Overview {
    chrome: Chrome,
    counts: Vec<(&'static str, u64)>,
    by_workflow: Vec<Group>,
    by_label: Vec<Group>,
    active: usize,
    truncated: bool,
}

fn group_into(
    groups: &mut BTreeMap<String, Group>,
    key: String,
    target: String,
    state: &str,
    estop: EStopState,
) {
    let g = groups.entry(key.clone()).or_insert_with(|| Group {
        key,
        running: 0,
        paused: 0,
        queued: 0,
        estop: "go",
        target,
    });
    match state {
        "running" => g.running += 1,
        "paused" => g.paused += 1,
        _ => g.queued += 1,
    }
    let worst = [g.estop.parse().unwrap_or(EStopState::Go), estop]
        .into_iter()
        .max()
        .unwrap_or(EStopState::Go);
    g.estop = worst.as_str();
}

pub(crate) async fn overview(State(inner): State<Arc<Inner>>, s: Session) -> Response {
    let counts = match inner.service.engine.count_by_state_recent().await {
        Ok(c) => c,
        Err(e) => return api_error(&ApiError::from(e)),
    };
    let mut all: Vec<(&'static str, u64)> = [
        "submitted",
        "queued",
        "running",
        "paused",
        "completed",
        "failed",
        "stopped",
        "cancelled",
        "expired",
    ]
    .into_iter()
    .map(|st| {
        let n = counts
            .iter()
            .find(|(c, _)| c.as_str() == st)
            .map_or(0, |(_, n)| *n);
        (st, n)
    })
    .collect();
    all.retain(|(st, n)| *n > 0 || matches!(*st, "queued" | "running" | "paused"));
    let (active, truncated) =
        match runs_in(&inner, &s, &["running", "paused", "queued"], 5_000).await {
            Ok(r) => r,
            Err(e) => return api_error(&e),
        };
    let mut by_workflow = BTreeMap::new();
    let mut by_label = BTreeMap::new();
    for r in &active {
        let labels: BTreeMap<String, String> = r.labels.clone().into_iter().collect();
        let v = verdict_state(&inner, &r.name, &labels);
        group_into(
            &mut by_workflow,
            r.name.clone(),
            r.name.clone(),
            &r.state,
            v,
        );
        for (k, val) in &labels {
            let pair = format!("{k}={val}");
            group_into(&mut by_label, pair.clone(), pair, &r.state, v);
        }
    }
    let sorted = |m: BTreeMap<String, Group>| {
        let mut v: Vec<Group> = m.into_values().collect();
        v.sort_by(|a, b| {
            (b.running + b.paused + b.queued)
                .cmp(&(a.running + a.paused + a.queued))
                .then(a.key.cmp(&b.key))
        });
        v.truncate(100);
        v
    };
    Html::render(&Overview {
        chrome: chrome(&inner, &s, "overview", true, "/".into()),
        counts: all,
        by_workflow: sorted(by_workflow),
        by_label: sorted(by_label),
        active: active.len(),
        truncated,
    })
}

// ---- runs ----

pub(crate) struct RunRow {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) labels: String,
    pub(crate) state: String,
    pub(crate) created: String,
    pub(crate) by: String,
}

#[derive(Template)]
#[template(path = "runs.html")]
struct Runs {
    chrome: Chrome,
    rows: Vec<RunRow>,
    states: &'static [&'static str],
    state: String,
    workflow: String,
    label: String,
    next: String,
    error: String,
}

#[derive(Deserialize, Default)]
pub(crate) struct RunsQuery {
    #[serde(default)]
    state: String,
    #[serde(default)]
    workflow: String,
    #[serde(default)]
    label: String,
    #[serde(default)]
    page: String,
}

const STATES: &[&str] = &[
    "submitted",
    "queued",
    "running",
    "paused",
    "completed",
    "failed",
    "stopped",
    "cancelled",
    "expired",
];

fn query_string(pairs: &[(&str, &str)]) -> String {
    let mut s = url::form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        if !v.is_empty() {
            s.append_pair(k, v);
        }
    }
    s.finish()
}

pub(crate) async fn runs(
    State(inner): State<Arc<Inner>>,
    s: Session,
    Query(q): Query<RunsQuery>,
) -> Response {
    let mut error = String::new();
    let mut labels = std::collections::HashMap::new();
    if !q.label.is_empty() {
        match q.label.split_once('=') {
            Some((k, v)) if !k.is_empty() => {
                labels.insert(k.trim().to_owned(), v.trim().to_owned());
            }
            _ => error = format!("Label {:?} is not KEY=VALUE.", q.label),
        }
    }
    let here = format!(
        "/runs?{}",
        query_string(&[
            ("state", &q.state),
            ("workflow", &q.workflow),
            ("label", &q.label),
            ("page", &q.page)
        ])
    );
    let mut rows = Vec::new();
    let mut next = String::new();
    if error.is_empty() {
        let req = pb::ListRequest {
            states: if q.state.is_empty() {
                Vec::new()
            } else {
                vec![q.state.clone()]
            },
            name: q.workflow.trim().to_owned(),
            labels,
            page_size: PAGE_SIZE,
            page_token: q.page.clone(),
            schedule: String::new(),
        };
        match inner.service.list(&s.caller, req).await {
            Ok(page) => {
                rows = page
                    .runs
                    .into_iter()
                    .map(|r| RunRow {
                        labels: labels_text(&r.labels.into_iter().collect()),
                        id: r.id,
                        name: r.name,
                        state: r.state,
                        created: r.created_at,
                        by: r.submitted_by,
                    })
                    .collect();
                if !page.next_page_token.is_empty() {
                    next = format!(
                        "/runs?{}",
                        query_string(&[
                            ("state", &q.state),
                            ("workflow", &q.workflow),
                            ("label", &q.label),
                            ("page", &page.next_page_token)
                        ])
                    );
                }
            }
            Err(e) => error = e.message,
        }
    }
    Html::render(&Runs {
        chrome: chrome(&inner, &s, "runs", true, here),
        rows,
        states: STATES,
        state: q.state,
        workflow: q.workflow,
        label: q.label,
        next,
        error,
    })
}

// ---- one run ----

pub(crate) struct JobView {
    pub(crate) index: u32,
    pub(crate) action: String,
    pub(crate) desc: String,
    pub(crate) state: String,
    pub(crate) attempts: u32,
    pub(crate) started: String,
    pub(crate) ended: String,
    pub(crate) exit_code: String,
    pub(crate) error: String,
    pub(crate) output: String,
}

pub(crate) struct BlockView {
    pub(crate) index: u32,
    pub(crate) desc: String,
    pub(crate) state: String,
    pub(crate) jobs: Vec<JobView>,
}

#[derive(Template)]
#[template(path = "run.html")]
struct RunPage {
    chrome: Chrome,
    run: pb::Run,
    labels: String,
    stop_cause: String,
    verdict: String,
    verdict_state: String,
    blocks: Vec<BlockView>,
    can_exec: bool,
    can_cancel: bool,
    can_clone: bool,
    done: String,
}

#[derive(Deserialize, Default)]
pub(crate) struct Flash {
    #[serde(default)]
    done: String,
}

fn flash(done: &str) -> String {
    match done {
        "exec" => "Execution requested.".into(),
        "cancel" => "Cancel requested.".into(),
        "clone" => "This run is a clone; it waits for Exec.".into(),
        "set" => "The e-stop entry is set.".into(),
        "clear" => "The e-stop entry is cleared.".into(),
        _ => String::new(),
    }
}

pub(crate) async fn run(
    State(inner): State<Arc<Inner>>,
    s: Session,
    Path(id): Path<String>,
    Query(f): Query<Flash>,
) -> Response {
    let run = match inner.service.status(&s.caller, &id).await {
        Ok(r) => r,
        Err(e) => return api_error(&e),
    };
    let terminal = matches!(
        run.state.as_str(),
        "completed" | "failed" | "stopped" | "cancelled" | "expired"
    );
    let own = run.submitted_by == s.caller.name();
    let blocks = run
        .blocks
        .iter()
        .map(|b| BlockView {
            index: b.index,
            desc: b.desc.clone(),
            state: b.state.clone(),
            jobs: b
                .jobs
                .iter()
                .map(|j| JobView {
                    index: j.index,
                    action: j.action.clone(),
                    desc: j.desc.clone(),
                    state: j.state.clone(),
                    attempts: j.attempts,
                    started: j.started_at.clone(),
                    ended: j.ended_at.clone(),
                    exit_code: j.exit_code.map(|c| c.to_string()).unwrap_or_default(),
                    error: j.error.clone(),
                    output: j.output.clone(),
                })
                .collect(),
        })
        .collect();
    let page = RunPage {
        chrome: chrome(&inner, &s, "runs", true, format!("/runs/{}", run.id)),
        labels: labels_text(&run.labels.clone().into_iter().collect()),
        stop_cause: run
            .stop_cause
            .as_ref()
            .map(|c| c.message.clone())
            .unwrap_or_default(),
        verdict: run
            .estop
            .as_ref()
            .map(|v| v.message.clone())
            .unwrap_or_default(),
        verdict_state: run
            .estop
            .as_ref()
            .map(|v| v.state.clone())
            .unwrap_or_default(),
        blocks,
        can_exec: run.state == "submitted" && allowed(&s, &Call::Exec),
        can_cancel: !terminal && allowed(&s, &Call::Cancel { own }),
        can_clone: allowed(&s, &Call::Clone),
        done: flash(&f.done),
        run,
    };
    Html::render(&page)
}

#[derive(Deserialize)]
pub(crate) struct ActionForm {
    #[serde(default)]
    csrf: String,
}

pub(crate) async fn run_action(
    State(inner): State<Arc<Inner>>,
    s: Session,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    PageForm(form): PageForm<ActionForm>,
) -> Response {
    if let Some(r) = s.refuse_form(&headers, &form.csrf) {
        return r;
    }
    let svc = &inner.service;
    let done = match action.as_str() {
        "exec" => svc.exec(&s.caller, &id).await.map(|_| id.clone()),
        "cancel" => svc
            .cancel(&s.caller, &id, "cancelled from the console")
            .await
            .map(|_| id.clone()),
        "clone" => svc.clone_run(&s.caller, &id).await.map(|r| r.id),
        _ => return not_found().await,
    };
    match done {
        Ok(target) => Redirect::to(&format!(
            "/runs/{}?done={action}",
            url::form_urlencoded::byte_serialize(target.as_bytes()).collect::<String>()
        ))
        .into_response(),
        Err(e) => api_error(&e),
    }
}

// ---- the e-stop ----

pub(crate) struct EntryView {
    pub(crate) target: String,
    pub(crate) state: String,
    pub(crate) reason: String,
    pub(crate) set_by: String,
    pub(crate) set_at: String,
}

#[derive(Template)]
#[template(path = "estop.html")]
struct EStopPage {
    chrome: Chrome,
    entries: Vec<EntryView>,
    source: String,
    unlisted: String,
    error: String,
    can_release: bool,
    can_clear: bool,
    done: String,
}

pub(crate) async fn estop(
    State(inner): State<Arc<Inner>>,
    s: Session,
    Query(f): Query<Flash>,
) -> Response {
    let list = match inner.service.estop_list(&s.caller) {
        Ok(l) => l,
        Err(e) => return api_error(&e),
    };
    Html::render(&EStopPage {
        chrome: chrome(&inner, &s, "estop", true, "/estop".into()),
        entries: list
            .entries
            .into_iter()
            .map(|e| EntryView {
                target: e.target,
                state: e.state,
                reason: e.reason,
                set_by: e.set_by,
                set_at: e.set_at,
            })
            .collect(),
        source: list.source,
        unlisted: list.unlisted,
        error: if list.readable {
            String::new()
        } else {
            list.error
        },
        can_release: allowed(
            &s,
            &Call::EStopSet {
                state: EStopState::Go,
            },
        ),
        can_clear: allowed(&s, &Call::EStopClear),
        done: flash(&f.done),
    })
}

#[derive(Template)]
#[template(path = "estop_new.html")]
struct EStopNew {
    chrome: Chrome,
    target: String,
    state: String,
    reason: String,
    states: Vec<&'static str>,
    suggestions: Vec<String>,
    return_to: String,
    error: String,
}

#[derive(Deserialize, Default)]
pub(crate) struct NewQuery {
    #[serde(default)]
    target: String,
    #[serde(default)]
    return_to: String,
}

/// The states `s` may set from the form: `stop` and `pause` for responders, `go` too for
/// operators.
fn settable(s: &Session) -> Vec<&'static str> {
    [EStopState::Stop, EStopState::Pause, EStopState::Go]
        .into_iter()
        .filter(|st| allowed(s, &Call::EStopSet { state: *st }))
        .map(EStopState::as_str)
        .collect()
}

/// Targets people are likely to mean: `*`, and the workflows and labels of recent runs.
async fn suggestions(inner: &Inner, s: &Session) -> Vec<String> {
    let mut out = std::collections::BTreeSet::new();
    if let Ok(page) = inner
        .service
        .list(
            &s.caller,
            pb::ListRequest {
                page_size: 200,
                ..Default::default()
            },
        )
        .await
    {
        for r in page.runs {
            for (k, v) in &r.labels {
                out.insert(format!("{k}={v}"));
            }
            out.insert(r.name);
        }
    }
    let mut v: Vec<String> = vec!["*".to_owned()];
    v.extend(out);
    v
}

async fn stop_form(
    inner: &Inner,
    s: &Session,
    target: String,
    state: String,
    reason: String,
    return_to: String,
    error: String,
) -> Response {
    let states = settable(s);
    if !states.contains(&"stop") && !states.contains(&"pause") {
        return page_error(
            StatusCode::FORBIDDEN,
            &format!(
                "Your token ({}, role {}) may not set e-stop entries.",
                s.caller.name(),
                s.caller.principal.role
            ),
        );
    }
    let suggestions = suggestions(inner, s).await;
    let mut r = Html::render(&EStopNew {
        chrome: chrome(inner, s, "estop", false, "/estop/new".into()),
        target,
        state,
        reason,
        states,
        suggestions,
        return_to: local_path(&return_to),
        error: error.clone(),
    });
    if !error.is_empty() {
        *r.status_mut() = StatusCode::BAD_REQUEST;
    }
    r
}

pub(crate) async fn estop_new(
    State(inner): State<Arc<Inner>>,
    s: Session,
    Query(q): Query<NewQuery>,
) -> Response {
    stop_form(
        &inner,
        &s,
        q.target,
        "stop".into(),
        String::new(),
        q.return_to,
        String::new(),
    )
    .await
}

#[derive(Deserialize)]
pub(crate) struct StopForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    target: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    return_to: String,
    #[serde(default)]
    confirm: Option<String>,
}

#[derive(Template)]
#[template(path = "estop_review.html")]
struct EStopReview {
    chrome: Chrome,
    target: String,
    state: String,
    reason: String,
    return_to: String,
    running: u64,
    paused: u64,
    queued: u64,
    workflows: Vec<(String, u64)>,
    more: bool,
    needs_confirm: bool,
    error: String,
}

/// The form's fields, checked: the target parsed, the state one the caller may set, a reason.
fn check_stop_form(s: &Session, f: &StopForm) -> Result<(Target, EStopState), String> {
    let target: Target = f
        .target
        .trim()
        .parse()
        .map_err(|e: String| format!("Target: {e}"))?;
    let state: EStopState = f.state.parse().map_err(|e: String| format!("State: {e}"))?;
    if !allowed(s, &Call::EStopSet { state }) {
        return Err(format!(
            "State: your role ({}) may not set {state}",
            s.caller.principal.role
        ));
    }
    if f.reason.trim().is_empty() {
        return Err(
            "Reason: say why (an incident, a ticket): it is recorded with the entry".into(),
        );
    }
    if f.reason.len() > domain::limits::MAX_REASON_LEN {
        return Err(format!(
            "Reason: at most {} bytes",
            domain::limits::MAX_REASON_LEN
        ));
    }
    Ok((target, state))
}

/// How many runs the target holds now: running, paused, queued, and their workflows.
async fn blast_radius(
    inner: &Inner,
    s: &Session,
    target: &Target,
) -> Result<(u64, u64, u64, Vec<(String, u64)>, bool), ApiError> {
    let (runs, more) = runs_in(inner, s, &["running", "paused", "queued"], BLAST_SCAN).await?;
    let (mut running, mut paused, mut queued) = (0, 0, 0);
    let mut workflows: BTreeMap<String, u64> = BTreeMap::new();
    for r in &runs {
        let labels: BTreeMap<String, String> = r.labels.clone().into_iter().collect();
        if !target.matches(&r.name, &labels) {
            continue;
        }
        match r.state.as_str() {
            "running" => running += 1,
            "paused" => paused += 1,
            _ => queued += 1,
        }
        *workflows.entry(r.name.clone()).or_default() += 1;
    }
    let mut w: Vec<(String, u64)> = workflows.into_iter().collect();
    w.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok((running, paused, queued, w, more))
}

/// Whether setting `state` on `target`, which matches `matched` unfinished runs (`more`: more
/// than could be counted), needs the target typed again: the review asks for it exactly when
/// the set will.
fn needs_confirm(target: &Target, state: EStopState, matched: u64, more: bool) -> bool {
    state != EStopState::Go && (matches!(target, Target::All) || matched > CONFIRM_ABOVE || more)
}

async fn review(inner: &Inner, s: &Session, f: StopForm, error: String) -> Response {
    let (target, state) = match check_stop_form(s, &f) {
        Ok(v) => v,
        Err(m) => {
            return stop_form(inner, s, f.target, f.state, f.reason, f.return_to, m).await;
        }
    };
    let (running, paused, queued, workflows, more) = match blast_radius(inner, s, &target).await {
        Ok(b) => b,
        Err(e) => return api_error(&e),
    };
    let needs_confirm = needs_confirm(&target, state, running + paused + queued, more);
    let mut r = Html::render(&EStopReview {
        chrome: chrome(inner, s, "estop", false, "/estop/review".into()),
        target: target.to_string(),
        state: state.to_string(),
        reason: f.reason,
        return_to: local_path(&f.return_to),
        running,
        paused,
        queued,
        workflows,
        more,
        needs_confirm,
        error: error.clone(),
    });
    if !error.is_empty() {
        *r.status_mut() = StatusCode::BAD_REQUEST;
    }
    r
}

pub(crate) async fn estop_review(
    State(inner): State<Arc<Inner>>,
    s: Session,
    headers: HeaderMap,
    PageForm(f): PageForm<StopForm>,
) -> Response {
    if let Some(r) = s.refuse_form(&headers, &f.csrf) {
        return r;
    }
    review(&inner, &s, f, String::new()).await
}

pub(crate) async fn estop_set(
    State(inner): State<Arc<Inner>>,
    s: Session,
    headers: HeaderMap,
    PageForm(f): PageForm<StopForm>,
) -> Response {
    if let Some(r) = s.refuse_form(&headers, &f.csrf) {
        return r;
    }
    let (target, state) = match check_stop_form(&s, &f) {
        Ok(v) => v,
        Err(m) => return stop_form(&inner, &s, f.target, f.state, f.reason, f.return_to, m).await,
    };
    // The confirmation is asked for again here, from the blast radius as it is now.
    if state != EStopState::Go {
        let (running, paused, queued, more) = match blast_radius(&inner, &s, &target).await {
            Ok(b) => (b.0, b.1, b.2, b.4),
            Err(e) => return api_error(&e),
        };
        if needs_confirm(&target, state, running + paused + queued, more)
            && f.confirm.as_deref().map(str::trim) != Some(target.to_string().as_str())
        {
            let error = format!(
                "Type the target ({target}) exactly in \"Type the target to confirm\" to stop this much."
            );
            return review(&inner, &s, f, error).await;
        }
    }
    let req = pb::EStopSetRequest {
        target: target.to_string(),
        state: state.to_string(),
        reason: f.reason.trim().to_owned(),
    };
    match inner.service.estop_set(&s.caller, req).await {
        Ok(_) => {
            let back = local_path(&f.return_to);
            let sep = if back.contains('?') { '&' } else { '?' };
            Redirect::to(&format!("{back}{sep}done=set")).into_response()
        }
        Err(e) => api_error(&e),
    }
}

#[derive(Deserialize)]
pub(crate) struct ClearForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    target: String,
    #[serde(default)]
    reason: String,
}

pub(crate) async fn estop_clear(
    State(inner): State<Arc<Inner>>,
    s: Session,
    headers: HeaderMap,
    PageForm(f): PageForm<ClearForm>,
) -> Response {
    if let Some(r) = s.refuse_form(&headers, &f.csrf) {
        return r;
    }
    if f.reason.trim().is_empty() {
        return page_error(
            StatusCode::BAD_REQUEST,
            "Reason: say why the entry goes: it is recorded.",
        );
    }
    let req = pb::EStopClearRequest {
        target: f.target,
        reason: f.reason.trim().to_owned(),
    };
    match inner.service.estop_clear(&s.caller, req).await {
        Ok(_) => Redirect::to("/estop?done=clear").into_response(),
        Err(e) => api_error(&e),
    }
}

// ---- audit, policies, health ----

pub(crate) struct AuditView {
    pub(crate) at: String,
    pub(crate) target: String,
    pub(crate) old: String,
    pub(crate) new: String,
    pub(crate) by: String,
    pub(crate) reason: String,
    pub(crate) source: String,
}

#[derive(Template)]
#[template(path = "audit.html")]
struct Audit {
    chrome: Chrome,
    records: Vec<AuditView>,
}

pub(crate) async fn audit(State(inner): State<Arc<Inner>>, s: Session) -> Response {
    let records = match inner
        .service
        .estop_audit(
            &s.caller,
            pb::EStopAuditRequest {
                target: String::new(),
                limit: 500,
            },
        )
        .await
    {
        Ok(r) => r.records,
        Err(e) => return api_error(&e),
    };
    Html::render(&Audit {
        chrome: chrome(&inner, &s, "audit", true, "/audit".into()),
        records: records
            .into_iter()
            .map(|r| AuditView {
                at: r.at,
                target: r.target,
                old: r.old_state,
                new: r.new_state,
                by: r.set_by,
                reason: r.reason,
                source: r.source,
            })
            .collect(),
    })
}

#[derive(Template)]
#[template(path = "policies.html")]
struct Policies {
    chrome: Chrome,
    origin: String,
    text: String,
    workflows: Vec<String>,
}

/// The configuration and the policy text are for those who run Steward: the API shows
/// neither, and a viewer's token should not read them here.
fn may_see_configuration(s: &Session) -> bool {
    matches!(
        s.caller.principal.role,
        domain::auth::Role::Operator | domain::auth::Role::Admin
    )
}

fn operators_only(s: &Session) -> Response {
    page_error(
        StatusCode::FORBIDDEN,
        &format!(
            "This page is for operators and admins; your token ({}) has role {}.",
            s.caller.name(),
            s.caller.principal.role
        ),
    )
}

pub(crate) async fn policies(State(inner): State<Arc<Inner>>, s: Session) -> Response {
    if !may_see_configuration(&s) {
        return operators_only(&s);
    }
    let set = inner
        .service
        .engine
        .options()
        .policies
        .as_ref()
        .map(|feed| feed.borrow().clone());
    let (origin, text, workflows) = match set {
        Some(p) => (
            p.origin().to_owned(),
            p.text().to_owned(),
            p.workflow_names().map(str::to_owned).collect(),
        ),
        None => (
            "none: every workflow is accepted".to_owned(),
            String::new(),
            Vec::new(),
        ),
    };
    Html::render(&Policies {
        chrome: chrome(&inner, &s, "policies", false, "/policies".into()),
        origin,
        text,
        workflows,
    })
}

#[derive(Template)]
#[template(path = "health.html")]
struct Health {
    chrome: Chrome,
    node_id: String,
    accepting: bool,
    estop_source: String,
    containment: String,
    config_text: String,
    leases: Vec<(String, u64)>,
}

pub(crate) async fn health(State(inner): State<Arc<Inner>>, s: Session) -> Response {
    if !may_see_configuration(&s) {
        return operators_only(&s);
    }
    let (active, _) = match runs_in(&inner, &s, &["running", "paused", "queued"], LEASES_READ).await
    {
        Ok(r) => r,
        Err(e) => return api_error(&e),
    };
    // Which node holds how many runs: a summary has no lease, so the newest active runs are
    // read one by one (bounded).
    let mut leases: BTreeMap<String, u64> = BTreeMap::new();
    for r in active.iter().take(LEASES_READ) {
        if let Ok(run) = inner.service.status(&s.caller, &r.id).await {
            let owner = if run.lease_owner.is_empty() {
                "(none yet)".to_owned()
            } else {
                run.lease_owner
            };
            *leases.entry(owner).or_default() += 1;
        }
    }
    Html::render(&Health {
        chrome: chrome(&inner, &s, "health", false, "/health".into()),
        node_id: inner.settings.node_id.clone(),
        accepting: inner.service.engine.is_accepting(),
        estop_source: inner
            .service
            .estop
            .as_ref()
            .map(|h| h.describe())
            .unwrap_or_default(),
        containment: inner.settings.job_containment.clone(),
        config_text: inner.settings.config_text.clone(),
        leases: leases.into_iter().collect(),
    })
}

// ---- static files, not found ----

pub(crate) async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("../static/console.js"),
    )
        .into_response()
}

pub(crate) async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("../static/console.css"),
    )
        .into_response()
}

pub(crate) async fn not_found() -> Response {
    page_error(StatusCode::NOT_FOUND, "There is no such page.")
}
