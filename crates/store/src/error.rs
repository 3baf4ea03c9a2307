//! The store's errors. Each says what was wrong in terms a caller can act on;
//! API edges map them to statuses in one place.

use std::time::Duration;

use statefabric_domain::{ExpectedVersion, IdError, StreamId, TenantId};

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// The writer's expectation was stale; nothing was written.
    #[error("stream {stream}: expected {expected}, but the stream is {}", describe_actual(*.actual))]
    Concurrency {
        stream: StreamId,
        expected: ExpectedVersion,
        /// The stream's version now; `None` if it does not exist.
        actual: Option<u64>,
    },
    #[error("stream {stream} is of type `{actual}`, not `{requested}`")]
    StreamTypeMismatch {
        stream: StreamId,
        actual: String,
        requested: String,
    },
    #[error("tenant {0} is not registered")]
    UnknownTenant(TenantId),
    #[error("stream {0} does not exist")]
    StreamNotFound(StreamId),
    #[error("context document {0} does not exist")]
    DocumentNotFound(String),
    /// A counter increment that would leave the counter's range; nothing
    /// was written.
    #[error("context document {id}: {reason}")]
    OutOfRange { id: String, reason: String },
    /// A plain document changed since the writer read it; nothing was written.
    #[error("context document {id} changed since it was read; its version vector is now {current:?}", current = current.as_map())]
    ContextConflict {
        id: String,
        current: statefabric_domain::VectorClock,
    },
    #[error(
        "snapshot at version {snapshot} is ahead of stream {stream}, which is at version {stream_version}"
    )]
    SnapshotAhead {
        stream: StreamId,
        snapshot: u64,
        stream_version: u64,
    },
    /// The stream's last writer committed with a larger transaction id than
    /// this transaction's (which took its id with an earlier write, then
    /// waited). Appending would put the stream's events out of order for
    /// the readers in transaction-id order (the commit-ordered feed, the
    /// outbox relay), so nothing was written; run the transaction again.
    /// Only a caller's transaction that wrote before `append_in` can meet
    /// this: [`crate::EventStore::append`] takes the stream's lock before
    /// anything gives its transaction an id.
    #[error(
        "stream {stream} was appended to by a later transaction that committed first; \
         run the transaction again"
    )]
    WriteOrder { stream: StreamId },
    /// The write carried a lock token older than one already used.
    #[error("lock {lock}: fencing token {token} is stale; token {current} was already used")]
    StaleFence {
        lock: String,
        token: u64,
        current: u64,
    },
    #[error("idempotency key `{key}` was already used for a different request")]
    IdempotencyKeyReused { key: String },
    #[error("a request with idempotency key `{key}` is still in progress; retry later")]
    IdempotencyInProgress { key: String },
    /// An event id in the append is already stored (event ids are unique
    /// store-wide: they are the dedupe key downstream).
    #[error("an event id in this append already exists in the store")]
    DuplicateEventId,
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the store is unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("store failure: {0}")]
    Backend(#[source] sqlx::Error),
}

fn describe_actual(actual: Option<u64>) -> String {
    match actual {
        Some(v) => format!("at version {v}"),
        None => "absent".to_owned(),
    }
}

/// Runs a store call under its time limit: every call is bounded, so a hung
/// connection surfaces as `Timeout` instead of a stuck caller.
pub(crate) async fn within<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or(Err(StoreError::Timeout(limit)))
}

impl StoreError {
    /// Whether retrying the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Timeout(_)
                | Self::Unavailable(_)
                | Self::IdempotencyInProgress { .. }
                | Self::WriteOrder { .. }
        )
    }
}

/// Input the store refuses before touching the database.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidInput {
    #[error(transparent)]
    Id(#[from] IdError),
    #[error("an append needs at least one event")]
    EmptyBatch,
    #[error("{count} events in one append; the maximum is {max}")]
    TooManyEvents { count: usize, max: usize },
    #[error("event {index} is {bytes} bytes; the maximum is {max}")]
    EventTooLarge {
        index: usize,
        bytes: usize,
        max: usize,
    },
    #[error("the append is {bytes} bytes; the maximum is {max}")]
    BatchTooLarge { bytes: usize, max: usize },
    #[error("{what} `{value}` is invalid: {reason}")]
    BadName {
        what: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("event {index}: {reason}")]
    BadEvent { index: usize, reason: String },
    #[error("{what} must be at least 1 (versions and positions start at 1)")]
    Zero { what: &'static str },
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("limit {got} is out of range 1..={max}")]
    BadLimit { got: u32, max: u32 },
    #[error("idempotency key is {len} bytes; it must be 1 to 256")]
    BadIdempotencyKey { len: usize },
}
