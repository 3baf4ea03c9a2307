//! Session state: small per-agent or per-conversation values that expire on
//! their own.
//!
//! Owns the [`SessionStore`] port, the per-namespace [`Policy`] (how long a
//! session lives and whether use extends it), the input checks every adapter
//! shares, and two adapters: [`redis::RedisSessions`] (standalone or
//! cluster, atomic through Lua) and [`memory::MemorySessions`] (the embedded
//! default). It does not own which namespaces exist: the sidecar's
//! configuration declares them.
//!
//! Expiry kinds: *absolute* — a session lives `ttl` from its creation, and
//! writes do not extend it; *sliding* — every read or write restarts the
//! `ttl`. A write may ask for a shorter or longer `ttl` than the namespace's
//! default, within the namespace's `max_ttl`.
#![warn(missing_docs)]

pub mod memory;
pub mod redis;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use statefabric_domain::TenantId;

/// Whether reading a session extends its life.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Expiry {
    /// It lives `ttl` from its first write, however often it is read or
    /// written again.
    Absolute,
    /// Every read and write gives it `ttl` again.
    #[default]
    Sliding,
}

/// How sessions in one namespace expire.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Lifetime of a session written without a `ttl` of its own.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// Absolute or sliding.
    #[serde(default)]
    pub expiry: Expiry,
    /// Longest `ttl` a write may ask for; defaults to `ttl`.
    #[serde(default, with = "humantime_serde")]
    pub max_ttl: Option<Duration>,
}

impl Policy {
    /// The longest `ttl` a write may ask for (never under `ttl`).
    pub fn max_ttl(&self) -> Duration {
        self.max_ttl.unwrap_or(self.ttl).max(self.ttl)
    }
}

/// A session as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The stored bytes.
    pub value: Vec<u8>,
    /// Time left, after any extension this read made.
    pub expires_in: Duration,
}

/// Why a session call failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// An argument the store refuses (a key part, a value too large, a ttl).
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// Which argument.
        what: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The backend (Redis) could not be reached or failed the call.
    #[error("session backend unavailable: {0}")]
    Unavailable(String),
}

/// A session call's result.
pub type Result<T, E = SessionError> = std::result::Result<T, E>;

/// Where a session lives: tenant, namespace, id.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// The tenant (sessions of different tenants never meet).
    pub tenant: TenantId,
    /// The namespace, which carries the expiry policy.
    pub namespace: String,
    /// The session's id within the namespace.
    pub id: String,
}

/// Short-lived key-value sessions with a lifetime per namespace.
#[async_trait]
pub trait SessionStore: Send + Sync + std::fmt::Debug + 'static {
    /// Writes a session. `ttl` is the lifetime to apply (absolute: only when
    /// the session is new). Returns the time left.
    async fn put(
        &self,
        key: &SessionKey,
        value: &[u8],
        ttl: Duration,
        expiry: Expiry,
    ) -> Result<Duration>;

    /// Reads a session; sliding sessions are extended by `ttl`.
    async fn get(&self, key: &SessionKey, ttl: Duration, expiry: Expiry)
    -> Result<Option<Session>>;

    /// Reads sessions of one namespace (at most [`MAX_BULK_READ`] ids), in
    /// the order asked: `None` where absent or expired. Sliding ones are
    /// extended by `ttl`, as by [`get`](Self::get).
    async fn get_many(
        &self,
        tenant: &TenantId,
        namespace: &str,
        ids: &[String],
        ttl: Duration,
        expiry: Expiry,
    ) -> Result<Vec<Option<Session>>>;

    /// Removes a session; whether it existed.
    async fn delete(&self, key: &SessionKey) -> Result<bool>;

    /// How many sessions in the namespace have not expired.
    async fn live(&self, tenant: &TenantId, namespace: &str) -> Result<u64>;
}

/// Most ids one [`SessionStore::get_many`] reads.
pub const MAX_BULK_READ: usize = 1000;

/// Largest session value accepted by default.
pub const DEFAULT_MAX_VALUE_BYTES: usize = 1024 * 1024;

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '/' | '@'))
}

/// Namespaces travel into keys, so they are restricted.
pub fn check_namespace(namespace: &str) -> Result<()> {
    if valid_name(namespace) {
        Ok(())
    } else {
        Err(SessionError::Invalid {
            what: "namespace",
            reason: format!("`{namespace}` must be 1-256 ASCII letters, digits or -_.:/@"),
        })
    }
}

/// The keys of a bulk read, each checked like a single read's; refuses
/// more than [`MAX_BULK_READ`] ids, naming the first bad one by position.
pub fn bulk_keys(
    tenant: &TenantId,
    namespace: &str,
    ids: &[String],
    ttl: Duration,
) -> Result<Vec<SessionKey>> {
    if ids.len() > MAX_BULK_READ {
        return Err(SessionError::Invalid {
            what: "ids",
            reason: format!("{} ids, at most {MAX_BULK_READ} per call", ids.len()),
        });
    }
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            let key = SessionKey {
                tenant: tenant.clone(),
                namespace: namespace.to_owned(),
                id: id.clone(),
            };
            check(&key, None, ttl).map_err(|err| match err {
                SessionError::Invalid {
                    what: "session id",
                    reason,
                } => SessionError::Invalid {
                    what: "session id",
                    reason: format!("ids[{i}]: {reason}"),
                },
                other => other,
            })?;
            Ok(key)
        })
        .collect()
}

/// Checks shared by every adapter (and the API edge).
pub fn check(key: &SessionKey, value: Option<(&[u8], usize)>, ttl: Duration) -> Result<()> {
    check_namespace(&key.namespace)?;
    if !valid_name(&key.id) {
        return Err(SessionError::Invalid {
            what: "session id",
            reason: format!("`{}` must be 1-256 ASCII letters, digits or -_.:/@", key.id),
        });
    }
    if let Some((value, max)) = value {
        if value.is_empty() {
            return Err(SessionError::Invalid {
                what: "value",
                reason: "must not be empty (delete the session instead)".into(),
            });
        }
        if value.len() > max {
            return Err(SessionError::Invalid {
                what: "value",
                reason: format!("{} bytes is over the limit of {max}", value.len()),
            });
        }
    }
    if ttl < Duration::from_millis(1) {
        return Err(SessionError::Invalid {
            what: "ttl",
            reason: "must be at least 1 ms".into(),
        });
    }
    Ok(())
}
