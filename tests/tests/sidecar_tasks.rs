//! The sidecar's `Tasks` API refuses bad input with a clear status and
//! changes nothing: malformed agent types, keys, JSON, limits; unknown
//! definitions and tasks; saga ids in use; answers without a reason.

use nix::sys::signal::Signal;
use statefabric_proto::state::v1 as pb;
use statefabric_proto::state::v1::tasks_client::TasksClient;
use statefabric_tests::process;
use tonic::Code;

/// The refusal's code, after checking it says what was wrong.
fn code<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> Code {
    let status = result.expect_err("refused");
    assert!(
        !status.message().is_empty(),
        "a message says what was wrong"
    );
    status.code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_task_requests_are_refused_clearly() -> anyhow::Result<()> {
    let mut service = process::spawn("fabric", &["dev"], &[])?;
    service.ready().await?;
    let mut client = TasksClient::connect(service.grpc.clone()).await?;

    let start = |definition: &str, id: &str, data: &[u8]| pb::StartSagaRequest {
        definition: definition.into(),
        saga_id: id.into(),
        data_json: data.to_vec(),
    };
    assert_eq!(
        code(client.start_saga(start("", "", b"")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            client
                .start_saga(start("plan-code-critique", "a/b", b""))
                .await
        ),
        Code::InvalidArgument,
        "a saga id with a slash"
    );
    assert_eq!(
        code(
            client
                .start_saga(start("plan-code-critique", "s1", b"[1]"))
                .await
        ),
        Code::InvalidArgument,
        "data that is not an object"
    );
    assert_eq!(
        code(
            client
                .start_saga(start("plan-code-critique", "s1", b"{nope"))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            client
                .start_saga(start("no-such-definition", "s1", b""))
                .await
        ),
        Code::NotFound
    );
    client
        .start_saga(start("plan-code-critique", "s1", br#"{"task": "t"}"#))
        .await?;
    assert_eq!(
        code(
            client
                .start_saga(start("plan-code-critique", "s1", b""))
                .await
        ),
        Code::AlreadyExists
    );

    let poll = |agent: &str, max: u32, wait_ms: u32| pb::PollTasksRequest {
        agent_type: agent.into(),
        max,
        wait_ms,
        worker: String::new(),
    };
    assert_eq!(
        code(client.poll_tasks(poll("", 1, 0)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(client.poll_tasks(poll("plan ner", 1, 0)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(client.poll_tasks(poll("planner", 5000, 0)).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(client.poll_tasks(poll("planner", 1, 600_000)).await),
        Code::InvalidArgument
    );
    let stream = client
        .stream_tasks(pb::StreamTasksRequest {
            agent_type: "planner".into(),
            max_in_flight: 5000,
            worker: String::new(),
        })
        .await;
    assert_eq!(stream.err().map(|s| s.code()), Some(Code::InvalidArgument));

    let task = client
        .poll_tasks(poll("planner", 1, 5000))
        .await?
        .into_inner()
        .tasks
        .pop()
        .expect("the PLAN task");
    let complete = |key: &str, output: &[u8]| pb::CompleteTaskRequest {
        key: key.into(),
        output_json: output.to_vec(),
    };
    assert_eq!(
        code(client.complete_task(complete("nonsense", b"")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(client.complete_task(complete(&task.key, b"{bad")).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(client.complete_task(complete("s1/NOPE/1/1", b"1")).await),
        Code::NotFound
    );
    let fail = pb::FailTaskRequest {
        key: task.key.clone(),
        error: "  ".into(),
    };
    assert_eq!(
        code(client.fail_task(fail).await),
        Code::InvalidArgument,
        "a failure says why"
    );
    assert_eq!(
        code(
            client
                .heartbeat(pb::HeartbeatRequest { key: "x".into() })
                .await
        ),
        Code::InvalidArgument
    );
    // None of that touched the task: it is still out, and can be answered.
    client
        .heartbeat(pb::HeartbeatRequest {
            key: task.key.clone(),
        })
        .await?;
    client
        .complete_task(complete(&task.key, br#"{"plan": 1}"#))
        .await?;
    client
        .complete_task(complete(&task.key, br#"{"plan": 1}"#))
        .await?;
    let next = client
        .poll_tasks(poll("coder", 1, 5000))
        .await?
        .into_inner()
        .tasks;
    assert_eq!(next.len(), 1, "the saga moved on once");
    // A repeat of the answer is fine; a different answer is refused.
    client.complete_task(complete(&task.key, b"{}")).await?;
    let late = pb::FailTaskRequest {
        key: task.key.clone(),
        error: "too late".into(),
    };
    assert_eq!(
        code(client.fail_task(late).await),
        Code::FailedPrecondition,
        "a different answer to a finished attempt"
    );
    let (exit, _) = service.stop_with(Signal::SIGTERM).await?;
    assert_eq!(exit, 0);
    Ok(())
}

/// A worker whose task stream closes (it crashed, or lost its connection)
/// had its unanswered tasks offered to other workers at once, under the
/// same key, not after the step's two-minute lease as a new attempt; tasks
/// it answered stay answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_task_stream_hands_its_unanswered_tasks_on_under_the_same_keys()
-> anyhow::Result<()> {
    use futures::StreamExt;

    let mut service = process::spawn("fabric", &["dev"], &[])?;
    service.ready().await?;
    let mut client = TasksClient::connect(service.grpc.clone()).await?;
    for id in ["handed-on-1", "handed-on-2"] {
        client
            .start_saga(pb::StartSagaRequest {
                definition: "plan-code-critique".into(),
                saga_id: id.into(),
                data_json: br#"{"task": "t"}"#.to_vec(),
            })
            .await?;
    }
    let mut first_worker = TasksClient::connect(service.grpc.clone()).await?;
    let mut stream = first_worker
        .stream_tasks(pb::StreamTasksRequest {
            agent_type: "planner".into(),
            max_in_flight: 2,
            worker: "first".into(),
        })
        .await?
        .into_inner();
    let mut keys = Vec::new();
    while keys.len() < 2 {
        let task = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the stream ended"))??;
        keys.push(task.key);
    }
    keys.sort();
    // One answered, then the worker goes away.
    first_worker
        .complete_task(pb::CompleteTaskRequest {
            key: keys[0].clone(),
            output_json: b"{}".to_vec(),
        })
        .await?;
    drop(stream);
    drop(first_worker);

    let handed_on = client
        .poll_tasks(pb::PollTasksRequest {
            agent_type: "planner".into(),
            max: 10,
            wait_ms: 10_000,
            worker: "second".into(),
        })
        .await?
        .into_inner()
        .tasks;
    let handed: Vec<&str> = handed_on.iter().map(|t| t.key.as_str()).collect();
    assert_eq!(handed, [keys[1].as_str()], "the unanswered one, same key");
    let (exit, _) = service.stop_with(Signal::SIGTERM).await?;
    assert_eq!(exit, 0);
    Ok(())
}
