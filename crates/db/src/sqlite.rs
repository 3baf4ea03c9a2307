//! The embedded SQLite file: migrations and its pools — one writer
//! connection (SQLite has one writer at a time; a pool of one queues
//! writers in the process instead of in SQLite's busy loop) and read-only
//! connections beside it.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

/// Every SQLite migration, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/sqlite");

/// WAL pages after which a commit also copies the WAL into the database
/// file (SQLite's automatic checkpoint, run by the committing writer: the
/// copy and two fsyncs land on that one write's latency). SQLite's default
/// is 1,000 (4 MiB); a context write touched five or six pages (document,
/// revision, audit row and their indexes; four since migration 0006), so
/// that was a checkpoint every ~170 writes. A checkpoint copies each page
/// once however many frames it has in the WAL, and the hot pages are the
/// same few, so ten times the threshold is about a tenth of the
/// checkpoints for the same work each; the WAL file grows to at most
/// ~40 MiB before it is reused.
pub const WAL_AUTOCHECKPOINT_PAGES: u32 = 10_000;

/// The pools of one database file.
#[derive(Debug, Clone)]
pub struct Pools {
    /// The single writer connection.
    pub writer: SqlitePool,
    /// Read-only connections.
    pub reader: SqlitePool,
}

/// Opens the file at `path` (creating it and its directory if missing),
/// applies the migrations, and opens `read_connections` readers; every
/// wait (for the writer, for a lock) is bounded by `timeout`.
pub async fn open(
    path: &Path,
    read_connections: u32,
    timeout: Duration,
) -> Result<Pools, sqlx::Error> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir)?;
    }
    let base = SqliteConnectOptions::from_str("sqlite://")?
        .filename(path)
        .journal_mode(SqliteJournalMode::Wal)
        // WAL with NORMAL is durable across application crashes; only an
        // OS crash or power loss can lose the last transactions.
        .synchronous(SqliteSynchronous::Normal)
        .foreign_keys(true)
        .busy_timeout(timeout);
    // No ping before handing out a connection (sqlx's default): a
    // connection to a local file cannot have been dropped by a server or
    // the network, and each ping is a trip to the connection's thread.
    let writer = SqlitePoolOptions::new()
        .max_connections(1)
        .test_before_acquire(false)
        .acquire_timeout(timeout)
        .connect_with(
            base.clone()
                .create_if_missing(true)
                .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES.to_string()),
        )
        .await?;
    MIGRATOR.run(&writer).await?;
    let reader = SqlitePoolOptions::new()
        .max_connections(read_connections.max(1))
        .test_before_acquire(false)
        .acquire_timeout(timeout)
        .connect_with(base.read_only(true))
        .await?;
    Ok(Pools { writer, reader })
}
