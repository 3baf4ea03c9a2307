//! The periodic clean-up of expired idempotency keys.

use std::sync::Arc;
use std::time::Duration;

use crate::port::EventStore;

/// Purges expired idempotency keys every `interval` until `stop` resolves.
/// Failures are logged and retried at the next tick: a missed purge only
/// delays reclaiming space, it never affects correctness (expired keys are
/// treated as absent when claimed).
pub async fn run_idempotency_janitor(
    store: Arc<dyn EventStore>,
    interval: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        tokio::select! {
            () = &mut stop => return,
            _ = ticker.tick() => match store.purge_expired_idempotency_keys().await {
                Ok(0) => {}
                Ok(purged) => tracing::debug!(purged, "purged expired idempotency keys"),
                Err(err) => tracing::warn!(error = %err, "purging idempotency keys failed"),
            },
        }
    }
}
