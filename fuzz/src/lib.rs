//! Shared pieces of the fuzz targets: small JSON values built from fuzz
//! input (few distinct keys and writers, so inputs collide the way real
//! concurrent writers do) and the sidecar the `state_api` target talks to.
//!
//! Each target in `fuzz_targets/` checks a property, not only "no panic";
//! `fuzz/run.sh` runs them (a few seconds each in the test command).

use arbitrary::Arbitrary;
use serde_json::{Value, json};

pub mod sidecar;

/// A JSON value from a small alphabet, nested at most twice.
#[derive(Debug, Clone, Arbitrary)]
pub enum SmallJson {
    Null,
    Bool(bool),
    Int(i8),
    Big(i64),
    Str(u8),
    Array(Vec<SmallLeaf>),
    Object(Vec<(u8, SmallLeaf)>),
}

/// A leaf of [`SmallJson`].
#[derive(Debug, Clone, Arbitrary)]
pub enum SmallLeaf {
    Null,
    Int(i8),
    Str(u8),
    Nested(Vec<(u8, i8)>),
}

/// One of a few names, so that keys, tags and writers repeat.
pub fn name(prefix: &str, n: u8) -> String {
    format!("{prefix}{}", n % 5)
}

impl SmallLeaf {
    pub fn to_json(&self) -> Value {
        match self {
            Self::Null => Value::Null,
            Self::Int(i) => json!(i),
            Self::Str(s) => json!(name("s", *s)),
            Self::Nested(pairs) => Value::Object(
                pairs
                    .iter()
                    .map(|(k, v)| (name("k", *k), json!(v)))
                    .collect(),
            ),
        }
    }
}

impl SmallJson {
    pub fn to_json(&self) -> Value {
        match self {
            Self::Null => Value::Null,
            Self::Bool(b) => json!(b),
            Self::Int(i) => json!(i),
            Self::Big(i) => json!(i),
            Self::Str(s) => json!(name("s", *s)),
            Self::Array(items) => Value::Array(items.iter().map(SmallLeaf::to_json).collect()),
            Self::Object(pairs) => Value::Object(
                pairs
                    .iter()
                    .map(|(k, v)| (name("k", *k), v.to_json()))
                    .collect(),
            ),
        }
    }
}
