//! Validated identifiers.
//!
//! Ids travel into SQL, Kafka keys, Redis keys and log lines, so they are
//! restricted to a conservative alphabet: ASCII letters, digits and `-_.:@`,
//! 1 to 128 bytes. Tenant ids are stricter (lowercase, no `:`), because they
//! also appear in topic names and Postgres settings.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// The id is empty.
    #[error("{kind} is empty")]
    Empty {
        /// Which kind of id (`tenant id`, `stream id`, …).
        kind: &'static str,
    },
    /// The id is longer than its kind allows.
    #[error("{kind} is {len} bytes long; the maximum is {max}")]
    TooLong {
        /// Which kind of id.
        kind: &'static str,
        /// Its length in bytes.
        len: usize,
        /// The most its kind allows.
        max: usize,
    },
    /// The id holds a character its kind does not allow.
    #[error("{kind} `{value}` contains {found:?} at byte {at}; allowed: {allowed}")]
    BadChar {
        /// Which kind of id.
        kind: &'static str,
        /// The id given.
        value: String,
        /// The character refused.
        found: char,
        /// Its byte offset.
        at: usize,
        /// What the kind allows.
        allowed: &'static str,
    },
}

struct Rule {
    kind: &'static str,
    max: usize,
    allowed: &'static str,
    accept: fn(char) -> bool,
}

impl Rule {
    fn check(&self, value: &str) -> Result<(), IdError> {
        if value.is_empty() {
            return Err(IdError::Empty { kind: self.kind });
        }
        if value.len() > self.max {
            return Err(IdError::TooLong {
                kind: self.kind,
                len: value.len(),
                max: self.max,
            });
        }
        if let Some((at, found)) = value.char_indices().find(|(_, c)| !(self.accept)(*c)) {
            return Err(IdError::BadChar {
                kind: self.kind,
                value: value.to_owned(),
                found,
                at,
                allowed: self.allowed,
            });
        }
        Ok(())
    }
}

const TENANT: Rule = Rule {
    kind: "tenant id",
    max: 64,
    allowed: "lowercase ASCII letters, digits, '-' and '_'",
    accept: |c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_',
};

const GENERAL_ALLOWED: &str = "ASCII letters, digits, '-', '_', '.', ':' and '@'";

fn general(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@')
}

const AGENT: Rule = Rule {
    kind: "agent id",
    max: 128,
    allowed: GENERAL_ALLOWED,
    accept: general,
};

const STREAM: Rule = Rule {
    kind: "stream id",
    max: 128,
    allowed: GENERAL_ALLOWED,
    accept: general,
};

const SAGA: Rule = Rule {
    kind: "saga id",
    max: 128,
    allowed: "ASCII letters, digits, '-', '_', '.' and ':'",
    // No '/' (task keys are `saga/step/visit/attempt`) and no '@'.
    accept: |c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':'),
};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $rule:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// The id, if `value` follows its kind's rule.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                $rule.check(&value)?;
                Ok(Self(value))
            }

            /// The id as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(d)?;
                Self::new(raw).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A tenant: the unit of isolation. Every row, key and topic record
    /// belongs to exactly one.
    TenantId,
    TENANT
);
id_type!(
    /// An agent (or sidecar) identity, e.g. `planner-7f9c`.
    AgentId,
    AGENT
);
id_type!(
    /// An event stream, i.e. one aggregate's id.
    StreamId,
    STREAM
);
id_type!(
    /// A saga instance's id. It starts every task key of the saga
    /// (`saga/step/visit/attempt`) and appears in URLs.
    SagaId,
    SAGA
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_round_trip() {
        let tenant = TenantId::new("acme-prod_1").expect("valid");
        assert_eq!(tenant.as_str(), "acme-prod_1");
        let stream: StreamId = "task:42@planner.v1".parse().expect("valid");
        assert_eq!(stream.to_string(), "task:42@planner.v1");
        let json = serde_json::to_string(&tenant).expect("serialize");
        assert_eq!(json, "\"acme-prod_1\"");
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(TenantId::new(""), Err(IdError::Empty { kind: "tenant id" }));
        let err = TenantId::new("Acme").expect_err("uppercase");
        assert!(err.to_string().contains("'A' at byte 0"), "{err}");
        let err = AgentId::new("a".repeat(129)).expect_err("long");
        assert_eq!(
            err.to_string(),
            "agent id is 129 bytes long; the maximum is 128"
        );
        let err = StreamId::new("task 1").expect_err("space");
        assert!(err.to_string().contains("' ' at byte 4"), "{err}");
        // Unicode that merely looks like ASCII is refused too.
        assert!(StreamId::new("tаsk").is_err());
        // A saga id cannot hold the task key's separator.
        let err = SagaId::new("a/b").expect_err("slash");
        assert!(err.to_string().contains("'/' at byte 1"), "{err}");
        assert!(SagaId::new("run@1").is_err());
        assert!(SagaId::new("order-7:retry.2_x").is_ok());
    }

    #[test]
    fn deserialization_validates() {
        let err = serde_json::from_str::<TenantId>("\"no spaces\"").expect_err("invalid");
        assert!(err.to_string().contains("tenant id"), "{err}");
    }
}
