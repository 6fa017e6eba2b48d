//! Task parameters as data. The seven built-in tasks live in `tasks/builtin.toml`; a user TOML
//! file with the same `[[task]]` layout adds variants without code.

use crate::error::SpecError;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;

/// The 26 agent names; each has a distinct initial, which the text renderer uses.
pub const NAMES: [&str; 26] = [
    "Alice", "Bob", "Charlie", "Diana", "Eve", "Frank", "Grace", "Hank", "Ivy", "Jack", "Kathy",
    "Leo", "Mona", "Nina", "Oscar", "Paul", "Quincy", "Rachel", "Steve", "Tina", "Uma", "Vince",
    "Wendy", "Xander", "Yara", "Zane",
];

const BUILTIN_TOML: &str = include_str!("../tasks/builtin.toml");

/// The ids of the seven built-in tasks, in the order of GRIDWORLD.md.
pub const BUILTIN_IDS: [&str; 7] = [
    "single_nav",
    "corners",
    "alphabetical",
    "random_points",
    "single_pick",
    "multi_pick",
    "permission_pick",
];

/// An action name of the reply schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionName {
    North,
    South,
    East,
    West,
    Skip,
    Pick,
    Drop,
}

impl ActionName {
    pub const ALL: [ActionName; 7] = [
        ActionName::North,
        ActionName::South,
        ActionName::East,
        ActionName::West,
        ActionName::Skip,
        ActionName::Pick,
        ActionName::Drop,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ActionName::North => "north",
            ActionName::South => "south",
            ActionName::East => "east",
            ActionName::West => "west",
            ActionName::Skip => "skip",
            ActionName::Pick => "pick",
            ActionName::Drop => "drop",
        }
    }

    pub fn parse(s: &str) -> Option<ActionName> {
        let s = s.trim().to_ascii_lowercase();
        ActionName::ALL.into_iter().find(|a| a.as_str() == s)
    }

    /// The meaning shown in the system message.
    pub fn meaning(self) -> &'static str {
        match self {
            ActionName::North => "y+1",
            ActionName::South => "y-1",
            ActionName::East => "x+1",
            ActionName::West => "x-1",
            ActionName::Skip => "stay",
            ActionName::Pick => "take an item from your cell; you hold at most one",
            ActionName::Drop => "put your item on your cell",
        }
    }
}

impl fmt::Display for ActionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the agents must achieve; decides scoring, the goal text and the expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// One visible target cell; 100 when an agent stands on it.
    Navigate,
    /// Every agent on a different corner; 100 x distinct corners occupied / min(agents, 4).
    Corners,
    /// The agent with sorted-name index i at (i, 0); 100 x agents in place / agents.
    Alphabetical,
    /// Hidden target cells, learnt only by standing on them; 100 x occupied / count.
    HiddenPoints,
    /// Items and targets, all given; 100 x targets holding an item / targets.
    Carry,
}

fn default_hidden_targets() -> usize {
    2
}

fn yes() -> bool {
    true
}

/// One task (or variant): the parameters that an episode draws from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskSpec {
    pub id: String,
    pub kind: TaskKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Allowed widths; one is drawn per episode.
    pub width: Vec<i32>,
    /// Allowed heights; one is drawn per episode.
    pub height: Vec<i32>,
    /// Allowed agent counts; one is drawn per episode.
    pub agents: Vec<usize>,
    /// Round limit: every agent acts once per round.
    pub rounds: u32,
    /// Carry: allowed item counts (= target counts). Empty: one item per agent.
    #[serde(default)]
    pub items: Vec<usize>,
    /// HiddenPoints: how many hidden targets.
    #[serde(default = "default_hidden_targets")]
    pub hidden_targets: usize,
    /// Carry: each item may be picked only by the agent it is assigned to.
    #[serde(default)]
    pub permissions: bool,
    /// With permissions: the goal line names each item's agent (the cell always does).
    #[serde(default = "yes")]
    pub owners_in_goal: bool,
    /// Allowed actions. Empty: moves + skip, plus pick and drop for carry.
    #[serde(default)]
    pub actions: Vec<ActionName>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFile {
    #[serde(default)]
    task: Vec<TaskSpec>,
}

impl TaskSpec {
    /// A built-in task by id.
    pub fn builtin(id: &str) -> Result<TaskSpec, SpecError> {
        builtin_tasks()
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(|| SpecError::UnknownTask {
                id: id.to_string(),
                known: BUILTIN_IDS.join(", "),
            })
    }

    /// The actions an agent may name in this task.
    pub fn allowed_actions(&self) -> Vec<ActionName> {
        if !self.actions.is_empty() {
            return self.actions.clone();
        }
        let mut v = vec![
            ActionName::North,
            ActionName::South,
            ActionName::East,
            ActionName::West,
            ActionName::Skip,
        ];
        if self.kind == TaskKind::Carry {
            v.push(ActionName::Pick);
            v.push(ActionName::Drop);
        }
        v
    }

    /// Checks that every episode this spec can draw is well formed.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |why: String| {
            Err(SpecError::Invalid {
                id: self.id.clone(),
                why,
            })
        };
        if self.id.trim().is_empty() {
            return bad("empty id".into());
        }
        if self.width.is_empty() || self.height.is_empty() || self.agents.is_empty() {
            return bad("width, height and agents need at least one value each".into());
        }
        if self
            .width
            .iter()
            .chain(&self.height)
            .any(|&d| !(1..=26).contains(&d))
        {
            return bad("width and height must be in 1..=26".into());
        }
        if self.agents.iter().any(|&n| !(1..=26).contains(&n)) {
            return bad("agents must be in 1..=26".into());
        }
        if self.rounds == 0 || self.rounds > 1000 {
            return bad("rounds must be in 1..=1000".into());
        }
        let min_w = *self.width.iter().min().unwrap();
        let min_h = *self.height.iter().min().unwrap();
        let min_cells = (min_w * min_h) as usize;
        let max_agents = *self.agents.iter().max().unwrap();
        if max_agents > min_cells {
            return bad(format!(
                "{max_agents} agents need distinct start cells but the smallest grid has {min_cells}"
            ));
        }
        let actions = self.allowed_actions();
        let has_items_actions = actions
            .iter()
            .any(|a| matches!(a, ActionName::Pick | ActionName::Drop));
        match self.kind {
            TaskKind::Carry => {
                if !actions.contains(&ActionName::Pick) || !actions.contains(&ActionName::Drop) {
                    return bad("carry tasks need pick and drop".into());
                }
                let max_items = if self.items.is_empty() {
                    max_agents
                } else {
                    *self.items.iter().max().unwrap()
                };
                if self.items.contains(&0) || max_items == 0 {
                    return bad("item counts must be at least 1".into());
                }
                if max_items > 26 {
                    return bad("at most 26 items (named a..z)".into());
                }
                if 2 * max_items > min_cells {
                    return bad(format!(
                        "{max_items} items and {max_items} targets need distinct cells but the smallest grid has {min_cells}"
                    ));
                }
            }
            _ => {
                if has_items_actions {
                    return bad("pick and drop only where items exist (kind carry)".into());
                }
                if self.permissions {
                    return bad("permissions only for kind carry".into());
                }
                if !self.items.is_empty() {
                    return bad("items only for kind carry".into());
                }
            }
        }
        match self.kind {
            TaskKind::Navigate if min_cells < 2 => bad("navigate needs at least 2 cells".into()),
            TaskKind::Corners if min_w < 2 || min_h < 2 => {
                bad("corners needs width and height of at least 2".into())
            }
            TaskKind::Alphabetical if (min_w as usize) < max_agents => bad(format!(
                "alphabetical needs width >= agents ({max_agents}) for row 0"
            )),
            TaskKind::HiddenPoints
                if self.hidden_targets == 0 || self.hidden_targets > min_cells =>
            {
                bad("hidden_targets must be in 1..=cells".into())
            }
            _ => Ok(()),
        }
    }
}

/// Parses a TOML text of `[[task]]` tables and validates each.
pub fn parse_tasks(text: &str) -> Result<Vec<TaskSpec>, SpecError> {
    let file: TaskFile = toml::from_str(text).map_err(|e| SpecError::Toml(e.to_string()))?;
    for t in &file.task {
        t.validate()?;
    }
    Ok(file.task)
}

/// The seven built-in tasks.
pub fn builtin_tasks() -> Vec<TaskSpec> {
    parse_tasks(BUILTIN_TOML).expect("built-in tasks.toml is valid")
}

/// The built-in tasks plus user variants; a user task with a built-in id replaces it.
#[derive(Debug, Clone)]
pub struct TaskRegistry {
    tasks: Vec<TaskSpec>,
}

impl Default for TaskRegistry {
    fn default() -> Self {
        TaskRegistry {
            tasks: builtin_tasks(),
        }
    }
}

impl TaskRegistry {
    pub fn builtin() -> Self {
        Self::default()
    }

    /// Adds (or replaces) the tasks of a TOML text.
    pub fn add_toml(&mut self, text: &str) -> Result<(), SpecError> {
        for t in parse_tasks(text)? {
            self.insert(t);
        }
        Ok(())
    }

    /// Adds (or replaces) the tasks of a TOML file.
    pub fn add_file(&mut self, path: &Path) -> Result<(), SpecError> {
        let text = std::fs::read_to_string(path).map_err(|e| SpecError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        self.add_toml(&text)
    }

    pub fn insert(&mut self, task: TaskSpec) {
        match self.tasks.iter_mut().find(|t| t.id == task.id) {
            Some(slot) => *slot = task,
            None => self.tasks.push(task),
        }
    }

    pub fn get(&self, id: &str) -> Result<&TaskSpec, SpecError> {
        self.tasks
            .iter()
            .find(|t| t.id == id)
            .ok_or_else(|| SpecError::UnknownTask {
                id: id.to_string(),
                known: self.ids().join(", "),
            })
    }

    pub fn ids(&self) -> Vec<&str> {
        self.tasks.iter().map(|t| t.id.as_str()).collect()
    }

    pub fn tasks(&self) -> &[TaskSpec] {
        &self.tasks
    }

    /// `"all"` gives every task; otherwise a comma-separated list of ids.
    pub fn select(&self, which: &str) -> Result<Vec<TaskSpec>, SpecError> {
        if which.trim() == "all" {
            return Ok(self.tasks.clone());
        }
        which
            .split(',')
            .map(|id| self.get(id.trim()).cloned())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_parse_and_match_the_table() {
        let tasks = builtin_tasks();
        let ids: Vec<_> = tasks.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, BUILTIN_IDS);
        let pp = TaskSpec::builtin("permission_pick").unwrap();
        assert_eq!(pp.width, vec![3, 4]);
        assert_eq!(pp.height, vec![4, 5]);
        assert!(pp.permissions);
        let mp = TaskSpec::builtin("multi_pick").unwrap();
        assert!(!mp.permissions);
        assert_eq!(mp.rounds, 20);
        assert_eq!(
            TaskSpec::builtin("single_nav")
                .unwrap()
                .allowed_actions()
                .len(),
            5
        );
        assert_eq!(
            TaskSpec::builtin("single_pick")
                .unwrap()
                .allowed_actions()
                .len(),
            7
        );
    }

    #[test]
    fn user_variant_from_toml() {
        let mut reg = TaskRegistry::builtin();
        reg.add_toml(
            r#"
[[task]]
id = "big_corners"
kind = "corners"
width = [8]
height = [7]
agents = [4]
rounds = 16

[[task]]
id = "multi_pick"
kind = "carry"
width = [4]
height = [4]
agents = [2]
rounds = 20
items = [3]
permissions = true
"#,
        )
        .unwrap();
        assert_eq!(reg.get("big_corners").unwrap().width, vec![8]);
        assert!(reg.get("multi_pick").unwrap().permissions);
        assert_eq!(reg.tasks().len(), 8);
        assert_eq!(reg.select("all").unwrap().len(), 8);
        assert_eq!(reg.select("corners, big_corners").unwrap().len(), 2);
        assert!(reg.get("nope").is_err());
    }

    #[test]
    fn invalid_variants_are_rejected() {
        let bad = [
            "[[task]]\nid='x'\nkind='corners'\nwidth=[4]\nheight=[4]\nagents=[4]\nrounds=10\nactions=['pick']",
            "[[task]]\nid='x'\nkind='alphabetical'\nwidth=[3]\nheight=[2]\nagents=[4]\nrounds=10",
            "[[task]]\nid='x'\nkind='carry'\nwidth=[2]\nheight=[2]\nagents=[2]\nrounds=10\nitems=[3]",
            "[[task]]\nid='x'\nkind='corners'\nwidth=[4]\nheight=[4]\nagents=[4]\nrounds=10\ntypo=1",
            "[[task]]\nid='x'\nkind='navigate'\nwidth=[]\nheight=[4]\nagents=[1]\nrounds=10",
            "[[task]]\nid='x'\nkind='navigate'\nwidth=[2]\nheight=[2]\nagents=[5]\nrounds=10",
        ];
        for b in bad {
            assert!(parse_tasks(b).is_err(), "accepted: {b}");
        }
    }
}
