//! The transition rules, driven through the built-in Planner → Coder →
//! Critic definition and small purpose-built ones.

use std::time::Duration;

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::builtin::plan_code_critique;
use crate::definition::{RetryPolicy, Step};

fn dispatched(effects: &[Effect]) -> Vec<&Task> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Dispatch(t) => Some(t),
            _ => None,
        })
        .collect()
}

/// The one task dispatched by these effects.
fn task(effects: &[Effect]) -> Task {
    let tasks = dispatched(effects);
    assert_eq!(tasks.len(), 1, "expected one task in {effects:?}");
    tasks[0].clone()
}

fn complete(i: &mut Instance, d: &Definition, t: &Task, output: Value) -> Vec<Effect> {
    i.apply(
        d,
        Input::Completed {
            key: t.key.clone(),
            output,
        },
        0.5,
    )
    .expect("apply")
}

fn fail(i: &mut Instance, d: &Definition, t: &Task) -> Vec<Effect> {
    i.apply(
        d,
        Input::Failed {
            key: t.key.clone(),
            error: "boom".into(),
        },
        0.5,
    )
    .expect("apply")
}

fn retry_due(i: &mut Instance, d: &Definition, effects: &[Effect]) -> Vec<Effect> {
    let key = effects
        .iter()
        .find_map(|e| match e {
            Effect::Timer {
                key,
                kind: TimerKind::Retry,
                ..
            } => Some(key.clone()),
            _ => None,
        })
        .expect("a retry timer");
    i.apply(d, Input::RetryDue { key }, 0.5).expect("apply")
}

fn start() -> (Definition, Instance, Task) {
    let d = plan_code_critique();
    let (i, effects) = Instance::start(&d, saga_id("s1"), json!({"task": "fix the build"}));
    let t = task(&effects);
    (d, i, t)
}

#[test]
fn approved_at_once_ends_done_with_inputs_mapped() {
    let (d, mut i, plan) = start();
    assert_eq!(
        (plan.agent.as_str(), plan.action.as_str()),
        ("planner", "plan")
    );
    assert_eq!(plan.input, json!({"task": "fix the build"}));
    assert_eq!(plan.key.to_string(), "s1/PLAN/1/1");
    let code = task(&complete(&mut i, &d, &plan, json!({"steps": ["a", "b"]})));
    assert_eq!(code.agent, "coder");
    assert_eq!(
        code.input,
        json!({"task": "fix the build", "plan": {"steps": ["a", "b"]}, "critique": null})
    );
    let critique = task(&complete(&mut i, &d, &code, json!({"diff": "+x"})));
    assert_eq!(critique.input["change"], json!({"diff": "+x"}));
    let effects = complete(&mut i, &d, &critique, json!({"verdict": "approved"}));
    assert!(effects.contains(&Effect::Status(Status::Done)));
    assert!(dispatched(&effects).is_empty());
    assert_eq!(i.status, Status::Done);
    assert!(i.current.is_none());
}

#[test]
fn changes_requested_goes_back_to_code_with_the_critique() {
    let (d, mut i, plan) = start();
    let code = task(&complete(&mut i, &d, &plan, json!("plan")));
    let critique = task(&complete(&mut i, &d, &code, json!("v1")));
    let again = task(&complete(
        &mut i,
        &d,
        &critique,
        json!({"verdict": "changes_requested", "notes": "add a test"}),
    ));
    assert_eq!(again.key.to_string(), "s1/CODE/2/1");
    assert_eq!(again.input["critique"]["notes"], "add a test");
    let critique = task(&complete(&mut i, &d, &again, json!("v2")));
    complete(&mut i, &d, &critique, json!({"verdict": "approved"}));
    assert_eq!(i.status, Status::Done);
    assert_eq!(i.visits["CODE"], 2);
}

#[test]
fn too_many_iterations_fail_after_undoing_every_change_in_reverse() {
    let (d, mut i, plan) = start();
    let mut next = task(&complete(&mut i, &d, &plan, json!("plan")));
    for v in 1..=3 {
        let critique = task(&complete(&mut i, &d, &next, json!(format!("v{v}"))));
        let effects = complete(
            &mut i,
            &d,
            &critique,
            json!({"verdict": "changes_requested"}),
        );
        if v < 3 {
            next = task(&effects);
        } else {
            next = task(&effects);
            assert_eq!(i.status, Status::Compensating);
            assert!(i.last_error.as_deref().unwrap_or("").contains("bound of 3"));
        }
    }
    let mut undone = Vec::new();
    loop {
        undone.push(next.key.to_string());
        assert!(next.key.compensation);
        let effects = complete(&mut i, &d, &next, json!(null));
        match dispatched(&effects).first() {
            Some(t) => next = (*t).clone(),
            None => break,
        }
    }
    assert_eq!(
        undone,
        [
            "s1/CODE/3/1/undo",
            "s1/CODE/2/1/undo",
            "s1/CODE/1/1/undo",
            "s1/PLAN/1/1/undo"
        ]
    );
    assert_eq!(i.status, Status::Failed);
    let revert = &undone[0];
    assert!(revert.contains("CODE"), "the coder reverts its change");
}

#[test]
fn failures_retry_with_backoff_then_compensate() {
    let (d, mut i, plan) = start();
    let effects = fail(&mut i, &d, &plan);
    let delay = effects.iter().find_map(|e| match e {
        Effect::Timer {
            kind: TimerKind::Retry,
            after,
            ..
        } => Some(*after),
        _ => None,
    });
    assert!(delay.is_some_and(|d| d <= Duration::from_secs(1) && d >= Duration::from_millis(800)));
    assert!(dispatched(&effects).is_empty(), "waits for the backoff");
    let second = task(&retry_due(&mut i, &d, &effects));
    assert_eq!(second.key.to_string(), "s1/PLAN/1/2");
    let code = task(&complete(&mut i, &d, &second, json!("plan")));
    // CODE fails all three attempts.
    let mut attempt = code;
    for _ in 0..2 {
        let effects = fail(&mut i, &d, &attempt);
        attempt = task(&retry_due(&mut i, &d, &effects));
    }
    let effects = fail(&mut i, &d, &attempt);
    let undo = task(&effects);
    assert_eq!(undo.key.to_string(), "s1/PLAN/1/1/undo");
    assert_eq!(
        (undo.agent.as_str(), undo.action.as_str()),
        ("planner", "discard_plan")
    );
    assert_eq!(undo.input["output"], json!("plan"));
    complete(&mut i, &d, &undo, json!(null));
    assert_eq!(i.status, Status::Compensated);
    assert_eq!(i.last_error.as_deref(), Some("boom"));
}

#[test]
fn a_late_reply_to_an_expired_attempt_changes_nothing() {
    let (d, mut i, plan) = start();
    let effects = i
        .apply(
            &d,
            Input::TimedOut {
                key: plan.key.clone(),
            },
            0.5,
        )
        .expect("timeout");
    let before = i.clone();
    let late = complete(&mut i, &d, &plan, json!("too late"));
    assert!(late.is_empty());
    assert_eq!(i, before);
    let second = task(&retry_due(&mut i, &d, &effects));
    let code = task(&complete(&mut i, &d, &second, json!("plan")));
    // A duplicate of the reply already taken changes nothing either.
    let before = i.clone();
    assert!(complete(&mut i, &d, &second, json!("plan")).is_empty());
    assert_eq!(i, before);
    assert_eq!(code.key.step, "CODE");
}

#[test]
fn a_compensation_that_keeps_failing_is_stuck_until_an_operator_acts() {
    let (d, mut i, plan) = start();
    let code = task(&complete(&mut i, &d, &plan, json!("plan")));
    let mut undo = task(
        &i.apply(&d, Input::Operator(OperatorAction::Compensate), 0.5)
            .expect("compensate"),
    );
    assert_eq!(undo.key.to_string(), "s1/PLAN/1/1/undo");
    assert!(
        !i.completed.iter().any(|c| c.step == "CODE"),
        "CODE never completed: nothing of it to undo"
    );
    let _ = code;
    for _ in 0..2 {
        let effects = fail(&mut i, &d, &undo);
        undo = task(&retry_due(&mut i, &d, &effects));
    }
    let effects = fail(&mut i, &d, &undo);
    assert!(effects.contains(&Effect::Status(Status::Stuck)));
    assert_eq!(i.status, Status::Stuck);
    // Retried by hand, it succeeds and the saga ends.
    let retried = task(
        &i.apply(&d, Input::Operator(OperatorAction::RetryStep), 0.5)
            .expect("retry"),
    );
    assert_eq!(retried.key.to_string(), "s1/PLAN/1/4/undo");
    complete(&mut i, &d, &retried, json!(null));
    assert_eq!(i.status, Status::Compensated);
}

#[test]
fn operator_actions_that_do_not_fit_are_refused_and_change_nothing() {
    let (d, mut i, plan) = start();
    let before = i.clone();
    for action in [
        OperatorAction::Resume,
        OperatorAction::Skip { output: json!(1) },
        OperatorAction::RetryStep,
        OperatorAction::Amend { data: json!({}) },
    ] {
        let err = i
            .apply(&d, Input::Operator(action.clone()), 0.5)
            .expect_err("refused");
        assert!(matches!(err, SagaError::NotAllowed { .. }), "{err}");
        assert_eq!(i, before, "{action:?} changed the saga");
    }
    let err = i
        .apply(
            &d,
            Input::Operator(OperatorAction::Skip { output: json!(1) }),
            0.5,
        )
        .expect_err("running");
    assert!(err.to_string().contains("is running"), "{err}");
    // Ended sagas accept nothing.
    let code = task(&complete(&mut i, &d, &plan, json!("p")));
    let critique = task(&complete(&mut i, &d, &code, json!("c")));
    complete(&mut i, &d, &critique, json!({"verdict": "approved"}));
    let ended = i.clone();
    let err = i
        .apply(&d, Input::Operator(OperatorAction::Resume), 0.5)
        .expect_err("ended");
    assert!(err.to_string().contains("it has ended"), "{err}");
    assert_eq!(i, ended);
    let mut other = d.clone();
    other.version = 2;
    assert!(matches!(
        i.apply(&other, Input::Operator(OperatorAction::Pause), 0.5),
        Err(SagaError::WrongDefinition { .. })
    ));
}

#[test]
fn a_paused_saga_holds_its_next_step_and_resumes_with_amended_data() {
    let (d, mut i, plan) = start();
    i.apply(&d, Input::Operator(OperatorAction::Pause), 0.5)
        .expect("pause");
    let effects = complete(&mut i, &d, &plan, json!("plan"));
    assert!(dispatched(&effects).is_empty(), "held while paused");
    i.apply(
        &d,
        Input::Operator(OperatorAction::Amend {
            data: json!({"task": "fix the build, and the docs"}),
        }),
        0.5,
    )
    .expect("amend");
    let code = task(
        &i.apply(&d, Input::Operator(OperatorAction::Resume), 0.5)
            .expect("resume"),
    );
    assert_eq!(code.input["task"], "fix the build, and the docs");
}

#[test]
fn a_step_failed_while_paused_can_be_skipped_with_an_output() {
    let d = Definition::builder("two", 1)
        .start("A")
        .step(
            "A",
            Step::new("worker", "a", Duration::from_secs(5))
                .retry(RetryPolicy {
                    max_attempts: 1,
                    ..RetryPolicy::default()
                })
                .compensate_with("undo_a")
                .on_success("B"),
        )
        .step(
            "B",
            Step::new("worker", "b", Duration::from_secs(5))
                .input("from_a", "$/steps/A/output/value")
                .no_compensation(),
        )
        .build()
        .expect("valid");
    let (mut i, effects) = Instance::start(&d, saga_id("s2"), json!({}));
    let a = task(&effects);
    i.apply(&d, Input::Operator(OperatorAction::Pause), 0.5)
        .expect("pause");
    fail(&mut i, &d, &a);
    assert_eq!(
        i.status,
        Status::Running,
        "the failure's transition is held"
    );
    i.apply(
        &d,
        Input::Operator(OperatorAction::Skip {
            output: json!({"value": 42}),
        }),
        0.5,
    )
    .expect("skip");
    let b = task(
        &i.apply(&d, Input::Operator(OperatorAction::Resume), 0.5)
            .expect("resume"),
    );
    assert_eq!(b.input, json!({"from_a": 42}));
    complete(&mut i, &d, &b, json!(null));
    assert_eq!(i.status, Status::Done);
}

#[test]
fn abort_stops_without_undoing() {
    let (d, mut i, plan) = start();
    complete(&mut i, &d, &plan, json!("p"));
    let effects = i
        .apply(&d, Input::Operator(OperatorAction::Abort), 0.5)
        .expect("abort");
    assert!(effects.iter().any(|e| matches!(e, Effect::Cancel { .. })));
    assert!(dispatched(&effects).is_empty());
    assert_eq!(i.status, Status::Aborted);
}

#[derive(Debug, Clone)]
enum Reply {
    Ok(u8),
    Fail,
    Timeout,
    Late,
}

fn reply() -> impl Strategy<Value = Reply> {
    prop_oneof![
        4 => (0u8..3).prop_map(Reply::Ok),
        2 => Just(Reply::Fail),
        1 => Just(Reply::Timeout),
        1 => Just(Reply::Late),
    ]
}

const VERDICTS: [&str; 3] = ["approved", "changes_requested", "other"];

proptest! {
    /// Whatever the agents answer, every saga ends (or is stuck for an
    /// operator), no task key is dispatched twice, and an ended saga has
    /// nothing in flight.
    #[test]
    fn every_run_ends_and_never_reuses_a_task_key(replies in proptest::collection::vec(reply(), 1..200)) {
        let d = plan_code_critique();
        let (mut i, effects) = Instance::start(&d, saga_id("p"), json!({"task": "t"}));
        let mut seen = std::collections::BTreeSet::new();
        let mut out = task(&effects);
        seen.insert(out.key.clone());
        let mut old = out.key.clone();
        for r in replies {
            if i.status.is_final() || i.status == Status::Stuck {
                break;
            }
            let input = match r {
                Reply::Ok(v) => Input::Completed {
                    key: out.key.clone(),
                    output: json!({"verdict": VERDICTS[usize::from(v)]}),
                },
                Reply::Fail => Input::Failed { key: out.key.clone(), error: "x".into() },
                Reply::Timeout => Input::TimedOut { key: out.key.clone() },
                Reply::Late => Input::Completed { key: old.clone(), output: json!(null) },
            };
            let mut effects = i.apply(&d, input, 0.3).expect("apply");
            if let Some(Attempt { key, waiting: Waiting::Backoff }) = i.current.clone()
                && i.status != Status::Stuck
            {
                effects = i.apply(&d, Input::RetryDue { key }, 0.3).expect("retry");
            }
            for t in dispatched(&effects) {
                prop_assert!(seen.insert(t.key.clone()), "dispatched twice: {}", t.key);
                old = out.key.clone();
                out = t.clone();
            }
        }
        // Then the agents answer well: the saga must reach an end.
        for _ in 0..100 {
            if i.status.is_final() || i.status == Status::Stuck {
                break;
            }
            let effects = match i.current.clone() {
                Some(Attempt { key, waiting: Waiting::Backoff }) => {
                    i.apply(&d, Input::RetryDue { key }, 0.3).expect("retry")
                }
                Some(Attempt { key, .. }) => i
                    .apply(&d, Input::Completed { key, output: json!({"verdict": "approved"}) }, 0.3)
                    .expect("complete"),
                None => break,
            };
            for t in dispatched(&effects) {
                prop_assert!(seen.insert(t.key.clone()), "dispatched twice: {}", t.key);
            }
        }
        prop_assert!(i.status.is_final() || i.status == Status::Stuck, "{:?}", i.status);
        if i.status.is_final() {
            prop_assert!(i.current.is_none());
        }
    }
}

#[test]
fn task_keys_parse_back() {
    let key = TaskKey {
        saga: saga_id("s-1"),
        step: "a/b".into(),
        visit: 2,
        attempt: 3,
        compensation: true,
    };
    assert_eq!(key.to_string().parse::<TaskKey>(), Ok(key.clone()));
    let plain = TaskKey {
        compensation: false,
        ..key
    };
    assert_eq!(plain.to_string().parse::<TaskKey>(), Ok(plain));
    assert!("nonsense".parse::<TaskKey>().is_err());
    assert!("s/STEP/x/1".parse::<TaskKey>().is_err());
}
