//! One active instance among replicas, and a fence against the others.
//!
//! Owns the [`Elector`] port — take or extend a lease and learn its epoch —
//! with [`pg::PgElector`] (a lease row in Postgres, judged by the database's
//! clock; `migrations/postgres/0010_leader_leases.sql`),
//! [`kube::KubeElector`] (a Kubernetes Lease, fenced by the same Postgres
//! row) and [`Solo`] (the embedded single process, always leader), and
//! [`keep`], the task that renews the lease and publishes the [`Role`].
//!
//! The epoch is the fence: it grows with every new term, and a leader's
//! writes check it in their own transaction (`statefabric_check_epoch`), so a
//! leader that was paused past its lease and wakes up is refused by the
//! database instead of writing over its successor. In the process too, the
//! role expires on its own: [`Leadership::role`] reports a follower as soon
//! as the last successful renewal is older than the lease, even if the
//! renewing task has not run yet (as after SIGCONT).
//!
//! It does not own what leaders do; the saga engine and outbox relay ask
//! [`Leadership`] and pass the epoch to their writes.
#![warn(missing_docs)]

pub mod kube;
pub mod pg;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Why an election round could not be run.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    /// The backend (database or API server) could not be reached or refused the call.
    #[error("leader election backend unavailable: {0}")]
    Unavailable(String),
}

/// A lease backend: who leads is whoever holds the lease, in terms numbered by epoch.
#[async_trait]
pub trait Elector: Send + Sync + std::fmt::Debug + 'static {
    /// Takes the lease if free or lapsed, or extends it if this instance
    /// holds it; `Some(epoch)` when held.
    async fn acquire(&self, ttl: Duration) -> Result<Option<u64>, LeaderError>;

    /// Lets go of the term `epoch` at once.
    async fn release(&self, epoch: u64) -> Result<(), LeaderError>;
}

/// The embedded single instance: always leader, epoch 1.
#[derive(Debug, Default)]
pub struct Solo;

#[async_trait]
impl Elector for Solo {
    async fn acquire(&self, _ttl: Duration) -> Result<Option<u64>, LeaderError> {
        Ok(Some(1))
    }

    async fn release(&self, _epoch: u64) -> Result<(), LeaderError> {
        Ok(())
    }
}

/// What this instance is at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Another instance leads, or none does.
    Follower,
    /// This instance leads.
    Leader {
        /// The term's number, which fences what the leader writes.
        epoch: u64,
    },
}

#[derive(Debug, Clone, Copy)]
struct Term {
    epoch: u64,
    /// Leader until then, unless renewed (monotonic clock).
    valid_until: Instant,
}

/// What this instance is now; clones share it.
#[derive(Debug, Clone)]
pub struct Leadership {
    rx: watch::Receiver<Option<Term>>,
}

impl Leadership {
    /// Checks the clock itself, so a stale term is never reported as held.
    pub fn role(&self) -> Role {
        match *self.rx.borrow() {
            Some(term) if Instant::now() < term.valid_until => Role::Leader { epoch: term.epoch },
            _ => Role::Follower,
        }
    }

    /// Waits for the next change of term (or loss of it).
    pub async fn changed(&mut self) {
        let _ = self.rx.changed().await;
    }
}

/// How a lease is held: its length and how often it is renewed.
#[derive(Debug, Clone, Copy)]
pub struct LeaseSettings {
    /// How long a lease lasts without renewal.
    pub ttl: Duration,
    /// How often it is renewed (well under `ttl`).
    pub renew_every: Duration,
}

#[derive(Debug, Clone, Default)]
struct Metrics {
    leader: Gauge,
    epoch: Gauge,
    changes: Counter,
}

/// Keeps the lease until `stop` is cancelled, then releases it. Returns
/// the role handle at once.
pub fn keep(
    elector: Arc<dyn Elector>,
    settings: LeaseSettings,
    registry: Option<&mut Registry>,
    stop: CancellationToken,
) -> (Leadership, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(None::<Term>);
    let metrics = Metrics::default();
    if let Some(registry) = registry {
        registry.register(
            "leader",
            "1 while this instance leads",
            metrics.leader.clone(),
        );
        registry.register(
            "leader_epoch",
            "The term this instance leads (0: none)",
            metrics.epoch.clone(),
        );
        registry.register(
            "leader_changes",
            "Times this instance became or stopped being leader",
            metrics.changes.clone(),
        );
    }
    let leadership = Leadership { rx };
    let view = leadership.clone();
    let task = tokio::spawn(async move {
        // A margin under the ttl: the database starts its clock a little
        // after we do, so we step down a little before it frees the lease.
        let valid_for = settings.ttl.mul_f64(0.8);
        loop {
            let asked = Instant::now();
            let held = tokio::select! {
                () = stop.cancelled() => break,
                // Up to half the lease: a renewal that is merely slow (a busy
                // database) still counts, and the term it grants is measured
                // from when it was asked, so waiting longer is never unsafe.
                held = tokio::time::timeout(settings.ttl / 2, elector.acquire(settings.ttl)) => held,
            };
            let before = view.role();
            match held {
                Ok(Ok(Some(epoch))) => {
                    tx.send_replace(Some(Term {
                        epoch,
                        valid_until: asked + valid_for,
                    }));
                }
                Ok(Ok(None)) => {
                    tx.send_replace(None);
                }
                // Unknown: keep the term until it runs out on its own.
                Ok(Err(err)) => tracing::warn!(error = %err, "cannot renew the leader lease"),
                Err(_) => tracing::warn!("renewing the leader lease timed out"),
            }
            let after = view.role();
            if before != after {
                metrics.changes.inc();
                match after {
                    Role::Leader { epoch } => tracing::info!(epoch, "became leader"),
                    Role::Follower => tracing::info!("following"),
                }
            }
            let epoch = match after {
                Role::Leader { epoch } => i64::try_from(epoch).unwrap_or(i64::MAX),
                Role::Follower => 0,
            };
            metrics.leader.set(i64::from(epoch > 0));
            metrics.epoch.set(epoch);
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(settings.renew_every) => {}
            }
        }
        if let Role::Leader { epoch } = view.role() {
            tx.send_replace(None);
            metrics.leader.set(0);
            if let Err(err) = elector.release(epoch).await {
                tracing::warn!(error = %err, "could not release the leader lease; it will lapse");
            } else {
                tracing::info!(epoch, "released the leader lease");
            }
        }
    });
    (leadership, task)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_term_not_renewed_in_time_is_no_longer_reported() {
        let (tx, rx) = watch::channel(Some(Term {
            epoch: 3,
            valid_until: Instant::now() + Duration::from_secs(1),
        }));
        let leadership = Leadership { rx };
        assert_eq!(leadership.role(), Role::Leader { epoch: 3 });
        tokio::time::advance(Duration::from_millis(1001)).await;
        assert_eq!(
            leadership.role(),
            Role::Follower,
            "expired without the task running"
        );
        drop(tx);
    }

    #[tokio::test]
    async fn solo_leads_and_releases_at_stop() {
        let stop = CancellationToken::new();
        let (leadership, task) = keep(
            Arc::new(Solo),
            LeaseSettings {
                ttl: Duration::from_secs(5),
                renew_every: Duration::from_secs(1),
            },
            None,
            stop.clone(),
        );
        let mut watch = leadership.clone();
        while leadership.role() == Role::Follower {
            watch.changed().await;
        }
        assert_eq!(leadership.role(), Role::Leader { epoch: 1 });
        stop.cancel();
        task.await.expect("task");
        assert_eq!(leadership.role(), Role::Follower);
    }
}
