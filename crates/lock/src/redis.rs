//! Locks on Redis (standalone or Cluster). Each operation is one Lua script,
//! so check-and-set is atomic; `redis::Script` calls by SHA and reloads on
//! NOSCRIPT. A lock's keys share a hash tag, so a script's keys live in one
//! cluster slot.
//!
//! Fairness: a caller that is willing to wait takes a ticket in the lock's
//! queue (a sorted set) and keeps its place alive by polling; the lock goes
//! to the head of the queue, and a try-once caller cannot jump the queue. A
//! waiter that stops polling (crashed) loses its place after `QUEUE_ALIVE`.
//!
//! Tokens survive failover: a grant's token is the larger of the last token
//! plus one and the server's clock in microseconds. A replica promoted after
//! losing the last few increments still hands out larger tokens, because a
//! failover takes seconds and the token's clock part has moved on by then
//! (this assumes the nodes' clocks agree to well within the failover time —
//! NTP-level, not seconds apart).

use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::ConnectionLike;
use statefabric_domain::TenantId;

use crate::{Holder, Lease, LockError, LockService, Result, check};

/// KEYS: holder, counter, queue (zset owner→ticket), alive (hash owner→ms).
/// ARGV: owner, ttl ms, queue-alive ms (0: try once, do not queue).
/// Returns {granted, token, ttl-or-remaining-ms}.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local v = redis.call('GET', KEYS[1])
if v then
  local owner, token = string.match(v, '^(.*)|(%d+)$')
  if owner == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {1, tonumber(token), tonumber(ARGV[2])}
  end
end
local head = nil
while true do
  local first = redis.call('ZRANGE', KEYS[3], 0, 0)
  if #first == 0 then break end
  if tonumber(redis.call('HGET', KEYS[4], first[1]) or '0') > now then
    head = first[1]
    break
  end
  redis.call('ZREM', KEYS[3], first[1])
  redis.call('HDEL', KEYS[4], first[1])
end
if (not v) and (head == nil or head == ARGV[1]) then
  local last = tonumber(redis.call('GET', KEYS[2]) or '0')
  local token = math.max(last + 1, tonumber(t[1]) * 1000000 + tonumber(t[2]))
  local text = string.format('%d', token)
  redis.call('SET', KEYS[2], text)
  redis.call('SET', KEYS[1], ARGV[1] .. '|' .. text, 'PX', ARGV[2])
  if head then
    redis.call('ZREM', KEYS[3], ARGV[1])
    redis.call('HDEL', KEYS[4], ARGV[1])
  end
  return {1, token, tonumber(ARGV[2])}
end
local alive = tonumber(ARGV[3])
if alive > 0 then
  if not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
    local last = redis.call('ZRANGE', KEYS[3], -1, -1, 'WITHSCORES')
    local ticket = 1
    if #last == 2 then ticket = tonumber(last[2]) + 1 end
    redis.call('ZADD', KEYS[3], ticket, ARGV[1])
  end
  redis.call('HSET', KEYS[4], ARGV[1], now + alive)
  redis.call('PEXPIRE', KEYS[3], alive * 2)
  redis.call('PEXPIRE', KEYS[4], alive * 2)
end
if v then return {0, 0, redis.call('PTTL', KEYS[1])} end
return {0, 0, 1}
";

/// Gives up a place in the queue. KEYS: queue, alive. ARGV: owner.
const LEAVE: &str = r"
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('HDEL', KEYS[2], ARGV[1])
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

/// How long a waiter's place in the queue lasts without a poll. Polls come
/// at most `MAX_POLL` apart, so only a dead waiter loses its place.
const QUEUE_ALIVE: Duration = Duration::from_millis(1000);
const MAX_POLL: Duration = Duration::from_millis(25);

/// Locks on a Redis connection (multiplexed; standalone or cluster).
#[derive(Clone)]
pub struct RedisLocks<C> {
    conn: C,
    acquire: Script,
    leave: Script,
    renew: Script,
    release: Script,
}

impl<C> std::fmt::Debug for RedisLocks<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisLocks").finish_non_exhaustive()
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisLocks<C> {
    /// Locks on the Redis (standalone or cluster) behind `conn`.
    pub fn new(conn: C) -> Self {
        Self {
            conn,
            acquire: Script::new(ACQUIRE),
            leave: Script::new(LEAVE),
            renew: Script::new(RENEW),
            release: Script::new(RELEASE),
        }
    }
}

struct Keys {
    holder: String,
    counter: String,
    queue: String,
    alive: String,
}

/// The Redis ACL key pattern covering every lock key of `tenant` (for a
/// tenant's own Redis user).
pub fn tenant_key_pattern(tenant: &TenantId) -> String {
    format!("{{sf:lock:{tenant}:*")
}

fn keys(tenant: &TenantId, name: &str) -> Keys {
    let tag = format!("{{sf:lock:{tenant}:{name}}}");
    Keys {
        counter: format!("{tag}:token"),
        queue: format!("{tag}:queue"),
        alive: format!("{tag}:alive"),
        holder: tag,
    }
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
        let keys = keys(tenant, name);
        let deadline = tokio::time::Instant::now() + wait;
        let queue_alive = if wait.is_zero() {
            0
        } else {
            millis(QUEUE_ALIVE)
        };
        let mut conn = self.conn.clone();
        let mut pause = Duration::from_millis(2);
        loop {
            let (granted, token, ms): (i64, u64, i64) = self
                .acquire
                .key(&keys.holder)
                .key(&keys.counter)
                .key(&keys.queue)
                .key(&keys.alive)
                .arg(owner)
                .arg(millis(ttl))
                .arg(queue_alive)
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
                if queue_alive > 0 {
                    // Best effort: an unremoved place lapses on its own.
                    let _: redis::RedisResult<i64> = self
                        .leave
                        .key(&keys.queue)
                        .key(&keys.alive)
                        .arg(owner)
                        .invoke_async(&mut conn)
                        .await;
                }
                return Ok(None);
            }
            let remaining = Duration::from_millis(u64::try_from(ms.max(1)).unwrap_or(1));
            tokio::time::sleep(pause.min(remaining).min(deadline - now)).await;
            pause = (pause * 2).min(MAX_POLL);
        }
    }

    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        check(&lease.name, &lease.owner, ttl)?;
        let keys = keys(&lease.tenant, &lease.name);
        let ok: i64 = self
            .renew
            .key(&keys.holder)
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
        let keys = keys(&lease.tenant, &lease.name);
        let ok: i64 = self
            .release
            .key(&keys.holder)
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
        let keys = keys(tenant, name);
        let mut conn = self.conn.clone();
        let (value, ttl): (Option<String>, i64) = redis::pipe()
            .get(&keys.holder)
            .pttl(&keys.holder)
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
