//! Graceful shutdown: one signal fans out to every task, then in-flight work
//! gets a bounded time to finish.
//!
//! Built on tokio-util's `CancellationToken` (the "stop accepting" signal) and
//! `TaskTracker` (the "wait for in-flight work" half) rather than a hand-rolled
//! broadcast: both are the tokio project's own answer to exactly this.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::issues::Issues;

/// How long in-flight work may run after a shutdown signal.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ShutdownConfig {
    /// Upper bound on draining. Kubernetes sends SIGKILL after the pod's
    /// `terminationGracePeriodSeconds` (30 s by default), so the default stays
    /// well inside that to leave time for the exit itself.
    #[serde(with = "humantime_serde")]
    pub drain_deadline: Duration,
}

/// Longest drain deadline accepted: past this an orchestrator would have
/// killed the process anyway, so a larger value is almost surely a typo.
const MAX_DRAIN_DEADLINE: Duration = Duration::from_secs(600);

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_deadline: Duration::from_secs(20),
        }
    }
}

impl ShutdownConfig {
    pub(crate) fn validate(&self, section: &str, issues: &mut Issues) {
        if self.drain_deadline.is_zero() {
            issues.push(
                format!("{section}.drain_deadline"),
                "must be greater than zero",
            );
        } else if self.drain_deadline > MAX_DRAIN_DEADLINE {
            issues.push(
                format!("{section}.drain_deadline"),
                format!(
                    "{} exceeds the maximum of {}",
                    humantime_serde::re::humantime::format_duration(self.drain_deadline),
                    humantime_serde::re::humantime::format_duration(MAX_DRAIN_DEADLINE)
                ),
            );
        }
    }
}

/// The shutdown handle handed to every part of a process.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainOutcome {
    /// Every tracked task finished.
    Complete,
    /// The deadline passed with this many tasks still running.
    TimedOut {
        /// Tasks still running at the deadline.
        remaining: usize,
    },
}

impl Shutdown {
    /// Resolves once shutdown has been requested.
    pub async fn requested(&self) {
        self.token.cancelled().await;
    }

    /// True once shutdown has been requested.
    pub fn is_requested(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Requests shutdown (signals do this; so may a fatal error in a task).
    pub fn request(&self) {
        self.token.cancel();
    }

    /// A child token for APIs (axum, tonic) that want their own future.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Spawns in-flight work that a drain waits for.
    pub fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(future)
    }

    /// Waits for tracked work to finish, up to `deadline`.
    pub async fn drain(&self, deadline: Duration) -> DrainOutcome {
        self.tracker.close();
        match tokio::time::timeout(deadline, self.tracker.wait()).await {
            Ok(()) => DrainOutcome::Complete,
            Err(_) => DrainOutcome::TimedOut {
                remaining: self.tracker.len(),
            },
        }
    }
}

/// Resolves on the first SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() -> std::io::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok("Ctrl-C")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn drain_waits_for_in_flight_work() {
        let shutdown = Shutdown::default();
        let s = shutdown.clone();
        shutdown.spawn(async move {
            s.requested().await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        shutdown.request();
        assert_eq!(
            shutdown.drain(Duration::from_secs(5)).await,
            DrainOutcome::Complete
        );
    }

    #[tokio::test(start_paused = true)]
    async fn drain_gives_up_at_the_deadline() {
        let shutdown = Shutdown::default();
        shutdown.spawn(async {
            tokio::time::sleep(Duration::from_secs(60)).await;
        });
        shutdown.request();
        assert_eq!(
            shutdown.drain(Duration::from_secs(1)).await,
            DrainOutcome::TimedOut { remaining: 1 }
        );
    }

    #[test]
    fn zero_and_huge_deadlines_are_rejected() {
        for (secs, expect) in [(0, "greater than zero"), (601, "exceeds the maximum")] {
            let mut issues = Issues::default();
            ShutdownConfig {
                drain_deadline: Duration::from_secs(secs),
            }
            .validate("shutdown", &mut issues);
            let issues = issues.into_vec();
            assert_eq!(issues.len(), 1);
            assert_eq!(issues[0].key, "shutdown.drain_deadline");
            assert!(issues[0].reason.contains(expect), "{}", issues[0].reason);
        }
    }
}
