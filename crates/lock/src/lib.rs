//! Distributed locks with leases and fencing tokens.
//!
//! Owns the [`LockService`] port and two adapters: [`redis::RedisLocks`]
//! (standalone Redis or a Redis Cluster, atomic through Lua scripts) and
//! [`memory::MemoryLocks`] (the embedded default, one process). A lock has an
//! owner, a lease that expires unless renewed, and a fencing token that
//! increases with every grant of that lock, so a write guarded by the token
//! can be refused once a newer holder exists — what lease-only lock APIs
//! lack.
//!
//! Writes are fenced in the event store (`AppendRequest::fenced`) and in
//! context writes: a write carrying a token older than one the store has
//! seen for that lock is refused. Waiting is first come, first served (no
//! waiter is starved by later arrivals or by try-once callers), and tokens
//! stay increasing across a Redis failover and an embedded restart (see
//! [`redis`] for how, and the clock assumption it makes).
#![warn(missing_docs)]

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use statefabric_domain::TenantId;

/// A granted lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The tenant whose lock it is (locks of different tenants never meet).
    pub tenant: TenantId,
    /// The lock's name within the tenant.
    pub name: String,
    /// Who holds it (the caller's own identity, e.g. an agent instance).
    pub owner: String,
    /// Strictly increases with every grant of this lock.
    pub token: u64,
    /// The lease length granted (it runs from the grant or last renewal).
    pub ttl: Duration,
}

/// Who holds a lock now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Who holds it.
    pub owner: String,
    /// The fencing token of the current grant.
    pub token: u64,
    /// Time left before the lease lapses unless renewed.
    pub expires_in: Duration,
}

/// Why a lock call failed.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// A name, owner or lease length the service refuses.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which argument (`name`, `owner`, `ttl`).
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Renew or release by someone who does not (or no longer) hold it.
    #[error("lock {name} is not held by {owner} with token {token}")]
    NotHolder {
        /// The lock.
        name: String,
        /// Who claimed to hold it.
        owner: String,
        /// The token the claim named.
        token: u64,
    },
    /// The backend (Redis) could not be reached or failed the call.
    #[error("lock backend unavailable: {0}")]
    Unavailable(String),
}

/// A lock call's result.
pub type Result<T, E = LockError> = std::result::Result<T, E>;

/// Distributed locks with fencing tokens: one holder per lock at a time,
/// each grant numbered higher than the last.
#[async_trait]
pub trait LockService: Send + Sync + std::fmt::Debug + 'static {
    /// Tries to take `name` for `owner` for `ttl`, waiting up to `wait` for
    /// the current holder to let go. `None` when it stayed taken. Taking a
    /// lock one already holds extends it and keeps its token.
    async fn acquire(
        &self,
        tenant: &TenantId,
        name: &str,
        owner: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Option<Lease>>;

    /// Extends the lease, if `lease` is still the current grant.
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease>;

    /// Lets go, if `lease` is still the current grant.
    async fn release(&self, lease: &Lease) -> Result<()>;

    /// Who holds `name` now, if anyone.
    async fn inspect(&self, tenant: &TenantId, name: &str) -> Result<Option<Holder>>;
}

/// Checks shared by every adapter: names and owners travel into keys, so
/// they are restricted; leases must be at least a millisecond.
pub fn check(name: &str, owner: &str, ttl: Duration) -> Result<()> {
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 256
            && s.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '@')
            })
    };
    if !ok(name) {
        return Err(LockError::Invalid {
            what: "lock name",
            reason: format!("`{name}` must be 1-256 ASCII letters, digits or -_.:/@"),
        });
    }
    if !ok(owner) {
        return Err(LockError::Invalid {
            what: "owner",
            reason: format!("`{owner}` must be 1-256 ASCII letters, digits or -_.:/@"),
        });
    }
    if ttl < Duration::from_millis(1) {
        return Err(LockError::Invalid {
            what: "lease",
            reason: "must be at least 1 ms".to_owned(),
        });
    }
    Ok(())
}
