//! The aggregate repository: load (snapshot plus tail), handle a command,
//! append with the loaded version as the expectation, snapshot every N events.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use statefabric_domain::{ExpectedVersion, NewEvent, Snapshot, SnapshotState, StreamId, TenantId};

use crate::error::{InvalidInput, StoreError};
use crate::port::{AppendOutcome, AppendRequest, EventStore, Idempotency, Scope};

/// How often to snapshot, per stream type.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SnapshotPolicy {
    /// Snapshot every this many events; `None` disables snapshots.
    pub every: Option<u64>,
    /// Overrides per stream type.
    pub per_stream_type: BTreeMap<String, u64>,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        Self {
            // Replaying 100 small events costs about as much as reading and
            // decoding one snapshot; below that snapshots only add writes.
            every: Some(100),
            per_stream_type: BTreeMap::new(),
        }
    }
}

impl SnapshotPolicy {
    /// Events between snapshots of `stream_type` (none: no snapshots).
    pub fn interval(&self, stream_type: &str) -> Option<u64> {
        self.per_stream_type
            .get(stream_type)
            .copied()
            .or(self.every)
            .filter(|n| *n > 0)
    }

    /// Whether an append from `before` to `after` crossed a snapshot point.
    pub fn due(&self, stream_type: &str, before: u64, after: u64) -> bool {
        self.interval(stream_type)
            .is_some_and(|n| after / n > before / n)
    }
}

/// An aggregate loaded at a version.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    /// The aggregate's state.
    pub state: A,
    /// 0 when the stream does not exist yet.
    pub version: u64,
}

/// Why a command through the repository failed.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError<R: std::error::Error + 'static> {
    /// The aggregate refused the command (nothing was written).
    #[error("command rejected: {0}")]
    Rejected(#[source] R),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored event the aggregate cannot read.
    #[error("stored event {version} of stream {stream} does not decode as {aggregate}: {reason}")]
    Decode {
        /// The stream.
        stream: StreamId,
        /// The event's version.
        version: u64,
        /// The aggregate type.
        aggregate: &'static str,
        /// Why.
        reason: String,
    },
    /// Every attempt met a concurrent write.
    #[error("still conflicting after {attempts} attempts")]
    TooManyConflicts {
        /// Attempts made.
        attempts: u32,
        /// The last conflict.
        #[source]
        last: StoreError,
    },
}

/// Loads and saves one aggregate type through any [`EventStore`].
pub struct Repository<A> {
    store: Arc<dyn EventStore>,
    snapshots: SnapshotPolicy,
    /// Attempts for commands that are safe to re-run on conflict.
    max_attempts: u32,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A> std::fmt::Debug for Repository<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("snapshots", &self.snapshots)
            .field("max_attempts", &self.max_attempts)
            .finish_non_exhaustive()
    }
}

const PAGE: u32 = 1000;

impl<A: SnapshotState> Repository<A> {
    /// A repository on `store`, snapshotting by `snapshots`.
    pub fn new(store: Arc<dyn EventStore>, snapshots: SnapshotPolicy) -> Self {
        Self {
            store,
            snapshots,
            max_attempts: 5,
            _aggregate: PhantomData,
        }
    }

    /// Latest snapshot (if its schema matches) plus every later event.
    pub async fn load(
        &self,
        tenant: &TenantId,
        id: &StreamId,
    ) -> Result<Loaded<A>, RepositoryError<A::Rejection>> {
        let mut loaded = Loaded {
            state: A::default(),
            version: 0,
        };
        if let Some(snapshot) = self.store.load_snapshot(tenant, id).await?
            && snapshot.schema_version == A::SNAPSHOT_SCHEMA_VERSION
            && let Ok(state) = serde_json::from_value::<A>(snapshot.state)
        {
            // An undecodable snapshot is only an optimisation lost: replay.
            loaded = Loaded {
                state,
                version: snapshot.version,
            };
        }
        self.replay_into(tenant, id, &mut loaded).await?;
        Ok(loaded)
    }

    /// Rebuilds from the first event, ignoring snapshots (for verification and
    /// for rebuilding after a change to `apply`).
    pub async fn replay(
        &self,
        tenant: &TenantId,
        id: &StreamId,
    ) -> Result<Loaded<A>, RepositoryError<A::Rejection>> {
        let mut loaded = Loaded {
            state: A::default(),
            version: 0,
        };
        self.replay_into(tenant, id, &mut loaded).await?;
        Ok(loaded)
    }

    async fn replay_into(
        &self,
        tenant: &TenantId,
        id: &StreamId,
        loaded: &mut Loaded<A>,
    ) -> Result<(), RepositoryError<A::Rejection>> {
        loop {
            let events = self
                .store
                .read_stream(tenant, id, loaded.version + 1, PAGE)
                .await?;
            let count = events.len();
            for recorded in events {
                let event: A::Event =
                    serde_json::from_value(recorded.data).map_err(|e| RepositoryError::Decode {
                        stream: id.clone(),
                        version: recorded.stream_version,
                        aggregate: A::STREAM_TYPE,
                        reason: e.to_string(),
                    })?;
                loaded.state.apply(&event);
                loaded.version = recorded.stream_version;
            }
            if count < PAGE as usize {
                return Ok(());
            }
        }
    }

    /// Loads, handles `command`, appends. On a concurrency conflict the whole
    /// cycle repeats against fresh state when `A::retry_on_conflict` allows.
    /// With an idempotency key, a repeat returns the first result unchanged.
    pub async fn execute(
        &self,
        scope: &Scope,
        id: &StreamId,
        command: &A::Command,
        idempotency_key: Option<&str>,
    ) -> Result<AppendOutcome, RepositoryError<A::Rejection>>
    where
        A::Command: Serialize,
    {
        let idempotency = idempotency_key
            .map(|key| Idempotency::for_request(key, &(A::STREAM_TYPE, id.as_str(), command)));
        let mut attempt = 0;
        loop {
            attempt += 1;
            let loaded = self.load(&scope.tenant, id).await?;
            let events = loaded
                .state
                .handle(command)
                .map_err(RepositoryError::Rejected)?;
            if events.is_empty() {
                return Err(StoreError::Invalid(InvalidInput::EmptyBatch).into());
            }
            let new_events = events
                .iter()
                .map(|e| {
                    serde_json::to_value(e)
                        .map(|data| NewEvent::new(A::event_type(e), data))
                        .map_err(|e| StoreError::Invalid(InvalidInput::Json(e.to_string())))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let expected = if loaded.version == 0 {
                ExpectedVersion::NoStream
            } else {
                ExpectedVersion::Exact(loaded.version)
            };
            let mut request = AppendRequest::new(id.clone(), A::STREAM_TYPE, expected, new_events);
            request.idempotency = idempotency.clone();
            match self.store.append(scope, request).await {
                Ok(outcome) => {
                    if !outcome.replayed {
                        let mut state = loaded.state;
                        for event in &events {
                            state.apply(event);
                        }
                        self.maybe_snapshot(scope, id, loaded.version, &outcome, state)
                            .await;
                    }
                    return Ok(outcome);
                }
                Err(err @ StoreError::Concurrency { .. }) => {
                    if !A::retry_on_conflict(command) {
                        return Err(err.into());
                    }
                    if attempt >= self.max_attempts {
                        return Err(RepositoryError::TooManyConflicts {
                            attempts: attempt,
                            last: err,
                        });
                    }
                }
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Snapshots are an optimisation: a failure is logged, never returned.
    async fn maybe_snapshot(
        &self,
        scope: &Scope,
        id: &StreamId,
        before: u64,
        outcome: &AppendOutcome,
        state: A,
    ) {
        let after = outcome.result.last_version;
        if !self.snapshots.due(A::STREAM_TYPE, before, after) {
            return;
        }
        let snapshot = match serde_json::to_value(&state) {
            Ok(value) => Snapshot {
                stream_id: id.clone(),
                stream_type: A::STREAM_TYPE.to_owned(),
                version: after,
                state: value,
                schema_version: A::SNAPSHOT_SCHEMA_VERSION,
            },
            Err(err) => {
                tracing::warn!(stream = %id, error = %err, "snapshot state does not serialize");
                return;
            }
        };
        if let Err(err) = self.store.save_snapshot(scope, &snapshot).await {
            tracing::warn!(stream = %id, error = %err, "saving snapshot failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_points_are_crossings_of_the_interval() {
        let mut policy = SnapshotPolicy::default();
        policy.per_stream_type.insert("task".to_owned(), 10);
        assert!(!policy.due("task", 0, 9));
        assert!(policy.due("task", 9, 10));
        assert!(policy.due("task", 5, 25));
        assert!(!policy.due("task", 10, 19));
        assert!(policy.due("other", 99, 100));
        policy.every = None;
        assert!(!policy.due("other", 99, 100));
    }
}
