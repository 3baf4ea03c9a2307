//! Planner, Coder and Critic test agents: SDK clients of a sidecar that
//! answer every task after `work` (the critic approves, the others echo
//! their input), for the saga tests and the saga benchmark.

use std::time::Duration;

use serde_json::{Value, json};
use statefabric_sdk::{StateClient, Task};
use tokio_util::sync::CancellationToken;

/// Starts the three agents on `client`, each with up to `concurrency` tasks
/// at once, until `stop`; `seen` is called with every task first.
pub fn approving<F>(
    client: &StateClient,
    concurrency: u32,
    work: Duration,
    stop: &CancellationToken,
    seen: F,
) where
    F: Fn(&Task) + Clone + Send + Sync + 'static,
{
    for agent in ["planner", "coder", "critic"] {
        let tasks = client.tasks();
        let stop = stop.clone();
        let seen = seen.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let seen = seen.clone();
                let handler = move |task: Task| {
                    seen(&task);
                    async move {
                        if !work.is_zero() {
                            tokio::time::sleep(work).await;
                        }
                        Ok::<Value, String>(if task.action == "critique" {
                            json!({"verdict": "approved"})
                        } else {
                            json!({"by": task.agent_type, "input": task.input})
                        })
                    }
                };
                if tasks
                    .work(agent, concurrency, stop.clone(), handler)
                    .await
                    .is_err()
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
    }
}
