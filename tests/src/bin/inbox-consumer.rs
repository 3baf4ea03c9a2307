//! A test consumer for the exactly-once inbox (`tests/tests/inbox.rs`), on
//! the consumer framework: each message's effect (a row in the effects
//! table) is written through the inbox, and the framework stores the offset
//! only after the handler returns. With `CRASH_AFTER=n` the process aborts
//! right after the n-th effect commits, before its offset is stored: the
//! worst moment to die (handlers past the n-th wait, so exactly n effects
//! exist). Stops after 15 s without a message; prints `duplicates N`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::message::{Message, OwnedMessage};
use statefabric_kafka::consumer::partitioned::PartitionedConsumer;
use statefabric_kafka::consumer::{ConsumerSettings, Handler};
use statefabric_kafka::dead_letter::Failure;
use statefabric_kafka::inbox::Inbox;
use tokio_util::sync::CancellationToken;

fn var(name: &str) -> anyhow::Result<String> {
    std::env::var(name).map_err(|_| anyhow::anyhow!("{name} is not set"))
}

struct Effects {
    inbox: Inbox,
    insert: String,
    crash_after: Option<u64>,
    started: AtomicU64,
    duplicates: Arc<AtomicU64>,
    activity: tokio::sync::watch::Sender<()>,
}

#[async_trait]
impl Handler for Effects {
    async fn handle(&self, message: &OwnedMessage) -> Result<(), Failure> {
        self.activity.send_replace(());
        let failed = |e: sqlx::Error| Failure::Failed(e.to_string());
        let Some(mut tx) = self.inbox.begin(message).await.map_err(failed)? else {
            self.duplicates.fetch_add(1, Ordering::SeqCst);
            return Ok(());
        };
        let payload = String::from_utf8_lossy(message.payload().unwrap_or_default()).into_owned();
        sqlx::query(sqlx::AssertSqlSafe(self.insert.clone()))
            .bind(payload)
            .execute(&mut *tx)
            .await
            .map_err(failed)?;
        let n = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        if self.crash_after.is_some_and(|limit| n > limit) {
            // Past the crash point: never commit (the process is about to die).
            std::future::pending::<()>().await;
        }
        tx.commit().await.map_err(failed)?;
        if Some(n) == self.crash_after {
            std::process::abort();
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (topic, group) = (var("TOPIC")?, var("GROUP")?);
    let table = var("EFFECTS_TABLE")?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&var("PG_URL")?)
        .await?;
    let duplicates = Arc::new(AtomicU64::new(0));
    let (activity, mut active) = tokio::sync::watch::channel(());
    let effects = Effects {
        inbox: Inbox::new(pool, &group),
        // Table names cannot be bound; this one comes from the test.
        insert: format!("INSERT INTO {table} (payload) VALUES ($1)"),
        crash_after: std::env::var("CRASH_AFTER")
            .ok()
            .and_then(|v| v.parse().ok()),
        started: AtomicU64::new(0),
        duplicates: duplicates.clone(),
        activity,
    };
    let mut settings = ConsumerSettings::new(
        statefabric_tests::kafka::Principal::Admin.brokers(),
        &group,
        &[&topic],
    );
    // The crashed run's member holds its partitions until its session times
    // out; keep that short so the restart gets them soon.
    settings.session_timeout = Duration::from_secs(6);
    let stop = CancellationToken::new();
    let consumer = tokio::spawn(PartitionedConsumer::new(settings, 4, effects).run(stop.clone()));
    while tokio::time::timeout(Duration::from_secs(15), active.changed())
        .await
        .is_ok_and(|changed| changed.is_ok())
    {}
    stop.cancel();
    consumer.await??;
    println!("duplicates {}", duplicates.load(Ordering::SeqCst));
    Ok(())
}
