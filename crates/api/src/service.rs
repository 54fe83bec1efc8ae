//! The calls of the API, shared by gRPC and HTTP: wire in, wire out.

use std::pin::Pin;
use std::time::Duration;

use std::sync::Arc;

use domain::auth::Call;
use domain::estop::{EStopState, Target};
use domain::limits;
use domain::{RunId, RunState, WorkflowSpec};
use engine::{Engine, EngineError};
use futures::Stream;
use proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::auth::{Authenticator, Caller};
use crate::convert;

/// An API error: a gRPC code, a message, and for bad specs every field violation.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: tonic::Code,
    pub message: String,
    pub violations: Vec<pb::FieldViolation>,
}

impl ApiError {
    pub fn new(code: tonic::Code, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            violations: Vec::new(),
        }
    }

    pub fn invalid_spec(e: &domain::SpecError) -> ApiError {
        ApiError {
            code: tonic::Code::InvalidArgument,
            message: format!("invalid spec: {e}"),
            violations: convert::violations(e),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        use tonic::Code;
        match &e {
            EngineError::InvalidSpec(s) => ApiError::invalid_spec(s),
            EngineError::Policy(p) => ApiError {
                code: Code::InvalidArgument,
                message: e.to_string(),
                violations: p.0.iter().map(policy_violation).collect(),
            },
            EngineError::InvalidArgument(_) => ApiError::new(Code::InvalidArgument, e.to_string()),
            EngineError::NotFound(_)
            | EngineError::Pruned { .. }
            | EngineError::ScheduleNotFound(_) => ApiError::new(Code::NotFound, e.to_string()),
            EngineError::ScheduleExists(_) => ApiError::new(Code::AlreadyExists, e.to_string()),
            EngineError::AlreadyExists { .. } | EngineError::KeyReused { .. } => {
                ApiError::new(Code::AlreadyExists, e.to_string())
            }
            EngineError::FailedPrecondition(_) => {
                ApiError::new(Code::FailedPrecondition, e.to_string())
            }
            EngineError::Unavailable(_) => ApiError::new(Code::Unavailable, e.to_string()),
            EngineError::Internal(_) => {
                tracing::error!(error = %e, "internal error answering a request");
                ApiError::new(Code::Internal, e.to_string())
            }
        }
    }
}

impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> Self {
        tonic::Status::new(e.code, e.message)
    }
}

pub type RunStream = Pin<Box<dyn Stream<Item = Result<pb::Run, ApiError>> + Send>>;

/// A watcher whose last message waited longer than this to be read is dropped.
pub const WATCH_SLOW: Duration = Duration::from_secs(30);

/// What a watcher last sent, as fingerprints: the run's header, each block's own fields, each
/// job. A few bytes a job, whatever the run's output and errors.
struct Seen {
    header: u64,
    blocks: Vec<(u64, Vec<u64>)>,
}

fn fingerprint<M: prost::Message>(m: &M) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    m.encode_to_vec().hash(&mut h);
    h.finish()
}

fn header_of(run: &pb::Run) -> pb::Run {
    pb::Run {
        blocks: Vec::new(),
        spec: None,
        ..run.clone()
    }
}

fn block_header(b: &pb::BlockStatus) -> u64 {
    fingerprint(&pb::BlockStatus {
        jobs: Vec::new(),
        ..b.clone()
    })
}

impl Seen {
    fn of(run: &pb::Run) -> Seen {
        Seen {
            header: fingerprint(&header_of(run)),
            blocks: run
                .blocks
                .iter()
                .map(|b| (block_header(b), b.jobs.iter().map(fingerprint).collect()))
                .collect(),
        }
    }

    /// `run` as a `partial` message of what changed since the last one, if anything did.
    fn delta(&mut self, run: pb::Run) -> Option<pb::Run> {
        let mut header = header_of(&run);
        let h = fingerprint(&header);
        let mut blocks = Vec::new();
        for (bi, mut b) in run.blocks.into_iter().enumerate() {
            if self.blocks.len() <= bi {
                self.blocks.push((0, Vec::new()));
            }
            let (seen_header, seen_jobs) = &mut self.blocks[bi];
            let bh = block_header(&b);
            let mut jobs = Vec::new();
            for (ji, j) in b.jobs.into_iter().enumerate() {
                let f = fingerprint(&j);
                if seen_jobs.get(ji) != Some(&f) {
                    if seen_jobs.len() <= ji {
                        seen_jobs.resize(ji + 1, 0);
                    }
                    seen_jobs[ji] = f;
                    jobs.push(j);
                }
            }
            if bh != *seen_header || !jobs.is_empty() {
                *seen_header = bh;
                b.jobs = jobs;
                blocks.push(b);
            }
        }
        if h == self.header && blocks.is_empty() {
            return None;
        }
        self.header = h;
        header.blocks = blocks;
        header.partial = true;
        Some(header)
    }
}

/// The API's view of the engine.
#[derive(Clone)]
pub struct Service {
    pub engine: Engine,
    /// The e-stop list; `None` when the server runs without one (tests, embedding).
    pub estop: Option<estop::EStopHandle>,
    /// Fired at shutdown: ends Watch streams so the listener can close.
    pub shutdown: CancellationToken,
    /// Checks tokens; keeps the access log.
    pub auth: Arc<Authenticator>,
}

fn policy_violation(v: &policy::Violation) -> pb::FieldViolation {
    pb::FieldViolation {
        field: v.path.clone(),
        description: format!("policy {}: {}", v.policy, v.message),
    }
}

fn parse_target(t: &str) -> Result<domain::estop::Target, ApiError> {
    t.parse()
        .map_err(|e: String| ApiError::new(tonic::Code::InvalidArgument, format!("target: {e}")))
}

fn source_err(e: estop::SourceError) -> ApiError {
    use estop::SourceError as S;
    let code = match &e {
        S::InvalidArgument(_) => tonic::Code::InvalidArgument,
        S::Missing { .. } | S::Malformed { .. } => tonic::Code::FailedPrecondition,
        S::AuditNotRecorded { .. }
        | S::Read { .. }
        | S::Write { .. }
        | S::Store { .. }
        | S::Etcd { .. }
        | S::Timeout { .. } => tonic::Code::Unavailable,
    };
    ApiError::new(code, e.to_string())
}

fn invalid(message: String) -> ApiError {
    ApiError::new(tonic::Code::InvalidArgument, message)
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    domain::limits::check_len(field, value, max).map_err(invalid)
}

/// A token as `req` asks for it, checked field by field (its hash is filled in later).
pub fn new_token(
    req: &pb::CreateTokenRequest,
    by: &str,
    now: domain::Timestamp,
) -> Result<store::TokenRecord, ApiError> {
    let name = req.name.trim();
    if name.is_empty() {
        return Err(invalid("name: required".into()));
    }
    check_len("name", name, limits::MAX_ACTOR_LEN)?;
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@'))
    {
        return Err(invalid(format!(
            "name: {} holds a character other than letters, digits, '_', '-', '.' and '@'",
            limits::clip(name)
        )));
    }
    let role = req
        .role
        .parse::<domain::auth::Role>()
        .map_err(|e| invalid(format!("role: {e}")))?;
    if req.scopes.len() > 32 {
        return Err(invalid(format!(
            "scopes: {} given; the limit is 32",
            req.scopes.len()
        )));
    }
    let mut scope = domain::auth::Scope::default();
    for (i, sc) in req.scopes.iter().enumerate() {
        scope
            .add(sc)
            .map_err(|e| invalid(format!("scopes[{i}]: {e}")))?;
    }
    let expires_at = match req.expires_in.trim() {
        "" => None,
        text => {
            check_len("expires_in", text, 64)?;
            let d = humantime::parse_duration(text).map_err(|_| {
                invalid(format!(
                    "expires_in: {} is not a duration such as 30d or 12h",
                    limits::clip(text)
                ))
            })?;
            if d.is_zero() {
                return Err(invalid("expires_in: must be greater than 0".into()));
            }
            Some(now.plus(d))
        }
    };
    Ok(store::TokenRecord {
        name: name.to_owned(),
        hash: String::new(),
        role,
        scope,
        created_by: by.to_owned(),
        created_at: now,
        expires_at,
        last_used_at: None,
    })
}

pub fn parse_id(id: &str) -> Result<RunId, ApiError> {
    check_len("id", id, limits::MAX_RUN_ID_LEN)?;
    id.parse().map_err(|e: domain::ids::ParseRunIdError| {
        ApiError::new(tonic::Code::InvalidArgument, format!("id: {e}"))
    })
}

impl Service {
    pub fn wire_spec(spec: Option<pb::WorkReq>) -> Result<WorkflowSpec, ApiError> {
        let spec = spec.ok_or_else(|| {
            ApiError::invalid_spec(&domain::SpecError(vec![domain::FieldError::new(
                "spec", "required",
            )]))
        })?;
        convert::spec_from_wire(spec).map_err(|e| ApiError::invalid_spec(&e))
    }

    /// Refuses `call` unless the caller's role allows it, logging the refusal.
    pub fn authorize(&self, caller: &Caller, call: &Call, target: &str) -> Result<(), ApiError> {
        caller.principal.check(call).map_err(|why| {
            self.auth
                .log_refusal(caller.name(), &call.to_string(), target, &caller.peer, &why);
            ApiError::new(tonic::Code::PermissionDenied, why)
        })
    }

    /// Refuses `call` on something outside the caller's scope, logging the refusal.
    fn check_scope(
        &self,
        caller: &Caller,
        call: &Call,
        target: &str,
        covered: bool,
    ) -> Result<(), ApiError> {
        if covered {
            return Ok(());
        }
        let why = format!(
            "token {:?} is scoped to {}, which does not cover {target}",
            caller.name(),
            caller.principal.scope
        );
        self.auth
            .log_refusal(caller.name(), &call.to_string(), target, &caller.peer, &why);
        Err(ApiError::new(tonic::Code::PermissionDenied, why))
    }

    /// Refuses a caller who may not release (a responder) an entry that would make `target`
    /// less restrictive than it is: `pause` over a `stop` releases part of it, since queued
    /// runs then wait instead of being refused. When the list cannot be read, whether it would
    /// is unknown, and only `stop`, which weakens nothing, is allowed.
    fn check_not_weakened(
        &self,
        caller: &Caller,
        call: &Call,
        h: &estop::EStopHandle,
        target: &Target,
        state: EStopState,
    ) -> Result<(), ApiError> {
        if state == EStopState::Stop
            || caller.principal.role.allows(&Call::EStopSet {
                state: EStopState::Go,
            })
        {
            return Ok(());
        }
        let why = match &*h.snapshot() {
            domain::estop::Snapshot::Ok(list) => match list.get(target) {
                Some(e) if e.state > state => format!(
                    "{target} is set to {}; setting {state} would release part of it, which \
                     only an operator or admin may do (role {})",
                    e.state, caller.principal.role
                ),
                Some(_) => return Ok(()),
                None => match list.unlisted_for(target, h.unlisted()) {
                    Some(unlisted) if unlisted > state => format!(
                        "{target} has no entry and no `*` entry covers it, so its runs get \
                         estop_unlisted ({unlisted}); setting {state} would release part of \
                         that, which only an operator or admin may do (role {})",
                        caller.principal.role
                    ),
                    _ => return Ok(()),
                },
            },
            domain::estop::Snapshot::Unreadable(_) => format!(
                "the e-stop list cannot be read, so whether {state} would weaken the entry of \
                 {target} is unknown; set stop, or ask an operator (role {})",
                caller.principal.role
            ),
        };
        self.auth.log_refusal(
            caller.name(),
            &call.to_string(),
            &target.to_string(),
            &caller.peer,
            &why,
        );
        Err(ApiError::new(tonic::Code::PermissionDenied, why))
    }

    /// Checks that the caller may make `call` on run `id`, reading the run only when its
    /// scope or its ownership matters.
    async fn authorize_on_run(
        &self,
        caller: &Caller,
        call: &Call,
        id: RunId,
    ) -> Result<(), ApiError> {
        let target = id.to_string();
        self.authorize(caller, call, &target)?;
        if !caller.principal.scope.is_unlimited() {
            let run = self.engine.status(id).await?;
            self.check_scope(
                caller,
                call,
                &format!("run {id} ({})", run.spec.name),
                caller
                    .principal
                    .scope
                    .covers_run(&run.spec.name, &run.spec.labels),
            )?;
        }
        Ok(())
    }

    /// Submit; with `start`, Submit and Exec in one write (see `SubmitRequest.start`).
    pub async fn submit(
        &self,
        caller: &Caller,
        spec: WorkflowSpec,
        start: bool,
    ) -> Result<pb::SubmitResponse, ApiError> {
        self.authorize(caller, &Call::Submit, &spec.name)?;
        self.check_scope(
            caller,
            &Call::Submit,
            &format!("workflow {:?}", spec.name),
            caller.principal.scope.covers_run(&spec.name, &spec.labels),
        )?;
        let (s, state) = if start {
            // Starting is Exec's right too.
            self.authorize(caller, &Call::Exec, &spec.name)?;
            self.engine.submit_started_as(spec, caller.name()).await?
        } else {
            self.engine.submit_as(spec, caller.name()).await?
        };
        let detail = match (s.created, start) {
            (true, false) => "",
            (true, true) => "started",
            (false, _) => "existing run",
        };
        self.auth
            .log_allowed(caller, "Submit", &s.id.to_string(), detail);
        Ok(pb::SubmitResponse {
            id: s.id.to_string(),
            created: s.created,
            state: state.to_string(),
        })
    }

    pub async fn exec(&self, caller: &Caller, id: &str) -> Result<pb::ExecResponse, ApiError> {
        let id = parse_id(id)?;
        self.authorize_on_run(caller, &Call::Exec, id).await?;
        self.engine.exec(id).await?;
        self.auth.log_allowed(caller, "Exec", &id.to_string(), "");
        Ok(pb::ExecResponse {
            id: id.to_string(),
            state: RunState::Queued.to_string(),
        })
    }

    pub async fn status(&self, caller: &Caller, id: &str) -> Result<pb::Run, ApiError> {
        let id = parse_id(id)?;
        self.authorize(caller, &Call::Status, &id.to_string())?;
        let run = self.engine.status(id).await?;
        Ok(self.run_to_wire(&run))
    }

    /// A run on the wire, with its effective e-stop state now.
    fn run_to_wire(&self, run: &domain::Run) -> pb::Run {
        let mut wire = convert::run_to_wire(run);
        wire.estop = Some(convert::verdict_to_wire(&self.engine.verdict(&run.spec)));
        wire
    }

    fn estop(&self) -> Result<&estop::EStopHandle, ApiError> {
        self.estop.as_ref().ok_or_else(|| {
            ApiError::new(
                tonic::Code::Unimplemented,
                "this server has no e-stop source configured",
            )
        })
    }

    pub fn estop_list(&self, caller: &Caller) -> Result<pb::EStopListResponse, ApiError> {
        self.authorize(caller, &Call::EStopList, "")?;
        let h = self.estop()?;
        let snap = h.snapshot();
        let (entries, readable, error) = match snap.as_ref() {
            domain::estop::Snapshot::Ok(l) => (
                l.entries.iter().map(convert::entry_to_wire).collect(),
                true,
                String::new(),
            ),
            domain::estop::Snapshot::Unreadable(e) => (Vec::new(), false, e.clone()),
        };
        Ok(pb::EStopListResponse {
            entries,
            readable,
            error,
            source: h.describe(),
            unlisted: h.unlisted().to_string(),
        })
    }

    pub async fn estop_set(
        &self,
        caller: &Caller,
        req: pb::EStopSetRequest,
    ) -> Result<pb::AuditRecord, ApiError> {
        self.estop_set_from(caller, req, estop::API_SOURCE).await
    }

    /// [`Service::estop_set`], recorded as coming from `source` (`alertmanager`).
    pub(crate) async fn estop_set_from(
        &self,
        caller: &Caller,
        req: pb::EStopSetRequest,
        source: &str,
    ) -> Result<pb::AuditRecord, ApiError> {
        let h = self.estop()?;
        check_len("reason", &req.reason, limits::MAX_REASON_LEN)?;
        let target = parse_target(&req.target)?;
        let state = req
            .state
            .parse::<domain::estop::EStopState>()
            .map_err(|e| ApiError::new(tonic::Code::InvalidArgument, format!("state: {e}")))?;
        let call = Call::EStopSet { state };
        self.authorize(caller, &call, &target.to_string())?;
        self.check_scope(
            caller,
            &call,
            &format!("target {target}"),
            caller.principal.scope.covers_target(&target),
        )?;
        self.check_not_weakened(caller, &call, h, &target, state)?;
        let rec = h
            .set_from(target, state, req.reason, caller.name().to_owned(), source)
            .await
            .map_err(source_err)?;
        self.auth.log_allowed(
            caller,
            &call.to_string(),
            &rec.target.to_string(),
            &rec.reason,
        );
        tracing::warn!(target = %rec.target, new_state = ?rec.new_state, set_by = %rec.set_by, reason = %rec.reason, "e-stop changed");
        Ok(convert::audit_to_wire(&rec))
    }

    pub async fn estop_clear(
        &self,
        caller: &Caller,
        req: pb::EStopClearRequest,
    ) -> Result<pb::EStopClearResponse, ApiError> {
        let h = self.estop()?;
        check_len("reason", &req.reason, limits::MAX_REASON_LEN)?;
        let target = parse_target(&req.target)?;
        self.authorize(caller, &Call::EStopClear, &target.to_string())?;
        self.check_scope(
            caller,
            &Call::EStopClear,
            &format!("target {target}"),
            caller.principal.scope.covers_target(&target),
        )?;
        let shown = target.to_string();
        let rec = h
            .clear(target, caller.name().to_owned(), req.reason.clone())
            .await
            .map_err(source_err)?;
        self.auth
            .log_allowed(caller, "EStopClear", &shown, &req.reason);
        Ok(pb::EStopClearResponse {
            cleared: rec.is_some(),
            record: rec.as_ref().map(convert::audit_to_wire),
        })
    }

    pub async fn estop_audit(
        &self,
        caller: &Caller,
        req: pb::EStopAuditRequest,
    ) -> Result<pb::EStopAuditResponse, ApiError> {
        self.authorize(caller, &Call::EStopAudit, "")?;
        let h = self.estop()?;
        let target = if req.target.is_empty() {
            None
        } else {
            Some(parse_target(&req.target)?)
        };
        if req.limit > 1000 {
            return Err(ApiError::new(
                tonic::Code::InvalidArgument,
                format!("limit: {} is over the limit of 1000", req.limit),
            ));
        }
        let records = h.audit(target, req.limit).await.map_err(source_err)?;
        Ok(pb::EStopAuditResponse {
            records: records.iter().map(convert::audit_to_wire).collect(),
        })
    }

    pub async fn list(
        &self,
        caller: &Caller,
        req: pb::ListRequest,
    ) -> Result<pb::ListResponse, ApiError> {
        self.authorize(caller, &Call::List, "")?;
        check_len("name", &req.name, domain::spec::MAX_NAME_LEN)?;
        check_len("page_token", &req.page_token, limits::MAX_RUN_ID_LEN)?;
        check_len("schedule", &req.schedule, domain::spec::MAX_NAME_LEN)?;
        if req.labels.len() > domain::spec::MAX_LABELS {
            return Err(invalid(format!(
                "labels: {} selectors; the limit is {}",
                req.labels.len(),
                domain::spec::MAX_LABELS
            )));
        }
        for (k, v) in &req.labels {
            check_len("labels: a key", k, domain::spec::MAX_LABEL_KEY_LEN)?;
            check_len("labels: a value", v, domain::spec::MAX_LABEL_VALUE_LEN)?;
        }
        if req.states.len() > 16 {
            return Err(invalid(format!(
                "states: {} given; there are only 9 run states",
                req.states.len()
            )));
        }
        let mut states = Vec::with_capacity(req.states.len());
        for s in &req.states {
            states.push(s.parse::<RunState>().map_err(|e| {
                ApiError::new(tonic::Code::InvalidArgument, format!("states: {e}"))
            })?);
        }
        let filter = store::RunFilter {
            states,
            name: (!req.name.is_empty()).then_some(req.name),
            labels: req.labels.into_iter().collect(),
            page_size: req.page_size,
            page_token: (!req.page_token.is_empty()).then_some(req.page_token),
            schedule: (!req.schedule.is_empty()).then_some(req.schedule),
        };
        let page = self.engine.list(&filter).await?;
        Ok(pb::ListResponse {
            runs: page.runs.iter().map(convert::summary_to_wire).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        })
    }

    pub async fn cancel(
        &self,
        caller: &Caller,
        id: &str,
        reason: &str,
    ) -> Result<pb::CancelResponse, ApiError> {
        let id = parse_id(id)?;
        check_len("reason", reason, limits::MAX_REASON_LEN)?;
        let any = Call::Cancel { own: false };
        if caller.principal.role.allows(&any) {
            self.authorize_on_run(caller, &any, id).await?;
        } else {
            // Whose run it is decides: read it.
            let run = self.engine.status(id).await?;
            let call = Call::Cancel {
                own: !run.submitted_by.is_empty() && run.submitted_by == caller.name(),
            };
            self.authorize_on_run(caller, &call, id).await?;
        }
        let state = self.engine.cancel(id, caller.name(), reason).await?;
        self.auth
            .log_allowed(caller, "Cancel", &id.to_string(), reason);
        Ok(pb::CancelResponse {
            id: id.to_string(),
            state: state.to_string(),
        })
    }

    pub async fn clone_run(
        &self,
        caller: &Caller,
        id: &str,
    ) -> Result<pb::SubmitResponse, ApiError> {
        let id = parse_id(id)?;
        self.authorize_on_run(caller, &Call::Clone, id).await?;
        let new = self.engine.clone_run(id, caller.name()).await?;
        self.auth
            .log_allowed(caller, "Clone", &new.to_string(), &format!("clone of {id}"));
        Ok(pb::SubmitResponse {
            id: new.to_string(),
            created: true,
            state: RunState::Submitted.to_string(),
        })
    }

    /// Submit's checks without storing anything: the spec's problems and every policy's verdict.
    pub fn validate(
        &self,
        caller: &Caller,
        spec: Result<WorkflowSpec, ApiError>,
    ) -> Result<pb::ValidateResponse, ApiError> {
        self.authorize(caller, &Call::Validate, "")?;
        Ok(self.validated(spec))
    }

    fn validated(&self, spec: Result<WorkflowSpec, ApiError>) -> pb::ValidateResponse {
        let spec = match spec {
            Ok(s) => s,
            Err(e) => {
                return pb::ValidateResponse {
                    valid: false,
                    violations: if e.violations.is_empty() {
                        vec![pb::FieldViolation {
                            field: "spec".into(),
                            description: e.message,
                        }]
                    } else {
                        e.violations
                    },
                    policies: Vec::new(),
                };
            }
        };
        let (checked, verdicts) = self.engine.validate(&spec);
        let mut violations = match &checked {
            Ok(()) => Vec::new(),
            Err(e) => convert::violations(e),
        };
        let mut policies = Vec::new();
        for v in verdicts.iter().flat_map(|v| v.iter()) {
            let vs: Vec<pb::FieldViolation> = v.violations.iter().map(policy_violation).collect();
            violations.extend(vs.iter().cloned());
            policies.push(pb::PolicyVerdict {
                policy: v.policy.to_string(),
                passed: v.passed(),
                violations: vs,
            });
        }
        pb::ValidateResponse {
            valid: violations.is_empty(),
            violations,
            policies,
        }
    }

    pub async fn create_token(
        &self,
        caller: &Caller,
        req: pb::CreateTokenRequest,
    ) -> Result<pb::CreateTokenResponse, ApiError> {
        self.authorize(caller, &Call::Tokens, &req.name)?;
        let token = new_token(&req, caller.name(), self.auth.now())?;
        let (secret, hash) = crate::auth::new_secret()?;
        let token = store::TokenRecord { hash, ..token };
        self.auth
            .store()
            .token_create(token.clone())
            .await
            .map_err(|e| match e {
                store::Error::Conflict(m) => ApiError::new(tonic::Code::AlreadyExists, m),
                other => ApiError::new(tonic::Code::Unavailable, other.to_string()),
            })?;
        self.auth.forget();
        self.auth
            .log_allowed(caller, "CreateToken", &token.name, token.role.as_str());
        Ok(pb::CreateTokenResponse {
            token: Some(convert::token_to_wire(&token)),
            secret,
        })
    }

    pub async fn list_tokens(&self, caller: &Caller) -> Result<pb::ListTokensResponse, ApiError> {
        self.authorize(caller, &Call::Tokens, "")?;
        let tokens = self
            .auth
            .store()
            .token_list()
            .await
            .map_err(|e| ApiError::new(tonic::Code::Unavailable, e.to_string()))?;
        Ok(pb::ListTokensResponse {
            tokens: tokens.iter().map(convert::token_to_wire).collect(),
        })
    }

    pub async fn revoke_token(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<pb::RevokeTokenResponse, ApiError> {
        check_len("name", name, limits::MAX_ACTOR_LEN)?;
        self.authorize(caller, &Call::Tokens, name)?;
        let revoked = self
            .auth
            .store()
            .token_revoke(name)
            .await
            .map_err(|e| ApiError::new(tonic::Code::Unavailable, e.to_string()))?;
        self.auth.forget();
        self.auth.log_allowed(
            caller,
            "RevokeToken",
            name,
            if revoked { "" } else { "no such token" },
        );
        Ok(pb::RevokeTokenResponse { revoked })
    }

    pub async fn access_log(
        &self,
        caller: &Caller,
        req: pb::AccessLogRequest,
    ) -> Result<pb::AccessLogResponse, ApiError> {
        self.authorize(caller, &Call::AccessLog, "")?;
        if req.limit > store::MAX_PAGE_SIZE {
            return Err(invalid(format!(
                "limit: {} is over the limit of {}",
                req.limit,
                store::MAX_PAGE_SIZE
            )));
        }
        let records = self
            .auth
            .store()
            .access_list(req.limit)
            .await
            .map_err(|e| ApiError::new(tonic::Code::Unavailable, e.to_string()))?;
        Ok(pb::AccessLogResponse {
            records: records.iter().map(convert::access_to_wire).collect(),
        })
    }

    /// The run now, then on every change until it is terminal (or the server stops).
    /// Deletes finished runs by hand (admin): what retention does on its own.
    pub async fn prune(
        &self,
        caller: &Caller,
        req: pb::PruneRequest,
    ) -> Result<pb::PruneResponse, ApiError> {
        self.authorize(caller, &Call::Prune, "")?;
        let text = req.before.trim();
        let before = if text.len() == 10 {
            crate::schedules::parse_time("before", &format!("{text}T00:00:00Z"))?
        } else {
            crate::schedules::parse_time("before", text)?
        };
        let workflow = match req.workflow.trim() {
            "" => None,
            w => {
                check_len("workflow", w, domain::spec::MAX_NAME_LEN)?;
                Some(w.to_owned())
            }
        };
        let runs = self
            .engine
            .prune_runs(before, workflow.clone(), req.dry_run)
            .await?;
        if !req.dry_run {
            self.auth.log_allowed(
                caller,
                "Prune",
                workflow.as_deref().unwrap_or("*"),
                &format!("{runs} runs that ended before {before}"),
            );
        }
        Ok(pb::PruneResponse {
            runs,
            dry_run: req.dry_run,
        })
    }

    pub async fn watch(&self, caller: &Caller, id: &str) -> Result<RunStream, ApiError> {
        let id = parse_id(id)?;
        self.authorize(caller, &Call::Watch, &id.to_string())?;
        // Subscribe before reading: a change that lands between the two is then both in the
        // first read and in the feed, never in neither.
        let rx = self.engine.subscribe();
        fail::fail_point!("api::watch_subscribed");
        let first = self.engine.status(id).await?;
        struct State {
            svc: Service,
            id: RunId,
            rx: tokio::sync::broadcast::Receiver<engine::RunEvent>,
            seen: Seen,
            pending_first: Option<pb::Run>,
            /// When the last message was handed over: a long wait before the next poll means
            /// the client is not reading.
            handed: Option<std::time::Instant>,
            done: bool,
        }
        let first = self.run_to_wire(&first);
        let state = State {
            svc: self.clone(),
            id,
            rx,
            seen: Seen::of(&first),
            pending_first: Some(first),
            handed: None,
            done: false,
        };
        let stream = futures::stream::unfold(state, |mut st| async move {
            if st.done {
                return None;
            }
            if let Some(first) = st.pending_first.take() {
                st.done = first
                    .state
                    .parse::<RunState>()
                    .is_ok_and(|s| s.is_terminal());
                st.handed = Some(std::time::Instant::now());
                return Some((Ok(first), st));
            }
            if st.handed.is_some_and(|t| t.elapsed() > WATCH_SLOW) {
                st.done = true;
                let e = ApiError::new(
                    tonic::Code::ResourceExhausted,
                    format!(
                        "this watch read too slowly (a message waited more than {}s to be read) and was dropped; watch again",
                        WATCH_SLOW.as_secs()
                    ),
                );
                return Some((Err(e), st));
            }
            loop {
                // Wake on a change to this run, or poll now and then (changes made by other nodes).
                tokio::select! {
                    ev = st.rx.recv() => match ev {
                        Ok(e) if e.id != st.id => continue,
                        Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    },
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = st.svc.shutdown.cancelled() => return None,
                }
                let run = match st.svc.engine.status(st.id).await {
                    Ok(r) => st.svc.run_to_wire(&r),
                    Err(e) => {
                        st.done = true;
                        return Some((Err(ApiError::from(e)), st));
                    }
                };
                let Some(delta) = st.seen.delta(run) else {
                    continue;
                };
                st.done = delta
                    .state
                    .parse::<RunState>()
                    .is_ok_and(|s| s.is_terminal());
                st.handed = Some(std::time::Instant::now());
                return Some((Ok(delta), st));
            }
        });
        Ok(Box::pin(stream))
    }
}
