//! The saga store contract, run against every adapter of `SagaStore` and
//! `TaskQueue` (`tests/tests/saga_store.rs`): embedded SQLite and Postgres.
//! Each test works in its own tenant, so tests sharing a database do not
//! see each other's tasks.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use statefabric_domain::TenantId;
use statefabric_saga::machine::Effect;
use statefabric_saga::{Definition, Input, Instance, SagaId, Status, TaskKey, builtin};
use statefabric_saga_store::{
    Claim, Committed, Fence, Filter, InboxMessage, OpenTasks, OperatorAudit, Record, Replied,
    Reply, SagaStore, StartRequest, StartRequested, StoreError, TaskQueue, TaskRow, TaskStatus,
    Transition, Trigger,
};

/// One adapter: the engine's side, the agents' side, and the tenant the
/// agents' side serves.
#[derive(Debug, Clone)]
pub struct Fixture {
    pub store: Arc<dyn SagaStore>,
    pub queue: Arc<dyn TaskQueue>,
    pub tenant: String,
    pub fence: Option<Fence>,
    /// The audit log as the tenant's application reads it.
    pub audit: Arc<dyn statefabric_store::audit::AuditLog>,
}

impl Fixture {
    /// The tenant as the ports take it.
    pub fn tenant_id(&self) -> TenantId {
        TenantId::new(self.tenant.clone()).expect("the fixture's tenant is a valid id")
    }

    /// Up to `max` of the fixture tenant's tasks for `agent`, claimed by `worker`.
    pub async fn claim(
        &self,
        agent: &str,
        worker: &str,
        max: u32,
    ) -> Result<Vec<TaskRow>, StoreError> {
        self.queue
            .claim(&self.tenant_id(), Claim { agent, worker, max })
            .await
    }
}

#[macro_export]
macro_rules! saga_contract_tests {
    ($fixture:expr) => {
        $crate::saga_contract_tests!(@each $fixture;
            a_reply_is_applied_once_and_late_replies_change_nothing,
            stale_revisions_and_existing_ids_are_refused,
            deadlines_fire_when_due_and_heartbeats_push_them,
            start_requests_are_idempotent_and_checked,
            definition_versions_are_immutable,
            sagas_are_listed_by_filter,
            a_batch_commits_each_transition_or_says_why_not,
            concurrent_answers_and_starts_each_get_their_own_outcome,
            open_tasks_are_counted_per_tenant_and_agent_type,
            released_tasks_wake_the_next_worker_under_the_same_key,
            operator_actions_are_audited_under_the_sagas_tenant,
        );
    };
    (@each $fixture:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() -> anyhow::Result<()> {
                $crate::saga_contract::$name($fixture.await?).await
            }
        )*
    };
}

fn id() -> SagaId {
    SagaId::new(format!("saga-{}", uuid::Uuid::new_v4().simple())).expect("a valid saga id")
}

/// The commit for `effects` of a transition of `instance`.
pub fn transition(
    tenant: &TenantId,
    instance: Instance,
    expected: Option<i64>,
    trigger: Trigger,
    effects: &[Effect],
) -> Transition {
    let record = Record {
        kind: "test".into(),
        actor: Some("contract".into()),
        detail: json!({}),
    };
    Transition {
        progressed: true,
        ..Transition::of(tenant, expected, trigger, instance, effects, record)
    }
}

/// The trace context the sagas these tests start were started in.
const SAGA_TRACE: &str = "00-8bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

async fn started(f: &Fixture, definition: &Definition) -> anyhow::Result<Instance> {
    f.store.save_definition(definition).await?;
    let (mut instance, effects) = Instance::start(definition, id(), json!({"task": "t"}));
    instance.traceparent = Some(SAGA_TRACE.to_owned());
    let t = transition(
        &f.tenant_id(),
        instance.clone(),
        None,
        Trigger::Direct,
        &effects,
    );
    assert_eq!(
        f.store.commit(f.fence.as_ref(), t).await?,
        Committed::Written(1)
    );
    Ok(instance)
}

pub async fn a_reply_is_applied_once_and_late_replies_change_nothing(
    f: Fixture,
) -> anyhow::Result<()> {
    let def = builtin::plan_code_critique();
    let instance = started(&f, &def).await?;
    let stored = f.store.load(&instance.id).await?.expect("stored");
    assert_eq!(
        (stored.revision, stored.instance.status),
        (1, Status::Running)
    );
    let claimed = f.claim("planner", "w1", 10).await?;
    assert_eq!(claimed.len(), 1, "one PLAN task for this tenant");
    let task = &claimed[0];
    assert_eq!(
        task.traceparent.as_deref(),
        Some(SAGA_TRACE),
        "a claimed task carries its saga's trace context"
    );
    assert_eq!(
        (task.step.as_str(), task.attempt, task.claimed_by.as_deref()),
        ("PLAN", 1, Some("w1"))
    );
    assert!(
        f.claim("planner", "w2", 10).await?.is_empty(),
        "a task goes to one worker"
    );
    let reply = InboxMessage::Completed {
        key: task.key.clone(),
        output: json!({"plan": 1}),
    };
    let sent = f
        .queue
        .reply(
            &f.tenant_id(),
            Reply {
                sender: "w1",
                saga_id: &instance.id,
                message: reply.clone(),
            },
        )
        .await?;
    assert_eq!(sent, Replied::Accepted);
    assert_eq!(
        f.queue
            .reply(
                &f.tenant_id(),
                Reply {
                    sender: "w1",
                    saga_id: &instance.id,
                    message: reply.clone()
                }
            )
            .await?,
        Replied::Duplicate
    );
    let inbox = f.store.inbox(10_000).await?;
    let item = inbox
        .iter()
        .find(|i| i.saga_id == instance.id)
        .expect("the reply is in the inbox");
    assert_eq!(item.message, reply);

    let mut next = stored.instance.clone();
    let key = task.key.parse::<TaskKey>().expect("key");
    let effects = next.apply(
        &def,
        Input::Completed {
            key,
            output: json!({"plan": 1}),
        },
        0.5,
    )?;
    let t = transition(
        &f.tenant_id(),
        next.clone(),
        Some(1),
        Trigger::Inbox(item.id),
        &effects,
    );
    assert_eq!(
        f.store.commit(f.fence.as_ref(), t.clone()).await?,
        Committed::Written(2)
    );
    let again = Transition {
        expected: Some(2),
        ..t
    };
    assert_eq!(
        f.store.commit(f.fence.as_ref(), again).await?,
        Committed::TriggerGone,
        "the same inbox row cannot drive a second transition"
    );
    assert_eq!(f.store.load(&instance.id).await?.expect("saga").revision, 2);
    let tasks = f.store.tasks(&instance.id).await?;
    let code = tasks
        .iter()
        .find(|t| t.step == "CODE")
        .expect("CODE dispatched");
    assert_eq!(code.status, TaskStatus::Dispatched);
    assert_eq!(
        f.queue
            .reply(
                &f.tenant_id(),
                Reply {
                    sender: "w1",
                    saga_id: &instance.id,
                    message: reply
                }
            )
            .await?,
        Replied::NotCurrent,
        "the PLAN attempt was cancelled by the transition"
    );
    let unknown = InboxMessage::Failed {
        key: format!("{}/NOPE/1/1", instance.id),
        error: "x".into(),
    };
    assert_eq!(
        f.queue
            .reply(
                &f.tenant_id(),
                Reply {
                    sender: "w1",
                    saga_id: &instance.id,
                    message: unknown
                }
            )
            .await?,
        Replied::Unknown
    );
    let history = f.store.history(&instance.id).await?;
    assert_eq!(
        history.iter().map(|h| h.revision).collect::<Vec<_>>(),
        vec![1, 2]
    );
    Ok(())
}

/// A claimed task released (its worker went away) goes to the next worker
/// under the same key, and workers waiting for the agent type are woken —
/// in every process (Postgres: the tasks `NOTIFY`).
pub async fn released_tasks_wake_the_next_worker_under_the_same_key(
    f: Fixture,
) -> anyhow::Result<()> {
    let def = builtin::plan_code_critique();
    started(&f, &def).await?;
    let claimed = f.claim("planner", "w1", 10).await?;
    assert_eq!(claimed.len(), 1, "the PLAN task");
    let key = claimed[0].key.clone();
    let mut waiting = f.queue.tasks_signal(&f.tenant_id(), "planner");
    // A listener wakes everyone once when it (re)connects: let that pass,
    // so only the release can wake the worker below.
    tokio::time::sleep(Duration::from_millis(500)).await;
    waiting.borrow_and_update();
    assert_eq!(
        f.queue
            .release(&f.tenant_id(), Some(std::slice::from_ref(&key)))
            .await?,
        1
    );
    tokio::time::timeout(Duration::from_secs(5), waiting.changed())
        .await
        .map_err(|_| anyhow::anyhow!("a waiting worker was not woken"))??;
    let again = f.claim("planner", "w2", 10).await?;
    let keys: Vec<&str> = again.iter().map(|t| t.key.as_str()).collect();
    assert_eq!(keys, [key.as_str()]);
    assert_eq!(again[0].claimed_by.as_deref(), Some("w2"));
    assert_eq!(
        f.queue
            .release(&f.tenant_id(), Some(&["no-saga/PLAN/1/1".to_owned()]))
            .await?,
        0,
        "an unknown key releases nothing"
    );
    Ok(())
}

pub async fn stale_revisions_and_existing_ids_are_refused(f: Fixture) -> anyhow::Result<()> {
    let def = builtin::plan_code_critique();
    let instance = started(&f, &def).await?;
    let mut paused = instance.clone();
    paused.apply(
        &def,
        Input::Operator(statefabric_saga::OperatorAction::Pause),
        0.0,
    )?;
    let t = transition(&f.tenant_id(), paused, Some(1), Trigger::Direct, &[]);
    assert_eq!(
        f.store.commit(f.fence.as_ref(), t.clone()).await?,
        Committed::Written(2)
    );
    match f.store.commit(f.fence.as_ref(), t).await {
        Err(StoreError::Conflict(_)) => {}
        other => anyhow::bail!("a stale revision must conflict, got {other:?}"),
    }
    let fresh = transition(&f.tenant_id(), instance.clone(), None, Trigger::Direct, &[]);
    assert_eq!(
        f.store.commit(f.fence.as_ref(), fresh).await?,
        Committed::Exists
    );
    let stored = f.store.load(&instance.id).await?.expect("saga");
    assert!(
        stored.instance.paused && stored.revision == 2,
        "nothing else changed"
    );
    Ok(())
}

const SHORT: &str = r#"
name: short-timeouts
version: 1
start: A
steps:
  A:
    agent: worker
    action: a
    timeout: 1500ms
    retry: {max_attempts: 2, initial_backoff: 10ms, max_backoff: 10ms, multiplier: 1, jitter: 0}
    compensation: none
"#;

pub async fn deadlines_fire_when_due_and_heartbeats_push_them(f: Fixture) -> anyhow::Result<()> {
    let def = Definition::from_yaml(SHORT)?;
    let instance = started(&f, &def).await?;
    let key = format!("{}/A/1/1", instance.id);
    let ours =
        |timers: Vec<statefabric_saga_store::DueTimer>| timers.into_iter().any(|t| t.key == key);
    assert!(!ours(f.store.due_timers(10_000).await?), "not due yet");
    let next = f.store.next_timer_in().await?.expect("a timer is set");
    assert!(
        next <= Duration::from_millis(1500),
        "the deadline is the earliest timer or later ones are earlier: {next:?}"
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(
        f.queue.heartbeat(&f.tenant_id(), &key).await?.is_some(),
        "pushed"
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(
        !ours(f.store.due_timers(10_000).await?),
        "the heartbeat pushed the deadline a full timeout ahead"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let due = f.store.due_timers(10_000).await?;
    assert!(ours(due), "due after a full timeout without heartbeat");
    assert_eq!(
        f.store.next_timer_in().await?,
        Some(Duration::ZERO),
        "a due timer is due now"
    );
    let mut next = instance.clone();
    let parsed = key.parse::<TaskKey>().expect("key");
    let effects = next.apply(&def, Input::TimedOut { key: parsed }, 0.0)?;
    let trigger = Trigger::Timer {
        key: key.clone(),
        kind: statefabric_saga::machine::TimerKind::Deadline,
    };
    let t = transition(&f.tenant_id(), next, Some(1), trigger, &effects);
    assert_eq!(
        f.store.commit(f.fence.as_ref(), t.clone()).await?,
        Committed::Written(2)
    );
    let again = Transition {
        expected: Some(2),
        ..t
    };
    assert_eq!(
        f.store.commit(f.fence.as_ref(), again).await?,
        Committed::TriggerGone
    );
    assert!(
        f.queue.heartbeat(&f.tenant_id(), &key).await?.is_none(),
        "the attempt is over"
    );
    Ok(())
}

fn start(saga: &SagaId, definition: &str, data: serde_json::Value) -> StartRequest {
    StartRequest {
        saga_id: saga.clone(),
        definition: definition.to_owned(),
        data,
        traceparent: Some(SAGA_TRACE.to_owned()),
    }
}

pub async fn start_requests_are_idempotent_and_checked(f: Fixture) -> anyhow::Result<()> {
    let saga = id();
    let unknown = f
        .queue
        .request_start(
            &f.tenant_id(),
            "w",
            start(&saga, "no-such-definition", json!({})),
        )
        .await?;
    assert_eq!(unknown, StartRequested::UnknownDefinition);
    f.store
        .save_definition(&builtin::plan_code_critique())
        .await?;
    let asked = f
        .queue
        .request_start(
            &f.tenant_id(),
            "w",
            start(&saga, "plan-code-critique", json!({"task": 1})),
        )
        .await?;
    assert_eq!(asked, StartRequested::Accepted);
    let again = f
        .queue
        .request_start(
            &f.tenant_id(),
            "w",
            start(&saga, "plan-code-critique", json!({"task": 1})),
        )
        .await?;
    assert_eq!(again, StartRequested::Exists);
    let inbox = f.store.inbox(10_000).await?;
    let item = inbox.iter().find(|i| i.saga_id == saga).expect("queued");
    assert_eq!(item.tenant.as_str(), f.tenant);
    match &item.message {
        InboxMessage::Start { traceparent, .. } => {
            assert_eq!(
                traceparent.as_deref(),
                Some(SAGA_TRACE),
                "the start's trace"
            );
        }
        other => panic!("not a start: {other:?}"),
    }
    f.store.discard(f.fence.as_ref(), item.id).await?;
    Ok(())
}

pub async fn definition_versions_are_immutable(f: Fixture) -> anyhow::Result<()> {
    let mut def = Definition::from_yaml(SHORT)?;
    def.name = format!("immutable-{}", uuid::Uuid::new_v4().simple());
    f.store.save_definition(&def).await?;
    f.store.save_definition(&def).await?;
    let mut changed = def.clone();
    changed.stuck_after *= 2;
    match f.store.save_definition(&changed).await {
        Err(StoreError::Invalid(m)) => assert!(m.contains("new version"), "{m}"),
        other => anyhow::bail!("a changed version must be refused, got {other:?}"),
    }
    changed.version = 2;
    f.store.save_definition(&changed).await?;
    let stored: Vec<_> = f
        .store
        .definitions()
        .await?
        .into_iter()
        .filter(|d| d.name == def.name)
        .collect();
    assert_eq!(stored, vec![def, changed]);
    Ok(())
}

pub async fn sagas_are_listed_by_filter(f: Fixture) -> anyhow::Result<()> {
    let def = builtin::plan_code_critique();
    let one = started(&f, &def).await?;
    let two = started(&f, &def).await?;
    let mine = Filter {
        tenant: Some(f.tenant_id()),
        ..Filter::default()
    };
    let listed = f.store.list(&mine).await?;
    let ids: Vec<&str> = listed.iter().map(|s| s.saga_id.as_str()).collect();
    assert_eq!(ids.len(), 2, "{ids:?}");
    assert!(ids.contains(&one.id.as_str()) && ids.contains(&two.id.as_str()));
    let done = Filter {
        status: Some(Status::Done),
        ..mine.clone()
    };
    assert!(f.store.list(&done).await?.is_empty());
    let idle = Filter {
        idle_since: Some(chrono::Utc::now() + chrono::Duration::seconds(5)),
        ..mine
    };
    assert_eq!(
        f.store.list(&idle).await?.len(),
        2,
        "both idle since before then"
    );
    Ok(())
}

pub async fn a_batch_commits_each_transition_or_says_why_not(f: Fixture) -> anyhow::Result<()> {
    let def = builtin::plan_code_critique();
    f.store.save_definition(&def).await?;
    let (a, a_effects) = Instance::start(&def, id(), json!({"task": "a"}));
    let (b, b_effects) = Instance::start(&def, id(), json!({"task": "b"}));
    let starts = vec![
        transition(&f.tenant_id(), a.clone(), None, Trigger::Direct, &a_effects),
        transition(&f.tenant_id(), b.clone(), None, Trigger::Direct, &b_effects),
    ];
    assert_eq!(
        f.store.commit_many(f.fence.as_ref(), starts).await?,
        vec![Committed::Written(1), Committed::Written(1)]
    );
    assert_eq!(
        f.claim("planner", "w", 10).await?.len(),
        2,
        "both sagas' first tasks were dispatched"
    );

    let operate = |instance: &Instance, action| -> anyhow::Result<Instance> {
        let mut next = instance.clone();
        next.apply(&def, Input::Operator(action), 0.0)?;
        Ok(next)
    };
    let a_paused = operate(&a, statefabric_saga::OperatorAction::Pause)?;
    let a_resumed = operate(&a_paused, statefabric_saga::OperatorAction::Resume)?;
    let b_paused = operate(&b, statefabric_saga::OperatorAction::Pause)?;
    let batch = vec![
        // Two transitions of one saga, the second on top of the first.
        transition(&f.tenant_id(), a_paused, Some(1), Trigger::Direct, &[]),
        transition(&f.tenant_id(), a_resumed, Some(2), Trigger::Direct, &[]),
        // A stale revision, and what was planned on top of it.
        transition(
            &f.tenant_id(),
            b_paused.clone(),
            Some(5),
            Trigger::Direct,
            &[],
        ),
        transition(
            &f.tenant_id(),
            b_paused.clone(),
            Some(6),
            Trigger::Direct,
            &[],
        ),
        // A trigger that is not there.
        transition(&f.tenant_id(), b_paused, Some(1), Trigger::Inbox(-42), &[]),
        // An id that exists.
        transition(&f.tenant_id(), a.clone(), None, Trigger::Direct, &[]),
    ];
    assert_eq!(
        f.store.commit_many(f.fence.as_ref(), batch).await?,
        vec![
            Committed::Written(2),
            Committed::Written(3),
            Committed::Conflict,
            Committed::Conflict,
            Committed::TriggerGone,
            Committed::Exists,
        ]
    );
    let a_now = f.store.load(&a.id).await?.expect("a");
    assert_eq!((a_now.revision, a_now.instance.paused), (3, false));
    assert_eq!(f.store.history(&a.id).await?.len(), 3);
    let b_now = f.store.load(&b.id).await?.expect("b");
    assert_eq!(
        (b_now.revision, b_now.instance.paused),
        (1, false),
        "nothing of b's refused transitions was written"
    );
    assert_eq!(f.store.history(&b.id).await?.len(), 1);
    assert!(
        f.store
            .commit_many(f.fence.as_ref(), Vec::new())
            .await?
            .is_empty()
    );
    Ok(())
}

/// Many answers and start requests at once (a sidecar writes concurrent
/// ones together): each, repeats within the same moment included, gets the
/// outcome it would have had alone.
pub async fn concurrent_answers_and_starts_each_get_their_own_outcome(
    f: Fixture,
) -> anyhow::Result<()> {
    const N: usize = 40;
    let def = builtin::plan_code_critique();
    let mut sagas = Vec::new();
    for _ in 0..N {
        sagas.push(started(&f, &def).await?);
    }
    let tasks = f.claim("planner", "w", 1000).await?;
    assert_eq!(tasks.len(), N);
    // Each task answered twice at once, and one answer to no task.
    let mut answers: Vec<(SagaId, InboxMessage)> = Vec::new();
    for task in tasks.iter().chain(tasks.iter()) {
        let message = InboxMessage::Completed {
            key: task.key.clone(),
            output: json!({"plan": task.saga_id}),
        };
        answers.push((task.saga_id.clone(), message));
    }
    let ghost = &sagas[0].id;
    answers.push((
        ghost.clone(),
        InboxMessage::Completed {
            key: format!("{ghost}/NOPE/1/1"),
            output: json!(null),
        },
    ));
    let tenant = f.tenant_id();
    let replies = futures::future::join_all(answers.iter().map(|(saga, message)| {
        f.queue.reply(
            &tenant,
            Reply {
                sender: "w",
                saga_id: saga,
                message: message.clone(),
            },
        )
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    let count = |r: Replied| replies.iter().filter(|x| **x == r).count();
    assert_eq!(
        (
            count(Replied::Accepted),
            count(Replied::Duplicate),
            count(Replied::Unknown)
        ),
        (N, N, 1),
        "{replies:?}"
    );
    let inbox = f.store.inbox(100_000).await?;
    for task in &tasks {
        assert_eq!(
            inbox
                .iter()
                .filter(|i| i.message.task_key() == Some(task.key.as_str()))
                .count(),
            1,
            "one inbox row per answered task"
        );
    }

    // Start requests: each new id twice, an existing saga, an unknown
    // definition.
    let fresh: Vec<SagaId> = (0..N).map(|_| id()).collect();
    let mut asks: Vec<(SagaId, &str)> = Vec::new();
    for saga in fresh.iter().chain(fresh.iter()) {
        asks.push((saga.clone(), "plan-code-critique"));
    }
    asks.push((sagas[1].id.clone(), "plan-code-critique"));
    asks.push((id(), "no-such-definition"));
    let tenant = f.tenant_id();
    let outcomes = futures::future::join_all(asks.iter().map(|(saga, definition)| {
        f.queue
            .request_start(&tenant, "w", start(saga, definition, json!({"task": 1})))
    }))
    .await
    .into_iter()
    .collect::<Result<Vec<_>, _>>()?;
    let count = |r: StartRequested| outcomes.iter().filter(|x| **x == r).count();
    assert_eq!(
        (
            count(StartRequested::Accepted),
            count(StartRequested::Exists),
            count(StartRequested::UnknownDefinition)
        ),
        (N, N + 1, 1),
        "{outcomes:?}"
    );
    // Leave no start request behind for the engines of other tests.
    for item in f.store.inbox(100_000).await? {
        if fresh.contains(&item.saga_id) {
            f.store.discard(f.fence.as_ref(), item.id).await?;
        }
    }
    Ok(())
}

/// The queue depth autoscalers read: waiting and claimed tasks per tenant
/// and agent type.
pub async fn open_tasks_are_counted_per_tenant_and_agent_type(f: Fixture) -> anyhow::Result<()> {
    let def = builtin::plan_code_critique();
    let mine = |open: Vec<OpenTasks>| -> Vec<OpenTasks> {
        open.into_iter().filter(|o| o.tenant == f.tenant).collect()
    };
    assert_eq!(mine(f.store.open_tasks().await?), vec![]);
    started(&f, &def).await?;
    started(&f, &def).await?;
    started(&f, &def).await?;
    let planner = |waiting, claimed| OpenTasks {
        tenant: f.tenant.clone(),
        agent: "planner".into(),
        waiting,
        claimed,
    };
    assert_eq!(mine(f.store.open_tasks().await?), vec![planner(3, 0)]);
    let claimed = f.claim("planner", "w1", 2).await?;
    assert_eq!(claimed.len(), 2);
    assert_eq!(mine(f.store.open_tasks().await?), vec![planner(1, 2)]);
    // Answered tasks stay open until the engine applies the reply (it ends
    // the attempt): the count is of work not yet done.
    Ok(())
}

/// An operator's action lands in the saga's tenant's audit log, where that
/// tenant's application reads it.
pub async fn operator_actions_are_audited_under_the_sagas_tenant(f: Fixture) -> anyhow::Result<()> {
    let saga = id();
    let entry = OperatorAudit {
        tenant: f.tenant_id(),
        operator: "alice".into(),
        action: "retry".into(),
        saga_id: saga.clone(),
        details: json!({"outcome": "applied", "revision": 3}),
    };
    f.store.audit_operator(&entry).await?;
    let tenant = statefabric_domain::TenantId::new(f.tenant.clone())?;
    let found = f.audit.read(&tenant, "saga.operator.", 1000).await?;
    let row = found
        .iter()
        .find(|e| e.target == saga.as_str())
        .ok_or_else(|| anyhow::anyhow!("no audit row for {saga}: {found:?}"))?;
    assert_eq!(
        (row.actor.as_str(), row.action.as_str(), &row.details),
        (
            "alice",
            "saga.operator.retry",
            &json!({"outcome": "applied", "revision": 3})
        )
    );
    Ok(())
}
