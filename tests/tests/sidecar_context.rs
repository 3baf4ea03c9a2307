//! Shared context through real sidecars on the real Postgres: version
//! vectors across sidecars, cache invalidation by change notification,
//! compressed deltas, CRDT merges, watches and bad input.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::shared_context_client::SharedContextClient;
use statefabric_sdk::{ContextClient, Crdt, Error, MergeType, StateClient, VectorClock};
use statefabric_tests as env;
use statefabric_tests::process::{self, Service, Storage};
use tonic::Code;

async fn sidecar(tenant: &str, identity: &str) -> anyhow::Result<Service> {
    process::sidecar(Storage::Postgres, tenant, identity, &[]).await
}

async fn context(service: &Service) -> anyhow::Result<ContextClient> {
    Ok(StateClient::connect(service.grpc.clone()).await?.context())
}

fn tenant() -> String {
    format!("t-{}", uuid::Uuid::new_v4().simple())
}

fn doc_id() -> String {
    format!("plan-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
async fn version_vectors_and_cache_invalidation_across_sidecars() -> anyhow::Result<()> {
    let t = tenant();
    let (planner, coder) = (sidecar(&t, "planner").await?, sidecar(&t, "coder").await?);
    let (mut p, mut c) = (context(&planner).await?, context(&coder).await?);
    let id = doc_id();

    let v1 = p
        .put(
            &id,
            MergeType::None,
            &VectorClock::new(),
            &json!({"steps": ["plan"]}),
            None,
        )
        .await?;
    // The coder reads (and caches) it.
    let read = c.get(&id).await?.expect("exists");
    assert_eq!(read.content, json!({"steps": ["plan"]}));
    assert_eq!(read.vector, v1.vector);

    // The planner changes it; the coder's cache is invalidated by the
    // change notification within moments, so the coder sees the new version.
    let v2 = p
        .put(
            &id,
            MergeType::None,
            &v1.vector,
            &json!({"steps": ["plan", "code"]}),
            None,
        )
        .await?;
    let seen = env::eventually(
        "coder sees the planner's write",
        Duration::from_secs(5),
        || {
            let mut c = c.clone();
            let id = id.clone();
            async move { Ok(c.get(&id).await?.filter(|d| d.revision == v2.revision)) }
        },
    )
    .await?;
    assert_eq!(seen.content, json!({"steps": ["plan", "code"]}));

    // A write based on what the coder read before is refused, naming the
    // current vector, and changes nothing.
    let err = c
        .put(
            &id,
            MergeType::None,
            &read.vector,
            &json!({"steps": []}),
            None,
        )
        .await
        .expect_err("stale");
    match &err {
        Error::Conflict(message) => assert!(message.contains("planner"), "{message}"),
        other => panic!("expected a conflict, got {other}"),
    }
    assert_eq!(p.get(&id).await?.expect("doc").revision, v2.revision);

    // Read-modify-write with retry lands both writers' changes.
    let mut tasks = Vec::new();
    for (mut client, step) in [(p.clone(), "test"), (c.clone(), "review")] {
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            client
                .update(&id, 10, |doc| {
                    if let Some(steps) = doc["steps"].as_array_mut() {
                        steps.push(json!(step));
                    }
                })
                .await
        }));
    }
    for task in tasks {
        task.await??;
    }
    // The planner's sidecar learns of the coder's write by invalidation,
    // which is eventual: the last write may be the coder's.
    let final_doc = env::eventually(
        "the planner's sidecar sees both writers' steps",
        Duration::from_secs(5),
        || {
            let mut p = p.clone();
            let id = id.clone();
            async move {
                Ok(p.get(&id).await?.filter(|doc| {
                    let steps = doc.content["steps"].as_array().cloned().unwrap_or_default();
                    steps.contains(&json!("test")) && steps.contains(&json!("review"))
                }))
            }
        },
    )
    .await?;
    assert!(final_doc.vector.get("planner") >= 2 && final_doc.vector.get("coder") >= 1);
    Ok(())
}

#[tokio::test]
async fn small_changes_to_large_documents_travel_as_small_deltas() -> anyhow::Result<()> {
    let service = sidecar(&tenant(), "planner").await?;
    let mut c = context(&service).await?;
    let id = doc_id();
    let files: serde_json::Map<String, serde_json::Value> = (0..2000)
        .map(|i| {
            (
                format!("src/module_{i}.rs"),
                json!({"owner": "coder", "lines": i * 7, "status": "clean"}),
            )
        })
        .collect();
    let written = c
        .put(
            &id,
            MergeType::None,
            &VectorClock::new(),
            &json!({"files": files}),
            None,
        )
        .await?;
    let old = c.get(&id).await?.expect("doc");
    let patch =
        json!([{"op": "replace", "path": "/files/src~1module_42.rs/status", "value": "dirty"}]);
    c.patch(&id, &written.vector, &patch).await?;

    // Ask the raw service, to look at the bytes on the wire.
    let mut raw = SharedContextClient::new(
        tonic::transport::Endpoint::from_shared(service.grpc.clone())?
            .connect()
            .await?,
    )
    .max_decoding_message_size(64 * 1024 * 1024);
    let full = raw
        .get_context(pb::GetContextRequest {
            document_id: id.clone(),
            known_revision: 0,
        })
        .await?
        .into_inner();
    let delta = raw
        .get_context(pb::GetContextRequest {
            document_id: id.clone(),
            known_revision: old.revision,
        })
        .await?
        .into_inner();
    let full_bytes = match full.body {
        Some(pb::get_context_response::Body::ContentJson(b)) => b.len(),
        other => anyhow::bail!("expected full content, got {other:?}"),
    };
    let delta_bytes = match &delta.body {
        Some(pb::get_context_response::Body::DeltaZstd(b)) => b.len(),
        other => anyhow::bail!("expected a delta, got {other:?}"),
    };
    assert!(
        delta_bytes * 100 < full_bytes,
        "delta {delta_bytes} B vs full {full_bytes} B"
    );

    // The SDK applies the delta to what it had and gets the new document.
    let refreshed = c.refresh(&old).await?.expect("doc");
    assert_eq!(refreshed.revision, old.revision + 1);
    assert_eq!(
        refreshed.content["files"]["src/module_42.rs"]["status"],
        json!("dirty")
    );
    assert_eq!(refreshed.content, c.get(&id).await?.expect("doc").content);
    Ok(())
}

#[tokio::test]
async fn crdt_documents_merge_writes_from_many_sidecars() -> anyhow::Result<()> {
    let t = tenant();
    let sidecars = [
        sidecar(&t, "a").await?,
        sidecar(&t, "b").await?,
        sidecar(&t, "c").await?,
    ];
    let counter = doc_id();
    let files = doc_id();
    let mut tasks = Vec::new();
    for (i, service) in sidecars.iter().enumerate() {
        let mut client = context(service).await?;
        let (counter, files) = (counter.clone(), files.clone());
        tasks.push(tokio::spawn(async move {
            for n in 0..10 {
                client
                    .merge(&counter, MergeType::PnCounter, vec![Crdt::increment(1)])
                    .await?;
                client
                    .merge(
                        &files,
                        MergeType::OrSet,
                        vec![Crdt::add(&json!(format!("f{i}-{n}")))],
                    )
                    .await?;
            }
            client
                .merge(&counter, MergeType::PnCounter, vec![Crdt::increment(-2)])
                .await?;
            Ok::<_, Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let mut c = context(&sidecars[0]).await?;
    // Other sidecars' writes reach this one's cache when their
    // announcements arrive (after their commits): wait until it has seen
    // every writer's last write, then check what the merge made of them.
    let seen_all = |id: String, writes: u64| {
        let c = c.clone();
        move || {
            let mut c = c.clone();
            let id = id.clone();
            async move {
                Ok(c.get(&id).await?.filter(|d| {
                    let writers = d.vector.as_map();
                    writers.len() == 3 && writers.values().all(|n| *n == writes)
                }))
            }
        }
    };
    let doc = env::eventually(
        "every write to the counter seen",
        Duration::from_secs(5),
        seen_all(counter.clone(), 11),
    )
    .await?;
    assert_eq!(doc.content, json!(3 * 10 - 3 * 2));
    let set = env::eventually(
        "every write to the set seen",
        Duration::from_secs(5),
        seen_all(files.clone(), 10),
    )
    .await?;
    assert_eq!(set.content.as_array().map(Vec::len), Some(30));

    // Removing an element removes it everywhere; a put on a set is refused.
    c.merge(&files, MergeType::OrSet, vec![Crdt::remove(&json!("f0-0"))])
        .await?;
    let set = c.get(&files).await?.expect("set");
    assert!(
        !set.content
            .as_array()
            .is_some_and(|a| a.contains(&json!("f0-0")))
    );
    let err = c
        .put(&files, MergeType::OrSet, &set.vector, &json!([]), None)
        .await
        .expect_err("put on set");
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    Ok(())
}

#[tokio::test]
async fn watchers_see_changes_made_through_other_sidecars() -> anyhow::Result<()> {
    let t = tenant();
    let (writer, watcher) = (sidecar(&t, "writer").await?, sidecar(&t, "watcher").await?);
    let (mut w, mut r) = (context(&writer).await?, context(&watcher).await?);
    let id = doc_id();
    let first = w
        .put(
            &id,
            MergeType::None,
            &VectorClock::new(),
            &json!({"n": 1}),
            None,
        )
        .await?;
    let mut changes = r.watch(&id, 0).await?;
    let (revision, content) = tokio::time::timeout(Duration::from_secs(5), changes.next())
        .await?
        .expect("open")?;
    assert_eq!((revision, content), (1, json!({"n": 1})));
    w.put(&id, MergeType::None, &first.vector, &json!({"n": 2}), None)
        .await?;
    let (revision, content) = tokio::time::timeout(Duration::from_secs(5), changes.next())
        .await?
        .expect("open")?;
    assert_eq!((revision, content), (2, json!({"n": 2})));
    Ok(())
}

#[tokio::test]
async fn bad_context_requests_get_clear_statuses_and_change_nothing() -> anyhow::Result<()> {
    let service = sidecar(&tenant(), "planner").await?;
    let mut c = context(&service).await?;
    let mut raw = SharedContextClient::new(
        tonic::transport::Endpoint::from_shared(service.grpc.clone())?
            .connect()
            .await?,
    );
    let id = doc_id();
    let created = c
        .put(
            &id,
            MergeType::None,
            &VectorClock::new(),
            &json!({"a": 1}),
            Some("create-1"),
        )
        .await?;
    // Idempotent repeat.
    let again = c
        .put(
            &id,
            MergeType::None,
            &VectorClock::new(),
            &json!({"a": 1}),
            Some("create-1"),
        )
        .await?;
    assert!(again.replayed && again.revision == created.revision);

    let base = Some(pb::VersionVector {
        counters: created
            .vector
            .as_map()
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
    });
    let status = raw
        .put_context(pb::PutContextRequest {
            document_id: id.clone(),
            merge_type: 0,
            base: base.clone(),
            content_json: b"{oops".to_vec(),
            fence: None,
        })
        .await
        .expect_err("bad json");
    assert_eq!(
        (status.code(), status.message().contains("invalid JSON")),
        (Code::InvalidArgument, true),
        "{}",
        status.message()
    );
    let status = raw
        .patch_context(pb::PatchContextRequest {
            document_id: id.clone(),
            base: base.clone(),
            patch_json: b"{\"op\":1}".to_vec(),
            fence: None,
        })
        .await
        .expect_err("bad patch");
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    let status = raw
        .patch_context(pb::PatchContextRequest {
            document_id: id.clone(),
            base: base.clone(),
            patch_json: br#"[{"op":"remove","path":"/missing"}]"#.to_vec(),
            fence: None,
        })
        .await
        .expect_err("patch does not apply");
    assert_eq!(status.code(), Code::InvalidArgument, "{}", status.message());
    let status = raw
        .put_context(pb::PutContextRequest {
            document_id: id.clone(),
            merge_type: 42,
            base: base.clone(),
            content_json: b"{}".to_vec(),
            fence: None,
        })
        .await
        .expect_err("bad merge type");
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut bad_vector = base.clone().unwrap_or_default();
    bad_vector.counters.insert("has space".into(), 1);
    let status = raw
        .put_context(pb::PutContextRequest {
            document_id: id.clone(),
            merge_type: 0,
            base: Some(bad_vector),
            content_json: b"{}".to_vec(),
            fence: None,
        })
        .await
        .expect_err("malformed vector");
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut regressing = created.vector.clone();
    regressing.tick("someone-else", 3);
    let err = c
        .put(&id, MergeType::None, &regressing, &json!({}), None)
        .await
        .expect_err("vector from the future");
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    let status = raw
        .get_context(pb::GetContextRequest {
            document_id: id.clone(),
            known_revision: 99,
        })
        .await
        .expect_err("known revision ahead");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = raw
        .get_context(pb::GetContextRequest {
            document_id: "missing-doc".into(),
            known_revision: 0,
        })
        .await
        .expect_err("missing");
    assert_eq!(status.code(), Code::NotFound);
    let status = raw
        .get_context(pb::GetContextRequest {
            document_id: "bad id".into(),
            known_revision: 0,
        })
        .await
        .expect_err("bad id");
    assert_eq!(status.code(), Code::InvalidArgument);

    let doc = c.get(&id).await?.expect("doc");
    assert_eq!(
        (doc.revision, doc.content),
        (created.revision, json!({"a": 1})),
        "nothing changed"
    );
    Ok(())
}

#[tokio::test]
async fn a_counter_refuses_to_overflow_naming_the_document() -> anyhow::Result<()> {
    let service = sidecar(&tenant(), "counter").await?;
    let mut c = context(&service).await?;
    let counter = doc_id();
    c.merge(
        &counter,
        MergeType::PnCounter,
        vec![Crdt::increment(i64::MAX)],
    )
    .await?;
    for _ in 0..2 {
        let err = c
            .merge(
                &counter,
                MergeType::PnCounter,
                vec![Crdt::increment(i64::MAX)],
            )
            .await
            .expect_err("past i64::MAX");
        match &err {
            Error::OutOfRange(message) => assert!(message.contains(&counter), "{message}"),
            other => panic!("expected OUT_OF_RANGE, got {other}"),
        }
    }
    // Refused whole: the batch's first op is not kept either.
    let err = c
        .merge(
            &counter,
            MergeType::PnCounter,
            vec![Crdt::increment(-1), Crdt::increment(2)],
        )
        .await
        .expect_err("the batch leaves the range");
    assert!(matches!(err, Error::OutOfRange(_)), "{err}");
    let doc = c.get(&counter).await?.expect("counter");
    assert_eq!(doc.content, json!(i64::MAX), "neither wrapped nor changed");
    Ok(())
}

#[tokio::test]
async fn many_documents_are_read_in_one_call() -> anyhow::Result<()> {
    let t = tenant();
    let service = sidecar(&t, "planner").await?;
    let mut c = context(&service).await?;
    let mut raw = SharedContextClient::connect(service.grpc.clone()).await?;
    let (a, b, gone, never) = (doc_id(), doc_id(), doc_id(), doc_id());
    for (id, value) in [
        (&a, json!({"n": 1})),
        (&b, json!({"n": 2})),
        (&gone, json!(0)),
    ] {
        c.put(id, MergeType::None, &VectorClock::new(), &value, None)
            .await?;
    }
    let deleted = c.get(&gone).await?.expect("exists");
    c.delete(&gone, &deleted.vector).await?;
    // Order and repeats are kept; missing and deleted ones are named.
    let got = raw
        .get_contexts(pb::GetContextsRequest {
            document_ids: vec![a.clone(), never.clone(), b.clone(), gone.clone(), a.clone()],
        })
        .await?
        .into_inner();
    let ids: Vec<&str> = got
        .documents
        .iter()
        .map(|d| d.document_id.as_str())
        .collect();
    assert_eq!(ids, [a.as_str(), b.as_str(), a.as_str()]);
    assert_eq!(got.missing, [never.clone(), gone.clone()]);
    let Some(pb::get_context_response::Body::ContentJson(body)) = &got.documents[1].body else {
        anyhow::bail!("expected the whole document");
    };
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(body)?,
        json!({"n": 2})
    );
    assert_eq!(got.documents[1].revision, 1);
    // The SDK's form.
    let docs = c.get_many(&[&b, &never, &a]).await?;
    assert_eq!(
        docs.iter()
            .map(|d| (d.id.as_str(), &d.content))
            .collect::<Vec<_>>(),
        [
            (b.as_str(), &json!({"n": 2})),
            (a.as_str(), &json!({"n": 1}))
        ]
    );

    // Bad input: the offending id named; too many ids refused.
    let err = raw
        .get_contexts(pb::GetContextsRequest {
            document_ids: vec![a.clone(), "has space".into()],
        })
        .await
        .expect_err("bad id");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("document_ids[1]"),
        "{}",
        err.message()
    );
    let err = raw
        .get_contexts(pb::GetContextsRequest {
            document_ids: vec![a.clone(); 1001],
        })
        .await
        .expect_err("too many");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("at most 1000"), "{}", err.message());
    Ok(())
}
