//! The event store port: what every backend provides, and the request and
//! result types that cross it.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use statefabric_domain::{
    Checkpoint, ExpectedVersion, NewEvent, RecordedEvent, Snapshot, StreamId, TenantId,
};
use tokio::sync::watch;

use crate::error::Result;

/// Who is acting, for whom: every mutation is scoped to one tenant and
/// audited under one actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// The tenant acted for.
    pub tenant: TenantId,
    /// Agent, sidecar or operator identity recorded in the audit log.
    pub actor: String,
    /// Trace id of the request, recorded in the audit log.
    pub trace_id: Option<String>,
}

impl Scope {
    /// `actor` acting for `tenant`, without a trace.
    pub fn new(tenant: TenantId, actor: impl Into<String>) -> Self {
        Self {
            tenant,
            actor: actor.into(),
            trace_id: None,
        }
    }

    /// The same, recording `trace_id` with what it writes.
    pub fn with_trace_id(mut self, trace_id: impl Into<String>) -> Self {
        self.trace_id = Some(trace_id.into());
        self
    }
}

/// An idempotency key and a fingerprint of the request it guards, so reusing
/// a key for a different request is caught.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    /// The caller's key.
    pub key: String,
    /// SHA-256 of the request, hex.
    pub request_hash: String,
}

impl Idempotency {
    /// Fingerprints any serializable request (SHA-256 of its JSON).
    pub fn for_request<T: Serialize>(key: impl Into<String>, request: &T) -> Self {
        Self::for_bytes(key, &serde_json::to_vec(request).unwrap_or_default())
    }

    /// Fingerprints a request already in its wire encoding.
    pub fn for_bytes(key: impl Into<String>, request: &[u8]) -> Self {
        Self {
            key: key.into(),
            request_hash: hex::encode(Sha256::digest(request)),
        }
    }
}

/// A lock's fencing token carried by a write: the write is refused if a
/// newer token of the same lock was already used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fence {
    /// The lock's name.
    pub lock: String,
    /// The token its holder was given.
    pub token: u64,
}

/// Events to append to one stream.
#[derive(Debug, Clone, PartialEq)]
pub struct AppendRequest {
    /// The stream.
    pub stream_id: StreamId,
    /// Aggregate type; fixed when the stream is created.
    pub stream_type: String,
    /// The version the stream must be at.
    pub expected: ExpectedVersion,
    /// The events, in order.
    pub events: Vec<NewEvent>,
    /// Makes a repeat of the request a replay of the first.
    pub idempotency: Option<Idempotency>,
    /// Refuses the append if a newer token of the lock was used.
    pub fence: Option<Fence>,
}

impl AppendRequest {
    /// An append without idempotency key or fence.
    pub fn new(
        stream_id: StreamId,
        stream_type: impl Into<String>,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Self {
        Self {
            stream_id,
            stream_type: stream_type.into(),
            expected,
            events,
            idempotency: None,
            fence: None,
        }
    }

    /// With an idempotency key.
    pub fn idempotent(mut self, idempotency: Idempotency) -> Self {
        self.idempotency = Some(idempotency);
        self
    }

    /// Fenced by `lock`'s `token`.
    pub fn fenced(mut self, lock: impl Into<String>, token: u64) -> Self {
        self.fence = Some(Fence {
            lock: lock.into(),
            token,
        });
        self
    }
}

/// What an append wrote. Stored as the idempotent response, so a repeat gets
/// exactly this back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppendResult {
    /// Version of the first and last event written.
    pub first_version: u64,
    /// Version of the last event written.
    pub last_version: u64,
    /// Lowest and highest global position written (a batch's positions are
    /// increasing but not necessarily contiguous under concurrency).
    pub first_position: u64,
    /// Highest global position written.
    pub last_position: u64,
}

/// What an append did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendOutcome {
    /// What it wrote (or, replayed, what the first execution wrote).
    pub result: AppendResult,
    /// True when the idempotency key had been used before: nothing new was
    /// written and `result` is the first execution's.
    pub replayed: bool,
}

/// The current version and type of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamInfo {
    /// The last event's version.
    pub version: u64,
    /// The aggregate type.
    pub stream_type: String,
}

/// An event store backend. Every call is scoped to one tenant; a backend
/// never returns or changes another tenant's data.
#[async_trait]
pub trait EventStore: Send + Sync + std::fmt::Debug + 'static {
    /// Appends events to one stream atomically, checking `expected` first.
    /// On a stale expectation nothing is written and
    /// [`StoreError::Concurrency`](crate::StoreError::Concurrency) carries the
    /// actual version. The events, their outbox rows, the audit row and the
    /// idempotency record commit together or not at all.
    async fn append(&self, scope: &Scope, request: AppendRequest) -> Result<AppendOutcome>;

    /// Events of one stream with version >= `from_version` (1-based), in
    /// version order, at most `limit`.
    async fn read_stream(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        from_version: u64,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>>;

    /// The tenant's events with global position >= `from_position`, in global
    /// position order: a point-in-time read. To follow the store without
    /// missing late commits, use the feed ([`crate::feed`]).
    async fn read_all(
        &self,
        tenant: &TenantId,
        from_position: u64,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>>;

    /// The next events after `after` in commit order, returning only events
    /// whose writing transactions, and all earlier ones, have finished, so a
    /// reader that resumes from the last checkpoint never skips an event.
    async fn read_feed(
        &self,
        tenant: &TenantId,
        after: Checkpoint,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>>;

    /// A stream's version and type; `None` when it does not exist.
    async fn stream_info(&self, tenant: &TenantId, stream: &StreamId)
    -> Result<Option<StreamInfo>>;

    /// Stores a snapshot unless a newer one exists. The stream must exist and
    /// be at least at the snapshot's version.
    async fn save_snapshot(&self, scope: &Scope, snapshot: &Snapshot) -> Result<()>;

    /// The stream's newest snapshot.
    async fn load_snapshot(&self, tenant: &TenantId, stream: &StreamId)
    -> Result<Option<Snapshot>>;

    /// Deletes expired idempotency keys of every tenant; returns how many.
    async fn purge_expired_idempotency_keys(&self) -> Result<u64>;

    /// Checks that the backend answers (readiness).
    async fn ping(&self) -> Result<()>;

    /// Ticks after every append through this instance, so feeds in the same
    /// process wake at once instead of waiting for their next poll.
    fn append_notifications(&self) -> watch::Receiver<u64>;
}
