//! Layered configuration: built-in defaults, then an optional TOML file, then
//! `STATEFABRIC_*` environment variables, then validation.
//!
//! Every binary has one config struct. Environment variables use `__` between
//! nesting levels (`STATEFABRIC_ADMIN__LISTEN=0.0.0.0:7401` sets
//! `admin.listen`). Only variables whose first segment names one of the
//! struct's sections are read, so unrelated `STATEFABRIC_*` variables (the
//! test environment's, say) never break start-up, while a typo inside a known
//! section is reported instead of silently ignored.
//!
//! Every problem names its key and where the value came from. A value of the
//! wrong type stops decoding at that value (serde reports one at a time); the
//! validation that follows reports all of its problems together.

use std::path::Path;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::admin::AdminConfig;
use crate::shutdown::ShutdownConfig;
use crate::telemetry::TelemetryConfig;

/// The prefix of every environment variable a Statefabric binary reads.
pub const ENV_PREFIX: &str = "STATEFABRIC_";

/// A binary's whole configuration.
pub trait ServiceConfig: Serialize + DeserializeOwned {
    /// Top-level sections, used to pick the environment variables that belong
    /// to this binary.
    const SECTIONS: &'static [&'static str];

    /// The `[admin]` section.
    fn admin(&self) -> &AdminConfig;
    /// The `[telemetry]` section.
    fn telemetry(&self) -> &TelemetryConfig;
    /// The `[shutdown]` section.
    fn shutdown(&self) -> &ShutdownConfig;

    /// Checks that go beyond what the types already guarantee. The shared
    /// sections are checked by [`load`]; implementations add their own.
    fn validate(&self, issues: &mut Issues);
}

pub use crate::issues::{ConfigIssue, Issues};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--config` named a file that is not there.
    #[error("config file {path} does not exist")]
    MissingFile {
        /// The path given.
        path: String,
    },
    /// The configuration parsed but broke these rules (all of them listed).
    #[error("invalid configuration:\n{}", format_issues(.0))]
    Invalid(Vec<ConfigIssue>),
}

fn format_issues(issues: &[ConfigIssue]) -> String {
    issues
        .iter()
        .map(|i| format!("  - {i}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Loads and validates a config: `defaults`, overlaid by `file` (if given),
/// overlaid by the process environment.
pub fn load<T: ServiceConfig>(defaults: T, file: Option<&Path>) -> Result<T, ConfigError> {
    load_from(defaults, file, std::env::vars())
}

/// As [`load`], with the environment given explicitly (tests use this rather
/// than mutating the process environment).
pub fn load_from<T, I>(defaults: T, file: Option<&Path>, env: I) -> Result<T, ConfigError>
where
    T: ServiceConfig,
    I: IntoIterator<Item = (String, String)>,
{
    let mut figment = Figment::from(Serialized::defaults(defaults));
    if let Some(path) = file {
        if !path.is_file() {
            return Err(ConfigError::MissingFile {
                path: path.display().to_string(),
            });
        }
        figment = figment.merge(Toml::file_exact(path));
    }
    figment = figment.merge(env_provider::<T, I>(env));

    let config: T = figment.extract().map_err(|err| {
        ConfigError::Invalid(
            err.into_iter()
                .map(|e| ConfigIssue {
                    key: if e.path.is_empty() {
                        "<root>".to_owned()
                    } else {
                        e.path.join(".")
                    },
                    reason: describe_figment_error(&e),
                })
                .collect(),
        )
    })?;

    let mut issues = Issues::default();
    config.telemetry().validate("telemetry", &mut issues);
    config.shutdown().validate("shutdown", &mut issues);
    config.validate(&mut issues);
    if issues.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(issues.into_vec()))
    }
}

/// The environment as a figment provider. Figment's own `Env` reads the real
/// process environment; taking an iterator keeps tests free of global state.
fn env_provider<T, I>(env: I) -> EnvVars
where
    T: ServiceConfig,
    I: IntoIterator<Item = (String, String)>,
{
    let mut dict = figment::value::Dict::new();
    for (name, value) in env {
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        let key = rest.to_ascii_lowercase().replace("__", ".");
        let section = key.split('.').next().unwrap_or_default();
        if !T::SECTIONS.contains(&section) {
            continue;
        }
        // Parsed the way figment parses real environment variables: "8080" is a
        // number, "true" a bool, anything else a string.
        let parsed: figment::value::Value = match value.parse() {
            Ok(v) => v,
            Err(never) => match never {},
        };
        insert_dotted(&mut dict, &key, parsed);
    }
    EnvVars(dict)
}

struct EnvVars(figment::value::Dict);

impl figment::Provider for EnvVars {
    fn metadata(&self) -> figment::Metadata {
        figment::Metadata::named(format!("{ENV_PREFIX}* environment variables"))
    }

    fn data(
        &self,
    ) -> Result<figment::value::Map<figment::Profile, figment::value::Dict>, figment::Error> {
        Ok(figment::Profile::Default.collect(self.0.clone()))
    }
}

fn insert_dotted(dict: &mut figment::value::Dict, key: &str, value: figment::value::Value) {
    match key.split_once('.') {
        None => {
            dict.insert(key.to_owned(), value);
        }
        Some((head, tail)) => {
            let entry = dict
                .entry(head.to_owned())
                .or_insert_with(|| figment::value::Dict::new().into());
            if let figment::value::Value::Dict(_, inner) = entry {
                insert_dotted(inner, tail, value);
            }
        }
    }
}

fn describe_figment_error(e: &figment::Error) -> String {
    let mut reason = e.kind.to_string();
    if let Some(md) = &e.metadata {
        match &md.source {
            Some(source) => reason.push_str(&format!(" (from {} {source})", md.name)),
            None => reason.push_str(&format!(" (from {})", md.name)),
        }
    }
    reason
}

/// The `--config` flag every binary takes. Flatten it into a binary's clap
/// arguments so the flag and its help read the same everywhere.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file. Settings are layered: built-in defaults, then
    /// this file, then STATEFABRIC_<SECTION>__<KEY> environment variables
    /// (e.g. STATEFABRIC_ADMIN__LISTEN=0.0.0.0:7401).
    #[arg(long, short, env = "STATEFABRIC_CONFIG", value_name = "FILE")]
    pub config: Option<std::path::PathBuf>,
}

/// The configuration of a binary that has no sections of its own yet: admin
/// endpoints, telemetry and shutdown.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BaseConfig {
    /// Admin endpoints (probes, metrics, log level).
    pub admin: AdminConfig,
    /// Logs and traces.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Drain deadline.
    #[serde(default)]
    pub shutdown: ShutdownConfig,
}

impl BaseConfig {
    /// Defaults with the admin server on `127.0.0.1:<admin_port>`.
    pub fn with_admin_port(admin_port: u16) -> Self {
        Self {
            admin: AdminConfig::on_port(admin_port),
            telemetry: TelemetryConfig::default(),
            shutdown: ShutdownConfig::default(),
        }
    }
}

impl ServiceConfig for BaseConfig {
    const SECTIONS: &'static [&'static str] = &["admin", "telemetry", "shutdown"];

    fn admin(&self) -> &AdminConfig {
        &self.admin
    }
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }
    fn shutdown(&self) -> &ShutdownConfig {
        &self.shutdown
    }
    fn validate(&self, _issues: &mut Issues) {}
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn toml_file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("temp file");
        file.write_all(text.as_bytes()).expect("write");
        file
    }

    #[test]
    fn layers_apply_in_order_defaults_file_env() {
        let file = toml_file(
            "[admin]\nlisten = \"127.0.0.1:9000\"\n[shutdown]\ndrain_deadline = \"5s\"\n",
        );
        let config: BaseConfig = load_from(
            BaseConfig::with_admin_port(7401),
            Some(file.path()),
            env(&[
                ("STATEFABRIC_SHUTDOWN__DRAIN_DEADLINE", "7s"),
                ("STATEFABRIC_TELEMETRY__LOG_FORMAT", "json"),
                // Not one of this binary's sections: ignored, not an error.
                ("STATEFABRIC_TEST_PG_URL", "postgres://x"),
                ("UNRELATED", "1"),
            ]),
        )
        .expect("valid");
        assert_eq!(config.admin.listen.port(), 9000);
        assert_eq!(config.shutdown.drain_deadline, Duration::from_secs(7));
        assert_eq!(config.telemetry.log_format, crate::LogFormat::Json);
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let err = load_from(
            BaseConfig::with_admin_port(7401),
            None,
            env(&[("STATEFABRIC_ADMIN__LISTEN", "not-an-address")]),
        )
        .expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("admin.listen"), "{text}");
        assert!(text.contains("environment"), "{text}");

        let err = load_from(
            BaseConfig::with_admin_port(7401),
            None,
            env(&[("STATEFABRIC_ADMIN__LISTN", "typo")]),
        )
        .expect_err("unknown key");
        assert!(err.to_string().contains("listn"), "{err}");

        let err = load_from(
            BaseConfig::with_admin_port(7401),
            None,
            env(&[
                ("STATEFABRIC_SHUTDOWN__DRAIN_DEADLINE", "0s"),
                ("STATEFABRIC_TELEMETRY__OTLP_ENDPOINT", "localhost:4317"),
            ]),
        )
        .expect_err("invalid");
        let ConfigError::Invalid(issues) = err else {
            panic!("expected Invalid, got {err:?}");
        };
        let keys: Vec<_> = issues.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["telemetry.otlp_endpoint", "shutdown.drain_deadline"]);
    }

    #[test]
    fn a_missing_file_is_an_error() {
        let err = load_from(
            BaseConfig::with_admin_port(7401),
            Some(Path::new("/nonexistent/statefabric.toml")),
            env(&[]),
        )
        .expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/statefabric.toml"));
    }

    #[test]
    fn a_bad_duration_in_a_file_names_key_and_file() {
        let file = toml_file("[shutdown]\ndrain_deadline = \"soon\"\n");
        let err = load_from(
            BaseConfig::with_admin_port(7401),
            Some(file.path()),
            env(&[]),
        )
        .expect_err("invalid");
        let text = err.to_string();
        assert!(text.contains("shutdown.drain_deadline"), "{text}");
        assert!(text.contains(".toml"), "{text}");
    }
}
