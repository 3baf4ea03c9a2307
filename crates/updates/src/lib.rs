//! How sidecars learn about each other's writes.
//!
//! Owns two ports and their adapters:
//! - [`Notifier`]: fire-and-forget announcements of a change ("document X
//!   is now at revision 7"), used to drop stale cache entries within
//!   milliseconds. On Redis this is pub/sub ([`redis::RedisNotifier`]).
//!   Pub/sub is at-most-once, so a follower is told [`Signal::Lost`] when it
//!   stops hearing (connection lost, fell behind) and [`Signal::Live`] when
//!   it hears again; in between it must not trust what it caches.
//! - [`UpdateLog`]: durable, ordered update streams with consumer groups,
//!   acknowledgement, claiming of entries left pending by a dead consumer and
//!   trimming by length or age. On Redis these are Streams
//!   ([`redis::RedisUpdateLog`]). The sidecar's `WatchContext` is fed from
//!   one, and saga progress will be.
//!
//! Why pub/sub rather than RESP3 client-side caching for invalidation: what
//! the sidecar caches are context documents whose source of truth is the
//! event store (Postgres), not Redis keys, so Redis's tracking of the keys a
//! client read has nothing to track. An explicit announcement carries the
//! new revision, which lets a follower drop only entries older than it.
//!
//! [`memory`] holds the in-process adapters of both ports, the embedded
//! default, under the same contract tests.
#![warn(missing_docs)]

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use statefabric_domain::TenantId;

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// A shared-context document.
    Context,
    /// A session.
    Session,
}

/// One announced change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// What kind of thing changed.
    pub kind: ChangeKind,
    /// The document or session id.
    pub key: String,
    /// The new revision (0 where the kind has none, e.g. a deleted session).
    pub revision: u64,
    /// The sidecar that made it (followers skip their own).
    pub origin: String,
}

/// What a follower receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signal {
    /// The subscription is live: changes from now on will be heard;
    /// anything before was not.
    Live,
    /// A change another sidecar announced.
    Change(Change),
    /// Announcements are no longer heard (until the next `Live`).
    Lost,
}

/// Why an announcement or stream call failed.
#[derive(Debug, thiserror::Error)]
pub enum UpdatesError {
    /// A stream, group or consumer name the backend refuses.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which argument.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The backend (Redis) could not be reached or failed the call.
    #[error("update backend unavailable: {0}")]
    Unavailable(String),
}

/// An update call's result.
pub type Result<T, E = UpdatesError> = std::result::Result<T, E>;

/// Announcements of changes to every sidecar of a tenant, at most once
/// (pub/sub): what a sidecar missed it learns by re-reading.
#[async_trait]
pub trait Notifier: Send + Sync + std::fmt::Debug + 'static {
    /// Tells the tenant's other sidecars of `change`.
    async fn announce(&self, tenant: &TenantId, change: &Change) -> Result<()>;

    /// Follows a tenant's announcements until the receiver is dropped. The
    /// first signal is `Live` once the subscription is established.
    async fn follow(&self, tenant: &TenantId) -> Result<tokio::sync::mpsc::Receiver<Signal>>;
}

/// An entry delivered from an update stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The entry's id in its stream (ordered; pass it to `ack`).
    pub id: String,
    /// The change it carries.
    pub change: Change,
}

/// How much of a stream to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Keep about this many newest entries (trimmed in whole blocks, so a
    /// few more may stay).
    pub max_len: u64,
    /// Drop entries older than this.
    pub max_age: Duration,
}

/// Where a new consumer group starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// Only entries appended from now on.
    Latest,
    /// Everything still in the stream.
    Beginning,
}

/// A retained, ordered log of changes read by consumer groups (Redis
/// Streams): what a reader missed while away it reads when back.
#[async_trait]
pub trait UpdateLog: Send + Sync + std::fmt::Debug + 'static {
    /// Appends to `stream` (created on first use), keeping about
    /// `retention.max_len` entries. Returns the entry's id.
    async fn append(&self, stream: &str, change: &Change, retention: Retention) -> Result<String>;

    /// Creates the group if it does not exist (idempotent).
    async fn create_group(&self, stream: &str, group: &str, start: Start) -> Result<()>;

    /// Up to `count` entries not yet delivered to the group, for `consumer`;
    /// waits up to `block` for one to arrive. Delivered entries stay pending
    /// until acknowledged.
    async fn read(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Delivery>>;

    /// Acknowledges entries; how many were pending.
    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<u64>;

    /// Takes over up to `count` entries pending for longer than `min_idle`
    /// (their consumer died or hangs) and delivers them to `consumer`.
    async fn claim(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Delivery>>;

    /// Drops entries past `retention` (by age; length is kept on append).
    /// Returns how many were removed.
    async fn trim(&self, stream: &str, retention: Retention) -> Result<u64>;

    /// Entries in the stream now.
    async fn len(&self, stream: &str) -> Result<u64>;
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '@'))
}

/// Stream, group and consumer names travel into keys: restricted.
pub fn check_name(what: &'static str, name: &str) -> Result<()> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(UpdatesError::Invalid {
            what,
            reason: format!("`{name}` must be 1-200 ASCII letters, digits or -_.:/@"),
        })
    }
}
