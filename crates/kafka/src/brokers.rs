//! How a process reaches Kafka: the bootstrap list and, on a broker that
//! authenticates, the process's SASL login. Every client this crate makes
//! starts from [`Brokers::client`], so no client forgets the login.

use serde::{Deserialize, Serialize};

/// The SASL mechanisms a Statefabric process can log in with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SaslMechanism {
    /// SCRAM with SHA-256.
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SCRAM with SHA-512 (the default).
    #[default]
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    /// librdkafka's name for it (`sasl.mechanism`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScramSha256 => "SCRAM-SHA-256",
            Self::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// A process's Kafka login (the `[kafka]` section of its configuration).
/// No username: the broker is reached without SASL (PLAINTEXT).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaAuth {
    /// How to log in.
    pub mechanism: SaslMechanism,
    /// The principal's name (empty: no SASL).
    pub username: String,
    /// Better given as `STATEFABRIC_KAFKA__PASSWORD` than in a file.
    pub password: String,
}

impl std::fmt::Debug for KafkaAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaAuth")
            .field("mechanism", &self.mechanism)
            .field("username", &self.username)
            .field(
                "password",
                &if self.password.is_empty() {
                    ""
                } else {
                    "<redacted>"
                },
            )
            .finish()
    }
}

impl KafkaAuth {
    /// A SCRAM-SHA-512 login.
    pub fn scram(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            mechanism: SaslMechanism::ScramSha512,
            username: username.into(),
            password: password.into(),
        }
    }

    /// Whether SASL is used (a username is set).
    pub fn is_enabled(&self) -> bool {
        !self.username.is_empty()
    }

    /// What is wrong with the login, if anything.
    pub fn problem(&self) -> Option<&'static str> {
        match (self.is_enabled(), self.password.is_empty()) {
            (true, true) => Some("a username needs a password (STATEFABRIC_KAFKA__PASSWORD)"),
            (false, false) => Some("a password without a username"),
            _ => None,
        }
    }
}

/// Where the brokers are and how to log in to them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Brokers {
    /// `host:port,…` of bootstrap brokers.
    pub bootstrap: String,
    /// The login.
    pub auth: KafkaAuth,
}

impl Brokers {
    /// The brokers at `bootstrap`, reached with `auth`.
    pub fn new(bootstrap: impl Into<String>, auth: KafkaAuth) -> Self {
        Self {
            bootstrap: bootstrap.into(),
            auth,
        }
    }

    /// A client configuration with the bootstrap list and the login set.
    #[cfg(feature = "client")]
    pub fn client(&self) -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        config.set("bootstrap.servers", &self.bootstrap);
        if self.auth.is_enabled() {
            config
                .set("security.protocol", "SASL_PLAINTEXT")
                .set("sasl.mechanism", self.auth.mechanism.as_str())
                .set("sasl.username", &self.auth.username)
                .set("sasl.password", &self.auth.password);
        }
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_is_checked_and_never_printed() {
        let auth = KafkaAuth::scram("sidecar", "s3cret");
        assert_eq!(auth.problem(), None);
        assert!(!format!("{auth:?}").contains("s3cret"));
        assert!(KafkaAuth::scram("sidecar", "").problem().is_some());
        let stray = KafkaAuth {
            password: "x".into(),
            ..KafkaAuth::default()
        };
        assert!(stray.problem().is_some());
        assert_eq!(KafkaAuth::default().problem(), None);
    }

    #[test]
    fn the_mechanism_reads_as_kafka_spells_it() {
        let auth: KafkaAuth =
            serde_json::from_str(r#"{"mechanism":"SCRAM-SHA-256","username":"a","password":"b"}"#)
                .expect("parses");
        assert_eq!(auth.mechanism, SaslMechanism::ScramSha256);
        assert!(serde_json::from_str::<KafkaAuth>(r#"{"mechanism":"PLAIN"}"#).is_err());
    }

    #[cfg(feature = "client")]
    #[test]
    fn the_client_carries_the_login() {
        let client = Brokers::new("b:1", KafkaAuth::scram("u", "p")).client();
        assert_eq!(client.get("security.protocol"), Some("SASL_PLAINTEXT"));
        assert_eq!(client.get("sasl.username"), Some("u"));
        let plain = Brokers::new("b:1", KafkaAuth::default()).client();
        assert_eq!(plain.get("security.protocol"), None);
        assert_eq!(plain.get("bootstrap.servers"), Some("b:1"));
    }
}
