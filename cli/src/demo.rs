//! `fabric dev --demo`: Planner, Coder and Critic agents and four sample
//! sagas, with a live progress view.
//!
//! The agents are ordinary SDK clients of the local sidecar — they stream
//! their agent type's tasks and answer them ([`TaskClient::work`]) — and are
//! deterministic, so they need no model: the planner always plans, the
//! critic sends the flaky-test change back once, and the coder refuses the
//! database migration on every attempt, so that saga retries, gives up and
//! compensates (the plan is discarded). Sample sagas have fixed ids: started
//! again after a restart, they are recognised and simply resume.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use statefabric_domain::SagaId;
use statefabric_saga_engine::Engine;
use statefabric_saga_store::{TaskRow, TaskStatus};
use statefabric_sdk::{StateClient, Task, TaskClient};
use tokio_util::sync::CancellationToken;

/// (saga id, task, expected end).
pub(crate) const SAMPLES: &[(&str, &str, &str)] = &[
    ("demo-1", "add a health endpoint", "DONE"),
    ("demo-2", "fix the flaky login test", "DONE"),
    ("demo-3", "rename the billing module", "DONE"),
    ("demo-4", "migrate the production database", "COMPENSATED"),
];

/// Each step takes this long, so progress is visible.
const WORK: Duration = Duration::from_millis(400);

async fn planner(task: Task) -> Result<Value, String> {
    tokio::time::sleep(WORK).await;
    match task.action.as_str() {
        "plan" => Ok(json!({
            "steps": ["read the code", "make the change", "run the tests"],
            "for": task.input["task"],
        })),
        "discard_plan" => Ok(json!({"discarded": true})),
        other => Err(format!("the planner cannot {other}")),
    }
}

async fn coder(task: Task) -> Result<Value, String> {
    tokio::time::sleep(WORK).await;
    let what = task.input["task"].as_str().unwrap_or_default().to_owned();
    match task.action.as_str() {
        "code" if what.contains("migrate") => {
            Err("refusing to migrate a production database without a human".into())
        }
        "code" => Ok(json!({
            "change": format!("patch for {what}"),
            "revision": task.visit,
            "addressed": task.input["critique"]["notes"],
        })),
        "revert_change" => Ok(json!({"reverted": true, "locks_released": true})),
        other => Err(format!("the coder cannot {other}")),
    }
}

async fn critic(task: Task) -> Result<Value, String> {
    tokio::time::sleep(WORK).await;
    let what = task.input["task"].as_str().unwrap_or_default();
    let revision = task.input["change"]["revision"].as_u64().unwrap_or(1);
    if what.contains("flaky") && revision < 2 {
        return Ok(json!({
            "verdict": "changes_requested",
            "notes": "retry the login with a fresh session instead of sleeping",
        }));
    }
    Ok(json!({"verdict": "approved"}))
}

async fn connect(sidecar: &str, stop: &CancellationToken) -> Option<StateClient> {
    loop {
        if let Ok(client) = StateClient::connect(sidecar.to_owned()).await {
            return Some(client);
        }
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

fn agent<H, F>(tasks: &TaskClient, agent_type: &'static str, stop: &CancellationToken, handler: H)
where
    H: Fn(Task) -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<Value, String>> + Send + 'static,
{
    let tasks = tasks.clone();
    let stop = stop.clone();
    tokio::spawn(async move {
        while !stop.is_cancelled() {
            let worked = tasks
                .work(agent_type, 8, stop.clone(), handler.clone())
                .await;
            if let Err(err) = worked {
                tracing::warn!(agent = agent_type, error = %err, "demo agent reconnecting");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    });
}

pub(crate) async fn run(
    sidecar: String,
    engine: Arc<Engine>,
    page: String,
    tenant: String,
    stop: CancellationToken,
) {
    let Some(client) = connect(&sidecar, &stop).await else {
        return;
    };
    let mut tasks = client.tasks();
    agent(&tasks, "planner", &stop, planner);
    agent(&tasks, "coder", &stop, coder);
    agent(&tasks, "critic", &stop, critic);
    for (id, what, _) in SAMPLES {
        match tasks
            .start_saga("plan-code-critique", Some(id), &json!({"task": what}))
            .await
        {
            Ok(_) => {}
            // Started by an earlier run: it resumes where it was.
            Err(e) if e.to_string().contains("exists") => {}
            Err(e) => tracing::warn!(saga = id, error = %e, "cannot start a demo saga"),
        }
    }
    println!("Saga page: {page}   (tenant {tenant})");
    let view = Progress::new(std::io::stdout().is_terminal());
    view.follow(&engine, &stop).await;
}

struct Progress {
    tty: bool,
}

fn symbol(status: TaskStatus) -> &'static str {
    match status {
        TaskStatus::Dispatched => "…",
        TaskStatus::Completed => "✓",
        TaskStatus::Failed => "✗",
        TaskStatus::TimedOut => "⌛",
        TaskStatus::Cancelled => "–",
    }
}

fn trail(tasks: &[TaskRow]) -> String {
    tasks
        .iter()
        .map(|t| {
            let undo = if t.compensation { "undo " } else { "" };
            format!("{undo}{}{}", t.step, symbol(t.status))
        })
        .collect::<Vec<_>>()
        .join(" → ")
}

impl Progress {
    fn new(tty: bool) -> Self {
        Self { tty }
    }

    /// Redraws the block in a terminal, or prints the lines that changed
    /// into a pipe; returns the lines now drawn.
    fn draw(&self, lines: &[String], last: &[String], drawn: usize) -> usize {
        let mut out = std::io::stdout().lock();
        if self.tty {
            if drawn > 0 {
                let _ = write!(out, "\x1b[{drawn}A");
            }
            for line in lines {
                let _ = writeln!(out, "\x1b[2K{line}");
            }
        } else {
            for (i, line) in lines.iter().enumerate() {
                if last.get(i) != Some(line) {
                    let _ = writeln!(out, "{line}");
                }
            }
        }
        let _ = out.flush();
        lines.len()
    }

    /// Redraws (terminal) or prints changes (pipe) until every sample saga
    /// has ended, then prints a summary.
    async fn follow(&self, engine: &Engine, stop: &CancellationToken) {
        // The sample ids are valid saga ids (the sidecar accepted them).
        let samples: Vec<(SagaId, &str, &str)> = SAMPLES
            .iter()
            .filter_map(|(id, what, expected)| Some((SagaId::new(*id).ok()?, *what, *expected)))
            .collect();
        let mut last: Vec<String> = Vec::new();
        let mut drawn = 0;
        loop {
            let mut lines = Vec::new();
            let mut ended = 0;
            for (id, what, _) in &samples {
                let store = engine.store();
                let (status, trail) = match (store.load(id).await, store.tasks(id).await) {
                    (Ok(Some(saga)), Ok(tasks)) => {
                        if saga.instance.status.is_final() {
                            ended += 1;
                        }
                        (saga.instance.status.to_string(), trail(&tasks))
                    }
                    _ => ("STARTING".to_owned(), String::new()),
                };
                lines.push(format!(
                    "{:<7} {what:<34} {status:<12} {trail}",
                    id.as_str()
                ));
            }
            drawn = self.draw(&lines, &last, drawn);
            last = lines;
            if ended == samples.len() {
                break;
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
        let mut summary = Vec::new();
        for (id, _, expected) in &samples {
            let status = match engine.store().load(id).await {
                Ok(Some(saga)) => saga.instance.status.to_string(),
                _ => "?".into(),
            };
            let mark = if status == *expected {
                "as expected"
            } else {
                "UNEXPECTED"
            };
            summary.push(format!("  {id}: {status} ({mark})"));
        }
        println!(
            "Demo finished:\n{}\nThe fabric keeps running; Ctrl-C to stop.",
            summary.join("\n")
        );
    }
}
