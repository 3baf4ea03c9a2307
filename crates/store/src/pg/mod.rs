//! The Postgres adapter: the production event store.
//!
//! Connects as the application role (not the tables' owner), so Row-Level
//! Security confines every statement to the tenant named at the start of its
//! transaction. Migrations, tenant registration and tenant logins need the
//! owner role and are `statefabric-db`'s (`statefabric_db::pg`).

pub(crate) mod announce;
pub(crate) mod append;
pub(crate) mod idempotency;
mod read;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, Transaction};
use statefabric_domain::{Checkpoint, RecordedEvent, Snapshot, StreamId, TenantId};
use tokio::sync::watch;

pub use announce::CONTEXT_CHANNEL;

use crate::error::{Result, StoreError};
use crate::limits::Limits;
use crate::port::{AppendOutcome, AppendRequest, EventStore, Scope, StreamInfo};

/// How the store reaches Postgres.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PgConfig {
    /// Connection URL of the application role.
    pub url: String,
    /// The pool's size.
    pub max_connections: u32,
    /// Connections kept open while idle.
    pub min_connections: u32,
    /// How long a caller waits for a free connection before `Unavailable`.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Upper bound on every statement (server-side `statement_timeout`) and on
    /// every store call as a whole.
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
    /// How long a keyed request waits for a concurrent duplicate to finish
    /// before being told it is still in progress. Appends wait for the
    /// stream's lock before they claim their key, so a duplicate append in
    /// progress is waited for there, within `query_timeout`; this bounds
    /// the wait on an uncommitted key row (keyed context writes, a key
    /// reused for another stream).
    #[serde(with = "humantime_serde")]
    pub idempotency_wait: Duration,
    /// How long idempotency keys are kept.
    #[serde(with = "humantime_serde")]
    pub idempotency_ttl: Duration,
    /// Bounds on what one call may ask.
    pub limits: Limits,
}

impl Default for PgConfig {
    fn default() -> Self {
        Self {
            url: "postgres://statefabric_app@127.0.0.1:5432/statefabric".to_owned(),
            // Two cores serve a pool of this size without thrashing; callers
            // queue in the pool (bounded by acquire_timeout) rather than in
            // Postgres.
            max_connections: 16,
            min_connections: 1,
            acquire_timeout: Duration::from_secs(5),
            query_timeout: Duration::from_secs(10),
            idempotency_wait: Duration::from_secs(5),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            limits: Limits::default(),
        }
    }
}

/// The event, context, audit and replay stores on Postgres: one pool,
/// cheap to clone.
#[derive(Debug, Clone)]
pub struct PgEventStore {
    pool: PgPool,
    config: Arc<PgConfig>,
    /// Callers waiting for a connection (a pool gauge).
    waiting: Arc<AtomicI64>,
    appended: Arc<watch::Sender<u64>>,
    /// The tenant every connection acts for from its start, if one
    /// ([`Self::connect_for`]).
    acting_for: Option<TenantId>,
    announcer: announce::Announcer,
}

/// The advisory lock a transaction takes as it starts ([`PgEventStore::begin_with`]).
#[derive(Debug, Clone, Copy)]
pub(crate) enum LockFor<'a> {
    Nothing,
    /// A stream's writers queue here.
    Stream(&'a StreamId),
    /// A context document's writers queue here (the first ones too, when
    /// there is no row yet for `FOR UPDATE` to lock).
    Document(&'a str),
}

impl PgEventStore {
    /// Connects with `config` (a store serving any tenant, each call in a
    /// transaction that names it).
    pub async fn connect(config: PgConfig) -> Result<Self> {
        Self::connect_with(config, None).await
    }

    /// A store for one tenant's use (a sidecar's): every connection acts
    /// for `tenant` from its start (a session setting), so a single
    /// statement needs no transaction to pass Row-Level Security; calls for
    /// another tenant still set theirs, in a transaction.
    pub async fn connect_for(config: PgConfig, tenant: &TenantId) -> Result<Self> {
        Self::connect_with(config, Some(tenant)).await
    }

    async fn connect_with(config: PgConfig, tenant: Option<&TenantId>) -> Result<Self> {
        let mut options = statefabric_db::pg::PoolOptions::new(&config.url, config.max_connections);
        options.min_connections = config.min_connections;
        options.acquire_timeout = config.acquire_timeout;
        options.settings.push((
            "statement_timeout",
            format!("{}ms", config.query_timeout.as_millis()),
        ));
        if let Some(tenant) = tenant {
            options
                .settings
                .push(("statefabric.tenant", tenant.as_str().to_owned()));
        }
        let pool = statefabric_db::pg::connect(&options)
            .await
            .map_err(StoreError::Unavailable)?;
        Ok(Self {
            acting_for: tenant.cloned(),
            ..Self::from_pool(pool, config)
        })
    }

    /// Whether every connection already acts for `tenant`.
    pub(crate) fn acts_for(&self, tenant: &TenantId) -> bool {
        self.acting_for.as_ref() == Some(tenant)
    }

    /// A store on a pool made elsewhere (`config`'s connection settings
    /// are not used).
    pub fn from_pool(pool: PgPool, config: PgConfig) -> Self {
        Self {
            config: Arc::new(config),
            waiting: Arc::default(),
            appended: Arc::new(watch::channel(0).0),
            acting_for: None,
            announcer: announce::Announcer::new(pool.clone()),
            pool,
        }
    }

    /// The store's pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(crate) fn config(&self) -> &PgConfig {
        &self.config
    }

    pub(crate) fn announcer(&self) -> &announce::Announcer {
        &self.announcer
    }

    /// Registers pool gauges (in use, idle, waiting) in `registry`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register_collector(Box::new(statefabric_db::pg::PoolGauges {
            pool: self.pool.clone(),
            waiting: Some(self.waiting.clone()),
        }));
    }

    /// Starts a transaction acting for `tenant`: every statement in it sees
    /// and writes only that tenant's rows.
    pub async fn begin_for(&self, tenant: &TenantId) -> Result<Transaction<'static, Postgres>> {
        self.begin_with(tenant, LockFor::Nothing).await
    }

    /// [`Self::begin_for`], and the same statement also waits for `lock`
    /// (one round trip for both), before anything gives the transaction its
    /// id (see [`append::lock_stream`]).
    pub(crate) async fn begin_with(
        &self,
        tenant: &TenantId,
        lock: LockFor<'_>,
    ) -> Result<Transaction<'static, Postgres>> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let tx = self.pool.begin().await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        let mut tx = tx.map_err(map_err)?;
        let query = match lock {
            LockFor::Nothing => sqlx::query("SELECT set_config('statefabric.tenant', $1, true)")
                .bind(tenant.as_str()),
            LockFor::Stream(stream) => sqlx::query(append::BEGIN_FOR_STREAM.as_str())
                .bind(tenant.as_str())
                .bind(stream.as_str()),
            LockFor::Document(id) => sqlx::query(crate::context::pg::BEGIN_FOR_DOCUMENT)
                .bind(tenant.as_str())
                .bind(id),
        };
        query.execute(&mut *tx).await.map_err(map_err)?;
        Ok(tx)
    }

    /// Appends inside a caller's transaction (from [`Self::begin_for`]), so
    /// other writes (a saga transition, say) commit atomically with the
    /// events. The caller commits; [`EventStore::append`] is this plus commit.
    ///
    /// If the transaction wrote before, it may have been overtaken on the
    /// stream meanwhile: the append is then refused with
    /// [`StoreError::WriteOrder`] and the caller runs its transaction again.
    pub async fn append_in(
        &self,
        tx: &mut Transaction<'static, Postgres>,
        scope: &Scope,
        request: &AppendRequest,
    ) -> Result<AppendOutcome> {
        self.config.limits.check_append(request)?;
        append::lock_stream(tx, &scope.tenant, &request.stream_id).await?;
        append::append(tx, &self.config, scope, request).await
    }

    pub(crate) async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        crate::error::within(self.config.query_timeout, fut).await
    }
}

#[async_trait]
impl EventStore for PgEventStore {
    #[tracing::instrument(name = "store.append", skip_all, fields(db.system = "postgresql", stream = %request.stream_id, events = request.events.len()))]
    async fn append(&self, scope: &Scope, request: AppendRequest) -> Result<AppendOutcome> {
        self.config.limits.check_append(&request)?;
        let outcome = self
            .timed(async {
                let mut tx = self
                    .begin_with(&scope.tenant, LockFor::Stream(&request.stream_id))
                    .await?;
                let outcome = append::append(&mut tx, &self.config, scope, &request).await?;
                if outcome.replayed {
                    tx.rollback().await.map_err(map_err)?;
                } else {
                    tx.commit().await.map_err(map_err)?;
                }
                Ok(outcome)
            })
            .await?;
        if !outcome.replayed {
            self.appended.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(outcome)
    }

    #[tracing::instrument(name = "store.read_stream", skip_all, fields(db.system = "postgresql", stream = %stream))]
    async fn read_stream(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        from_version: u64,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>> {
        self.config.limits.check_read_limit(limit)?;
        read::check_from("from_version", from_version)?;
        self.timed(read::read_stream(self, tenant, stream, from_version, limit))
            .await
    }

    async fn read_all(
        &self,
        tenant: &TenantId,
        from_position: u64,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>> {
        self.config.limits.check_read_limit(limit)?;
        read::check_from("from_position", from_position)?;
        self.timed(read::read_all(self, tenant, from_position, limit))
            .await
    }

    async fn read_feed(
        &self,
        tenant: &TenantId,
        after: Checkpoint,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>> {
        self.config.limits.check_read_limit(limit)?;
        self.timed(read::read_feed(self, tenant, after, limit))
            .await
    }

    async fn stream_info(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<Option<StreamInfo>> {
        self.timed(read::stream_info(self, tenant, stream)).await
    }

    async fn save_snapshot(&self, scope: &Scope, snapshot: &Snapshot) -> Result<()> {
        crate::limits::check_name("stream type", &snapshot.stream_type)?;
        if snapshot.version == 0 {
            return Err(crate::error::InvalidInput::Zero {
                what: "snapshot version",
            }
            .into());
        }
        self.timed(async {
            let mut tx = self.begin_for(&scope.tenant).await?;
            append::save_snapshot(&mut tx, scope, snapshot).await?;
            tx.commit().await.map_err(map_err)
        })
        .await
    }

    async fn load_snapshot(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<Option<Snapshot>> {
        self.timed(read::load_snapshot(self, tenant, stream)).await
    }

    async fn purge_expired_idempotency_keys(&self) -> Result<u64> {
        self.timed(async {
            let purged: i64 =
                sqlx::query_scalar("SELECT statefabric_purge_expired_idempotency_keys()")
                    .fetch_one(&self.pool)
                    .await
                    .map_err(map_err)?;
            Ok(u64::try_from(purged).unwrap_or_default())
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.timed(async {
            sqlx::query("SELECT 1")
                .execute(&self.pool)
                .await
                .map_err(map_err)?;
            Ok(())
        })
        .await
    }

    fn append_notifications(&self) -> watch::Receiver<u64> {
        self.appended.subscribe()
    }
}

/// Maps driver errors to the store's: connection trouble is `Unavailable`,
/// a cancelled statement is a `Timeout`, everything else a `Backend` failure.
pub(crate) fn map_err(err: sqlx::Error) -> StoreError {
    match &err {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(err),
        sqlx::Error::Database(db) if db.code().as_deref() == Some("57014") => {
            StoreError::Timeout(Duration::ZERO)
        }
        _ => StoreError::Backend(err),
    }
}
