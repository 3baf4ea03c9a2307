//! The operator API over gRPC (`proto/statefabric/control/v1/sagas.proto`):
//! the operations of [`crate::operator`], with their errors mapped to gRPC
//! codes.

use std::time::Duration;

use serde_json::{Value, json};
use statefabric_proto::control::v1 as pb;
use statefabric_proto::control::v1::sagas_server::Sagas;
use statefabric_saga_store::{Stored, Summary};
use tonic::{Code, Request, Response, Status};

use crate::operator::{Kind, ListParams, OpError, Operator};

/// `statefabric.control.v1.Sagas`: the operator API over gRPC.
#[derive(Debug, Clone)]
pub struct SagasService {
    op: Operator,
}

impl SagasService {
    /// The service answering with `op`.
    pub fn new(op: Operator) -> Self {
        Self { op }
    }

    fn operator<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let bearer = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        self.op.authenticate(bearer).map_err(status)
    }
}

fn status(e: OpError) -> Status {
    let code = match e.kind {
        Kind::Unauthenticated => Code::Unauthenticated,
        Kind::Invalid => Code::InvalidArgument,
        Kind::NotFound => Code::NotFound,
        Kind::Conflict if e.message.contains("already exists") => Code::AlreadyExists,
        Kind::Conflict => Code::FailedPrecondition,
        Kind::Unavailable => Code::Unavailable,
        Kind::Internal => Code::Internal,
    };
    Status::new(code, e.message)
}

fn millis(t: chrono::DateTime<chrono::Utc>) -> i64 {
    t.timestamp_millis()
}

fn summary(s: &Summary) -> pb::SagaSummary {
    pb::SagaSummary {
        saga_id: s.saga_id.to_string(),
        tenant: s.tenant.to_string(),
        definition: s.definition.clone(),
        version: s.version,
        status: s.status.to_string(),
        paused: s.paused,
        started_at_ms: millis(s.started_at),
        progressed_at_ms: millis(s.progressed_at),
        ended_at_ms: s.ended_at.map_or(0, millis),
        last_error: String::new(),
    }
}

fn stored(s: &Stored) -> pb::SagaSummary {
    pb::SagaSummary {
        saga_id: s.instance.id.to_string(),
        tenant: s.tenant.to_string(),
        definition: s.instance.definition.clone(),
        version: s.instance.version,
        status: s.instance.status.to_string(),
        paused: s.instance.paused,
        started_at_ms: millis(s.started_at),
        progressed_at_ms: millis(s.progressed_at),
        ended_at_ms: s.ended_at.map_or(0, millis),
        last_error: s.instance.last_error.clone().unwrap_or_default(),
    }
}

fn json(bytes: &[u8], field: &str) -> Result<Option<Value>, Status> {
    if bytes.is_empty() {
        return Ok(None);
    }
    serde_json::from_slice(bytes)
        .map(Some)
        .map_err(|e| Status::invalid_argument(format!("{field} is not valid JSON: {e}")))
}

fn nonzero_ms(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

#[tonic::async_trait]
impl Sagas for SagasService {
    async fn list_sagas(
        &self,
        request: Request<pb::ListSagasRequest>,
    ) -> Result<Response<pb::ListSagasResponse>, Status> {
        self.operator(&request)?;
        let r = request.into_inner();
        let nonempty = |s: String| (!s.is_empty()).then_some(s);
        let params = ListParams {
            definition: nonempty(r.definition),
            status: nonempty(r.status),
            tenant: nonempty(r.tenant),
            older_than: nonzero_ms(r.older_than_ms),
            stuck: r.stuck,
            idle_for: nonzero_ms(r.idle_for_ms),
            limit: (r.limit > 0).then_some(r.limit),
        };
        let sagas = self.op.list(params).await.map_err(status)?;
        Ok(Response::new(pb::ListSagasResponse {
            sagas: sagas.iter().map(summary).collect(),
        }))
    }

    async fn get_saga(
        &self,
        request: Request<pb::GetSagaRequest>,
    ) -> Result<Response<pb::GetSagaResponse>, Status> {
        self.operator(&request)?;
        let id = request.into_inner().saga_id;
        let saga = self.op.saga(&id).await.map_err(status)?;
        let detail = self.op.show(&id).await.map_err(status)?;
        Ok(Response::new(pb::GetSagaResponse {
            summary: Some(stored(&saga)),
            detail_json: detail.to_string().into_bytes(),
        }))
    }

    async fn start_saga(
        &self,
        request: Request<pb::StartSagaRequest>,
    ) -> Result<Response<pb::SagaSummary>, Status> {
        let actor = self.operator(&request)?;
        let r = request.into_inner();
        let data = json(&r.data_json, "data_json")?.unwrap_or_else(|| json!({}));
        let id = (!r.saga_id.is_empty()).then_some(r.saga_id);
        let saga = self
            .op
            .start(&r.tenant, &r.definition, id, data, &actor)
            .await
            .map_err(status)?;
        Ok(Response::new(stored(&saga)))
    }

    async fn act(
        &self,
        request: Request<pb::ActRequest>,
    ) -> Result<Response<pb::SagaSummary>, Status> {
        let actor = self.operator(&request)?;
        let r = request.into_inner();
        let name = match pb::Action::try_from(r.action) {
            Ok(pb::Action::Pause) => "pause",
            Ok(pb::Action::Resume) => "resume",
            Ok(pb::Action::Retry) => "retry",
            Ok(pb::Action::Skip) => "skip",
            Ok(pb::Action::Compensate) => "compensate",
            Ok(pb::Action::Abort) => "abort",
            Ok(pb::Action::Amend) => "amend",
            Ok(pb::Action::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument("action is required"));
            }
        };
        let action = Operator::action(
            name,
            json(&r.output_json, "output_json")?,
            json(&r.data_json, "data_json")?,
        )
        .map_err(status)?;
        let saga = self
            .op
            .act(&r.saga_id, action, &actor)
            .await
            .map_err(status)?;
        Ok(Response::new(stored(&saga)))
    }

    async fn get_graph(
        &self,
        request: Request<pb::GetGraphRequest>,
    ) -> Result<Response<pb::GetGraphResponse>, Status> {
        self.operator(&request)?;
        let r = request.into_inner();
        let format = Some(r.format.as_str());
        let rendered = match (r.saga_id.is_empty(), r.definition.is_empty()) {
            (false, _) => self.op.saga_graph(&r.saga_id, format).await,
            (true, false) => {
                let version = (r.version > 0).then_some(r.version);
                self.op.definition_graph(&r.definition, version, format)
            }
            (true, true) => {
                return Err(Status::invalid_argument("name a saga_id or a definition"));
            }
        }
        .map_err(status)?;
        Ok(Response::new(pb::GetGraphResponse {
            content_type: rendered.content_type.to_owned(),
            body: rendered.body,
        }))
    }
}
