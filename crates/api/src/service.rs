//! The calls of the API, shared by gRPC and HTTP: wire in, wire out.

use std::pin::Pin;
use std::time::Duration;

use domain::limits;
use domain::{RunId, RunState, WorkflowSpec};
use engine::{Engine, EngineError};
use futures::Stream;
use proto::v1 as pb;
use tokio_util::sync::CancellationToken;

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
            EngineError::NotFound(_) => ApiError::new(Code::NotFound, e.to_string()),
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

/// The API's view of the engine.
#[derive(Clone)]
pub struct Service {
    pub engine: Engine,
    /// The e-stop list; `None` when the server runs without one (tests, embedding).
    pub estop: Option<estop::EStopHandle>,
    /// Fired at shutdown: ends Watch streams so the listener can close.
    pub shutdown: CancellationToken,
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
        S::AuditNotRecorded { .. } | S::Read { .. } | S::Write { .. } | S::Store { .. } => {
            tonic::Code::Unavailable
        }
    };
    ApiError::new(code, e.to_string())
}

fn invalid(message: String) -> ApiError {
    ApiError::new(tonic::Code::InvalidArgument, message)
}

fn check_len(field: &str, value: &str, max: usize) -> Result<(), ApiError> {
    domain::limits::check_len(field, value, max).map_err(invalid)
}

/// The actor a client names (`x-steward-actor`): `anonymous` when absent, refused when too
/// long or holding control characters (it is written to the audit trail and the log).
pub fn actor(header: Option<&str>) -> Result<String, ApiError> {
    let Some(a) = header.map(str::trim).filter(|a| !a.is_empty()) else {
        return Ok("anonymous".to_owned());
    };
    check_len("x-steward-actor", a, limits::MAX_ACTOR_LEN)?;
    if a.chars().any(char::is_control) {
        return Err(invalid(
            "x-steward-actor: must not hold control characters".into(),
        ));
    }
    Ok(a.to_owned())
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

    pub async fn submit(&self, spec: WorkflowSpec) -> Result<pb::SubmitResponse, ApiError> {
        let s = self.engine.submit(spec).await?;
        Ok(pb::SubmitResponse {
            id: s.id.to_string(),
            created: s.created,
        })
    }

    pub async fn exec(&self, id: &str) -> Result<pb::ExecResponse, ApiError> {
        let id = parse_id(id)?;
        self.engine.exec(id).await?;
        Ok(pb::ExecResponse {
            id: id.to_string(),
            state: RunState::Queued.to_string(),
        })
    }

    pub async fn status(&self, id: &str) -> Result<pb::Run, ApiError> {
        let run = self.engine.status(parse_id(id)?).await?;
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

    pub fn estop_list(&self) -> Result<pb::EStopListResponse, ApiError> {
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
        req: pb::EStopSetRequest,
        actor: &str,
    ) -> Result<pb::AuditRecord, ApiError> {
        let h = self.estop()?;
        check_len("reason", &req.reason, limits::MAX_REASON_LEN)?;
        let target = parse_target(&req.target)?;
        let state = req
            .state
            .parse::<domain::estop::EStopState>()
            .map_err(|e| ApiError::new(tonic::Code::InvalidArgument, format!("state: {e}")))?;
        let rec = h
            .set(target, state, req.reason, actor.to_owned())
            .await
            .map_err(source_err)?;
        tracing::warn!(target = %rec.target, new_state = ?rec.new_state, set_by = %rec.set_by, reason = %rec.reason, "e-stop changed");
        Ok(convert::audit_to_wire(&rec))
    }

    pub async fn estop_clear(
        &self,
        req: pb::EStopClearRequest,
        actor: &str,
    ) -> Result<pb::EStopClearResponse, ApiError> {
        let h = self.estop()?;
        check_len("reason", &req.reason, limits::MAX_REASON_LEN)?;
        let target = parse_target(&req.target)?;
        let rec = h
            .clear(target, actor.to_owned(), req.reason)
            .await
            .map_err(source_err)?;
        Ok(pb::EStopClearResponse {
            cleared: rec.is_some(),
            record: rec.as_ref().map(convert::audit_to_wire),
        })
    }

    pub async fn estop_audit(
        &self,
        req: pb::EStopAuditRequest,
    ) -> Result<pb::EStopAuditResponse, ApiError> {
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

    pub async fn list(&self, req: pb::ListRequest) -> Result<pb::ListResponse, ApiError> {
        check_len("name", &req.name, domain::spec::MAX_NAME_LEN)?;
        check_len("page_token", &req.page_token, limits::MAX_RUN_ID_LEN)?;
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
        };
        let page = self.engine.list(&filter).await?;
        Ok(pb::ListResponse {
            runs: page.runs.iter().map(convert::summary_to_wire).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        })
    }

    pub async fn cancel(
        &self,
        id: &str,
        reason: &str,
        actor: &str,
    ) -> Result<pb::CancelResponse, ApiError> {
        let id = parse_id(id)?;
        check_len("reason", reason, limits::MAX_REASON_LEN)?;
        let state = self.engine.cancel(id, actor, reason).await?;
        Ok(pb::CancelResponse {
            id: id.to_string(),
            state: state.to_string(),
        })
    }

    pub async fn clone_run(&self, id: &str) -> Result<pb::SubmitResponse, ApiError> {
        let new = self.engine.clone_run(parse_id(id)?).await?;
        Ok(pb::SubmitResponse {
            id: new.to_string(),
            created: true,
        })
    }

    /// Submit's checks without storing anything: the spec's problems and every policy's verdict.
    pub fn validate(&self, spec: Result<WorkflowSpec, ApiError>) -> pb::ValidateResponse {
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

    /// The run now, then on every change until it is terminal (or the server stops).
    pub async fn watch(&self, id: &str) -> Result<RunStream, ApiError> {
        let id = parse_id(id)?;
        // Subscribe before reading: a change that lands between the two is then both in the
        // first read and in the feed, never in neither.
        let rx = self.engine.subscribe();
        fail::fail_point!("api::watch_subscribed");
        let first = self.engine.status(id).await?;
        struct State {
            svc: Service,
            id: RunId,
            rx: tokio::sync::broadcast::Receiver<engine::RunEvent>,
            last: Option<pb::Run>,
            pending_first: Option<pb::Run>,
            done: bool,
        }
        let state = State {
            svc: self.clone(),
            id,
            rx,
            last: None,
            pending_first: Some(self.run_to_wire(&first)),
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
                st.last = Some(first.clone());
                return Some((Ok(first), st));
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
                if st.last.as_ref() == Some(&run) {
                    continue;
                }
                st.done = run.state.parse::<RunState>().is_ok_and(|s| s.is_terminal());
                st.last = Some(run.clone());
                return Some((Ok(run), st));
            }
        });
        Ok(Box::pin(stream))
    }
}
