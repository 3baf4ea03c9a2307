//! A test consumer for the exactly-once inbox (`tests/tests/inbox.rs`):
//! consumes a topic, writes one row per message into an effects table through
//! the inbox, then commits the offset. With `CRASH_AFTER=n` it aborts the
//! process right after the n-th effect commits and before its offset commit:
//! the worst moment to die. Prints `duplicates N` when it ends.

use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use statefabric_kafka::inbox::Inbox;

fn var(name: &str) -> anyhow::Result<String> {
    std::env::var(name).map_err(|_| anyhow::anyhow!("{name} is not set"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (topic, group) = (var("TOPIC")?, var("GROUP")?);
    let table = var("EFFECTS_TABLE")?;
    let crash_after: Option<u64> = std::env::var("CRASH_AFTER")
        .ok()
        .and_then(|v| v.parse().ok());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&var("PG_URL")?)
        .await?;
    let inbox = Inbox::new(pool, &group);
    let consumer: StreamConsumer = statefabric_tests::kafka::admin()
        .set("group.id", &group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        // The crashed run's member holds its partitions until its session
        // times out; keep that short so the restart gets them soon.
        .set("session.timeout.ms", "6000")
        .create()?;
    consumer.subscribe(&[&topic])?;
    let (mut handled, mut duplicates) = (0u64, 0u64);
    // Table names cannot be bound; this one comes from the test.
    let insert = format!("INSERT INTO {table} (payload) VALUES ($1)");
    while let Ok(message) = tokio::time::timeout(Duration::from_secs(15), consumer.recv()).await {
        let message = message?;
        match inbox.begin(&message).await? {
            Some(mut tx) => {
                let payload =
                    String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
                sqlx::query(sqlx::AssertSqlSafe(insert.clone()))
                    .bind(payload)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                handled += 1;
                if Some(handled) == crash_after {
                    std::process::abort();
                }
            }
            None => duplicates += 1,
        }
        consumer.commit_message(&message, CommitMode::Sync)?;
    }
    println!("duplicates {duplicates}");
    Ok(())
}
