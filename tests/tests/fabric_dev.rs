//! `fabric dev` as a process: the demo reaches its expected end states
//! (checked through the operator API), a restart resumes unfinished sagas,
//! and the saga page draws a saga in headless Chromium.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;
use statefabric_tests as env;
use statefabric_tests::process::{self, Service};

const EXPECTED: &[(&str, &str)] = &[
    ("demo-1", "DONE"),
    ("demo-2", "DONE"),
    ("demo-3", "DONE"),
    ("demo-4", "COMPENSATED"),
];

async fn fabric_dev(data: &std::path::Path) -> anyhow::Result<Service> {
    let path = data.join("events.db");
    let path = path.to_string_lossy();
    let mut service = process::spawn(
        "fabric",
        &["dev", "--demo"],
        &[("STATEFABRIC_STORAGE__SQLITE__PATH", path.as_ref())],
    )?;
    service.ready().await?;
    Ok(service)
}

async fn saga(service: &Service, id: &str) -> anyhow::Result<Option<Value>> {
    let response = env::http("GET", &format!("{}/v1/sagas/{id}", service.api), None, None).await?;
    match response.status {
        200 => Ok(Some(serde_json::from_str(&response.body)?)),
        404 => Ok(None),
        other => anyhow::bail!("GET saga {id}: {other} {}", response.body),
    }
}

async fn status(service: &Service, id: &str) -> anyhow::Result<Option<String>> {
    Ok(saga(service, id)
        .await?
        .and_then(|v| v["saga"]["instance"]["status"].as_str().map(str::to_owned)))
}

async fn all_ended(service: &Service) -> anyhow::Result<()> {
    env::eventually("every demo saga ends", Duration::from_secs(60), || async {
        for (id, _) in EXPECTED {
            match status(service, id).await?.as_deref() {
                Some("DONE" | "COMPENSATED" | "FAILED" | "ABORTED") => {}
                _ => return Ok(None),
            }
        }
        Ok(Some(()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_ends_as_expected_and_a_restart_resumes() -> anyhow::Result<()> {
    let data = tempfile::tempdir()?;
    let first = fabric_dev(data.path()).await?;
    // Stop while the migration saga is still retrying its CODE step.
    env::eventually("demo-4 is under way", Duration::from_secs(30), || async {
        let saga = saga(&first, "demo-4").await?;
        let failed_once = saga.as_ref().is_some_and(|s| {
            s["tasks"].as_array().is_some_and(|t| {
                t.iter()
                    .any(|t| t["step"] == "CODE" && t["status"] == "failed")
            })
        });
        Ok(failed_once.then_some(()))
    })
    .await?;
    assert_eq!(status(&first, "demo-4").await?.as_deref(), Some("RUNNING"));
    let (code, _) = first.stop_with(Signal::SIGINT).await?;
    assert_eq!(code, 0, "Ctrl-C shuts down cleanly");

    let second = fabric_dev(data.path()).await?;
    all_ended(&second).await?;
    for (id, expected) in EXPECTED {
        assert_eq!(
            status(&second, id).await?.as_deref(),
            Some(*expected),
            "{id}"
        );
    }
    // The critic sent demo-2 back once: CODE ran twice, CRITIQUE twice.
    let two = saga(&second, "demo-2").await?.expect("demo-2");
    let done: Vec<(String, u64)> = two["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["status"] == "completed")
        .map(|t| {
            (
                t["step"].as_str().unwrap_or_default().to_owned(),
                t["visit"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        done,
        [
            ("PLAN", 1),
            ("CODE", 1),
            ("CRITIQUE", 1),
            ("CODE", 2),
            ("CRITIQUE", 2)
        ]
        .map(|(s, v)| (s.to_owned(), v))
        .to_vec()
    );
    // The migration was retried to its limit, then the plan discarded.
    let four = saga(&second, "demo-4").await?.expect("demo-4");
    let tasks = four["tasks"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        tasks
            .iter()
            .filter(|t| t["step"] == "CODE" && t["status"] == "failed")
            .count(),
        3
    );
    assert!(
        tasks.iter().any(|t| t["step"] == "PLAN"
            && t["compensation"] == true
            && t["status"] == "completed")
    );

    page_draws_the_saga(&second).await?;
    let (code, _) = second.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    Ok(())
}

/// Headless Chromium runs the page's script against the live API.
async fn page_draws_the_saga(service: &Service) -> anyhow::Result<()> {
    let url = format!("{}/ui/sagas/demo-2", service.api);
    // A profile of its own: the same first-run state every time, whatever
    // earlier runs (or a person's browser) left in ~/.config/chromium.
    let profile = tempfile::tempdir()?;
    let output = tokio::process::Command::new("chromium")
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--dump-dom",
            &url,
        ])
        .output()
        .await?;
    let dom = String::from_utf8_lossy(&output.stdout);
    assert!(
        dom.contains(r#"data-status="DONE""#),
        "the page shows the saga's status; stderr: {}\n{dom}",
        String::from_utf8_lossy(&output.stderr)
    );
    for step in ["PLAN", "CODE", "CRITIQUE"] {
        assert!(
            dom.contains(&format!(r#"data-id="{step}" data-state="completed""#)),
            "{step} drawn as completed:\n{dom}"
        );
    }
    assert!(
        dom.contains(r#"data-saga="demo-4""#),
        "the list shows the other sagas"
    );
    Ok(())
}

/// The SDK's agent example (workers and a saga) runs against `fabric dev`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_agent_example_runs_a_saga() -> anyhow::Result<()> {
    let mut service = process::spawn("fabric", &["dev"], &[])?;
    service.ready().await?;
    let stdout = env::run_example("agent", &service.grpc).await?;
    for line in [
        "planner plan",
        "coder code",
        "critic critique",
        "critique approved",
    ] {
        assert!(stdout.contains(line), "{line}:\n{stdout}");
    }
    let (code, _) = service.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);
    Ok(())
}

/// `fabric dev` reads the mesh resources from local files, the same
/// documents as on a cluster: the FabricConfig's session namespaces apply.
#[tokio::test]
async fn mesh_resources_from_local_files_configure_fabric_dev() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        "apiVersion: statefabric.io/v1alpha1\nkind: FabricConfig\nmetadata: {name: laptop}\n\
         spec: {default: true, sessions: {scratch: {ttl: 20m}}}\n",
    )?;
    let config = dir.path().join("dev.toml");
    std::fs::write(
        &config,
        format!("[mesh]\nfiles = [{:?}]\n", mesh.display().to_string()),
    )?;
    let config = config.display().to_string();
    let mut service = process::spawn("fabric", &["dev", "--config", &config], &[])?;
    service.ready().await?;
    let mut sessions = statefabric_sdk::StateClient::connect(service.grpc.clone())
        .await?
        .sessions();
    let left = sessions.put("scratch", "s", b"v".to_vec(), None).await?;
    assert!(
        left <= Duration::from_secs(1200) && left > Duration::from_secs(1190),
        "{left:?}"
    );
    let (code, _) = service.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0);

    // A file that is not a mesh document stops it with the reason.
    std::fs::write(&mesh, "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")?;
    let mut bad = process::spawn("fabric", &["dev", "--config", &config], &[])?;
    let status = tokio::time::timeout(Duration::from_secs(20), bad.child.wait()).await??;
    assert!(!status.success());
    Ok(())
}
