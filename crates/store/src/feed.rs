//! `subscribe_all`: a live, resumable feed of a tenant's events that never
//! skips one.
//!
//! It pages through [`EventStore::read_feed`], which only returns events whose
//! transactions, and all earlier ones, have finished. Between pages it waits
//! for whichever comes first: an append through this process (the store's
//! notification channel) or the poll interval, which covers writers in other
//! processes. Written here rather than per backend so both backends share the
//! paging, waiting and backpressure logic.

use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use statefabric_domain::{Checkpoint, RecordedEvent, TenantId};
use tokio::sync::mpsc;

use crate::error::Result;
use crate::port::EventStore;

/// How a feed reads.
#[derive(Debug, Clone, Copy)]
pub struct FeedOptions {
    /// Events fetched per query.
    pub page_size: u32,
    /// Longest wait before looking for other processes' appends.
    pub poll_interval: Duration,
    /// Events buffered ahead of a slow consumer. When full, the feed stops
    /// reading until the consumer catches up: memory stays bounded.
    pub buffer: usize,
}

impl Default for FeedOptions {
    fn default() -> Self {
        Self {
            page_size: 500,
            poll_interval: Duration::from_millis(100),
            buffer: 1024,
        }
    }
}

/// Follows the tenant's events after `from`. Each item carries its checkpoint
/// (`RecordedEvent::checkpoint`); resume by passing the last one handled. The
/// stream ends after yielding an error, or when it is dropped.
pub fn subscribe_all(
    store: Arc<dyn EventStore>,
    tenant: TenantId,
    from: Checkpoint,
    options: FeedOptions,
) -> impl Stream<Item = Result<RecordedEvent>> + Send + 'static {
    let (tx, rx) = mpsc::channel(options.buffer.max(1));
    tokio::spawn(run(store, tenant, from, options, tx));
    tokio_stream_from(rx)
}

async fn run(
    store: Arc<dyn EventStore>,
    tenant: TenantId,
    mut after: Checkpoint,
    options: FeedOptions,
    tx: mpsc::Sender<Result<RecordedEvent>>,
) {
    let mut wake = store.append_notifications();
    loop {
        // Mark the notification seen before reading, so an append that lands
        // during the read is not missed.
        wake.borrow_and_update();
        let page = match store.read_feed(&tenant, after, options.page_size).await {
            Ok(page) => page,
            Err(err) => {
                let _ = tx.send(Err(err)).await;
                return;
            }
        };
        let full = page.len() as u32 == options.page_size;
        for event in page {
            after = event.checkpoint;
            if tx.send(Ok(event)).await.is_err() {
                return; // the subscriber went away
            }
        }
        if full {
            continue;
        }
        tokio::select! {
            () = tx.closed() => return,
            changed = wake.changed() => if changed.is_err() {
                // The store is gone; fall back to polling until dropped.
                tokio::time::sleep(options.poll_interval).await;
            },
            () = tokio::time::sleep(options.poll_interval) => {}
        }
    }
}

/// Replays the tenant's events from `from` up to the present, in feed order,
/// folding each into `state`; returns the state and the checkpoint reached.
/// Deterministic: the same events in the same order every time, which is what
/// rebuilding a projection needs.
pub async fn replay<S>(
    store: &dyn EventStore,
    tenant: &TenantId,
    from: Checkpoint,
    mut state: S,
    mut fold: impl FnMut(&mut S, &RecordedEvent),
) -> Result<(S, Checkpoint)> {
    const PAGE: u32 = 1000;
    let mut after = from;
    loop {
        let page = store.read_feed(tenant, after, PAGE).await?;
        for event in &page {
            fold(&mut state, event);
            after = event.checkpoint;
        }
        if page.len() < PAGE as usize {
            return Ok((state, after));
        }
    }
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: mpsc::Receiver<T>,
) -> impl Stream<Item = T> + Send + 'static {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
