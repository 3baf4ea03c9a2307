//! In-process sessions for the embedded default: the same expiry rules as
//! Redis, in one process. Expired sessions are dropped when touched and by
//! `live`, so memory does not grow with dead sessions that are counted.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use statefabric_domain::TenantId;
use tokio::time::Instant;

use crate::{
    DEFAULT_MAX_VALUE_BYTES, Expiry, Result, Session, SessionKey, SessionStore, bulk_keys, check,
};

/// Sessions in this process's memory: the embedded default (`fabric dev`).
#[derive(Debug)]
pub struct MemorySessions {
    sessions: Mutex<Sessions>,
    max_value: usize,
}

impl Default for MemorySessions {
    fn default() -> Self {
        Self {
            sessions: Mutex::default(),
            max_value: DEFAULT_MAX_VALUE_BYTES,
        }
    }
}

impl MemorySessions {
    /// Refuses values larger than `bytes`.
    pub fn with_max_value(mut self, bytes: usize) -> Self {
        self.max_value = bytes;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Sessions> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

type Sessions = HashMap<SessionKey, (Vec<u8>, Instant)>;

/// One read: extends a live sliding session, drops an expired one.
fn read(
    sessions: &mut Sessions,
    key: &SessionKey,
    ttl: Duration,
    expiry: Expiry,
    now: Instant,
) -> Option<Session> {
    match sessions.get_mut(key) {
        Some((value, expires)) if *expires > now => {
            if expiry == Expiry::Sliding {
                *expires = now + ttl;
            }
            Some(Session {
                value: value.clone(),
                expires_in: *expires - now,
            })
        }
        Some(_) => {
            sessions.remove(key);
            None
        }
        None => None,
    }
}

#[async_trait]
impl SessionStore for MemorySessions {
    async fn put(
        &self,
        key: &SessionKey,
        value: &[u8],
        ttl: Duration,
        expiry: Expiry,
    ) -> Result<Duration> {
        check(key, Some((value, self.max_value)), ttl)?;
        let now = Instant::now();
        let mut sessions = self.lock();
        let expires = match (expiry, sessions.get(key)) {
            (Expiry::Absolute, Some((_, expires))) if *expires > now => *expires,
            _ => now + ttl,
        };
        sessions.insert(key.clone(), (value.to_vec(), expires));
        Ok(expires - now)
    }

    async fn get(
        &self,
        key: &SessionKey,
        ttl: Duration,
        expiry: Expiry,
    ) -> Result<Option<Session>> {
        check(key, None, ttl)?;
        Ok(read(&mut self.lock(), key, ttl, expiry, Instant::now()))
    }

    async fn get_many(
        &self,
        tenant: &TenantId,
        namespace: &str,
        ids: &[String],
        ttl: Duration,
        expiry: Expiry,
    ) -> Result<Vec<Option<Session>>> {
        let keys = bulk_keys(tenant, namespace, ids, ttl)?;
        let now = Instant::now();
        let mut sessions = self.lock();
        Ok(keys
            .iter()
            .map(|key| read(&mut sessions, key, ttl, expiry, now))
            .collect())
    }

    async fn delete(&self, key: &SessionKey) -> Result<bool> {
        check(key, None, Duration::from_millis(1))?;
        let now = Instant::now();
        Ok(self
            .lock()
            .remove(key)
            .is_some_and(|(_, expires)| expires > now))
    }

    async fn live(&self, tenant: &TenantId, namespace: &str) -> Result<u64> {
        let now = Instant::now();
        let mut sessions = self.lock();
        sessions.retain(|_, (_, expires)| *expires > now);
        Ok(sessions
            .keys()
            .filter(|k| k.tenant == *tenant && k.namespace == namespace)
            .count() as u64)
    }
}
