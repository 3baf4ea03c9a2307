//! A tour of the SDK against a running sidecar.
//!
//! Start one in embedded mode (SQLite, no servers):
//!   cargo run -p statefabric-sidecar
//! then:
//!   cargo run -p statefabric-sdk --example quickstart [http://127.0.0.1:7400]

use futures::StreamExt;
use serde_json::json;
use statefabric_sdk::{Causality, Expected, NewEvent, StateClient, causality};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let endpoint = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "http://127.0.0.1:7400".to_owned());
    let mut client = StateClient::connect(endpoint).await?;
    let task = format!("task-{}", uuid::Uuid::new_v4().simple());

    // Create the stream: NoStream fails if it already exists.
    let created = client
        .append(
            &task,
            "task",
            Expected::NoStream,
            vec![NewEvent::json(
                "TaskCreated",
                &json!({"title": "make the tests pass"}),
            )?],
        )
        .await?;
    println!("created {task} at version {}", created.last_version);

    // Optimistic concurrency: write against the version we read.
    let planned = client
        .append(
            &task,
            "task",
            Expected::Exact(created.last_version),
            vec![NewEvent::json(
                "PlanDrafted",
                &json!({"steps": ["reproduce", "fix", "verify"]}),
            )?],
        )
        .await?;
    let stale = client
        .append(
            &task,
            "task",
            Expected::Exact(created.last_version),
            vec![NewEvent::json("PlanDrafted", &json!({"steps": []}))?],
        )
        .await;
    match stale {
        Err(e) if e.is_conflict() => println!("stale write refused: {e}"),
        other => anyhow::bail!("expected a conflict, got {other:?}"),
    }

    // Idempotency: the retry returns the first result and writes nothing.
    let event = || NewEvent::json("TaskStarted", &json!({"by": "coder"}));
    let first = client
        .append_idempotent(
            "start-once",
            &task,
            "task",
            Expected::Exact(planned.last_version),
            vec![event()?],
        )
        .await?;
    let retry = client
        .append_idempotent(
            "start-once",
            &task,
            "task",
            Expected::Exact(planned.last_version),
            vec![event()?],
        )
        .await?;
    println!(
        "retry replayed: {} (same version {})",
        retry.replayed,
        retry.last_version == first.last_version
    );

    // Read back and compare causality.
    let events = client.read_stream(&task, 1, 100).await?;
    for e in &events {
        println!("  v{} {} {}", e.stream_version, e.event_type, e.data);
    }
    if let [a, b, ..] = events.as_slice() {
        assert_eq!(causality(a, b), Causality::Before);
    }

    // Follow the feed from the beginning; stop after this task's events.
    let mut feed = client.subscribe_all(None).await?;
    let mut seen = 0;
    while let Some(event) = feed.next().await {
        let event = event?;
        if event.stream_id == task {
            seen += 1;
            if seen == events.len() {
                break;
            }
        }
    }
    println!("feed delivered all {seen} events of {task}");
    Ok(())
}
