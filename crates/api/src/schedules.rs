//! The schedule calls (docs/schedules.md), shared by gRPC and HTTP. Each checks the caller's
//! role, then its scope against the schedule's workflow, before it acts.

use domain::Timestamp;
use domain::auth::Call;
use domain::limits;
use domain::schedule::ScheduleSpec;
use proto::v1 as pb;

use crate::auth::Caller;
use crate::convert;
use crate::service::{ApiError, Service};

fn invalid(message: String) -> ApiError {
    ApiError::new(tonic::Code::InvalidArgument, message)
}

fn check_name(name: &str) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(invalid("name: required".into()));
    }
    limits::check_len("name", name, domain::spec::MAX_NAME_LEN).map_err(invalid)
}

pub(crate) fn parse_time(field: &str, text: &str) -> Result<Timestamp, ApiError> {
    limits::check_len(field, text, 64).map_err(invalid)?;
    Timestamp::parse_rfc3339(text).ok_or_else(|| {
        invalid(format!(
            "{field}: {} is not an RFC 3339 time such as 2026-11-30T02:30:00Z",
            limits::clip(text)
        ))
    })
}

impl Service {
    /// Refuses a call on a schedule whose workflow the caller's scope does not cover.
    fn authorize_schedule(
        &self,
        caller: &Caller,
        call: &Call,
        spec: &ScheduleSpec,
    ) -> Result<(), ApiError> {
        let target = format!("schedule {}", spec.schedule);
        self.authorize(caller, call, &target)?;
        if caller
            .principal
            .scope
            .covers_run(&spec.workflow.name, &spec.workflow.labels)
        {
            return Ok(());
        }
        let why = format!(
            "token {:?} is scoped to {}, which does not cover {target} (workflow {})",
            caller.name(),
            caller.principal.scope,
            spec.workflow.name
        );
        self.auth.log_refusal(
            caller.name(),
            &call.to_string(),
            &target,
            &caller.peer,
            &why,
        );
        Err(ApiError::new(tonic::Code::PermissionDenied, why))
    }

    /// The stored schedule `name`, once the caller may make `call` on it.
    async fn schedule_for(
        &self,
        caller: &Caller,
        call: &Call,
        name: &str,
    ) -> Result<engine::ScheduleView, ApiError> {
        check_name(name)?;
        self.authorize(caller, call, &format!("schedule {name}"))?;
        let view = self.engine.schedule_get(name).await?;
        self.authorize_schedule(caller, call, &view.record.spec)?;
        Ok(view)
    }

    pub async fn schedule_create(
        &self,
        caller: &Caller,
        spec: Result<ScheduleSpec, domain::SpecError>,
        update: bool,
    ) -> Result<pb::Schedule, ApiError> {
        self.authorize(caller, &Call::ScheduleWrite, "")?;
        let spec = spec.map_err(|e| ApiError::invalid_spec(&e))?;
        self.authorize_schedule(caller, &Call::ScheduleWrite, &spec)?;
        let name = spec.schedule.clone();
        let view = if update {
            // The stored one must be in the caller's scope too.
            self.schedule_for(caller, &Call::ScheduleWrite, &name)
                .await?;
            self.engine.schedule_update(spec, caller.name()).await?
        } else {
            self.engine.schedule_create(spec, caller.name()).await?
        };
        let call = if update {
            "ScheduleUpdate"
        } else {
            "ScheduleCreate"
        };
        self.auth
            .log_allowed(caller, call, &format!("schedule {name}"), "");
        Ok(convert::schedule_to_wire(&view))
    }

    pub async fn schedule_get(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<pb::Schedule, ApiError> {
        let view = self.schedule_for(caller, &Call::ScheduleRead, name).await?;
        Ok(convert::schedule_to_wire(&view))
    }

    pub async fn schedule_list(
        &self,
        caller: &Caller,
    ) -> Result<pb::ScheduleListResponse, ApiError> {
        self.authorize(caller, &Call::ScheduleRead, "")?;
        let scope = &caller.principal.scope;
        Ok(pb::ScheduleListResponse {
            schedules: self
                .engine
                .schedule_list()
                .await?
                .iter()
                .filter(|v| {
                    let w = &v.record.spec.workflow;
                    scope.covers_run(&w.name, &w.labels)
                })
                .map(convert::schedule_to_wire)
                .collect(),
        })
    }

    pub async fn schedule_pause(
        &self,
        caller: &Caller,
        name: &str,
        reason: &str,
    ) -> Result<pb::Schedule, ApiError> {
        limits::check_len("reason", reason, limits::MAX_REASON_LEN).map_err(invalid)?;
        self.schedule_for(caller, &Call::ScheduleControl, name)
            .await?;
        let view = self
            .engine
            .schedule_pause(name, reason, caller.name())
            .await?;
        self.auth
            .log_allowed(caller, "SchedulePause", &format!("schedule {name}"), reason);
        Ok(convert::schedule_to_wire(&view))
    }

    pub async fn schedule_resume(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<pb::Schedule, ApiError> {
        self.schedule_for(caller, &Call::ScheduleControl, name)
            .await?;
        let view = self.engine.schedule_resume(name, caller.name()).await?;
        self.auth
            .log_allowed(caller, "ScheduleResume", &format!("schedule {name}"), "");
        Ok(convert::schedule_to_wire(&view))
    }

    pub async fn schedule_delete(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<pb::ScheduleDeleteResponse, ApiError> {
        self.schedule_for(caller, &Call::ScheduleControl, name)
            .await?;
        self.engine.schedule_delete(name, caller.name()).await?;
        self.auth
            .log_allowed(caller, "ScheduleDelete", &format!("schedule {name}"), "");
        Ok(pb::ScheduleDeleteResponse {})
    }

    pub async fn schedule_trigger(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<pb::SubmitResponse, ApiError> {
        self.schedule_for(caller, &Call::ScheduleWrite, name)
            .await?;
        let id = self.engine.schedule_trigger(name, caller.name()).await?;
        self.auth.log_allowed(
            caller,
            "ScheduleTrigger",
            &format!("schedule {name}"),
            &format!("run {id}"),
        );
        Ok(pb::SubmitResponse {
            id: id.to_string(),
            created: true,
            state: domain::RunState::Queued.to_string(),
        })
    }

    pub async fn schedule_backfill(
        &self,
        caller: &Caller,
        req: pb::ScheduleBackfillRequest,
    ) -> Result<pb::ScheduleBackfillResponse, ApiError> {
        let from = parse_time("from", &req.from)?;
        let to = parse_time("to", &req.to)?;
        self.schedule_for(caller, &Call::ScheduleWrite, &req.name)
            .await?;
        let (view, fires) = self
            .engine
            .schedule_backfill(&req.name, from, to, caller.name())
            .await?;
        self.auth.log_allowed(
            caller,
            "ScheduleBackfill",
            &format!("schedule {}", req.name),
            &format!("{fires} fires from {from} to {to}"),
        );
        Ok(pb::ScheduleBackfillResponse {
            fires: u32::try_from(fires).unwrap_or(u32::MAX),
            schedule: Some(convert::schedule_to_wire(&view)),
        })
    }
}
