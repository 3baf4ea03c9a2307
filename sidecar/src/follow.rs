//! Keeping this sidecar's cache and watchers in step with other sidecars.
//!
//! A context write is *published* ([`Publisher`]): announced (pub/sub) so
//! every sidecar drops its stale cache entry at once, and appended to the
//! tenant's update stream, which every sidecar reads through a consumer group
//! of its own to wake its `WatchContext` watchers. Followers:
//! - [`follow_announcements`]: drops stale entries; while announcements
//!   cannot be heard the cache is untrusted (serves nothing).
//! - [`follow_update_stream`]: reads the stream (claiming what a dead
//!   previous incarnation left unacknowledged), feeds watchers, acks, and
//!   trims the stream to its retention.
//! - [`follow_postgres`]: with Postgres storage and no Redis, the store's
//!   own LISTEN/NOTIFY plays both roles.

use std::sync::Arc;
use std::time::Duration;

use statefabric_domain::TenantId;
use statefabric_runtime::{ReadinessCheck, Shutdown};
use statefabric_store::context::ContextDocument;
use statefabric_store::pg::CONTEXT_CHANNEL;
use statefabric_updates::{Change, ChangeKind, Notifier, Retention, Signal, Start, UpdateLog};

use crate::cache::ContextCache;

/// A change to a document of this sidecar's tenant: (document id, revision).
pub(crate) type ChangeFeed = tokio::sync::broadcast::Sender<(String, u64)>;

/// The update stream of a tenant's context changes.
pub(crate) fn context_stream(tenant: &TenantId) -> String {
    format!("context.{tenant}")
}

/// Announces and logs this sidecar's context writes.
#[derive(Debug, Clone)]
pub(crate) struct Publisher {
    pub notifier: Arc<dyn Notifier>,
    pub log: Arc<dyn UpdateLog>,
    pub tenant: TenantId,
    pub identity: String,
    pub retention: Retention,
}

impl Publisher {
    /// After the write committed: failures are logged, not returned (the
    /// write stands; other caches still expire by age).
    pub(crate) async fn publish(&self, doc: &ContextDocument) {
        let change = Change {
            kind: ChangeKind::Context,
            key: doc.id.clone(),
            revision: doc.revision,
            origin: self.identity.clone(),
        };
        let stream = context_stream(&self.tenant);
        let (announced, logged) = tokio::join!(
            self.notifier.announce(&self.tenant, &change),
            self.log.append(&stream, &change, self.retention)
        );
        if let Err(err) = announced {
            tracing::warn!(document = %doc.id, error = %err, "context change not announced");
        }
        if let Err(err) = logged {
            tracing::warn!(document = %doc.id, error = %err, "context change not logged");
        }
    }
}

/// Follows announcements into the cache until shutdown.
pub(crate) async fn follow_announcements(
    notifier: Arc<dyn Notifier>,
    tenant: TenantId,
    identity: String,
    cache: Arc<ContextCache>,
    ready: ReadinessCheck,
    shutdown: Shutdown,
) {
    cache.set_trusted(false);
    loop {
        let mut signals = match notifier.follow(&tenant).await {
            Ok(signals) => signals,
            Err(err) => {
                tracing::warn!(error = %err, "cannot follow context announcements; retrying");
                tokio::select! {
                    () = shutdown.requested() => return,
                    () = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let signal = tokio::select! {
                () = shutdown.requested() => return,
                signal = signals.recv() => signal,
            };
            match signal {
                Some(Signal::Live) => {
                    tracing::info!("following context announcements");
                    cache.set_trusted(true);
                    ready.set(true);
                }
                Some(Signal::Lost) => {
                    tracing::warn!("lost context announcements; cache untrusted until back");
                    cache.set_trusted(false);
                }
                Some(Signal::Change(change)) => {
                    if change.kind == ChangeKind::Context && change.origin != identity {
                        cache.invalidate(&change.key, Some(change.revision));
                    }
                }
                None => {
                    cache.set_trusted(false);
                    break;
                }
            }
        }
    }
}

/// Settings of the update-stream follower.
#[derive(Debug, Clone)]
pub(crate) struct StreamFollow {
    pub log: Arc<dyn UpdateLog>,
    /// Dropped stale entries before watchers are woken, so a watcher that
    /// reads after its wake-up never gets the older revision from the cache.
    pub cache: Arc<ContextCache>,
    pub tenant: TenantId,
    pub identity: String,
    pub retention: Retention,
    pub claim_after: Duration,
}

/// How long a read waits for entries. An idle follower loops once per
/// block, so it is the longest the log allows: a dead consumer's entries
/// are claimed at most this long after `claim_after`.
const READ_BLOCK: Duration = statefabric_updates::redis::MAX_BLOCK;
const TRIM_EVERY: Duration = Duration::from_secs(60);

/// Reads the tenant's update stream into `changes` until shutdown.
pub(crate) async fn follow_update_stream(
    settings: StreamFollow,
    changes: ChangeFeed,
    shutdown: Shutdown,
) {
    let StreamFollow {
        log,
        cache,
        tenant,
        identity,
        retention,
        claim_after,
    } = settings;
    let stream = context_stream(&tenant);
    // One group per sidecar: every sidecar sees every change, and a
    // restarted sidecar (same identity) resumes where it left off.
    let group = format!("sidecar.{identity}");
    let consumer = format!("{identity}.{}", uuid::Uuid::new_v4().simple());
    let mut last_trim = tokio::time::Instant::now();
    let mut created = false;
    loop {
        let step = async {
            if !created {
                log.create_group(&stream, &group, Start::Latest).await?;
                created = true;
            }
            let mut batch = log
                .claim(&stream, &group, &consumer, claim_after, 100)
                .await?;
            if batch.is_empty() {
                batch = log
                    .read(&stream, &group, &consumer, 100, READ_BLOCK)
                    .await?;
            }
            for delivery in &batch {
                if delivery.change.kind == ChangeKind::Context {
                    if delivery.change.origin != identity {
                        cache.invalidate(&delivery.change.key, Some(delivery.change.revision));
                    }
                    let _ = changes.send((delivery.change.key.clone(), delivery.change.revision));
                }
            }
            let ids: Vec<String> = batch.into_iter().map(|d| d.id).collect();
            log.ack(&stream, &group, &ids).await?;
            if last_trim.elapsed() >= TRIM_EVERY {
                last_trim = tokio::time::Instant::now();
                log.trim(&stream, retention).await?;
            }
            Ok::<_, statefabric_updates::UpdatesError>(())
        };
        let result = tokio::select! {
            () = shutdown.requested() => return,
            result = step => result,
        };
        if let Err(err) = result {
            tracing::warn!(error = %err, "update stream read failed; retrying");
            tokio::select! {
                () = shutdown.requested() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

/// Follows other sidecars' context changes by Postgres LISTEN: drops stale
/// cache entries and wakes watchers. While not listening the cache is
/// untrusted.
pub(crate) async fn follow_postgres(
    url: String,
    tenant: String,
    cache: Arc<ContextCache>,
    changes: ChangeFeed,
    ready: ReadinessCheck,
    shutdown: Shutdown,
) {
    let mut listener = loop {
        let attempt = async {
            let mut listener = sqlx::postgres::PgListener::connect(&url).await?;
            listener.listen(CONTEXT_CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        tokio::select! {
            () = shutdown.requested() => return,
            result = attempt => match result {
                Ok(listener) => {
                    tracing::info!("following context changes");
                    ready.set(true);
                    break listener;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "cannot LISTEN for context changes; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            },
        }
    };
    loop {
        let received = tokio::select! {
            () = shutdown.requested() => return,
            received = listener.try_recv() => received,
        };
        match received {
            Ok(Some(notification)) => {
                let mut parts = notification.payload().split(' ');
                if let (Some(t), Some(doc), Some(revision)) =
                    (parts.next(), parts.next(), parts.next())
                    && t == tenant
                    && let Ok(revision) = revision.parse::<u64>()
                {
                    cache.invalidate(doc, Some(revision));
                    let _ = changes.send((doc.to_owned(), revision));
                }
            }
            // The connection dropped (sqlx reconnects on the next call):
            // changes may have been missed, so nothing cached can be trusted.
            Ok(None) => {
                tracing::warn!("lost the context change feed; dropping the cache");
                cache.clear();
            }
            Err(err) => {
                tracing::warn!(error = %err, "context change feed failed; cache untrusted");
                ready.set(false);
                cache.set_trusted(false);
                tokio::time::sleep(Duration::from_secs(1)).await;
                if listener.listen(CONTEXT_CHANNEL).await.is_ok() {
                    cache.set_trusted(true);
                    ready.set(true);
                }
            }
        }
    }
}
