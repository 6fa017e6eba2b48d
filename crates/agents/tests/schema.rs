//! The reply schema itself, per built-in task.

use serde_json::Value;
use teamtune_agents::{reply_schema, schema_actions, SchemaOptions, FIELDS};
use teamtune_gridworld::{builtin_tasks, ActionName, TaskSpec};

fn branches(schema: &Value) -> Vec<&Value> {
    match schema.get("anyOf").and_then(Value::as_array) {
        Some(b) => b.iter().collect(),
        None => vec![schema],
    }
}

#[test]
fn action_enum_is_exactly_the_tasks_actions() {
    for task in builtin_tasks() {
        let schema = reply_schema(&task, &SchemaOptions::default()).unwrap();
        let mut got = schema_actions(&schema);
        let mut want: Vec<String> = task
            .allowed_actions()
            .iter()
            .map(|a| a.as_str().to_string())
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want, "task {}", task.id);
        // each action in exactly one branch: parameters are tied to the action
        let n: usize = branches(&schema)
            .iter()
            .map(|b| {
                b["properties"]["action_name"]["enum"]
                    .as_array()
                    .unwrap()
                    .len()
            })
            .sum();
        assert_eq!(n, want.len(), "task {}", task.id);
    }
}

#[test]
fn fields_in_order_all_required_nothing_else() {
    let o = SchemaOptions {
        max_reflection_chars: 11,
        max_rationale_chars: 12,
        max_message_chars: 13,
        max_memory_chars: 14,
    };
    for task in builtin_tasks() {
        let schema = reply_schema(&task, &o).unwrap();
        for b in branches(&schema) {
            let keys: Vec<&str> = b["properties"]
                .as_object()
                .unwrap()
                .keys()
                .map(String::as_str)
                .collect();
            assert_eq!(keys, FIELDS, "task {}: property order", task.id);
            let required: Vec<&str> = b["required"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
                .collect();
            assert_eq!(required, FIELDS, "task {}", task.id);
            assert_eq!(b["additionalProperties"], Value::Bool(false));
            let p = &b["properties"];
            assert_eq!(p["reflection"]["maxLength"], 11);
            assert_eq!(p["rationale"]["maxLength"], 12);
            assert_eq!(p["message"]["maxLength"], 13);
            assert_eq!(p["add_memory"]["maxLength"], 14);
            assert_eq!(p["action_parameters"]["type"], "object");
            assert_eq!(
                p["action_parameters"]["additionalProperties"],
                Value::Bool(false)
            );
        }
    }
}

#[test]
fn pick_names_only_items_the_task_can_have() {
    let spec = |id: &str| TaskSpec::builtin(id).unwrap();
    let items = |task: &TaskSpec| -> Vec<String> {
        let schema = reply_schema(task, &SchemaOptions::default()).unwrap();
        let b = branches(&schema)
            .into_iter()
            .find(|b| b["properties"]["action_name"]["enum"][0] == "pick")
            .expect("a pick branch");
        b["properties"]["action_parameters"]["properties"]["item"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(items(&spec("single_pick")), ["a"]);
    let mp = spec("multi_pick");
    let n = mp.agents.iter().max().copied().unwrap();
    assert_eq!(items(&mp).len(), n);
    assert_eq!(
        items(&mp)[n - 1],
        ((b'a' + n as u8 - 1) as char).to_string()
    );
    // no pick, no anyOf
    let nav = reply_schema(&spec("single_nav"), &SchemaOptions::default()).unwrap();
    assert!(nav.get("anyOf").is_none());
    assert!(!schema_actions(&nav).contains(&ActionName::Pick.to_string()));
}

#[test]
fn limits_beyond_the_parser_are_refused_with_the_task_named() {
    let task = TaskSpec::builtin("corners").unwrap();
    let o = SchemaOptions {
        max_message_chars: 301,
        ..SchemaOptions::default()
    };
    let e = reply_schema(&task, &o).unwrap_err().to_string();
    assert!(
        e.contains("corners") && e.contains("message") && e.contains("300"),
        "{e}"
    );
    // uniform() clamps to what the parser accepts
    assert!(reply_schema(&task, &SchemaOptions::uniform(100_000)).is_ok());
}
