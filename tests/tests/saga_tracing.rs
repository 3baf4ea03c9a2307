//! One saga, one trace: a saga started in a caller's trace context hands
//! that context (its StartSaga span's) to its tasks, and the answer sent in
//! it joins the trace, as the spans a real OTLP collector receives show.
//! The SDKs send the task's context with every call made for it — the
//! answer, heartbeats and egress calls (`egress_tracing.rs` shows an egress
//! call joining the trace it carries). Over the Kafka transport too: the
//! task command carries the saga's context through the outbox, the relay
//! and Kafka to the agent's sidecar, and the reply carries the answer's
//! back to the engine, whose consumer continues it.

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
    // The engine's transitions are spans of the saga's trace: its start
    // and the answer's.
    for event in ["started", "completed"] {
        collector
            .span(
                &format!("the {event} transition"),
                Duration::from_secs(15),
                |s| {
                    s.trace_id == TRACE
                        && s.name == "saga.transition"
                        && s.attributes.get("saga.event").map(String::as_str) == Some(event)
                        && s.attributes.get("saga.id") == Some(&saga)
                },
            )
            .await?;
    }
    let (code, stderr) = dev.stop_with(nix::sys::signal::Signal::SIGTERM).await?;
    assert_eq!(code, 0, "{stderr}");
    Ok(())
}

/// The same over the Kafka transport: the outbox row, the relay's message
/// and the sidecar's task carry the saga's trace, and the engine's reply
/// consumer continues the answer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_kafka_a_sagas_tasks_and_replies_stay_in_its_trace() -> anyhow::Result<()> {
    let collector = Collector::start().await?;
    let run = uuid::Uuid::new_v4().simple().to_string();
    let lease = format!("sagas-traced-{run}");
    let txid = format!("statefabric-outbox-relay-traced-{run}");
    let mut vars = process::relay_vars(&lease, &txid);
    vars.extend(export_vars(&collector));
    vars.extend([
        ("STATEFABRIC_SAGAS__TRANSPORT", "kafka".to_owned()),
        ("STATEFABRIC_API__ALLOW_ANONYMOUS", "true".to_owned()),
    ]);
    let mut cp = process::spawn("statefabric-control-plane", &[], &process::borrowed(&vars))?;
    cp.ready().await?;
    let tenant = format!("t{}", &run[..12]);
    statefabric_db::pg::create_tenant(
        &statefabric_tests::pg_admin_url(),
        &statefabric_domain::TenantId::new(tenant.clone())?,
        "",
    )
    .await?;
    let (bootstrap, registry) = (
        statefabric_tests::kafka_bootstrap(),
        statefabric_tests::registry_url(),
    );
    let login = statefabric_tests::kafka::Principal::Sidecar.process_env();
    let exported = export_vars(&collector);
    let mut sidecar_vars = vec![
        ("STATEFABRIC_TASKS__TRANSPORT", "kafka"),
        ("STATEFABRIC_TASKS__KAFKA_BOOTSTRAP", bootstrap.as_str()),
        ("STATEFABRIC_TASKS__REGISTRY_URL", registry.as_str()),
        (login[0].0, login[0].1.as_str()),
        (login[1].0, login[1].1.as_str()),
    ];
    sidecar_vars.extend(process::borrowed(&exported));
    let sidecar = process::sidecar(
        process::Storage::Postgres,
        &tenant,
        "traced-agents",
        &sidecar_vars,
    )
    .await?;
    let mut client = TasksClient::connect(sidecar.grpc.clone()).await?;
    let start = pb::StartSagaRequest {
        definition: "plan-code-critique".into(),
        saga_id: format!("{tenant}-traced"),
        data_json: br#"{"task": "t"}"#.to_vec(),
    };
    let saga = client
        .start_saga(traced(start, &format!("00-{TRACE}-{CALLER}-01"))?)
        .await?
        .into_inner()
        .saga_id;
    let task =
        statefabric_tests::eventually("the PLAN task from Kafka", Duration::from_secs(60), || {
            let mut client = client.clone();
            let saga = saga.clone();
            async move {
                let tasks = client
                    .poll_tasks(pb::PollTasksRequest {
                        agent_type: "planner".into(),
                        max: 1,
                        wait_ms: 2_000,
                        worker: String::new(),
                    })
                    .await?
                    .into_inner()
                    .tasks;
                Ok(tasks.into_iter().find(|t| t.saga_id == saga))
            }
        })
        .await?;
    assert_eq!(
        task.traceparent.split('-').nth(1),
        Some(TRACE),
        "the command brought the saga's trace: {task:?}"
    );
    let answer = pb::CompleteTaskRequest {
        key: task.key.clone(),
        output_json: br#"{"steps": []}"#.to_vec(),
    };
    client
        .complete_task(traced(answer, &task.traceparent)?)
        .await?;
    let consumed = collector
        .span(
            "the engine's consumption of the reply",
            Duration::from_secs(30),
            |s| {
                s.trace_id == TRACE
                    && s.name == "kafka.consume"
                    && s.attributes
                        .get("messaging.destination.name")
                        .map(String::as_str)
                        == Some("sagas.replies")
            },
        )
        .await?;
    assert!(
        !consumed.parent_span_id.is_empty(),
        "a child of the answer's span"
    );
    for service in [sidecar, cp] {
        let (code, stderr) = service.stop_with(nix::sys::signal::Signal::SIGTERM).await?;
        assert_eq!(code, 0, "{stderr}");
    }
    Ok(())
}
