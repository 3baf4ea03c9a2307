//! The saga store port: what the engine and the agents' task queue need from
//! storage, with the Postgres ([`pg`]) and embedded SQLite ([`sqlite`])
//! adapters under one contract suite (`tests/src/saga_contract.rs`, run by
//! `tests/tests/saga_store.rs`).
//!
//! The engine owns instances, tasks, timers and history and changes them
//! only through [`SagaStore::commit`] (or [`SagaStore::commit_many`], many
//! at once), each transition consuming what triggered it in the same
//! transaction (an inbox row or a due timer): if the
//! trigger is already gone — a heartbeat pushed the deadline, another pass
//! took the reply — nothing is written. Agents only read their tasks and
//! write to the inbox ([`TaskQueue`]).
//!
//! Its own crate so that what serves agents (the sidecar's task API, the
//! Kafka saga transport) depends on the port and not on the engine that
//! runs on the leader (`statefabric-saga-engine`). It does not own the
//! schema: the saga tables' migrations are `statefabric-db`'s, run
//! before either adapter is opened.
#![warn(missing_docs)]

pub mod pg;
mod row;
pub mod sqlite;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use statefabric_domain::TenantId;
use statefabric_saga::machine::{Effect, Task, TimerKind};
use statefabric_saga::{Definition, Instance, SagaId, Status, TaskKey};
use tokio::sync::watch;

/// Why a saga store call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached (retry).
    #[error("saga store unavailable: {0}")]
    Unavailable(String),
    /// A newer leader exists: this instance must stop writing.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The saga changed since it was read (the write was not made).
    #[error("saga {0} changed concurrently")]
    Conflict(String),
    /// A request the store refuses (a definition version reused with other
    /// content, a bad id).
    #[error("{0}")]
    Invalid(String),
    /// The database failed the call.
    #[error("saga store: {0}")]
    Backend(String),
}

/// A saga store call's result.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The leader's term, checked in every transition's transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The lease the leader holds.
    pub lease: String,
    /// Its term: writes of an older one are refused.
    pub epoch: u64,
}

/// An instance as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stored {
    /// The tenant the saga belongs to.
    pub tenant: TenantId,
    /// Its state.
    pub instance: Instance,
    /// Increases by one with every committed transition.
    pub revision: i64,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last transition.
    pub updated_at: DateTime<Utc>,
    /// Its last forward move (what the stuck clock counts from).
    pub progressed_at: DateTime<Utc>,
    /// When it reached a final status.
    pub ended_at: Option<DateTime<Utc>>,
}

/// What a transition consumes; the commit writes nothing if it is gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// Started or changed by a direct call (an operator).
    Direct,
    /// The inbox row of this id, which must still be there.
    Inbox(i64),
    /// A timer that must still be due.
    Timer {
        /// The attempt's task key.
        key: String,
        /// Which of its timers.
        kind: TimerKind,
    },
}

/// Where one attempt of a step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// Out: waiting for a worker, or claimed and unanswered.
    Dispatched,
    /// Answered with an output.
    Completed,
    /// Answered with an error.
    Failed,
    /// Its deadline passed first.
    TimedOut,
    /// Ended by the saga (an operator's action, compensation).
    Cancelled,
}

impl TaskStatus {
    /// The stored text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dispatched => "dispatched",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::TimedOut => "timed_out",
            Self::Cancelled => "cancelled",
        }
    }

    /// From the stored text (anything unknown reads as dispatched).
    pub fn parse(s: &str) -> Self {
        match s {
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "timed_out" => Self::TimedOut,
            "cancelled" => Self::Cancelled,
            _ => Self::Dispatched,
        }
    }
}

/// How the attempt a transition answers ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Finish {
    /// The attempt.
    pub key: TaskKey,
    /// How it ended.
    pub status: TaskStatus,
    /// Its output, when completed.
    pub output: Option<Value>,
    /// Its error, when failed.
    pub error: Option<String>,
}

/// One line of a saga's history.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Record {
    /// What came in (`started`, `completed`, `timed_out`, `operator`, …).
    pub kind: String,
    /// Who: the operator, or the agent's worker.
    pub actor: Option<String>,
    /// The particulars (the task, the status reached, what was dispatched).
    pub detail: Value,
}

/// Everything one transition writes, in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The saga's tenant.
    pub tenant: TenantId,
    /// The new state.
    pub instance: Instance,
    /// The revision read (`None`: a new instance).
    pub expected: Option<i64>,
    /// What it consumes.
    pub trigger: Trigger,
    /// The attempt it answers, if one.
    pub finish: Option<Finish>,
    /// Tasks to hand out.
    pub dispatch: Vec<Task>,
    /// Timers to arm: attempt, kind, due after.
    pub timers: Vec<(TaskKey, TimerKind, Duration)>,
    /// Attempts that are over: their timers go, a task still out is
    /// cancelled.
    pub cancel: Vec<TaskKey>,
    /// Lines for the saga's history.
    pub history: Vec<Record>,
    /// Moved forward (resets the stuck clock).
    pub progressed: bool,
    /// Also write each dispatched task to the transactional outbox (the
    /// Kafka transport; Postgres only).
    pub outbox: bool,
}

impl Transition {
    /// The commit of `instance`'s new state and `effects`, with one history
    /// line: what came in (`record`), plus the tasks dispatched and the
    /// status reached. Not yet progressed, nothing finished.
    pub fn of(
        tenant: &TenantId,
        expected: Option<i64>,
        trigger: Trigger,
        instance: Instance,
        effects: &[Effect],
        mut record: Record,
    ) -> Self {
        let mut t = Self {
            tenant: tenant.clone(),
            instance,
            expected,
            trigger,
            finish: None,
            dispatch: Vec::new(),
            timers: Vec::new(),
            cancel: Vec::new(),
            history: Vec::new(),
            progressed: false,
            outbox: false,
        };
        let mut dispatched = Vec::new();
        for effect in effects {
            match effect {
                Effect::Dispatch(task) => {
                    dispatched.push(json!({"task": task.key.to_string(), "agent": task.agent, "action": task.action}));
                    t.dispatch.push(task.clone());
                }
                Effect::Timer { key, kind, after } => {
                    t.timers.push((key.clone(), *kind, *after));
                }
                Effect::Cancel { key } => t.cancel.push(key.clone()),
                Effect::Status(status) => {
                    if let Some(detail) = record.detail.as_object_mut() {
                        detail.insert("status".into(), json!(status));
                    }
                }
            }
        }
        if !dispatched.is_empty()
            && let Some(detail) = record.detail.as_object_mut()
        {
            detail.insert("dispatched".into(), Value::Array(dispatched));
        }
        t.history.push(record);
        t
    }
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Written; the new revision.
    Written(i64),
    /// The trigger was already consumed: nothing written.
    TriggerGone,
    /// A new instance whose id exists: only the trigger was consumed.
    Exists,
    /// The saga changed since the revision read: nothing written. Only
    /// [`SagaStore::commit_many`] reports it so; [`SagaStore::commit`]
    /// returns [`StoreError::Conflict`].
    Conflict,
}

/// An inbox row: a reply or a start request.
#[derive(Debug, Clone, PartialEq)]
pub struct InboxItem {
    /// The row's id (a transition's [`Trigger::Inbox`]).
    pub id: i64,
    /// The tenant it came from.
    pub tenant: TenantId,
    /// The saga it is for.
    pub saga_id: SagaId,
    /// What it says.
    pub message: InboxMessage,
    /// Who sent it (a worker's or caller's identity).
    pub sender: String,
}

/// A worker's request for tasks: up to `max` open tasks of agent type
/// `agent`, oldest first, each handed to one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim<'a> {
    /// The agent type.
    pub agent: &'a str,
    /// The claiming worker's identity.
    pub worker: &'a str,
    /// At most this many tasks.
    pub max: u32,
}

/// An agent's answer to one attempt of a task of saga `saga_id`, sent by
/// `sender` (the worker's identity, kept in the inbox row).
#[derive(Debug, Clone, PartialEq)]
pub struct Reply<'a> {
    /// The worker's identity.
    pub sender: &'a str,
    /// The saga the task is of.
    pub saga_id: &'a SagaId,
    /// The answer ([`InboxMessage::Completed`] or [`InboxMessage::Failed`]).
    pub message: InboxMessage,
}

/// A request to start a saga (the latest version of `definition`).
#[derive(Debug, Clone, PartialEq)]
pub struct StartRequest {
    /// The new saga's id (the caller's, so a retried start is a duplicate).
    pub saga_id: SagaId,
    /// The definition's name.
    pub definition: String,
    /// A JSON object.
    pub data: Value,
    /// The caller's W3C trace context, passed on to the saga's tasks.
    pub traceparent: Option<String>,
}

/// What an inbox row asks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum InboxMessage {
    /// Start a saga.
    Start {
        /// The definition's name (its latest version is used).
        definition: String,
        /// The saga's data.
        data: Value,
        /// The W3C trace context of the call that asked for the start: the
        /// saga's tasks carry it, so the whole saga is one trace.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        traceparent: Option<String>,
    },
    /// An attempt completed.
    Completed {
        /// The attempt's task key.
        key: String,
        /// What it returned.
        output: Value,
    },
    /// An attempt failed.
    Failed {
        /// The attempt's task key.
        key: String,
        /// Why.
        error: String,
    },
}

impl InboxMessage {
    /// The stored kind (`start`, `completed`, `failed`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Start { .. } => "start",
            Self::Completed { .. } => "completed",
            Self::Failed { .. } => "failed",
        }
    }

    /// The task key a reply answers (none for a start).
    pub fn task_key(&self) -> Option<&str> {
        match self {
            Self::Start { .. } => None,
            Self::Completed { key, .. } | Self::Failed { key, .. } => Some(key),
        }
    }
}

/// A timer whose time has come.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueTimer {
    /// The saga it is of.
    pub saga_id: SagaId,
    /// The attempt's task key.
    pub key: String,
    /// What it fires.
    pub kind: TimerKind,
}

/// One attempt of a step, as stored (a step execution).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TaskRow {
    /// The task key (`saga/step/visit/attempt[/undo]`).
    pub key: String,
    /// The saga it is of.
    pub saga_id: SagaId,
    /// The saga's tenant.
    pub tenant: TenantId,
    /// The step.
    pub step: String,
    /// The visit of the step.
    pub visit: u32,
    /// The attempt of the visit.
    pub attempt: u32,
    /// Whether it is the step's compensation.
    pub compensation: bool,
    /// The agent type that performs it.
    pub agent: String,
    /// What to do.
    pub action: String,
    /// The input, pointers resolved.
    pub input: Value,
    /// Its deadline after dispatch or the last heartbeat.
    pub timeout_ms: i64,
    /// Where it is.
    pub status: TaskStatus,
    /// The worker holding it, once claimed.
    pub claimed_by: Option<String>,
    /// When it was handed out.
    pub dispatched_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Its output, when completed.
    pub output: Option<Value>,
    /// Its error, when failed.
    pub error: Option<String>,
    /// The trace context the saga was started in (filled when a task is
    /// claimed), so the agent's work on it joins the saga's trace.
    pub traceparent: Option<String>,
}

/// One line of a saga's history, as stored (append-only).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HistoryEntry {
    /// The saga's revision the line was written with.
    pub revision: i64,
    /// When.
    pub at: DateTime<Utc>,
    /// What came in.
    pub kind: String,
    /// Who.
    pub actor: Option<String>,
    /// The leader's term that wrote it (none in the embedded mode).
    pub epoch: Option<i64>,
    /// The particulars.
    pub detail: Value,
}

/// Which sagas to list.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct Filter {
    /// Only of this definition.
    pub definition: Option<String>,
    /// Only in this status.
    pub status: Option<Status>,
    /// Only of this tenant.
    pub tenant: Option<TenantId>,
    /// Started before this.
    pub started_before: Option<DateTime<Utc>>,
    /// Still open and without progress since this (stuck candidates).
    pub idle_since: Option<DateTime<Utc>>,
    /// At most this many, newest first.
    pub limit: Option<u32>,
}

/// A saga in a list.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Its id.
    pub saga_id: SagaId,
    /// Its tenant.
    pub tenant: TenantId,
    /// Its definition's name.
    pub definition: String,
    /// The definition's version it runs on.
    pub version: u32,
    /// Where it is.
    pub status: Status,
    /// Paused by an operator.
    pub paused: bool,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last forward move.
    pub progressed_at: DateTime<Utc>,
    /// When it ended.
    pub ended_at: Option<DateTime<Utc>>,
}

/// The engine's side.
#[async_trait]
pub trait SagaStore: Send + Sync + std::fmt::Debug + 'static {
    /// Records a definition version; the same version with other content is
    /// refused (`Invalid`).
    async fn save_definition(&self, definition: &Definition) -> Result<()>;

    /// Every recorded definition version (the engine's registry at start).
    async fn definitions(&self) -> Result<Vec<Definition>>;

    /// A saga as stored.
    async fn load(&self, saga_id: &SagaId) -> Result<Option<Stored>>;

    /// Commits one transition, if `fence` is still the newest term; a saga
    /// changed since its read is [`StoreError::Conflict`].
    async fn commit(&self, fence: Option<&Fence>, transition: Transition) -> Result<Committed>;

    /// Commits `transitions` in order in one transaction, one outcome each
    /// (the engine's passes: one round trip and one flush for many). A
    /// transition whose saga changed writes nothing and comes back as
    /// [`Committed::Conflict`] while the others commit; so does every later
    /// one of the same saga, whose expected revision it no longer matches.
    /// An error (fenced, unavailable) means nothing was written.
    async fn commit_many(
        &self,
        fence: Option<&Fence>,
        transitions: Vec<Transition>,
    ) -> Result<Vec<Committed>>;

    /// The oldest inbox rows.
    async fn inbox(&self, limit: u32) -> Result<Vec<InboxItem>>;

    /// Records an agent's reply that arrived over Kafka, as
    /// [`TaskQueue::reply`] does for the sidecars (same checks, any tenant).
    async fn accept_reply(&self, tenant: &TenantId, reply: Reply<'_>) -> Result<Replied>;

    /// Drops an inbox row that cannot be applied (a start for an unknown
    /// definition, a reply for an unknown saga).
    async fn discard(&self, fence: Option<&Fence>, inbox_id: i64) -> Result<()>;

    /// Timers due now (by the store's clock), oldest first.
    async fn due_timers(&self, limit: u32) -> Result<Vec<DueTimer>>;

    /// How long until the earliest timer fires (zero when one is due);
    /// `None` when there is no timer. The engine sleeps until then instead
    /// of polling.
    async fn next_timer_in(&self) -> Result<Option<Duration>>;

    /// The sagas `filter` asks for, newest first.
    async fn list(&self, filter: &Filter) -> Result<Vec<Summary>>;

    /// A saga's history, oldest first.
    async fn history(&self, saga_id: &SagaId) -> Result<Vec<HistoryEntry>>;

    /// A saga's tasks (every attempt of every step), oldest first.
    async fn tasks(&self, saga_id: &SagaId) -> Result<Vec<TaskRow>>;

    /// Open sagas of `definition` without progress since `since`, and those
    /// STUCK.
    async fn count_stalled(&self, definition: &str, since: DateTime<Utc>) -> Result<i64>;

    /// Dispatched, unanswered tasks per tenant and agent type: the queue
    /// depth autoscalers scale agent Deployments on.
    async fn open_tasks(&self) -> Result<Vec<OpenTasks>>;

    /// Changes when the inbox may have new rows. Subscribe before reading
    /// the inbox, so nothing that arrives in between is missed.
    fn inbox_signal(&self) -> watch::Receiver<u64>;

    /// Whether [`Self::inbox_signal`] changes for every inbox row. It does
    /// when one process owns the store and writes every row itself; when
    /// other processes write and their notifications can be lost (a
    /// dropped `LISTEN` connection), an idle engine also looks every tick.
    fn inbox_signal_is_complete(&self) -> bool {
        false
    }

    /// Appends an operator's action on a saga to the saga's tenant's audit
    /// log (`audit_log`, action `saga.operator.<action>`), beside the
    /// record in the saga's own history.
    async fn audit_operator(&self, entry: &OperatorAudit) -> Result<()>;
}

/// One operator action, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct OperatorAudit {
    /// The saga's tenant (whose audit log gets the row).
    pub tenant: TenantId,
    /// The operator's name.
    pub operator: String,
    /// The action's name (`retry`, `skip`, `cancel`, ...).
    pub action: String,
    /// The saga acted on.
    pub saga_id: SagaId,
    /// The outcome (`applied`, or `refused` and why) and the particulars.
    pub details: Value,
}

impl OperatorAudit {
    /// The audit log's action name.
    pub fn action_name(&self) -> String {
        format!("saga.operator.{}", self.action)
    }
}

/// Dispatched, unanswered tasks of one tenant's agent type.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct OpenTasks {
    /// The tenant.
    pub tenant: String,
    /// The agent type.
    pub agent: String,
    /// Waiting for a worker to claim them.
    pub waiting: i64,
    /// Claimed by a worker and not yet answered.
    pub claimed: i64,
}

impl OpenTasks {
    /// The same statement for both adapters (`SUM(CASE ...)`, which SQLite
    /// and Postgres both read as an integer).
    const QUERY: &'static str = "SELECT tenant_id AS tenant, agent,
                SUM(CASE WHEN claimed_by IS NULL THEN 1 ELSE 0 END) AS waiting,
                SUM(CASE WHEN claimed_by IS NULL THEN 0 ELSE 1 END) AS claimed
           FROM saga_tasks WHERE status = 'dispatched'
          GROUP BY tenant_id, agent ORDER BY tenant_id, agent";
}

/// What happened to a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replied {
    /// Queued in the inbox for the engine.
    Accepted,
    /// The same answer for this attempt is already recorded (waiting in the
    /// inbox, or applied): a repeat, with no second effect.
    Duplicate,
    /// The attempt is over (answered, timed out, cancelled).
    NotCurrent,
    /// No such task.
    Unknown,
}

/// What happened to a start request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartRequested {
    /// Queued in the inbox for the engine.
    Accepted,
    /// A saga with this id exists or is being started.
    Exists,
    /// No definition of that name is registered.
    UnknownDefinition,
}

/// The agents' side, for one tenant (the sidecar's).
#[async_trait]
pub trait TaskQueue: Send + Sync + std::fmt::Debug + 'static {
    /// Hands up to `max` open tasks of `agent` to `worker`, oldest first;
    /// each task goes to one worker.
    async fn claim(&self, tenant: &TenantId, claim: Claim<'_>) -> Result<Vec<TaskRow>>;

    /// Pushes the attempt's deadline a full timeout ahead; `None` when the
    /// attempt is over (the worker should stop).
    async fn heartbeat(&self, tenant: &TenantId, key: &str) -> Result<Option<DateTime<Utc>>>;

    /// Queues an agent's answer to its task's attempt for the engine, if
    /// that attempt is still the one out.
    async fn reply(&self, tenant: &TenantId, reply: Reply<'_>) -> Result<Replied>;

    /// Queues a request to start a saga for the engine.
    async fn request_start(
        &self,
        tenant: &TenantId,
        sender: &str,
        start: StartRequest,
    ) -> Result<StartRequested>;

    /// Offers claimed, unanswered tasks to other workers again: `keys`, or
    /// every claim of the tenant (`None`: at start of the embedded mode,
    /// where no earlier worker can still be alive). Returns how many.
    async fn release(&self, tenant: &TenantId, keys: Option<&[String]>) -> Result<u64>;

    /// Changes when tasks for `agent` may have arrived. Subscribe before
    /// claiming, so nothing that arrives in between is missed.
    fn tasks_signal(&self, tenant: &TenantId, agent: &str) -> watch::Receiver<u64>;
}

/// Why a reply was not queued, from what its attempt's row says now.
pub(crate) fn not_queued(kind: &str, status: Option<TaskStatus>) -> Replied {
    match status {
        None => Replied::Unknown,
        // Another answer for it waits in the inbox.
        Some(TaskStatus::Dispatched) => Replied::Duplicate,
        Some(TaskStatus::Completed) if kind == "completed" => Replied::Duplicate,
        Some(TaskStatus::Failed) if kind == "failed" => Replied::Duplicate,
        Some(_) => Replied::NotCurrent,
    }
}

pub(crate) fn timer_kind_str(kind: TimerKind) -> &'static str {
    match kind {
        TimerKind::Deadline => "deadline",
        TimerKind::Retry => "retry",
    }
}

pub(crate) fn parse_timer_kind(s: &str) -> TimerKind {
    if s == "retry" {
        TimerKind::Retry
    } else {
        TimerKind::Deadline
    }
}

pub(crate) fn status_str(status: Status) -> String {
    status.to_string()
}

pub(crate) fn parse_status(s: &str) -> Result<Status> {
    serde_json::from_value(Value::String(s.to_owned()))
        .map_err(|_| StoreError::Backend(format!("unknown saga status {s:?} in the store")))
}

fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
