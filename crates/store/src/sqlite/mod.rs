//! The embedded adapter: the event store in one SQLite file, for `fabric dev`
//! and single-node use.
//!
//! One write connection serializes all writers, which is what makes this
//! backend simple and correct: an append checks its expectation and writes in
//! one transaction no other writer can interleave with, and global positions
//! commit in order, so the feed follows them directly. Reads go through a
//! separate pool of read-only connections (WAL mode lets them run while a
//! write is in progress). Tenant scoping is enforced in code: every statement
//! names its tenant.

pub(crate) mod write;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::SqlitePool;
use statefabric_domain::{Checkpoint, RecordedEvent, Snapshot, StreamId, TenantId};
use tokio::sync::watch;
use uuid::Uuid;

use crate::error::{InvalidInput, Result, StoreError};
use crate::event_row::{EventColumns, recorded_event};
use crate::limits::Limits;
use crate::port::{AppendOutcome, AppendRequest, EventStore, Scope, StreamInfo};

/// Where and how the embedded store keeps its file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqliteConfig {
    /// The database file; created (with its directory) if missing.
    pub path: PathBuf,
    /// Read-only connections beside the single writer.
    pub read_connections: u32,
    /// Upper bound on every store call.
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
    /// How long idempotency keys are kept.
    #[serde(with = "humantime_serde")]
    pub idempotency_ttl: Duration,
    /// Bounds on what one call may ask.
    pub limits: Limits,
}

impl Default for SqliteConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("statefabric-data/events.db"),
            read_connections: 4,
            query_timeout: Duration::from_secs(10),
            idempotency_ttl: Duration::from_secs(24 * 3600),
            limits: Limits::default(),
        }
    }
}

/// The event, context, audit and replay stores in one SQLite file (the
/// embedded default): one writer connection, readers beside it.
#[derive(Debug, Clone)]
pub struct SqliteEventStore {
    writer: SqlitePool,
    reader: SqlitePool,
    config: Arc<SqliteConfig>,
    appended: Arc<watch::Sender<u64>>,
    context_writes: crate::context::sqlite::group::GroupWriter,
}

impl SqliteEventStore {
    /// Opens (creating if needed) the database and applies migrations.
    pub async fn open(config: SqliteConfig) -> Result<Self> {
        let statefabric_db::sqlite::Pools { writer, reader } = statefabric_db::sqlite::open(
            &config.path,
            config.read_connections,
            config.query_timeout,
        )
        .await
        .map_err(|e| match e {
            sqlx::Error::Migrate(_) => StoreError::Backend(e),
            other => StoreError::Unavailable(other),
        })?;
        let config = Arc::new(config);
        let context_writes =
            crate::context::sqlite::group::GroupWriter::spawn(writer.clone(), config.clone());
        Ok(Self {
            writer,
            reader,
            config,
            appended: Arc::new(watch::channel(0).0),
            context_writes,
        })
    }

    /// Registers a tenant; registering an existing one is a no-op.
    pub async fn create_tenant(&self, tenant: &TenantId, display_name: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO tenants (tenant_id, display_name) VALUES (?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(tenant.as_str())
        .bind(display_name)
        .execute(&self.writer)
        .await
        .map_err(map_err)?;
        Ok(())
    }

    pub(crate) fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    pub(crate) fn context_writes(&self) -> &crate::context::sqlite::group::GroupWriter {
        &self.context_writes
    }

    /// The single writer connection, for other tables in the same file
    /// (the saga store): sharing it keeps SQLite to one writer.
    pub fn writer_pool(&self) -> &SqlitePool {
        &self.writer
    }

    /// The read pool, for tests and tools that inspect the file.
    pub fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    pub(crate) async fn timed<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        crate::error::within(self.config.query_timeout, fut).await
    }

    async fn fetch_events(
        &self,
        sql: &'static str,
        binds: EventQuery<'_>,
    ) -> Result<Vec<RecordedEvent>> {
        let mut query = sqlx::query_as::<_, EventRow>(sql).bind(binds.tenant.as_str());
        if let Some(stream) = binds.stream {
            query = query.bind(stream.as_str());
        }
        let rows = query
            .bind(to_i64(binds.from))
            .bind(i64::from(binds.limit))
            .fetch_all(&self.reader)
            .await
            .map_err(map_err)?;
        rows.into_iter().map(EventRow::into_event).collect()
    }
}

struct EventQuery<'a> {
    tenant: &'a TenantId,
    stream: Option<&'a StreamId>,
    from: u64,
    limit: u32,
}

const COLUMNS: &str = "event_id, tenant_id, stream_id, stream_type, event_type, \
    event_schema_version, data, metadata, stream_version, global_position, created_at";

#[derive(sqlx::FromRow)]
struct EventRow {
    event_id: String,
    tenant_id: String,
    stream_id: String,
    stream_type: String,
    event_type: String,
    event_schema_version: i64,
    data: String,
    metadata: String,
    stream_version: i64,
    global_position: i64,
    created_at: DateTime<Utc>,
}

impl EventRow {
    fn into_event(self) -> Result<RecordedEvent> {
        let corrupt =
            |what: &str, e: &dyn std::fmt::Display| crate::context::corrupt(what, e.to_string());
        recorded_event(EventColumns {
            id: Uuid::parse_str(&self.event_id).map_err(|e| corrupt("event id", &e))?,
            tenant: self.tenant_id,
            stream: self.stream_id,
            stream_type: self.stream_type,
            event_type: self.event_type,
            schema_version: self.event_schema_version,
            data: serde_json::from_str(&self.data).map_err(|e| corrupt("data", &e))?,
            metadata: serde_json::from_str(&self.metadata).map_err(|e| corrupt("metadata", &e))?,
            stream_version: self.stream_version,
            global_position: self.global_position,
            commit: 0,
            created_at: self.created_at,
        })
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[async_trait]
impl EventStore for SqliteEventStore {
    #[tracing::instrument(name = "store.append", skip_all, fields(db.system = "sqlite", stream = %request.stream_id, events = request.events.len()))]
    async fn append(&self, scope: &Scope, request: AppendRequest) -> Result<AppendOutcome> {
        self.config.limits.check_append(&request)?;
        let outcome = self
            .timed(write::append(&self.writer, &self.config, scope, &request))
            .await?;
        if !outcome.replayed {
            self.appended.send_modify(|n| *n = n.wrapping_add(1));
        }
        Ok(outcome)
    }

    #[tracing::instrument(name = "store.read_stream", skip_all, fields(db.system = "sqlite", stream = %stream))]
    async fn read_stream(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
        from_version: u64,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>> {
        self.config.limits.check_read_limit(limit)?;
        if from_version == 0 {
            return Err(InvalidInput::Zero {
                what: "from_version",
            }
            .into());
        }
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT {COLUMNS} FROM event_store WHERE tenant_id = ? AND stream_id = ? \
                 AND stream_version >= ? ORDER BY stream_version LIMIT ?"
            )
        });
        let query = EventQuery {
            tenant,
            stream: Some(stream),
            from: from_version,
            limit,
        };
        self.timed(self.fetch_events(SQL.as_str(), query)).await
    }

    async fn read_all(
        &self,
        tenant: &TenantId,
        from_position: u64,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>> {
        self.config.limits.check_read_limit(limit)?;
        if from_position == 0 {
            return Err(InvalidInput::Zero {
                what: "from_position",
            }
            .into());
        }
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT {COLUMNS} FROM event_store WHERE tenant_id = ? AND global_position >= ? \
                 ORDER BY global_position LIMIT ?"
            )
        });
        let query = EventQuery {
            tenant,
            stream: None,
            from: from_position,
            limit,
        };
        self.timed(self.fetch_events(SQL.as_str(), query)).await
    }

    async fn read_feed(
        &self,
        tenant: &TenantId,
        after: Checkpoint,
        limit: u32,
    ) -> Result<Vec<RecordedEvent>> {
        self.config.limits.check_read_limit(limit)?;
        static SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
            format!(
                "SELECT {COLUMNS} FROM event_store WHERE tenant_id = ? AND global_position > ? \
                 ORDER BY global_position LIMIT ?"
            )
        });
        let query = EventQuery {
            tenant,
            stream: None,
            from: after.position,
            limit,
        };
        self.timed(self.fetch_events(SQL.as_str(), query)).await
    }

    async fn stream_info(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<Option<StreamInfo>> {
        self.timed(async {
            let row: Option<(i64, String)> = sqlx::query_as(
                "SELECT version, stream_type FROM streams WHERE tenant_id = ? AND stream_id = ?",
            )
            .bind(tenant.as_str())
            .bind(stream.as_str())
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
            Ok(row.map(|(version, stream_type)| StreamInfo {
                version: u64::try_from(version).unwrap_or_default(),
                stream_type,
            }))
        })
        .await
    }

    async fn save_snapshot(&self, scope: &Scope, snapshot: &Snapshot) -> Result<()> {
        crate::limits::check_name("stream type", &snapshot.stream_type)?;
        if snapshot.version == 0 {
            return Err(InvalidInput::Zero {
                what: "snapshot version",
            }
            .into());
        }
        self.timed(write::save_snapshot(&self.writer, scope, snapshot))
            .await
    }

    async fn load_snapshot(
        &self,
        tenant: &TenantId,
        stream: &StreamId,
    ) -> Result<Option<Snapshot>> {
        self.timed(async {
            let row: Option<(String, i64, String, i64)> = sqlx::query_as(
                "SELECT stream_type, stream_version, state, state_schema_version FROM snapshots \
                 WHERE tenant_id = ? AND stream_id = ?",
            )
            .bind(tenant.as_str())
            .bind(stream.as_str())
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
            row.map(|(stream_type, version, state, schema)| {
                Ok(Snapshot {
                    stream_id: stream.clone(),
                    stream_type,
                    version: u64::try_from(version).unwrap_or_default(),
                    state: serde_json::from_str(&state).map_err(|e| {
                        StoreError::Backend(sqlx::Error::Decode(
                            format!("stored snapshot: {e}").into(),
                        ))
                    })?,
                    schema_version: u32::try_from(schema).unwrap_or_default(),
                })
            })
            .transpose()
        })
        .await
    }

    async fn purge_expired_idempotency_keys(&self) -> Result<u64> {
        self.timed(async {
            let result = sqlx::query("DELETE FROM idempotency_keys WHERE expires_at_ms < ?")
                .bind(Utc::now().timestamp_millis())
                .execute(&self.writer)
                .await
                .map_err(map_err)?;
            Ok(result.rows_affected())
        })
        .await
    }

    async fn ping(&self) -> Result<()> {
        self.timed(async {
            sqlx::query("SELECT 1")
                .execute(&self.reader)
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

pub(crate) fn map_err(err: sqlx::Error) -> StoreError {
    match &err {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            StoreError::Unavailable(err)
        }
        _ => StoreError::Backend(err),
    }
}
