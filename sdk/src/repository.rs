//! The aggregate-root repository through the sidecar: load by replaying the
//! stream, decide with `handle`, append with the loaded version as the
//! expectation, and start over on a conflict when the command allows it.

use std::marker::PhantomData;

use serde::Serialize;
use statefabric_domain::Aggregate;

use crate::client::{Appended, StateClient};
use crate::error::Error;
use crate::event::{Expected, NewEvent};

const PAGE: u32 = 1000;

/// Why a command could not be handled.
#[derive(Debug, thiserror::Error)]
pub enum RepositoryError<R: std::error::Error + 'static> {
    /// The aggregate refused the command (its own error).
    #[error("command rejected: {0}")]
    Rejected(#[source] R),
    /// The sidecar failed the load or the append.
    #[error(transparent)]
    Sidecar(#[from] Error),
    /// Other writers kept changing the stream; gave up after this many
    /// attempts.
    #[error("still conflicting after {0} attempts")]
    TooManyConflicts(u32),
}

/// Loads and saves one aggregate type through the sidecar.
#[derive(Debug, Clone)]
pub struct Repository<A> {
    client: StateClient,
    max_attempts: u32,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Aggregate> Repository<A>
where
    A::Command: Serialize,
{
    /// A repository on `client`, retrying conflicts a few times.
    pub fn new(client: StateClient) -> Self {
        Self {
            client,
            max_attempts: 5,
            _aggregate: PhantomData,
        }
    }

    /// The aggregate's state and version (0 if it does not exist yet).
    pub async fn load(&mut self, id: &str) -> Result<(A, u64), RepositoryError<A::Rejection>> {
        let mut state = A::default();
        let mut version = 0;
        loop {
            let events = match self.client.read_stream(id, version + 1, PAGE).await {
                Ok(events) => events,
                Err(Error::NotFound(_)) if version == 0 => return Ok((state, 0)),
                Err(e) => return Err(e.into()),
            };
            let count = events.len();
            for event in events {
                let decoded: A::Event = event.data_as()?;
                state.apply(&decoded);
                version = event.stream_version;
            }
            if count < PAGE as usize {
                return Ok((state, version));
            }
        }
    }

    /// Loads, handles `command`, appends; on a conflict, repeats against
    /// fresh state if `A::retry_on_conflict` allows. With a key, a repeat of
    /// the same command returns the first result (`replayed`).
    pub async fn execute(
        &mut self,
        id: &str,
        command: &A::Command,
        idempotency_key: Option<&str>,
    ) -> Result<Appended, RepositoryError<A::Rejection>> {
        for _ in 0..self.max_attempts {
            let (state, version) = self.load(id).await?;
            let events = state.handle(command).map_err(RepositoryError::Rejected)?;
            let new_events = events
                .iter()
                .map(|e| NewEvent::json(A::event_type(e), e))
                .collect::<Result<Vec<_>, _>>()?;
            let expected = if version == 0 {
                Expected::NoStream
            } else {
                Expected::Exact(version)
            };
            let result = match idempotency_key {
                Some(key) => {
                    self.client
                        .append_idempotent(key, id, A::STREAM_TYPE, expected, new_events)
                        .await
                }
                None => {
                    self.client
                        .append(id, A::STREAM_TYPE, expected, new_events)
                        .await
                }
            };
            match result {
                Ok(appended) => return Ok(appended),
                Err(e) if e.is_conflict() && A::retry_on_conflict(command) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Err(RepositoryError::TooManyConflicts(self.max_attempts))
    }
}
