//! An agent fleet in one program: Planner, Coder and Critic workers on the
//! SDK's task API, and one Planner → Coder → Critic saga for them.
//!
//! Needs a saga engine behind the sidecar; the embedded all-in-one has one:
//!   cargo run -p statefabric-cli --no-default-features -- dev
//! then:
//!   cargo run -p statefabric-sdk --example agent [http://127.0.0.1:7400]

use std::time::Duration;

use serde_json::{Value, json};
use statefabric_sdk::{StateClient, Task};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What each agent type does. A real agent would call a model here; the
/// task's key is its idempotency key, so a repeat must have no second
/// effect.
async fn act(task: Task) -> Result<Value, String> {
    match task.action.as_str() {
        "plan" => Ok(json!({"steps": ["write it", "test it"], "for": task.input["task"]})),
        "code" => Ok(
            json!({"change": format!("patch for {}", task.input["task"]), "revision": task.visit}),
        ),
        "critique" => Ok(json!({"verdict": "approved"})),
        // Compensations: undo what the step did.
        "discard_plan" | "revert_change" => Ok(json!({"undone": true})),
        other => Err(format!("unknown action {other}")),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let endpoint = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:7400".to_owned());
    let client = StateClient::connect(endpoint).await?;
    let stop = CancellationToken::new();
    let (done, mut handled) = mpsc::unbounded_channel::<String>();
    for agent in ["planner", "coder", "critic"] {
        let tasks = client.tasks();
        let stop = stop.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let handler = move |task: Task| {
                let done = done.clone();
                async move {
                    let line = format!("{} {} ({})", task.agent_type, task.action, task.key);
                    let answer = act(task).await;
                    let _ = done.send(line);
                    answer
                }
            };
            // Heartbeats go out while a handler runs; answers go back when
            // it returns.
            tasks.work(agent, 4, stop, handler).await
        });
    }
    let saga = client
        .tasks()
        .start_saga(
            "plan-code-critique",
            None,
            &json!({"task": "add a health check"}),
        )
        .await?;
    println!("started saga {saga}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while let Ok(Some(line)) = tokio::time::timeout_at(deadline, handled.recv()).await {
        println!("{line}");
        if line.starts_with("critic critique") && line.contains(&saga) {
            println!("critique approved: saga {saga} is done");
            break;
        }
    }
    stop.cancel();
    Ok(())
}
