//! Context documents through the sidecar: reads (full or as compressed
//! deltas), writes with version vectors, CRDT updates, watches, and a
//! read-modify-write helper that retries when another writer got in first.

use futures::{Stream, StreamExt};
use statefabric_domain::VectorClock;
use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::shared_context_client::SharedContextClient;
use tonic::transport::Channel;

use crate::error::Error;

pub use pb::MergeType;

/// A context document as read.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    /// The document's id.
    pub id: String,
    /// How concurrent writes merge (fixed at creation).
    pub merge: MergeType,
    /// The document's JSON.
    pub content: serde_json::Value,
    /// Its version vector: pass it back as the base of the next write.
    pub vector: VectorClock,
    /// Counts every write.
    pub revision: u64,
}

/// What a write produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// The document's revision after the write.
    pub revision: u64,
    /// Its version vector after the write.
    pub vector: VectorClock,
    /// True when an idempotency key matched: nothing new was written.
    pub replayed: bool,
}

/// One CRDT update, for [`ContextClient::merge`].
#[derive(Debug, Clone)]
pub struct Crdt(pb::CrdtOp);

impl Crdt {
    /// Sets a last-write-wins register's value.
    pub fn set(value: &serde_json::Value) -> Self {
        Self(op(pb::crdt_op::Op::SetJson(value.to_string().into_bytes())))
    }
    /// Puts `key` in a last-write-wins map (a `null` value removes it).
    pub fn put(key: &str, value: &serde_json::Value) -> Self {
        Self(op(pb::crdt_op::Op::MapPut(pb::MapPut {
            key: key.to_owned(),
            value_json: value.to_string().into_bytes(),
        })))
    }
    /// Removes `key` from a last-write-wins map.
    pub fn remove_key(key: &str) -> Self {
        Self(op(pb::crdt_op::Op::MapRemove(key.to_owned())))
    }
    /// Adds `element` to an observed-remove set.
    pub fn add(element: &serde_json::Value) -> Self {
        Self(op(pb::crdt_op::Op::AddJson(
            element.to_string().into_bytes(),
        )))
    }
    /// Removes `element` from an observed-remove set (the adds seen so far).
    pub fn remove(element: &serde_json::Value) -> Self {
        Self(op(pb::crdt_op::Op::RemoveJson(
            element.to_string().into_bytes(),
        )))
    }
    /// Adds `by` (negative: subtracts) to a PN-counter.
    pub fn increment(by: i64) -> Self {
        Self(op(pb::crdt_op::Op::Increment(by)))
    }
}

fn op(op: pb::crdt_op::Op) -> pb::CrdtOp {
    pb::CrdtOp { op: Some(op) }
}

fn to_proto(vector: &VectorClock) -> pb::VersionVector {
    pb::VersionVector {
        counters: vector
            .as_map()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
    }
}

fn from_proto(vector: Option<pb::VersionVector>) -> VectorClock {
    vector
        .map(|v| {
            v.counters
                .into_iter()
                .collect::<std::collections::BTreeMap<_, _>>()
        })
        .unwrap_or_default()
        .into()
}

fn written(r: pb::ContextWriteResponse) -> Written {
    Written {
        revision: r.revision,
        vector: from_proto(r.vector),
        replayed: r.replayed,
    }
}

/// Client for the `SharedContext` service. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ContextClient {
    inner: SharedContextClient<Channel>,
    fence: Option<pb::Fence>,
}

/// A document from the sidecar's answer; a delta applies to `known`.
fn document(response: pb::GetContextResponse, known: Option<&Document>) -> Result<Document, Error> {
    let content = match response.body {
        Some(pb::get_context_response::Body::ContentJson(bytes)) => serde_json::from_slice(&bytes)?,
        Some(pb::get_context_response::Body::DeltaZstd(bytes)) => {
            let base = known.map(|d| d.content.clone()).unwrap_or_default();
            apply_delta(base, &bytes)?
        }
        None => serde_json::Value::Null,
    };
    Ok(Document {
        id: response.document_id,
        merge: MergeType::try_from(response.merge_type).unwrap_or(MergeType::None),
        content,
        vector: from_proto(response.vector),
        revision: response.revision,
    })
}

impl ContextClient {
    /// A client on a channel opened elsewhere (shared with other clients).
    pub fn from_channel(channel: Channel) -> Self {
        Self {
            inner: SharedContextClient::new(channel).max_decoding_message_size(64 * 1024 * 1024),
            fence: None,
        }
    }

    /// A client whose writes carry the fencing token of `lock`: each is
    /// refused (FAILED_PRECONDITION) once a newer holder of that lock wrote.
    pub fn fenced(&self, lock: &str, token: u64) -> Self {
        Self {
            inner: self.inner.clone(),
            fence: Some(pb::Fence {
                lock: lock.to_owned(),
                token,
            }),
        }
    }

    /// The document, or `None` if it does not exist.
    pub async fn get(&mut self, id: &str) -> Result<Option<Document>, Error> {
        self.get_since(id, None).await
    }

    /// Refreshes `known` cheaply: the sidecar sends only a compressed JSON
    /// Patch from `known.revision` when it still can.
    pub async fn refresh(&mut self, known: &Document) -> Result<Option<Document>, Error> {
        self.get_since(&known.id, Some(known)).await
    }

    /// Many documents in one call (at most 1,000 ids): those that exist, in
    /// the order asked (missing and deleted ones left out).
    pub async fn get_many(&mut self, ids: &[&str]) -> Result<Vec<Document>, Error> {
        let request = pb::GetContextsRequest {
            document_ids: ids.iter().map(|id| (*id).to_owned()).collect(),
        };
        let response = self.inner.get_contexts(request).await?.into_inner();
        response
            .documents
            .into_iter()
            .map(|doc| document(doc, None))
            .collect()
    }

    async fn get_since(
        &mut self,
        id: &str,
        known: Option<&Document>,
    ) -> Result<Option<Document>, Error> {
        let request = pb::GetContextRequest {
            document_id: id.to_owned(),
            known_revision: known.map_or(0, |d| d.revision),
        };
        let response = match self.inner.get_context(request).await {
            Ok(r) => r.into_inner(),
            Err(status) if status.code() == tonic::Code::NotFound => return Ok(None),
            Err(status) => return Err(status.into()),
        };
        document(response, known).map(Some)
    }

    /// Creates or replaces a document, if nothing changed since `base` (empty
    /// to create). With `key`, at most once.
    pub async fn put(
        &mut self,
        id: &str,
        merge: MergeType,
        base: &VectorClock,
        content: &serde_json::Value,
        key: Option<&str>,
    ) -> Result<Written, Error> {
        let request = keyed(
            pb::PutContextRequest {
                document_id: id.to_owned(),
                merge_type: merge as i32,
                base: Some(to_proto(base)),
                content_json: content.to_string().into_bytes(),
                fence: self.fence.clone(),
            },
            key,
        )?;
        Ok(written(self.inner.put_context(request).await?.into_inner()))
    }

    /// Applies a JSON Patch (RFC 6902), if nothing changed since `base`.
    pub async fn patch(
        &mut self,
        id: &str,
        base: &VectorClock,
        patch: &serde_json::Value,
    ) -> Result<Written, Error> {
        let request = pb::PatchContextRequest {
            document_id: id.to_owned(),
            base: Some(to_proto(base)),
            patch_json: patch.to_string().into_bytes(),
            fence: self.fence.clone(),
        };
        Ok(written(
            self.inner.patch_context(request).await?.into_inner(),
        ))
    }

    /// Applies CRDT updates; concurrent updates merge instead of conflicting.
    pub async fn merge(
        &mut self,
        id: &str,
        merge: MergeType,
        ops: Vec<Crdt>,
    ) -> Result<Written, Error> {
        let request = pb::MergeContextRequest {
            document_id: id.to_owned(),
            merge_type: merge as i32,
            base: None,
            ops: ops.into_iter().map(|c| c.0).collect(),
            fence: self.fence.clone(),
        };
        Ok(written(
            self.inner.merge_context(request).await?.into_inner(),
        ))
    }

    /// Deletes the document if `base` is still its version vector.
    pub async fn delete(&mut self, id: &str, base: &VectorClock) -> Result<Written, Error> {
        let request = pb::DeleteContextRequest {
            document_id: id.to_owned(),
            base: Some(to_proto(base)),
            fence: self.fence.clone(),
        };
        Ok(written(
            self.inner.delete_context(request).await?.into_inner(),
        ))
    }

    /// Read-modify-write of a plain document: reads, applies `change` to the
    /// content, writes against the vector read; on a conflict, does it all
    /// again (up to `attempts` times).
    pub async fn update(
        &mut self,
        id: &str,
        attempts: u32,
        mut change: impl FnMut(&mut serde_json::Value),
    ) -> Result<Written, Error> {
        let mut last = None;
        for _ in 0..attempts.max(1) {
            let (mut content, base) = match self.get(id).await? {
                Some(doc) => (doc.content, doc.vector),
                None => (serde_json::Value::Null, VectorClock::new()),
            };
            change(&mut content);
            match self.put(id, MergeType::None, &base, &content, None).await {
                Ok(w) => return Ok(w),
                Err(e) if e.is_conflict() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::Conflict("no attempt made".into())))
    }

    /// The document's changes after `after_revision`, as they happen.
    pub async fn watch(
        &mut self,
        id: &str,
        after_revision: u64,
    ) -> Result<impl Stream<Item = Result<(u64, serde_json::Value), Error>> + use<>, Error> {
        let stream = self
            .inner
            .watch_context(pb::WatchContextRequest {
                document_id: id.to_owned(),
                after_revision,
            })
            .await?
            .into_inner();
        Ok(stream.map(|item| {
            let change = item?;
            Ok((
                change.revision,
                serde_json::from_slice(&change.content_json)?,
            ))
        }))
    }
}

fn keyed<T>(message: T, key: Option<&str>) -> Result<tonic::Request<T>, Error> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        let value = key
            .parse()
            .map_err(|_| Error::Invalid("idempotency key must be printable ASCII".into()))?;
        request.metadata_mut().insert("idempotency-key", value);
    }
    Ok(request)
}

/// Applies a zstd-compressed JSON Patch to `base`.
pub fn apply_delta(
    mut base: serde_json::Value,
    compressed: &[u8],
) -> Result<serde_json::Value, Error> {
    let bytes = zstd::decode_all(compressed)
        .map_err(|e| Error::Invalid(format!("delta does not decompress: {e}")))?;
    let patch: json_patch::Patch = serde_json::from_slice(&bytes)?;
    json_patch::patch(&mut base, &patch)
        .map_err(|e| Error::Invalid(format!("delta does not apply: {e}")))?;
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i32>().prop_map(Value::from),
            "[a-z/~]{0,6}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map("[a-z/~]{1,4}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// The delta path (diff, serialize, compress, decompress, patch)
        /// turns any document into any other.
        #[test]
        fn deltas_reproduce_the_target(a in arb_json(), b in arb_json()) {
            let patch = json_patch::diff(&a, &b);
            let compressed = zstd::encode_all(serde_json::to_vec(&patch).unwrap_or_default().as_slice(), 3)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let rebuilt = apply_delta(a, &compressed).map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(rebuilt, b);
        }
    }

    #[test]
    fn corrupt_deltas_are_errors() {
        assert!(apply_delta(Value::Null, b"not zstd").is_err());
        let wrong =
            zstd::encode_all(&br#"[{"op":"remove","path":"/x"}]"#[..], 3).unwrap_or_default();
        assert!(apply_delta(serde_json::json!({}), &wrong).is_err());
    }
}
