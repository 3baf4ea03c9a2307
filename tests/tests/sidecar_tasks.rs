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
