//! In-process locks for the embedded default: same semantics as Redis
//! (leases, fencing tokens that never repeat), one process.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use statefabric_domain::TenantId;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::{Holder, Lease, LockError, LockService, Result, check};

#[derive(Debug, Default)]
pub struct MemoryLocks {
    state: Mutex<HashMap<(TenantId, String), Entry>>,
    released: Notify,
}

#[derive(Debug, Default)]
struct Entry {
    holder: Option<(String, u64, Instant)>,
    /// Last token granted; kept after release so tokens never repeat.
    last_token: u64,
}

impl MemoryLocks {
    fn try_take(
        &self,
        tenant: &TenantId,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> std::result::Result<Lease, Instant> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let entry = state.entry((tenant.clone(), name.to_owned())).or_default();
        let now = Instant::now();
        let token = match &entry.holder {
            Some((holder, token, expires)) if *expires > now => {
                if holder != owner {
                    return Err(*expires);
                }
                *token
            }
            _ => {
                entry.last_token += 1;
                entry.last_token
            }
        };
        entry.holder = Some((owner.to_owned(), token, now + ttl));
        Ok(Lease {
            tenant: tenant.clone(),
            name: name.to_owned(),
            owner: owner.to_owned(),
            token,
            ttl,
        })
    }

    fn with_current<T>(&self, lease: &Lease, f: impl FnOnce(&mut Entry) -> T) -> Result<T> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
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
        let deadline = Instant::now() + wait;
        loop {
            let released = self.released.notified();
            match self.try_take(tenant, name, owner, ttl) {
                Ok(lease) => return Ok(Some(lease)),
                Err(expires) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Ok(None);
                    }
                    // Wake on a release, at the holder's expiry, or at the deadline.
                    tokio::select! {
                        () = released => {}
                        () = tokio::time::sleep_until(expires.min(deadline)) => {}
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
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        Ok(state
            .get(&(tenant.clone(), name.to_owned()))
            .and_then(|e| e.holder.as_ref())
            .filter(|(_, _, exp)| *exp > now)
            .map(|(owner, token, exp)| Holder {
                owner: owner.clone(),
                token: *token,
                expires_in: *exp - now,
            }))
    }
}
