//! The State API's request path, on a real sidecar process: a call over the
//! concurrency limit is refused at once with RESOURCE_EXHAUSTED (not
//! queued), a call past the caller's deadline is answered
//! DEADLINE_EXCEEDED, both are counted, and every call is a span in the
//! caller's trace, exported to a real OTLP collector.

use std::time::{Duration, Instant};

use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::events_client::EventsClient;
use statefabric_proto::state::v1::shared_context_client::SharedContextClient;
use statefabric_proto::state::v1::tasks_client::TasksClient;
use statefabric_tests::otlp::{Collector, export_vars};
use statefabric_tests::process::{self, Storage};
use tonic::Code;

fn tenant() -> String {
    format!("t-{}", uuid::Uuid::new_v4().simple())
}

fn get(id: &str) -> pb::GetContextRequest {
    pb::GetContextRequest {
        document_id: id.into(),
        known_revision: 0,
    }
}

/// A long poll that holds a place for `wait_ms` (no tasks will come).
fn long_poll(wait_ms: u32) -> pb::PollTasksRequest {
    pb::PollTasksRequest {
        agent_type: "nobody".into(),
        max: 1,
        wait_ms,
        worker: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_limit_are_shed_and_calls_past_their_deadline_end() -> anyhow::Result<()> {
    let sidecar = process::sidecar(
        Storage::Sqlite,
        &tenant(),
        "agent-1",
        &[("STATEFABRIC_SIDECAR__MAX_CONCURRENT_CALLS", "1")],
    )
    .await?;
    let mut tasks = TasksClient::connect(sidecar.grpc.clone()).await?;
    let mut context = SharedContextClient::connect(sidecar.grpc.clone()).await?;

    // One call in flight takes the only place: the next is refused at once.
    let holder = tokio::spawn({
        let mut tasks = tasks.clone();
        async move { tasks.poll_tasks(long_poll(3000)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let began = Instant::now();
    let shed = context.get_context(get("d")).await.expect_err("shed");
    assert_eq!(shed.code(), Code::ResourceExhausted, "{}", shed.message());
    assert!(
        shed.message().contains("max_concurrent_calls"),
        "{}",
        shed.message()
    );
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "refused at once, not queued"
    );
    holder.await??;
    // The place is free again.
    let after = context
        .get_context(get("d"))
        .await
        .expect_err("no such document");
    assert_eq!(after.code(), Code::NotFound);

    // The caller's deadline (grpc-timeout, set here without a client-side
    // timer) ends the call on the sidecar.
    let mut request = tonic::Request::new(long_poll(5000));
    request
        .metadata_mut()
        .insert("grpc-timeout", "200m".parse()?);
    let began = Instant::now();
    let late = tasks
        .poll_tasks(request)
        .await
        .expect_err("past its deadline");
    assert_eq!(late.code(), Code::DeadlineExceeded, "{}", late.message());
    assert!(began.elapsed() < Duration::from_secs(2));

    let metrics = statefabric_tests::http("GET", &format!("{}/metrics", sidecar.admin), None, None)
        .await?
        .body;
    for needle in [
        r#"method="SharedContext/GetContext",code="ResourceExhausted""#,
        r#"method="Tasks/PollTasks",code="DeadlineExceeded""#,
    ] {
        assert!(metrics.contains(needle), "{needle} in\n{metrics}");
    }
    let (code, stderr) = sidecar.stop_with(nix::sys::signal::Signal::SIGTERM).await?;
    assert_eq!(code, 0, "{stderr}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_a_span_in_the_callers_trace() -> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let vars = export_vars(&collector);
    let sidecar = process::sidecar(
        Storage::Sqlite,
        &tenant(),
        "agent-1",
        &process::borrowed(&vars),
    )
    .await?;
    let mut context = SharedContextClient::connect(sidecar.grpc.clone()).await?;
    let trace = "5bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "10f067aa0ba902b7";
    let mut request = tonic::Request::new(pb::PutContextRequest {
        document_id: "traced".into(),
        merge_type: 0,
        base: None,
        content_json: br#"{"a": 1}"#.to_vec(),
        fence: None,
    });
    request
        .metadata_mut()
        .insert("traceparent", format!("00-{trace}-{parent}-01").parse()?);
    context.put_context(request).await?;
    let span = collector
        .span("the call's span", Duration::from_secs(15), |s| {
            s.name == "rpc" && s.trace_id == trace
        })
        .await?;
    assert_eq!(span.parent_span_id, parent, "a child of the caller's span");
    assert_eq!(
        span.attributes.get("rpc.method").map(String::as_str),
        Some("/statefabric.state.v1.SharedContext/PutContext")
    );
    // The store's work for a call is a span under the call's.
    let mut events = EventsClient::connect(sidecar.grpc.clone()).await?;
    let mut append = tonic::Request::new(pb::AppendEventsRequest {
        stream_id: "traced-stream".into(),
        stream_type: "order".into(),
        expected: Some(pb::ExpectedVersion {
            kind: Some(pb::expected_version::Kind::Any(pb::Empty {})),
        }),
        events: vec![pb::NewEvent {
            event_type: "created".into(),
            data_json: br#"{"n": 1}"#.to_vec(),
            ..Default::default()
        }],
        fence: None,
    });
    append
        .metadata_mut()
        .insert("traceparent", format!("00-{trace}-{parent}-01").parse()?);
    events.append_events(append).await?;
    let call = collector
        .span("the append's span", Duration::from_secs(15), |s| {
            s.trace_id == trace
                && s.attributes.get("rpc.method").map(String::as_str)
                    == Some("/statefabric.state.v1.Events/AppendEvents")
        })
        .await?;
    let stored = collector
        .span("the store's span", Duration::from_secs(15), |s| {
            s.trace_id == trace && s.name == "store.append"
        })
        .await?;
    assert_eq!(stored.parent_span_id, call.span_id);
    assert_eq!(
        stored.attributes.get("db.system").map(String::as_str),
        Some("sqlite")
    );
    let (code, stderr) = sidecar.stop_with(nix::sys::signal::Signal::SIGTERM).await?;
    assert_eq!(code, 0, "{stderr}");
    Ok(())
}
