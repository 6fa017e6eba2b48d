//! Helpers shared by the integration tests.
#![allow(dead_code)]

use teamtune_gridworld::{Item, Pos, TaskKind, TaskSpec, World};

/// A hand-built world (no randomness).
pub fn world(kind: TaskKind, w: i32, h: i32, agents: &[(&str, (i32, i32))]) -> World {
    World::with_agents(kind, w, h, agents)
}

pub fn item(id: char, p: (i32, i32), owner: Option<usize>) -> Item {
    Item {
        id,
        pos: Some(Pos::from(p)),
        holder: None,
        owner,
    }
}

pub fn spec(id: &str) -> TaskSpec {
    TaskSpec::builtin(id).unwrap()
}

pub fn spec_rounds(id: &str, rounds: u32) -> TaskSpec {
    let mut s = spec(id);
    s.rounds = rounds;
    s
}

/// A reply with only an action (and optionally a message).
pub fn act(action: &str, message: &str) -> String {
    format!(
        r#"{{"reflection":"","rationale":"","action_name":"{action}","action_parameters":{{}},"message":"{message}","add_memory":""}}"#
    )
}

/// An independent recount of the score from a world's state (not `World::score`).
pub fn recount(w: &World) -> f64 {
    let on = |p: Pos| w.agents.iter().any(|a| a.pos == p);
    let pct = |got: usize, need: usize| 100.0 * got as f64 / need as f64;
    match w.kind {
        TaskKind::Navigate => {
            if on(w.targets[0]) {
                100.0
            } else {
                0.0
            }
        }
        TaskKind::Corners => {
            let mut corners = vec![
                Pos::new(0, 0),
                Pos::new(w.width - 1, 0),
                Pos::new(0, w.height - 1),
                Pos::new(w.width - 1, w.height - 1),
            ];
            corners.sort();
            corners.dedup();
            let got = corners.iter().filter(|c| on(**c)).count();
            let need = w.agents.len().min(corners.len());
            pct(got.min(need), need)
        }
        TaskKind::Alphabetical => {
            let mut names: Vec<&String> = w.agents.iter().map(|a| &a.name).collect();
            names.sort();
            let got = w
                .agents
                .iter()
                .filter(|a| {
                    let k = names.iter().position(|n| **n == a.name).unwrap();
                    a.pos == Pos::new(k as i32, 0)
                })
                .count();
            pct(got, w.agents.len())
        }
        TaskKind::HiddenPoints => pct(w.hidden.iter().filter(|t| on(**t)).count(), w.hidden.len()),
        TaskKind::Carry => pct(
            w.targets
                .iter()
                .filter(|t| w.items.iter().any(|i| i.pos == Some(**t)))
                .count(),
            w.targets.len(),
        ),
    }
}
