//! The sidecar's cache of hot context documents.
//!
//! Bounded by entry count and by content bytes; least recently used entries
//! go first. Local writes replace their entry with the written document, so
//! a read after a write through this sidecar sees that write; remote changes
//! (announced by the store) drop entries older than the announced revision.
//! While announcements cannot be heard (the feed is down) the cache is
//! *untrusted*: it serves and keeps nothing, so a lost connection never means
//! stale reads; and no entry is served past `max_age`, which bounds the harm
//! of an announcement lost by its sender (it crashed between commit and
//! announce).
//! Built on the `lru` crate for the ordering; the byte accounting is ours.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

use lru::LruCache;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use statefabric_store::context::ContextDocument;

#[derive(Debug, Default, Clone)]
pub(crate) struct CacheMetrics {
    pub hits: Counter,
    pub misses: Counter,
    pub evictions: Counter,
    pub invalidations: Counter,
    pub entries: Gauge,
    pub bytes: Gauge,
}

#[derive(Debug)]
pub(crate) struct ContextCache {
    inner: Mutex<Inner>,
    trusted: AtomicBool,
    metrics: CacheMetrics,
}

/// The cache's bounds; changeable while it runs (a FabricConfig's `cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CacheLimits {
    pub max_entries: usize,
    pub max_bytes: usize,
    pub max_age: Duration,
}

/// The document of an entry not older than `max_age`.
fn servable(
    entry: Option<&(Arc<ContextDocument>, usize, Instant)>,
    max_age: Duration,
) -> Option<Arc<ContextDocument>> {
    entry
        .filter(|(_, _, at)| at.elapsed() <= max_age)
        .map(|(doc, _, _)| doc.clone())
}

#[derive(Debug)]
struct Inner {
    lru: LruCache<String, (Arc<ContextDocument>, usize, Instant)>,
    bytes: usize,
    /// Under the same lock as the entries: a shrink and a put never
    /// interleave into a cache over its bounds.
    limits: CacheLimits,
}

impl ContextCache {
    pub(crate) fn new(max_entries: usize, max_bytes: usize, max_age: Duration) -> Self {
        Self {
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
                limits: CacheLimits {
                    max_entries: max_entries.max(1),
                    max_bytes: max_bytes.max(1),
                    max_age,
                },
            }),
            trusted: AtomicBool::new(true),
            metrics: CacheMetrics::default(),
        }
    }

    pub(crate) fn limits(&self) -> CacheLimits {
        self.lock().limits
    }

    /// New bounds, applied at once: entries beyond them are evicted now,
    /// least recently used first.
    pub(crate) fn set_limits(&self, limits: CacheLimits) {
        let mut inner = self.lock();
        inner.limits = CacheLimits {
            max_entries: limits.max_entries.max(1),
            max_bytes: limits.max_bytes.max(1),
            max_age: limits.max_age,
        };
        self.evict(&mut inner);
        self.publish(&inner);
    }

    /// Drops least recently used entries until the bounds hold.
    fn evict(&self, inner: &mut Inner) {
        while inner.lru.len() > inner.limits.max_entries || inner.bytes > inner.limits.max_bytes {
            match inner.lru.pop_lru() {
                Some((_, (_, freed, _))) => {
                    inner.bytes -= freed;
                    self.metrics.evictions.inc();
                }
                None => break,
            }
        }
    }

    pub(crate) fn register_metrics(&self, registry: &mut Registry) {
        let m = &self.metrics;
        registry.register(
            "context_cache_hits",
            "Context reads served from the sidecar's cache",
            m.hits.clone(),
        );
        registry.register(
            "context_cache_misses",
            "Context reads that went to storage",
            m.misses.clone(),
        );
        registry.register(
            "context_cache_evictions",
            "Entries evicted to stay within bounds",
            m.evictions.clone(),
        );
        registry.register(
            "context_cache_invalidations",
            "Entries dropped because the document changed elsewhere",
            m.invalidations.clone(),
        );
        registry.register(
            "context_cache_entries",
            "Documents cached",
            m.entries.clone(),
        );
        registry.register(
            "context_cache_bytes",
            "Content bytes cached",
            m.bytes.clone(),
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every update leaves the map and the byte count consistent before
        // anything can panic, so a poisoned lock is safe to reuse.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether change announcements are being heard. Untrusted, the cache
    /// is emptied and stays empty until trusted again.
    pub(crate) fn set_trusted(&self, trusted: bool) {
        self.trusted.store(trusted, Ordering::SeqCst);
        self.clear();
    }

    pub(crate) fn get(&self, id: &str) -> Option<Arc<ContextDocument>> {
        let found = if self.trusted.load(Ordering::SeqCst) {
            let mut inner = self.lock();
            let max_age = inner.limits.max_age;
            servable(inner.lru.get(id), max_age)
        } else {
            None
        };
        match found {
            Some(_) => self.metrics.hits.inc(),
            None => self.metrics.misses.inc(),
        };
        found
    }

    /// The entry `get` would serve, without counting a hit or a miss or
    /// making it recent: what a write through this sidecar hands the store
    /// as the document it knows.
    pub(crate) fn peek(&self, id: &str) -> Option<Arc<ContextDocument>> {
        if !self.trusted.load(Ordering::SeqCst) {
            return None;
        }
        let inner = self.lock();
        servable(inner.lru.peek(id), inner.limits.max_age)
    }

    /// Caches `doc` unless a newer revision is already cached.
    pub(crate) fn put(&self, doc: Arc<ContextDocument>) {
        let size = serde_json::to_vec(&doc.content).map_or(0, |v| v.len()) + doc.id.len();
        if !self.trusted.load(Ordering::SeqCst) {
            return;
        }
        let mut inner = self.lock();
        if size > inner.limits.max_bytes {
            return;
        }
        if let Some((cached, _, _)) = inner.lru.peek(&doc.id)
            && cached.revision > doc.revision
        {
            return;
        }
        if let Some((_, old, _)) = inner.lru.put(doc.id.clone(), (doc, size, Instant::now())) {
            inner.bytes -= old;
        }
        inner.bytes += size;
        self.evict(&mut inner);
        self.publish(&inner);
    }

    /// Drops the entry if it is older than `revision` (or unconditionally
    /// with `None`).
    pub(crate) fn invalidate(&self, id: &str, revision: Option<u64>) {
        let mut inner = self.lock();
        let stale = inner
            .lru
            .peek(id)
            .is_some_and(|(doc, _, _)| revision.is_none_or(|r| doc.revision < r));
        if stale && let Some((_, size, _)) = inner.lru.pop(id) {
            inner.bytes -= size;
            self.metrics.invalidations.inc();
        }
        self.publish(&inner);
    }

    /// Drops everything: used when change notifications may have been missed.
    pub(crate) fn clear(&self) {
        let mut inner = self.lock();
        inner.lru.clear();
        inner.bytes = 0;
        self.publish(&inner);
    }

    fn publish(&self, inner: &Inner) {
        self.metrics
            .entries
            .set(i64::try_from(inner.lru.len()).unwrap_or(i64::MAX));
        self.metrics
            .bytes
            .set(i64::try_from(inner.bytes).unwrap_or(i64::MAX));
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use statefabric_domain::{MergeType, VectorClock};

    const LONG: Duration = Duration::from_secs(3600);

    fn doc(id: &str, revision: u64, content: serde_json::Value) -> Arc<ContextDocument> {
        Arc::new(ContextDocument {
            id: id.into(),
            merge: MergeType::None,
            content,
            vector: VectorClock::new(),
            revision,
            deleted: false,
            updated_at: chrono::Utc::now(),
            crdt: None,
        })
    }

    #[test]
    fn bounded_by_entries_and_bytes() {
        let cache = ContextCache::new(2, 1000, LONG);
        cache.put(doc("a", 1, json!(1)));
        cache.put(doc("b", 1, json!(2)));
        assert!(cache.get("a").is_some()); // a is now most recent
        cache.put(doc("c", 1, json!(3)));
        assert!(cache.get("b").is_none(), "least recently used evicted");
        assert_eq!(cache.metrics.evictions.get(), 1);

        let cache = ContextCache::new(100, 50, LONG);
        cache.put(doc("big", 1, json!("x".repeat(30))));
        cache.put(doc("big2", 1, json!("y".repeat(30))));
        assert!(cache.bytes() <= 50);
        assert!(cache.get("big").is_none());
        cache.put(doc("huge", 1, json!("z".repeat(100))));
        assert!(
            cache.get("huge").is_none(),
            "larger than the whole cache: not cached"
        );
    }

    #[test]
    fn newer_revisions_win_and_invalidation_respects_them() {
        let cache = ContextCache::new(10, 10_000, LONG);
        cache.put(doc("a", 3, json!(3)));
        cache.put(doc("a", 2, json!(2)));
        assert_eq!(cache.get("a").map(|d| d.revision), Some(3));
        cache.invalidate("a", Some(3));
        assert!(
            cache.get("a").is_some(),
            "not older than the announced revision"
        );
        cache.invalidate("a", Some(4));
        assert!(cache.get("a").is_none());
        assert_eq!(cache.metrics.hits.get(), 2);
        assert_eq!(cache.metrics.misses.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn untrusted_or_old_entries_are_never_served() {
        let cache = ContextCache::new(10, 10_000, Duration::from_secs(30));
        cache.put(doc("a", 1, json!(1)));
        cache.set_trusted(false);
        assert!(cache.get("a").is_none(), "dropped when the feed was lost");
        cache.put(doc("a", 2, json!(2)));
        assert!(cache.get("a").is_none(), "nothing kept while untrusted");
        cache.set_trusted(true);
        cache.put(doc("a", 3, json!(3)));
        assert!(cache.get("a").is_some());
        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(cache.get("a").is_none(), "past max_age");
    }

    #[tokio::test(start_paused = true)]
    async fn new_limits_evict_at_once_and_bound_what_follows() {
        let cache = ContextCache::new(10, 10_000, Duration::from_secs(60));
        for id in ["a", "b", "c", "d"] {
            cache.put(doc(id, 1, json!(id)));
        }
        assert!(cache.get("a").is_some(), "a is now the most recent");
        cache.set_limits(CacheLimits {
            max_entries: 2,
            max_bytes: 10_000,
            max_age: Duration::from_secs(5),
        });
        assert!(cache.get("b").is_none() && cache.get("c").is_none());
        assert!(cache.get("a").is_some() && cache.get("d").is_some());
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(cache.get("a").is_none(), "the new max_age applies");
        cache.put(doc("e", 1, json!(1)));
        cache.put(doc("f", 1, json!(1)));
        cache.put(doc("g", 1, json!(1)));
        assert_eq!(cache.limits().max_entries, 2);
        assert!(cache.get("e").is_none(), "two entries at most");
    }
}
