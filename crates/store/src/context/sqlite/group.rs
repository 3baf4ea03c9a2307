//! Group commit for context writes on SQLite's single writer connection.
//!
//! Writes are handed to one task that owns the writing. Whatever arrived
//! while the previous transaction ran goes into the next one together (up
//! to [`MAX_GROUP`]): sixteen concurrent writers pay one BEGIN, one COMMIT
//! and one WAL append instead of sixteen, and each write still sees every
//! write before it (same connection, same transaction). A lone write costs
//! what it did before plus a channel hop.
//!
//! A write refused while being checked ([`prepare`]) wrote nothing — those
//! that write while checking (idempotency key, fence) run inside a savepoint
//! that is rolled back — so the others in its group go on. A failure while
//! writing ([`apply`]) may have written part of a write: the whole group is
//! rolled back and every write in it runs again alone, so each gets the
//! answer it would have got without grouping. A write with neither key
//! nor fence decided on its caller's known document skips its read: its
//! writes are conditional on the document's revision, and only if that
//! changed is it read and decided again. Alone, such a write is one batch
//! with its BEGIN and COMMIT; one that must read folds BEGIN into its read
//! and COMMIT into its writes ([`alone_plain`]).
//!
//! Written here rather than found in a library: sqlx has no group commit,
//! and the grouping needs the store's own refusal-versus-failure split.

use std::sync::Arc;

use sqlx::SqlitePool;
use tokio::sync::{mpsc, oneshot};

use super::{Finish, Prepared, apply, prepare, prepare_plain};
use crate::context::{ContextOutcome, ContextWrite, decide_on_known};
use crate::error::{Result, StoreError};
use crate::port::Scope;
use crate::sqlite::{SqliteConfig, map_err};

/// The most writes one transaction takes.
const MAX_GROUP: usize = 64;

/// Writes waiting for the writer task; a full queue makes writers wait
/// (backpressure), never drops.
const QUEUE: usize = 1024;

struct Job {
    scope: Scope,
    write: ContextWrite,
    reply: oneshot::Sender<Result<ContextOutcome>>,
}

/// The way in to the writer task; it ends when every handle is gone.
#[derive(Debug, Clone)]
pub(crate) struct GroupWriter {
    jobs: mpsc::Sender<Job>,
}

impl GroupWriter {
    /// Starts the writer task on the current runtime.
    pub(crate) fn spawn(writer: SqlitePool, config: Arc<SqliteConfig>) -> Self {
        let (jobs, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(writer, config, rx));
        Self { jobs }
    }

    /// Writes, in whichever group the task puts it.
    pub(crate) async fn submit(&self, scope: Scope, write: ContextWrite) -> Result<ContextOutcome> {
        let (reply, answer) = oneshot::channel();
        let gone = || StoreError::Backend(sqlx::Error::PoolClosed);
        self.jobs
            .send(Job {
                scope,
                write,
                reply,
            })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn run(writer: SqlitePool, config: Arc<SqliteConfig>, mut rx: mpsc::Receiver<Job>) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    while rx.recv_many(&mut group, MAX_GROUP).await > 0 {
        // A writer that stopped waiting (its timeout) gets nothing written:
        // it was told the write failed.
        group.retain(|job| !job.reply.is_closed());
        if group.is_empty() {
            continue;
        }
        if let [job] = group.as_slice() {
            let outcome = alone(&writer, &config, &job.scope, &job.write).await;
            answer(group.drain(..), std::iter::once(outcome));
            continue;
        }
        match together(&writer, &config, &group).await {
            Ok(outcomes) => answer(group.drain(..), outcomes),
            Err(_) => {
                for job in group.drain(..) {
                    let outcome = alone(&writer, &config, &job.scope, &job.write).await;
                    let _ = job.reply.send(outcome);
                }
            }
        }
    }
}

fn answer(
    jobs: impl Iterator<Item = Job>,
    outcomes: impl IntoIterator<Item = Result<ContextOutcome>>,
) {
    for (job, outcome) in jobs.zip(outcomes) {
        // A writer that gave up waiting (its timeout) is not an error here.
        let _ = job.reply.send(outcome);
    }
}

/// One write in a transaction of its own: committed if it succeeded,
/// rolled back otherwise.
async fn alone(
    writer: &SqlitePool,
    config: &SqliteConfig,
    scope: &Scope,
    write: &ContextWrite,
) -> Result<ContextOutcome> {
    if write.idempotency.is_none() && write.fence.is_none() {
        return alone_plain(writer, scope, write).await;
    }
    let mut tx = writer.begin().await.map_err(map_err)?;
    let result = match prepare(&mut tx, config, scope, write).await {
        Ok(Prepared::Next(next)) => apply_read(&mut tx, scope, write, next, Finish::Open).await,
        Ok(Prepared::Replayed(outcome)) => Ok(outcome),
        Err(e) => Err(e),
    };
    match &result {
        Ok(outcome) if !outcome.replayed => tx.commit().await.map_err(map_err)?,
        _ => tx.rollback().await.map_err(map_err)?,
    }
    result
}

/// A write with neither key nor fence, alone: one trip to SQLite's
/// connection thread when it is decided on the caller's known document
/// and that is still the stored one; otherwise two — begin with the read,
/// then the writes with the commit. The transaction is begun and ended by
/// hand (sqlx's `Transaction` takes a trip of its own for each), so every
/// way out that did not commit rolls back before the connection goes back
/// to the pool; this task is never cancelled part way.
async fn alone_plain(
    writer: &SqlitePool,
    scope: &Scope,
    write: &ContextWrite,
) -> Result<ContextOutcome> {
    let mut conn = writer.acquire().await.map_err(map_err)?;
    let result = match apply_unread(&mut conn, scope, write, Finish::Whole).await {
        Ok(Some(outcome)) => Ok(outcome),
        // Stale or absent: decide on what is stored.
        Ok(None) => match prepare_plain(&mut conn, scope, write).await {
            Ok(next) => apply_read(&mut conn, scope, write, next, Finish::Commit).await,
            Err(refused) => Err(refused),
        },
        Err(failed) => Err(failed),
    };
    if result.is_err() {
        // "No transaction is active" when BEGIN or COMMIT itself failed:
        // nothing to undo then.
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
    }
    result
}

/// Every write of `group` in one transaction. `Err` when the group must be
/// redone write by write (a write failed part way, or the commit failed);
/// nothing of it is then committed.
async fn together(
    writer: &SqlitePool,
    config: &SqliteConfig,
    group: &[Job],
) -> Result<Vec<Result<ContextOutcome>>> {
    let mut tx = writer.begin().await.map_err(map_err)?;
    let mut outcomes = Vec::with_capacity(group.len());
    for job in group {
        let (scope, write) = (&job.scope, &job.write);
        // Checking an idempotency key or a fence writes: undo it if the
        // write is refused or replayed.
        let guarded = write.idempotency.is_some() || write.fence.is_some();
        if guarded {
            statement(&mut tx, "SAVEPOINT context_write").await?;
        }
        // A plain write decided on its caller's known document skips its
        // read unless that document is out of date (the caller's copy is
        // old, or an earlier write of this group changed it).
        let unread = if guarded {
            None
        } else {
            apply_unread(&mut tx, scope, write, Finish::Open).await?
        };
        let outcome = match unread {
            Some(outcome) => Ok(outcome),
            None => match prepare(&mut tx, config, scope, write).await {
                Ok(Prepared::Next(next)) => {
                    Ok(apply_read(&mut tx, scope, write, next, Finish::Open).await?)
                }
                Ok(Prepared::Replayed(outcome)) => Ok(outcome),
                Err(refused) => Err(refused),
            },
        };
        if guarded {
            if !matches!(&outcome, Ok(o) if !o.replayed) {
                statement(&mut tx, "ROLLBACK TO context_write").await?;
            }
            statement(&mut tx, "RELEASE context_write").await?;
        }
        outcomes.push(outcome);
    }
    tx.commit().await.map_err(map_err)?;
    Ok(outcomes)
}

/// [`apply`] for a write decided on its caller's known document, without
/// reading it: `None` when there is none to decide on, or it is out of
/// date (nothing written), and the write must be read and decided again.
async fn apply_unread(
    conn: &mut sqlx::SqliteConnection,
    scope: &Scope,
    write: &ContextWrite,
    finish: Finish,
) -> Result<Option<ContextOutcome>> {
    match decide_on_known(write, &scope.actor) {
        Some(next) => apply(conn, scope, write, next, finish).await,
        None => Ok(None),
    }
}

/// [`apply`] for a write decided on the document read in this
/// transaction, whose write lock it holds: it cannot have changed since.
async fn apply_read(
    conn: &mut sqlx::SqliteConnection,
    scope: &Scope,
    write: &ContextWrite,
    next: crate::context::Stored,
    finish: Finish,
) -> Result<ContextOutcome> {
    apply(conn, scope, write, next, finish)
        .await?
        .ok_or_else(|| {
            StoreError::Backend(sqlx::Error::Protocol(format!(
                "context document {} changed under the write lock",
                write.id
            )))
        })
}

async fn statement(
    tx: &mut sqlx::Transaction<'static, sqlx::Sqlite>,
    sql: &'static str,
) -> Result<()> {
    sqlx::query(sql)
        .execute(&mut **tx)
        .await
        .map(drop)
        .map_err(map_err)
}
