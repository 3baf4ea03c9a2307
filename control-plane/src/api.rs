//! The operator API as REST with JSON, and the saga page. The operations
//! themselves are in [`crate::operator`]; this maps HTTP to them and their
//! errors to statuses: unknown saga or definition → 404; an action that does
//! not fit the saga's state, or an id in use → 409; bad input → 400; no or
//! unknown token → 401; this replica not leading → 503 (retry on the
//! leader).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};
use statefabric_saga::Definition;
use statefabric_saga_engine::Engine;

use crate::config::ApiConfig;
use crate::operator::{Kind, ListParams, OpError, Operator, Rendered};

/// An error as the REST API reports it.
#[derive(Debug)]
pub struct ApiError(OpError);

impl From<OpError> for ApiError {
    fn from(e: OpError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match self.0.kind {
            Kind::Unauthenticated => StatusCode::UNAUTHORIZED,
            Kind::Invalid => StatusCode::BAD_REQUEST,
            Kind::NotFound => StatusCode::NOT_FOUND,
            Kind::Conflict => StatusCode::CONFLICT,
            Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        (code, Json(json!({"error": self.0.message}))).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn operator(op: &Operator, headers: &HeaderMap) -> ApiResult<String> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    Ok(op.authenticate(bearer)?)
}

/// The operator REST API (`/v1/...`) and the saga page (`/ui`) on `engine`.
pub fn router(engine: Arc<Engine>, config: &ApiConfig) -> Router {
    Router::new()
        .route("/v1/definitions", get(definitions).post(add_definition))
        .route("/v1/definitions/{name}/graph", get(definition_graph))
        .route("/v1/sagas", get(list).post(start))
        .route("/v1/sagas/{id}", get(show))
        .route("/v1/sagas/{id}/graph", get(saga_graph))
        .route("/v1/sagas/{id}/{action}", post(act))
        .route("/ui", get(page))
        .route("/ui/", get(page))
        .route("/ui/sagas/{id}", get(page))
        .with_state(Operator::new(engine, config))
}

async fn definitions(State(op): State<Operator>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    operator(&op, &headers)?;
    let list: Vec<Value> = op.definitions().iter().map(|d| json!(**d)).collect();
    Ok(Json(json!({ "definitions": list })))
}

async fn add_definition(
    State(op): State<Operator>,
    headers: HeaderMap,
    body: String,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let actor = operator(&op, &headers)?;
    let yaml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("yaml"));
    let definition = if yaml {
        Definition::from_yaml(&body)
    } else {
        Definition::from_json(&body)
    }
    .map_err(|e| OpError::invalid(e.to_string()))?;
    let added = op.add_definition(definition, &actor).await?;
    Ok((StatusCode::CREATED, Json(json!(*added))))
}

#[derive(Debug, Deserialize)]
struct GraphQuery {
    format: Option<String>,
    version: Option<u32>,
}

fn graph_response(rendered: Rendered) -> Response {
    (
        [(header::CONTENT_TYPE, rendered.content_type)],
        rendered.body,
    )
        .into_response()
}

async fn definition_graph(
    State(op): State<Operator>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<GraphQuery>,
) -> ApiResult<Response> {
    operator(&op, &headers)?;
    let rendered = op.definition_graph(&name, q.version, q.format.as_deref())?;
    Ok(graph_response(rendered))
}

async fn saga_graph(
    State(op): State<Operator>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<GraphQuery>,
) -> ApiResult<Response> {
    operator(&op, &headers)?;
    Ok(graph_response(
        op.saga_graph(&id, q.format.as_deref()).await?,
    ))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    definition: Option<String>,
    status: Option<String>,
    tenant: Option<String>,
    /// Started longer ago than this (`10m`, `2h`).
    older_than: Option<String>,
    stuck: Option<bool>,
    idle_for: Option<String>,
    limit: Option<u32>,
}

fn duration(field: &str, text: Option<&str>) -> ApiResult<Option<Duration>> {
    text.map(|t| {
        humantime::parse_duration(t)
            .map_err(|e| OpError::invalid(format!("{field} {t:?} is not a duration like 10m: {e}")))
    })
    .transpose()
    .map_err(ApiError)
}

async fn list(
    State(op): State<Operator>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    operator(&op, &headers)?;
    let params = ListParams {
        older_than: duration("older_than", q.older_than.as_deref())?,
        idle_for: duration("idle_for", q.idle_for.as_deref())?,
        definition: q.definition,
        status: q.status,
        tenant: q.tenant,
        stuck: q.stuck.unwrap_or(false),
        limit: q.limit,
    };
    let sagas = op.list(params).await?;
    Ok(Json(json!({ "sagas": sagas })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StartBody {
    tenant: String,
    definition: String,
    #[serde(default)]
    saga_id: Option<String>,
    #[serde(default)]
    data: Option<Value>,
}

fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError(OpError::invalid(format!("request body: {e}"))))
}

async fn start(
    State(op): State<Operator>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let actor = operator(&op, &headers)?;
    let b: StartBody = body(&bytes)?;
    let data = b.data.unwrap_or_else(|| json!({}));
    let saga = op
        .start(&b.tenant, &b.definition, b.saga_id, data, &actor)
        .await?;
    Ok((StatusCode::CREATED, Json(json!(saga))))
}

async fn show(
    State(op): State<Operator>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    operator(&op, &headers)?;
    Ok(Json(op.show(&id).await?))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    output: Option<Value>,
    data: Option<Value>,
}

async fn act(
    State(op): State<Operator>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    bytes: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let actor = operator(&op, &headers)?;
    let b: ActionBody = if bytes.is_empty() {
        ActionBody::default()
    } else {
        body(&bytes)?
    };
    let action = Operator::action(&action, b.output, b.data)?;
    Ok(Json(json!(op.act(&id, action, &actor).await?)))
}

async fn page() -> Html<&'static str> {
    Html(crate::ui::PAGE)
}
