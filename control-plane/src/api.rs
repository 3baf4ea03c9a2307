//! The operator API (REST with JSON) and the visualization endpoints.
//!
//! Every route needs an operator's bearer token (`[api] operators`), unless
//! the API runs anonymously (the embedded `fabric dev`, on localhost). The
//! operator's name is the actor recorded in the saga's history for each
//! action, which is the audit trail: the history is append-only and names
//! who did what, when, under which leader epoch. Refused actions change
//! nothing and are logged (target `audit`).
//!
//! Errors map once, here: unknown saga or definition → 404; an action that
//! does not fit the saga's state, or an id in use → 409; bad input → 400;
//! this replica not leading → 503 (retry on the leader).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};
use statefabric_saga::graph::{self, Graph};
use statefabric_saga::machine::OperatorAction;
use statefabric_saga::{Definition, Status};
use statefabric_saga_engine::store::{Filter, StoreError, TaskRow};
use statefabric_saga_engine::{Engine, EngineError};

use crate::config::ApiConfig;

#[derive(Debug, Clone)]
struct Api {
    engine: Arc<Engine>,
    operators: Arc<BTreeMap<String, String>>,
    anonymous: bool,
}

/// An error as the API reports it.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        let code = match &e {
            EngineError::NotLeader => StatusCode::SERVICE_UNAVAILABLE,
            EngineError::UnknownSaga(_) | EngineError::UnknownDefinition(_) => {
                StatusCode::NOT_FOUND
            }
            EngineError::Exists(_) | EngineError::NotAllowed(_) => StatusCode::CONFLICT,
            EngineError::Invalid(_) | EngineError::Definition(_) => StatusCode::BAD_REQUEST,
            EngineError::Store(s) => match s {
                StoreError::Fenced(_) | StoreError::Unavailable(_) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                StoreError::Conflict(_) => StatusCode::CONFLICT,
                StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
                StoreError::Backend(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        };
        Self(code, e.to_string())
    }
}

fn bad(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, message.into())
}

type ApiResult<T> = Result<T, ApiError>;

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Api {
    /// The operator behind the request.
    fn operator(&self, headers: &HeaderMap) -> ApiResult<String> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if let Some(token) = token {
            for (name, secret) in self.operators.iter() {
                if same(token.as_bytes(), secret.as_bytes()) {
                    return Ok(name.clone());
                }
            }
            return Err(ApiError(
                StatusCode::UNAUTHORIZED,
                "unknown bearer token".into(),
            ));
        }
        if self.anonymous {
            return Ok("local".into());
        }
        Err(ApiError(
            StatusCode::UNAUTHORIZED,
            if self.operators.is_empty() {
                "no operators are configured ([api] operators); the API is closed".into()
            } else {
                "an operator's bearer token is required (Authorization: Bearer …)".into()
            },
        ))
    }
}

pub fn router(engine: Arc<Engine>, config: &ApiConfig) -> Router {
    let api = Api {
        engine,
        operators: Arc::new(config.operators.clone()),
        anonymous: config.allow_anonymous,
    };
    Router::new()
        .route("/v1/definitions", get(definitions).post(add_definition))
        .route("/v1/definitions/{name}/graph", get(definition_graph))
        .route("/v1/sagas", get(list).post(start))
        .route("/v1/sagas/{id}", get(show))
        .route("/v1/sagas/{id}/graph", get(saga_graph))
        .route("/v1/sagas/{id}/{action}", post(act))
        .route("/ui", get(page))
        .route("/ui/", get(page))
        .route("/ui/sagas/{id}", get(page_for))
        .with_state(api)
}

async fn definitions(State(api): State<Api>, headers: HeaderMap) -> ApiResult<Json<Value>> {
    api.operator(&headers)?;
    let registry = api.engine.registry();
    let list: Vec<Value> = registry
        .names()
        .filter_map(|(n, v)| registry.get(n, v))
        .map(|d| json!(*d))
        .collect();
    Ok(Json(json!({ "definitions": list })))
}

async fn add_definition(
    State(api): State<Api>,
    headers: HeaderMap,
    body: String,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let actor = api.operator(&headers)?;
    let yaml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("yaml"));
    let definition = if yaml {
        Definition::from_yaml(&body)
    } else {
        Definition::from_json(&body)
    }
    .map_err(|e| bad(e.to_string()))?;
    let added = api.engine.register(definition).await?;
    tracing::info!(target: "audit", operator = %actor, definition = %added.name, version = added.version, "definition registered");
    Ok((StatusCode::CREATED, Json(json!(*added))))
}

#[derive(Debug, Deserialize)]
struct GraphQuery {
    format: Option<String>,
    version: Option<u32>,
}

fn render(graph: &Graph, extra: Option<Value>, format: Option<&str>) -> ApiResult<Response> {
    match format.unwrap_or("json") {
        "json" => {
            let mut body = json!(graph);
            if let (Some(extra), Some(map)) = (extra, body.as_object_mut())
                && let Some(extra) = extra.as_object()
            {
                map.extend(extra.clone());
            }
            Ok(Json(body).into_response())
        }
        "mermaid" => Ok((
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            graph::mermaid(graph),
        )
            .into_response()),
        "dot" => Ok((
            [(header::CONTENT_TYPE, "text/vnd.graphviz; charset=utf-8")],
            graph::dot(graph),
        )
            .into_response()),
        other => Err(bad(format!(
            "format {other:?} is not one of json, mermaid, dot"
        ))),
    }
}

async fn definition_graph(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(name): Path<String>,
    Query(q): Query<GraphQuery>,
) -> ApiResult<Response> {
    api.operator(&headers)?;
    let registry = api.engine.registry();
    let definition = match q.version {
        Some(v) => registry.get(&name, v),
        None => registry.latest(&name),
    }
    .ok_or_else(|| ApiError::from(EngineError::UnknownDefinition(name.clone())))?;
    render(&graph::graph(&definition, None), None, q.format.as_deref())
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    definition: Option<String>,
    status: Option<String>,
    tenant: Option<String>,
    /// Started longer ago than this (`10m`, `2h`).
    older_than: Option<String>,
    /// Only sagas flagged stuck (STUCK, or no progress past the
    /// definition's `stuck_after`, or `idle_for` when given).
    stuck: Option<bool>,
    idle_for: Option<String>,
    limit: Option<u32>,
}

fn duration(field: &str, text: &str) -> ApiResult<Duration> {
    humantime::parse_duration(text)
        .map_err(|e| bad(format!("{field} {text:?} is not a duration like 10m: {e}")))
}

async fn list(
    State(api): State<Api>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Value>> {
    api.operator(&headers)?;
    let status = q
        .status
        .as_deref()
        .map(|s| {
            serde_json::from_value::<Status>(Value::String(s.to_uppercase()))
                .map_err(|_| bad(format!("status {s:?} is not a saga status")))
        })
        .transpose()?;
    let ago = |d: Duration| Utc::now() - chrono::Duration::from_std(d).unwrap_or_default();
    let started_before = q
        .older_than
        .as_deref()
        .map(|t| duration("older_than", t).map(ago))
        .transpose()?;
    if q.limit.is_some_and(|l| l == 0 || l > 1000) {
        return Err(bad("limit must be 1-1000"));
    }
    let mut filter = Filter {
        definition: q.definition.clone(),
        status,
        tenant: q.tenant,
        started_before,
        idle_since: None,
        limit: q.limit,
    };
    let mut sagas = Vec::new();
    if q.stuck == Some(true) {
        let registry = api.engine.registry();
        let idle = q
            .idle_for
            .as_deref()
            .map(|t| duration("idle_for", t))
            .transpose()?;
        let names: Vec<String> = match &q.definition {
            Some(d) => vec![d.clone()],
            None => {
                let mut n: Vec<String> = registry.names().map(|(n, _)| n.to_owned()).collect();
                n.dedup();
                n
            }
        };
        for name in names {
            let threshold = idle
                .or_else(|| registry.latest(&name).map(|d| d.stuck_after))
                .unwrap_or(Duration::from_secs(600));
            filter.definition = Some(name);
            filter.idle_since = Some(ago(threshold));
            sagas.extend(
                api.engine
                    .store()
                    .list(&filter)
                    .await
                    .map_err(EngineError::from)?,
            );
        }
    } else {
        sagas = api
            .engine
            .store()
            .list(&filter)
            .await
            .map_err(EngineError::from)?;
    }
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

async fn start(
    State(api): State<Api>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let actor = api.operator(&headers)?;
    let body: StartBody =
        serde_json::from_slice(&body).map_err(|e| bad(format!("request body: {e}")))?;
    let data = body.data.unwrap_or_else(|| json!({}));
    let saga = api
        .engine
        .start(&body.tenant, body.saga_id, &body.definition, data, &actor)
        .await?;
    tracing::info!(target: "audit", operator = %actor, saga = %saga.instance.id, "saga started");
    Ok((StatusCode::CREATED, Json(json!(saga))))
}

async fn show(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    api.operator(&headers)?;
    let store = api.engine.store();
    let saga = store
        .load(&id)
        .await
        .map_err(EngineError::from)?
        .ok_or_else(|| ApiError::from(EngineError::UnknownSaga(id.clone())))?;
    let tasks = store.tasks(&id).await.map_err(EngineError::from)?;
    let history = store.history(&id).await.map_err(EngineError::from)?;
    Ok(Json(
        json!({"saga": saga, "tasks": tasks, "history": history}),
    ))
}

/// A step's attempts, first dispatch and last answer.
type StepTimes = (u32, chrono::DateTime<Utc>, Option<chrono::DateTime<Utc>>);

/// Per step: attempts, first dispatch, last answer, and time spent.
fn timings(tasks: &[TaskRow]) -> Value {
    let mut steps: BTreeMap<&str, StepTimes> = BTreeMap::new();
    for t in tasks.iter().filter(|t| !t.compensation) {
        let entry = steps
            .entry(t.step.as_str())
            .or_insert((0, t.dispatched_at, None));
        entry.0 += 1;
        entry.1 = entry.1.min(t.dispatched_at);
        if let Some(f) = t.finished_at {
            entry.2 = Some(entry.2.map_or(f, |e| e.max(f)));
        }
    }
    let map: serde_json::Map<String, Value> = steps
        .into_iter()
        .map(|(step, (attempts, first, last))| {
            let ms = last.map(|l| (l - first).num_milliseconds());
            (
                step.to_owned(),
                json!({"attempts": attempts, "first_dispatched_at": first, "last_finished_at": last, "duration_ms": ms}),
            )
        })
        .collect();
    Value::Object(map)
}

async fn saga_graph(
    State(api): State<Api>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<GraphQuery>,
) -> ApiResult<Response> {
    api.operator(&headers)?;
    let store = api.engine.store();
    let saga = store
        .load(&id)
        .await
        .map_err(EngineError::from)?
        .ok_or_else(|| ApiError::from(EngineError::UnknownSaga(id.clone())))?;
    let definition = api
        .engine
        .registry()
        .get(&saga.instance.definition, saga.instance.version)
        .ok_or_else(|| {
            ApiError::from(EngineError::UnknownDefinition(
                saga.instance.definition.clone(),
            ))
        })?;
    let tasks = store.tasks(&id).await.map_err(EngineError::from)?;
    let extra = json!({
        "saga_id": id,
        "paused": saga.instance.paused,
        "last_error": saga.instance.last_error,
        "started_at": saga.started_at,
        "ended_at": saga.ended_at,
        "timings": timings(&tasks),
    });
    render(
        &graph::graph(&definition, Some(&saga.instance)),
        Some(extra),
        q.format.as_deref(),
    )
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    output: Option<Value>,
    data: Option<Value>,
}

async fn act(
    State(api): State<Api>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> ApiResult<Json<Value>> {
    let actor = api.operator(&headers)?;
    let body: ActionBody = if body.is_empty() {
        ActionBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| bad(format!("request body: {e}")))?
    };
    let action = match action.as_str() {
        "pause" => OperatorAction::Pause,
        "resume" => OperatorAction::Resume,
        "retry" => OperatorAction::RetryStep,
        "skip" => OperatorAction::Skip {
            output: body
                .output
                .ok_or_else(|| bad("skip needs {\"output\": …}: the step's output to use"))?,
        },
        "compensate" => OperatorAction::Compensate,
        "abort" => OperatorAction::Abort,
        "amend" => match body.data {
            Some(data) if data.is_object() => OperatorAction::Amend { data },
            _ => {
                return Err(bad(
                    "amend needs {\"data\": {…}}: the saga's new data, a JSON object",
                ));
            }
        },
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!(
                    "no action {other:?}; actions: pause, resume, retry, skip, compensate, abort, amend"
                ),
            ));
        }
    };
    let name = action.name();
    match api.engine.operate(&id, action, &actor).await {
        Ok(saga) => {
            tracing::info!(target: "audit", operator = %actor, saga = %id, action = name, "operator action applied");
            Ok(Json(json!(saga)))
        }
        Err(err) => {
            tracing::info!(target: "audit", operator = %actor, saga = %id, action = name, error = %err, "operator action refused");
            Err(err.into())
        }
    }
}

async fn page() -> Html<&'static str> {
    Html(crate::ui::PAGE)
}

async fn page_for(Path(_id): Path<String>) -> Html<&'static str> {
    Html(crate::ui::PAGE)
}
