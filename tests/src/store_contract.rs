//! The event store contract: one suite, run against every adapter of the
//! `EventStore` port (`tests/tests/store_postgres.rs`,
//! `tests/tests/store_sqlite.rs`) through [`store_contract_tests!`].

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use statefabric_domain::{
    Aggregate, Checkpoint, EventMetadata, ExpectedVersion, NewEvent, Snapshot, StreamId, TenantId,
};
use statefabric_store::{
    AppendRequest, EventStore, FeedOptions, Idempotency, InvalidInput, Repository, Scope,
    SnapshotPolicy, StoreError, subscribe_all,
};

/// What a backend's test file provides.
#[async_trait::async_trait(?Send)]
pub trait Fixture {
    /// A store with default settings.
    async fn store(&self) -> Arc<dyn EventStore>;
    /// A store whose idempotency keys expire after `ttl`.
    async fn store_with_idempotency_ttl(&self, ttl: Duration) -> Arc<dyn EventStore>;
    /// The same backend's context-document store.
    async fn context_store(&self) -> Arc<dyn statefabric_store::context::ContextStore>;
    /// A freshly registered tenant, unique to the calling test.
    async fn tenant(&self) -> TenantId;
    /// How many idempotency keys are stored for `tenant`, expired or not
    /// (read behind the port, to see what the purge removed).
    async fn idempotency_keys_stored(&self, tenant: &TenantId) -> i64;
}

/// Expands to one `#[tokio::test]` per contract test, each calling it with
/// `$fixture`.
#[macro_export]
macro_rules! store_contract_tests {
    ($fixture:expr) => {
        $crate::store_contract_tests!(@each $fixture;
            append_then_read_back,
            expected_versions_are_enforced_and_failures_write_nothing,
            concurrent_writers_get_exactly_one_winner_per_version,
            stream_type_is_fixed_at_creation,
            unregistered_tenants_cannot_write,
            bad_input_is_refused_and_writes_nothing,
            duplicate_event_ids_are_refused,
            stale_fencing_tokens_are_refused,
            idempotent_repeats_return_the_first_result,
            concurrent_duplicates_execute_once,
            expired_idempotency_keys_are_purged,
            the_janitor_purges_expired_keys_on_its_own,
            projections_replay_deterministically,
            snapshots_keep_the_newest_and_check_the_stream,
            tenants_see_only_their_own_streams,
            the_feed_resumes_from_a_checkpoint,
            the_feed_delivers_every_event_under_concurrent_writers,
            the_repository_loads_snapshot_plus_tail_like_a_full_replay,
            the_repository_retries_conflicts_for_safe_commands,
            context_version_vectors_refuse_missed_changes,
            context_concurrent_plain_writes_have_one_winner,
            context_concurrent_creation_has_one_winner,
            context_crdt_documents_merge_concurrent_writes,
            context_writes_are_idempotent_and_validated,
            context_writes_carrying_a_stale_fence_are_refused,
            context_concurrent_writes_each_get_their_own_outcome,
            context_writes_on_an_out_of_date_known_document_decide_again,
            context_concurrent_writes_knowing_one_revision_each_land,
        );
    };
    (@each $fixture:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() -> anyhow::Result<()> {
                $crate::store_contract::$name(&$fixture).await
            }
        )*
    };
}

fn scope(tenant: &TenantId) -> Scope {
    Scope::new(tenant.clone(), "contract-test").with_trace_id("trace-1")
}

fn stream(name: &str) -> StreamId {
    StreamId::new(format!("{name}-{}", uuid::Uuid::new_v4().simple())).expect("stream id")
}

fn events(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| NewEvent::new("Happened", json!({ "n": i })))
        .collect()
}

fn append(stream_id: &StreamId, expected: ExpectedVersion, events: Vec<NewEvent>) -> AppendRequest {
    AppendRequest::new(stream_id.clone(), "task", expected, events)
}

pub async fn append_then_read_back(f: &impl Fixture) -> anyhow::Result<()> {
    let store = f.store().await;
    let tenant = f.tenant().await;
    let id = stream("task");
    let mut batch = events(3);
    let mut clock = std::collections::BTreeMap::new();
    clock.insert("planner".to_owned(), 4);
    batch[1].metadata = EventMetadata {
        correlation_id: Some("corr".to_owned()),
        actor: Some("planner".to_owned()),
        vector_clock: clock,
        ..EventMetadata::default()
    };
    // Any JSON document is a payload, `null` included (Postgres once
    // stored it as SQL NULL and refused the append).
    batch[2].data = serde_json::Value::Null;
    let outcome = store
        .append(
            &scope(&tenant),
            append(&id, ExpectedVersion::NoStream, batch.clone()),
        )
        .await?;
    assert!(!outcome.replayed);
    assert_eq!(
        (outcome.result.first_version, outcome.result.last_version),
        (1, 3)
    );
    assert!(outcome.result.first_position <= outcome.result.last_position);

    let read = store.read_stream(&tenant, &id, 1, 100).await?;
    assert_eq!(read.len(), 3);
    for (i, (recorded, sent)) in read.iter().zip(&batch).enumerate() {
        assert_eq!(recorded.stream_version, i as u64 + 1);
        assert_eq!(recorded.id, sent.id);
        assert_eq!(recorded.data, sent.data);
        assert_eq!(recorded.metadata, sent.metadata);
        assert_eq!(recorded.event_type, "Happened");
        assert_eq!(recorded.stream_type, "task");
        assert_eq!(recorded.tenant, tenant);
    }
    // Paging by version.
    let tail = store.read_stream(&tenant, &id, 3, 100).await?;
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].stream_version, 3);
    let first_two = store.read_stream(&tenant, &id, 1, 2).await?;
    assert_eq!(first_two.len(), 2);

    let all = store.read_all(&tenant, 1, 100).await?;
    let positions: Vec<u64> = all.iter().map(|e| e.global_position).collect();
    let mut sorted = positions.clone();
    sorted.sort_unstable();
    assert_eq!(positions, sorted, "read_all is in global order");
    assert_eq!(all.len(), 3);

    let info = store
        .stream_info(&tenant, &id)
        .await?
        .expect("stream exists");
    assert_eq!((info.version, info.stream_type.as_str()), (3, "task"));
    assert!(
        store
            .stream_info(&tenant, &stream("missing"))
            .await?
            .is_none()
    );
    assert!(
        store
            .read_stream(&tenant, &stream("missing"), 1, 10)
            .await?
            .is_empty()
    );
    Ok(())
}

pub async fn expected_versions_are_enforced_and_failures_write_nothing(
    f: &impl Fixture,
) -> anyhow::Result<()> {
    let store = f.store().await;
    let tenant = f.tenant().await;
    let s = scope(&tenant);
    let id = stream("task");

    let err = store
        .append(&s, append(&id, ExpectedVersion::StreamExists, events(1)))
        .await
        .expect_err("stream does not exist");
    assert!(
        matches!(err, StoreError::Concurrency { actual: None, .. }),
        "{err}"
    );
    let err = store
        .append(&s, append(&id, ExpectedVersion::Exact(1), events(1)))
        .await
        .expect_err("stream does not exist");
    assert!(
        matches!(err, StoreError::Concurrency { actual: None, .. }),
        "{err}"
    );

    store
        .append(&s, append(&id, ExpectedVersion::Any, events(2)))
        .await?;
    let err = store
        .append(&s, append(&id, ExpectedVersion::NoStream, events(1)))
        .await
        .expect_err("stream exists");
    assert!(
        matches!(
            err,
            StoreError::Concurrency {
                actual: Some(2),
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("at version 2"), "{err}");
    let err = store
        .append(&s, append(&id, ExpectedVersion::Exact(1), events(1)))
        .await
        .expect_err("stale");
    assert!(
        matches!(
            err,
            StoreError::Concurrency {
                expected: ExpectedVersion::Exact(1),
                actual: Some(2),
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        store.read_stream(&tenant, &id, 1, 100).await?.len(),
        2,
        "nothing written"
    );

    let ok = store
        .append(&s, append(&id, ExpectedVersion::Exact(2), events(1)))
        .await?;
    assert_eq!(ok.result.last_version, 3);
    let ok = store
        .append(&s, append(&id, ExpectedVersion::StreamExists, events(2)))
        .await?;
    assert_eq!((ok.result.first_version, ok.result.last_version), (4, 5));
    let ok = store
        .append(&s, append(&id, ExpectedVersion::Any, events(1)))
        .await?;
    assert_eq!(ok.result.last_version, 6);
    Ok(())
}

pub async fn concurrent_writers_get_exactly_one_winner_per_version(
    f: &impl Fixture,
) -> anyhow::Result<()> {
    let store = f.store().await;
    let tenant = f.tenant().await;
    let id = stream("race");
    store
        .append(
            &scope(&tenant),
            append(&id, ExpectedVersion::NoStream, events(1)),
        )
        .await?;

    // Round after round, many writers race for the same next version.
    for round in 1..=5u64 {
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let store = store.clone();
            let s = scope(&tenant);
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                store
                    .append(&s, append(&id, ExpectedVersion::Exact(round), events(1)))
                    .await
            }));
        }
        let mut winners = 0;
        for task in tasks {
            match task.await? {
                Ok(outcome) => {
                    winners += 1;
                    assert_eq!(outcome.result.last_version, round + 1);
                }
                Err(StoreError::Concurrency { actual, .. }) => {
                    assert_eq!(actual, Some(round + 1), "losers see the winner's version");
                }
                Err(other) => return Err(other.into()),
            }
        }
        assert_eq!(winners, 1, "round {round}: exactly one writer wins");
    }
    let read = store.read_stream(&tenant, &id, 1, 100).await?;
    let versions: Vec<u64> = read.iter().map(|e| e.stream_version).collect();
    assert_eq!(versions, (1..=6).collect::<Vec<_>>());

    // With ExpectedVersion::Any, concurrent appends all land, versions stay dense.
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let store = store.clone();
        let s = scope(&tenant);
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            store
                .append(&s, append(&id, ExpectedVersion::Any, events(2)))
                .await
        }));
    }
    for task in tasks {
        task.await??;
    }
    let read = store.read_stream(&tenant, &id, 1, 1000).await?;
    let versions: Vec<u64> = read.iter().map(|e| e.stream_version).collect();
    assert_eq!(versions, (1..=38).collect::<Vec<_>>());
    Ok(())
}

pub async fn stream_type_is_fixed_at_creation(f: &impl Fixture) -> anyhow::Result<()> {
    let store = f.store().await;
    let tenant = f.tenant().await;
    let id = stream("typed");
    store
        .append(
            &scope(&tenant),
            append(&id, ExpectedVersion::NoStream, events(1)),
        )
        .await?;
    for expected in [
        ExpectedVersion::Any,
        ExpectedVersion::Exact(1),
        ExpectedVersion::StreamExists,
    ] {
        let err = store
            .append(
                &scope(&tenant),
                AppendRequest::new(id.clone(), "plan", expected, events(1)),
            )
            .await
            .expect_err("wrong type");
        assert!(
            matches!(err, StoreError::StreamTypeMismatch { .. }),
            "{expected}: {err}"
        );
    }
    assert_eq!(store.read_stream(&tenant, &id, 1, 10).await?.len(), 1);
    Ok(())
}

pub async fn unregistered_tenants_cannot_write(f: &impl Fixture) -> anyhow::Result<()> {
    let store = f.store().await;
    let ghost = TenantId::new(format!("ghost-{}", uuid::Uuid::new_v4().simple()))?;
    let err = store
        .append(
            &scope(&ghost),
            append(&stream("t"), ExpectedVersion::Any, events(1)),
        )
        .await
        .expect_err("unknown tenant");
    assert!(matches!(err, StoreError::UnknownTenant(_)), "{err}");
    let err = store
        .append(
            &scope(&ghost),
            append(&stream("t"), ExpectedVersion::Any, events(1))
                .idempotent(Idempotency::for_request("k", &1)),
        )
        .await
        .expect_err("unknown tenant");
    assert!(matches!(err, StoreError::UnknownTenant(_)), "{err}");
    assert!(store.read_all(&ghost, 1, 10).await?.is_empty());
    Ok(())
}

pub async fn bad_input_is_refused_and_writes_nothing(f: &impl Fixture) -> anyhow::Result<()> {
    let store = f.store().await;
    let tenant = f.tenant().await;
    let s = scope(&tenant);
    let id = stream("bad");

    type Check = fn(&InvalidInput) -> bool;
    let cases: Vec<(AppendRequest, Check)> = vec![
        (append(&id, ExpectedVersion::Any, vec![]), |e| {
            matches!(e, InvalidInput::EmptyBatch)
        }),
        (append(&id, ExpectedVersion::Exact(0), events(1)), |e| {
            matches!(e, InvalidInput::Zero { .. })
        }),
        (
            append(
                &id,
                ExpectedVersion::Any,
                vec![NewEvent::new(
                    "E",
                    json!({"x": "y".repeat(2 * 1024 * 1024)}),
                )],
            ),
            |e| matches!(e, InvalidInput::EventTooLarge { .. }),
        ),
        (append(&id, ExpectedVersion::Any, events(1001)), |e| {
            matches!(e, InvalidInput::TooManyEvents { .. })
        }),
        (
            append(
                &id,
                ExpectedVersion::Any,
                vec![NewEvent::new("E", json!({"x": "nul\u{0}"}))],
            ),
            |e| matches!(e, InvalidInput::BadEvent { .. }),
        ),
        (
            append(
                &id,
                ExpectedVersion::Any,
                vec![NewEvent::new("bad type!", json!({}))],
            ),
            |e| matches!(e, InvalidInput::BadEvent { .. }),
        ),
        (
            AppendRequest::new(id.clone(), "", ExpectedVersion::Any, events(1)),
            |e| matches!(e, InvalidInput::BadName { .. }),
        ),
    ];
    for (request, check) in cases {
        match store.append(&s, request).await {
            Err(StoreError::Invalid(invalid)) => assert!(check(&invalid), "unexpected: {invalid}"),
            other => panic!("expected invalid input, got {other:?}"),
        }
    }
    // A valid event followed by an invalid one: nothing of the batch lands.
    let mut mixed = events(1);
    mixed.push(NewEvent::new("E", json!({"x": "nul\u{0}"})));
    assert!(
        store
            .append(&s, append(&id, ExpectedVersion::Any, mixed))
            .await
            .is_err()
    );
    assert!(
        store.stream_info(&tenant, &id).await?.is_none(),
        "nothing was written"
    );

    for result in [
        store.read_stream(&tenant, &id, 0, 10).await,
        store.read_stream(&tenant, &id, 1, 0).await,
        store.read_all(&tenant, 0, 10).await,
        store.read_all(&tenant, 1, 1_000_000).await,
    ] {
        assert!(matches!(result, Err(StoreError::Invalid(_))), "{result:?}");
    }
    let snapshot = Snapshot {
        stream_id: id.clone(),
        stream_type: "task".to_owned(),
        version: 0,
        state: json!({}),
        schema_version: 1,
    };
    assert!(matches!(
        store.save_snapshot(&s, &snapshot).await,
        Err(StoreError::Invalid(InvalidInput::Zero { .. }))
    ));
    Ok(())
}

pub async fn duplicate_event_ids_are_refused(f: &impl Fixture) -> anyhow::Result<()> {
    let store = f.store().await;
    let tenant = f.tenant().await;
    let s = scope(&tenant);
    let batch = events(1);
    store
        .append(
            &s,
            append(&stream("a"), ExpectedVersion::Any, batch.clone()),
        )
        .await?;
    let other = stream("b");
    let err = store
        .append(&s, append(&other, ExpectedVersion::Any, batch))
        .await
        .expect_err("duplicate id");
    assert!(matches!(err, StoreError::DuplicateEventId), "{err}");
    assert!(store.stream_info(&tenant, &other).await?.is_none());
    Ok(())
}

pub async fn stale_fencing_tokens_are_refused(f: &impl Fixture) -> anyhow::Result<()> {
    let store = f.store().await;
    let tenant = f.tenant().await;
    let s = scope(&tenant);
    let id = stream("fenced");
    let fenced = |token| append(&id, ExpectedVersion::Any, events(1)).fenced("repo-lock", token);
    store.append(&s, fenced(5)).await?;
    store.append(&s, fenced(5)).await?; // the same holder writes again
    let err = store.append(&s, fenced(4)).await.expect_err("stale");
    assert!(
        matches!(
            err,
            StoreError::StaleFence {
                token: 4,
                current: 5,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        store.read_stream(&tenant, &id, 1, 10).await?.len(),
        2,
        "nothing written"
    );
    store.append(&s, fenced(6)).await?;
    assert!(
        store.append(&s, fenced(5)).await.is_err(),
        "5 is stale once 6 wrote"
    );
    // Fences are per lock and per tenant.
    store
        .append(
            &s,
            append(&id, ExpectedVersion::Any, events(1)).fenced("other-lock", 1),
        )
        .await?;
    let other = f.tenant().await;
    store
        .append(
            &scope(&other),
            append(&id, ExpectedVersion::Any, events(1)).fenced("repo-lock", 1),
        )
        .await?;
    assert!(matches!(
        store.append(&s, fenced(0)).await,
        Err(StoreError::Invalid(InvalidInput::Zero { .. }))
    ));
    Ok(())
}

pub async fn idempotent_repeats_return_the_first_result(f: &impl Fixture) -> anyhow::Result<()> {
    let store = f.store().await;
    let tenant = f.tenant().await;
    let s = scope(&tenant);
    let id = stream("idem");
    let request = append(&id, ExpectedVersion::Any, events(2))
        .idempotent(Idempotency::for_request("order-1", &"create two"));

    let first = store.append(&s, request.clone()).await?;
    assert!(!first.replayed);
    // The repeat carries new event ids (a retrying client regenerates them):
    // it must still be recognised by key and fingerprint.
    let mut repeat = request.clone();
    repeat.events = events(2);
    let second = store.append(&s, repeat).await?;
    assert!(second.replayed);
    assert_eq!(second.result, first.result);
    assert_eq!(
        store.read_stream(&tenant, &id, 1, 100).await?.len(),
        2,
        "no second write"
    );

    let reused = append(&id, ExpectedVersion::Any, events(1))
        .idempotent(Idempotency::for_request("order-1", &"something else"));
    let err = store.append(&s, reused).await.expect_err("reused key");
    assert!(
        matches!(err, StoreError::IdempotencyKeyReused { .. }),
        "{err}"
    );
    assert_eq!(store.read_stream(&tenant, &id, 1, 100).await?.len(), 2);

    // A failed first attempt does not burn the key.
    let fresh = stream("idem-fail");
    let failing = append(&fresh, ExpectedVersion::Exact(5), events(1))
        .idempotent(Idempotency::for_request("order-2", &"x"));
    assert!(store.append(&s, failing).await.is_err());
    let retry = append(&fresh, ExpectedVersion::NoStream, events(1))
        .idempotent(Idempotency::for_request("order-2", &"x"));
    assert!(!store.append(&s, retry).await?.replayed);

    // Keys are per tenant.
    let other = f.tenant().await;
    let theirs = append(&id, ExpectedVersion::Any, events(1))
        .idempotent(Idempotency::for_request("order-1", &"something else"));
    assert!(!store.append(&scope(&other), theirs).await?.replayed);
    Ok(())
}

pub async fn concurrent_duplicates_execute_once(f: &impl Fixture) -> anyhow::Result<()> {
    let store = f.store().await;
    let tenant = f.tenant().await;
    let id = stream("dup");
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let store = store.clone();
        let s = scope(&tenant);
        let request = append(&id, ExpectedVersion::Any, events(3))
            .idempotent(Idempotency::for_request("same", &"payload"));
        tasks.push(tokio::spawn(async move { store.append(&s, request).await }));
    }
    let mut executed = 0;
    let mut results = BTreeSet::new();
    for task in tasks {
        match task.await? {
            Ok(outcome) => {
                if !outcome.replayed {
                    executed += 1;
                }
                results.insert((outcome.result.first_version, outcome.result.last_version));
            }
            // Allowed: told to retry later instead of waiting.
            Err(StoreError::IdempotencyInProgress { .. }) => {}
            Err(other) => return Err(other.into()),
        }
    }
    assert_eq!(executed, 1, "exactly one execution");
    assert_eq!(results.len(), 1, "every caller saw the same result");
    assert_eq!(store.read_stream(&tenant, &id, 1, 100).await?.len(), 3);
    Ok(())
}

pub async fn expired_idempotency_keys_are_purged(f: &impl Fixture) -> anyhow::Result<()> {
    let store = f.store_with_idempotency_ttl(Duration::from_secs(1)).await;
    let tenant = f.tenant().await;
    let s = scope(&tenant);
    let id = stream("ttl");
    let request = |payload: &str| {
        append(&id, ExpectedVersion::Any, events(1))
            .idempotent(Idempotency::for_request("short-lived", &payload))
    };
    store.append(&s, request("a")).await?;
    assert_eq!(f.idempotency_keys_stored(&tenant).await, 1);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Other tests' keys may be purged by the same call: count only ours.
    store.purge_expired_idempotency_keys().await?;
    assert_eq!(
        f.idempotency_keys_stored(&tenant).await,
        0,
        "expired key purged"
    );
    // The key is free again, even for a different request.
    let again = store.append(&s, request("b")).await?;
    assert!(!again.replayed);
    Ok(())
}

pub async fn the_janitor_purges_expired_keys_on_its_own(f: &impl Fixture) -> anyhow::Result<()> {
    let store = f
        .store_with_idempotency_ttl(Duration::from_millis(200))
        .await;
    let tenant = f.tenant().await;
    let request = append(&stream("janitor"), ExpectedVersion::Any, events(1))
        .idempotent(Idempotency::for_request("k", &"v"));
    store.append(&scope(&tenant), request).await?;
    assert_eq!(f.idempotency_keys_stored(&tenant).await, 1);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let janitor = tokio::spawn(statefabric_store::run_idempotency_janitor(
        store.clone(),
        Duration::from_millis(100),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while f.idempotency_keys_stored(&tenant).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "janitor never purged the key"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(5), janitor).await??;
    Ok(())
}

pub async fn projections_replay_deterministically(f: &impl Fixture) -> anyhow::Result<()> {
    let store = f.store().await;
    let tenant = f.tenant().await;
    for i in 0..5 {
        let batch = (0..3)
            .map(|j| NewEvent::new("Added", json!({ "n": i * 3 + j })))
            .collect();
        store
            .append(
                &scope(&tenant),
                append(&stream("proj"), ExpectedVersion::Any, batch),
            )
            .await?;
    }
    let fold = |acc: &mut Vec<i64>, e: &statefabric_domain::RecordedEvent| {
        acc.push(e.data["n"].as_i64().unwrap_or(-1));
    };
    let (first, end) =
        statefabric_store::replay(store.as_ref(), &tenant, Checkpoint::START, Vec::new(), fold)
            .await?;
    let (second, _) =
        statefabric_store::replay(store.as_ref(), &tenant, Checkpoint::START, Vec::new(), fold)
            .await?;
    assert_eq!(first, second);
    assert_eq!(first.len(), 15);
    // Resuming from the end yields nothing new; from the middle, the rest.
    let (nothing, same_end) =
        statefabric_store::replay(store.as_ref(), &tenant, end, Vec::new(), fold).await?;
    assert!(nothing.is_empty());
    assert_eq!(same_end, end);
    Ok(())
}

pub async fn snapshots_keep_the_newest_and_check_the_stream(
    f: &impl Fixture,
) -> anyhow::Result<()> {
    let store = f.store().await;
    let tenant = f.tenant().await;
    let s = scope(&tenant);
    let id = stream("snap");
    let snap = |version: u64, state: serde_json::Value| Snapshot {
        stream_id: id.clone(),
        stream_type: "task".to_owned(),
        version,
        state,
        schema_version: 1,
    };
    let err = store
        .save_snapshot(&s, &snap(1, json!({})))
        .await
        .expect_err("no stream");
    assert!(matches!(err, StoreError::StreamNotFound(_)), "{err}");

    store
        .append(&s, append(&id, ExpectedVersion::NoStream, events(5)))
        .await?;
    store.save_snapshot(&s, &snap(3, json!({"at": 3}))).await?;
    store.save_snapshot(&s, &snap(5, json!({"at": 5}))).await?;
    store.save_snapshot(&s, &snap(4, json!({"at": 4}))).await?; // older: ignored
    let loaded = store.load_snapshot(&tenant, &id).await?.expect("snapshot");
    assert_eq!(
        (loaded.version, loaded.state.clone()),
        (5, json!({"at": 5}))
    );

    let err = store
        .save_snapshot(&s, &snap(9, json!({})))
        .await
        .expect_err("ahead");
    assert!(
        matches!(
            err,
            StoreError::SnapshotAhead {
                stream_version: 5,
                ..
            }
        ),
        "{err}"
    );
    let mut wrong_type = snap(5, json!({}));
    wrong_type.stream_type = "plan".to_owned();
    let err = store
        .save_snapshot(&s, &wrong_type)
        .await
        .expect_err("type");
    assert!(
        matches!(err, StoreError::StreamTypeMismatch { .. }),
        "{err}"
    );
    assert!(
        store
            .load_snapshot(&tenant, &stream("none"))
            .await?
            .is_none()
    );
    Ok(())
}

pub async fn tenants_see_only_their_own_streams(f: &impl Fixture) -> anyhow::Result<()> {
    let store = f.store().await;
    let a = f.tenant().await;
    let b = f.tenant().await;
    let id = stream("shared-name");
    store
        .append(
            &scope(&a),
            append(&id, ExpectedVersion::NoStream, events(2)),
        )
        .await?;

    assert!(store.read_stream(&b, &id, 1, 10).await?.is_empty());
    assert!(store.stream_info(&b, &id).await?.is_none());
    assert!(store.read_all(&b, 1, 100).await?.is_empty());
    assert!(
        store
            .read_feed(&b, Checkpoint::START, 100)
            .await?
            .is_empty()
    );
    // B appending to "the same" id creates B's own stream; A's is untouched.
    let theirs = store
        .append(
            &scope(&b),
            append(&id, ExpectedVersion::NoStream, events(1)),
        )
        .await?;
    assert_eq!(theirs.result.last_version, 1);
    assert_eq!(
        store.stream_info(&a, &id).await?.map(|i| i.version),
        Some(2)
    );
    // B cannot snapshot A's stream at A's version.
    let snapshot = Snapshot {
        stream_id: id.clone(),
        stream_type: "task".to_owned(),
        version: 2,
        state: json!({"stolen": true}),
        schema_version: 1,
    };
    assert!(store.save_snapshot(&scope(&b), &snapshot).await.is_err());
    assert!(store.load_snapshot(&a, &id).await?.is_none());
    Ok(())
}

pub async fn the_feed_resumes_from_a_checkpoint(f: &impl Fixture) -> anyhow::Result<()> {
    let store = f.store().await;
    let tenant = f.tenant().await;
    let s = scope(&tenant);
    for _ in 0..3 {
        store
            .append(&s, append(&stream("feed"), ExpectedVersion::Any, events(2)))
            .await?;
    }
    let options = FeedOptions {
        page_size: 4,
        poll_interval: Duration::from_millis(20),
        buffer: 8,
    };
    let mut feed = Box::pin(subscribe_all(
        store.clone(),
        tenant.clone(),
        Checkpoint::START,
        options,
    ));
    let mut seen = Vec::new();
    for _ in 0..6 {
        let event = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await?
            .expect("feed open")?;
        seen.push(event);
    }
    let checkpoints: Vec<Checkpoint> = seen.iter().map(|e| e.checkpoint).collect();
    let mut sorted = checkpoints.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(checkpoints, sorted, "strictly increasing checkpoints");
    drop(feed);

    // Resume after the fourth event: the fifth and sixth, then live ones.
    let resume_at = seen[3].checkpoint;
    store
        .append(&s, append(&stream("feed"), ExpectedVersion::Any, events(1)))
        .await?;
    let mut feed = Box::pin(subscribe_all(
        store.clone(),
        tenant.clone(),
        resume_at,
        options,
    ));
    let mut ids = Vec::new();
    for _ in 0..3 {
        let event = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await?
            .expect("feed open")?;
        ids.push(event.id);
    }
    assert_eq!(&ids[..2], &[seen[4].id, seen[5].id]);
    Ok(())
}

pub async fn the_feed_delivers_every_event_under_concurrent_writers(
    f: &impl Fixture,
) -> anyhow::Result<()> {
    let store = f.store().await;
    let tenant = f.tenant().await;
    let options = FeedOptions {
        page_size: 50,
        poll_interval: Duration::from_millis(10),
        buffer: 64,
    };
    let mut feed = Box::pin(subscribe_all(
        store.clone(),
        tenant.clone(),
        Checkpoint::START,
        options,
    ));

    let writers = 8;
    let per_writer = 25;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        let s = scope(&tenant);
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..per_writer {
                let batch = events(2);
                ids.extend(batch.iter().map(|e| e.id));
                store
                    .append(
                        &s,
                        append(&stream(&format!("w{w}")), ExpectedVersion::Any, batch),
                    )
                    .await?;
            }
            anyhow::Ok(ids)
        }));
    }
    let mut written = BTreeSet::new();
    for task in tasks {
        written.extend(task.await??);
    }
    let mut received = BTreeSet::new();
    let mut last = Checkpoint::START;
    while received.len() < written.len() {
        let event = tokio::time::timeout(Duration::from_secs(20), feed.next())
            .await
            .map_err(|_| {
                anyhow::anyhow!("feed stalled at {} of {}", received.len(), written.len())
            })?
            .expect("feed open")?;
        assert!(event.checkpoint > last, "checkpoints increase");
        last = event.checkpoint;
        assert!(received.insert(event.id), "no duplicates");
    }
    assert_eq!(received, written);
    Ok(())
}

/// A small aggregate for the repository tests: a counter with a cap.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Counter {
    pub value: i64,
    pub increments: u64,
}

#[derive(Debug, Serialize)]
pub enum CounterCommand {
    Add(i64),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CounterEvent {
    Added { by: i64 },
}

#[derive(Debug, thiserror::Error)]
#[error("counter would exceed 1000")]
pub struct OverCap;

impl Aggregate for Counter {
    const STREAM_TYPE: &'static str = "counter";
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Rejection = OverCap;

    fn handle(&self, command: &CounterCommand) -> Result<Vec<CounterEvent>, OverCap> {
        let CounterCommand::Add(by) = command;
        if self.value + by > 1000 {
            return Err(OverCap);
        }
        Ok(vec![CounterEvent::Added { by: *by }])
    }

    fn apply(&mut self, event: &CounterEvent) {
        let CounterEvent::Added { by } = event;
        self.value += by;
        self.increments += 1;
    }

    fn event_type(_: &CounterEvent) -> &'static str {
        "Added"
    }
}

pub async fn the_repository_loads_snapshot_plus_tail_like_a_full_replay(
    f: &impl Fixture,
) -> anyhow::Result<()> {
    let store = f.store().await;
    let tenant = f.tenant().await;
    let s = scope(&tenant);
    let mut policy = SnapshotPolicy::default();
    policy.per_stream_type.insert("counter".to_owned(), 3);
    let repo: Repository<Counter> = Repository::new(store.clone(), policy);
    let id = stream("counter");
    for i in 1..=10 {
        repo.execute(&s, &id, &CounterCommand::Add(i), None).await?;
    }
    let snapshot = store
        .load_snapshot(&tenant, &id)
        .await?
        .expect("snapshot taken");
    assert_eq!(snapshot.version, 9, "every 3 events: last at 9");
    let loaded = repo.load(&tenant, &id).await?;
    let replayed = repo.replay(&tenant, &id).await?;
    assert_eq!(loaded.version, 10);
    assert_eq!(loaded.state, replayed.state);
    assert_eq!(
        loaded.state,
        Counter {
            value: 55,
            increments: 10
        }
    );

    let rejected = repo
        .execute(&s, &id, &CounterCommand::Add(2000), None)
        .await;
    assert!(matches!(
        rejected,
        Err(statefabric_store::RepositoryError::Rejected(_))
    ));

    let first = repo
        .execute(&s, &id, &CounterCommand::Add(1), Some("key-1"))
        .await?;
    let again = repo
        .execute(&s, &id, &CounterCommand::Add(1), Some("key-1"))
        .await?;
    assert!(again.replayed);
    assert_eq!(first.result, again.result);
    assert_eq!(repo.load(&tenant, &id).await?.state.value, 56);
    Ok(())
}

pub async fn the_repository_retries_conflicts_for_safe_commands(
    f: &impl Fixture,
) -> anyhow::Result<()> {
    let store = f.store().await;
    let tenant = f.tenant().await;
    let repo = Arc::new(Repository::<Counter>::new(
        store.clone(),
        SnapshotPolicy::default(),
    ));
    let id = stream("counter");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let repo = repo.clone();
        let s = scope(&tenant);
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let mut landed = 0u64;
            for _ in 0..3 {
                match repo.execute(&s, &id, &CounterCommand::Add(1), None).await {
                    Ok(_) => landed += 1,
                    // Under heavy contention a writer may run out of attempts:
                    // reported to it, never silently lost or applied twice.
                    Err(statefabric_store::RepositoryError::TooManyConflicts { .. }) => {}
                    Err(other) => return Err(anyhow::Error::from(other)),
                }
            }
            anyhow::Ok(landed)
        }));
    }
    let mut landed = 0;
    for task in tasks {
        landed += task.await??;
    }
    let loaded = repo.load(&tenant, &id).await?;
    assert_eq!(
        loaded.version, landed,
        "every reported success is exactly one event"
    );
    assert_eq!(loaded.state.value as u64, landed);
    assert!(landed >= 8, "retries let most adds land: {landed}");
    Ok(())
}

// ---------------------------------------------------------------- context

use statefabric_domain::{MergeType, Op, VectorClock};
use statefabric_store::context::{ContextChange, ContextDocument, ContextWrite};

fn cw(id: &str, merge: MergeType, base: &VectorClock, change: ContextChange) -> ContextWrite {
    ContextWrite {
        id: id.to_owned(),
        merge,
        base: base.clone(),
        change,
        idempotency: None,
        fence: None,
        known: None,
    }
}

fn doc_id() -> String {
    format!("doc-{}", uuid::Uuid::new_v4().simple())
}

pub async fn context_version_vectors_refuse_missed_changes(f: &impl Fixture) -> anyhow::Result<()> {
    let store = f.context_store().await;
    let tenant = f.tenant().await;
    let planner = Scope::new(tenant.clone(), "planner");
    let coder = Scope::new(tenant.clone(), "coder");
    let id = doc_id();
    let empty = VectorClock::new();
    let v1 = store
        .write(
            &planner,
            cw(
                &id,
                MergeType::None,
                &empty,
                ContextChange::Put(json!({"steps": ["a"]})),
            ),
        )
        .await?
        .document;
    assert_eq!((v1.revision, v1.vector.get("planner")), (1, 1));
    let patch: json_patch::Patch =
        serde_json::from_value(json!([{"op": "add", "path": "/steps/-", "value": "b"}]))?;
    let v2 = store
        .write(
            &coder,
            cw(
                &id,
                MergeType::None,
                &v1.vector,
                ContextChange::Patch(patch),
            ),
        )
        .await?
        .document;
    assert_eq!(v2.content, json!({"steps": ["a", "b"]}));
    // The planner still holds v1's vector: its write is refused and changes nothing.
    let err = store
        .write(
            &planner,
            cw(
                &id,
                MergeType::None,
                &v1.vector,
                ContextChange::Put(json!({})),
            ),
        )
        .await
        .expect_err("missed a change");
    match &err {
        StoreError::ContextConflict { current, .. } => assert_eq!(current, &v2.vector),
        other => panic!("expected a conflict, got {other}"),
    }
    let now = store.get(&tenant, &id).await?.expect("exists");
    assert_eq!(
        (now.revision, now.content.clone()),
        (2, json!({"steps": ["a", "b"]}))
    );
    // Creating over an existing document without having read it conflicts too.
    assert!(
        store
            .write(
                &planner,
                cw(&id, MergeType::None, &empty, ContextChange::Put(json!({})))
            )
            .await
            .is_err()
    );
    // Earlier revisions stay available for deltas.
    assert_eq!(
        store.content_at(&tenant, &id, 1).await?,
        Some(json!({"steps": ["a"]}))
    );
    // Delete, then the document reads as deleted.
    let deleted = store
        .write(
            &planner,
            cw(&id, MergeType::None, &v2.vector, ContextChange::Delete),
        )
        .await?
        .document;
    assert!(deleted.deleted);
    // Another tenant sees none of it.
    let other = f.tenant().await;
    assert!(store.get(&other, &id).await?.is_none());
    Ok(())
}

pub async fn context_concurrent_plain_writes_have_one_winner(
    f: &impl Fixture,
) -> anyhow::Result<()> {
    let store = f.context_store().await;
    let tenant = f.tenant().await;
    let id = doc_id();
    let base = store
        .write(
            &Scope::new(tenant.clone(), "w0"),
            cw(
                &id,
                MergeType::None,
                &VectorClock::new(),
                ContextChange::Put(json!(0)),
            ),
        )
        .await?
        .document
        .vector;
    let mut tasks = Vec::new();
    for i in 1..=10 {
        let store = store.clone();
        let scope = Scope::new(tenant.clone(), format!("w{i}"));
        let write = cw(&id, MergeType::None, &base, ContextChange::Put(json!(i)));
        tasks.push(tokio::spawn(
            async move { store.write(&scope, write).await },
        ));
    }
    let mut winners = 0;
    for task in tasks {
        match task.await? {
            Ok(_) => winners += 1,
            Err(StoreError::ContextConflict { .. }) => {}
            Err(other) => return Err(other.into()),
        }
    }
    assert_eq!(winners, 1);
    assert_eq!(store.get(&tenant, &id).await?.expect("doc").revision, 2);
    Ok(())
}

pub async fn context_concurrent_creation_has_one_winner(f: &impl Fixture) -> anyhow::Result<()> {
    let store = f.context_store().await;
    let tenant = f.tenant().await;
    let id = doc_id();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let store = store.clone();
        let scope = Scope::new(tenant.clone(), format!("creator{i}"));
        let write = cw(
            &id,
            MergeType::None,
            &VectorClock::new(),
            ContextChange::Put(json!(i)),
        );
        tasks.push(tokio::spawn(
            async move { store.write(&scope, write).await },
        ));
    }
    let mut winners = 0;
    for task in tasks {
        match task.await? {
            Ok(_) => winners += 1,
            Err(StoreError::ContextConflict { .. }) => {}
            Err(other) => return Err(other.into()),
        }
    }
    assert_eq!(winners, 1, "exactly one creator wins");
    assert_eq!(store.get(&tenant, &id).await?.expect("doc").revision, 1);
    Ok(())
}

pub async fn context_crdt_documents_merge_concurrent_writes(
    f: &impl Fixture,
) -> anyhow::Result<()> {
    let store = f.context_store().await;
    let tenant = f.tenant().await;
    let empty = VectorClock::new();
    // A counter incremented concurrently by writers that all read nothing.
    let counter = doc_id();
    let mut tasks = Vec::new();
    for i in 0..8i64 {
        let store = store.clone();
        let scope = Scope::new(tenant.clone(), format!("agent-{i}"));
        let write = cw(
            &counter,
            MergeType::PnCounter,
            &empty,
            ContextChange::Merge(vec![Op::Increment {
                writer: format!("agent-{i}"),
                delta: i - 2,
            }]),
        );
        tasks.push(tokio::spawn(
            async move { store.write(&scope, write).await },
        ));
    }
    for task in tasks {
        task.await??;
    }
    let doc = store.get(&tenant, &counter).await?.expect("counter");
    assert_eq!(doc.content, json!((0..8).map(|i| i - 2).sum::<i64>()));
    assert_eq!(doc.revision, 8);
    assert_eq!(
        doc.vector.as_map().len(),
        8,
        "every writer ticked its entry"
    );

    // An OR-set: a remove only removes what its writer observed.
    let files = doc_id();
    let s = Scope::new(tenant.clone(), "coder");
    let add = |element: &str, tag: &str| Op::Add {
        element: json!(element),
        tag: tag.to_owned(),
    };
    let doc = store
        .write(
            &s,
            cw(
                &files,
                MergeType::OrSet,
                &empty,
                ContextChange::Merge(vec![add("a.rs", "t1"), add("b.rs", "t2")]),
            ),
        )
        .await?
        .document;
    let observed = doc
        .crdt
        .as_ref()
        .map(|c| c.observed_tags(&json!("a.rs")))
        .unwrap_or_default();
    store
        .write(
            &s,
            cw(
                &files,
                MergeType::OrSet,
                &empty,
                ContextChange::Merge(vec![add("a.rs", "t3")]),
            ),
        )
        .await?;
    let doc = store
        .write(
            &s,
            cw(
                &files,
                MergeType::OrSet,
                &empty,
                ContextChange::Merge(vec![Op::Discard {
                    element: json!("a.rs"),
                    observed,
                }]),
            ),
        )
        .await?
        .document;
    assert_eq!(
        doc.content,
        json!(["a.rs", "b.rs"]),
        "the unobserved re-add survives"
    );

    // A plain put on a CRDT document is refused and changes nothing.
    let err = store
        .write(
            &s,
            cw(
                &files,
                MergeType::OrSet,
                &doc.vector,
                ContextChange::Put(json!([])),
            ),
        )
        .await
        .expect_err("put on or_set");
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    // So is a write declaring another merge type.
    let err = store
        .write(
            &s,
            cw(
                &files,
                MergeType::None,
                &doc.vector,
                ContextChange::Put(json!([])),
            ),
        )
        .await
        .expect_err("merge type mismatch");
    assert!(err.to_string().contains("merge type"), "{err}");
    Ok(())
}

pub async fn context_writes_are_idempotent_and_validated(f: &impl Fixture) -> anyhow::Result<()> {
    let store = f.context_store().await;
    let tenant = f.tenant().await;
    let s = Scope::new(tenant.clone(), "planner");
    let id = doc_id();
    let mut write = cw(
        &id,
        MergeType::None,
        &VectorClock::new(),
        ContextChange::Put(json!({"a": 1})),
    );
    write.idempotency = Some(Idempotency::for_request("put-1", &"a=1"));
    let first = store.write(&s, write.clone()).await?;
    let again = store.write(&s, write).await?;
    assert!(again.replayed && !first.replayed);
    assert_eq!(again.document.revision, first.document.revision);
    assert_eq!(store.get(&tenant, &id).await?.expect("doc").revision, 1);

    let mut future = first.document.vector.clone();
    future.tick("nobody", 5);
    let err = store
        .write(
            &s,
            cw(&id, MergeType::None, &future, ContextChange::Put(json!({}))),
        )
        .await
        .expect_err("future vector");
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    let bad: json_patch::Patch =
        serde_json::from_value(json!([{"op": "replace", "path": "/missing", "value": 1}]))?;
    let err = store
        .write(
            &s,
            cw(
                &id,
                MergeType::None,
                &first.document.vector,
                ContextChange::Patch(bad),
            ),
        )
        .await
        .expect_err("bad patch");
    assert!(err.to_string().contains("JSON Patch"), "{err}");
    let err = store
        .write(
            &s,
            cw(
                "has space",
                MergeType::None,
                &VectorClock::new(),
                ContextChange::Put(json!(1)),
            ),
        )
        .await
        .expect_err("bad id");
    assert!(matches!(err, StoreError::Invalid(_)), "{err}");
    assert_eq!(
        store.get(&tenant, &id).await?.expect("doc").revision,
        1,
        "nothing changed"
    );

    // The last REVISIONS_KEPT revisions are kept for deltas; older ones
    // go (trimmed every TRIM_EVERY writes, so within that many more).
    let mut vector = first.document.vector.clone();
    let writes =
        statefabric_store::context::REVISIONS_KEPT + statefabric_store::context::TRIM_EVERY;
    for i in 0..writes {
        vector = store
            .write(
                &s,
                cw(
                    &id,
                    MergeType::None,
                    &vector,
                    ContextChange::Put(json!({"i": i})),
                ),
            )
            .await?
            .document
            .vector;
    }
    assert!(
        store.content_at(&tenant, &id, 1).await?.is_none(),
        "old revision pruned"
    );
    let last = writes + 1;
    for revision in last + 1 - statefabric_store::context::REVISIONS_KEPT..=last {
        assert_eq!(
            store.content_at(&tenant, &id, revision).await?,
            Some(json!({"i": revision - 2})),
            "revision {revision} kept"
        );
    }
    Ok(())
}

/// Many writes at once — on SQLite they share transactions (group commit):
/// each gets its own answer, and the refused ones, including those whose
/// idempotency key or fence was checked (and so written) first, leave
/// nothing behind while the accepted ones all stand.
pub async fn context_concurrent_writes_each_get_their_own_outcome(
    f: &impl Fixture,
) -> anyhow::Result<()> {
    let store = f.context_store().await;
    let tenant = f.tenant().await;
    let s = Scope::new(tenant.clone(), "planner");
    let empty = VectorClock::new();
    // A document whose fence is already at token 9, and a key already used.
    let fenced_id = doc_id();
    let mut fenced = cw(
        &fenced_id,
        MergeType::None,
        &empty,
        ContextChange::Put(json!(1)),
    );
    fenced.fence = Some(statefabric_store::Fence {
        lock: "burst-lock".into(),
        token: 9,
    });
    store.write(&s, fenced.clone()).await?;
    let keyed_id = doc_id();
    let mut keyed = cw(
        &keyed_id,
        MergeType::None,
        &empty,
        ContextChange::Put(json!("k")),
    );
    keyed.idempotency = Some(Idempotency::for_request("burst-key", &"k"));
    store.write(&s, keyed.clone()).await?;

    let mut writes = Vec::new();
    let mut accepted = Vec::new();
    for i in 0..24 {
        let id = doc_id();
        let write = match i % 6 {
            // A stale fence: refused after the fence was read.
            1 => {
                let mut w = cw(
                    &doc_id(),
                    MergeType::None,
                    &empty,
                    ContextChange::Put(json!(i)),
                );
                w.fence = Some(statefabric_store::Fence {
                    lock: "burst-lock".into(),
                    token: 3,
                });
                w
            }
            // The used key with another request: refused.
            2 => {
                let mut w = cw(
                    &keyed_id,
                    MergeType::None,
                    &empty,
                    ContextChange::Put(json!(i)),
                );
                w.idempotency = Some(Idempotency::for_request("burst-key", &i));
                w
            }
            // The used key with the same request: replayed.
            3 => keyed.clone(),
            // A new key, a new document: accepted, and its key recorded.
            4 => {
                let mut w = cw(&id, MergeType::None, &empty, ContextChange::Put(json!(i)));
                w.idempotency = Some(Idempotency::for_request(format!("burst-{i}"), &i));
                accepted.push((id, i));
                w
            }
            // A conflict: creating over the fenced document without its vector.
            5 => cw(
                &fenced_id,
                MergeType::None,
                &empty,
                ContextChange::Put(json!(i)),
            ),
            _ => {
                accepted.push((id.clone(), i));
                cw(
                    &id,
                    MergeType::LwwRegister,
                    &empty,
                    ContextChange::Put(json!(i)),
                )
            }
        };
        writes.push((i, write));
    }
    let tasks: Vec<_> = writes
        .into_iter()
        .map(|(i, write)| {
            let (store, s) = (store.clone(), s.clone());
            tokio::spawn(async move { (i, store.write(&s, write).await) })
        })
        .collect();
    for task in tasks {
        let (i, outcome) = task.await?;
        match (i % 6, outcome) {
            (0 | 4, Ok(o)) => assert!(!o.replayed && o.document.revision == 1, "write {i}"),
            (1, Err(StoreError::StaleFence { current: 9, .. })) => {}
            (2, Err(StoreError::IdempotencyKeyReused { .. })) => {}
            (3, Ok(o)) => assert!(o.replayed, "write {i} replayed"),
            (5, Err(StoreError::ContextConflict { .. })) => {}
            (kind, other) => panic!("write {i} (kind {kind}): unexpected {other:?}"),
        }
    }
    for (id, i) in &accepted {
        let doc = store
            .get(&tenant, id)
            .await?
            .expect("accepted write stored");
        assert_eq!(doc.content, json!(i));
    }
    // The refused fenced writes created nothing; the fence is still at 9
    // (token 8 is refused); the keyed document is as first written.
    let stale = store
        .write(&s, {
            let mut w = cw(
                &doc_id(),
                MergeType::None,
                &empty,
                ContextChange::Put(json!(0)),
            );
            w.fence = Some(statefabric_store::Fence {
                lock: "burst-lock".into(),
                token: 8,
            });
            w
        })
        .await
        .expect_err("fence still at 9");
    assert!(
        matches!(stale, StoreError::StaleFence { current: 9, .. }),
        "{stale}"
    );
    let doc = store.get(&tenant, &keyed_id).await?.expect("keyed doc");
    assert_eq!((doc.revision, doc.content), (1, json!("k")));
    let doc = store.get(&tenant, &fenced_id).await?.expect("fenced doc");
    assert_eq!((doc.revision, doc.content), (1, json!(1)));
    // Each accepted keyed write's key replays it.
    for (id, i) in accepted.iter().filter(|(_, i)| i % 6 == 4) {
        let mut again = cw(id, MergeType::None, &empty, ContextChange::Put(json!(i)));
        again.idempotency = Some(Idempotency::for_request(format!("burst-{i}"), i));
        assert!(
            store.write(&s, again).await?.replayed,
            "key burst-{i} recorded"
        );
    }
    Ok(())
}

pub async fn context_writes_carrying_a_stale_fence_are_refused(
    f: &impl Fixture,
) -> anyhow::Result<()> {
    let store = f.context_store().await;
    let tenant = f.tenant().await;
    let s = Scope::new(tenant.clone(), "planner");
    let id = doc_id();
    let fenced = |base: &VectorClock, value: serde_json::Value, token: u64| {
        let mut write = cw(&id, MergeType::None, base, ContextChange::Put(value));
        write.fence = Some(statefabric_store::Fence {
            lock: "plan-lock".into(),
            token,
        });
        write
    };
    let first = store
        .write(
            &s,
            fenced(&VectorClock::new(), json!({"by": "holder-7"}), 7),
        )
        .await?;
    let second = store
        .write(
            &s,
            fenced(&first.document.vector, json!({"by": "holder-9"}), 9),
        )
        .await?;
    // The lapsed holder (token 7) wakes up and writes: refused, even with a
    // base that would otherwise be accepted.
    let err = store
        .write(
            &s,
            fenced(&second.document.vector, json!({"by": "lapsed"}), 7),
        )
        .await
        .expect_err("stale token");
    assert!(
        matches!(
            err,
            StoreError::StaleFence {
                token: 7,
                current: 9,
                ..
            }
        ),
        "{err}"
    );
    let doc = store.get(&tenant, &id).await?.expect("doc");
    assert_eq!(
        (doc.revision, &doc.content),
        (2, &json!({"by": "holder-9"}))
    );
    // The fence is shared with appends guarded by the same lock.
    let err = f
        .store()
        .await
        .append(
            &s,
            append(&stream("fenced-ctx"), ExpectedVersion::Any, events(1)).fenced("plan-lock", 8),
        )
        .await
        .expect_err("stale for appends too");
    assert!(matches!(err, StoreError::StaleFence { .. }), "{err}");
    // A malformed fence (no lock, a token no lock grants) is the caller's
    // error, named as such, and writes nothing (found by the State API
    // fuzzer: it was a failed constraint, reported as a storage failure).
    for (lock, token) in [("", 9), ("plan-lock", 0), ("no spaces", 9)] {
        let mut write = fenced(&second.document.vector, json!({"by": "bad"}), token);
        if let Some(fence) = &mut write.fence {
            fence.lock = lock.into();
        }
        let err = store.write(&s, write).await.expect_err("malformed fence");
        assert!(
            matches!(err, StoreError::Invalid(_)) && err.to_string().contains("fence"),
            "{lock:?}/{token}: {err}"
        );
    }
    assert_eq!(store.get(&tenant, &id).await?.expect("doc").revision, 2);
    Ok(())
}

/// A writer's `known` document (a sidecar's cache entry) is only a hint: an
/// out-of-date one neither loses a change nor lets a write past a change
/// its writer missed.
pub async fn context_writes_on_an_out_of_date_known_document_decide_again(
    f: &impl Fixture,
) -> anyhow::Result<()> {
    let store = f.context_store().await;
    let tenant = f.tenant().await;
    let planner = Scope::new(tenant.clone(), "planner");
    let coder = Scope::new(tenant.clone(), "coder");
    let id = doc_id();
    let add = |step: &str| -> anyhow::Result<ContextChange> {
        Ok(ContextChange::Patch(serde_json::from_value(
            json!([{"op": "add", "path": "/steps/-", "value": step}]),
        )?))
    };
    let known = |write: ContextWrite, doc: &ContextDocument| ContextWrite {
        known: Some(Arc::new(doc.clone())),
        ..write
    };
    let v1 = store
        .write(
            &planner,
            cw(
                &id,
                MergeType::None,
                &VectorClock::new(),
                ContextChange::Put(json!({"steps": ["a"]})),
            ),
        )
        .await?
        .document;
    let v2 = store
        .write(&coder, cw(&id, MergeType::None, &v1.vector, add("b")?))
        .await?
        .document;
    // Knows v1, has read v2: written on v2.
    let v3 = store
        .write(
            &planner,
            known(cw(&id, MergeType::None, &v2.vector, add("c")?), &v1),
        )
        .await?
        .document;
    assert_eq!(v3.revision, 3);
    assert_eq!(v3.content, json!({"steps": ["a", "b", "c"]}));
    // Knows v1 and has read only v1: refused, as without the hint.
    let err = store
        .write(
            &planner,
            known(cw(&id, MergeType::None, &v1.vector, add("x")?), &v1),
        )
        .await
        .expect_err("missed v2 and v3");
    assert!(
        matches!(&err, StoreError::ContextConflict { current, .. } if current == &v3.vector),
        "{err:?}"
    );
    // Knows the current document: written on it.
    let v4 = store
        .write(
            &coder,
            known(cw(&id, MergeType::None, &v3.vector, add("d")?), &v3),
        )
        .await?
        .document;
    assert_eq!(v4.content, json!({"steps": ["a", "b", "c", "d"]}));
    // A known document of another id is not taken for this one.
    let other = doc_id();
    let created = store
        .write(
            &planner,
            known(
                cw(
                    &other,
                    MergeType::None,
                    &VectorClock::new(),
                    ContextChange::Put(json!({"n": 1})),
                ),
                &v4,
            ),
        )
        .await?
        .document;
    assert_eq!((created.revision, created.content), (1, json!({"n": 1})));
    let read = store.get(&tenant, &id).await?.expect("exists");
    assert_eq!(read.revision, 4);
    assert_eq!(read.content, v4.content);
    // Written on a known document, each revision is kept for deltas.
    for doc in [&v3, &v4] {
        assert_eq!(
            store.content_at(&tenant, &id, doc.revision).await?,
            Some(doc.content.clone())
        );
    }
    // A last-write-wins write is allowed on any known document, so an
    // out-of-date one gets as far as the conditional write, which finds a
    // newer revision: decided again on it, the coder's revision is kept.
    let register = doc_id();
    let lww = |value: Value| lww_put(&register, value);
    let r1 = store.write(&planner, lww(json!("one"))).await?.document;
    let r2 = store.write(&coder, lww(json!("two"))).await?.document;
    let r3 = store
        .write(&planner, known(lww(json!("three")), &r1))
        .await?
        .document;
    assert_eq!((r3.revision, &r3.content), (3, &json!("three")));
    assert_eq!(
        store.content_at(&tenant, &register, r2.revision).await?,
        Some(json!("two"))
    );
    let r4 = store
        .write(&coder, known(lww(json!("four")), &r3))
        .await?
        .document;
    assert_eq!(r4.revision, 4);
    assert_eq!(
        store.get(&tenant, &register).await?.map(|d| d.content),
        Some(json!("four"))
    );
    Ok(())
}

/// Concurrent last-write-wins writes that all know the same, soon out of
/// date, revision (a sidecar's cache entry under a burst; on SQLite many of
/// them share one group transaction) each land on a revision of their own,
/// and each revision keeps its own content.
pub async fn context_concurrent_writes_knowing_one_revision_each_land(
    f: &impl Fixture,
) -> anyhow::Result<()> {
    let store = f.context_store().await;
    let tenant = f.tenant().await;
    let id = doc_id();
    let lww = |value: Value| lww_put(&id, value);
    let first = store.write(&scope(&tenant), lww(json!(0))).await?.document;
    let known = Arc::new(first);
    let writes = (1..=16).map(|n| {
        let (store, tenant, known) = (store.clone(), tenant.clone(), known.clone());
        let write = ContextWrite {
            known: Some(known),
            ..lww(json!(n))
        };
        tokio::spawn(async move { store.write(&scope(&tenant), write).await })
    });
    let mut revisions = Vec::new();
    for written in futures::future::join_all(writes).await {
        let document = written??.document;
        assert_eq!(
            store.content_at(&tenant, &id, document.revision).await?,
            Some(document.content.clone()),
            "revision {}",
            document.revision
        );
        revisions.push(document.revision);
    }
    revisions.sort_unstable();
    assert_eq!(revisions, (2..=17).collect::<Vec<u64>>());
    Ok(())
}

/// Sets last-write-wins register `id` to `value`, whatever it was.
fn lww_put(id: &str, value: Value) -> ContextWrite {
    cw(
        id,
        MergeType::LwwRegister,
        &VectorClock::new(),
        ContextChange::Put(value),
    )
}
