//! One saga, one trace: a saga started in a caller's trace context hands
//! that context (its StartSaga span's) to its tasks, and the answer sent in
//! it joins the trace, as the spans a real OTLP collector receives show.
//! The SDKs send the task's context with every call made for it — the
//! answer, heartbeats and egress calls (`egress_tracing.rs` shows an egress
//! call joining the trace it carries).

use std::time::Duration;

use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::tasks_client::TasksClient;
use statefabric_tests::otlp::{Collector, export_vars};
use statefabric_tests::process;

const TRACE: &str = "6bf92f3577b34da6a3ce929d0e0e4736";
const CALLER: &str = "20f067aa0ba902b7";

/// `message` sent in the trace context `traceparent`.
fn traced<T>(message: T, traceparent: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("traceparent", traceparent.parse()?);
    Ok(request)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sagas_tasks_and_the_work_done_for_them_are_one_trace() -> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let vars = export_vars(&collector);
    let mut dev = process::spawn("fabric", &["dev"], &process::borrowed(&vars))?;
    dev.ready().await?;
    let mut client = TasksClient::connect(dev.grpc.clone()).await?;

    let start = pb::StartSagaRequest {
        definition: "plan-code-critique".into(),
        saga_id: format!("traced-{}", uuid::Uuid::new_v4().simple()),
        data_json: br#"{"task": "t"}"#.to_vec(),
    };
    let saga = client
        .start_saga(traced(start, &format!("00-{TRACE}-{CALLER}-01"))?)
        .await?
        .into_inner()
        .saga_id;
    let task = client
        .poll_tasks(pb::PollTasksRequest {
            agent_type: "planner".into(),
            max: 1,
            wait_ms: 10_000,
            worker: String::new(),
        })
        .await?
        .into_inner()
        .tasks
        .into_iter()
        .find(|t| t.saga_id == saga)
        .ok_or_else(|| anyhow::anyhow!("the PLAN task"))?;
    let parts: Vec<&str> = task.traceparent.split('-').collect();
    assert_eq!(
        parts.get(1),
        Some(&TRACE),
        "the task carries the saga's trace: {task:?}"
    );

    // The start's span is the caller's child; the task's context is it.
    let started = collector
        .span("StartSaga's span", Duration::from_secs(15), |s| {
            s.trace_id == TRACE && s.name == "rpc" && s.parent_span_id == CALLER
        })
        .await?;
    assert_eq!(
        started.attributes.get("rpc.method").map(String::as_str),
        Some("/statefabric.state.v1.Tasks/StartSaga")
    );
    assert_eq!(parts.get(2), Some(&started.span_id.as_str()));

    // The answer, sent in the task's context, joins the trace.
    let answer = pb::CompleteTaskRequest {
        key: task.key.clone(),
        output_json: br#"{"steps": []}"#.to_vec(),
    };
    client
        .complete_task(traced(answer, &task.traceparent)?)
        .await?;
    collector
        .span("CompleteTask's span", Duration::from_secs(15), |s| {
            s.trace_id == TRACE
                && s.parent_span_id == started.span_id
                && s.attributes.get("rpc.method").map(String::as_str)
                    == Some("/statefabric.state.v1.Tasks/CompleteTask")
        })
        .await?;
    let (code, stderr) = dev.stop_with(nix::sys::signal::Signal::SIGTERM).await?;
    assert_eq!(code, 0, "{stderr}");
    Ok(())
}
