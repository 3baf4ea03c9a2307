//! Every annotation the injector reads, its default and its validation.
//!
//! A pod opts in with `statefabric.io/inject: "true"` on itself or on its
//! namespace, and may opt out with `"false"` on itself. The others override
//! the sidecar per pod. An unknown `statefabric.io/*` annotation or a bad
//! value denies the pod with a message naming the annotation: a typo must
//! not yield a sidecar configured differently from what was asked.

use std::collections::BTreeMap;

/// The prefix of every annotation of ours.
pub const PREFIX: &str = "statefabric.io/";

/// `"true"` injects the pod (or every pod of a namespace carrying it);
/// `"false"` opts a pod out.
pub const INJECT: &str = "statefabric.io/inject";
/// The agent type the pod runs (which saga tasks its sidecar takes).
pub const AGENT_TYPE: &str = "statefabric.io/agent-type";
/// The FabricConfig the pod's sidecar follows.
pub const CONFIG: &str = "statefabric.io/config";
/// The sidecar's CPU request and limit (a Kubernetes quantity).
pub const SIDECAR_CPU: &str = "statefabric.io/sidecar-cpu";
/// The sidecar's memory request and limit (a Kubernetes quantity).
pub const SIDECAR_MEMORY: &str = "statefabric.io/sidecar-memory";
/// The sidecar's log filter.
pub const LOG_LEVEL: &str = "statefabric.io/log-level";
/// The building blocks the sidecar serves (a comma-separated subset).
pub const BUILDING_BLOCKS: &str = "statefabric.io/building-blocks";
/// `"false"` turns the egress listener off for the pod (on by default).
pub const EGRESS: &str = "statefabric.io/egress";
/// Written by the injector on the pods it injected (not read from users).
pub const INJECTED: &str = "statefabric.io/injected";

/// Every annotation of ours a pod may carry.
pub const KNOWN: [&str; 9] = [
    INJECT,
    AGENT_TYPE,
    CONFIG,
    SIDECAR_CPU,
    SIDECAR_MEMORY,
    LOG_LEVEL,
    BUILDING_BLOCKS,
    EGRESS,
    INJECTED,
];

const BLOCKS: [&str; 6] = ["events", "context", "locks", "sessions", "tasks", "egress"];

/// A pod's overrides, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `Some(false)`: the pod opted out; `None`: it says nothing.
    pub inject: Option<bool>,
    /// [`AGENT_TYPE`].
    pub agent_type: Option<String>,
    /// [`CONFIG`].
    pub config: Option<String>,
    /// [`SIDECAR_CPU`].
    pub cpu: Option<String>,
    /// [`SIDECAR_MEMORY`].
    pub memory: Option<String>,
    /// [`LOG_LEVEL`].
    pub log_level: Option<String>,
    /// [`BUILDING_BLOCKS`], each one checked.
    pub building_blocks: Option<Vec<String>>,
    /// [`EGRESS`].
    pub egress: Option<bool>,
}

/// Why a pod is denied: the annotation and what is wrong with its value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation}: {reason}")]
pub struct Invalid {
    /// The annotation's full name.
    pub annotation: String,
    /// What is wrong with its value.
    pub reason: String,
}

fn invalid(annotation: &str, reason: impl Into<String>) -> Invalid {
    Invalid {
        annotation: annotation.to_owned(),
        reason: reason.into(),
    }
}

/// Reads and checks a pod's annotations.
pub fn parse(annotations: &BTreeMap<String, String>) -> Result<Overrides, Invalid> {
    for key in annotations.keys() {
        if key.starts_with(PREFIX) && !KNOWN.contains(&key.as_str()) {
            return Err(invalid(
                key,
                format!("unknown; the injector reads {}", KNOWN[..8].join(", ")),
            ));
        }
    }
    let get = |key: &str| annotations.get(key).map(String::as_str);
    let mut out = Overrides::default();
    if let Some(value) = get(INJECT) {
        out.inject = Some(boolean(INJECT, value)?);
    }
    if let Some(value) = get(AGENT_TYPE) {
        dns_label(AGENT_TYPE, value)?;
        out.agent_type = Some(value.to_owned());
    }
    if let Some(value) = get(CONFIG) {
        dns_subdomain(CONFIG, value)?;
        out.config = Some(value.to_owned());
    }
    if let Some(value) = get(SIDECAR_CPU) {
        quantity(value).map_err(|r| invalid(SIDECAR_CPU, r))?;
        out.cpu = Some(value.to_owned());
    }
    if let Some(value) = get(SIDECAR_MEMORY) {
        quantity(value).map_err(|r| invalid(SIDECAR_MEMORY, r))?;
        out.memory = Some(value.to_owned());
    }
    if let Some(value) = get(LOG_LEVEL) {
        out.log_level = Some(log_level(value).map_err(|r| invalid(LOG_LEVEL, r))?);
    }
    if let Some(value) = get(BUILDING_BLOCKS) {
        let mut blocks = Vec::new();
        for block in value.split(',').map(str::trim) {
            if !BLOCKS.contains(&block) {
                return Err(invalid(
                    BUILDING_BLOCKS,
                    format!("`{block}` is not one of {}", BLOCKS.join(", ")),
                ));
            }
            if !blocks.iter().any(|b| b == block) {
                blocks.push(block.to_owned());
            }
        }
        out.building_blocks = Some(blocks);
    }
    if let Some(value) = get(EGRESS) {
        out.egress = Some(boolean(EGRESS, value)?);
    }
    Ok(out)
}

fn boolean(annotation: &str, value: &str) -> Result<bool, Invalid> {
    match value {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(invalid(
            annotation,
            format!("`{other}` is not \"true\" or \"false\""),
        )),
    }
}

fn dns_label(annotation: &str, value: &str) -> Result<(), Invalid> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(
            annotation,
            format!(
                "`{value}` is not a DNS label (lower-case letters, digits and '-', at most 63)"
            ),
        ))
    }
}

fn dns_subdomain(annotation: &str, value: &str) -> Result<(), Invalid> {
    let ok = !value.is_empty()
        && value.len() <= 253
        && value
            .split('.')
            .all(|part| dns_label(annotation, part).is_ok());
    if ok {
        Ok(())
    } else {
        Err(invalid(
            annotation,
            format!("`{value}` is not a resource name (a DNS subdomain)"),
        ))
    }
}

/// A Kubernetes resource quantity as requests and limits take it
/// (`100m`, `0.5`, `64Mi`, `1G`, `1e3`).
pub fn quantity(value: &str) -> Result<(), String> {
    const SUFFIXES: [&str; 14] = [
        "Ki", "Mi", "Gi", "Ti", "Pi", "Ei", "n", "u", "m", "k", "M", "G", "T", "P",
    ];
    let number = SUFFIXES
        .iter()
        .find_map(|s| value.strip_suffix(s))
        .or_else(|| value.strip_suffix('E'))
        .unwrap_or(value);
    let (mantissa, exponent) = match number.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (number, None),
    };
    let decimal = !mantissa.is_empty()
        && mantissa.bytes().filter(|b| *b == b'.').count() <= 1
        && mantissa.bytes().any(|b| b.is_ascii_digit())
        && mantissa.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    let exponent_ok = exponent.is_none_or(|e| {
        let digits = e.strip_prefix(['+', '-']).unwrap_or(e);
        !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
    });
    if decimal && exponent_ok && !value.starts_with('-') {
        Ok(())
    } else {
        Err(format!(
            "`{value}` is not a resource quantity (e.g. 100m, 0.5, 64Mi)"
        ))
    }
}

/// One of the sidecar's log levels.
pub fn log_level(value: &str) -> Result<String, String> {
    match value {
        "error" | "warn" | "info" | "debug" | "trace" => Ok(value.to_owned()),
        other => Err(format!(
            "`{other}` is not one of error, warn, info, debug, trace"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn every_override_is_read() {
        let read = parse(&annotations(&[
            (INJECT, "true"),
            (AGENT_TYPE, "coder"),
            (CONFIG, "coders.v2"),
            (SIDECAR_CPU, "250m"),
            (SIDECAR_MEMORY, "128Mi"),
            (LOG_LEVEL, "debug"),
            (BUILDING_BLOCKS, "events, locks,events"),
            (EGRESS, "false"),
            ("app.kubernetes.io/name", "not ours"),
        ]))
        .expect("valid");
        assert_eq!(read.inject, Some(true));
        assert_eq!(read.agent_type.as_deref(), Some("coder"));
        assert_eq!(read.cpu.as_deref(), Some("250m"));
        assert_eq!(
            read.building_blocks,
            Some(vec!["events".to_owned(), "locks".to_owned()])
        );
        assert_eq!(read.egress, Some(false));
    }

    #[test]
    fn a_bad_or_unknown_annotation_is_named() {
        for (pairs, named) in [
            (
                vec![("statefabric.io/injct", "true")],
                "statefabric.io/injct",
            ),
            (vec![(INJECT, "yes")], INJECT),
            (vec![(AGENT_TYPE, "Coder_1")], AGENT_TYPE),
            (vec![(CONFIG, "-bad")], CONFIG),
            (vec![(SIDECAR_CPU, "lots")], SIDECAR_CPU),
            (vec![(SIDECAR_MEMORY, "-64Mi")], SIDECAR_MEMORY),
            (vec![(LOG_LEVEL, "verbose")], LOG_LEVEL),
            (vec![(BUILDING_BLOCKS, "events,queues")], BUILDING_BLOCKS),
            (vec![(EGRESS, "1")], EGRESS),
        ] {
            let err = parse(&annotations(&pairs)).expect_err("refused");
            assert_eq!(err.annotation, named, "{err}");
        }
    }

    #[test]
    fn quantities_are_those_kubernetes_takes() {
        for good in ["100m", "0.5", "1", "64Mi", "1G", "1e3", "2.5Gi", "1E"] {
            assert!(quantity(good).is_ok(), "{good}");
        }
        for bad in ["", "m", "1.2.3", "abc", "1x", "-1", "1e", "Mi"] {
            assert!(quantity(bad).is_err(), "{bad}");
        }
    }
}
