//! Locks on Redis (standalone or Cluster). Each operation is one Lua script,
//! so check-and-set is atomic; `redis::Script` calls by SHA and reloads on
//! NOSCRIPT. A lock's two keys share a hash tag, so a script's keys live in
//! one cluster slot.

use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::ConnectionLike;
use statefabric_domain::TenantId;

use crate::{Holder, Lease, LockError, LockService, Result, check};

/// Take if free (new token from the lock's counter), extend if ours.
/// Returns {granted, token, ttl-or-remaining-ms}.
const ACQUIRE: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  local owner, token = string.match(v, '^(.*)|(%d+)$')
  if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, tonumber(token), tonumber(ARGV[2])}
  end
  return {0, 0, redis.call('PTTL', KEYS[1])}
end
local token = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. token, 'PX', ARGV[2])
return {1, token, tonumber(ARGV[2])}
";

/// Extend only if this exact grant still holds the lock.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
";

/// Delete only if this exact grant still holds the lock.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// Locks on a Redis connection: a `ConnectionManager` for standalone Redis
/// or a cluster connection; both multiplex and reconnect.
#[derive(Clone)]
pub struct RedisLocks<C> {
    conn: C,
    acquire: Script,
    renew: Script,
    release: Script,
}

impl<C> std::fmt::Debug for RedisLocks<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLocks").finish_non_exhaustive()
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisLocks<C> {
    pub fn new(conn: C) -> Self {
        Self {
            conn,
            acquire: Script::new(ACQUIRE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
        }
    }
}

fn keys(tenant: &TenantId, name: &str) -> (String, String) {
    let tag = format!("{{sf:lock:{tenant}:{name}}}");
    (tag.clone(), format!("{tag}:token"))
}

fn unavailable(err: redis::RedisError) -> LockError {
    LockError::Unavailable(err.to_string())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[async_trait]
impl<C: ConnectionLike + Clone + Send + Sync + 'static> LockService for RedisLocks<C> {
    async fn acquire(
        &self,
        tenant: &TenantId,
        name: &str,
        owner: &str,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Option<Lease>> {
        check(name, owner, ttl)?;
        let (holder, counter) = keys(tenant, name);
        let deadline = tokio::time::Instant::now() + wait;
        let mut conn = self.conn.clone();
        let mut pause = Duration::from_millis(2);
        loop {
            let (granted, token, ms): (i64, u64, i64) = self
                .acquire
                .key(&holder)
                .key(&counter)
                .arg(owner)
                .arg(millis(ttl))
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if granted == 1 {
                return Ok(Some(Lease {
                    tenant: tenant.clone(),
                    name: name.to_owned(),
                    owner: owner.to_owned(),
                    token,
                    ttl,
                }));
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            // Poll with growing pauses, never past the holder's expiry or our
            // deadline. (Not FIFO: see the crate doc.)
            let remaining = Duration::from_millis(u64::try_from(ms.max(1)).unwrap_or(1));
            tokio::time::sleep(pause.min(remaining).min(deadline - now)).await;
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        check(&lease.name, &lease.owner, ttl)?;
        let (holder, _) = keys(&lease.tenant, &lease.name);
        let ok: i64 = self
            .renew
            .key(&holder)
            .arg(format!("{}|{}", lease.owner, lease.token))
            .arg(millis(ttl))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        if ok == 1 {
            Ok(Lease {
                ttl,
                ..lease.clone()
            })
        } else {
            Err(LockError::NotHolder {
                name: lease.name.clone(),
                owner: lease.owner.clone(),
                token: lease.token,
            })
        }
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        let (holder, _) = keys(&lease.tenant, &lease.name);
        let ok: i64 = self
            .release
            .key(&holder)
            .arg(format!("{}|{}", lease.owner, lease.token))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        if ok == 1 {
            Ok(())
        } else {
            Err(LockError::NotHolder {
                name: lease.name.clone(),
                owner: lease.owner.clone(),
                token: lease.token,
            })
        }
    }

    async fn inspect(&self, tenant: &TenantId, name: &str) -> Result<Option<Holder>> {
        let (holder, _) = keys(tenant, name);
        let mut conn = self.conn.clone();
        let (value, ttl): (Option<String>, i64) = redis::pipe()
            .get(&holder)
            .pttl(&holder)
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok(value.and_then(|v| {
            let (owner, token) = v.rsplit_once('|')?;
            Some(Holder {
                owner: owner.to_owned(),
                token: token.parse().ok()?,
                expires_in: Duration::from_millis(u64::try_from(ttl.max(0)).unwrap_or(0)),
            })
        }))
    }
}
