//! The engine's work loop on the leader: passes over the inbox and the due
//! timers, each saga's items in order, sagas side by side; and the stalled
//! gauge.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use serde_json::json;
use statefabric_leader::Role;
use statefabric_saga::machine::{Input, TimerKind};
use tokio_util::sync::CancellationToken;

use super::{Engine, EngineError, Result, parse_key};
use crate::metrics::DefinitionLabel;
use crate::store::{DueTimer, Fence, InboxItem, InboxMessage, Record, Trigger};

/// What drives one transition.
#[derive(Debug, Clone)]
enum Work {
    Inbox(InboxItem),
    Timer(DueTimer),
}

impl Work {
    fn saga(&self) -> &str {
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
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = signal.changed() => {}
                    () = tokio::time::sleep(self.settings.tick) => {}
                }
            }
        }
    }

    /// One pass over the inbox and the due timers; returns how many rows
    /// the larger of the two reads returned.
    pub async fn pass(&self) -> Result<usize> {
        let fence = self.fence()?;
        let inbox = self.store.inbox(self.settings.batch).await?;
        let timers = self.store.due_timers(self.settings.batch).await?;
        let read = inbox.len().max(timers.len());
        let mut groups: BTreeMap<String, Vec<Work>> = BTreeMap::new();
        for work in inbox
            .into_iter()
            .map(Work::Inbox)
            .chain(timers.into_iter().map(Work::Timer))
        {
            groups.entry(work.saga().to_owned()).or_default().push(work);
        }
        futures::stream::iter(groups)
            .for_each_concurrent(self.settings.concurrency, |(saga, works)| {
                let fence = &fence;
                async move {
                    let _turn = self.shard(&saga).lock().await;
                    for work in works {
                        if let Err(err) = self.handle(fence, work).await {
                            tracing::warn!(saga = %saga, error = %err, "saga transition failed");
                        }
                    }
                }
            })
            .await;
        Ok(read)
    }

    async fn handle(&self, fence: &Fence, work: Work) -> Result<()> {
        match work {
            Work::Timer(timer) => {
                let Some(key) = parse_key(&timer.key) else {
                    return Ok(());
                };
                let (input, kind) = match timer.kind {
                    TimerKind::Deadline => (Input::TimedOut { key: key.clone() }, "timed_out"),
                    TimerKind::Retry => (Input::RetryDue { key: key.clone() }, "retry_due"),
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
                self.advance(fence, &timer.saga_id, trigger, input, record)
                    .await?;
            }
            Work::Inbox(item) => {
                let trigger = Trigger::Inbox(item.id);
                let actor = Some(item.sender.clone());
                let (input, record) = match item.message {
                    InboxMessage::Start { definition, data } => {
                        let created = self
                            .create(
                                fence,
                                &item.tenant,
                                &item.saga_id,
                                &definition,
                                data,
                                &item.sender,
                                trigger,
                            )
                            .await;
                        return match created {
                            Ok(_) => Ok(()),
                            Err(EngineError::UnknownDefinition(_) | EngineError::Invalid(_)) => {
                                tracing::warn!(saga = %item.saga_id, "dropping a start request that cannot start");
                                Ok(self.store.discard(Some(fence), item.id).await?)
                            }
                            Err(e) => Err(e),
                        };
                    }
                    InboxMessage::Completed { key, output } => {
                        let Some(parsed) = parse_key(&key) else {
                            return Ok(self.store.discard(Some(fence), item.id).await?);
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
                        let Some(parsed) = parse_key(&key) else {
                            return Ok(self.store.discard(Some(fence), item.id).await?);
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
                match self
                    .advance(fence, &item.saga_id, trigger, input, record)
                    .await
                {
                    // Replies that can never apply are dropped, so they
                    // cannot crowd the head of the inbox pass after pass.
                    Err(
                        err @ (EngineError::UnknownSaga(_) | EngineError::UnknownDefinition(_)),
                    ) => {
                        tracing::warn!(saga = %item.saga_id, error = %err, "dropping a reply that cannot apply");
                        self.store.discard(Some(fence), item.id).await?;
                    }
                    other => {
                        other?;
                    }
                }
            }
        }
        Ok(())
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
