//! Which sidecars every replica serves, for the leader's status writes.
//!
//! A sidecar subscribes to one replica, and only the leader writes status:
//! so each replica publishes its subscribers ([`SidecarRecord`]s) and the
//! leader reads those of every live replica. With a Postgres-backed
//! election the records go to the `mesh_sidecars` table (migration 0023),
//! one row per replica, rewritten when its list changes and otherwise only
//! marked as seen; a replica that stops publishing drops out after
//! [`STALE_AFTER`] intervals. A solo control plane is its only replica and
//! keeps its list in memory.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// Intervals without a write after which a replica's sidecars no longer
/// count.
pub const STALE_AFTER: u32 = 5;

/// One subscribed sidecar as the status needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SidecarRecord {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub pod: String,
    /// `Kind/name` of every resource its configuration includes.
    pub resources: Vec<String>,
    /// The version of the configuration it was sent last.
    pub sent: String,
    /// The version it acknowledged last.
    pub applied: Option<String>,
    /// Its last refusal.
    pub refused: Option<Refusal>,
    /// What it did not apply of the version it acknowledged.
    #[serde(default)]
    pub not_applied: Vec<String>,
}

/// A configuration a sidecar would not apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    /// The version refused.
    pub version: String,
    /// The sidecar's reason, naming the field.
    pub reason: String,
}

impl SidecarRecord {
    /// Whether its configuration includes the resource `kind`/`name`.
    pub fn uses(&self, kind: &str, name: &str) -> bool {
        self.resources
            .iter()
            .any(|r| r.split_once('/') == Some((kind, name)))
    }
}

/// Where replicas publish their subscribers.
#[derive(Debug)]
pub enum Directory {
    /// One replica: its own list is the whole list.
    Solo(Mutex<Vec<SidecarRecord>>),
    /// Several replicas: each writes its own list to a table in Postgres
    /// and the leader reads them all.
    Postgres {
        /// The control plane's pool.
        pool: PgPool,
        /// The control planes' lease name: one group of replicas.
        lease: String,
        /// This replica's identity in the lease.
        replica: String,
        /// What this replica wrote last, to write only changes.
        written: tokio::sync::Mutex<Option<Vec<SidecarRecord>>>,
    },
}

impl Directory {
    /// The directory of a single replica.
    pub fn solo() -> Self {
        Self::Solo(Mutex::default())
    }

    /// This replica's part of the directory of the replicas of `lease`.
    pub fn postgres(pool: PgPool, lease: &str, replica: &str) -> Self {
        Self::Postgres {
            pool,
            lease: lease.to_owned(),
            replica: replica.to_owned(),
            written: tokio::sync::Mutex::default(),
        }
    }

    /// Publishes this replica's subscribers.
    pub async fn publish(&self, mine: Vec<SidecarRecord>) -> anyhow::Result<()> {
        match self {
            Self::Solo(list) => {
                *list.lock().unwrap_or_else(PoisonError::into_inner) = mine;
                Ok(())
            }
            Self::Postgres {
                pool,
                lease,
                replica,
                written,
            } => {
                let mut written = written.lock().await;
                if written.as_ref() == Some(&mine) {
                    let touched = sqlx::query(
                        "UPDATE mesh_sidecars SET seen_at = now() WHERE lease = $1 AND replica = $2",
                    )
                    .bind(lease)
                    .bind(replica)
                    .execute(pool)
                    .await?;
                    if touched.rows_affected() == 1 {
                        return Ok(());
                    }
                    // The row was pruned (a long pause): write it whole.
                }
                sqlx::query(
                    "INSERT INTO mesh_sidecars (lease, replica, seen_at, sidecars)
                     VALUES ($1, $2, now(), $3)
                     ON CONFLICT (lease, replica)
                     DO UPDATE SET seen_at = now(), sidecars = EXCLUDED.sidecars",
                )
                .bind(lease)
                .bind(replica)
                .bind(sqlx::types::Json(&mine))
                .execute(pool)
                .await?;
                *written = Some(mine);
                Ok(())
            }
        }
    }

    /// Every live replica's subscribers; a sidecar listed by two replicas
    /// (it moved) counts once, as the one seen last lists it.
    pub async fn all(&self, interval: Duration) -> anyhow::Result<Vec<SidecarRecord>> {
        match self {
            Self::Solo(list) => Ok(list.lock().unwrap_or_else(PoisonError::into_inner).clone()),
            Self::Postgres { pool, lease, .. } => {
                let stale_secs = (interval * STALE_AFTER).as_secs_f64();
                // Live rows, and whether any row is long dead; the delete
                // runs only then, not on every pass.
                let rows: Vec<(sqlx::types::Json<Vec<SidecarRecord>>, bool, bool)> =
                    sqlx::query_as(
                        "SELECT sidecars,
                                seen_at >= now() - make_interval(secs => $2),
                                seen_at < now() - make_interval(secs => $2 * 4)
                         FROM mesh_sidecars WHERE lease = $1 ORDER BY seen_at",
                    )
                    .bind(lease)
                    .bind(stale_secs)
                    .fetch_all(pool)
                    .await?;
                if rows.iter().any(|(_, _, expired)| *expired) {
                    sqlx::query(
                        "DELETE FROM mesh_sidecars
                         WHERE lease = $1 AND seen_at < now() - make_interval(secs => $2 * 4)",
                    )
                    .bind(lease)
                    .bind(stale_secs)
                    .execute(pool)
                    .await?;
                }
                let rows = rows
                    .into_iter()
                    .filter_map(|(records, live, _)| live.then_some((records,)));
                let mut by_pod = BTreeMap::new();
                for (records,) in rows {
                    for record in records.0 {
                        by_pod.insert((record.namespace.clone(), record.pod.clone()), record);
                    }
                }
                Ok(by_pod.into_values().collect())
            }
        }
    }
}
