//! Kafka to Postgres exactly once: a consumer process writes one effect per
//! message through the inbox and is killed (abort) right after an effect
//! commits and before its offset does; started again, it is handed that
//! message a second time, recognises it, and every message ends up with
//! exactly one effect.

use std::time::Duration;

use rdkafka::producer::{FutureProducer, FutureRecord};
use statefabric_tests as env;

#[tokio::test]
async fn a_consumer_killed_between_effect_and_commit_applies_nothing_twice() -> anyhow::Result<()> {
    let run = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("inbox-test-{run}");
    let group = format!("inbox-group-{run}");
    let table = format!("inbox_effects_{}", &run[..12]);
    statefabric_db::pg::migrate(&env::pg_admin_url()).await?;
    let owner = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&env::pg_admin_url())
        .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (id bigserial PRIMARY KEY, payload text NOT NULL)"
    )))
    .execute(&owner)
    .await?;

    env::kafka::create_topic(&topic, 2).await?;
    let producer: FutureProducer = env::kafka::admin().create()?;
    for i in 0..10 {
        producer
            .send(
                FutureRecord::to(&topic)
                    .key(&format!("k{}", i % 3))
                    .payload(&format!("m{i}")),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
    }

    let consumer = |crash_after: Option<&str>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_inbox-consumer"));
        command
            .env("TOPIC", &topic)
            .env("GROUP", &group)
            .env("PG_URL", env::pg_admin_url())
            .env("EFFECTS_TABLE", &table)
            .kill_on_drop(true);
        if let Some(n) = crash_after {
            command.env("CRASH_AFTER", n);
        }
        command.output()
    };
    let crashed = consumer(Some("4")).await?;
    assert!(
        !crashed.status.success(),
        "it was to die after the 4th effect: {}",
        String::from_utf8_lossy(&crashed.stderr)
    );
    let effects_after_crash: i64 =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(&owner)
            .await?;
    assert_eq!(effects_after_crash, 4);

    let resumed = consumer(None).await?;
    assert!(
        resumed.status.success(),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let stdout = String::from_utf8(resumed.stdout)?;
    let duplicates: u64 = stdout
        .trim()
        .strip_prefix("duplicates ")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("unexpected output: {stdout}"))?;
    assert!(
        duplicates >= 1,
        "the 4th message came again and was recognised"
    );

    let (total, distinct): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT count(*), count(DISTINCT payload) FROM {table}"
    )))
    .fetch_one(&owner)
    .await?;
    assert_eq!((total, distinct), (10, 10), "every message exactly once");
    let recorded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM consumer_inbox WHERE consumer_group = $1")
            .bind(&group)
            .fetch_one(&owner)
            .await?;
    assert_eq!(recorded, 10);
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
        .execute(&owner)
        .await?;
    Ok(())
}
