//! The `SharedContext` gRPC service: context documents with version vectors,
//! CRDT merges, compressed deltas, a local cache and live watches, for the
//! sidecar's own tenant.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use prost::Message;
use statefabric_domain::{MergeType, Op, Stamp, TenantId, VectorClock};
use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::shared_context_server::SharedContext;
use statefabric_runtime::Shutdown;
use statefabric_store::Idempotency;
use statefabric_store::context::{ContextChange, ContextDocument, ContextStore, ContextWrite};
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Response, Status};

use crate::cache::ContextCache;
use crate::convert::json;
use crate::follow::{ChangeFeed, Publisher};
use crate::status::from_store;

#[derive(Debug, Clone)]
pub(crate) struct ContextService {
    store: Arc<dyn ContextStore>,
    tenant: TenantId,
    identity: String,
    cache: Arc<ContextCache>,
    changes: ChangeFeed,
    publisher: Publisher,
    shutdown: Shutdown,
}

type ChangeStream = Pin<Box<dyn Stream<Item = Result<pb::ContextChange, Status>> + Send>>;

fn merge_from_proto(raw: i32) -> Result<MergeType, Status> {
    Ok(match pb::MergeType::try_from(raw) {
        Ok(pb::MergeType::None) => MergeType::None,
        Ok(pb::MergeType::LwwRegister) => MergeType::LwwRegister,
        Ok(pb::MergeType::LwwMap) => MergeType::LwwMap,
        Ok(pb::MergeType::OrSet) => MergeType::OrSet,
        Ok(pb::MergeType::PnCounter) => MergeType::PnCounter,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "merge_type: unknown value {raw}"
            )));
        }
    })
}

fn merge_to_proto(merge: MergeType) -> pb::MergeType {
    match merge {
        MergeType::None => pb::MergeType::None,
        MergeType::LwwRegister => pb::MergeType::LwwRegister,
        MergeType::LwwMap => pb::MergeType::LwwMap,
        MergeType::OrSet => pb::MergeType::OrSet,
        MergeType::PnCounter => pb::MergeType::PnCounter,
    }
}

fn vector_from_proto(raw: Option<pb::VersionVector>) -> Result<VectorClock, Status> {
    let counters = raw.map(|v| v.counters).unwrap_or_default();
    if let Some(bad) = counters
        .keys()
        .find(|k| statefabric_domain::AgentId::new(k.as_str()).is_err())
    {
        return Err(Status::invalid_argument(format!(
            "base: writer id `{bad}` is not a valid agent id"
        )));
    }
    Ok(counters.into_iter().collect::<BTreeMap<_, _>>().into())
}

fn vector_to_proto(vector: &VectorClock) -> pb::VersionVector {
    pb::VersionVector {
        counters: vector
            .as_map()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
    }
}

fn fence(raw: pb::Fence) -> statefabric_store::Fence {
    statefabric_store::Fence {
        lock: raw.lock,
        token: raw.token,
    }
}

fn now_micros() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_micros()).unwrap_or_default()
}

impl ContextService {
    pub(crate) fn new(
        store: Arc<dyn ContextStore>,
        tenant: TenantId,
        identity: String,
        cache: Arc<ContextCache>,
        changes: ChangeFeed,
        publisher: Publisher,
        shutdown: Shutdown,
    ) -> Self {
        Self {
            store,
            tenant,
            identity,
            cache,
            changes,
            publisher,
            shutdown,
        }
    }

    async fn load(&self, id: &str) -> Result<Option<Arc<ContextDocument>>, Status> {
        if let Some(doc) = self.cache.get(id) {
            return Ok(Some(doc));
        }
        let doc = self
            .store
            .get(&self.tenant, id)
            .await
            .map_err(from_store)?
            .map(Arc::new);
        if let Some(doc) = &doc {
            self.cache.put(doc.clone());
        }
        Ok(doc)
    }

    async fn write<M: Message>(
        &self,
        request: Request<M>,
        build: impl FnOnce(M) -> Result<ContextWrite, Status>,
    ) -> Result<Response<pb::ContextWriteResponse>, Status> {
        let meta = crate::call::CallMeta::of(&request)?;
        let key = meta.idempotency_key;
        let mut scope = statefabric_store::Scope::new(self.tenant.clone(), self.identity.clone());
        scope.trace_id = meta.trace_id;
        let raw = request.into_inner();
        let fingerprint = key.map(|k| Idempotency::for_bytes(k, &raw.encode_to_vec()));
        let mut write = build(raw)?;
        write.idempotency = fingerprint;
        write.known = self.cache.peek(&write.id);
        let outcome = self.store.write(&scope, write).await.map_err(from_store)?;
        let doc = Arc::new(outcome.document);
        if outcome.replayed {
            self.cache.invalidate(&doc.id, None);
        } else {
            self.cache.put(doc.clone());
            let _ = self.changes.send((doc.id.clone(), doc.revision));
            self.publisher.publish(&doc).await;
        }
        Ok(Response::new(pb::ContextWriteResponse {
            revision: doc.revision,
            vector: Some(vector_to_proto(&doc.vector)),
            replayed: outcome.replayed,
        }))
    }

    /// Turns wire operations into stamped CRDT ops. Removes name the tags
    /// this sidecar sees now, which is what makes them observed-removes.
    async fn ops(&self, id: &str, raw: Vec<pb::CrdtOp>) -> Result<Vec<Op>, Status> {
        use pb::crdt_op::Op as Raw;
        let current = self.store.get(&self.tenant, id).await.map_err(from_store)?;
        let stamp = || Stamp {
            micros: now_micros(),
            writer: self.identity.clone(),
        };
        raw.into_iter()
            .enumerate()
            .map(|(i, op)| {
                let field = |name: &str| format!("ops[{i}].{name}");
                Ok(match op.op {
                    None => {
                        return Err(Status::invalid_argument(format!(
                            "ops[{i}]: empty operation"
                        )));
                    }
                    Some(Raw::SetJson(v)) => Op::Set {
                        value: json(&field("set_json"), &v)?,
                        stamp: stamp(),
                    },
                    Some(Raw::MapPut(put)) => Op::Put {
                        key: put.key,
                        value: json(&field("map_put.value_json"), &put.value_json)?,
                        stamp: stamp(),
                    },
                    Some(Raw::MapRemove(key)) => Op::Remove {
                        key,
                        stamp: stamp(),
                    },
                    Some(Raw::AddJson(v)) => Op::Add {
                        element: json(&field("add_json"), &v)?,
                        tag: uuid::Uuid::now_v7().to_string(),
                    },
                    Some(Raw::RemoveJson(v)) => {
                        let element = json(&field("remove_json"), &v)?;
                        let observed = current
                            .as_ref()
                            .and_then(|d| d.crdt.as_ref())
                            .map(|c| c.observed_tags(&element))
                            .unwrap_or_default();
                        Op::Discard { element, observed }
                    }
                    Some(Raw::Increment(delta)) => Op::Increment {
                        writer: self.identity.clone(),
                        delta,
                    },
                })
            })
            .collect()
    }
}

/// Most ids one `GetContexts` call may name.
const MAX_BULK_READ: usize = 1_000;

/// A document's answer without its body.
fn header(doc: &ContextDocument) -> pb::GetContextResponse {
    pb::GetContextResponse {
        document_id: doc.id.clone(),
        merge_type: merge_to_proto(doc.merge) as i32,
        vector: Some(vector_to_proto(&doc.vector)),
        revision: doc.revision,
        deleted: doc.deleted,
        updated_at: doc.updated_at.to_rfc3339(),
        body: None,
    }
}

/// A document in full, as `GetContext` answers without a known revision.
fn whole(doc: &ContextDocument) -> pb::GetContextResponse {
    pb::GetContextResponse {
        body: Some(pb::get_context_response::Body::ContentJson(
            serde_json::to_vec(&doc.content).unwrap_or_default(),
        )),
        ..header(doc)
    }
}

fn change(doc: &ContextDocument) -> pb::ContextChange {
    pb::ContextChange {
        revision: doc.revision,
        vector: Some(vector_to_proto(&doc.vector)),
        deleted: doc.deleted,
        content_json: serde_json::to_vec(&doc.content).unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl SharedContext for ContextService {
    async fn get_context(
        &self,
        request: Request<pb::GetContextRequest>,
    ) -> Result<Response<pb::GetContextResponse>, Status> {
        let raw = request.into_inner();
        let doc = self
            .load(&raw.document_id)
            .await?
            .filter(|d| !d.deleted)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "context document {} does not exist",
                    raw.document_id
                ))
            })?;
        if raw.known_revision > doc.revision {
            return Err(Status::invalid_argument(format!(
                "known_revision {} is ahead of the document, which is at revision {}",
                raw.known_revision, doc.revision
            )));
        }
        let base = if raw.known_revision == 0 {
            None
        } else {
            self.store
                .content_at(&self.tenant, &doc.id, raw.known_revision)
                .await
                .map_err(from_store)?
        };
        let Some(base) = base else {
            // Too old to be kept (or none asked for): the whole document.
            return Ok(Response::new(whole(&doc)));
        };
        let patch = json_patch::diff(&base, &doc.content);
        let bytes = serde_json::to_vec(&patch).unwrap_or_default();
        let compressed = zstd::encode_all(bytes.as_slice(), 3)
            .map_err(|e| Status::internal(format!("compressing the delta failed: {e}")))?;
        Ok(Response::new(pb::GetContextResponse {
            body: Some(pb::get_context_response::Body::DeltaZstd(compressed)),
            ..header(&doc)
        }))
    }

    async fn get_contexts(
        &self,
        request: Request<pb::GetContextsRequest>,
    ) -> Result<Response<pb::GetContextsResponse>, Status> {
        let ids = request.into_inner().document_ids;
        if ids.len() > MAX_BULK_READ {
            return Err(Status::invalid_argument(format!(
                "document_ids: {} ids, at most {MAX_BULK_READ} per call",
                ids.len()
            )));
        }
        for (i, id) in ids.iter().enumerate() {
            statefabric_store::context::check_id(id)
                .map_err(|e| Status::invalid_argument(format!("document_ids[{i}]: {e}")))?;
        }
        // Cached documents answer at once; the rest are read concurrently
        // (the store's read pool bounds how many at a time).
        let loaded = futures::future::try_join_all(ids.iter().map(|id| self.load(id))).await?;
        let mut response = pb::GetContextsResponse::default();
        for (id, doc) in ids.into_iter().zip(loaded) {
            match doc.filter(|d| !d.deleted) {
                Some(doc) => response.documents.push(whole(&doc)),
                None => response.missing.push(id),
            }
        }
        Ok(Response::new(response))
    }

    async fn put_context(
        &self,
        request: Request<pb::PutContextRequest>,
    ) -> Result<Response<pb::ContextWriteResponse>, Status> {
        self.write(request, |raw| {
            Ok(ContextWrite {
                merge: merge_from_proto(raw.merge_type)?,
                base: vector_from_proto(raw.base)?,
                change: ContextChange::Put(json("content_json", &raw.content_json)?),
                id: raw.document_id,
                idempotency: None,
                fence: raw.fence.map(fence),
                known: None,
            })
        })
        .await
    }

    async fn patch_context(
        &self,
        request: Request<pb::PatchContextRequest>,
    ) -> Result<Response<pb::ContextWriteResponse>, Status> {
        self.write(request, |raw| {
            let patch: json_patch::Patch =
                serde_json::from_slice(&raw.patch_json).map_err(|e| {
                    Status::invalid_argument(format!(
                        "patch_json: not a JSON Patch (RFC 6902): {e}"
                    ))
                })?;
            Ok(ContextWrite {
                merge: MergeType::None,
                base: vector_from_proto(raw.base)?,
                change: ContextChange::Patch(patch),
                id: raw.document_id,
                idempotency: None,
                fence: raw.fence.map(fence),
                known: None,
            })
        })
        .await
    }

    async fn merge_context(
        &self,
        request: Request<pb::MergeContextRequest>,
    ) -> Result<Response<pb::ContextWriteResponse>, Status> {
        let ops = self
            .ops(
                &request.get_ref().document_id,
                request.get_ref().ops.clone(),
            )
            .await?;
        self.write(request, move |raw| {
            Ok(ContextWrite {
                merge: merge_from_proto(raw.merge_type)?,
                base: vector_from_proto(raw.base)?,
                change: ContextChange::Merge(ops),
                id: raw.document_id,
                idempotency: None,
                fence: raw.fence.map(fence),
                known: None,
            })
        })
        .await
    }

    async fn delete_context(
        &self,
        request: Request<pb::DeleteContextRequest>,
    ) -> Result<Response<pb::ContextWriteResponse>, Status> {
        let id = request.get_ref().document_id.clone();
        // The merge type is fixed when a document is created, so a cached
        // copy names it correctly; one deleted meanwhile is refused by the
        // store (NOT_FOUND) all the same.
        let merge = self
            .load(&id)
            .await?
            .filter(|d| !d.deleted)
            .map(|d| d.merge)
            .ok_or_else(|| Status::not_found(format!("context document {id} does not exist")))?;
        self.write(request, move |raw| {
            Ok(ContextWrite {
                merge,
                base: vector_from_proto(raw.base)?,
                change: ContextChange::Delete,
                id: raw.document_id,
                idempotency: None,
                fence: raw.fence.map(fence),
                known: None,
            })
        })
        .await
    }

    type WatchContextStream = ChangeStream;

    async fn watch_context(
        &self,
        request: Request<pb::WatchContextRequest>,
    ) -> Result<Response<Self::WatchContextStream>, Status> {
        let raw = request.into_inner();
        statefabric_store::context::check_id(&raw.document_id)
            .map_err(crate::status::from_invalid)?;
        // Subscribe before reading, so a change between the two is not lost.
        let mut changes = self.changes.subscribe();
        let (tx, rx) = mpsc::channel(16);
        let service = self.clone();
        let shutdown = self.shutdown.clone();
        let id = raw.document_id;
        let mut last = raw.after_revision;
        self.shutdown.spawn(async move {
            loop {
                match service.store.get(&service.tenant, &id).await {
                    Ok(Some(doc)) if doc.revision > last => {
                        last = doc.revision;
                        if tx.send(Ok(change(&doc))).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(err) => {
                        let _ = tx.send(Err(from_store(err))).await;
                        return;
                    }
                }
                // Wait for a change to this document; a lagged receiver just
                // re-reads the document, which is all a watcher needs.
                loop {
                    tokio::select! {
                        () = shutdown.requested() => {
                            let _ = tx.send(Err(Status::unavailable(format!(
                                "the sidecar is shutting down; watch again after revision {last}"
                            )))).await;
                            return;
                        }
                        () = tx.closed() => return,
                        received = changes.recv() => match received {
                            Ok((doc, revision)) if doc == id && revision > last => break,
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(_)) => break,
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|item| (item, rx)) },
        ))))
    }
}
