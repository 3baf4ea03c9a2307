//! Kafka to Postgres, exactly once: [`Inbox::begin`] opens the transaction
//! the effect is written in and records the message's (group, topic,
//! partition, offset) in it first. If that position is already recorded the
//! message was handled before — delivered again because the consumer died
//! between its effect and its offset commit — and `begin` returns `None`.
//! The offset is committed to Kafka only after the transaction commits.

use rdkafka::message::Message;
use sqlx::{PgPool, Postgres, Transaction};

/// One consumer group's record of the messages it has handled.
#[derive(Debug, Clone)]
pub struct Inbox {
    pool: PgPool,
    group: String,
}

impl Inbox {
    /// The inbox of `group`, in the database behind `pool`.
    pub fn new(pool: PgPool, group: &str) -> Self {
        Self {
            pool,
            group: group.to_owned(),
        }
    }

    /// The transaction to write `message`'s effect in, or `None` when it
    /// already had its effect.
    pub async fn begin<M: Message>(
        &self,
        message: &M,
    ) -> Result<Option<Transaction<'static, Postgres>>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let recorded = sqlx::query(
            "INSERT INTO consumer_inbox (consumer_group, topic, partition, \"offset\") \
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(&self.group)
        .bind(message.topic())
        .bind(message.partition())
        .bind(message.offset())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if recorded == 0 {
            tx.rollback().await?;
            return Ok(None);
        }
        Ok(Some(tx))
    }
}
