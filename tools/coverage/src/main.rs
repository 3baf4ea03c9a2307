//! Line coverage of the workspace from one instrumented run of the test
//! command.
//!
//! `scripts/test.sh` builds the workspace's own crates with
//! `-C instrument-coverage` (`scripts/coverage-rustc`), and every process
//! the run starts — test binaries, and the sidecars, control planes and
//! `fabric` processes the process tests and the SDK suites spawn — writes
//! its counters to a profile. This tool merges those profiles, reads the
//! coverage map of each binary that wrote them, and prints the covered share
//! of lines per crate and in total, failing under a floor.
//!
//! Why a tool of our own: `llvm-profdata`/`llvm-cov` must match rustc's LLVM
//! (22 here) and the `llvm-tools` component cannot be downloaded on this
//! machine; `llvm_profparser` (the parser `cargo-tarpaulin` uses) reads
//! both formats in Rust. What is ours is only the line rule and the
//! grouping below.
//!
//! Counted: every `.rs` file under the workspace root in the coverage maps,
//! except tests (the `tests/` crate, `tests/` folders, `tests.rs` and
//! `*_tests.rs` modules), `bench/`, `fuzz/`, `tools/` and generated code
//! (under a target directory). A line is covered when the innermost region
//! covering it ran; lines no region covers (comments, declarations) do not
//! count.
//!
//! Usage: `statefabric-coverage --root DIR --profiles DIR --objects FILE
//! [--min PERCENT] [--worst N]` (FILE lists one binary per line; `--worst`
//! adds the N files with the most lines not run).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use llvm_profparser::{CoverageMapping, CoverageResult, merge_profiles};

struct Args {
    root: PathBuf,
    profiles: PathBuf,
    objects: PathBuf,
    min: Option<f64>,
    worst: usize,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut root = None;
    let mut profiles = None;
    let mut objects = None;
    let mut min = None;
    let mut worst = 0;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--root" => root = Some(PathBuf::from(value)),
            "--profiles" => profiles = Some(PathBuf::from(value)),
            "--objects" => objects = Some(PathBuf::from(value)),
            "--min" => min = Some(value.parse().context("--min takes a percentage")?),
            "--worst" => worst = value.parse().context("--worst takes a count")?,
            other => bail!("unknown flag {other}"),
        }
    }
    Ok(Args {
        root: std::fs::canonicalize(root.context("--root is required")?)?,
        profiles: profiles.context("--profiles is required")?,
        objects: objects.context("--objects is required")?,
        min,
        worst,
    })
}

/// The workspace-relative path of a file that counts, or None.
fn counted(root: &Path, file: &Path) -> Option<PathBuf> {
    let relative = file.strip_prefix(root).ok()?;
    let text = relative.to_str()?;
    let excluded_top = ["tests/", "bench/", "fuzz/", "tools/", "target/"];
    let name = relative.file_name()?.to_str()?;
    if !name.ends_with(".rs")
        || excluded_top.iter().any(|top| text.starts_with(top))
        || text.contains("/tests/")
        || text.contains("/target/")
        || name == "tests.rs"
        || name.ends_with("_tests.rs")
    {
        return None;
    }
    Some(relative.to_path_buf())
}

/// Lines with a region, and how many of them ran. Regions come sorted by
/// start; a later-starting region lies inside or after the earlier ones, so
/// it decides the lines it spans, except its first line, which counts as
/// run if any region starting on it ran (`if x { a } else { b }` on one
/// line is a covered line when either arm ran).
fn line_counts(result: &CoverageResult) -> (usize, usize) {
    let mut lines: BTreeMap<usize, usize> = BTreeMap::new();
    let mut started_on: BTreeMap<usize, usize> = BTreeMap::new();
    for (location, hits) in &result.hits {
        for line in location.line_start..=location.line_end {
            if line == location.line_start {
                let best = started_on.entry(line).or_insert(0);
                *best = (*best).max(*hits);
                lines.insert(line, *best);
            } else {
                lines.insert(line, *hits);
            }
        }
    }
    let covered = lines.values().filter(|hits| **hits > 0).count();
    (lines.len(), covered)
}

/// The crate a file belongs to: its nearest folder with a Cargo.toml.
fn crate_of(root: &Path, relative: &Path) -> String {
    let mut dir = relative.parent();
    while let Some(candidate) = dir {
        if root.join(candidate).join("Cargo.toml").is_file() {
            return candidate.display().to_string();
        }
        dir = candidate.parent();
    }
    ".".to_string()
}

fn run() -> anyhow::Result<ExitCode> {
    let args = parse_args()?;
    let mut profiles = Vec::new();
    for entry in std::fs::read_dir(&args.profiles)
        .with_context(|| format!("reading {}", args.profiles.display()))?
    {
        let path = entry?.path();
        if path.extension().is_some_and(|ext| ext == "profraw") {
            profiles.push(path);
        }
    }
    if profiles.is_empty() {
        bail!(
            "no profiles in {}: was the run instrumented?",
            args.profiles.display()
        );
    }
    profiles.sort();
    let objects: Vec<PathBuf> = std::fs::read_to_string(&args.objects)
        .with_context(|| format!("reading {}", args.objects.display()))?
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(PathBuf::from)
        .collect();
    let profile = merge_profiles(&profiles).context("merging the profiles")?;
    let mapping = CoverageMapping::new(&objects, &profile, false)?;
    let root = args.root.clone();
    let report = mapping
        .generate_subreport(|paths| paths.iter().any(|path| counted(&root, path).is_some()))
        .context("reading the binaries' coverage maps")?;

    let mut per_crate: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut per_file = Vec::new();
    for (file, result) in &report.files {
        let Some(relative) = counted(&args.root, file) else {
            continue;
        };
        let (lines, covered) = line_counts(result);
        per_file.push((lines - covered, lines, relative.clone()));
        let entry = per_crate
            .entry(crate_of(&args.root, &relative))
            .or_default();
        entry.0 += lines;
        entry.1 += covered;
    }
    let percent = |(lines, covered): (usize, usize)| {
        if lines == 0 {
            100.0
        } else {
            covered as f64 * 100.0 / lines as f64
        }
    };
    println!("| crate | lines | covered | coverage |");
    println!("|---|---:|---:|---:|");
    let mut total = (0, 0);
    for (name, counts) in &per_crate {
        println!(
            "| `{name}` | {} | {} | {:.1} % |",
            counts.0,
            counts.1,
            percent(*counts)
        );
        total.0 += counts.0;
        total.1 += counts.1;
    }
    let overall = percent(total);
    println!(
        "| **workspace** | {} | {} | **{overall:.1} %** |",
        total.0, total.1
    );
    if args.worst > 0 {
        per_file.sort_by_key(|entry| std::cmp::Reverse(entry.0));
        println!();
        println!("| file (most lines not run first) | lines | not run | coverage |");
        println!("|---|---:|---:|---:|");
        for (missed, lines, path) in per_file.iter().take(args.worst) {
            let share = percent((*lines, lines - missed));
            println!(
                "| `{}` | {lines} | {missed} | {share:.1} % |",
                path.display()
            );
        }
    }
    println!(
        "({} profiles from {} binaries)",
        profiles.len(),
        objects.len()
    );
    if let Some(min) = args.min
        && overall < min
    {
        eprintln!("line coverage {overall:.1} % is under the floor of {min} %");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(error) => {
            eprintln!("coverage: {error:#}");
            ExitCode::from(2)
        }
    }
}
