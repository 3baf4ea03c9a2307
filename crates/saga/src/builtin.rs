//! The built-in Planner → Coder → Critic saga.
//!
//! PLAN → CODE → CRITIQUE; the critic's verdict `approved` ends it DONE,
//! `changes_requested` sends it back to CODE with the critique, at most
//! `max_visits` times for CODE (the iteration bound), after which it ends
//! FAILED. Any other verdict is a failure. A step that fails for good
//! compensates the completed steps in reverse order (the coder reverts its
//! change and releases the locks it holds, the planner discards the plan)
//! and the saga ends COMPENSATED; a compensation that keeps failing leaves
//! it STUCK for an operator.

use crate::definition::Definition;

/// The built-in Planner → Coder → Critic definition, as an operator would
/// write it.
pub const PLAN_CODE_CRITIQUE_YAML: &str = r#"
name: plan-code-critique
version: 1
start: PLAN
stuck_after: 10m
sla: 30m
steps:
  PLAN:
    agent: planner
    action: plan
    input:
      task: $/data/task
    timeout: 2m
    retry: {max_attempts: 3, initial_backoff: 1s, max_backoff: 30s, multiplier: 2, jitter: 0.2}
    compensation: {action: discard_plan}
    on_success: CODE
  CODE:
    agent: coder
    action: code
    input:
      task: $/data/task
      plan: $/steps/PLAN/output
      critique: $/steps/CRITIQUE/output
    timeout: 10m
    retry: {max_attempts: 3, initial_backoff: 2s, max_backoff: 1m, multiplier: 2, jitter: 0.2}
    compensation: {action: revert_change}
    max_visits: 3
    on_exhausted: FAILED
    on_success: CRITIQUE
  CRITIQUE:
    agent: critic
    action: critique
    input:
      task: $/data/task
      plan: $/steps/PLAN/output
      change: $/steps/CODE/output
    timeout: 5m
    compensation: none
    when:
      - {path: /verdict, equals: approved, goto: DONE}
      - {path: /verdict, equals: changes_requested, goto: CODE}
    on_success: COMPENSATE
"#;

/// [`PLAN_CODE_CRITIQUE_YAML`], parsed and validated.
pub fn plan_code_critique() -> Definition {
    // The text is a constant checked by the tests below; a failure here is a
    // build-time mistake, not input.
    Definition::from_yaml(PLAN_CODE_CRITIQUE_YAML)
        .unwrap_or_else(|e| panic!("the built-in definition is invalid: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_is_valid_and_round_trips() {
        let d = plan_code_critique();
        assert_eq!(
            (d.name.as_str(), d.version, d.start.as_str()),
            ("plan-code-critique", 1, "PLAN")
        );
        assert_eq!(d.steps["CODE"].max_visits, Some(3));
        let again = Definition::from_yaml(&d.to_yaml()).expect("round trip");
        assert_eq!(again, d);
        let json = serde_json::to_string(&d).expect("json");
        assert_eq!(Definition::from_json(&json).expect("json round trip"), d);
    }
}
