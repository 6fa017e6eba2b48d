//! What an agent is shown, as structured data ([`Briefing`] once, [`Observation`] every turn)
//! and as the text of its system and user messages. The text is a pure function of these
//! structures, and they hold nothing a prompt does not show: scripted experts read them and
//! nothing else. Other agents' positions are never in them.

use crate::geom::Pos;
use crate::task::{ActionName, TaskKind, TaskSpec};
use crate::world::World;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// Everything of the system message: fixed for the episode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Briefing {
    pub task: String,
    pub kind: TaskKind,
    pub width: i32,
    pub height: i32,
    pub rounds: u32,
    /// All agents' names in turn order.
    pub names: Vec<String>,
    /// This agent's index in `names`.
    pub me: usize,
    pub actions: Vec<ActionName>,
    /// HiddenPoints: how many hidden targets.
    pub hidden_targets: usize,
    /// Carry: item count.
    pub items: usize,
    pub permissions: bool,
}

impl Briefing {
    pub fn new(spec: &TaskSpec, world: &World, me: usize) -> Self {
        Briefing {
            task: spec.id.clone(),
            kind: spec.kind,
            width: world.width,
            height: world.height,
            rounds: spec.rounds,
            names: world.agents.iter().map(|a| a.name.clone()).collect(),
            me,
            actions: spec.allowed_actions(),
            hidden_targets: world.hidden.len(),
            items: world.items.len(),
            permissions: world.permissions,
        }
    }

    pub fn my_name(&self) -> &str {
        &self.names[self.me]
    }

    /// SW, SE, NW, NE.
    pub fn corners(&self) -> [Pos; 4] {
        let (mx, my) = (self.width - 1, self.height - 1);
        [
            Pos::new(0, 0),
            Pos::new(mx, 0),
            Pos::new(0, my),
            Pos::new(mx, my),
        ]
    }

    /// The rules text of the task.
    pub fn task_text(&self) -> String {
        let n = self.names.len();
        match self.kind {
            TaskKind::Navigate => {
                "Reach the target cell given in your goal. Score 100 when an agent stands on it."
                    .to_string()
            }
            TaskKind::Corners => {
                let need = n.min(4);
                format!(
                    "Each agent must stand on a different corner. Score: {} per corner occupied.",
                    fmt_score(100.0 / need as f64)
                )
            }
            TaskKind::Alphabetical => format!(
                "Line up on row y=0 in A-Z order of names: the k-th name in A-Z order belongs at (k-1,0). Score: 100 x agents in place / {n}."
            ),
            TaskKind::HiddenPoints => format!(
                "There are {k} hidden target cells. You learn of a target only by standing on it. Score: {s} per target occupied at the same time.",
                k = self.hidden_targets,
                s = fmt_score(100.0 / self.hidden_targets.max(1) as f64)
            ),
            TaskKind::Carry => {
                let mut s = format!(
                    "Carry items onto targets: pick an item on your cell, walk, drop it on a target. Score: 100 x targets holding an item / {}.",
                    self.items
                );
                if self.permissions {
                    s.push_str(" Each item may be picked only by the agent named for it.");
                }
                s
            }
        }
    }

    /// The system message.
    pub fn system_message(&self) -> String {
        let (w, h) = (self.width, self.height);
        let mut s = String::new();
        let others: Vec<&str> = self
            .names
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != self.me)
            .map(|(_, n)| n.as_str())
            .collect();
        if others.is_empty() {
            let _ = writeln!(s, "You are {}, alone in a grid game.", self.my_name());
        } else {
            let _ = writeln!(
                s,
                "You are {}, one of {} agents in a grid game. Turn order: {}.",
                self.my_name(),
                self.names.len(),
                self.names.join(", ")
            );
        }
        let [sw, se, nw, ne] = self.corners();
        let _ = writeln!(
            s,
            "Grid {w}x{h}: cells (x,y), x 0..{} west to east, y 0..{} south to north. Corners: SW {sw}, SE {se}, NW {nw}, NE {ne}.",
            w - 1,
            h - 1
        );
        let _ = writeln!(
            s,
            "Task: {} The game ends at score 100 or after {} rounds.",
            self.task_text(),
            self.rounds
        );
        if others.is_empty() {
            let _ = writeln!(s, "You see your own position and cell.");
        } else {
            let _ = writeln!(
                s,
                "You see only your own position and cell, not other agents. Your message reaches all other agents on their next turn."
            );
        }
        let actions: Vec<String> = self
            .actions
            .iter()
            .map(|a| format!("{} ({})", a.as_str(), a.meaning()))
            .collect();
        let _ = writeln!(s, "Actions: {}.", actions.join(", "));
        s.push_str(
            "Reply with one JSON object only: {\"reflection\":\"...\",\"rationale\":\"...\",\"action_name\":\"...\",\"action_parameters\":{},\"message\":\"\",\"add_memory\":\"\"}. message \"\" sends nothing; add_memory is added to your memory.",
        );
        s
    }
}

/// Where an item is, as the goal line shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ItemPlace {
    Ground(Pos),
    HeldByYou,
    HeldBy(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemView {
    pub id: char,
    pub place: ItemPlace,
    /// The agent that may pick it, when the goal names it.
    pub owner: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetView {
    pub pos: Pos,
    pub filled: bool,
}

/// The goal line of the user message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GoalView {
    Reach {
        target: Pos,
    },
    /// SW, SE, NW, NE.
    Corners {
        corners: [Pos; 4],
    },
    /// The cell of this agent's name in A-Z order.
    Alphabetical {
        place: Pos,
    },
    HiddenPoints {
        count: usize,
    },
    Carry {
        items: Vec<ItemView>,
        targets: Vec<TargetView>,
    },
}

/// An item on the agent's own cell.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellItem {
    pub id: char,
    /// With permissions: who may pick it (always shown on the cell).
    pub owner: Option<String>,
}

/// The contents of the agent's own cell.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CellView {
    pub items: Vec<CellItem>,
    /// A visible target (navigate or carry).
    pub target: bool,
    /// A hidden target (hidden_points): learnt by standing here.
    pub hidden_target: bool,
}

/// A message received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxMessage {
    pub from: String,
    pub text: String,
}

/// Everything of one user message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// 1-based.
    pub round: u32,
    pub rounds: u32,
    pub score: f64,
    pub memory: Vec<String>,
    pub goal: GoalView,
    /// The result of the agent's previous action (first turn: its start).
    pub last: String,
    pub pos: Pos,
    /// Carry: the id of the item held.
    pub holding: Option<char>,
    pub cell: CellView,
    pub inbox: Vec<InboxMessage>,
    /// Carry tasks show holdings.
    pub carry: bool,
}

/// A score with at most one decimal: `25`, `33.3`.
pub fn fmt_score(s: f64) -> String {
    let r = (s * 10.0).round() / 10.0;
    if (r - r.round()).abs() < 1e-9 {
        format!("{}", r.round() as i64)
    } else {
        format!("{r:.1}")
    }
}

impl GoalView {
    /// Built from the world for agent `me`: only what the goal gives (no agent positions).
    pub fn new(world: &World, me: usize, owners_in_goal: bool) -> Self {
        match world.kind {
            TaskKind::Navigate => GoalView::Reach {
                target: world.targets[0],
            },
            TaskKind::Corners => GoalView::Corners {
                corners: world.corners(),
            },
            TaskKind::Alphabetical => GoalView::Alphabetical {
                place: world.alphabetical_cell(me),
            },
            TaskKind::HiddenPoints => GoalView::HiddenPoints {
                count: world.hidden.len(),
            },
            TaskKind::Carry => GoalView::Carry {
                items: world
                    .items
                    .iter()
                    .map(|it| ItemView {
                        id: it.id,
                        place: match (it.pos, it.holder) {
                            (Some(p), _) => ItemPlace::Ground(p),
                            (None, Some(h)) if h == me => ItemPlace::HeldByYou,
                            (None, Some(h)) => ItemPlace::HeldBy(world.agents[h].name.clone()),
                            (None, None) => unreachable!("an item is on the ground or held"),
                        },
                        owner: match it.owner {
                            Some(o) if world.permissions && owners_in_goal => {
                                Some(world.agents[o].name.clone())
                            }
                            _ => None,
                        },
                    })
                    .collect(),
                targets: world
                    .targets
                    .iter()
                    .map(|t| TargetView {
                        pos: *t,
                        filled: world.items.iter().any(|it| it.pos == Some(*t)),
                    })
                    .collect(),
            },
        }
    }

    /// The goal line as agent at `pos` reads it: every cell it names is followed by the way
    /// there from `pos` (`(3,4): 2 east, 1 north`).
    pub fn text(&self, pos: Pos) -> String {
        let cell = |p: Pos| format!("{p}: {}", pos.way_to(p));
        match self {
            GoalView::Reach { target } => format!("reach the target {}.", cell(*target)),
            GoalView::Corners { corners } => {
                // nearest first (ties in SW, SE, NW, NE order): the nearest free corner is
                // the first one not claimed, read rather than computed
                let mut labelled: Vec<(&str, Pos)> =
                    ["SW", "SE", "NW", "NE"].into_iter().zip(*corners).collect();
                labelled.sort_by_key(|(_, c)| pos.dist(*c));
                let named: Vec<String> = labelled
                    .iter()
                    .map(|(label, c)| format!("{label} {}", cell(*c)))
                    .collect();
                format!(
                    "every agent on a different corner. Corners, nearest first: {}.",
                    named.join("; ")
                )
            }
            GoalView::Alphabetical { place } => format!(
                "line up on y=0 in A-Z order of names. Your place {}.",
                cell(*place)
            ),
            GoalView::HiddenPoints { count } => {
                format!("find the {count} hidden targets and occupy them all at once.")
            }
            GoalView::Carry { items, targets } => {
                let items: Vec<String> = items
                    .iter()
                    .map(|it| {
                        // the owner before the place, so that the way ends the entry
                        let mut s = it.id.to_string();
                        if let Some(o) = &it.owner {
                            let _ = write!(s, " ({o} only)");
                        }
                        match &it.place {
                            ItemPlace::Ground(p) => write!(s, " at {}", cell(*p)),
                            ItemPlace::HeldByYou => write!(s, " held by you"),
                            ItemPlace::HeldBy(n) => write!(s, " held by {n}"),
                        }
                        .expect("writing to a String");
                        s
                    })
                    .collect();
                let targets: Vec<String> = targets
                    .iter()
                    .map(|t| {
                        let state = if t.filled { "done" } else { "empty" };
                        format!("{state} {}", cell(t.pos))
                    })
                    .collect();
                format!(
                    "put an item on every target. Items: {}. Targets: {}.",
                    items.join("; "),
                    targets.join("; ")
                )
            }
        }
    }
}

impl CellView {
    pub fn new(world: &World, me: usize) -> Self {
        let here = world.agents[me].pos;
        CellView {
            items: world
                .items_at(here)
                .into_iter()
                .map(|k| CellItem {
                    id: world.items[k].id,
                    owner: match world.items[k].owner {
                        Some(o) if world.permissions => Some(world.agents[o].name.clone()),
                        _ => None,
                    },
                })
                .collect(),
            target: world.targets.contains(&here),
            hidden_target: world.hidden.contains(&here),
        }
    }

    pub fn text(&self) -> String {
        let mut parts = Vec::new();
        for it in &self.items {
            match &it.owner {
                Some(o) => parts.push(format!("item {} ({o} may pick)", it.id)),
                None => parts.push(format!("item {}", it.id)),
            }
        }
        if self.target {
            parts.push("a target".to_string());
        }
        if self.hidden_target {
            parts.push("a hidden target!".to_string());
        }
        if parts.is_empty() {
            "empty".to_string()
        } else {
            parts.join(", ")
        }
    }
}

impl Observation {
    /// The user message.
    pub fn user_message(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "Round {}/{}. Score {}.",
            self.round,
            self.rounds,
            fmt_score(self.score)
        );
        if self.memory.is_empty() {
            let _ = writeln!(s, "Memory: none.");
        } else {
            let _ = writeln!(s, "Memory: {}", self.memory.join(" "));
        }
        let _ = writeln!(s, "Goal: {}", self.goal.text(self.pos));
        let _ = writeln!(s, "Last: {}", self.last);
        let _ = write!(s, "You are at {}.", self.pos);
        if self.carry {
            match self.holding {
                Some(id) => {
                    let _ = write!(s, " You hold item {id}.");
                }
                None => {
                    let _ = write!(s, " You hold nothing.");
                }
            }
        }
        let _ = writeln!(s, " Cell: {}.", self.cell.text());
        if self.inbox.is_empty() {
            s.push_str("Inbox: empty.");
        } else {
            let msgs: Vec<String> = self
                .inbox
                .iter()
                .map(|m| format!("{}: {}", m.from, m.text))
                .collect();
            let _ = write!(s, "Inbox: {}", msgs.join(" | "));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::World;

    #[test]
    fn system_message_states_grid_and_corners() {
        let spec = TaskSpec::builtin("corners").unwrap();
        let mut world = World::generate(&spec, 3).unwrap();
        world.width = 5;
        world.height = 4;
        let b = Briefing::new(&spec, &world, 1);
        let s = b.system_message();
        assert!(s.contains("Grid 5x4"), "{s}");
        assert!(s.contains("x 0..4 west to east, y 0..3 south to north"));
        assert!(s.contains("SW (0,0), SE (4,0), NW (0,3), NE (4,3)"));
        assert!(s.contains("north (y+1), south (y-1), east (x+1), west (x-1), skip (stay)"));
        assert!(!s.contains("pick"));
        assert!(s.contains(&format!("You are {}", world.agents[1].name)));
        assert!(s.contains("25 per corner"));
        assert!(s.contains("after 10 rounds"));
        // compact: well under 200 words
        assert!(
            s.split_whitespace().count() < 170,
            "{} words",
            s.split_whitespace().count()
        );
    }

    #[test]
    fn score_formatting() {
        assert_eq!(fmt_score(25.0), "25");
        assert_eq!(fmt_score(100.0 / 3.0), "33.3");
        assert_eq!(fmt_score(0.0), "0");
    }
}
