//! The `Events` gRPC service: appends, reads and live subscriptions, all for
//! the sidecar's own tenant.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use prost::Message;
use statefabric_domain::{AgentId, Checkpoint, StreamId, TenantId, VectorClock};
use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::events_server::Events;
use statefabric_runtime::Shutdown;
use statefabric_store::{
    AppendRequest, EventStore, FeedOptions, Idempotency, Scope, subscribe_all,
};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use crate::call::CallMeta;
use crate::convert;
use crate::status::from_store;

/// Request header carrying an idempotency key.

#[derive(Debug, Clone, Copy)]
pub(crate) struct SubscriptionSettings {
    pub buffer: usize,
    pub lag_timeout: Duration,
}

#[derive(Debug, Clone)]
pub(crate) struct EventsService {
    store: Arc<dyn EventStore>,
    tenant: TenantId,
    identity: AgentId,
    /// This sidecar's own vector-clock counter. Seeded from the wall clock
    /// (microseconds) so it keeps increasing across restarts without being
    /// persisted.
    clock: Arc<AtomicU64>,
    subscriptions: SubscriptionSettings,
    shutdown: Shutdown,
}

impl EventsService {
    pub(crate) fn new(
        store: Arc<dyn EventStore>,
        tenant: TenantId,
        identity: AgentId,
        subscriptions: SubscriptionSettings,
        shutdown: Shutdown,
    ) -> Self {
        let seed = u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or_default();
        Self {
            store,
            tenant,
            identity,
            clock: Arc::new(AtomicU64::new(seed)),
            subscriptions,
            shutdown,
        }
    }

    fn scope(&self, meta: &CallMeta) -> Scope {
        let mut scope = Scope::new(self.tenant.clone(), self.identity.as_str());
        scope.trace_id.clone_from(&meta.trace_id);
        scope
    }

    /// The vector clock of an append: every clock the writer sent, merged,
    /// plus a tick of this sidecar's own entry.
    fn clock_for(&self, events: &[pb::NewEvent]) -> BTreeMap<String, u64> {
        let mut clock = VectorClock::new();
        for event in events {
            if let Some(meta) = &event.metadata {
                let theirs: BTreeMap<String, u64> = meta
                    .vector_clock
                    .iter()
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
                clock.merge(&theirs.into());
            }
        }
        let tick = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
        clock.tick(self.identity.as_str(), tick);
        clock.into_map()
    }

    /// Forwards a feed to a gRPC stream with bounded buffering. A consumer
    /// that leaves the buffer full for `lag_timeout` is cut off with
    /// RESOURCE_EXHAUSTED; shutdown ends the stream with UNAVAILABLE. Either
    /// way the final status names the checkpoint to resume after, and arrives
    /// after every event already buffered.
    fn forward(
        &self,
        feed: impl Stream<Item = statefabric_store::Result<statefabric_domain::RecordedEvent>>
        + Send
        + 'static,
        after: Checkpoint,
        only: Option<StreamId>,
    ) -> EventStream {
        let SubscriptionSettings {
            buffer,
            lag_timeout,
        } = self.subscriptions;
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let (end_tx, end_rx) = oneshot::channel::<Option<Status>>();
        let shutdown = self.shutdown.clone();
        self.shutdown.spawn(async move {
            let mut feed = std::pin::pin!(feed);
            let mut last = after;
            let end = loop {
                let item = tokio::select! {
                    () = shutdown.requested() => break Some(Status::unavailable(format!(
                        "the sidecar is shutting down; resume after checkpoint {last}"
                    ))),
                    item = feed.next() => item,
                };
                let event = match item {
                    None => break None,
                    Some(Err(err)) => break Some(from_store(err)),
                    Some(Ok(event)) => event,
                };
                let checkpoint = event.checkpoint;
                if only.as_ref().is_none_or(|id| *id == event.stream_id) {
                    match tx.send_timeout(Ok(convert::recorded_to_proto(event)), lag_timeout).await {
                        Ok(()) => {}
                        Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                            break Some(Status::resource_exhausted(format!(
                                "subscriber fell behind: {buffer} events unread for {lag_timeout:?}; \
                                 resume after checkpoint {last}"
                            )));
                        }
                        Err(mpsc::error::SendTimeoutError::Closed(_)) => break None,
                    }
                }
                last = checkpoint;
            };
            let _ = end_tx.send(end);
        });
        Box::pin(futures::stream::unfold(
            Some((rx, end_rx)),
            |state| async move {
                let (mut rx, end_rx) = state?;
                match rx.recv().await {
                    Some(item) => Some((item, Some((rx, end_rx)))),
                    None => match end_rx.await {
                        Ok(Some(status)) => Some((Err(status), None)),
                        _ => None,
                    },
                }
            },
        ))
    }

    fn feed_options(&self) -> FeedOptions {
        FeedOptions {
            buffer: self.subscriptions.buffer,
            ..FeedOptions::default()
        }
    }
}

pub(crate) type EventStream = Pin<Box<dyn Stream<Item = Result<pb::RecordedEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Events for EventsService {
    async fn append_events(
        &self,
        request: Request<pb::AppendEventsRequest>,
    ) -> Result<Response<pb::AppendEventsResponse>, Status> {
        let meta = CallMeta::of(&request)?;
        let scope = self.scope(&meta);
        let (key, traceparent) = (meta.idempotency_key, meta.traceparent);
        let raw = request.into_inner();
        // The fingerprint is the operation, not its circumstances: event ids,
        // vector clocks and the expected version are left out, so a client
        // that retries after re-reading (new ids, newer expectation) is still
        // recognised as repeating itself and gets the first result.
        let idempotency = key.map(|key| {
            let mut fingerprint = raw.clone();
            fingerprint.expected = None;
            for event in &mut fingerprint.events {
                event.id.clear();
                if let Some(meta) = &mut event.metadata {
                    meta.vector_clock.clear();
                }
            }
            Idempotency::for_bytes(key, &fingerprint.encode_to_vec())
        });
        let stream = convert::stream_id("stream_id", &raw.stream_id)?;
        let expected = convert::expected(raw.expected)?;
        let clock = self.clock_for(&raw.events);
        let mut events = raw
            .events
            .into_iter()
            .enumerate()
            .map(|(i, e)| convert::new_event(i, e, &clock))
            .collect::<Result<Vec<_>, _>>()?;
        for event in &mut events {
            event.metadata.actor = Some(self.identity.to_string());
            if event.metadata.traceparent.is_none() {
                event.metadata.traceparent.clone_from(&traceparent);
            }
        }
        let mut append = AppendRequest::new(stream, raw.stream_type, expected, events);
        append.idempotency = idempotency;
        if let Some(fence) = raw.fence {
            append = append.fenced(fence.lock, fence.token);
        }
        let outcome = self
            .store
            .append(&scope, append)
            .await
            .map_err(from_store)?;
        Ok(Response::new(pb::AppendEventsResponse {
            first_version: outcome.result.first_version,
            last_version: outcome.result.last_version,
            first_position: outcome.result.first_position,
            last_position: outcome.result.last_position,
            replayed: outcome.replayed,
        }))
    }

    async fn read_stream(
        &self,
        request: Request<pb::ReadStreamRequest>,
    ) -> Result<Response<pb::ReadEventsResponse>, Status> {
        let raw = request.into_inner();
        let stream = convert::stream_id("stream_id", &raw.stream_id)?;
        let events = self
            .store
            .read_stream(&self.tenant, &stream, raw.from_version, raw.limit)
            .await
            .map_err(from_store)?;
        // An empty page of an existing stream is an answer; of a stream that
        // does not exist (for this tenant), it is NOT_FOUND.
        if events.is_empty()
            && self
                .store
                .stream_info(&self.tenant, &stream)
                .await
                .map_err(from_store)?
                .is_none()
        {
            return Err(Status::not_found(format!("stream {stream} does not exist")));
        }
        Ok(Response::new(pb::ReadEventsResponse {
            events: events.into_iter().map(convert::recorded_to_proto).collect(),
        }))
    }

    async fn read_all(
        &self,
        request: Request<pb::ReadAllRequest>,
    ) -> Result<Response<pb::ReadEventsResponse>, Status> {
        let raw = request.into_inner();
        let events = self
            .store
            .read_all(&self.tenant, raw.from_position, raw.limit)
            .await
            .map_err(from_store)?;
        Ok(Response::new(pb::ReadEventsResponse {
            events: events.into_iter().map(convert::recorded_to_proto).collect(),
        }))
    }

    type SubscribeAllStream = EventStream;

    async fn subscribe_all(
        &self,
        request: Request<pb::SubscribeAllRequest>,
    ) -> Result<Response<Self::SubscribeAllStream>, Status> {
        let after = convert::checkpoint(request.into_inner().after);
        let feed = subscribe_all(
            self.store.clone(),
            self.tenant.clone(),
            after,
            self.feed_options(),
        );
        Ok(Response::new(self.forward(feed, after, None)))
    }

    type SubscribeStreamStream = EventStream;

    async fn subscribe_stream(
        &self,
        request: Request<pb::SubscribeStreamRequest>,
    ) -> Result<Response<Self::SubscribeStreamStream>, Status> {
        let raw = request.into_inner();
        let stream = convert::stream_id("stream_id", &raw.stream_id)?;
        let after = convert::checkpoint(raw.after);
        let feed = subscribe_all(
            self.store.clone(),
            self.tenant.clone(),
            after,
            self.feed_options(),
        );
        Ok(Response::new(self.forward(feed, after, Some(stream))))
    }
}
