//! The real binaries as processes: they start, answer their probes and
//! metrics, refuse a bad configuration with a message naming the key, and exit
//! 0 within their drain deadline on SIGTERM and SIGINT.

use anyhow::Context;
use nix::sys::signal::Signal;
use statefabric_tests as env;
use statefabric_tests::process::spawn;
use tokio::process::Command;

/// Every long-running binary, with the arguments that start it.
const SERVICES: &[(&str, &[&str])] = &[
    ("statefabric-sidecar", &[]),
    ("statefabric-control-plane", &[]),
    ("statefabric-injector", &[]),
    ("fabric", &["dev"]),
];

/// What a binary needs beyond the defaults to start here: the injector
/// watches namespaces on the test API server and serves TLS.
fn needs(binary: &str) -> Vec<(&'static str, String)> {
    match binary {
        "statefabric-injector" => {
            let pki = env::kube::pki_dir();
            vec![
                (
                    "KUBECONFIG",
                    env::kube::kubeconfig_path().display().to_string(),
                ),
                (
                    "STATEFABRIC_WEBHOOK__LISTEN",
                    format!("127.0.0.1:{}", env::free_port()),
                ),
                (
                    "STATEFABRIC_WEBHOOK__TLS_CERT",
                    pki.join("mesh.crt").display().to_string(),
                ),
                (
                    "STATEFABRIC_WEBHOOK__TLS_KEY",
                    pki.join("mesh.key").display().to_string(),
                ),
            ]
        }
        _ => Vec::new(),
    }
}

#[tokio::test]
async fn each_binary_serves_probes_and_metrics_then_exits_0_on_sigterm() -> anyhow::Result<()> {
    for (binary, args) in SERVICES {
        let needed = needs(binary);
        let mut running = spawn(binary, args, &statefabric_tests::process::borrowed(&needed))?;
        running
            .ready()
            .await
            .with_context(|| format!("{binary} never became ready"))?;

        let live = env::http(
            "GET",
            &format!("{}/healthz/live", running.admin),
            None,
            None,
        )
        .await?;
        assert_eq!(live.status, 200, "{binary} liveness");
        let metrics = env::http("GET", &format!("{}/metrics", running.admin), None, None).await?;
        assert_eq!(metrics.status, 200, "{binary} metrics");
        assert!(
            metrics.body.contains("statefabric_build_info{"),
            "{binary} metrics lack build info:\n{}",
            metrics.body
        );

        let (code, stderr) = running.stop_with(Signal::SIGTERM).await?;
        assert_eq!(
            code, 0,
            "{binary} exit code after SIGTERM; stderr:\n{stderr}"
        );
        assert!(
            stderr.contains("SIGTERM"),
            "{binary} did not log the signal:\n{stderr}"
        );
        // Written to a pipe, not a terminal: no colour codes.
        assert!(
            !stderr.contains('\u{1b}'),
            "{binary} wrote ANSI escapes to a pipe:\n{stderr}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn fabric_dev_stops_cleanly_on_ctrl_c() -> anyhow::Result<()> {
    let mut running = spawn("fabric", &["dev"], &[])?;
    running.ready().await?;
    let (code, stderr) = running.stop_with(Signal::SIGINT).await?;
    assert_eq!(code, 0, "stderr:\n{stderr}");
    assert!(stderr.contains("SIGINT"), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn a_bad_config_value_exits_2_naming_the_key() -> anyhow::Result<()> {
    for (binary, args) in SERVICES {
        let output = Command::new(env::binary(binary))
            .args(*args)
            .env("STATEFABRIC_SHUTDOWN__DRAIN_DEADLINE", "0s")
            .env("STATEFABRIC_ADMIN__LISTEN", "nowhere")
            .output()
            .await?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{binary}: {stderr}");
        assert!(stderr.contains("admin.listen"), "{binary}: {stderr}");
    }
    // Validation problems (as opposed to parse errors) are named too.
    let output = Command::new(env::binary("statefabric-sidecar"))
        .env("STATEFABRIC_SHUTDOWN__DRAIN_DEADLINE", "0s")
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("shutdown.drain_deadline: must be greater than zero"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn a_missing_config_file_is_refused() -> anyhow::Result<()> {
    let output = Command::new(env::binary("statefabric-control-plane"))
        .args(["--config", "/nonexistent/control-plane.toml"])
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("/nonexistent/control-plane.toml"),
        "{stderr}"
    );
    Ok(())
}

#[tokio::test]
async fn help_describes_the_config_layers() -> anyhow::Result<()> {
    for (binary, args) in SERVICES {
        let output = Command::new(env::binary(binary))
            .args(*args)
            .arg("--help")
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(output.status.success(), "{binary} --help failed");
        assert!(stdout.contains("--config <FILE>"), "{binary}: {stdout}");
        assert!(stdout.contains("STATEFABRIC_"), "{binary}: {stdout}");
    }
    Ok(())
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() -> anyhow::Result<()> {
    let mut running = spawn(
        "statefabric-sidecar",
        &[],
        &[("STATEFABRIC_TELEMETRY__LOG_FORMAT", "json")],
    )?;
    running.ready().await?;
    let (code, stderr) = running.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log output");
    for line in lines {
        let value: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        assert!(value.get("level").is_some(), "no level in {line}");
    }
    Ok(())
}

/// With `telemetry.otlp_endpoint` set, spans reach an OTLP/gRPC collector,
/// tagged with the binary's service name, and are flushed before exit.
#[tokio::test]
async fn traces_are_exported_over_otlp_when_configured() -> anyhow::Result<()> {
    let collector = statefabric_tests::otlp::Collector::start().await?;
    let mut running = spawn(
        "statefabric-sidecar",
        &[],
        &[(
            "STATEFABRIC_TELEMETRY__OTLP_ENDPOINT",
            collector.endpoint.as_str(),
        )],
    )?;
    running.ready().await?;
    let (code, stderr) = running.stop_with(Signal::SIGTERM).await?;
    assert_eq!(code, 0, "{stderr}");

    // Flushed before exit: already there, no waiting.
    let spans = collector.spans();
    assert!(
        spans
            .iter()
            .any(|s| s.name == "shutdown" && s.service == "statefabric-sidecar"),
        "spans received: {spans:?}\n{stderr}"
    );
    Ok(())
}

/// `fabric migrate` (the chart's migrations Job) brings the test database to
/// the newest migration, and says so; run again it changes nothing. A
/// database that cannot be reached fails after the wait it was given, with
/// the reason.
#[tokio::test]
async fn fabric_migrate_applies_the_migrations_and_fails_clearly_without_a_database()
-> anyhow::Result<()> {
    let newest = statefabric_db::pg::MIGRATOR
        .iter()
        .map(|m| m.version)
        .max()
        .context("migrations")?;
    for _ in 0..2 {
        let output = Command::new(env::binary("fabric"))
            .args(["migrate", "--wait", "5s"])
            .env("STATEFABRIC_MIGRATE_DATABASE_URL", env::pg_admin_url())
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            stdout.contains(&format!("at migration {newest}")),
            "{stdout}"
        );
    }
    let nowhere = format!(
        "postgres://nobody:secret@127.0.0.1:{}/statefabric",
        env::free_port()
    );
    let output = Command::new(env::binary("fabric"))
        .args(["migrate", "--wait", "1s", "--database-url", &nowhere])
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("fabric migrate:"), "{stderr}");
    assert!(
        !stderr.contains("secret"),
        "the password is not printed: {stderr}"
    );
    Ok(())
}
