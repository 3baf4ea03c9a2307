//! The real Redis Cluster changing under load. A primary fails (SIGSTOP, so
//! it stops answering without closing connections, the nastiest way) and its
//! replica takes over: lock grants continue after the failover and never
//! repeat or go back on a fencing token. A slot is resharded to another
//! primary while locks in it are taken and released: MOVED/ASK are followed
//! and nothing fails. In a file of their own (test files run one after
//! another) and serialized here, as each disturbs the shared cluster.

use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use statefabric_domain::TenantId;
use statefabric_lock::LockService;
use statefabric_lock::redis::RedisLocks;
use statefabric_tests as env;

/// One cluster disturbance at a time.
static DISTURBING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    let (primary, replica, _) = topology(seed, slot).await?;
    Ok((primary, replica))
}

/// Node id by port, from CLUSTER NODES.
async fn node_ids(seed: &str) -> anyhow::Result<Vec<(String, String, bool)>> {
    let text: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut node(seed).await?)
        .await?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(' ').collect();
            let port = f.get(1)?.split(['@', ':']).nth(1)?.to_owned();
            Some((f[0].to_owned(), port, f.get(2)?.contains("master")))
        })
        .collect())
}

async fn topology(seed: &str, slot: u16) -> anyhow::Result<(String, String, String)> {
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
    let owner = id.clone();
    let replica = text
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.len() > 3 && f[2].contains("slave") && f[3] == id)
        .map(|f| port(f[1]))
        .ok_or_else(|| anyhow::anyhow!("no replica of {primary}"))?;
    Ok((primary, replica, owner))
}

/// Slots a node holds open (`[slot-<-id]` importing, `[slot->-id]`
/// migrating) in its own line of `CLUSTER NODES`.
fn open_slots(nodes: &str) -> Vec<u16> {
    nodes
        .lines()
        .filter(|l| l.contains("myself"))
        .flat_map(|l| l.split(' '))
        .filter_map(|f| f.strip_prefix('['))
        .filter(|f| f.contains("-<-") || f.contains("->-"))
        .filter_map(|f| f.split('-').next()?.parse().ok())
        .collect()
}

/// Every node is in the cluster, and every replica is streaming from its
/// primary (a replica still catching up cannot stand in). A slot an
/// earlier, interrupted move left open is closed first (no move runs now:
/// callers hold `DISTURBING`): a node with an open slot ignores news of its
/// owner and reports the cluster down.
async fn cluster_whole() -> anyhow::Result<()> {
    let ports: Vec<String> = env::redis_cluster_urls()
        .iter()
        .map(|url| url.rsplit(':').next().unwrap_or_default().to_owned())
        .collect();
    for port in &ports {
        let mut conn = node(port).await?;
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await?;
        for slot in open_slots(&nodes) {
            redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("STABLE")
                .query_async::<()>(&mut conn)
                .await?;
        }
    }
    for port in ports {
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
    let _one_at_a_time = DISTURBING.lock().await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_keep_working_while_their_slot_moves() -> anyhow::Result<()> {
    let _one_at_a_time = DISTURBING.lock().await;
    cluster_whole().await?;
    let locks = std::sync::Arc::new(RedisLocks::new(env::redis_cluster().await.conn()));
    let tenant = TenantId::new(format!("t-{}", uuid::Uuid::new_v4().simple()))?;
    let name = "resharded";
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
    let (source_port, _, source_id) = topology(&seed, slot).await?;
    let (target_id, target_port, _) = node_ids(&seed)
        .await?
        .into_iter()
        .find(|(id, _, master)| *master && *id != source_id)
        .ok_or_else(|| anyhow::anyhow!("no other primary"))?;

    // Take and release the lock over and over while the slot moves.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (locks, tenant, stop) = (locks.clone(), tenant.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut last, mut grants) = (0, 0u32);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let lease = locks
                    .acquire(
                        &tenant,
                        name,
                        "worker",
                        Duration::from_secs(5),
                        Duration::ZERO,
                    )
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("own free lock refused"))?;
                anyhow::ensure!(lease.token > last, "token went back");
                last = lease.token;
                grants += 1;
                locks.release(&lease).await?;
            }
            anyhow::Ok(grants)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;

    let (mut source, mut target) = (node(&source_port).await?, node(&target_port).await?);
    let setslot = |how: &str, id: &str| {
        redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg(how)
            .arg(id)
            .clone()
    };
    setslot("IMPORTING", &source_id)
        .query_async::<()>(&mut target)
        .await?;
    setslot("MIGRATING", &target_id)
        .query_async::<()>(&mut source)
        .await?;
    // Keys move right away, in batches, as `redis-cli --cluster reshard`
    // does: while some of a script's keys have moved and some have not, the
    // source answers TRYAGAIN, which the client retries with short pauses.
    loop {
        let keys: Vec<String> = redis::cmd("CLUSTER")
            .arg("GETKEYSINSLOT")
            .arg(slot)
            .arg(100)
            .query_async(&mut source)
            .await?;
        if keys.is_empty() {
            break;
        }
        redis::cmd("MIGRATE")
            .arg("127.0.0.1")
            .arg(&target_port)
            .arg("")
            .arg(0)
            .arg(5000)
            .arg("KEYS")
            .arg(&keys)
            .query_async::<()>(&mut source)
            .await?;
    }
    // Then the new owner is set at once, as the tools do: until then a
    // script whose keys are only partly present gets TRYAGAIN on either side.
    for (_, port, master) in node_ids(&seed).await? {
        if master {
            setslot("NODE", &target_id)
                .query_async::<()>(&mut node(&port).await?)
                .await?;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let grants = load.await??;
    assert!(grants > 10, "the load ran throughout ({grants} grants)");
    let (now_port, _, _) = topology(&seed, slot).await?;
    assert_eq!(now_port, target_port, "the slot moved");
    let counter: Option<String> = redis::cmd("GET")
        .arg(format!("{{sf:lock:{tenant}:{name}}}:token"))
        .query_async(&mut target)
        .await?;
    assert!(counter.is_some(), "the token counter moved with its slot");
    cluster_whole().await?;
    Ok(())
}

#[test]
fn open_slots_are_read_from_the_nodes_own_line() {
    let nodes = "a 127.0.0.1:1@2 myself,master - 0 0 1 connected 0-5 [9237-<-b] [12->-c]\n\
                 b 127.0.0.1:3@4 master - 0 0 2 connected 6-10 [7-<-a]\n";
    assert_eq!(open_slots(nodes), vec![9237, 12]);
    assert!(open_slots("a x myself,master - 0 0 1 connected 0-16383").is_empty());
}
