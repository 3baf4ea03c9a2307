//! Configuration problems, gathered so all are reported together. Its own
//! module: every section's `validate` (config, shutdown, telemetry, …)
//! adds to it, and the loader in [`crate::config`] reports it.

use std::fmt;

/// One thing wrong with the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key, e.g. `admin.listen`.
    pub key: String,
    /// What is wrong with its value.
    pub reason: String,
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

/// Accumulates validation problems.
#[derive(Debug, Default)]
pub struct Issues(Vec<ConfigIssue>);

impl Issues {
    /// Records that `key` is wrong for `reason`.
    pub fn push(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.0.push(ConfigIssue {
            key: key.into(),
            reason: reason.into(),
        });
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Everything recorded, in order.
    pub fn into_vec(self) -> Vec<ConfigIssue> {
        self.0
    }
}
