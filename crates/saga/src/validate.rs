//! The checks a definition passes when it is loaded or built. Each error
//! names the definition and, where there is one, the step.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use crate::definition::{Builder, Compensation, Definition, Step, Target};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("saga definition `{definition}`{}: {problem}", step.as_ref().map(|s| format!(" step `{s}`")).unwrap_or_default())]
/// Why a definition is refused, naming it and the step at fault.
pub struct DefinitionError {
    /// The definition's name (`?` when it could not be read).
    pub definition: String,
    /// The step at fault, if one.
    pub step: Option<String>,
    /// What is wrong.
    pub problem: String,
}

impl DefinitionError {
    /// A problem of `definition` (and of `step`).
    pub fn new(definition: &str, step: Option<&str>, problem: impl Into<String>) -> Self {
        Self {
            definition: definition.to_owned(),
            step: step.map(str::to_owned),
            problem: problem.into(),
        }
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Every rule a definition must keep: names, reachable steps, compensation
/// on every step with effects, a `max_visits` on every loop, input
/// pointers that resolve, sane retry settings. The first broken one is
/// reported.
pub fn validate(d: &Definition) -> Result<(), DefinitionError> {
    let fail =
        |step: Option<&str>, problem: String| Err(DefinitionError::new(&d.name, step, problem));
    if !valid_name(&d.name) {
        return fail(
            None,
            "the name must be 1-128 ASCII letters, digits or -_.".into(),
        );
    }
    if d.version == 0 {
        return fail(None, "versions start at 1".into());
    }
    if d.steps.is_empty() {
        return fail(None, "a saga needs at least one step".into());
    }
    if !d.steps.contains_key(&d.start) {
        return fail(None, format!("start names an unknown step `{}`", d.start));
    }
    if d.stuck_after.is_zero() || d.sla.is_some_and(|s| s.is_zero()) {
        return fail(None, "stuck_after and sla must be greater than zero".into());
    }
    for (name, step) in &d.steps {
        if let Err(problem) = check_step(d, name, step) {
            return fail(Some(name), problem);
        }
    }
    check_loops(d)?;
    check_reachable(d)
}

fn check_step(d: &Definition, name: &str, step: &Step) -> Result<(), String> {
    if !valid_name(name) {
        return Err("step names must be 1-128 ASCII letters, digits or -_.".into());
    }
    if !valid_name(&step.agent) || !valid_name(&step.action) {
        return Err("agent and action must be 1-128 ASCII letters, digits or -_.".into());
    }
    if step.timeout.is_zero() {
        return Err("timeout must be greater than zero".into());
    }
    let r = &step.retry;
    if r.max_attempts == 0 {
        return Err("retry.max_attempts must be at least 1".into());
    }
    if r.initial_backoff.is_zero() || r.max_backoff < r.initial_backoff {
        return Err("retry backoffs must be positive, initial no larger than max".into());
    }
    if !((1.0..=100.0).contains(&r.multiplier) && (0.0..=1.0).contains(&r.jitter)) {
        return Err("retry.multiplier must be 1-100 and retry.jitter 0-1".into());
    }
    if r.max_backoff > Duration::from_secs(24 * 3600) {
        return Err("retry.max_backoff is over a day".into());
    }
    if let Compensation::Action { agent, action } = &step.compensation
        && (!valid_name(action) || agent.as_deref().is_some_and(|a| !valid_name(a)))
    {
        return Err(
            "has no compensation: name its action ({action: ...}) or say `compensation: none` for a step without effects"
                .into(),
        );
    }
    if step.max_visits == Some(0) {
        return Err("max_visits must be at least 1".into());
    }
    for target in targets(step) {
        if let Target::Step(next) = target
            && !d.steps.contains_key(next)
        {
            return Err(format!("leads to an unknown step `{next}`"));
        }
    }
    for condition in &step.when {
        if !(condition.path.is_empty() || condition.path.starts_with('/')) {
            return Err(format!(
                "when.path `{}` is not a JSON pointer (\"\" or starting with /)",
                condition.path
            ));
        }
    }
    for (key, value) in &step.input {
        if let Some(pointer) = value.as_str().and_then(|v| v.strip_prefix('$')) {
            let mut parts = pointer.split('/').skip(1);
            match (parts.next(), parts.next(), parts.next()) {
                (Some("data"), _, _) => {}
                (Some("steps"), Some(from), Some("output")) if d.steps.contains_key(from) => {}
                (Some("steps"), Some(from), _) if !d.steps.contains_key(from) => {
                    return Err(format!("input `{key}` reads unknown step `{from}`"));
                }
                _ => {
                    return Err(format!(
                        "input `{key}`: `{}` must be $/data/... or $/steps/<STEP>/output/...",
                        value.as_str().unwrap_or_default()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Every place a step can lead.
pub fn targets(step: &Step) -> impl Iterator<Item = &Target> {
    [&step.on_success, &step.on_failure, &step.on_exhausted]
        .into_iter()
        .chain(step.when.iter().map(|c| &c.goto))
}

fn edges(d: &Definition) -> BTreeMap<&str, BTreeSet<&str>> {
    d.steps
        .iter()
        .map(|(name, step)| {
            let next = targets(step)
                .filter_map(|t| match t {
                    Target::Step(s) => Some(s.as_str()),
                    _ => None,
                })
                .collect();
            (name.as_str(), next)
        })
        .collect()
}

/// A loop is allowed only if one of its steps has `max_visits`: with the
/// bounded steps taken out, no cycle may remain.
fn check_loops(d: &Definition) -> Result<(), DefinitionError> {
    let bounded: BTreeSet<&str> = d
        .steps
        .iter()
        .filter(|(_, s)| s.max_visits.is_some())
        .map(|(n, _)| n.as_str())
        .collect();
    let graph = edges(d);
    // 0 unvisited, 1 on the path, 2 done.
    let mut state: BTreeMap<&str, u8> = BTreeMap::new();
    fn visit<'a>(
        node: &'a str,
        graph: &BTreeMap<&'a str, BTreeSet<&'a str>>,
        bounded: &BTreeSet<&'a str>,
        state: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<&'a str>> {
        state.insert(node, 1);
        path.push(node);
        for &next in graph.get(node).into_iter().flatten() {
            if bounded.contains(next) {
                continue;
            }
            match state.get(next).copied().unwrap_or(0) {
                1 => {
                    let from = path.iter().position(|n| *n == next).unwrap_or(0);
                    let mut cycle = path[from..].to_vec();
                    cycle.push(next);
                    return Some(cycle);
                }
                0 => {
                    if let Some(cycle) = visit(next, graph, bounded, state, path) {
                        return Some(cycle);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(node, 2);
        None
    }
    for &node in graph.keys() {
        if bounded.contains(node) || state.get(node).copied().unwrap_or(0) != 0 {
            continue;
        }
        if let Some(cycle) = visit(node, &graph, &bounded, &mut state, &mut Vec::new()) {
            return Err(DefinitionError::new(
                &d.name,
                Some(cycle[0]),
                format!(
                    "steps {} form a loop without a bound; set max_visits on one of them",
                    cycle.join(" → ")
                ),
            ));
        }
    }
    Ok(())
}

fn check_reachable(d: &Definition) -> Result<(), DefinitionError> {
    let graph = edges(d);
    let mut seen = BTreeSet::from([d.start.as_str()]);
    let mut todo = vec![d.start.as_str()];
    while let Some(node) = todo.pop() {
        for &next in graph.get(node).into_iter().flatten() {
            if seen.insert(next) {
                todo.push(next);
            }
        }
    }
    match d.steps.keys().find(|s| !seen.contains(s.as_str())) {
        Some(orphan) => Err(DefinitionError::new(
            &d.name,
            Some(orphan),
            format!("is never reached from the start step `{}`", d.start),
        )),
        None => Ok(()),
    }
}

/// Resolves a step's input against the saga's data and latest outputs.
pub fn resolve_input(
    input: &BTreeMap<String, Value>,
    data: &Value,
    outputs: &BTreeMap<String, Value>,
) -> Value {
    let context = serde_json::json!({
        "data": data,
        "steps": outputs
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::json!({"output": v})))
            .collect::<serde_json::Map<_, _>>(),
    });
    Value::Object(
        input
            .iter()
            .map(|(key, value)| {
                let resolved = match value.as_str().and_then(|v| v.strip_prefix('$')) {
                    Some(pointer) => context.pointer(pointer).cloned().unwrap_or(Value::Null),
                    None => value.clone(),
                };
                (key.clone(), resolved)
            })
            .collect(),
    )
}

/// The ways in; every one ends in [`validate`].
impl Definition {
    /// A definition from YAML, validated.
    pub fn from_yaml(text: &str) -> Result<Self, DefinitionError> {
        let value: Value = yaml_serde::from_str(text)
            .map_err(|e| DefinitionError::new("?", None, format!("not valid YAML: {e}")))?;
        Self::from_value(value)
    }

    /// A definition from JSON, validated.
    pub fn from_json(text: &str) -> Result<Self, DefinitionError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| DefinitionError::new("?", None, format!("not valid JSON: {e}")))?;
        Self::from_value(value)
    }

    /// Parses step by step, so an error names the step it is in.
    pub fn from_value(mut value: Value) -> Result<Self, DefinitionError> {
        let name = value
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned();
        let raw_steps = match value.as_object_mut().and_then(|o| o.remove("steps")) {
            Some(Value::Object(steps)) => steps,
            Some(_) => return Err(DefinitionError::new(&name, None, "steps must be a map")),
            None => return Err(DefinitionError::new(&name, None, "steps are missing")),
        };
        let mut steps = BTreeMap::new();
        for (step_name, raw) in raw_steps {
            let step: Step = serde_json::from_value(raw)
                .map_err(|e| DefinitionError::new(&name, Some(&step_name), e.to_string()))?;
            steps.insert(step_name, step);
        }
        if let Some(o) = value.as_object_mut() {
            o.insert("steps".into(), Value::Object(Default::default()));
        }
        let mut definition: Definition = serde_json::from_value(value)
            .map_err(|e| DefinitionError::new(&name, None, e.to_string()))?;
        definition.steps = steps;
        validate(&definition)?;
        Ok(definition)
    }
}

impl Builder {
    /// The definition, validated like a loaded one.
    pub fn build(self) -> Result<Definition, DefinitionError> {
        validate(&self.definition)?;
        Ok(self.definition)
    }
}

#[cfg(test)]
mod tests {
    use crate::definition::Definition;

    fn load(yaml: &str) -> String {
        Definition::from_yaml(yaml)
            .expect_err("invalid")
            .to_string()
    }

    const STEP: &str = "agent: w\n    action: a\n    timeout: 1s\n    compensation: none";

    #[test]
    fn each_problem_is_named_with_its_definition_and_step() {
        let cases = [
            (
                format!("name: d\nversion: 1\nstart: A\nsteps:\n  A:\n    {STEP}\n    on_success: B\n"),
                "saga definition `d` step `A`: leads to an unknown step `B`",
            ),
            (
                format!("name: d\nversion: 1\nstart: A\nsteps:\n  A:\n    {STEP}\n    on_success: B\n  B:\n    {STEP}\n    on_success: A\n"),
                "form a loop without a bound",
            ),
            (
                "name: d\nversion: 1\nstart: A\nsteps:\n  A:\n    agent: w\n    action: a\n    timeout: 1s\n".to_owned(),
                "saga definition `d` step `A`: missing field `compensation`",
            ),
            (
                "name: d\nversion: 1\nstart: A\nsteps:\n  A:\n    agent: w\n    action: a\n    timeout: 5 parsecs\n    compensation: none\n".to_owned(),
                "saga definition `d` step `A`:",
            ),
            (
                format!("name: d\nversion: 1\nstart: X\nsteps:\n  A:\n    {STEP}\n"),
                "start names an unknown step `X`",
            ),
            (
                format!("name: d\nversion: 1\nstart: A\nsteps:\n  A:\n    {STEP}\n  B:\n    {STEP}\n"),
                "step `B`: is never reached",
            ),
            (
                format!("name: d\nversion: 1\nstart: A\nsteps:\n  A:\n    {STEP}\n    input: {{x: $/steps/Z/output}}\n"),
                "input `x` reads unknown step `Z`",
            ),
            (
                "name: d\nversion: 1\nstart: A\nsteps:\n  A:\n    agent: w\n    action: a\n    timeout: 1s\n    compensation: maybe\n".to_owned(),
                "compensation must be `none`",
            ),
            (
                format!("name: d\nversion: 1\nstart: A\nsteps:\n  A:\n    {STEP}\n    retry: {{max_attempts: 0}}\n"),
                "retry.max_attempts must be at least 1",
            ),
            (
                format!("name: d\nversion: 0\nstart: A\nsteps:\n  A:\n    {STEP}\n"),
                "versions start at 1",
            ),
        ];
        for (yaml, expected) in cases {
            let err = load(&yaml);
            assert!(
                err.contains(expected),
                "expected `{expected}` in `{err}` for\n{yaml}"
            );
        }
    }

    #[test]
    fn a_bounded_loop_is_fine_and_json_works_too() {
        let json = r#"{"name": "loop", "version": 1, "start": "A", "steps": {
            "A": {"agent": "w", "action": "a", "timeout": "1s", "compensation": {"action": "undo"}, "on_success": "B"},
            "B": {"agent": "w", "action": "b", "timeout": "1s", "compensation": "none",
                  "when": [{"path": "/again", "equals": true, "goto": "A"}], "max_visits": 2}
        }}"#;
        let d = Definition::from_json(json).expect("valid");
        assert_eq!(d.steps["B"].max_visits, Some(2));
        assert!(
            Definition::from_json("{")
                .expect_err("bad")
                .to_string()
                .contains("not valid JSON")
        );
    }
}
