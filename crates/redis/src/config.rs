//! The `[redis]` configuration section, shared by every Redis adapter.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How the Redis at `urls` is deployed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RedisMode {
    /// One server: `urls[0]`.
    #[default]
    Standalone,
    /// A Redis Cluster: `urls` are seed nodes; MOVED/ASK redirections and
    /// failovers are followed, with at most `retries` tries per command.
    Cluster,
}

/// Where Redis is and how calls to it are bounded (`[redis]` in a binary's
/// configuration).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Standalone or cluster.
    pub mode: RedisMode,
    /// Comma-separated `redis://host:port` URLs.
    pub urls: String,
    /// Deadline for one command, retries included.
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Deadline for opening a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Tries per command on redirection or a lost connection.
    pub retries: u32,
    /// Consecutive failures that open the circuit breaker ...
    pub breaker_failures: u32,
    /// ... and how long it then refuses calls before probing.
    #[serde(with = "humantime_serde")]
    pub breaker_open_for: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            mode: RedisMode::Standalone,
            urls: String::new(),
            command_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            retries: 5,
            breaker_failures: 5,
            breaker_open_for: Duration::from_secs(1),
        }
    }
}

impl RedisConfig {
    /// `urls` split at commas, trimmed, empty entries left out.
    pub fn url_list(&self) -> Vec<String> {
        self.urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Problems, each with the key it concerns.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let urls = self.url_list();
        if urls.is_empty() {
            out.push((
                "redis.urls",
                "a Redis backend needs at least one redis:// URL".into(),
            ));
        }
        if let Some(bad) = urls.iter().find(|u| !u.starts_with("redis://")) {
            out.push(("redis.urls", format!("`{bad}` is not a redis:// URL")));
        }
        if self.command_timeout.is_zero() || self.connect_timeout.is_zero() {
            out.push((
                "redis.command_timeout",
                "timeouts must be greater than zero".into(),
            ));
        }
        if self.breaker_failures == 0 {
            out.push(("redis.breaker_failures", "must be at least 1".into()));
        }
        out
    }
}
