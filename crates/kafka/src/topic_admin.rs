//! Applying the topic plan on a cluster (the Kafka client side of
//! [`crate::topics`]).

use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::topics::{Planned, TopicSettings};

/// Why the topic plan could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    /// The admin client failed.
    #[error("Kafka admin: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The broker refused a change to one topic.
    #[error("topic {topic}: {code}")]
    Topic {
        /// The topic.
        topic: String,
        /// The broker's error.
        code: RDKafkaErrorCode,
    },
}

/// What `apply` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    /// Topics made.
    pub created: Vec<String>,
    /// Topics whose partitions or settings were changed.
    pub updated: Vec<String>,
}

/// Creates missing topics and (re)sets the configuration of existing ones;
/// safe to run again. Partition counts of existing topics are left alone
/// (raising them would move keys between partitions).
pub async fn apply(
    admin: &AdminClient<DefaultClientContext>,
    topics: &[Planned],
    settings: &TopicSettings,
    timeout: Duration,
) -> Result<Applied, TopicError> {
    let options = AdminOptions::new().operation_timeout(Some(timeout));
    let configs: Vec<(String, [(String, String); 3])> = topics
        .iter()
        .map(|t| {
            let class = settings.class(t.class);
            (
                t.name.clone(),
                [
                    ("cleanup.policy".to_owned(), "delete".to_owned()),
                    (
                        "retention.ms".to_owned(),
                        class.retention.as_millis().to_string(),
                    ),
                    (
                        "min.insync.replicas".to_owned(),
                        settings.min_insync_replicas.to_string(),
                    ),
                ],
            )
        })
        .collect();
    let new_topics: Vec<NewTopic> = topics
        .iter()
        .zip(&configs)
        .map(|(t, (_, config))| {
            config.iter().fold(
                NewTopic::new(
                    &t.name,
                    settings.class(t.class).partitions,
                    TopicReplication::Fixed(settings.replication),
                ),
                |topic, (k, v)| topic.set(k, v),
            )
        })
        .collect();
    let mut applied = Applied::default();
    let mut existing = Vec::new();
    for result in admin.create_topics(&new_topics, &options).await? {
        match result {
            Ok(name) => applied.created.push(name),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => existing.push(name),
            Err((topic, code)) => return Err(TopicError::Topic { topic, code }),
        }
    }
    let alters: Vec<AlterConfig> = configs
        .iter()
        .filter(|(name, _)| existing.contains(name))
        .map(|(name, config)| {
            config.iter().fold(
                AlterConfig::new(ResourceSpecifier::Topic(name)),
                |alter, (k, v)| alter.set(k, v),
            )
        })
        .collect();
    if !alters.is_empty() {
        for result in admin.alter_configs(&alters, &options).await? {
            match result {
                Ok(rdkafka::admin::OwnedResourceSpecifier::Topic(name)) => {
                    applied.updated.push(name);
                }
                Ok(_) => {}
                Err((spec, code)) => {
                    return Err(TopicError::Topic {
                        topic: format!("{spec:?}"),
                        code,
                    });
                }
            }
        }
    }
    Ok(applied)
}
