//! The session contract on every adapter: in-process, the real standalone
//! Redis, and the real 6-node Redis Cluster.

use std::sync::Arc;

use statefabric_session::SessionStore;
use statefabric_session::memory::MemorySessions;
use statefabric_session::redis::RedisSessions;
use statefabric_tests as env;

async fn standalone() -> Arc<dyn SessionStore> {
    Arc::new(RedisSessions::new(env::redis_standalone().await.conn()))
}

async fn cluster() -> Arc<dyn SessionStore> {
    Arc::new(RedisSessions::new(env::redis_cluster().await.conn()))
}

async fn memory() -> Arc<dyn SessionStore> {
    Arc::new(MemorySessions::default())
}

mod in_process {
    statefabric_tests::session_contract_tests!(super::memory());
}

mod redis_standalone {
    statefabric_tests::session_contract_tests!(super::standalone());
}

mod redis_cluster {
    statefabric_tests::session_contract_tests!(super::cluster());
}
