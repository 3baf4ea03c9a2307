//! The relay's deleting side: sent rows leave the outbox after their Kafka
//! commit, in the background.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::mpsc;

use super::Metrics;

/// Deletes sent rows after their Kafka commit, off the relay's path:
/// whatever has queued up goes in one call, which checks the leader epoch
/// first. A refused epoch marks the session deposed; other failures are
/// retried (the rows stay until deleted, and a later session would send
/// them again).
pub(super) async fn delete_sent(
    pool: PgPool,
    lease: String,
    epoch: u64,
    mut batches: mpsc::Receiver<Vec<uuid::Uuid>>,
    deposed: Arc<AtomicBool>,
    metrics: Metrics,
) {
    while let Some(mut ids) = batches.recv().await {
        while let Ok(more) = batches.try_recv() {
            ids.extend(more);
        }
        loop {
            let mut mark = Instant::now();
            let deleted =
                sqlx::query_scalar::<_, i64>("SELECT statefabric_relay_delete($1, $2, $3)")
                    .bind(&ids)
                    .bind(&lease)
                    .bind(i64::try_from(epoch).unwrap_or(i64::MAX))
                    .fetch_one(&pool)
                    .await;
            match deleted {
                Ok(_) => {
                    metrics.stage("delete", &mut mark);
                    break;
                }
                Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("SF001") => {
                    deposed.store(true, Ordering::SeqCst);
                    return;
                }
                Err(err) => {
                    tracing::warn!(error = %err, "deleting sent outbox rows failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }
}
