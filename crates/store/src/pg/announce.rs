//! Announcing committed context changes on the `statefabric_context`
//! channel ("<tenant> <document> <revision>"), which sidecars LISTEN to for
//! their caches and watchers.
//!
//! Why not a trigger, as before migration 0029: a NOTIFY inside a writing
//! transaction makes Postgres hold a database-wide lock from the commit's
//! start until after its WAL flush, so no two document writes could share a
//! flush (16 writers: about 750 commits/s with it against 5,500–6,400
//! without). A NOTIFY in a statement of its own writes nothing and flushes
//! nothing. Why a queue and a task of our own rather than the statement on
//! the writer's connection: the write answers without waiting one more
//! round trip, and the notifications of concurrent writes go out together,
//! in one statement.
//!
//! What this gives up: a process that dies between a commit and its
//! announcement leaves other sidecars' cache entries stale until their
//! `max_age`, as with announcements over Redis.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::mpsc;

/// The channel sidecars LISTEN on.
pub const CONTEXT_CHANNEL: &str = "statefabric_context";

/// Announcements waiting to go out; writers wait for room past this many
/// (backpressure rather than unbounded memory).
const QUEUE: usize = 4096;

/// Most announcements sent in one statement.
const BATCH: usize = 256;

/// Tries per batch before it is dropped (the caches' `max_age` then bounds
/// the harm); the store is unreachable by then, and so are its writes.
const TRIES: u32 = 8;

/// Sends context announcements after their commits, in batches, from a
/// task started by the first announcement (so a store can be made outside
/// a runtime). The task ends when the last clone of the store is dropped.
#[derive(Debug, Clone)]
pub(crate) struct Announcer {
    pool: PgPool,
    queue: Arc<OnceLock<mpsc::Sender<String>>>,
}

impl Announcer {
    pub(crate) fn new(pool: PgPool) -> Self {
        Self {
            pool,
            queue: Arc::default(),
        }
    }

    /// Queues the announcement of `document`'s `revision`, committed.
    pub(crate) async fn context_changed(&self, tenant: &str, document: &str, revision: u64) {
        let queue = self.queue.get_or_init(|| {
            let (sender, receiver) = mpsc::channel(QUEUE);
            tokio::spawn(send_batches(self.pool.clone(), receiver));
            sender
        });
        if queue
            .send(format!("{tenant} {document} {revision}"))
            .await
            .is_err()
        {
            tracing::warn!(
                document,
                revision,
                "context announcer stopped; change not announced"
            );
        }
    }
}

async fn send_batches(pool: PgPool, mut receiver: mpsc::Receiver<String>) {
    let mut batch = Vec::with_capacity(BATCH);
    while receiver.recv_many(&mut batch, BATCH).await > 0 {
        let mut tried = 0;
        loop {
            tried += 1;
            let sent = sqlx::query("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p")
                .bind(CONTEXT_CHANNEL)
                .bind(&batch)
                .execute(&pool)
                .await;
            match sent {
                Ok(_) => break,
                Err(err) if tried < TRIES => {
                    tracing::debug!(error = %err, tried, "context announcement failed; retrying");
                    tokio::time::sleep(Duration::from_millis(50) * 2u32.pow(tried)).await;
                }
                Err(err) => {
                    tracing::warn!(
                        error = %err,
                        changes = batch.len(),
                        "context changes not announced; other caches see them within their max_age"
                    );
                    break;
                }
            }
        }
        batch.clear();
    }
}
