//! What operators can do, once for both APIs (REST in [`crate::api`], gRPC
//! in [`crate::grpc`]): authenticate, list and show sagas, start one, act on
//! one, and draw a saga or a definition as a graph. Each API only
//! translates its wire format and maps [`OpError`] to its status codes.
//!
//! Every action is recorded in the saga's history under the operator's
//! name (append-only, with time and leader epoch) and in the tenant's
//! `audit_log` (`saga.operator.<action>`, with its outcome); refused
//! actions change nothing, are audited too when the saga exists, and are
//! logged under the `audit` target.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::{Value, json};
use statefabric_domain::TenantId;
use statefabric_saga::graph::{self, Graph};
use statefabric_saga::machine::OperatorAction;
use statefabric_saga::{Definition, SagaId, Status};
use statefabric_saga_engine::{Engine, EngineError};
use statefabric_saga_store::{Filter, OperatorAudit, StoreError, Stored, Summary, TaskRow};

use crate::config::ApiConfig;

/// What kind of failure an operator call met; each API maps it to its
/// status codes (HTTP 401/400/404/409/503/500, the gRPC equivalents).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// No token, or one no operator has.
    Unauthenticated,
    /// A malformed request: a bad status, limit, action argument or id.
    Invalid,
    /// No such saga, definition or action.
    NotFound,
    /// Does not fit the current state (or an id in use).
    Conflict,
    /// Not the leader, or storage unreachable: retry (on the leader).
    Unavailable,
    /// A fault of ours or of the database (reported, not explained).
    Internal,
}

/// An operator call's failure: its kind and a message for the operator.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    /// Which status it becomes.
    pub kind: Kind,
    /// What went wrong, naming the field or object.
    pub message: String,
}

impl OpError {
    /// A failure of `kind`.
    pub fn new(kind: Kind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }

    /// A malformed request.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Kind::Invalid, message)
    }
}

impl From<EngineError> for OpError {
    fn from(e: EngineError) -> Self {
        let kind = match &e {
            EngineError::NotLeader => Kind::Unavailable,
            EngineError::UnknownSaga(_) | EngineError::UnknownDefinition(_) => Kind::NotFound,
            EngineError::Exists(_) | EngineError::NotAllowed(_) => Kind::Conflict,
            EngineError::Invalid(_) | EngineError::Definition(_) => Kind::Invalid,
            EngineError::Store(s) => match s {
                StoreError::Fenced(_) | StoreError::Unavailable(_) => Kind::Unavailable,
                StoreError::Conflict(_) => Kind::Conflict,
                StoreError::Invalid(_) => Kind::Invalid,
                StoreError::Backend(_) => Kind::Internal,
            },
        };
        Self::new(kind, e.to_string())
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        EngineError::from(e).into()
    }
}

/// An operator call's result.
pub type OpResult<T> = Result<T, OpError>;

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Which list to show.
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    /// Only sagas of this definition.
    pub definition: Option<String>,
    /// Only sagas in this status (any case: `running`, `COMPENSATED`, …).
    pub status: Option<String>,
    /// Only this tenant's sagas.
    pub tenant: Option<String>,
    /// Only sagas started longer ago than this.
    pub older_than: Option<Duration>,
    /// Only sagas flagged stuck: STUCK, or no progress for `idle_for` (by
    /// default the definition's `stuck_after`).
    pub stuck: bool,
    /// With `stuck`: how long without progress counts as stuck.
    pub idle_for: Option<Duration>,
    /// At most this many (1–1000).
    pub limit: Option<u32>,
}

/// The operator actions over one engine, with the configured operators'
/// tokens; cheap to clone (one per API).
#[derive(Debug, Clone)]
pub struct Operator {
    engine: Arc<Engine>,
    operators: Arc<BTreeMap<String, String>>,
    anonymous: bool,
}

impl Operator {
    /// Operations on `engine`, for the operators of `config`.
    pub fn new(engine: Arc<Engine>, config: &ApiConfig) -> Self {
        Self {
            engine,
            operators: Arc::new(config.operators.clone()),
            anonymous: config.allow_anonymous,
        }
    }

    /// The operator a bearer token belongs to.
    pub fn authenticate(&self, bearer: Option<&str>) -> OpResult<String> {
        if let Some(token) = bearer {
            return self
                .operators
                .iter()
                .find(|(_, secret)| same(token.as_bytes(), secret.as_bytes()))
                .map(|(name, _)| name.clone())
                .ok_or_else(|| OpError::new(Kind::Unauthenticated, "unknown bearer token"));
        }
        if self.anonymous {
            return Ok("local".into());
        }
        Err(OpError::new(
            Kind::Unauthenticated,
            if self.operators.is_empty() {
                "no operators are configured ([api] operators); the API is closed"
            } else {
                "an operator's bearer token is required (Authorization: Bearer …)"
            },
        ))
    }

    /// Every registered definition, each version.
    pub fn definitions(&self) -> Vec<Arc<Definition>> {
        let registry = self.engine.registry();
        registry
            .names()
            .filter_map(|(n, v)| registry.get(n, v))
            .collect()
    }

    /// Registers a definition (validated by the engine; a new version of a
    /// known name, or a new name), recorded under the operator's name.
    pub async fn add_definition(
        &self,
        definition: Definition,
        actor: &str,
    ) -> OpResult<Arc<Definition>> {
        let added = self.engine.register(definition).await?;
        tracing::info!(target: "audit", operator = %actor, definition = %added.name, version = added.version, "definition registered");
        Ok(added)
    }

    /// The sagas `p` asks for.
    pub async fn list(&self, p: ListParams) -> OpResult<Vec<Summary>> {
        let status = p
            .status
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| {
                serde_json::from_value::<Status>(Value::String(s.to_uppercase()))
                    .map_err(|_| OpError::invalid(format!("status {s:?} is not a saga status")))
            })
            .transpose()?;
        if p.limit.is_some_and(|l| l == 0 || l > 1000) {
            return Err(OpError::invalid("limit must be 1-1000"));
        }
        let ago = |d: Duration| Utc::now() - chrono::Duration::from_std(d).unwrap_or_default();
        let tenant = p.tenant.as_deref().map(tenant_id).transpose()?;
        let mut filter = Filter {
            definition: p.definition.clone(),
            status,
            tenant,
            started_before: p.older_than.map(ago),
            idle_since: None,
            limit: p.limit,
        };
        if !p.stuck {
            return Ok(self.engine.store().list(&filter).await?);
        }
        let registry = self.engine.registry();
        let names: Vec<String> = match &p.definition {
            Some(d) => vec![d.clone()],
            None => {
                let mut n: Vec<String> = registry.names().map(|(n, _)| n.to_owned()).collect();
                n.dedup();
                n
            }
        };
        let mut sagas = Vec::new();
        for name in names {
            let threshold = p
                .idle_for
                .or_else(|| registry.latest(&name).map(|d| d.stuck_after))
                .unwrap_or(Duration::from_secs(600));
            filter.definition = Some(name);
            filter.idle_since = Some(ago(threshold));
            sagas.extend(self.engine.store().list(&filter).await?);
        }
        Ok(sagas)
    }

    /// One saga as stored (NotFound when there is none).
    pub async fn saga(&self, id: &str) -> OpResult<Stored> {
        self.load(&saga_id(id)?).await
    }

    async fn load(&self, id: &SagaId) -> OpResult<Stored> {
        self.engine
            .store()
            .load(id)
            .await?
            .ok_or_else(|| EngineError::UnknownSaga(id.to_string()).into())
    }

    /// The saga with its tasks (step executions) and history.
    pub async fn show(&self, id: &str) -> OpResult<Value> {
        let id = saga_id(id)?;
        let saga = self.load(&id).await?;
        let tasks = self.engine.store().tasks(&id).await?;
        let history = self.engine.store().history(&id).await?;
        Ok(json!({"saga": saga, "tasks": tasks, "history": history}))
    }

    /// Starts a saga of `definition` for `tenant` (an id of the caller's,
    /// or a new one), recorded under the operator's name.
    pub async fn start(
        &self,
        tenant: &str,
        definition: &str,
        saga_id: Option<String>,
        data: Value,
        actor: &str,
    ) -> OpResult<Stored> {
        let tenant = tenant_id(tenant)?;
        let id = saga_id.as_deref().map(self::saga_id).transpose()?;
        let saga = self
            .engine
            .start(&tenant, id, definition, data, actor)
            .await?;
        tracing::info!(target: "audit", operator = %actor, saga = %saga.instance.id, "saga started");
        Ok(saga)
    }

    /// `action` by name, with `output` (skip) or `data` (amend).
    pub fn action(
        name: &str,
        output: Option<Value>,
        data: Option<Value>,
    ) -> OpResult<OperatorAction> {
        Ok(match name {
            "pause" => OperatorAction::Pause,
            "resume" => OperatorAction::Resume,
            "retry" => OperatorAction::RetryStep,
            "skip" => OperatorAction::Skip {
                output: output.ok_or_else(|| {
                    OpError::invalid("skip needs an output: what the step would have returned")
                })?,
            },
            "compensate" => OperatorAction::Compensate,
            "abort" => OperatorAction::Abort,
            "amend" => match data {
                Some(data) if data.is_object() => OperatorAction::Amend { data },
                _ => {
                    return Err(OpError::invalid(
                        "amend needs data: the saga's new data, a JSON object",
                    ));
                }
            },
            other => {
                return Err(OpError::new(
                    Kind::NotFound,
                    format!(
                        "no action {other:?}; actions: pause, resume, retry, skip, compensate, abort, amend"
                    ),
                ));
            }
        })
    }

    /// Applies `action` to a saga, recorded in its history and the tenant's
    /// audit log whether it is applied or refused.
    pub async fn act(&self, id: &str, action: OperatorAction, actor: &str) -> OpResult<Stored> {
        let id = &saga_id(id)?;
        let name = action.name();
        let asked = serde_json::to_value(&action).unwrap_or(Value::Null);
        let acted = self.engine.operate(id, action, actor).await;
        let (tenant, details) = match &acted {
            Ok(saga) => {
                tracing::info!(target: "audit", operator = %actor, saga = %id, action = name, "operator action applied");
                (
                    Some(saga.tenant.clone()),
                    json!({"outcome": "applied", "action": asked, "revision": saga.revision}),
                )
            }
            Err(err) => {
                tracing::info!(target: "audit", operator = %actor, saga = %id, action = name, error = %err, "operator action refused");
                // A refusal is audited under the saga's tenant when the
                // saga exists (an unknown id has no tenant to file it under).
                let tenant = match err {
                    EngineError::UnknownSaga(_) => None,
                    _ => self.load(id).await.ok().map(|saga| saga.tenant),
                };
                (
                    tenant,
                    json!({"outcome": "refused", "action": asked, "error": err.to_string()}),
                )
            }
        };
        if let Some(tenant) = tenant {
            let entry = OperatorAudit {
                tenant,
                operator: actor.to_owned(),
                action: name.to_owned(),
                saga_id: id.clone(),
                details,
            };
            if let Err(err) = self.engine.store().audit_operator(&entry).await {
                // The action stands (it is in the saga's history); the
                // audit row's loss is logged where operators look.
                tracing::warn!(target: "audit", operator = %actor, saga = %id, action = name, error = %err, "operator action not written to the audit log");
            }
        }
        acted.map_err(Into::into)
    }

    /// A definition's graph (latest version unless `version`).
    pub fn definition_graph(
        &self,
        name: &str,
        version: Option<u32>,
        format: Option<&str>,
    ) -> OpResult<Rendered> {
        let registry = self.engine.registry();
        let definition = match version {
            Some(v) => registry.get(name, v),
            None => registry.latest(name),
        }
        .ok_or_else(|| OpError::from(EngineError::UnknownDefinition(name.to_owned())))?;
        render(&graph::graph(&definition, None), None, format)
    }

    /// A saga's graph with each step's state and timings.
    pub async fn saga_graph(&self, id: &str, format: Option<&str>) -> OpResult<Rendered> {
        let id = &saga_id(id)?;
        let saga = self.load(id).await?;
        let definition = self
            .engine
            .registry()
            .get(&saga.instance.definition, saga.instance.version)
            .ok_or_else(|| {
                OpError::from(EngineError::UnknownDefinition(
                    saga.instance.definition.clone(),
                ))
            })?;
        let tasks = self.engine.store().tasks(id).await?;
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
            format,
        )
    }
}

/// A saga id from an API's path or message: malformed ones are refused
/// (400 / INVALID_ARGUMENT) rather than looked up.
fn saga_id(id: &str) -> OpResult<SagaId> {
    SagaId::new(id).map_err(|e| OpError::invalid(e.to_string()))
}

/// A tenant id from an API's query or message, refused the same way.
fn tenant_id(id: &str) -> OpResult<TenantId> {
    TenantId::new(id).map_err(|e| OpError::invalid(e.to_string()))
}

/// A graph in the asked format.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    /// `application/json`, `text/vnd.graphviz` (DOT) or `text/plain` (Mermaid).
    pub content_type: &'static str,
    /// The graph in that format.
    pub body: String,
}

fn render(graph: &Graph, extra: Option<Value>, format: Option<&str>) -> OpResult<Rendered> {
    match format.filter(|f| !f.is_empty()).unwrap_or("json") {
        "json" => {
            let mut body = json!(graph);
            if let (Some(Value::Object(extra)), Some(map)) = (extra, body.as_object_mut()) {
                map.extend(extra);
            }
            Ok(Rendered {
                content_type: "application/json",
                body: body.to_string(),
            })
        }
        "mermaid" => Ok(Rendered {
            content_type: "text/plain; charset=utf-8",
            body: graph::mermaid(graph),
        }),
        "dot" => Ok(Rendered {
            content_type: "text/vnd.graphviz; charset=utf-8",
            body: graph::dot(graph),
        }),
        other => Err(OpError::invalid(format!(
            "format {other:?} is not one of json, mermaid, dot"
        ))),
    }
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
