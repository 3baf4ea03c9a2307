//! The operator API over HTTP (on `fabric dev` with an operator token): it
//! is authenticated; bad input and actions that do not fit a saga's state
//! get clear 4xx errors and change nothing; pause, amend, resume, retry of a
//! stuck compensation and the stuck filter work; every action is in the
//! saga's history under the operator's name; graphs come as JSON, Mermaid
//! and DOT; the saga metrics count what happened. Agents answer through the
//! sidecar's task API (SDK).

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{Value, json};
use statefabric_sdk::{StateClient, Task, TaskClient};
use statefabric_tests as env;
use statefabric_tests::process::{self, Service};

const TOKEN: &str = "alice-token-0123456789";

const DEFINITION: &str = r#"{
  "name": "ops-test", "version": 1, "start": "A", "stuck_after": "1h",
  "steps": {
    "A": {"agent": "worker", "action": "a", "timeout": "30s",
          "input": {"n": "$/data/n"},
          "retry": {"max_attempts": 1},
          "compensation": {"action": "undo_a"}, "on_success": "B"},
    "B": {"agent": "worker", "action": "b", "timeout": "30s",
          "input": {"n": "$/data/n"},
          "retry": {"max_attempts": 1}, "compensation": "none"}
  }
}"#;

struct Api {
    base: String,
}

impl Api {
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(u16, Value)> {
        let auth = format!("Bearer {TOKEN}");
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
        ];
        let r = env::http_with(
            method,
            &format!("{}{path}", self.base),
            &headers,
            body.map(|b| b.to_string()),
        )
        .await?;
        let value = serde_json::from_str(&r.body).unwrap_or(Value::String(r.body));
        Ok((r.status, value))
    }

    async fn saga(&self, id: &str) -> anyhow::Result<Value> {
        let (status, body) = self.call("GET", &format!("/v1/sagas/{id}"), None).await?;
        anyhow::ensure!(status == 200, "GET {id}: {status} {body}");
        Ok(body)
    }
}

async fn fabric() -> anyhow::Result<Service> {
    fabric_counting_stalled_every("100ms").await
}

async fn fabric_counting_stalled_every(every: &str) -> anyhow::Result<Service> {
    let mut service = process::spawn(
        "fabric",
        &["dev"],
        &[
            ("STATEFABRIC_API__ALLOW_ANONYMOUS", "false"),
            ("STATEFABRIC_API__OPERATORS__ALICE", TOKEN),
            ("STATEFABRIC_SAGAS__STALLED_EVERY", every),
        ],
    )?;
    service.ready().await?;
    Ok(service)
}

async fn next_task(tasks: &mut TaskClient) -> anyhow::Result<Task> {
    let got = tasks.poll("worker", 1, Duration::from_secs(10)).await?;
    got.into_iter()
        .next()
        .ok_or_else(|| anyhow::anyhow!("no task within 10 s"))
}

fn status_of(saga: &Value) -> &str {
    saga["saga"]["instance"]["status"]
        .as_str()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_act_on_sagas_and_bad_input_changes_nothing() -> anyhow::Result<()> {
    let service = fabric().await?;
    let api = Api {
        base: service.api.clone(),
    };
    // Authentication.
    let open = env::http("GET", &format!("{}/v1/sagas", service.api), None, None).await?;
    assert_eq!(open.status, 401, "{}", open.body);
    let wrong = env::http_with(
        "GET",
        &format!("{}/v1/sagas", service.api),
        &[("authorization", "Bearer nope")],
        None,
    )
    .await?;
    assert_eq!(wrong.status, 401);

    // Definitions: refused with the definition and step named, then added.
    let broken = DEFINITION.replace(r#""on_success": "B""#, r#""on_success": "NOWHERE""#);
    let (code, body) = api
        .call(
            "POST",
            "/v1/definitions",
            Some(serde_json::from_str(&broken)?),
        )
        .await?;
    assert_eq!(code, 400, "{body}");
    let message = body["error"].as_str().unwrap_or_default();
    assert!(
        message.contains("ops-test") && message.contains("NOWHERE"),
        "{message}"
    );
    let (code, body) = api
        .call(
            "POST",
            "/v1/definitions",
            Some(serde_json::from_str(DEFINITION)?),
        )
        .await?;
    assert_eq!(code, 201, "{body}");

    // Starting: bad data, unknown definition, then a saga, then its id again.
    let start = |data: Value, def: &str| json!({"tenant": "default", "definition": def, "saga_id": "ops-1", "data": data});
    let (code, body) = api
        .call("POST", "/v1/sagas", Some(start(json!([1]), "ops-test")))
        .await?;
    assert_eq!(code, 400, "{body}");
    let (code, _) = api
        .call("POST", "/v1/sagas", Some(start(json!({}), "nope")))
        .await?;
    assert_eq!(code, 404);
    let (code, body) = api
        .call(
            "POST",
            "/v1/sagas",
            Some(start(json!({"n": 1}), "ops-test")),
        )
        .await?;
    assert_eq!(code, 201, "{body}");
    let (code, _) = api
        .call(
            "POST",
            "/v1/sagas",
            Some(start(json!({"n": 1}), "ops-test")),
        )
        .await?;
    assert_eq!(code, 409, "the id is taken");
    let (code, _) = api.call("GET", "/v1/sagas/no-such-saga", None).await?;
    assert_eq!(code, 404);
    // Ids that cannot name a saga are refused as such, not looked up.
    let (code, body) = api.call("GET", "/v1/sagas/not@a-saga-id", None).await?;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("saga id")),
        "{body}"
    );
    let (code, body) = api
        .call("POST", "/v1/sagas/not@a-saga-id/pause", None)
        .await?;
    assert_eq!(code, 400, "{body}");
    let (code, body) = api.call("GET", "/v1/sagas?tenant=No-Such", None).await?;
    assert_eq!(code, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("tenant id")),
        "{body}"
    );
    let (code, body) = api
        .call(
            "POST",
            "/v1/sagas",
            Some(json!({"tenant": "default", "definition": "ops-test", "saga_id": "a/b", "data": {}})),
        )
        .await?;
    assert_eq!(code, 400, "a saga id with the task key's separator: {body}");

    // Actions that do not fit: refused, nothing changes.
    let before = api.saga("ops-1").await?;
    for (action, body, expected) in [
        ("resume", None, 409),
        ("skip", Some(json!({"output": 1})), 409),
        ("skip", None, 400),
        ("amend", Some(json!({"data": {"n": 2}})), 409),
        ("explode", None, 404),
    ] {
        let (code, answer) = api
            .call("POST", &format!("/v1/sagas/ops-1/{action}"), body)
            .await?;
        assert_eq!(code, expected, "{action}: {answer}");
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let (code, _) = api
        .call("POST", "/v1/sagas/no-such-saga/pause", None)
        .await?;
    assert_eq!(code, 404);
    assert_eq!(
        api.saga("ops-1").await?["saga"]["revision"],
        before["saga"]["revision"]
    );

    // Pause, amend, answer A (held while paused), resume: B sees the new data.
    let client = StateClient::connect(service.grpc.clone()).await?;
    let mut tasks = client.tasks();
    let a = next_task(&mut tasks).await?;
    assert_eq!((a.step.as_str(), a.input["n"].clone()), ("A", json!(1)));
    let (code, _) = api.call("POST", "/v1/sagas/ops-1/pause", None).await?;
    assert_eq!(code, 200);
    let (code, _) = api
        .call("POST", "/v1/sagas/ops-1/amend", Some(json!({"data": [1]})))
        .await?;
    assert_eq!(code, 400, "amended data must be an object");
    let (code, _) = api
        .call(
            "POST",
            "/v1/sagas/ops-1/amend",
            Some(json!({"data": {"n": 2}})),
        )
        .await?;
    assert_eq!(code, 200);
    tasks.complete(&a.key, &json!({"a": "done"})).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        tasks
            .poll("worker", 1, Duration::from_millis(300))
            .await?
            .is_empty(),
        "nothing dispatched while paused"
    );
    let (code, _) = api.call("POST", "/v1/sagas/ops-1/resume", None).await?;
    assert_eq!(code, 200);
    let b = next_task(&mut tasks).await?;
    assert_eq!((b.step.as_str(), b.input["n"].clone()), ("B", json!(2)));
    // A repeat of A's answer is accepted and changes nothing; a different
    // answer to the finished attempt is refused.
    tasks.complete(&a.key, &json!({"a": "again"})).await?;
    let late = tasks.fail(&a.key, "too late").await;
    assert!(late.is_err_and(|e| e.is_conflict()), "A's attempt is over");

    // B fails for good → compensate A; the undo fails → STUCK; retry → done.
    tasks.fail(&b.key, "B cannot").await?;
    let undo = next_task(&mut tasks).await?;
    assert!(undo.compensation && undo.step == "A" && undo.action == "undo_a");
    tasks.fail(&undo.key, "undo failed").await?;
    env::eventually("the saga is STUCK", Duration::from_secs(10), || async {
        Ok((status_of(&api.saga("ops-1").await?) == "STUCK").then_some(()))
    })
    .await?;
    env::eventually(
        "the stalled gauge counts it",
        Duration::from_secs(5),
        || async {
            let metrics = env::http("GET", &format!("{}/metrics", service.admin), None, None)
                .await?
                .body;
            Ok(metrics
                .contains(r#"statefabric_saga_stalled{definition="ops-test"} 1"#)
                .then_some(()))
        },
    )
    .await?;
    let (code, stuck) = api
        .call("GET", "/v1/sagas?stuck=true&definition=ops-test", None)
        .await?;
    assert_eq!(code, 200);
    assert!(
        stuck["sagas"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["saga_id"] == "ops-1"))
    );
    let (code, _) = api.call("POST", "/v1/sagas/ops-1/retry", None).await?;
    assert_eq!(code, 200);
    let again = next_task(&mut tasks).await?;
    assert!(again.compensation && again.attempt == 2, "{again:?}");
    tasks.complete(&again.key, &json!({"undone": true})).await?;
    env::eventually(
        "the saga is COMPENSATED",
        Duration::from_secs(10),
        || async { Ok((status_of(&api.saga("ops-1").await?) == "COMPENSATED").then_some(())) },
    )
    .await?;
    let (code, _) = api.call("POST", "/v1/sagas/ops-1/resume", None).await?;
    assert_eq!(code, 409, "an ended saga takes no action");

    // The audit trail: every action under the operator's name.
    let saga = api.saga("ops-1").await?;
    let by_alice: Vec<&str> = saga["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|h| h["actor"] == "alice")
        .filter_map(|h| h["kind"].as_str())
        .collect();
    assert_eq!(
        by_alice,
        [
            "started",
            "operator_pause",
            "operator_amend",
            "operator_resume",
            "operator_retry"
        ]
    );
    // And in the tenant's audit log, each with its outcome — the refused
    // resume of the ended saga too.
    let db = service.data_dir().join("events.db");
    let audit = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", db.display())).await?;
    let rows: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT actor, action, json_extract(details, '$.outcome') FROM audit_log
          WHERE target = 'ops-1' AND action LIKE 'saga.operator.%' ORDER BY audit_id",
    )
    .fetch_all(&audit)
    .await?;
    let rows: Vec<(&str, &str, &str)> = rows
        .iter()
        .map(|(a, b, c)| (a.as_str(), b.as_str(), c.as_str()))
        .collect();
    let applied: Vec<&str> = rows
        .iter()
        .filter(|(_, _, outcome)| *outcome == "applied")
        .map(|(_, action, _)| *action)
        .collect();
    assert_eq!(
        applied,
        [
            "saga.operator.pause",
            "saga.operator.amend",
            "saga.operator.resume",
            "saga.operator.retry"
        ]
    );
    assert!(
        rows.iter().all(|(actor, _, _)| *actor == "alice"),
        "{rows:?}"
    );
    assert_eq!(
        rows.first().copied(),
        Some(("alice", "saga.operator.resume", "refused")),
        "the first refusal (the saga was running)"
    );
    assert_eq!(
        rows.last().copied(),
        Some(("alice", "saga.operator.resume", "refused")),
        "the last refusal (the saga had ended)"
    );

    // Graphs.
    let (code, graph) = api.call("GET", "/v1/sagas/ops-1/graph", None).await?;
    assert_eq!(code, 200);
    assert_eq!(graph["status"], "COMPENSATED");
    assert!(
        graph["timings"]["A"]["attempts"] == 1 && graph["timings"]["B"]["duration_ms"].is_number()
    );
    let (_, mermaid) = api
        .call("GET", "/v1/sagas/ops-1/graph?format=mermaid", None)
        .await?;
    assert!(
        mermaid.as_str().is_some_and(|m| m.starts_with("flowchart")),
        "{mermaid}"
    );
    let (_, dot) = api
        .call("GET", "/v1/definitions/ops-test/graph?format=dot", None)
        .await?;
    assert!(
        dot.as_str().is_some_and(|d| d.starts_with("digraph")),
        "{dot}"
    );
    let (code, _) = api
        .call("GET", "/v1/sagas/ops-1/graph?format=png", None)
        .await?;
    assert_eq!(code, 400);

    // Metrics.
    let metrics = env::http("GET", &format!("{}/metrics", service.admin), None, None)
        .await?
        .body;
    for line in [
        r#"statefabric_saga_started_total{definition="ops-test"} 1"#,
        r#"statefabric_saga_ended_total{definition="ops-test",outcome="stuck"} 1"#,
        r#"statefabric_saga_ended_total{definition="ops-test",outcome="compensated"} 1"#,
        r#"statefabric_saga_step_retries_total{definition="ops-test",step="A"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }
    let (code, _) = service.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    Ok(())
}

const TIMEOUTS: &str = r#"{
  "name": "timeouts-test", "version": 1, "start": "T",
  "steps": {
    "T": {"agent": "slow", "action": "t", "timeout": "800ms",
          "retry": {"max_attempts": 3, "initial_backoff": "100ms", "max_backoff": "100ms",
                    "multiplier": 1, "jitter": 0},
          "compensation": "none"}
  }
}"#;

/// Adds the `timeouts-test` definition and starts saga `id` of it.
async fn start_timeouts_saga(api: &Api, id: &str) -> anyhow::Result<()> {
    let (code, body) = api
        .call(
            "POST",
            "/v1/definitions",
            Some(serde_json::from_str(TIMEOUTS)?),
        )
        .await?;
    assert_eq!(code, 201, "{body}");
    let start = json!({"tenant": "default", "definition": "timeouts-test", "saga_id": id});
    let (code, body) = api.call("POST", "/v1/sagas", Some(start)).await?;
    assert_eq!(code, 201, "{body}");
    Ok(())
}

/// A task that is neither answered nor heartbeated times out and is retried
/// after its backoff (a new attempt); one that heartbeats outlives its
/// timeout; the late answer to the expired attempt changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_attempts_time_out_and_heartbeats_keep_tasks_alive() -> anyhow::Result<()> {
    let service = fabric().await?;
    let api = Api {
        base: service.api.clone(),
    };
    start_timeouts_saga(&api, "slow-1").await?;
    let client = StateClient::connect(service.grpc.clone()).await?;
    let mut tasks = client.tasks();
    let first = tasks.poll("slow", 1, Duration::from_secs(5)).await?;
    let first = first.into_iter().next().expect("attempt 1");
    assert_eq!(first.attempt, 1);
    // Silence: the deadline passes, the retry comes as attempt 2.
    let second = tasks.poll("slow", 1, Duration::from_secs(5)).await?;
    let second = second.into_iter().next().expect("attempt 2");
    assert_eq!((second.attempt, second.step.as_str()), (2, "T"));
    assert!(
        tasks
            .heartbeat(&first.key)
            .await
            .is_err_and(|e| e.is_conflict()),
        "the expired attempt cannot be renewed"
    );
    // Heartbeats carry attempt 2 well past its 800 ms timeout.
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        tasks.heartbeat(&second.key).await?;
    }
    tasks.complete(&second.key, &json!({"ok": true})).await?;
    let late = tasks.complete(&first.key, &json!({"late": true})).await;
    assert!(late.is_err_and(|e| e.is_conflict()));
    env::eventually("DONE", Duration::from_secs(5), || async {
        Ok((status_of(&api.saga("slow-1").await?) == "DONE").then_some(()))
    })
    .await?;
    let saga = api.saga("slow-1").await?;
    let statuses: Vec<&str> = saga["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["status"].as_str())
        .collect();
    assert_eq!(statuses, ["timed_out", "completed"]);
    assert_eq!(
        saga["saga"]["instance"]["outputs"]["T"],
        json!({"ok": true})
    );
    let metrics = env::http("GET", &format!("{}/metrics", service.admin), None, None)
        .await?
        .body;
    assert!(
        metrics.contains(
            r#"statefabric_saga_step_timeouts_total{definition="timeouts-test",step="T"} 1"#
        ),
        "{metrics}"
    );
    service.stop_with(Signal::SIGTERM).await?;
    Ok(())
}

/// How many passes the engine has run (its pass histogram's count).
async fn engine_passes(service: &Service) -> anyhow::Result<u64> {
    let metrics = env::http("GET", &format!("{}/metrics", service.admin), None, None)
        .await?
        .body;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("statefabric_saga_engine_pass_seconds_count "))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no engine pass count in:\n{metrics}"))
}

/// The embedded engine sleeps while nothing is due instead of looking every
/// tick (its store's signal misses no inbox row), and a saga an operator
/// starts wakes it: the first attempt's 800 ms deadline fires on time
/// although the next stalled count is an hour away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_engine_sleeps_until_a_start_or_a_timer_wakes_it() -> anyhow::Result<()> {
    let service = fabric_counting_stalled_every("1h").await?;
    let api = Api {
        base: service.api.clone(),
    };
    // Start-up passes settle; then two and a half idle seconds (two or
    // three passes with a one-second tick) run none.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = engine_passes(&service).await?;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(engine_passes(&service).await?, before, "passes while idle");
    start_timeouts_saga(&api, "idle-1").await?;
    let client = StateClient::connect(service.grpc.clone()).await?;
    let mut tasks = client.tasks();
    let first = tasks.poll("slow", 1, Duration::from_secs(5)).await?;
    assert_eq!(first.first().map(|t| t.attempt), Some(1));
    // Unanswered, attempt 1 times out and attempt 2 follows its backoff.
    let second = tasks.poll("slow", 1, Duration::from_secs(5)).await?;
    assert_eq!(second.first().map(|t| t.attempt), Some(2));
    service.stop_with(Signal::SIGTERM).await?;
    Ok(())
}

fn authed<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {TOKEN}").parse().expect("ascii"),
    );
    request
}

/// The same operations over gRPC, with gRPC codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grpc_operator_api_authenticates_and_maps_errors() -> anyhow::Result<()> {
    use statefabric_proto::control::v1 as pb;
    use statefabric_proto::control::v1::sagas_client::SagasClient;
    use tonic::Code;

    let service = fabric().await?;
    let mut client = SagasClient::connect(service.api_grpc.clone()).await?;
    let open = client.list_sagas(pb::ListSagasRequest::default()).await;
    assert_eq!(open.err().map(|s| s.code()), Some(Code::Unauthenticated));

    let started = client
        .start_saga(authed(pb::StartSagaRequest {
            tenant: "default".into(),
            definition: "plan-code-critique".into(),
            saga_id: "grpc-1".into(),
            data_json: br#"{"task": "x"}"#.to_vec(),
        }))
        .await?
        .into_inner();
    assert_eq!(
        (started.saga_id.as_str(), started.status.as_str()),
        ("grpc-1", "RUNNING")
    );
    let again = client
        .start_saga(authed(pb::StartSagaRequest {
            tenant: "default".into(),
            definition: "plan-code-critique".into(),
            saga_id: "grpc-1".into(),
            data_json: Vec::new(),
        }))
        .await;
    assert_eq!(again.err().map(|s| s.code()), Some(Code::AlreadyExists));
    let missing = client
        .get_saga(authed(pb::GetSagaRequest {
            saga_id: "nope".into(),
        }))
        .await;
    assert_eq!(missing.err().map(|s| s.code()), Some(Code::NotFound));
    let act = |action: pb::Action, data: &[u8]| {
        authed(pb::ActRequest {
            saga_id: "grpc-1".into(),
            action: action as i32,
            output_json: Vec::new(),
            data_json: data.to_vec(),
        })
    };
    let resume = client.act(act(pb::Action::Resume, b"")).await;
    assert_eq!(
        resume.err().map(|s| s.code()),
        Some(Code::FailedPrecondition)
    );
    let unspecified = client.act(act(pb::Action::Unspecified, b"")).await;
    assert_eq!(
        unspecified.err().map(|s| s.code()),
        Some(Code::InvalidArgument)
    );
    let paused = client.act(act(pb::Action::Pause, b"")).await?.into_inner();
    assert!(paused.paused);
    let bad = client.act(act(pb::Action::Amend, b"[1]")).await;
    assert_eq!(bad.err().map(|s| s.code()), Some(Code::InvalidArgument));
    client
        .act(act(pb::Action::Amend, br#"{"task": "y"}"#))
        .await?;
    let listed = client
        .list_sagas(authed(pb::ListSagasRequest {
            status: "running".into(),
            ..Default::default()
        }))
        .await?
        .into_inner();
    assert!(
        listed
            .sagas
            .iter()
            .any(|s| s.saga_id == "grpc-1" && s.paused)
    );
    let detail = client
        .get_saga(authed(pb::GetSagaRequest {
            saga_id: "grpc-1".into(),
        }))
        .await?
        .into_inner();
    let detail: Value = serde_json::from_slice(&detail.detail_json)?;
    assert_eq!(detail["saga"]["instance"]["data"], json!({"task": "y"}));
    let graph = client
        .get_graph(authed(pb::GetGraphRequest {
            saga_id: "grpc-1".into(),
            format: "mermaid".into(),
            ..Default::default()
        }))
        .await?
        .into_inner();
    assert!(graph.body.starts_with("flowchart"), "{}", graph.body);
    // Forced compensation (nothing completed yet: it ends at once), then
    // nothing more; abort another.
    let compensated = client
        .act(act(pb::Action::Compensate, b""))
        .await?
        .into_inner();
    assert_eq!(compensated.status, "COMPENSATED");
    let after = client.act(act(pb::Action::Abort, b"")).await;
    assert_eq!(
        after.err().map(|s| s.code()),
        Some(Code::FailedPrecondition)
    );
    let other = client
        .start_saga(authed(pb::StartSagaRequest {
            tenant: "default".into(),
            definition: "plan-code-critique".into(),
            saga_id: "grpc-2".into(),
            data_json: Vec::new(),
        }))
        .await?
        .into_inner();
    let aborted = client
        .act(authed(pb::ActRequest {
            saga_id: other.saga_id,
            action: pb::Action::Abort as i32,
            output_json: Vec::new(),
            data_json: Vec::new(),
        }))
        .await?
        .into_inner();
    assert_eq!(aborted.status, "ABORTED");
    service.stop_with(Signal::SIGTERM).await?;
    Ok(())
}

/// `fabric sagas …` against the operator API: readable output, and the
/// API's error with a failing exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_wraps_the_operator_api() -> anyhow::Result<()> {
    let service = fabric().await?;
    let fabric = |args: &[&str]| {
        let output = std::process::Command::new(env::binary("fabric"))
            .arg("sagas")
            .args(["--api", &service.api, "--token", TOKEN])
            .args(args)
            .output()
            .expect("fabric runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let (ok, out, err) = fabric(&[
        "start",
        "--tenant",
        "default",
        "--id",
        "cli-1",
        "--data",
        r#"{"task":"x"}"#,
    ]);
    assert!(ok, "{err}");
    assert_eq!(out, "started cli-1\n");
    let (ok, out, _) = fabric(&["list"]);
    assert!(
        ok && out.starts_with("SAGA") && out.contains("cli-1") && out.contains("RUNNING"),
        "{out}"
    );
    let (ok, out, _) = fabric(&["pause", "cli-1"]);
    assert!(ok && out == "saga cli-1 is RUNNING (paused)\n", "{out}");
    let (ok, out, _) = fabric(&["resume", "cli-1"]);
    assert!(ok && out == "saga cli-1 is RUNNING\n", "{out}");
    let (ok, _, err) = fabric(&["resume", "cli-1"]);
    assert!(
        !ok && err.contains("409") && err.contains("not paused"),
        "{err}"
    );
    let (ok, _, err) = fabric(&["skip", "cli-1", "--output", "not json"]);
    assert!(!ok && err.contains("--output is not valid JSON"), "{err}");
    let (ok, out, _) = fabric(&["show", "cli-1"]);
    assert!(
        ok && out.contains("tasks:")
            && out.contains("cli-1/PLAN/1/1")
            && out.contains("operator_pause"),
        "{out}"
    );
    let (ok, out, _) = fabric(&["graph", "cli-1", "--format", "dot"]);
    assert!(ok && out.starts_with("digraph"), "{out}");
    let (ok, _, err) = fabric(&["show", "nope"]);
    assert!(!ok && err.contains("404"), "{err}");
    service.stop_with(Signal::SIGTERM).await?;
    Ok(())
}
