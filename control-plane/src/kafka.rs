//! The control plane's Kafka side, on the leader: the outbox relay, the
//! saga reply consumer (Kafka transport) and consumer-lag monitoring. Built
//! only with the `kafka` feature (librdkafka); without it, configuring any of
//! them is refused at start-up with a clear message.

use std::sync::Arc;

use statefabric_leader::Leadership;
use statefabric_runtime::ServiceContext;
use statefabric_saga_store::SagaStore;

use crate::config::{ControlPlaneConfig, SagaTransport};

#[cfg(feature = "kafka")]
pub(crate) fn start(
    ctx: &ServiceContext<ControlPlaneConfig>,
    pool: Option<sqlx::PgPool>,
    leadership: &Leadership,
    saga_store: Option<Arc<dyn SagaStore>>,
) -> anyhow::Result<()> {
    use std::time::Duration;

    use anyhow::Context;
    use statefabric_kafka::lag::{LagMonitor, topics};
    use statefabric_relay::{Relay, RelaySettings};
    use statefabric_saga_kafka::ReplyConsumer;
    use statefabric_schema::{AvroCodec, RegistryClient};

    let relay = &ctx.config.relay;
    let codec = || {
        let registry = Arc::new(RegistryClient::new(&relay.registry_url, relay.timeout));
        Arc::new(AvroCodec::new(registry))
    };
    if let (Some(store), SagaTransport::Kafka) = (saga_store, ctx.config.sagas.transport) {
        let replies = ReplyConsumer {
            brokers: relay.brokers(&ctx.config.kafka),
            codec: codec(),
            store,
            topics: relay.topics,
            timeout: relay.timeout,
            metrics: Default::default(),
        };
        ctx.register_metrics(|registry| replies.metrics.register(registry));
        ctx.shutdown
            .spawn(replies.run(leadership.clone(), ctx.shutdown.token()));
    }
    if relay.enabled {
        let pool = pool.context("the relay needs the Postgres leader backend")?;
        let running = Relay::new(
            RelaySettings {
                brokers: relay.brokers(&ctx.config.kafka),
                transactional_id: relay.transactional_id.clone(),
                lease: ctx.config.leader.name.clone(),
                batch: relay.batch,
                idle_poll: relay.idle_poll,
                kafka_timeout: relay.timeout,
                topics: relay.topics,
            },
            pool,
            codec(),
        );
        ctx.register_metrics(|registry| running.register_metrics(registry));
        ctx.shutdown
            .spawn(running.run(leadership.clone(), ctx.shutdown.token()));
    }
    let lag = &ctx.config.lag;
    if !lag.groups.is_empty() {
        let monitor = LagMonitor::new(
            statefabric_kafka::brokers::Brokers::new(
                &lag.kafka_bootstrap,
                ctx.config.kafka.clone(),
            ),
            lag.groups
                .iter()
                .map(|(group, list)| (group.clone(), topics(list)))
                .collect(),
            Duration::from_secs(10),
        );
        ctx.register_metrics(|registry| monitor.register_metrics(registry));
        ctx.shutdown
            .spawn(monitor.run(lag.interval, ctx.shutdown.token()));
    }
    Ok(())
}

/// Without Kafka support built in: refuses a configuration that needs it.
#[cfg(not(feature = "kafka"))]
pub fn start(
    ctx: &ServiceContext<ControlPlaneConfig>,
    _pool: Option<sqlx::PgPool>,
    _leadership: &Leadership,
    _saga_store: Option<Arc<dyn SagaStore>>,
) -> anyhow::Result<()> {
    let c = &ctx.config;
    if c.relay.enabled || !c.lag.groups.is_empty() || c.sagas.transport == SagaTransport::Kafka {
        anyhow::bail!(
            "[relay], [lag] and sagas.transport = kafka need Kafka, and this control plane was built without it (feature `kafka`)"
        );
    }
    Ok(())
}
