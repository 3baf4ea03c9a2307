//! The lease row in Postgres (`leader_leases`, migration 0010), taken and
//! renewed by `statefabric_acquire_lease` with the database's clock.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgPool;

use crate::{Elector, LeaderError};

/// The lease on Postgres: one row of `leader_leases` per role, taken,
/// extended and released by the functions of migration 0010.
#[derive(Debug, Clone)]
pub struct PgElector {
    pool: PgPool,
    /// The role elected for (one lease per role).
    name: String,
    /// This instance.
    holder: String,
}

impl PgElector {
    /// An elector for the role `name`, as the instance `holder`.
    pub fn new(pool: PgPool, name: &str, holder: &str) -> Self {
        Self {
            pool,
            name: name.to_owned(),
            holder: holder.to_owned(),
        }
    }

    /// This instance's name, as written into the lease.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The role elected for.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn unavailable(err: sqlx::Error) -> LeaderError {
    LeaderError::Unavailable(err.to_string())
}

#[async_trait]
impl Elector for PgElector {
    async fn acquire(&self, ttl: Duration) -> Result<Option<u64>, LeaderError> {
        let millis = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        let epoch: Option<i64> = sqlx::query_scalar(
            "SELECT statefabric_acquire_lease($1, $2, make_interval(secs => $3::double precision / 1000))",
        )
        .bind(&self.name)
        .bind(&self.holder)
        .bind(millis)
        .fetch_one(&self.pool)
        .await
        .map_err(unavailable)?;
        Ok(epoch.and_then(|e| u64::try_from(e).ok()))
    }

    async fn release(&self, epoch: u64) -> Result<(), LeaderError> {
        let _: Option<bool> = sqlx::query_scalar("SELECT statefabric_release_lease($1, $2, $3)")
            .bind(&self.name)
            .bind(&self.holder)
            .bind(i64::try_from(epoch).unwrap_or(i64::MAX))
            .fetch_one(&self.pool)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
