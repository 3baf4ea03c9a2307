//! The lock contract on every adapter: in-process, the real standalone
//! Redis, and the real 6-node Redis Cluster.

use std::sync::Arc;

use statefabric_lock::LockService;
use statefabric_lock::memory::MemoryLocks;
use statefabric_lock::redis::RedisLocks;
use statefabric_tests as env;

async fn standalone() -> Arc<dyn LockService> {
    let client = redis::Client::open(env::redis_url()).expect("url");
    let manager = redis::aio::ConnectionManager::new(client)
        .await
        .unwrap_or_else(|e| panic!("redis ({}): {e}", env::START_HINT));
    Arc::new(RedisLocks::new(manager))
}

async fn cluster() -> Arc<dyn LockService> {
    let client = redis::cluster::ClusterClient::new(env::redis_cluster_urls()).expect("urls");
    let conn = client
        .get_async_connection()
        .await
        .unwrap_or_else(|e| panic!("redis cluster ({}): {e}", env::START_HINT));
    Arc::new(RedisLocks::new(conn))
}

async fn memory() -> Arc<dyn LockService> {
    Arc::new(MemoryLocks::default())
}

mod in_process {
    statefabric_tests::lock_contract_tests!(super::memory());
}

mod redis_standalone {
    statefabric_tests::lock_contract_tests!(super::standalone());
}

mod redis_cluster {
    statefabric_tests::lock_contract_tests!(super::cluster());
}
