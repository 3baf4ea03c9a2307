//! The Prometheus alert rules the chart ships
//! (`k8s/charts/statefabric/files/rules`) are valid (`promtool check
//! rules`) and do what their unit tests say (`promtool test rules`).
//! promtool comes with Debian's prometheus package, which testenv/up.sh
//! installs.

use std::path::{Path, PathBuf};
use std::process::Command;

fn monitoring() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s/charts/statefabric/files")
}

fn yaml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    Ok(files)
}

fn promtool(args: &[&str], files: &[PathBuf], dir: &Path) -> anyhow::Result<()> {
    let output = Command::new("promtool")
        .args(args)
        .args(files)
        .current_dir(dir)
        .output()
        .map_err(|e| anyhow::anyhow!("promtool: {e} (testenv/up.sh installs it)"))?;
    anyhow::ensure!(
        output.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

#[test]
fn alert_rules_are_valid() -> anyhow::Result<()> {
    let rules = yaml_files(&monitoring().join("rules"))?;
    anyhow::ensure!(!rules.is_empty(), "no rule files");
    promtool(&["check", "rules"], &rules, &monitoring())
}

#[test]
fn alert_rules_pass_their_unit_tests() -> anyhow::Result<()> {
    let dir = monitoring().join("rules-tests");
    let tests = yaml_files(&dir)?;
    anyhow::ensure!(!tests.is_empty(), "no rule tests");
    promtool(&["test", "rules"], &tests, &dir)
}
