//! Session state through the sidecar: values that expire on their own, by
//! the TTL policy of their namespace (absolute or sliding, configured in the
//! sidecar).

use std::time::Duration;

use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::sessions_client::SessionsClient;
use tonic::transport::Channel;

use crate::Error;

/// A session as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// The stored bytes.
    pub value: Vec<u8>,
    /// Time left, after any extension this read made.
    pub expires_in: Duration,
}

/// Sessions with a lifetime per namespace, through the sidecar.
#[derive(Debug, Clone)]
pub struct SessionClient {
    inner: SessionsClient<Channel>,
}

impl SessionClient {
    /// A client on a channel opened elsewhere (shared with other clients).
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            inner: SessionsClient::new(channel),
        }
    }

    /// Writes a session; `ttl` overrides the namespace's (up to its max).
    /// Returns the time left.
    pub async fn put(
        &mut self,
        namespace: &str,
        id: &str,
        value: impl Into<Vec<u8>>,
        ttl: Option<Duration>,
    ) -> Result<Duration, Error> {
        let response = self
            .inner
            .put_session(pb::PutSessionRequest {
                namespace: namespace.to_owned(),
                id: id.to_owned(),
                value: value.into(),
                ttl_ms: ttl.map(|t| i64::try_from(t.as_millis()).unwrap_or(i64::MAX)),
            })
            .await?
            .into_inner();
        Ok(Duration::from_millis(response.expires_in_ms))
    }

    /// The session, or `None` if absent or expired (a sliding one is
    /// extended by the read).
    pub async fn get(&mut self, namespace: &str, id: &str) -> Result<Option<Session>, Error> {
        let request = pb::GetSessionRequest {
            namespace: namespace.to_owned(),
            id: id.to_owned(),
        };
        match self.inner.get_session(request).await {
            Ok(response) => {
                let response = response.into_inner();
                Ok(Some(Session {
                    value: response.value,
                    expires_in: Duration::from_millis(response.expires_in_ms),
                }))
            }
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(status.into()),
        }
    }

    /// Many sessions of one namespace in one call (at most 1,000 ids): those
    /// that are live, with their ids, in the order asked (absent and expired
    /// ones left out). Sliding ones are extended by the read.
    pub async fn get_many(
        &mut self,
        namespace: &str,
        ids: &[&str],
    ) -> Result<Vec<(String, Session)>, Error> {
        let request = pb::GetSessionsRequest {
            namespace: namespace.to_owned(),
            ids: ids.iter().map(|id| (*id).to_owned()).collect(),
        };
        let response = self.inner.get_sessions(request).await?.into_inner();
        Ok(response
            .sessions
            .into_iter()
            .map(|entry| {
                let session = Session {
                    value: entry.value,
                    expires_in: Duration::from_millis(entry.expires_in_ms),
                };
                (entry.id, session)
            })
            .collect())
    }

    /// Removes a session; whether it existed.
    pub async fn delete(&mut self, namespace: &str, id: &str) -> Result<bool, Error> {
        Ok(self
            .inner
            .delete_session(pb::DeleteSessionRequest {
                namespace: namespace.to_owned(),
                id: id.to_owned(),
            })
            .await?
            .into_inner()
            .existed)
    }
}
