//! Polls each Redis node's memory use (`INFO memory`) into gauges, for the
//! alert at 80 % of maxmemory (`k8s/charts/statefabric/files/rules/redis.rules.yaml`).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabel {
    node: String,
}

/// Memory gauges per node; clones share them.
#[derive(Debug, Clone, Default)]
pub struct MemoryGauges {
    used: Family<NodeLabel, Gauge>,
    max: Family<NodeLabel, Gauge>,
}

impl MemoryGauges {
    /// Registers the gauges (`redis_used_memory_bytes`, …) in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let sub = registry.sub_registry_with_prefix("redis");
        sub.register(
            "used_memory_bytes",
            "Memory Redis uses, per node (INFO memory used_memory)",
            self.used.clone(),
        );
        sub.register(
            "maxmemory_bytes",
            "Configured maxmemory per node (0: unlimited)",
            self.max.clone(),
        );
    }

    /// Reads every node once; a node that does not answer is skipped (and
    /// keeps its last value) and logged.
    pub async fn poll(&self, urls: &[String], timeout: Duration) {
        for url in urls {
            let read = async {
                let mut conn = redis::Client::open(url.as_str())?
                    .get_multiplexed_async_connection()
                    .await?;
                redis::cmd("INFO")
                    .arg("memory")
                    .query_async::<String>(&mut conn)
                    .await
            };
            match tokio::time::timeout(timeout, read).await {
                Ok(Ok(info)) => {
                    let label = NodeLabel { node: url.clone() };
                    if let Some(used) = field(&info, "used_memory") {
                        self.used.get_or_create(&label).set(used);
                    }
                    if let Some(max) = field(&info, "maxmemory") {
                        self.max.get_or_create(&label).set(max);
                    }
                }
                Ok(Err(err)) => tracing::warn!(%url, error = %err, "cannot read Redis memory"),
                Err(_) => tracing::warn!(%url, "Redis memory read timed out"),
            }
        }
    }

    /// Polls every `interval` until `stop` resolves.
    pub async fn run(self, urls: Vec<String>, interval: Duration, stop: CancellationToken) {
        loop {
            self.poll(&urls, interval.min(Duration::from_secs(5))).await;
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(interval) => {}
            }
        }
    }
}

fn field(info: &str, name: &str) -> Option<i64> {
    info.lines().find_map(|line| {
        let (key, value) = line.trim().split_once(':')?;
        (key == name).then(|| value.parse().ok()).flatten()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_info_fields_exactly() {
        let info = "# Memory\r\nused_memory:1024\r\nused_memory_human:1K\r\nmaxmemory:4096\r\n";
        assert_eq!(super::field(info, "used_memory"), Some(1024));
        assert_eq!(super::field(info, "maxmemory"), Some(4096));
        assert_eq!(super::field(info, "absent"), None);
    }
}
