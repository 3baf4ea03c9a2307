use futures::{Stream, StreamExt};
use statefabric_domain::Checkpoint;
use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::events_client::EventsClient;
use tonic::transport::Channel;

use crate::error::Error;
use crate::event::{Event, Expected, NewEvent};

/// Header the sidecar reads idempotency keys from.
const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";

/// A connection to the sidecar. Cheap to clone; clones share the channel.
#[derive(Debug, Clone)]
pub struct StateClient {
    events: EventsClient<Channel>,
    channel: Channel,
}

/// What an append wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// The stream version of the first event written.
    pub first_version: u64,
    /// The stream version of the last event written (the stream's version now).
    pub last_version: u64,
    /// The global position of the first event written.
    pub first_position: u64,
    /// The global position of the last event written.
    pub last_position: u64,
    /// True when an idempotency key matched: nothing new was written.
    pub replayed: bool,
}

impl StateClient {
    /// Connects to the sidecar at `endpoint` (e.g. `http://127.0.0.1:7400`).
    pub async fn connect(endpoint: impl Into<String>) -> Result<Self, Error> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.into())?
            .connect()
            .await?;
        Ok(Self::from_channel(channel))
    }

    /// A client on a channel opened elsewhere (shared with other clients).
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            events: EventsClient::new(channel.clone()).max_decoding_message_size(64 * 1024 * 1024),
            channel,
        }
    }

    /// The lock API on the same connection.
    pub fn locks(&self) -> crate::LockClient {
        crate::LockClient::from_channel(self.channel.clone())
    }

    /// The saga task API on the same connection.
    pub fn tasks(&self) -> crate::TaskClient {
        crate::TaskClient::from_channel(self.channel.clone())
    }

    /// The session-state API on the same connection.
    pub fn sessions(&self) -> crate::SessionClient {
        crate::SessionClient::from_channel(self.channel.clone())
    }

    /// The context-document API on the same connection.
    pub fn context(&self) -> crate::ContextClient {
        crate::ContextClient::from_channel(self.channel.clone())
    }

    /// Appends events to one stream, atomically, if `expected` holds.
    pub async fn append(
        &mut self,
        stream_id: &str,
        stream_type: &str,
        expected: Expected,
        events: Vec<NewEvent>,
    ) -> Result<Appended, Error> {
        self.append_inner(stream_id, stream_type, expected, events, None)
            .await
    }

    /// As [`Self::append`], at most once per `key`: a repeat (same key, same
    /// request) returns the first result with `replayed = true`.
    pub async fn append_idempotent(
        &mut self,
        key: &str,
        stream_id: &str,
        stream_type: &str,
        expected: Expected,
        events: Vec<NewEvent>,
    ) -> Result<Appended, Error> {
        self.append_inner(stream_id, stream_type, expected, events, Some(key))
            .await
    }

    /// As [`Self::append`], guarded by a held lock: refused (a conflict) if
    /// the lock has been granted to someone else since.
    pub async fn append_fenced(
        &mut self,
        lock: &crate::HeldLock,
        stream_id: &str,
        stream_type: &str,
        expected: Expected,
        events: Vec<NewEvent>,
    ) -> Result<Appended, Error> {
        let fence = pb::Fence {
            lock: lock.name().to_owned(),
            token: lock.token(),
        };
        self.append_request(stream_id, stream_type, expected, events, None, Some(fence))
            .await
    }

    async fn append_inner(
        &mut self,
        stream_id: &str,
        stream_type: &str,
        expected: Expected,
        events: Vec<NewEvent>,
        key: Option<&str>,
    ) -> Result<Appended, Error> {
        self.append_request(stream_id, stream_type, expected, events, key, None)
            .await
    }

    async fn append_request(
        &mut self,
        stream_id: &str,
        stream_type: &str,
        expected: Expected,
        events: Vec<NewEvent>,
        key: Option<&str>,
        fence: Option<pb::Fence>,
    ) -> Result<Appended, Error> {
        let mut request = tonic::Request::new(pb::AppendEventsRequest {
            stream_id: stream_id.to_owned(),
            stream_type: stream_type.to_owned(),
            expected: Some(expected.into()),
            events: events.into_iter().map(|e| e.raw).collect(),
            fence,
        });
        if let Some(key) = key {
            let value = key
                .parse()
                .map_err(|_| Error::Invalid("idempotency key must be printable ASCII".into()))?;
            request.metadata_mut().insert(IDEMPOTENCY_KEY_HEADER, value);
        }
        let r = self.events.append_events(request).await?.into_inner();
        Ok(Appended {
            first_version: r.first_version,
            last_version: r.last_version,
            first_position: r.first_position,
            last_position: r.last_position,
            replayed: r.replayed,
        })
    }

    /// Up to `limit` events of `stream_id`, from `from_version` on.
    pub async fn read_stream(
        &mut self,
        stream_id: &str,
        from_version: u64,
        limit: u32,
    ) -> Result<Vec<Event>, Error> {
        let response = self
            .events
            .read_stream(pb::ReadStreamRequest {
                stream_id: stream_id.to_owned(),
                from_version,
                limit,
            })
            .await?;
        response
            .into_inner()
            .events
            .into_iter()
            .map(Event::try_from)
            .collect()
    }

    /// Up to `limit` events of the tenant's whole log, from the global
    /// position `from_position` on.
    pub async fn read_all(&mut self, from_position: u64, limit: u32) -> Result<Vec<Event>, Error> {
        let response = self
            .events
            .read_all(pb::ReadAllRequest {
                from_position,
                limit,
            })
            .await?;
        response
            .into_inner()
            .events
            .into_iter()
            .map(Event::try_from)
            .collect()
    }

    /// Follows the tenant's events after `after` (`None`: from the start).
    /// Resume by passing the last handled event's `checkpoint`.
    pub async fn subscribe_all(
        &mut self,
        after: Option<Checkpoint>,
    ) -> Result<impl Stream<Item = Result<Event, Error>> + use<>, Error> {
        let stream = self
            .events
            .subscribe_all(pb::SubscribeAllRequest {
                after: after.map(|c| pb::Checkpoint {
                    commit: c.commit,
                    position: c.position,
                }),
            })
            .await?
            .into_inner();
        Ok(stream.map(|item| item.map_err(Error::from).and_then(Event::try_from)))
    }

    /// Follows one stream's events after `after`.
    pub async fn subscribe_stream(
        &mut self,
        stream_id: &str,
        after: Option<Checkpoint>,
    ) -> Result<impl Stream<Item = Result<Event, Error>> + use<>, Error> {
        let stream = self
            .events
            .subscribe_stream(pb::SubscribeStreamRequest {
                stream_id: stream_id.to_owned(),
                after: after.map(|c| pb::Checkpoint {
                    commit: c.commit,
                    position: c.position,
                }),
            })
            .await?
            .into_inner();
        Ok(stream.map(|item| item.map_err(Error::from).and_then(Event::try_from)))
    }
}
