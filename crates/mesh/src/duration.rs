//! Durations as Kubernetes writes them: Go's `time.ParseDuration` form
//! (`250ms`, `5s`, `1m30s`), so CEL rules can compare them with
//! `duration(...)` and `kubectl explain` shows what to write.
//!
//! Hand-written rather than humantime: humantime accepts forms Go does not
//! (`1 hour`, spaces) and the API server's CEL `duration()` would then
//! refuse a document this crate accepted.

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The pattern the CRD schema checks: one or more `<number><unit>` parts.
pub const PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$";

/// A non-negative duration written as Go writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GoDuration(pub Duration);

impl GoDuration {
    /// Whole seconds.
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    /// Milliseconds.
    pub const fn from_millis(millis: u64) -> Self {
        Self(Duration::from_millis(millis))
    }

    /// As a std duration.
    pub fn get(self) -> Duration {
        self.0
    }
}

/// Why a duration did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration like 250ms, 5s or 1m30s")]
pub struct BadDuration(pub String);

impl std::str::FromStr for GoDuration {
    type Err = BadDuration;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || BadDuration(text.to_owned());
        if text.is_empty() {
            return Err(bad());
        }
        let mut rest = text;
        let mut nanos: f64 = 0.0;
        while !rest.is_empty() {
            let number_end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(bad)?;
            let (number, after) = rest.split_at(number_end);
            if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
                return Err(bad());
            }
            let value: f64 = number.parse().map_err(|_| bad())?;
            let unit_end = after
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(after.len());
            let (unit, next) = after.split_at(unit_end);
            let scale = match unit {
                "ns" => 1.0,
                "us" => 1e3,
                "ms" => 1e6,
                "s" => 1e9,
                "m" => 60e9,
                "h" => 3600e9,
                _ => return Err(bad()),
            };
            nanos += value * scale;
            rest = next;
        }
        // Beyond ~292 years Go refuses too.
        if !nanos.is_finite() || nanos > i64::MAX as f64 {
            return Err(bad());
        }
        Ok(Self(Duration::from_nanos(nanos.round() as u64)))
    }
}

impl fmt::Display for GoDuration {
    /// The shortest exact form in one unit: `1500ms`, `90s`, `2h`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        let units: [(u128, &str); 6] = [
            (3_600_000_000_000, "h"),
            (60_000_000_000, "m"),
            (1_000_000_000, "s"),
            (1_000_000, "ms"),
            (1_000, "us"),
            (1, "ns"),
        ];
        if nanos == 0 {
            return f.write_str("0s");
        }
        for (scale, unit) in units {
            if nanos.is_multiple_of(scale) {
                return write!(f, "{}{unit}", nanos / scale);
            }
        }
        write!(f, "{nanos}ns")
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Cow::<str>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for GoDuration {
    fn schema_name() -> Cow<'static, str> {
        "GoDuration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": PATTERN,
            "maxLength": 32,
            "description": "A duration such as 250ms, 5s or 1m30s."
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_go_parses() {
        let cases = [
            ("250ms", Duration::from_millis(250)),
            ("5s", Duration::from_secs(5)),
            ("1m30s", Duration::from_secs(90)),
            ("1.5s", Duration::from_millis(1500)),
            ("2h", Duration::from_secs(7200)),
            ("10us", Duration::from_micros(10)),
            ("0s", Duration::ZERO),
        ];
        for (text, expected) in cases {
            assert_eq!(
                text.parse::<GoDuration>(),
                Ok(GoDuration(expected)),
                "{text}"
            );
        }
    }

    #[test]
    fn refuses_what_go_refuses() {
        for text in [
            "", "5", "s", "1 s", "1hour", "-1s", ".5s", "5.s", "1d", "1e3s",
        ] {
            assert!(text.parse::<GoDuration>().is_err(), "{text:?} was accepted");
        }
    }

    #[test]
    fn writes_the_shortest_exact_form_and_reads_it_back() {
        for (duration, text) in [
            (Duration::from_millis(1500), "1500ms"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_secs(7200), "2h"),
            (Duration::ZERO, "0s"),
        ] {
            let written = GoDuration(duration).to_string();
            assert_eq!(written, text);
            assert_eq!(written.parse::<GoDuration>(), Ok(GoDuration(duration)));
        }
    }
}
