//! The store's errors. Each says what was wrong in terms a caller can act on;
//! API edges map them to statuses in one place.

use std::time::Duration;

use statefabric_domain::{ExpectedVersion, IdError, StreamId, TenantId};

/// A store call's result.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Why a store call failed. All but the last three say nothing was
/// written; after those the outcome is unknown.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Input refused before the database was touched.
    #[error(transparent)]
    Invalid(#[from] InvalidInput),
    /// The writer's expectation was stale; nothing was written.
    #[error("stream {stream}: expected {expected}, but the stream is {}", describe_actual(*.actual))]
    Concurrency {
        /// The stream.
        stream: StreamId,
        /// What the writer expected.
        expected: ExpectedVersion,
        /// The stream's version now; `None` if it does not exist.
        actual: Option<u64>,
    },
    /// An append names another aggregate type than the stream's.
    #[error("stream {stream} is of type `{actual}`, not `{requested}`")]
    StreamTypeMismatch {
        /// The stream.
        stream: StreamId,
        /// Its type.
        actual: String,
        /// The type the append named.
        requested: String,
    },
    /// The tenant is not registered in the store.
    #[error("tenant {0} is not registered")]
    UnknownTenant(TenantId),
    /// No such stream.
    #[error("stream {0} does not exist")]
    StreamNotFound(StreamId),
    /// No such context document.
    #[error("context document {0} does not exist")]
    DocumentNotFound(String),
    /// A counter increment that would leave the counter's range; nothing
    /// was written.
    #[error("context document {id}: {reason}")]
    OutOfRange {
        /// The document.
        id: String,
        /// Which bound.
        reason: String,
    },
    /// A plain document changed since the writer read it; nothing was written.
    #[error("context document {id} changed since it was read; its version vector is now {current:?}", current = current.as_map())]
    ContextConflict {
        /// The document.
        id: String,
        /// Its vector now (read again, then write on it).
        current: statefabric_domain::VectorClock,
    },
    /// A snapshot of a version the stream has not reached.
    #[error(
        "snapshot at version {snapshot} is ahead of stream {stream}, which is at version {stream_version}"
    )]
    SnapshotAhead {
        /// The stream.
        stream: StreamId,
        /// The snapshot's version.
        snapshot: u64,
        /// The stream's version.
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
    WriteOrder {
        /// The stream.
        stream: StreamId,
    },
    /// The write carried a lock token older than one already used.
    #[error("lock {lock}: fencing token {token} is stale; token {current} was already used")]
    StaleFence {
        /// The lock.
        lock: String,
        /// The token the write carried.
        token: u64,
        /// The newest token used.
        current: u64,
    },
    /// The key guards another request (its fingerprint differs).
    #[error("idempotency key `{key}` was already used for a different request")]
    IdempotencyKeyReused {
        /// The key.
        key: String,
    },
    /// The first request with this key has not finished.
    #[error("a request with idempotency key `{key}` is still in progress; retry later")]
    IdempotencyInProgress {
        /// The key.
        key: String,
    },
    /// An event id in the append is already stored (event ids are unique
    /// store-wide: they are the dedupe key downstream).
    #[error("an event id in this append already exists in the store")]
    DuplicateEventId,
    /// The call took longer than the query timeout (its outcome is
    /// unknown).
    #[error("the store did not answer within {0:?}")]
    Timeout(Duration),
    /// The database cannot be reached (retry).
    #[error("the store is unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// The database failed the call.
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
    /// A stream or tenant id breaks the id rules.
    #[error(transparent)]
    Id(#[from] IdError),
    /// An append without events.
    #[error("an append needs at least one event")]
    EmptyBatch,
    /// Too many events in one append.
    #[error("{count} events in one append; the maximum is {max}")]
    TooManyEvents {
        /// Events given.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// One event too large.
    #[error("event {index} is {bytes} bytes; the maximum is {max}")]
    EventTooLarge {
        /// Its position in the append, from 0.
        index: usize,
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// The append as a whole too large.
    #[error("the append is {bytes} bytes; the maximum is {max}")]
    BatchTooLarge {
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
    /// A name (type, id, key) breaks its rules.
    #[error("{what} `{value}` is invalid: {reason}")]
    BadName {
        /// What the name is of.
        what: &'static str,
        /// The name given.
        value: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// An event is malformed.
    #[error("event {index}: {reason}")]
    BadEvent {
        /// Its position in the append, from 0.
        index: usize,
        /// What is wrong.
        reason: String,
    },
    /// A version or position of 0.
    #[error("{what} must be at least 1 (versions and positions start at 1)")]
    Zero {
        /// Which.
        what: &'static str,
    },
    /// A body that is not JSON.
    #[error("invalid JSON: {0}")]
    Json(String),
    /// A read limit out of range.
    #[error("limit {got} is out of range 1..={max}")]
    BadLimit {
        /// The limit asked for.
        got: u32,
        /// The largest allowed.
        max: u32,
    },
    /// An idempotency key of a bad length.
    #[error("idempotency key is {len} bytes; it must be 1 to 256")]
    BadIdempotencyKey {
        /// Its length.
        len: usize,
    },
}
