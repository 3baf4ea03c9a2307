//! In-process locks for the embedded default: the same semantics as Redis
//! (leases, FIFO waiting, fencing tokens that never repeat — not even across
//! a restart, as they are floored by the clock), in one process.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use statefabric_domain::TenantId;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{Holder, Lease, LockError, LockService, Result, check};

type Key = (TenantId, String);

/// Locks in this process's memory: the embedded default (`fabric dev`),
/// where one process is the whole fabric.
#[derive(Debug, Default)]
pub struct MemoryLocks {
    state: Mutex<HashMap<Key, Entry>>,
    released: Notify,
    next_waiter: AtomicU64,
}

#[derive(Debug, Default)]
struct Entry {
    holder: Option<(String, u64, Instant)>,
    /// Last token granted; kept after release so tokens never repeat.
    last_token: u64,
    /// Waiters in arrival order: (waiter id, owner).
    queue: VecDeque<(u64, String)>,
}

/// Microseconds since the epoch: the floor for new tokens, so a restarted
/// process (whose counters are gone) still grants larger tokens than the
/// ones the store has already seen.
fn clock_floor() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Removes a waiter from its queue however `acquire` ends (granted, timed
/// out, or its future dropped), so a departed waiter never blocks others.
struct Place<'a> {
    locks: &'a MemoryLocks,
    key: Key,
    id: u64,
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let mut state = self.locks.lock();
        if let Some(entry) = state.get_mut(&self.key) {
            entry.queue.retain(|(id, _)| *id != self.id);
        }
        drop(state);
        self.locks.released.notify_waiters();
    }
}

impl MemoryLocks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes the lock if it is free and `waiter` is first in line (or nobody
    /// is waiting); otherwise the holder's expiry, if held.
    fn try_take(
        &self,
        key: &Key,
        owner: &str,
        ttl: Duration,
        waiter: Option<u64>,
    ) -> std::result::Result<Lease, Option<Instant>> {
        let mut state = self.lock();
        let entry = state.entry(key.clone()).or_default();
        let now = Instant::now();
        let token = match &entry.holder {
            Some((holder, token, expires)) if *expires > now => {
                if holder != owner {
                    return Err(Some(*expires));
                }
                *token
            }
            _ => {
                let first = entry.queue.front().map(|(id, _)| *id);
                if first.is_some() && first != waiter {
                    return Err(None);
                }
                entry.last_token = (entry.last_token + 1).max(clock_floor());
                entry.last_token
            }
        };
        entry.holder = Some((owner.to_owned(), token, now + ttl));
        Ok(Lease {
            tenant: key.0.clone(),
            name: key.1.clone(),
            owner: owner.to_owned(),
            token,
            ttl,
        })
    }

    fn with_current<T>(&self, lease: &Lease, f: impl FnOnce(&mut Entry) -> T) -> Result<T> {
        let mut state = self.lock();
        let current = state
            .get_mut(&(lease.tenant.clone(), lease.name.clone()))
            .filter(|e| {
                e.holder.as_ref().is_some_and(|(o, t, exp)| {
                    *o == lease.owner && *t == lease.token && *exp > Instant::now()
                })
            });
        match current {
            Some(entry) => Ok(f(entry)),
            None => Err(LockError::NotHolder {
                name: lease.name.clone(),
                owner: lease.owner.clone(),
                token: lease.token,
            }),
        }
    }
}

#[async_trait]
impl LockService for MemoryLocks {
    async fn acquire(
        &self,
        tenant: &TenantId,
        name: &str,
        owner: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Option<Lease>> {
        check(name, owner, ttl)?;
        let key = (tenant.clone(), name.to_owned());
        match self.try_take(&key, owner, ttl, None) {
            Ok(lease) => return Ok(Some(lease)),
            Err(_) if wait.is_zero() => return Ok(None),
            Err(_) => {}
        }
        let deadline = Instant::now() + wait;
        let id = self.next_waiter.fetch_add(1, Ordering::Relaxed);
        self.lock()
            .entry(key.clone())
            .or_default()
            .queue
            .push_back((id, owner.to_owned()));
        let _place = Place {
            locks: self,
            key: key.clone(),
            id,
        };
        loop {
            let released = self.released.notified();
            match self.try_take(&key, owner, ttl, Some(id)) {
                Ok(lease) => return Ok(Some(lease)),
                Err(expires) => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                    // Wake on a release or departure, at the holder's
                    // expiry, or at the deadline.
                    let until = expires.map_or(deadline, |e| e.min(deadline));
                    tokio::select! {
                        () = released => {}
                        () = tokio::time::sleep_until(until) => {}
                    }
                }
            }
        }
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        check(&lease.name, &lease.owner, ttl)?;
        self.with_current(lease, |entry| {
            if let Some((_, _, expires)) = entry.holder.as_mut() {
                *expires = Instant::now() + ttl;
            }
        })?;
        Ok(Lease {
            ttl,
            ..lease.clone()
        })
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        self.with_current(lease, |entry| entry.holder = None)?;
        self.released.notify_waiters();
        Ok(())
    }

    async fn inspect(&self, tenant: &TenantId, name: &str) -> Result<Option<Holder>> {
        let state = self.lock();
        let now = Instant::now();
        Ok(state
            .get(&(tenant.clone(), name.to_owned()))
            .and_then(|e| e.holder.as_ref())
            .filter(|(_, _, exp)| *exp > now)
            .map(|(owner, token, exp)| Holder {
                owner: owner.to_owned(),
                token: *token,
                expires_in: *exp - now,
            }))
    }
}
