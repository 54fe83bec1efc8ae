//! The gRPC face of the API.

use proto::v1 as pb;
use proto::v1::admin_server::Admin;
use proto::v1::e_stop_server::EStop;
use proto::v1::schedules_server::Schedules;
use proto::v1::steward_server::Steward;
use tonic::{Request, Response, Status};

use crate::auth::Caller;
use crate::service::{RunStream, Service};

/// Who is calling: the caller the router's authentication put on the request.
fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    req.extensions()
        .get::<Caller>()
        .cloned()
        .ok_or_else(|| Status::unauthenticated("the call was not authenticated"))
}

#[tonic::async_trait]
impl Steward for Service {
    async fn submit(
        &self,
        req: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let who = caller(&req)?;
        let req = req.into_inner();
        let spec = Service::wire_spec(req.spec)?;
        Ok(Response::new(
            Service::submit(self, &who, spec, req.start).await?,
        ))
    }

    async fn exec(
        &self,
        req: Request<pb::ExecRequest>,
    ) -> Result<Response<pb::ExecResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            Service::exec(self, &who, &req.into_inner().id).await?,
        ))
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::Run>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            Service::status(self, &who, &req.into_inner().id).await?,
        ))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            Service::list(self, &who, req.into_inner()).await?,
        ))
    }

    type WatchStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::Run, Status>> + Send>>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        use futures::StreamExt;
        let who = caller(&req)?;
        let stream: RunStream = Service::watch(self, &who, &req.into_inner().id).await?;
        Ok(Response::new(Box::pin(
            stream.map(|r| r.map_err(Status::from)),
        )))
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        Ok(Response::new(
            Service::cancel(self, &who, &r.id, &r.reason).await?,
        ))
    }

    async fn clone(
        &self,
        req: Request<pb::CloneRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            Service::clone_run(self, &who, &req.into_inner().id).await?,
        ))
    }

    async fn validate(
        &self,
        req: Request<pb::ValidateRequest>,
    ) -> Result<Response<pb::ValidateResponse>, Status> {
        let who = caller(&req)?;
        let spec = Service::wire_spec(req.into_inner().spec);
        Ok(Response::new(Service::validate(self, &who, spec)?))
    }
}

#[tonic::async_trait]
impl EStop for Service {
    async fn list(
        &self,
        req: Request<pb::EStopListRequest>,
    ) -> Result<Response<pb::EStopListResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(self.estop_list(&who)?))
    }

    async fn set(
        &self,
        req: Request<pb::EStopSetRequest>,
    ) -> Result<Response<pb::AuditRecord>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(self.estop_set(&who, req.into_inner()).await?))
    }

    async fn clear(
        &self,
        req: Request<pb::EStopClearRequest>,
    ) -> Result<Response<pb::EStopClearResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            self.estop_clear(&who, req.into_inner()).await?,
        ))
    }

    async fn audit(
        &self,
        req: Request<pb::EStopAuditRequest>,
    ) -> Result<Response<pb::EStopAuditResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            self.estop_audit(&who, req.into_inner()).await?,
        ))
    }
}

#[tonic::async_trait]
impl Admin for Service {
    async fn create_token(
        &self,
        req: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            Service::create_token(self, &who, req.into_inner()).await?,
        ))
    }

    async fn list_tokens(
        &self,
        req: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(Service::list_tokens(self, &who).await?))
    }

    async fn revoke_token(
        &self,
        req: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            Service::revoke_token(self, &who, &req.into_inner().name).await?,
        ))
    }

    async fn access_log(
        &self,
        req: Request<pb::AccessLogRequest>,
    ) -> Result<Response<pb::AccessLogResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            Service::access_log(self, &who, req.into_inner()).await?,
        ))
    }

    async fn prune(
        &self,
        req: Request<pb::PruneRequest>,
    ) -> Result<Response<pb::PruneResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            Service::prune(self, &who, req.into_inner()).await?,
        ))
    }
}

#[tonic::async_trait]
impl Schedules for Service {
    async fn create(
        &self,
        req: Request<pb::ScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        let who = caller(&req)?;
        let spec = crate::convert::schedule_from_wire(req.into_inner().spec);
        Ok(Response::new(
            self.schedule_create(&who, spec, false).await?,
        ))
    }

    async fn update(
        &self,
        req: Request<pb::ScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        let who = caller(&req)?;
        let spec = crate::convert::schedule_from_wire(req.into_inner().spec);
        Ok(Response::new(self.schedule_create(&who, spec, true).await?))
    }

    async fn get(
        &self,
        req: Request<pb::ScheduleNameRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            self.schedule_get(&who, &req.into_inner().name).await?,
        ))
    }

    async fn list(
        &self,
        req: Request<pb::ScheduleListRequest>,
    ) -> Result<Response<pb::ScheduleListResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(self.schedule_list(&who).await?))
    }

    async fn pause(
        &self,
        req: Request<pb::SchedulePauseRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        let who = caller(&req)?;
        let r = req.into_inner();
        Ok(Response::new(
            self.schedule_pause(&who, &r.name, &r.reason).await?,
        ))
    }

    async fn resume(
        &self,
        req: Request<pb::ScheduleNameRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            self.schedule_resume(&who, &req.into_inner().name).await?,
        ))
    }

    async fn delete(
        &self,
        req: Request<pb::ScheduleNameRequest>,
    ) -> Result<Response<pb::ScheduleDeleteResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            self.schedule_delete(&who, &req.into_inner().name).await?,
        ))
    }

    async fn trigger(
        &self,
        req: Request<pb::ScheduleNameRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            self.schedule_trigger(&who, &req.into_inner().name).await?,
        ))
    }

    async fn backfill(
        &self,
        req: Request<pb::ScheduleBackfillRequest>,
    ) -> Result<Response<pb::ScheduleBackfillResponse>, Status> {
        let who = caller(&req)?;
        Ok(Response::new(
            self.schedule_backfill(&who, req.into_inner()).await?,
        ))
    }
}
