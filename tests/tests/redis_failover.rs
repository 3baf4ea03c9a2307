//! A primary of the real Redis Cluster fails (SIGSTOP, so it stops
//! answering without closing connections, the nastiest way) and its replica
//! takes over: lock grants continue after the failover and never repeat or
//! go back on a fencing token. Alone in its file: it disturbs the shared
//! cluster for a few seconds, and test files run one after another.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use statefabric_domain::TenantId;
use statefabric_lock::LockService;
use statefabric_lock::redis::RedisLocks;
use statefabric_tests as env;

/// Resumes the stopped node even if the test fails half-way.
struct Resume(i32);

impl Drop for Resume {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.0), Signal::SIGCONT);
    }
}

async fn node(port: &str) -> anyhow::Result<redis::aio::MultiplexedConnection> {
    Ok(redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_multiplexed_async_connection()
        .await?)
}

async fn role(port: &str) -> Option<String> {
    let mut conn = node(port).await.ok()?;
    let answer = tokio::time::timeout(
        Duration::from_millis(500),
        redis::cmd("ROLE").query_async::<Vec<redis::Value>>(&mut conn),
    )
    .await
    .ok()?
    .ok()?;
    match answer.first() {
        Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
        Some(redis::Value::SimpleString(s)) => Some(s.clone()),
        _ => None,
    }
}

/// (primary port, replica port) serving `slot`, from CLUSTER NODES.
async fn owners(seed: &str, slot: u16) -> anyhow::Result<(String, String)> {
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut node(seed).await?)
        .await?;
    let port = |addr: &str| addr.split(['@', ':']).nth(1).unwrap_or_default().to_owned();
    let mut primary = None;
    for line in text.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() > 8 && f[2].contains("master") && !f[2].contains("fail") {
            let serves = f[8..].iter().any(|range| {
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                matches!((a.parse::<u16>(), b.parse::<u16>()), (Ok(a), Ok(b)) if a <= slot && slot <= b)
            });
            if serves {
                primary = Some((f[0].to_owned(), port(f[1])));
            }
        }
    }
    let (id, primary) = primary.ok_or_else(|| anyhow::anyhow!("no primary for slot {slot}"))?;
    let replica = text
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[2].contains("slave") && f[3] == id)
        .map(|f| port(f[1]))
        .ok_or_else(|| anyhow::anyhow!("no replica of {primary}"))?;
    Ok((primary, replica))
}

/// Every node is in the cluster, and every replica is streaming from its
/// primary (a replica still catching up cannot stand in).
async fn cluster_whole() -> anyhow::Result<()> {
    for url in env::redis_cluster_urls() {
        let port = url.rsplit(':').next().unwrap_or_default().to_owned();
        env::eventually(
            "cluster whole and replicas in sync",
            Duration::from_secs(60),
            || {
                let port = port.clone();
                async move {
                    let mut conn = node(&port).await?;
                    let cluster: String = redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut conn)
                        .await?;
                    let replication: String = redis::cmd("INFO")
                        .arg("replication")
                        .query_async(&mut conn)
                        .await?;
                    let synced = replication.contains("role:master")
                        || replication.contains("master_link_status:up");
                    Ok((cluster.contains("cluster_state:ok") && synced).then_some(()))
                }
            },
        )
        .await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_never_hands_out_a_token_twice() -> anyhow::Result<()> {
    cluster_whole().await?;
    let locks = RedisLocks::new(env::redis_cluster().await.conn());
    let tenant = TenantId::new(format!("t-{}", uuid::Uuid::new_v4().simple()))?;
    let name = "failover";
    let seed = env::redis_cluster_urls()[0]
        .rsplit(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(format!("{{sf:lock:{tenant}:{name}}}"))
        .query_async(&mut node(&seed).await?)
        .await?;
    let (primary, replica) = owners(&seed, slot).await?;

    let mut last = 0;
    for _ in 0..20 {
        let lease = locks
            .acquire(
                &tenant,
                name,
                "before",
                Duration::from_secs(5),
                Duration::ZERO,
            )
            .await?
            .expect("free");
        assert!(lease.token > last);
        last = lease.token;
        locks.release(&lease).await?;
    }

    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut node(&primary).await?)
        .await?;
    let pid: i32 = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("process_id:"))
        .ok_or_else(|| anyhow::anyhow!("no process_id"))?
        .parse()?;
    kill(Pid::from_raw(pid), Signal::SIGSTOP)?;
    let resume = Resume(pid);
    env::eventually("the replica takes over", Duration::from_secs(30), || {
        let replica = replica.clone();
        async move { Ok((role(&replica).await.as_deref() == Some("master")).then_some(())) }
    })
    .await?;

    let after = env::eventually(
        "a grant after the failover",
        Duration::from_secs(30),
        || async {
            Ok(locks
                .acquire(
                    &tenant,
                    name,
                    "after",
                    Duration::from_secs(5),
                    Duration::ZERO,
                )
                .await
                .ok()
                .flatten())
        },
    )
    .await?;
    assert!(
        after.token > last,
        "token {} after the failover is not above {last}",
        after.token
    );
    locks.release(&after).await?;

    // Put the old primary back; it rejoins as a replica and the cluster is
    // whole again for the tests that follow.
    drop(resume);
    env::eventually(
        "the old primary rejoins as a replica",
        Duration::from_secs(30),
        || {
            let primary = primary.clone();
            async move { Ok((role(&primary).await.as_deref() == Some("slave")).then_some(())) }
        },
    )
    .await?;
    cluster_whole().await?;
    Ok(())
}
