//! The lock contract on every adapter: in-process, the real standalone
//! Redis, and the real 6-node Redis Cluster.

use std::sync::Arc;

use statefabric_lock::LockService;
use statefabric_lock::memory::MemoryLocks;
use statefabric_lock::redis::RedisLocks;
use statefabric_tests as env;

async fn standalone() -> Arc<dyn LockService> {
    Arc::new(RedisLocks::new(env::redis_standalone().await.conn()))
}

async fn cluster() -> Arc<dyn LockService> {
    Arc::new(RedisLocks::new(env::redis_cluster().await.conn()))
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
