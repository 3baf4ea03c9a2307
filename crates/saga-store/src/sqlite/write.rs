//! Writes one transition into the embedded saga tables, inside the
//! caller's transaction (a commit of its own, or a savepoint of a batch).

use sqlx::SqliteConnection;

use super::{json_err, map_err};
use crate::{
    Committed, Result, StoreError, Transition, Trigger, duration_ms, status_str, timer_kind_str,
};

/// Writes `t` at `now` (ms). `TriggerGone` wrote nothing; `Exists` only
/// consumed the trigger; a conflict is an error and leaves writes the
/// caller must roll back.
pub(super) async fn transition(
    conn: &mut SqliteConnection,
    now: i64,
    t: &Transition,
) -> Result<Committed> {
    let saga = t.instance.id.as_str();
    let consumed = match &t.trigger {
        Trigger::Direct => 1,
        Trigger::Inbox(id) => sqlx::query("DELETE FROM saga_inbox WHERE inbox_id = ?")
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?
            .rows_affected(),
        Trigger::Timer { key, kind } => {
            sqlx::query("DELETE FROM saga_timers WHERE task_key = ? AND kind = ? AND fire_at <= ?")
                .bind(key)
                .bind(timer_kind_str(*kind))
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(map_err)?
                .rows_affected()
        }
    };
    if consumed == 0 {
        return Ok(Committed::TriggerGone);
    }
    let state = serde_json::to_string(&t.instance).map_err(json_err)?;
    let status = status_str(t.instance.status);
    let revision = if let Some(expected) = t.expected {
        let ended = t.instance.status.is_final().then_some(now);
        let updated = sqlx::query(
            "UPDATE saga_instances SET status = ?, paused = ?, state = ?, revision = revision + 1,
                        updated_at = ?, progressed_at = CASE WHEN ? THEN ? ELSE progressed_at END,
                        ended_at = CASE WHEN ? IS NULL THEN NULL ELSE coalesce(ended_at, ?) END
                  WHERE saga_id = ? AND revision = ?",
        )
        .bind(&status)
        .bind(t.instance.paused)
        .bind(&state)
        .bind(now)
        .bind(t.progressed)
        .bind(now)
        .bind(ended)
        .bind(now)
        .bind(saga)
        .bind(expected)
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
        if updated.rows_affected() == 0 {
            return Err(StoreError::Conflict(format!(
                "saga {saga} changed concurrently"
            )));
        }
        expected + 1
    } else {
        let inserted = sqlx::query(
            "INSERT INTO saga_instances (saga_id, tenant_id, definition, version, status, paused,
                        state, revision, started_at, updated_at, progressed_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, ?, ?) ON CONFLICT (saga_id) DO NOTHING",
        )
        .bind(saga)
        .bind(t.tenant.as_str())
        .bind(&t.instance.definition)
        .bind(i64::from(t.instance.version))
        .bind(&status)
        .bind(t.instance.paused)
        .bind(&state)
        .bind(now)
        .bind(now)
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
        if inserted.rows_affected() == 0 {
            return Ok(Committed::Exists);
        }
        1
    };
    if let Some(f) = &t.finish {
        let output = f
            .output
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(json_err)?;
        sqlx::query(
            "UPDATE saga_tasks SET status = ?, output = ?, error = ?, finished_at = ?
                  WHERE task_key = ? AND status = 'dispatched'",
        )
        .bind(f.status.as_str())
        .bind(output)
        .bind(&f.error)
        .bind(now)
        .bind(f.key.to_string())
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    }
    for key in &t.cancel {
        let key = key.to_string();
        sqlx::query("DELETE FROM saga_timers WHERE task_key = ?")
            .bind(&key)
            .execute(&mut *conn)
            .await
            .map_err(map_err)?;
        sqlx::query(
            "UPDATE saga_tasks SET status = 'cancelled', finished_at = ?
                  WHERE task_key = ? AND status = 'dispatched'",
        )
        .bind(now)
        .bind(&key)
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    }
    for task in &t.dispatch {
        sqlx::query(
            "INSERT INTO saga_tasks (task_key, saga_id, tenant_id, step, visit, attempt,
                        compensation, agent, action, input, timeout_ms, status, dispatched_at)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'dispatched', ?)
                 ON CONFLICT (task_key) DO NOTHING",
        )
        .bind(task.key.to_string())
        .bind(saga)
        .bind(t.tenant.as_str())
        .bind(&task.key.step)
        .bind(i64::from(task.key.visit))
        .bind(i64::from(task.key.attempt))
        .bind(task.key.compensation)
        .bind(&task.agent)
        .bind(&task.action)
        .bind(serde_json::to_string(&task.input).map_err(json_err)?)
        .bind(duration_ms(task.timeout))
        .bind(now)
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    }
    for (key, kind, after) in &t.timers {
        sqlx::query(
            "INSERT INTO saga_timers (saga_id, tenant_id, task_key, kind, fire_at)
                 VALUES (?, ?, ?, ?, ?)
                 ON CONFLICT (task_key, kind) DO UPDATE SET fire_at = excluded.fire_at",
        )
        .bind(saga)
        .bind(t.tenant.as_str())
        .bind(key.to_string())
        .bind(timer_kind_str(*kind))
        .bind(now.saturating_add(duration_ms(*after)))
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    }
    for (idx, record) in t.history.iter().enumerate() {
        sqlx::query(
            "INSERT INTO saga_history (saga_id, revision, idx, tenant_id, at, kind, actor, detail)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(saga)
        .bind(revision)
        .bind(i64::try_from(idx).unwrap_or_default())
        .bind(t.tenant.as_str())
        .bind(now)
        .bind(&record.kind)
        .bind(&record.actor)
        .bind(serde_json::to_string(&record.detail).map_err(json_err)?)
        .execute(&mut *conn)
        .await
        .map_err(map_err)?;
    }
    Ok(Committed::Written(revision))
}
