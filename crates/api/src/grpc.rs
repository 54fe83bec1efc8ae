//! The gRPC face of the API.

use proto::v1 as pb;
use proto::v1::e_stop_server::EStop;
use proto::v1::steward_server::Steward;
use tonic::{Request, Response, Status};

use crate::service::{RunStream, Service};

/// Who is calling, for audit fields (`x-steward-actor` metadata).
fn actor<T>(req: &Request<T>) -> Result<String, Status> {
    crate::service::actor(
        req.metadata()
            .get("x-steward-actor")
            .map(|v| v.to_str().unwrap_or("\u{fffd}")),
    )
    .map_err(Status::from)
}

#[tonic::async_trait]
impl Steward for Service {
    async fn submit(
        &self,
        req: Request<pb::SubmitRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        let spec = Service::wire_spec(req.into_inner().spec)?;
        Ok(Response::new(Service::submit(self, spec).await?))
    }

    async fn exec(
        &self,
        req: Request<pb::ExecRequest>,
    ) -> Result<Response<pb::ExecResponse>, Status> {
        Ok(Response::new(
            Service::exec(self, &req.into_inner().id).await?,
        ))
    }

    async fn status(&self, req: Request<pb::StatusRequest>) -> Result<Response<pb::Run>, Status> {
        Ok(Response::new(
            Service::status(self, &req.into_inner().id).await?,
        ))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        Ok(Response::new(Service::list(self, req.into_inner()).await?))
    }

    type WatchStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::Run, Status>> + Send>>;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        use futures::StreamExt;
        let stream: RunStream = Service::watch(self, &req.into_inner().id).await?;
        Ok(Response::new(Box::pin(
            stream.map(|r| r.map_err(Status::from)),
        )))
    }

    async fn cancel(
        &self,
        req: Request<pb::CancelRequest>,
    ) -> Result<Response<pb::CancelResponse>, Status> {
        let who = actor(&req)?;
        let r = req.into_inner();
        Ok(Response::new(
            Service::cancel(self, &r.id, &r.reason, &who).await?,
        ))
    }

    async fn clone(
        &self,
        req: Request<pb::CloneRequest>,
    ) -> Result<Response<pb::SubmitResponse>, Status> {
        Ok(Response::new(
            Service::clone_run(self, &req.into_inner().id).await?,
        ))
    }

    async fn validate(
        &self,
        req: Request<pb::ValidateRequest>,
    ) -> Result<Response<pb::ValidateResponse>, Status> {
        let spec = Service::wire_spec(req.into_inner().spec);
        Ok(Response::new(Service::validate(self, spec)))
    }
}

#[tonic::async_trait]
impl EStop for Service {
    async fn list(
        &self,
        _req: Request<pb::EStopListRequest>,
    ) -> Result<Response<pb::EStopListResponse>, Status> {
        Ok(Response::new(self.estop_list()?))
    }

    async fn set(
        &self,
        req: Request<pb::EStopSetRequest>,
    ) -> Result<Response<pb::AuditRecord>, Status> {
        let who = actor(&req)?;
        Ok(Response::new(self.estop_set(req.into_inner(), &who).await?))
    }

    async fn clear(
        &self,
        req: Request<pb::EStopClearRequest>,
    ) -> Result<Response<pb::EStopClearResponse>, Status> {
        let who = actor(&req)?;
        Ok(Response::new(
            self.estop_clear(req.into_inner(), &who).await?,
        ))
    }

    async fn audit(
        &self,
        req: Request<pb::EStopAuditRequest>,
    ) -> Result<Response<pb::EStopAuditResponse>, Status> {
        Ok(Response::new(self.estop_audit(req.into_inner()).await?))
    }
}
