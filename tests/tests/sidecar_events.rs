//! The sidecar's Events API, driven through the SDK against the real binary,
//! on the real Postgres and on the embedded SQLite store.

use std::time::Duration;

use futures::StreamExt;
use nix::sys::signal::Signal;
use serde_json::json;
use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::events_client::EventsClient;
use statefabric_sdk::{Causality, Error, Expected, NewEvent, StateClient, causality};
use statefabric_tests as env;
use statefabric_tests::process::{self, Service, Storage, spawn};
use tonic::Code;

#[derive(Clone, Copy, Debug)]
enum Backend {
    Postgres,
    Sqlite,
}

fn tenant() -> String {
    format!("t-{}", uuid::Uuid::new_v4().simple())
}

async fn sidecar(
    backend: Backend,
    tenant: &str,
    extra: &[(&str, &str)],
) -> anyhow::Result<Service> {
    let storage = match backend {
        Backend::Postgres => Storage::Postgres,
        Backend::Sqlite => Storage::Sqlite,
    };
    process::sidecar(storage, tenant, "planner-1", extra).await
}

async fn client(service: &Service) -> anyhow::Result<StateClient> {
    Ok(StateClient::connect(service.grpc.clone()).await?)
}

fn stream() -> String {
    format!("task-{}", uuid::Uuid::new_v4().simple())
}

fn ev(event_type: &str, n: u64) -> NewEvent {
    NewEvent::json(event_type, &json!({ "n": n })).expect("json")
}

async fn append_read_and_follow(backend: Backend) -> anyhow::Result<()> {
    let service = sidecar(backend, &tenant(), &[]).await?;
    let mut c = client(&service).await?;
    let id = stream();
    let first = c
        .append(
            &id,
            "task",
            Expected::NoStream,
            vec![ev("Created", 1), ev("Planned", 2)],
        )
        .await?;
    assert_eq!(
        (first.first_version, first.last_version, first.replayed),
        (1, 2, false)
    );
    let second = c
        .append(&id, "task", Expected::Exact(2), vec![ev("Coded", 3)])
        .await?;
    assert_eq!(second.last_version, 3);

    let events = c.read_stream(&id, 1, 10).await?;
    assert_eq!(
        events
            .iter()
            .map(|e| e.event_type.as_str())
            .collect::<Vec<_>>(),
        ["Created", "Planned", "Coded"]
    );
    assert_eq!(events[2].data, json!({"n": 3}));
    // Every event carries the sidecar's vector clock; later ones dominate.
    assert!(events[0].clock.get("planner-1") > 0);
    assert_eq!(causality(&events[0], &events[2]), Causality::Before);
    assert_eq!(c.read_all(1, 100).await?.len(), 3);

    // The feed delivers everything from the start, then live appends.
    let mut feed = c.subscribe_all(None).await?;
    for expected in ["Created", "Planned", "Coded"] {
        let event = tokio::time::timeout(Duration::from_secs(10), feed.next())
            .await?
            .expect("open")?;
        assert_eq!(event.event_type, expected);
    }
    c.append(&id, "task", Expected::Any, vec![ev("Reviewed", 4)])
        .await?;
    let live = tokio::time::timeout(Duration::from_secs(10), feed.next())
        .await?
        .expect("open")?;
    assert_eq!(live.event_type, "Reviewed");

    // A per-stream subscription resumes after a checkpoint.
    let other = stream();
    c.append(&other, "task", Expected::NoStream, vec![ev("Elsewhere", 9)])
        .await?;
    let mut one = c.subscribe_stream(&id, Some(events[1].checkpoint)).await?;
    let next = tokio::time::timeout(Duration::from_secs(10), one.next())
        .await?
        .expect("open")?;
    assert_eq!(next.event_type, "Coded");
    let next = tokio::time::timeout(Duration::from_secs(10), one.next())
        .await?
        .expect("open")?;
    assert_eq!(
        next.event_type, "Reviewed",
        "other streams are filtered out"
    );
    Ok(())
}

#[tokio::test]
async fn postgres_append_read_and_follow() -> anyhow::Result<()> {
    append_read_and_follow(Backend::Postgres).await
}

#[tokio::test]
async fn sqlite_append_read_and_follow() -> anyhow::Result<()> {
    append_read_and_follow(Backend::Sqlite).await
}

/// Every kind of bad input gets the right status with a message that says
/// what was wrong, and changes nothing.
#[tokio::test]
async fn bad_requests_get_clear_statuses_and_change_nothing() -> anyhow::Result<()> {
    let service = sidecar(
        Backend::Postgres,
        &tenant(),
        &[("STATEFABRIC_SIDECAR__MAX_REQUEST_BYTES", "4194304")],
    )
    .await?;
    let mut raw = EventsClient::connect(service.grpc.clone()).await?;
    let id = stream();
    let event = |data: &[u8]| pb::NewEvent {
        event_type: "E".into(),
        data_json: data.to_vec(),
        ..Default::default()
    };
    let any = Some(pb::ExpectedVersion {
        kind: Some(pb::expected_version::Kind::Any(pb::Empty {})),
    });
    let request = |stream_id: &str,
                   expected: Option<pb::ExpectedVersion>,
                   events: Vec<pb::NewEvent>| pb::AppendEventsRequest {
        stream_id: stream_id.to_owned(),
        stream_type: "task".into(),
        expected,
        events,
        fence: None,
    };
    let cases = vec![
        (
            "invalid JSON",
            request(&id, any, vec![event(b"{nope")]),
            Code::InvalidArgument,
            "invalid JSON",
        ),
        (
            "empty batch",
            request(&id, any, vec![]),
            Code::InvalidArgument,
            "at least one event",
        ),
        (
            "bad stream id",
            request("has spaces", any, vec![event(b"{}")]),
            Code::InvalidArgument,
            "stream_id",
        ),
        (
            "missing expectation",
            request(&id, None, vec![event(b"{}")]),
            Code::InvalidArgument,
            "expected",
        ),
        (
            "exact 0",
            request(
                &id,
                Some(pb::ExpectedVersion {
                    kind: Some(pb::expected_version::Kind::Exact(0)),
                }),
                vec![event(b"{}")],
            ),
            Code::InvalidArgument,
            "start at 1",
        ),
        (
            "oversize event",
            request(
                &id,
                any,
                vec![event(
                    format!("{{\"x\":\"{}\"}}", "y".repeat(2 * 1024 * 1024)).as_bytes(),
                )],
            ),
            Code::ResourceExhausted,
            "maximum",
        ),
        (
            "stale expectation",
            request(
                &id,
                Some(pb::ExpectedVersion {
                    kind: Some(pb::expected_version::Kind::Exact(3)),
                }),
                vec![event(b"{}")],
            ),
            Code::FailedPrecondition,
            "absent",
        ),
    ];
    for (name, req, code, needle) in cases {
        let status = raw.append_events(req).await.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {}", status.message());
        assert!(
            status.message().contains(needle),
            "{name}: {}",
            status.message()
        );
    }
    // Larger than the server decodes at all (sidecar.max_request_bytes):
    // refused before any handler runs, with the same code.
    let huge = request(
        &id,
        any,
        vec![event(
            format!("{{\"x\":\"{}\"}}", "y".repeat(5 * 1024 * 1024)).as_bytes(),
        )],
    );
    let status = raw.append_events(huge).await.expect_err("too big");
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("too large"),
        "{}",
        status.message()
    );

    let status = raw
        .read_stream(pb::ReadStreamRequest {
            stream_id: id.clone(),
            from_version: 0,
            limit: 10,
        })
        .await
        .expect_err("version 0");
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = raw
        .read_stream(pb::ReadStreamRequest {
            stream_id: id.clone(),
            from_version: 1,
            limit: 0,
        })
        .await
        .expect_err("limit 0");
    assert_eq!(status.code(), Code::InvalidArgument);
    let mut bad_key = tonic::Request::new(request(&id, any, vec![event(b"{}")]));
    bad_key
        .metadata_mut()
        .insert("idempotency-key", "".parse()?);
    let status = raw.append_events(bad_key).await.expect_err("empty key");
    assert_eq!(status.code(), Code::InvalidArgument);

    // Nothing was written by any of it: the stream does not even exist.
    let status = raw
        .read_stream(pb::ReadStreamRequest {
            stream_id: id.clone(),
            from_version: 1,
            limit: 10,
        })
        .await
        .expect_err("no such stream");
    assert_eq!(status.code(), Code::NotFound, "{}", status.message());

    // A duplicate event id is ALREADY_EXISTS.
    let fixed = uuid::Uuid::new_v4();
    let mut c = client(&service).await?;
    c.append(
        &id,
        "task",
        Expected::NoStream,
        vec![ev("A", 1).with_id(fixed)],
    )
    .await?;
    let err = c
        .append(
            &stream(),
            "task",
            Expected::NoStream,
            vec![ev("A", 1).with_id(fixed)],
        )
        .await
        .expect_err("dup");
    assert!(matches!(err, Error::Invalid(_)), "{err}");
    Ok(())
}

#[tokio::test]
async fn idempotency_keys_in_metadata_make_retries_safe() -> anyhow::Result<()> {
    let service = sidecar(Backend::Postgres, &tenant(), &[]).await?;
    let mut c = client(&service).await?;
    let id = stream();
    let first = c
        .append_idempotent(
            "op-1",
            &id,
            "task",
            Expected::NoStream,
            vec![ev("Created", 1)],
        )
        .await?;
    let retry = c
        .append_idempotent(
            "op-1",
            &id,
            "task",
            Expected::NoStream,
            vec![ev("Created", 1)],
        )
        .await?;
    assert!(retry.replayed);
    assert_eq!(retry.last_version, first.last_version);
    let err = c
        .append_idempotent(
            "op-1",
            &id,
            "task",
            Expected::NoStream,
            vec![ev("Created", 2)],
        )
        .await
        .expect_err("different request");
    assert!(
        matches!(err, Error::Invalid(ref m) if m.contains("different request")),
        "{err}"
    );
    assert_eq!(c.read_stream(&id, 1, 10).await?.len(), 1);
    Ok(())
}

/// Sidecars of different tenants share a database but never each other's
/// data: a request has no way to name another tenant.
#[tokio::test]
async fn sidecars_are_confined_to_their_tenant() -> anyhow::Result<()> {
    let a = sidecar(Backend::Postgres, &tenant(), &[]).await?;
    let b = sidecar(Backend::Postgres, &tenant(), &[]).await?;
    let (mut ca, mut cb) = (client(&a).await?, client(&b).await?);
    let id = stream();
    ca.append(&id, "task", Expected::NoStream, vec![ev("Secret", 1)])
        .await?;
    let err = cb.read_stream(&id, 1, 10).await.expect_err("not theirs");
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    assert!(cb.read_all(1, 100).await?.is_empty());
    cb.append(&id, "task", Expected::NoStream, vec![ev("Theirs", 1)])
        .await?;
    let mine = ca.read_stream(&id, 1, 10).await?;
    assert_eq!(mine.len(), 1);
    assert_eq!(mine[0].event_type, "Secret");
    Ok(())
}

#[tokio::test]
async fn a_slow_subscriber_is_cut_off_with_a_checkpoint_to_resume_from() -> anyhow::Result<()> {
    let service = sidecar(
        Backend::Sqlite,
        &tenant(),
        &[
            ("STATEFABRIC_SIDECAR__SUBSCRIPTION_BUFFER", "4"),
            ("STATEFABRIC_SIDECAR__SUBSCRIBER_LAG_TIMEOUT", "300ms"),
        ],
    )
    .await?;
    let mut c = client(&service).await?;
    let id = stream();
    // Enough bytes to fill the HTTP/2 windows between client and server, so
    // the sidecar's own buffer fills when the client stops reading.
    let total = 1000u64;
    let pad = "x".repeat(10_000);
    for chunk in 0..(total / 100) {
        let batch = (0..100)
            .map(|i| {
                NewEvent::json("Tick", &json!({"n": chunk * 100 + i, "pad": pad})).expect("json")
            })
            .collect();
        c.append(&id, "task", Expected::Any, batch).await?;
    }
    let mut feed = c.subscribe_all(None).await?;
    // Read one event, then stall long past the lag timeout.
    let first = feed.next().await.expect("open")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut last = first.checkpoint;
    let mut received = 1u64;
    let cut_off = loop {
        match tokio::time::timeout(Duration::from_secs(10), feed.next()).await? {
            Some(Ok(event)) => {
                last = event.checkpoint;
                received += 1;
            }
            Some(Err(err)) => break err,
            None => anyhow::bail!("stream ended without a status"),
        }
    };
    assert!(
        received < total,
        "a stalled consumer cannot have received everything"
    );
    assert!(
        matches!(cut_off, Error::TooLarge(ref m) if m.contains("fell behind") && m.contains("resume after checkpoint")),
        "{cut_off}"
    );
    // Resuming from the last checkpoint delivers the rest, exactly.
    let mut resumed = c.subscribe_all(Some(last)).await?;
    while received < total {
        let event = tokio::time::timeout(Duration::from_secs(10), resumed.next())
            .await?
            .expect("open")?;
        assert_eq!(
            event.data["n"].as_u64(),
            Some(received),
            "no gap, no repeat"
        );
        received += 1;
    }
    Ok(())
}

#[tokio::test]
async fn shutdown_ends_streams_with_a_resumable_status_and_exits_0() -> anyhow::Result<()> {
    let service = sidecar(Backend::Sqlite, &tenant(), &[]).await?;
    let mut c = client(&service).await?;
    c.append(&stream(), "task", Expected::Any, vec![ev("A", 1)])
        .await?;
    let mut feed = c.subscribe_all(None).await?;
    feed.next().await.expect("open")?;
    let stopping = tokio::spawn(service.stop_with(Signal::SIGTERM));
    let end = tokio::time::timeout(Duration::from_secs(10), feed.next()).await?;
    match end {
        Some(Err(Error::Unavailable(message))) => {
            assert!(message.contains("resume after checkpoint"), "{message}")
        }
        other => anyhow::bail!("expected UNAVAILABLE at shutdown, got {other:?}"),
    }
    let (code, stderr) = stopping.await??;
    assert_eq!(code, 0, "{stderr}");
    Ok(())
}

#[tokio::test]
async fn health_and_reflection_are_served() -> anyhow::Result<()> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let service = sidecar(Backend::Sqlite, &tenant(), &[]).await?;
    let channel = tonic::transport::Endpoint::from_shared(service.grpc.clone())?
        .connect()
        .await?;
    let mut health = HealthClient::new(channel.clone());
    // Every State API service, named as reflection lists it.
    for service in ["Events", "SharedContext", "Locks", "Sessions", "Tasks"] {
        let status = health
            .check(HealthCheckRequest {
                service: format!("statefabric.state.v1.{service}"),
            })
            .await?
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "statefabric.state.v1.Nothing".into(),
        })
        .await
        .expect_err("an unknown service");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await?
        .into_inner();
    let response = responses.next().await.expect("a response")?;
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        anyhow::bail!("unexpected reflection response");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"statefabric.state.v1.Events".to_owned()),
        "{names:?}"
    );
    Ok(())
}

/// The SDK's runnable example works against a real sidecar, as documented.
#[tokio::test]
async fn the_sdk_quickstart_example_runs() -> anyhow::Result<()> {
    let service = sidecar(Backend::Sqlite, &tenant(), &[]).await?;
    let stdout = env::run_example("quickstart", &service.grpc).await?;
    assert!(stdout.contains("stale write refused"), "{stdout}");
    assert!(stdout.contains("retry replayed: true"), "{stdout}");
    assert!(stdout.contains("feed delivered all 3 events"), "{stdout}");
    Ok(())
}

/// The aggregate repository works through the sidecar: concurrent commands
/// from two sidecars of one tenant retry on conflict and none is lost.
#[tokio::test]
async fn the_sdk_repository_runs_aggregates_through_sidecars() -> anyhow::Result<()> {
    use statefabric_sdk::{Repository, RepositoryError};
    use statefabric_tests::store_contract::{Counter, CounterCommand};

    let t = tenant();
    let (a, b) = (
        sidecar(Backend::Postgres, &t, &[]).await?,
        sidecar(Backend::Postgres, &t, &[]).await?,
    );
    let id = stream();
    let mut tasks = Vec::new();
    for service in [&a, &b] {
        let mut repo: Repository<Counter> = Repository::new(client(service).await?);
        let id = id.clone();
        tasks.push(tokio::spawn(async move {
            let mut landed = 0u64;
            for _ in 0..5 {
                match repo.execute(&id, &CounterCommand::Add(1), None).await {
                    Ok(_) => landed += 1,
                    Err(RepositoryError::TooManyConflicts(_)) => {}
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
    let mut repo: Repository<Counter> = Repository::new(client(&a).await?);
    let (state, version) = repo.load(&id).await?;
    assert_eq!((state.value as u64, version), (landed, landed));
    assert!(landed >= 5);

    let first = repo
        .execute(&id, &CounterCommand::Add(10), Some("bonus"))
        .await?;
    let again = repo
        .execute(&id, &CounterCommand::Add(10), Some("bonus"))
        .await?;
    assert!(again.replayed && again.last_version == first.last_version);
    let rejected = repo.execute(&id, &CounterCommand::Add(5000), None).await;
    assert!(matches!(rejected, Err(RepositoryError::Rejected(_))));
    assert_eq!(repo.load(&id).await?.0.value as u64, landed + 10);
    Ok(())
}

/// `fabric dev` keeps its state in its data directory: stop it (Ctrl-C) and
/// start it again, and what was written is still there.
#[tokio::test]
async fn fabric_dev_keeps_its_state_across_restarts() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let path = data.path().join("events.db");
    let path = path.to_string_lossy().into_owned();
    let vars = [("STATEFABRIC_STORAGE__SQLITE__PATH", path.as_str())];
    let id = stream();

    let mut first = spawn("fabric", &["dev"], &vars)?;
    first.ready().await?;
    let mut c = client(&first).await?;
    c.append(&id, "task", Expected::NoStream, vec![ev("Created", 1)])
        .await?;
    c.context()
        .put(
            "plan",
            statefabric_sdk::MergeType::None,
            &statefabric_sdk::VectorClock::new(),
            &json!({"kept": true}),
            None,
        )
        .await?;
    let (code, stderr) = first.stop_with(Signal::SIGINT).await?;
    assert_eq!(code, 0, "{stderr}");

    let mut second = spawn("fabric", &["dev"], &vars)?;
    second.ready().await?;
    let mut c = client(&second).await?;
    assert_eq!(c.read_stream(&id, 1, 10).await?.len(), 1);
    let plan = c.context().get("plan").await?.expect("plan kept");
    assert_eq!(plan.content, json!({"kept": true}));
    Ok(())
}
