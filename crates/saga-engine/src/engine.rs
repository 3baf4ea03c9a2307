//! The engine: drives every saga on the leader.
//!
//! A pass reads the inbox (replies, start requests) and the due timers
//! (deadlines, retry delays), groups them by saga, and applies each to its
//! saga in order ([`Instance::apply`] on the state last written), each
//! giving a transition: the new state with the effects and the consumed
//! trigger. The pass commits its transitions in batches, a batch in one
//! fenced transaction ([`SagaStore::commit_many`]), a few batches at once;
//! a saga is in one batch at a time and an operator call on it waits for
//! that batch. Nothing lives only in memory: after a crash or a change of
//! leader the next pass finds the same inbox rows and timers and carries
//! on; a trigger already consumed is skipped, so no reply has a second
//! effect.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Value, json};
use statefabric_domain::TenantId;
use statefabric_leader::{Leadership, Role};
use statefabric_saga::machine::{Effect, Input, OperatorAction};
use statefabric_saga::{
    Definition, DefinitionError, Instance, Registry, SagaError, SagaId, Status, TaskKey,
};

use crate::metrics::{DefinitionLabel, Metrics, TaskQueueLabels};
use statefabric_saga_store::{
    Committed, Fence, Finish, Record, SagaStore, StartRequest, StoreError, Stored, TaskStatus,
    Transition, Trigger,
};

mod busy;
mod passes;

/// Why an engine call (start, operator action, registration) failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Only the leader changes sagas; this instance is not it.
    #[error("this control plane is not the leader; retry on the leader")]
    NotLeader,
    /// No saga with this id.
    #[error("no saga {0}")]
    UnknownSaga(String),
    /// No registered definition with this name (and version).
    #[error("no saga definition {0}")]
    UnknownDefinition(String),
    /// A saga with this id was started before.
    #[error("saga {0} already exists")]
    Exists(String),
    /// A request the engine refuses (the reason says why).
    #[error("{0}")]
    Invalid(String),
    /// The saga's state does not allow the action (e.g. resume a running saga).
    #[error(transparent)]
    NotAllowed(#[from] SagaError),
    /// A definition that does not validate.
    #[error(transparent)]
    Definition(#[from] DefinitionError),
    /// The saga store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An engine call's result.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// How the engine batches and paces its work.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    /// The leader lease whose epoch fences every write.
    pub lease: String,
    /// Inbox rows and due timers read per pass.
    pub batch: u32,
    /// Sagas whose transitions are committed together, in one transaction.
    pub commit_batch: usize,
    /// Batches committed at once.
    pub concurrency: usize,
    /// The longest wait between passes when idle. Passes run when inbox
    /// rows arrive (a signal) and when the next timer is due; the tick only
    /// bounds how late a row the signal missed is seen, so it is not used
    /// with a store whose signal misses nothing (the embedded one).
    pub tick: Duration,
    /// How often the stalled-sagas gauge is refreshed.
    pub stalled_every: Duration,
    /// Tasks also go through the transactional outbox to Kafka (the Kafka
    /// transport); otherwise agents' sidecars take them from the tasks
    /// table.
    pub outbox: bool,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            lease: "control-plane".into(),
            batch: 512,
            commit_batch: 64,
            concurrency: 4,
            tick: Duration::from_secs(1),
            stalled_every: Duration::from_secs(15),
            outbox: false,
        }
    }
}

/// The saga engine: starts sagas, applies replies, fires timers and runs
/// operator actions, committing every transition fenced by the leader's
/// epoch: it changes sagas only while its instance leads.
#[derive(Debug)]
pub struct Engine {
    store: Arc<dyn SagaStore>,
    registry: RwLock<Registry>,
    leadership: Leadership,
    settings: EngineSettings,
    metrics: Metrics,
    busy: busy::Busy,
    /// When each attempt this process dispatched went out (step latency).
    sent: Mutex<HashMap<String, Instant>>,
    /// Open sagas as last written by this leader, to skip a read per
    /// transition. Only the leader writes, and every write checks the
    /// revision it read, so a stale entry (a former leader's late write)
    /// costs one conflict and a fresh read; cleared at each new term.
    cache: Mutex<HashMap<SagaId, Stored>>,
    /// The open-task series last exported, so emptied queues read zero.
    open_task_series: Mutex<Vec<TaskQueueLabels>>,
    /// Wakes an idle pass loop after a transition committed outside it (an
    /// operator's start or action), which may have set an earlier timer.
    committed_directly: tokio::sync::Notify,
}

/// A transition computed from a saga's state, not yet committed.
struct Planned {
    transition: Transition,
    after: After,
}

/// What the engine records once a planned transition is written.
struct After {
    /// The saga as it will be stored (the store says its revision).
    next: Stored,
    def: Arc<Definition>,
    effects: Vec<Effect>,
    /// The attempt the transition answered, when it was accepted.
    answered: Option<(TaskKey, TaskStatus)>,
    /// A new saga.
    started: bool,
}

/// Past this many cached sagas the cache starts afresh.
const CACHE_LIMIT: usize = 200_000;

impl Engine {
    /// Loads the stored definitions and records `definitions` (new
    /// versions are stored; a changed version is refused).
    pub async fn new(
        store: Arc<dyn SagaStore>,
        leadership: Leadership,
        settings: EngineSettings,
        definitions: Vec<Definition>,
    ) -> Result<Self> {
        let engine = Self {
            store,
            registry: RwLock::new(Registry::default()),
            leadership,
            settings,
            metrics: Metrics::default(),
            busy: busy::Busy::default(),
            sent: Mutex::default(),
            cache: Mutex::default(),
            open_task_series: Mutex::default(),
            committed_directly: tokio::sync::Notify::new(),
        };
        engine.reload().await?;
        for definition in definitions {
            engine.register(definition).await?;
        }
        Ok(engine)
    }

    /// Its Prometheus metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The saga store it commits to.
    pub fn store(&self) -> &Arc<dyn SagaStore> {
        &self.store
    }

    /// The definitions known now.
    pub fn registry(&self) -> Registry {
        self.registry
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Validates, stores and adds a definition version.
    pub async fn register(&self, definition: Definition) -> Result<Arc<Definition>> {
        statefabric_saga::validate::validate(&definition)?;
        // Refused here first if the version exists with other content.
        self.registry().register(definition.clone())?;
        self.store.save_definition(&definition).await?;
        Ok(self
            .registry
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .register(definition)?)
    }

    async fn reload(&self) -> Result<()> {
        let stored = self.store.definitions().await?;
        let mut registry = self
            .registry
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for definition in stored {
            registry.register(definition)?;
        }
        Ok(())
    }

    fn definition(&self, name: &str, version: u32) -> Option<Arc<Definition>> {
        self.registry
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name, version)
    }

    fn latest(&self, name: &str) -> Option<Arc<Definition>> {
        self.registry
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .latest(name)
    }

    fn cached(&self, saga: &SagaId) -> Option<Stored> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(saga)
            .cloned()
    }

    fn remember(&self, stored: Stored) {
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if stored.instance.status.is_final() {
            cache.remove(&stored.instance.id);
            return;
        }
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(stored.instance.id.clone(), stored);
    }

    fn forget(&self, saga: &SagaId) {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(saga);
    }

    fn fence(&self) -> Result<Fence> {
        match self.leadership.role() {
            Role::Leader { epoch } => Ok(Fence {
                lease: self.settings.lease.clone(),
                epoch,
            }),
            Role::Follower => Err(EngineError::NotLeader),
        }
    }

    /// Starts a saga now (the operator API). `id` defaults to a new UUID.
    pub async fn start(
        &self,
        tenant: &TenantId,
        id: Option<SagaId>,
        definition: &str,
        data: Value,
        actor: &str,
    ) -> Result<Stored> {
        let id = match id {
            Some(id) => id,
            None => SagaId::new(uuid::Uuid::now_v7().to_string())
                .map_err(|e| EngineError::Invalid(e.to_string()))?,
        };
        let fence = self.fence()?;
        let _turn = self.busy.take(&id).await;
        let start = StartRequest {
            saga_id: id.clone(),
            definition: definition.to_owned(),
            data,
            traceparent: None,
        };
        let Planned { transition, after } =
            self.plan_start(tenant, start, actor, Trigger::Direct)?;
        match self.store.commit(Some(&fence), transition).await? {
            Committed::Exists => Err(EngineError::Exists(id.to_string())),
            committed => {
                if let Committed::Written(revision) = committed {
                    self.settle(after, revision);
                    self.committed_directly.notify_one();
                }
                self.store
                    .load(&id)
                    .await?
                    .ok_or_else(|| EngineError::UnknownSaga(id.to_string()))
            }
        }
    }

    /// A new saga's first transition.
    fn plan_start(
        &self,
        tenant: &TenantId,
        start: StartRequest,
        actor: &str,
        trigger: Trigger,
    ) -> Result<Planned> {
        let StartRequest {
            saga_id: id,
            definition,
            data,
            traceparent,
        } = start;
        let def = self
            .latest(&definition)
            .ok_or_else(|| EngineError::UnknownDefinition(definition.clone()))?;
        if !data.is_object() {
            return Err(EngineError::Invalid(
                "the saga's data must be a JSON object".into(),
            ));
        }
        let (mut instance, effects) = Instance::start(&def, id, data.clone());
        instance.traceparent = traceparent;
        let record = Record {
            kind: "started".into(),
            actor: Some(actor.to_owned()),
            detail: json!({"definition": def.name, "version": def.version, "data": data}),
        };
        let mut transition =
            self.transition(tenant, None, trigger, instance.clone(), &effects, record);
        transition.progressed = true;
        let now = Utc::now();
        Ok(Planned {
            transition,
            after: After {
                next: Stored {
                    tenant: tenant.clone(),
                    instance,
                    revision: 1,
                    started_at: now,
                    updated_at: now,
                    progressed_at: now,
                    ended_at: None,
                },
                def,
                effects,
                answered: None,
                started: true,
            },
        })
    }

    /// An operator's action on a saga; refused (and nothing changes) when it
    /// does not fit the saga's state.
    pub async fn operate(
        &self,
        saga_id: &SagaId,
        action: OperatorAction,
        actor: &str,
    ) -> Result<Stored> {
        let fence = self.fence()?;
        let _turn = self.busy.take(saga_id).await;
        let detail = json!({"operator": serde_json::to_value(&action).unwrap_or(Value::Null)});
        let record = Record {
            kind: format!("operator_{}", action.name()),
            actor: Some(actor.to_owned()),
            detail,
        };
        self.advance(
            &fence,
            saga_id,
            Trigger::Direct,
            Input::Operator(action),
            record,
        )
        .await?;
        self.store
            .load(saga_id)
            .await?
            .ok_or_else(|| EngineError::UnknownSaga(saga_id.to_string()))
    }

    /// [`Transition::of`], through the outbox when configured.
    fn transition(
        &self,
        tenant: &TenantId,
        expected: Option<i64>,
        trigger: Trigger,
        instance: Instance,
        effects: &[Effect],
        record: Record,
    ) -> Transition {
        // One span per transition, in the saga's trace (the context it was
        // started in), naming what moved it and where it went.
        let span = tracing::info_span!(
            "saga.transition",
            saga.id = %instance.id,
            saga.definition = %instance.definition,
            saga.event = %record.kind,
            saga.status = ?instance.status,
            saga.effects = effects.len(),
        );
        statefabric_runtime::trace_context::continue_from_values(
            &span,
            instance.traceparent.as_deref(),
            None,
        );
        let _in_span = span.enter();
        Transition {
            outbox: self.settings.outbox,
            ..Transition::of(tenant, expected, trigger, instance, effects, record)
        }
    }

    /// Applies `input` to the saga and commits. Returns `false` when the
    /// trigger was already consumed.
    async fn advance(
        &self,
        fence: &Fence,
        saga_id: &SagaId,
        trigger: Trigger,
        input: Input,
        record: Record,
    ) -> Result<bool> {
        let mut current = None;
        let stored = self.current(&mut current, saga_id).await?;
        let Planned { transition, after } = self.plan(stored, trigger, input, record)?;
        match self.store.commit(Some(fence), transition).await {
            Ok(Committed::Written(revision)) => {
                self.settle(after, revision);
                self.committed_directly.notify_one();
                Ok(true)
            }
            Ok(_) => Ok(false),
            Err(StoreError::Conflict(e)) => {
                self.forget(saga_id);
                self.metrics.conflicts.inc();
                Err(StoreError::Conflict(e).into())
            }
            Err(e) => {
                self.forget(saga_id);
                Err(e.into())
            }
        }
    }

    /// The saga in `slot`, read into it (from the cache or the store) when
    /// empty.
    async fn current<'s>(
        &self,
        slot: &'s mut Option<Stored>,
        saga_id: &SagaId,
    ) -> Result<&'s Stored> {
        if slot.is_none() {
            *slot = match self.cached(saga_id) {
                Some(stored) => Some(stored),
                None => self.store.load(saga_id).await?,
            };
        }
        slot.as_ref()
            .ok_or_else(|| EngineError::UnknownSaga(saga_id.to_string()))
    }

    /// The transition `input` makes from `stored`.
    fn plan(
        &self,
        stored: &Stored,
        trigger: Trigger,
        input: Input,
        mut record: Record,
    ) -> Result<Planned> {
        let instance = &stored.instance;
        let def = self
            .definition(&instance.definition, instance.version)
            .ok_or_else(|| {
                EngineError::UnknownDefinition(format!(
                    "{} version {}",
                    instance.definition, instance.version
                ))
            })?;
        let mut next = stored.instance.clone();
        let answered = match &input {
            Input::Completed { key, .. } => Some((key.clone(), TaskStatus::Completed)),
            Input::Failed { key, .. } => Some((key.clone(), TaskStatus::Failed)),
            Input::TimedOut { key } => Some((key.clone(), TaskStatus::TimedOut)),
            _ => None,
        };
        let (output, error) = match &input {
            Input::Completed { output, .. } => (Some(output.clone()), None),
            Input::Failed { error, .. } => (None, Some(error.clone())),
            _ => (None, None),
        };
        let is_operator = matches!(input, Input::Operator(_));
        let effects = next.apply(&def, input, fastrand::f64())?;
        let accepted = !effects.is_empty() || is_operator;
        if !accepted {
            record.kind = format!("ignored_{}", record.kind);
        }
        let mut transition = self.transition(
            &stored.tenant,
            Some(stored.revision),
            trigger,
            next.clone(),
            &effects,
            record,
        );
        transition.progressed = accepted;
        let answered = answered.filter(|_| accepted);
        if let Some((key, status)) = &answered {
            transition.finish = Some(Finish {
                key: key.clone(),
                status: *status,
                output,
                error,
            });
        }
        let now = Utc::now();
        Ok(Planned {
            transition,
            after: After {
                next: Stored {
                    instance: next,
                    revision: stored.revision + 1,
                    updated_at: now,
                    progressed_at: if accepted { now } else { stored.progressed_at },
                    ended_at: None,
                    ..stored.clone()
                },
                def,
                effects,
                answered,
                started: false,
            },
        })
    }

    /// Records a committed transition: the cache, metrics, step timings.
    fn settle(&self, after: After, revision: i64) {
        let After {
            next,
            def,
            effects,
            answered,
            started,
        } = after;
        let started_at = next.started_at;
        self.remember(Stored { revision, ..next });
        if started {
            self.metrics
                .started
                .get_or_create(&DefinitionLabel {
                    definition: def.name.clone(),
                })
                .inc();
        } else {
            self.metrics.transitions.inc();
        }
        if let Some((key, status)) = answered {
            self.observe_answer(&def, &key, status);
        }
        self.observe(&def, &effects, started_at);
    }

    fn observe_answer(&self, def: &Definition, key: &TaskKey, status: TaskStatus) {
        let labels = self.metrics.step(&def.name, &key.step);
        if status == TaskStatus::TimedOut {
            self.metrics.step_timeouts.get_or_create(&labels).inc();
        }
        let sent = self
            .sent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&key.to_string());
        if let Some(sent) = sent {
            self.metrics
                .step_latency
                .get_or_create(&labels)
                .observe(sent.elapsed().as_secs_f64());
        }
    }

    fn observe(&self, def: &Definition, effects: &[Effect], started_at: chrono::DateTime<Utc>) {
        for effect in effects {
            match effect {
                Effect::Dispatch(task) => {
                    let labels = self.metrics.step(&def.name, &task.key.step);
                    self.metrics.step_dispatched.get_or_create(&labels).inc();
                    if task.key.attempt > 1 {
                        self.metrics.step_retries.get_or_create(&labels).inc();
                    }
                    self.sent
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .insert(task.key.to_string(), Instant::now());
                }
                Effect::Cancel { key } => {
                    self.sent
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .remove(&key.to_string());
                }
                Effect::Status(status) if status.is_final() || *status == Status::Stuck => {
                    let outcome = status.to_string().to_lowercase();
                    self.metrics.outcome(&def.name, &outcome);
                    if status.is_final() {
                        let took = (Utc::now() - started_at).to_std().unwrap_or_default();
                        self.metrics.observe_duration(&def.name, took, def.sla);
                    }
                }
                _ => {}
            }
        }
    }
}
