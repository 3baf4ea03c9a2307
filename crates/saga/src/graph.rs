//! A definition, or a running instance, as a graph: JSON nodes and edges
//! (for the visualization page), Mermaid and Graphviz DOT. Pure functions;
//! the control plane serves them.

use serde::Serialize;

use crate::definition::{Definition, Target};
use crate::machine::{Instance, Status, Waiting};

/// How far a step has got in an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Not reached (yet).
    Pending,
    /// An attempt is out.
    Running,
    /// Between attempts.
    Retrying,
    /// Done, not undone.
    Completed,
    /// Its compensation is running.
    Compensating,
    /// Undone.
    Compensated,
    /// Its compensation kept failing.
    Stuck,
}

/// A step or an end state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Node {
    /// The step's name, or `DONE`, `FAILED`, `COMPENSATED`.
    pub id: String,
    /// `step` or `end`.
    pub kind: &'static str,
    /// The step's agent type.
    pub agent: Option<String>,
    /// The step's action.
    pub action: Option<String>,
    /// How far it has got (with an instance).
    pub state: Option<StepState>,
    /// How often the instance has visited it.
    pub visits: u32,
    /// The attempt in flight, if any.
    pub attempt: Option<u32>,
}

/// A transition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Edge {
    /// The node it leaves.
    pub from: String,
    /// The node it leads to.
    pub to: String,
    /// `success`, `failure`, `exhausted`, or the condition (`/verdict = "approved"`).
    pub label: String,
}

/// A definition's steps and transitions, with an instance's progress when
/// drawn for one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Graph {
    /// The definition's name.
    pub definition: String,
    /// Its version.
    pub version: u32,
    /// The instance's status (with an instance).
    pub status: Option<Status>,
    /// Steps, then end states.
    pub nodes: Vec<Node>,
    /// Transitions.
    pub edges: Vec<Edge>,
}

fn end_id(target: &Target) -> Option<&'static str> {
    match target {
        Target::Done => Some("DONE"),
        Target::Failed => Some("FAILED"),
        Target::Compensate => Some("COMPENSATED"),
        Target::Step(_) => None,
    }
}

fn target_id(target: &Target) -> String {
    match target {
        Target::Step(s) => s.clone(),
        other => end_id(other).unwrap_or_default().to_owned(),
    }
}

fn state_of(instance: &Instance, step: &str) -> Option<StepState> {
    if let Some(attempt) = &instance.current
        && attempt.key.step == step
    {
        return Some(
            match (attempt.key.compensation, attempt.waiting, instance.status) {
                (true, _, Status::Stuck) => StepState::Stuck,
                (true, _, _) => StepState::Compensating,
                (false, Waiting::Reply, _) => StepState::Running,
                (false, Waiting::Backoff, _) => StepState::Retrying,
            },
        );
    }
    let visited = instance.visits.get(step).copied().unwrap_or(0) > 0;
    let still_done = instance.completed.iter().any(|c| c.step == step);
    Some(match (visited, still_done, instance.ending.is_some()) {
        (false, _, _) => StepState::Pending,
        (true, true, _) => StepState::Completed,
        // Visited, no longer among the completed, while compensating or
        // after: it was undone (or never completed and nothing to undo).
        (true, false, true) => StepState::Compensated,
        (true, false, false) => StepState::Completed,
    })
}

/// The definition's graph, with `instance`'s progress when given.
pub fn graph(definition: &Definition, instance: Option<&Instance>) -> Graph {
    let mut nodes = Vec::new();
    let mut edges = Vec::new();
    let mut ends = std::collections::BTreeSet::new();
    for (name, step) in &definition.steps {
        nodes.push(Node {
            id: name.clone(),
            kind: "step",
            agent: Some(step.agent.clone()),
            action: Some(step.action.clone()),
            state: instance.and_then(|i| state_of(i, name)),
            visits: instance
                .and_then(|i| i.visits.get(name).copied())
                .unwrap_or(0),
            attempt: instance
                .and_then(|i| i.current.as_ref())
                .filter(|a| a.key.step == *name)
                .map(|a| a.key.attempt),
        });
        let mut add = |target: &Target, label: String| {
            if let Some(end) = end_id(target) {
                ends.insert(end);
            }
            edges.push(Edge {
                from: name.clone(),
                to: target_id(target),
                label,
            });
        };
        for c in &step.when {
            add(&c.goto, format!("{} = {}", c.path, c.equals));
        }
        add(&step.on_success, "success".into());
        add(&step.on_failure, "failure".into());
        if step.max_visits.is_some() {
            add(&step.on_exhausted, "exhausted".into());
        }
    }
    for end in ends {
        nodes.push(Node {
            id: end.to_owned(),
            kind: "end",
            agent: None,
            action: None,
            state: None,
            visits: 0,
            attempt: None,
        });
    }
    Graph {
        definition: definition.name.clone(),
        version: definition.version,
        status: instance.map(|i| i.status),
        nodes,
        edges,
    }
}

fn state_class(state: Option<StepState>) -> &'static str {
    match state {
        None | Some(StepState::Pending) => "pending",
        Some(StepState::Running) => "running",
        Some(StepState::Retrying) => "retrying",
        Some(StepState::Completed) => "completed",
        Some(StepState::Compensating) => "compensating",
        Some(StepState::Compensated) => "compensated",
        Some(StepState::Stuck) => "stuck",
    }
}

fn color(state: Option<StepState>) -> &'static str {
    match state {
        None | Some(StepState::Pending) => "#eeeeee",
        Some(StepState::Running) => "#9ecae1",
        Some(StepState::Retrying) => "#fdd0a2",
        Some(StepState::Completed) => "#a1d99b",
        Some(StepState::Compensating) => "#fdae6b",
        Some(StepState::Compensated) => "#bcbddc",
        Some(StepState::Stuck) => "#fb6a4a",
    }
}

/// Mermaid flowchart text.
pub fn mermaid(graph: &Graph) -> String {
    let mut out = String::from("flowchart LR\n");
    for n in &graph.nodes {
        let label = match (&n.agent, &n.action) {
            (Some(agent), Some(action)) => format!("{}<br/>{agent}: {action}", n.id),
            _ => n.id.clone(),
        };
        let shape = if n.kind == "end" {
            format!("(({label}))")
        } else {
            format!("[\"{label}\"]")
        };
        out.push_str(&format!("  {}{shape}:::{}\n", n.id, state_class(n.state)));
    }
    for e in &graph.edges {
        let label = e.label.replace('"', "'");
        out.push_str(&format!("  {} -->|\"{label}\"| {}\n", e.from, e.to));
    }
    for state in [
        None,
        Some(StepState::Running),
        Some(StepState::Retrying),
        Some(StepState::Completed),
        Some(StepState::Compensating),
        Some(StepState::Compensated),
        Some(StepState::Stuck),
    ] {
        out.push_str(&format!(
            "  classDef {} fill:{}\n",
            state_class(state),
            color(state)
        ));
    }
    out
}

/// Graphviz DOT text.
pub fn dot(graph: &Graph) -> String {
    let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let mut out = format!(
        "digraph {} {{\n  rankdir=LR;\n  node [style=filled, fontname=\"sans-serif\"];\n",
        quote(&format!("{} v{}", graph.definition, graph.version))
    );
    for n in &graph.nodes {
        let label = match (&n.agent, &n.action) {
            (Some(agent), Some(action)) => format!("{}\\n{agent}: {action}", n.id),
            _ => n.id.clone(),
        };
        let shape = if n.kind == "end" {
            "doublecircle"
        } else {
            "box"
        };
        out.push_str(&format!(
            "  {} [label={}, shape={shape}, fillcolor={}];\n",
            quote(&n.id),
            quote(&label),
            quote(color(n.state))
        ));
    }
    for e in &graph.edges {
        out.push_str(&format!(
            "  {} -> {} [label={}];\n",
            quote(&e.from),
            quote(&e.to),
            quote(&e.label)
        ));
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::builtin::plan_code_critique;
    use crate::machine::{Input, saga_id};

    #[test]
    fn the_definition_graph_has_every_step_end_and_transition() {
        let g = graph(&plan_code_critique(), None);
        let ids: Vec<&str> = g.nodes.iter().map(|n| n.id.as_str()).collect();
        assert_eq!(
            ids,
            ["CODE", "CRITIQUE", "PLAN", "COMPENSATED", "DONE", "FAILED"]
        );
        let has = |from: &str, to: &str, label: &str| {
            g.edges
                .iter()
                .any(|e| e.from == from && e.to == to && e.label == label)
        };
        assert!(has("PLAN", "CODE", "success"));
        assert!(has("CRITIQUE", "DONE", "/verdict = \"approved\""));
        assert!(has("CRITIQUE", "CODE", "/verdict = \"changes_requested\""));
        assert!(has("CODE", "FAILED", "exhausted"));
        assert!(has("PLAN", "COMPENSATED", "failure"));
        assert!(g.nodes.iter().all(|n| n.state.is_none()));
    }

    #[test]
    fn an_instance_shows_where_it_is() {
        let d = plan_code_critique();
        let (mut i, effects) = Instance::start(&d, saga_id("s"), json!({"task": "t"}));
        let Some(crate::machine::Effect::Dispatch(plan)) = effects
            .iter()
            .find(|e| matches!(e, crate::machine::Effect::Dispatch(_)))
        else {
            panic!("no task");
        };
        i.apply(
            &d,
            Input::Completed {
                key: plan.key.clone(),
                output: json!("p"),
            },
            0.5,
        )
        .expect("apply");
        let g = graph(&d, Some(&i));
        let state = |id: &str| g.nodes.iter().find(|n| n.id == id).and_then(|n| n.state);
        assert_eq!(state("PLAN"), Some(StepState::Completed));
        assert_eq!(state("CODE"), Some(StepState::Running));
        assert_eq!(state("CRITIQUE"), Some(StepState::Pending));
        assert_eq!(g.status, Some(Status::Running));
        let m = mermaid(&g);
        assert!(m.starts_with("flowchart LR\n"));
        assert!(m.contains("  PLAN -->|\"success\"| CODE\n"), "{m}");
        assert!(
            m.contains("CODE[\"CODE<br/>coder: code\"]:::running"),
            "{m}"
        );
        let d = dot(&g);
        assert!(d.starts_with("digraph \"plan-code-critique v1\" {"), "{d}");
        assert!(
            d.contains("\"CRITIQUE\" -> \"DONE\" [label=\"/verdict = \\\"approved\\\"\"];"),
            "{d}"
        );
        assert_eq!(d.matches('{').count(), d.matches('}').count());
        let json = serde_json::to_value(&g).expect("json");
        assert_eq!(json["nodes"][0]["state"], "running");
    }
}
