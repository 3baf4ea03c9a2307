//! The Helm chart (`k8s/charts/statefabric`) for the tests: rendered with
//! the helm `testenv/chart-tools.sh` builds, and the operators' CRDs its
//! optional parts use installed into the test API server.

use std::path::PathBuf;

use anyhow::Context;

use crate::kube::{kubeconfig_path, kubectl};
use crate::{START_HINT, overridable, setting};

/// The release namespace every test install uses (the chart's names are
/// fixed: one release per cluster).
pub const NAMESPACE: &str = "statefabric-system";

pub fn chart_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../k8s/charts/statefabric")
}

fn tools_dir() -> String {
    std::env::var("STATEFABRIC_TOOLS_DIR").unwrap_or_else(|_| {
        format!(
            "{}/.cache/statefabric/tools",
            std::env::var("HOME").unwrap_or_default()
        )
    })
}

pub fn helm_path() -> PathBuf {
    PathBuf::from(overridable("STATEFABRIC_TEST_HELM", || {
        format!("{}/helm-v{}/helm", tools_dir(), setting("HELM_VERSION"))
    }))
}

/// Runs helm against the test API server; its stdout, or its stderr as the
/// error.
pub async fn helm(args: &[&str]) -> anyhow::Result<String> {
    let output = tokio::process::Command::new(helm_path())
        .args(args)
        .arg("--kubeconfig")
        .arg(kubeconfig_path())
        // helm keeps caches and its registry config under $HOME otherwise.
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("statefabric-helm/cache"),
        )
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("statefabric-helm/config"),
        )
        .env(
            "HELM_DATA_HOME",
            std::env::temp_dir().join("statefabric-helm/data"),
        )
        .output()
        .await
        .with_context(|| format!("starting {} ({START_HINT})", helm_path().display()))?;
    anyhow::ensure!(
        output.status.success(),
        "helm {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `helm template` of the chart in [`NAMESPACE`] with these extra
/// arguments (`-f`, `--set`, `--show-only`).
pub async fn render(extra: &[&str]) -> anyhow::Result<String> {
    let chart = chart_dir().display().to_string();
    let mut args = vec!["template", "statefabric", chart.as_str(), "-n", NAMESPACE];
    args.extend_from_slice(extra);
    helm(&args).await
}

/// The release namespace, made if missing.
pub async fn ensure_namespace() -> anyhow::Result<()> {
    let namespace = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n");
    kubectl(&["apply", "-f", "-"], Some(&namespace)).await?;
    Ok(())
}

/// Applies one of the chart's templates (e.g. `templates/control-plane-rbac.yaml`)
/// as rendered with the default values.
pub async fn apply_template(template: &str) -> anyhow::Result<()> {
    ensure_namespace().await?;
    let manifest = render(&["--show-only", template]).await?;
    kubectl(&["apply", "-f", "-"], Some(&manifest)).await?;
    Ok(())
}

/// The operators' CRDs: KEDA, prometheus-operator, CloudNativePG and
/// cert-manager from the tools cache (their Go modules), Strimzi and Litmus
/// from `k8s/third-party/crds/`. Server-side: some are over the 256 KiB a
/// client-side apply can annotate.
pub async fn install_third_party_crds() -> anyhow::Result<()> {
    let cached = PathBuf::from(overridable("STATEFABRIC_TEST_THIRD_PARTY_CRDS", || {
        format!("{}/crds", tools_dir())
    }));
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&cached)
        .with_context(|| format!("{} ({START_HINT})", cached.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    anyhow::ensure!(
        dirs.len() >= 4,
        "expected four operators' CRDs in {}",
        cached.display()
    );
    dirs.push(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../k8s/third-party/crds"));
    for dir in dirs {
        let dir = dir.display().to_string();
        kubectl(
            &["apply", "--server-side", "--force-conflicts", "-f", &dir],
            None,
        )
        .await?;
    }
    kubectl(
        &[
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ],
        None,
    )
    .await?;
    Ok(())
}
