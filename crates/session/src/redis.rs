//! Sessions on Redis (standalone or cluster). A session is a string key with
//! a PX expiry; each namespace keeps an index (a sorted set: id → expiry) so
//! live sessions can be counted without a SCAN. The session keys and their
//! index share a hash tag, so each script's keys are in one cluster slot —
//! the price is that one tenant's namespace lives on one primary; spread a
//! large tenant over several namespaces.

use std::time::Duration;

use async_trait::async_trait;
use redis::Script;
use redis::aio::ConnectionLike;
use statefabric_domain::TenantId;

use crate::{
    DEFAULT_MAX_VALUE_BYTES, Expiry, Result, Session, SessionError, SessionKey, SessionStore,
    bulk_keys, check,
};

/// KEYS: session, index. ARGV: value, ttl ms, 'a'|'s', id.
/// Absolute sessions keep the expiry they were created with.
const PUT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local left = redis.call('PTTL', KEYS[1])
if ARGV[3] == 'a' and left > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'KEEPTTL')
  ttl = left
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ttl)
end
redis.call('ZADD', KEYS[2], now + ttl, ARGV[4])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
return ttl
";

/// KEYS: session, index. ARGV: ttl ms, 'a'|'s', id. Returns {value, ms} or {}.
const GET: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then
  redis.call('ZREM', KEYS[2], ARGV[3])
  return false
end
if ARGV[2] == 's' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local ttl = tonumber(ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('ZADD', KEYS[2], now + ttl, ARGV[3])
  if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
  return {v, ttl}
end
return {v, redis.call('PTTL', KEYS[1])}
";

/// KEYS: index, then one session key per id. ARGV: ttl ms, 'a'|'s', then
/// the ids. Returns, per id in order, {value, ms} or false (nil on the
/// wire: a Lua false keeps its place in the array, where a nil would end
/// it). All keys share the index's hash tag, so this is one slot and one
/// round trip however many ids.
const GET_MANY: &str = r"
local ttl = tonumber(ARGV[1])
local sliding = ARGV[2] == 's'
local now = 0
if sliding then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local out, gone = {}, {}
for i = 2, #KEYS do
  local id = ARGV[i + 1]
  local v = redis.call('GET', KEYS[i])
  if not v then
    out[i - 1] = false
    gone[#gone + 1] = id
  elseif sliding then
    redis.call('PEXPIRE', KEYS[i], ttl)
    redis.call('ZADD', KEYS[1], now + ttl, id)
    out[i - 1] = {v, ttl}
  else
    out[i - 1] = {v, redis.call('PTTL', KEYS[i])}
  end
end
if #gone > 0 then redis.call('ZREM', KEYS[1], unpack(gone)) end
if sliding and #gone < #KEYS - 1 and redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return out
";

/// KEYS: session, index. ARGV: id.
const DELETE: &str = r"
redis.call('ZREM', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
";

/// KEYS: index. Drops expired ids, then counts.
const LIVE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
";

/// Sessions on Redis (standalone or cluster), each write and read one Lua
/// script so expiry and value change together.
#[derive(Clone)]
pub struct RedisSessions<C> {
    conn: C,
    max_value: usize,
    put: Script,
    get: Script,
    get_many: Script,
    delete: Script,
    live: Script,
}

impl<C> std::fmt::Debug for RedisSessions<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSessions").finish_non_exhaustive()
    }
}

impl<C: ConnectionLike + Clone + Send + Sync + 'static> RedisSessions<C> {
    /// Sessions on the Redis behind `conn`.
    pub fn new(conn: C) -> Self {
        Self {
            conn,
            max_value: DEFAULT_MAX_VALUE_BYTES,
            put: Script::new(PUT),
            get: Script::new(GET),
            get_many: Script::new(GET_MANY),
            delete: Script::new(DELETE),
            live: Script::new(LIVE),
        }
    }

    /// Refuses values larger than `bytes`.
    pub fn with_max_value(mut self, bytes: usize) -> Self {
        self.max_value = bytes;
        self
    }
}

/// The Redis ACL key pattern covering every session key of `tenant` (for a
/// tenant's own Redis user).
pub fn tenant_key_pattern(tenant: &TenantId) -> String {
    format!("{{sf:sess:{tenant}:*")
}

fn index(tenant: &TenantId, namespace: &str) -> String {
    format!("{{sf:sess:{tenant}:{namespace}}}")
}

fn keys(key: &SessionKey) -> (String, String) {
    let index = index(&key.tenant, &key.namespace);
    (format!("{index}:{}", key.id), index)
}

fn unavailable(err: redis::RedisError) -> SessionError {
    SessionError::Unavailable(err.to_string())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn mode(expiry: Expiry) -> &'static str {
    match expiry {
        Expiry::Absolute => "a",
        Expiry::Sliding => "s",
    }
}

fn duration(ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(ms.max(0)).unwrap_or(0))
}

#[async_trait]
impl<C: ConnectionLike + Clone + Send + Sync + 'static> SessionStore for RedisSessions<C> {
    async fn put(
        &self,
        key: &SessionKey,
        value: &[u8],
        ttl: Duration,
        expiry: Expiry,
    ) -> Result<Duration> {
        check(key, Some((value, self.max_value)), ttl)?;
        let (session, index) = keys(key);
        let left: i64 = self
            .put
            .key(session)
            .key(index)
            .arg(value)
            .arg(millis(ttl))
            .arg(mode(expiry))
            .arg(&key.id)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(duration(left))
    }

    async fn get(
        &self,
        key: &SessionKey,
        ttl: Duration,
        expiry: Expiry,
    ) -> Result<Option<Session>> {
        check(key, None, ttl)?;
        let (session, index) = keys(key);
        let found: Option<(Vec<u8>, i64)> = self
            .get
            .key(session)
            .key(index)
            .arg(millis(ttl))
            .arg(mode(expiry))
            .arg(&key.id)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(found.map(|(value, ms)| Session {
            value,
            expires_in: duration(ms),
        }))
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
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.get_many.key(index(tenant, namespace));
        for key in &keys {
            invocation.key(self::keys(key).0);
        }
        invocation.arg(millis(ttl)).arg(mode(expiry));
        for key in &keys {
            invocation.arg(&key.id);
        }
        let found: Vec<Option<(Vec<u8>, i64)>> = invocation
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        if found.len() != keys.len() {
            return Err(SessionError::Unavailable(format!(
                "bulk read of {} sessions answered {}",
                keys.len(),
                found.len()
            )));
        }
        Ok(found
            .into_iter()
            .map(|read| {
                read.map(|(value, ms)| Session {
                    value,
                    expires_in: duration(ms),
                })
            })
            .collect())
    }

    async fn delete(&self, key: &SessionKey) -> Result<bool> {
        check(key, None, Duration::from_millis(1))?;
        let (session, index) = keys(key);
        let deleted: i64 = self
            .delete
            .key(session)
            .key(index)
            .arg(&key.id)
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(deleted == 1)
    }

    async fn live(&self, tenant: &TenantId, namespace: &str) -> Result<u64> {
        let count: u64 = self
            .live
            .key(index(tenant, namespace))
            .invoke_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        Ok(count)
    }
}
