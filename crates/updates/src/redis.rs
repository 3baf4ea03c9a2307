//! The Redis adapters: announcements over pub/sub, update logs on Streams.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use redis::AsyncCommands;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use statefabric_domain::TenantId;
use statefabric_redis::{Guarded, Redis};
use tokio::sync::mpsc;

use crate::{
    Change, Delivery, Notifier, Result, Retention, Signal, Start, UpdateLog, UpdatesError,
    check_name,
};

fn unavailable(err: redis::RedisError) -> UpdatesError {
    if err.code() == Some("NOGROUP") {
        return UpdatesError::Invalid {
            what: "group",
            reason: format!("{err}; create the group first"),
        };
    }
    UpdatesError::Unavailable(err.to_string())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The Redis ACL pub/sub channel pattern of `tenant`'s change
/// announcements (for a tenant's own Redis user).
pub fn tenant_channel_pattern(tenant: &TenantId) -> String {
    channel(tenant)
}

/// The Redis ACL key pattern of an update stream named `stream` (the
/// sidecar names its tenant's stream; for a tenant's own Redis user).
pub fn stream_key_pattern(stream: &str) -> String {
    key(stream)
}

fn channel(tenant: &TenantId) -> String {
    format!("sf:changes:{tenant}")
}

/// Announcements on Redis pub/sub. On a cluster, classic PUBLISH reaches
/// subscribers on every node. One channel per tenant.
#[derive(Debug, Clone)]
pub struct RedisNotifier {
    redis: Redis,
}

impl RedisNotifier {
    /// Announces and follows through `redis`.
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }
}

/// How long to wait before re-subscribing after the connection dropped.
const RESUBSCRIBE_PAUSE: Duration = Duration::from_millis(200);

#[async_trait]
impl Notifier for RedisNotifier {
    async fn announce(&self, tenant: &TenantId, change: &Change) -> Result<()> {
        let payload = serde_json::to_string(change).map_err(|e| UpdatesError::Invalid {
            what: "change",
            reason: e.to_string(),
        })?;
        let _: i64 = self
            .redis
            .conn()
            .publish(channel(tenant), payload)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn follow(&self, tenant: &TenantId) -> Result<mpsc::Receiver<Signal>> {
        let (tx, rx) = mpsc::channel(1024);
        let redis = self.redis.clone();
        let channel = channel(tenant);
        tokio::spawn(async move {
            loop {
                let subscribed = async {
                    let mut pubsub = redis.pubsub().await.map_err(|e| e.to_string())?;
                    pubsub
                        .subscribe(&channel)
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok::<_, String>(pubsub)
                };
                let pubsub = tokio::select! {
                    () = tx.closed() => return,
                    result = subscribed => result,
                };
                match pubsub {
                    Ok(pubsub) => {
                        if tx.send(Signal::Live).await.is_err() {
                            return;
                        }
                        let mut messages = pubsub.into_on_message();
                        loop {
                            let message = tokio::select! {
                                () = tx.closed() => return,
                                message = messages.next() => message,
                            };
                            let Some(message) = message else { break };
                            let Some(change) = message
                                .get_payload::<String>()
                                .ok()
                                .and_then(|p| serde_json::from_str::<Change>(&p).ok())
                            else {
                                tracing::warn!(%channel, "ignoring an undecodable announcement");
                                continue;
                            };
                            match tx.try_send(Signal::Change(change)) {
                                Ok(()) => {}
                                Err(mpsc::error::TrySendError::Closed(_)) => return,
                                // Too slow to keep up: it missed some.
                                Err(mpsc::error::TrySendError::Full(_)) => {
                                    if tx.send(Signal::Lost).await.is_err()
                                        || tx.send(Signal::Live).await.is_err()
                                    {
                                        return;
                                    }
                                }
                            }
                        }
                        tracing::warn!(%channel, "lost the change subscription; re-subscribing");
                        if tx.send(Signal::Lost).await.is_err() {
                            return;
                        }
                    }
                    Err(err) => {
                        tracing::warn!(%channel, error = %err, "cannot subscribe to changes; retrying");
                    }
                }
                tokio::time::sleep(RESUBSCRIBE_PAUSE).await;
            }
        });
        Ok(rx)
    }
}

/// Update logs on Redis Streams. Blocking reads use a connection of their
/// own so they never hold up other commands on the shared one.
#[derive(Debug, Clone)]
pub struct RedisUpdateLog {
    conn: Guarded,
    blocking: Guarded,
}

/// Longest block of a read; the blocking connection's deadline is above it.
pub const MAX_BLOCK: Duration = Duration::from_secs(5);

impl RedisUpdateLog {
    /// The log on `redis`, with a connection of its own for blocking reads.
    pub async fn connect(redis: &Redis) -> Result<Self, statefabric_redis::ConnectError> {
        Ok(Self {
            conn: redis.conn(),
            blocking: redis.dedicated(MAX_BLOCK + Duration::from_secs(2)).await?,
        })
    }
}

fn key(stream: &str) -> String {
    format!("sf:updates:{{{stream}}}")
}

/// Entries that do not decode (written by something else) are reported
/// apart so the caller can acknowledge them away.
fn decode(entries: Vec<StreamId>) -> (Vec<Delivery>, Vec<String>) {
    let mut good = Vec::with_capacity(entries.len());
    let mut bad = Vec::new();
    for entry in entries {
        let change = entry
            .get::<String>("change")
            .and_then(|json| serde_json::from_str::<Change>(&json).ok());
        match change {
            Some(change) => good.push(Delivery {
                id: entry.id,
                change,
            }),
            None => bad.push(entry.id),
        }
    }
    (good, bad)
}

#[async_trait]
impl UpdateLog for RedisUpdateLog {
    async fn append(&self, stream: &str, change: &Change, retention: Retention) -> Result<String> {
        check_name("stream", stream)?;
        let payload = serde_json::to_string(change).map_err(|e| UpdatesError::Invalid {
            what: "change",
            reason: e.to_string(),
        })?;
        redis::cmd("XADD")
            .arg(key(stream))
            .arg("MAXLEN")
            .arg("~")
            .arg(retention.max_len)
            .arg("*")
            .arg("change")
            .arg(payload)
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn create_group(&self, stream: &str, group: &str, start: Start) -> Result<()> {
        check_name("stream", stream)?;
        check_name("group", group)?;
        let from = match start {
            Start::Latest => "$",
            Start::Beginning => "0",
        };
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key(stream))
            .arg(group)
            .arg(from)
            .arg("MKSTREAM")
            .query_async(&mut self.conn.clone())
            .await;
        match created {
            Err(err) if err.code() == Some("BUSYGROUP") => Ok(()),
            other => other.map_err(unavailable),
        }
    }

    async fn read(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Delivery>> {
        check_name("stream", stream)?;
        check_name("group", group)?;
        check_name("consumer", consumer)?;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(group)
            .arg(consumer)
            .arg("COUNT")
            .arg(count.max(1));
        let block = block.min(MAX_BLOCK);
        let mut conn = if block.is_zero() {
            self.conn.clone()
        } else {
            cmd.arg("BLOCK").arg(millis(block));
            self.blocking.clone()
        };
        cmd.arg("STREAMS").arg(key(stream)).arg(">");
        let reply: Option<StreamReadReply> =
            cmd.query_async(&mut conn).await.map_err(unavailable)?;
        let entries = reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default();
        let (good, bad) = decode(entries);
        if !bad.is_empty() {
            tracing::warn!(
                stream,
                count = bad.len(),
                "acknowledging undecodable entries"
            );
            self.ack(stream, group, &bad).await?;
        }
        Ok(good)
    }

    async fn ack(&self, stream: &str, group: &str, ids: &[String]) -> Result<u64> {
        if ids.is_empty() {
            return Ok(0);
        }
        check_name("stream", stream)?;
        check_name("group", group)?;
        self.conn
            .clone()
            .xack(key(stream), group, ids)
            .await
            .map(|n: usize| n as u64)
            .map_err(unavailable)
    }

    async fn claim(
        &self,
        stream: &str,
        group: &str,
        consumer: &str,
        min_idle: Duration,
        count: usize,
    ) -> Result<Vec<Delivery>> {
        check_name("stream", stream)?;
        check_name("group", group)?;
        check_name("consumer", consumer)?;
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(key(stream))
            .arg(group)
            .arg(consumer)
            .arg(millis(min_idle))
            .arg("0-0")
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)?;
        let (good, bad) = decode(reply.claimed);
        self.ack(stream, group, &bad).await?;
        Ok(good)
    }

    async fn trim(&self, stream: &str, retention: Retention) -> Result<u64> {
        check_name("stream", stream)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, millis);
        let min_id = now.saturating_sub(millis(retention.max_age));
        redis::cmd("XTRIM")
            .arg(key(stream))
            .arg("MINID")
            .arg(format!("{min_id}-0"))
            .query_async(&mut self.conn.clone())
            .await
            .map_err(unavailable)
    }

    async fn len(&self, stream: &str) -> Result<u64> {
        check_name("stream", stream)?;
        self.conn
            .clone()
            .xlen(key(stream))
            .await
            .map(|n: usize| n as u64)
            .map_err(unavailable)
    }
}
