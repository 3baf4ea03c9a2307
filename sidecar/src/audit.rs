//! The audit of the sidecar's mutations that the event store does not see
//! — lock acquire/renew/release, session writes and deletes — into the
//! store's `audit_log` (`statefabric_store::audit`).
//!
//! Entries queue in a bounded channel and one task writes them in batches
//! (every [`FLUSH_EVERY`] or [`BATCH`] entries), so a lock call never waits
//! for a database write: locks and sessions live in Redis and stay
//! available while Postgres is not. The price, documented in
//! docs/architecture.md: a crash loses at most the last batch's entries;
//! a write that fails is retried with the batch kept; and when the queue is
//! full (the database unreachable for long) new entries are dropped and
//! counted in `statefabric_audit_dropped`, never blocking the call. At
//! clean shutdown the queue is written out ([`Auditor::flush`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use serde_json::Value;
use statefabric_domain::TenantId;
use statefabric_store::audit::{AuditEntry, AuditLog};
use tokio::sync::{mpsc, oneshot};

/// Entries written at once, at most.
const BATCH: usize = 256;
/// How long an entry waits for more to join its batch.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// Entries queued before new ones are dropped.
const QUEUE: usize = 10_000;

#[derive(Debug)]
enum Message {
    Entry(AuditEntry),
    /// Write out what is queued, then answer.
    Flush(oneshot::Sender<()>),
}

/// Queues audit entries of one sidecar (its tenant and identity).
#[derive(Debug, Clone)]
pub(crate) struct Auditor {
    tx: mpsc::Sender<Message>,
    tenant: TenantId,
    actor: String,
    dropped: Counter,
    /// The second (since the epoch) a drop was last logged.
    last_drop_logged: Arc<AtomicU64>,
}

fn coarse_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Auditor {
    /// Starts the writer; it ends when every `Auditor` is dropped.
    pub(crate) fn start(
        log: Arc<dyn AuditLog>,
        tenant: TenantId,
        actor: String,
        dropped: Counter,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write(log, rx));
        Self {
            tx,
            tenant,
            actor,
            dropped,
            last_drop_logged: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Queues one entry: `action` on `target`, with its outcome and
    /// particulars in `details`.
    pub(crate) fn record(&self, action: &str, target: &str, details: Value) {
        let entry = AuditEntry {
            tenant: self.tenant.clone(),
            actor: self.actor.clone(),
            action: action.to_owned(),
            target: target.to_owned(),
            details,
            trace_id: None,
        };
        if self.tx.try_send(Message::Entry(entry)).is_err() {
            self.dropped.inc();
            // Once per second at most: a flood of drops must not become a
            // flood of log lines (the counter has every one).
            let now = coarse_seconds();
            if self.last_drop_logged.swap(now, Ordering::Relaxed) != now {
                tracing::warn!(%action, %target, dropped_total = self.dropped.get(), "audit queue full; entries dropped");
            }
        }
    }

    /// Writes out every queued entry (at shutdown), waiting at most
    /// `limit`.
    pub(crate) async fn flush(&self, limit: Duration) {
        let (done, written) = oneshot::channel();
        if self.tx.send(Message::Flush(done)).await.is_ok() {
            let _ = tokio::time::timeout(limit, written).await;
        }
    }
}

/// The writer: batches, writes, retries a failed batch with backoff.
async fn write(log: Arc<dyn AuditLog>, mut rx: mpsc::Receiver<Message>) {
    let mut batch: Vec<AuditEntry> = Vec::new();
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    let mut backoff = Duration::from_millis(100);
    loop {
        if batch.is_empty() && waiting.is_empty() {
            match rx.recv().await {
                Some(message) => take(message, &mut batch, &mut waiting),
                None => return,
            }
        }
        // More for this batch, until it is full, a flush is asked for, or
        // the first entry has waited long enough.
        let until = tokio::time::Instant::now() + FLUSH_EVERY;
        while batch.len() < BATCH && waiting.is_empty() {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(message)) => take(message, &mut batch, &mut waiting),
                Ok(None) | Err(_) => break,
            }
        }
        if !batch.is_empty() {
            match log.record(&batch).await {
                Ok(()) => {
                    batch.clear();
                    backoff = Duration::from_millis(100);
                }
                Err(err) => {
                    tracing::warn!(entries = batch.len(), error = %err, "audit entries not written; retrying");
                    if waiting.is_empty() {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                    // A flush waits (shutdown): give up on this batch.
                    batch.clear();
                }
            }
        }
        for done in waiting.drain(..) {
            let _ = done.send(());
        }
    }
}

fn take(message: Message, batch: &mut Vec<AuditEntry>, waiting: &mut Vec<oneshot::Sender<()>>) {
    match message {
        Message::Entry(entry) => batch.push(entry),
        Message::Flush(done) => waiting.push(done),
    }
}
