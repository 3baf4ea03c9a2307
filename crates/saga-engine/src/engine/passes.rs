//! The engine's work loop on the leader: passes over the inbox and the due
//! timers, each saga's items in order, sagas side by side; and the stalled
//! gauge.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use serde_json::json;
use statefabric_leader::Role;
use statefabric_saga::machine::{Input, TimerKind};
use statefabric_saga::{SagaId, TaskKey};
use tokio_util::sync::CancellationToken;

use super::busy::Turn;
use super::{Engine, EngineError, Planned, Result};
use crate::metrics::{DefinitionLabel, TaskQueueLabels};
use statefabric_saga_store::{
    Committed, DueTimer, Fence, InboxItem, InboxMessage, OpenTasks, Record, StartRequest, Stored,
    Trigger,
};

/// What drives one transition.
#[derive(Debug, Clone)]
enum Work {
    Inbox(InboxItem),
    Timer(DueTimer),
}

impl Work {
    fn saga(&self) -> &SagaId {
        match self {
            Self::Inbox(i) => &i.saga_id,
            Self::Timer(t) => &t.saga_id,
        }
    }
}

impl Engine {
    /// Runs passes while this instance leads, until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut leadership = self.leadership.clone();
        let mut was_leader = false;
        let mut stalled_at = Instant::now();
        loop {
            if stop.is_cancelled() {
                return;
            }
            if let Role::Follower = leadership.role() {
                if was_leader {
                    // Only the leader counts: a former leader's last numbers
                    // would be summed with the new leader's.
                    self.metrics.stalled.clear();
                    self.metrics.open_tasks.clear();
                    self.open_task_series
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clear();
                }
                was_leader = false;
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = leadership.changed() => {}
                    () = tokio::time::sleep(self.settings.tick * 4) => {}
                }
                continue;
            }
            if !was_leader {
                was_leader = true;
                self.cache
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clear();
                // A new term: definitions another leader added are in the store.
                if let Err(err) = self.reload().await {
                    tracing::warn!(error = %err, "cannot reload saga definitions");
                }
            }
            if stalled_at.elapsed() >= self.settings.stalled_every {
                stalled_at = Instant::now();
                self.refresh_stalled().await;
                self.refresh_open_tasks().await;
            }
            let mut signal = self.store.inbox_signal();
            let began = Instant::now();
            let handled = self.pass().await;
            self.metrics
                .pass_seconds
                .observe(began.elapsed().as_secs_f64());
            let full = match handled {
                Ok(n) => n >= self.settings.batch as usize,
                Err(err) => {
                    tracing::warn!(error = %err, "saga engine pass failed");
                    false
                }
            };
            if !full {
                // Idle: wake for new inbox rows, a direct commit, the next
                // timer or the next stalled count.
                let wait = self.idle_wait(stalled_at).await;
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = signal.changed() => {}
                    () = self.committed_directly.notified() => {}
                    () = tokio::time::sleep(wait) => {}
                }
            }
        }
    }

    /// How long an idle leader sleeps unless woken: until the next timer
    /// and the next stalled count, and no longer than a tick when the
    /// store's inbox signal can miss rows written elsewhere.
    async fn idle_wait(&self, stalled_at: Instant) -> Duration {
        let stalled = self
            .settings
            .stalled_every
            .saturating_sub(stalled_at.elapsed());
        let timer = match self.store.next_timer_in().await {
            Ok(next) => next,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the next timer");
                Some(self.settings.tick)
            }
        };
        let polled = (!self.store.inbox_signal_is_complete()).then_some(self.settings.tick);
        [timer, polled]
            .into_iter()
            .flatten()
            .fold(stalled, Duration::min)
    }

    /// One pass over the inbox and the due timers; returns how many rows
    /// the larger of the two reads returned.
    pub async fn pass(&self) -> Result<usize> {
        let fence = self.fence()?;
        let inbox = self.store.inbox(self.settings.batch).await?;
        let timers = self.store.due_timers(self.settings.batch).await?;
        let read = inbox.len().max(timers.len());
        let mut groups: BTreeMap<SagaId, Vec<Work>> = BTreeMap::new();
        for work in inbox
            .into_iter()
            .map(Work::Inbox)
            .chain(timers.into_iter().map(Work::Timer))
        {
            groups.entry(work.saga().clone()).or_default().push(work);
        }
        // A saga an operator call is changing waits for the next pass.
        let taken: Vec<(Turn<'_>, Vec<Work>)> = groups
            .into_iter()
            .filter_map(|(saga, works)| self.busy.try_take(&saga).map(|turn| (turn, works)))
            .collect();
        futures::stream::iter(taken.chunks(self.settings.commit_batch.max(1)))
            .for_each_concurrent(self.settings.concurrency, |batch| {
                let fence = &fence;
                async move {
                    if let Err(err) = self.advance_batch(fence, batch).await {
                        tracing::warn!(error = %err, sagas = batch.len(), "saga transitions failed");
                    }
                }
            })
            .await;
        Ok(read)
    }

    /// Plans every saga's transitions in `batch` and commits them in one
    /// transaction.
    async fn advance_batch(&self, fence: &Fence, batch: &[(Turn<'_>, Vec<Work>)]) -> Result<()> {
        let mut planned = Vec::new();
        for (turn, works) in batch {
            self.plan_saga(fence, turn.saga(), works, &mut planned)
                .await;
        }
        if planned.is_empty() {
            return Ok(());
        }
        let (transitions, afters): (Vec<_>, Vec<_>) =
            planned.into_iter().map(|p| (p.transition, p.after)).unzip();
        let outcomes = match self.store.commit_many(Some(fence), transitions).await {
            Ok(outcomes) => outcomes,
            Err(err) => {
                for after in &afters {
                    self.forget(&after.next.instance.id);
                }
                return Err(err.into());
            }
        };
        // After a saga's first transition that was not written, its later
        // ones (planned on top of it) were not written either.
        let mut stopped: HashSet<SagaId> = HashSet::new();
        for (after, outcome) in afters.into_iter().zip(outcomes) {
            let saga = &after.next.instance.id;
            if stopped.contains(saga) {
                continue;
            }
            match outcome {
                Committed::Written(revision) => self.settle(after, revision),
                other => {
                    if other == Committed::Conflict {
                        self.metrics.conflicts.inc();
                    }
                    self.forget(saga);
                    stopped.insert(saga.clone());
                }
            }
        }
        Ok(())
    }

    /// Plans `works` in order, each on top of the last, into `out`. Stops at
    /// a saga's first failure (the rest waits for the next pass) and after a
    /// start (what follows it waits until it is written).
    async fn plan_saga(
        &self,
        fence: &Fence,
        saga: &SagaId,
        works: &[Work],
        out: &mut Vec<Planned>,
    ) {
        let mut current = None;
        for work in works {
            match self.plan_work(fence, &mut current, saga, work).await {
                Ok(Some(planned)) => {
                    let started = planned.after.started;
                    current = Some(planned.after.next.clone());
                    out.push(planned);
                    if started {
                        return;
                    }
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(saga = %saga, error = %err, "saga transition failed");
                    return;
                }
            }
        }
    }

    /// The transition `work` makes, or `None` when it makes none (a
    /// request that can never apply is discarded from the inbox).
    async fn plan_work(
        &self,
        fence: &Fence,
        current: &mut Option<Stored>,
        saga: &SagaId,
        work: &Work,
    ) -> Result<Option<Planned>> {
        let item = match work {
            Work::Timer(timer) => {
                let Some(key) = timer.key.parse::<TaskKey>().ok() else {
                    return Ok(None);
                };
                let (input, kind) = match timer.kind {
                    TimerKind::Deadline => (Input::TimedOut { key }, "timed_out"),
                    TimerKind::Retry => (Input::RetryDue { key }, "retry_due"),
                };
                let record = Record {
                    kind: kind.into(),
                    actor: None,
                    detail: json!({"task": timer.key}),
                };
                let trigger = Trigger::Timer {
                    key: timer.key.clone(),
                    kind: timer.kind,
                };
                let stored = self.current(current, saga).await?;
                return self.plan(stored, trigger, input, record).map(Some);
            }
            Work::Inbox(item) => item,
        };
        let trigger = Trigger::Inbox(item.id);
        let actor = Some(item.sender.clone());
        let (input, record) = match &item.message {
            InboxMessage::Start {
                definition,
                data,
                traceparent,
            } => {
                let start = StartRequest {
                    saga_id: item.saga_id.clone(),
                    definition: definition.clone(),
                    data: data.clone(),
                    traceparent: traceparent.clone(),
                };
                return match self.plan_start(&item.tenant, start, &item.sender, trigger) {
                    Ok(planned) => Ok(Some(planned)),
                    Err(EngineError::UnknownDefinition(_) | EngineError::Invalid(_)) => {
                        tracing::warn!(saga = %item.saga_id, "dropping a start request that cannot start");
                        self.store.discard(Some(fence), item.id).await?;
                        Ok(None)
                    }
                    Err(e) => Err(e),
                };
            }
            InboxMessage::Completed { key, output } => {
                let Some(parsed) = key.parse::<TaskKey>().ok() else {
                    self.store.discard(Some(fence), item.id).await?;
                    return Ok(None);
                };
                (
                    Input::Completed {
                        key: parsed,
                        output: output.clone(),
                    },
                    Record {
                        kind: "completed".into(),
                        actor,
                        detail: json!({"task": key, "output": output}),
                    },
                )
            }
            InboxMessage::Failed { key, error } => {
                let Some(parsed) = key.parse::<TaskKey>().ok() else {
                    self.store.discard(Some(fence), item.id).await?;
                    return Ok(None);
                };
                (
                    Input::Failed {
                        key: parsed,
                        error: error.clone(),
                    },
                    Record {
                        kind: "failed".into(),
                        actor,
                        detail: json!({"task": key, "error": error}),
                    },
                )
            }
        };
        let planned = self
            .current(current, saga)
            .await
            .and_then(|stored| self.plan(stored, trigger, input, record));
        match planned {
            // Replies that can never apply are dropped, so they cannot
            // crowd the head of the inbox pass after pass.
            Err(err @ (EngineError::UnknownSaga(_) | EngineError::UnknownDefinition(_))) => {
                tracing::warn!(saga = %item.saga_id, error = %err, "dropping a reply that cannot apply");
                self.store.discard(Some(fence), item.id).await?;
                Ok(None)
            }
            other => other.map(Some),
        }
    }

    async fn refresh_open_tasks(&self) {
        let open = match self.store.open_tasks().await {
            Ok(open) => open,
            Err(err) => {
                tracing::warn!(error = %err, "cannot count open saga tasks");
                return;
            }
        };
        let labels = |o: &OpenTasks, state: &str| TaskQueueLabels {
            tenant: o.tenant.clone(),
            agent: o.agent.clone(),
            state: state.to_owned(),
        };
        let fresh: Vec<(TaskQueueLabels, i64)> = open
            .iter()
            .flat_map(|o| {
                [
                    (labels(o, "waiting"), o.waiting),
                    (labels(o, "claimed"), o.claimed),
                ]
            })
            .collect();
        // Agent types whose queue emptied go to zero rather than vanish, so
        // a scaler reads 0 (scale in), not "no data".
        let mut stale = self
            .open_task_series
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for gone in stale.iter().filter(|l| !fresh.iter().any(|(f, _)| f == *l)) {
            self.metrics.open_tasks.get_or_create(gone).set(0);
        }
        stale.clear();
        for (label, n) in fresh {
            self.metrics.open_tasks.get_or_create(&label).set(n);
            stale.push(label);
        }
    }

    async fn refresh_stalled(&self) {
        let registry = self.registry();
        let mut thresholds: BTreeMap<String, Duration> = BTreeMap::new();
        for (name, version) in registry.names() {
            if let Some(d) = registry.get(name, version) {
                let t = thresholds.entry(name.to_owned()).or_insert(d.stuck_after);
                *t = (*t).min(d.stuck_after);
            }
        }
        for (name, threshold) in thresholds {
            let since = Utc::now() - chrono::Duration::from_std(threshold).unwrap_or_default();
            match self.store.count_stalled(&name, since).await {
                Ok(n) => {
                    self.metrics
                        .stalled
                        .get_or_create(&DefinitionLabel { definition: name })
                        .set(n);
                }
                Err(err) => tracing::warn!(error = %err, "cannot count stalled sagas"),
            }
        }
    }
}
