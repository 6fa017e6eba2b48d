//! Scripted experts for all seven task kinds. An expert sees exactly what its prompts show: the
//! [`Briefing`] (its system message) and each turn's [`Observation`] (its user message), never
//! the world. State it keeps across turns comes only from those observations (claims read in
//! its inbox, cells it stood on), as a model's conversation would hold it; what it must not
//! forget it also writes to its memory, which the prompt shows every turn.
//!
//! Replies are the schema's JSON with short, true text. The rationale states the facts before
//! the decision in a fixed order ("At (1,1), target (3,4): 2 east, 3 north, so east."), and the
//! fact is the way there exactly as the observation prints it beside the goal cell, so that a
//! small model can copy its decision instead of comparing coordinates (notes/feasibility.md,
//! README: the audit of the first demo). The reflection restates the previous
//! action's outcome; only messages vary.

use crate::episode::Episode;
use crate::error::EpisodeError;
use crate::geom::{Dir, Pos};
use crate::observe::{Briefing, GoalView, Observation};
use crate::reply::Reply;
use crate::task::{ActionName, TaskKind, TaskSpec};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;

mod carry;
mod hidden_points;

fn dir_action(d: Dir) -> ActionName {
    match d {
        Dir::North => ActionName::North,
        Dir::South => ActionName::South,
        Dir::East => ActionName::East,
        Dir::West => ActionName::West,
    }
}

/// One step toward `to`, x first, then y; `None` when there.
pub fn step_toward(at: Pos, to: Pos) -> Option<Dir> {
    if at.x < to.x {
        Some(Dir::East)
    } else if at.x > to.x {
        Some(Dir::West)
    } else if at.y < to.y {
        Some(Dir::North)
    } else if at.y > to.y {
        Some(Dir::South)
    } else {
        None
    }
}

/// The move toward `to` and the fact it rests on, the way there as observations print it:
/// `2 east, 3 north, so east`, `1 south, so south`, `here, so ARRIVED`. The first direction
/// of the way is the move, so a model that copies the way from its prompt has the decision.
pub fn nav_facts(at: Pos, to: Pos, arrived: ActionName) -> (ActionName, String) {
    let way = at.way_to(to);
    match step_toward(at, to) {
        None => (arrived, format!("{way}, so {arrived}")),
        Some(d) => (dir_action(d), format!("{way}, so {d}")),
    }
}

/// The move toward `to` and its rationale in the fixed order `At P, LABEL T: FACTS.`
/// (e.g. `At (1,1), target (3,4): 2 east, 3 north, so east.`).
pub fn nav_rationale(at: Pos, label: &str, to: Pos, arrived: ActionName) -> (ActionName, String) {
    let (a, facts) = nav_facts(at, to, arrived);
    (a, format!("At {at}, {label} {to}: {facts}."))
}

fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

fn list_or_none(v: &[String]) -> String {
    if v.is_empty() {
        "none".to_string()
    } else {
        v.join(", ")
    }
}

/// A scripted expert for one agent.
#[derive(Debug, Clone)]
pub struct Expert {
    b: Briefing,
    rng: ChaCha8Rng,
    /// Corners / alphabetical: the cell this agent goes to.
    goal_cell: Option<Pos>,
    /// Corners: corners claimed by others.
    taken: BTreeSet<Pos>,
}

impl Expert {
    /// An expert for the agent of `briefing`; `seed` only varies its wording.
    pub fn new(briefing: Briefing, seed: u64) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(seed ^ (briefing.me as u64).wrapping_mul(0x9E37_79B9));
        Expert {
            b: briefing,
            rng,
            goal_cell: None,
            taken: BTreeSet::new(),
        }
    }

    fn vary<'a>(&mut self, options: &[&'a str]) -> &'a str {
        options[(self.rng.next_u32() as usize) % options.len()]
    }

    /// The reply for this turn's observation.
    pub fn act(&mut self, obs: &Observation) -> Reply {
        let mut r = match self.b.kind {
            TaskKind::Navigate => self.navigate(obs),
            TaskKind::Corners => self.corners(obs),
            TaskKind::Alphabetical => self.alphabetical(obs),
            TaskKind::HiddenPoints => self.hidden_points(obs),
            TaskKind::Carry => self.carry(obs),
        };
        r.reflection = Self::reflection(obs);
        r
    }

    fn reply(action: ActionName, rationale: String) -> Reply {
        let mut r = Reply::new(action);
        r.rationale = rationale;
        r
    }

    /// The reflection: the outcome of the previous action, as the observation's `Last:` line
    /// gives it ("Moved to (1,0)."). One fixed form that a small model copies correctly;
    /// a distance or a varied phrasing here came before the rationale and taught the model to
    /// state wrong numbers before it decided (notes/feasibility.md).
    fn reflection(obs: &Observation) -> String {
        capitalize(obs.last.trim())
    }

    fn navigate(&mut self, obs: &Observation) -> Reply {
        let GoalView::Reach { target } = obs.goal else {
            return Self::reply(ActionName::Skip, "No target given, so skip.".into());
        };
        let (a, rat) = nav_rationale(obs.pos, "target", target, ActionName::Skip);
        Self::reply(a, rat)
    }

    fn corners(&mut self, obs: &Observation) -> Reply {
        for m in &obs.inbox {
            if m.text.contains("corner") {
                for p in Pos::find_all(&m.text) {
                    if self.b.corners().contains(&p) {
                        self.taken.insert(p);
                    }
                }
            }
        }
        let mut claim = String::new();
        let mut message = String::new();
        let mut memory = String::new();
        let corner = match self.goal_cell {
            Some(c) => c,
            None => {
                let mut free: Vec<Pos> = self
                    .b
                    .corners()
                    .into_iter()
                    .filter(|c| !self.taken.contains(c))
                    .collect();
                free.dedup();
                if free.is_empty() {
                    free = self.b.corners().to_vec();
                }
                let best = *free
                    .iter()
                    .min_by_key(|c| obs.pos.dist(**c))
                    .expect("a grid has corners");
                let taken: Vec<String> = self.taken.iter().map(|p| p.to_string()).collect();
                claim = format!(
                    "Taken: {}. Nearest free corner {best}. ",
                    list_or_none(&taken)
                );
                message = self
                    .vary(&["I take corner {c}.", "I take corner {c}; pick another."])
                    .replace("{c}", &best.to_string());
                memory = format!("My corner {best}.");
                self.goal_cell = Some(best);
                best
            }
        };
        let (a, rat) = nav_rationale(obs.pos, "my corner", corner, ActionName::Skip);
        let mut r = Self::reply(a, format!("{claim}{rat}"));
        r.message = message;
        r.add_memory = memory;
        r
    }

    /// The goal names this agent's place (A-Z order of names on row 0): walk there, saying
    /// once where it is going.
    fn alphabetical(&mut self, obs: &Observation) -> Reply {
        let GoalView::Alphabetical { place } = obs.goal else {
            return Self::reply(ActionName::Skip, "No place given, so skip.".into());
        };
        let mut r_msg = String::new();
        if self.goal_cell.is_none() {
            self.goal_cell = Some(place);
            r_msg = self
                .vary(&["I go to {c}.", "My place is {c}.", "Heading to {c}."])
                .replace("{c}", &place.to_string());
        }
        let (a, rat) = nav_rationale(obs.pos, "my place", place, ActionName::Skip);
        let mut r = Self::reply(a, rat);
        r.message = r_msg;
        r
    }
}

/// A baseline that picks a random allowed action each turn (seeded: same seed, same moves).
#[derive(Debug, Clone)]
pub struct RandomPolicy {
    actions: Vec<ActionName>,
    rng: ChaCha8Rng,
}

impl RandomPolicy {
    pub fn new(briefing: &Briefing, seed: u64) -> Self {
        RandomPolicy {
            actions: briefing.actions.clone(),
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed ^ ((briefing.me as u64) << 32)),
        }
    }

    pub fn act(&mut self, _obs: &Observation) -> Reply {
        let k = ((self.rng.next_u64() as u128 * self.actions.len() as u128) >> 64) as usize;
        let mut r = Reply::new(self.actions[k]);
        r.rationale = "Random move.".into();
        r
    }
}

/// Plays a whole episode with one expert per agent.
pub fn play_expert(spec: &TaskSpec, seed: u64) -> Result<Episode, EpisodeError> {
    let mut ep = Episode::new(spec, seed)?;
    let mut experts: Vec<Expert> = (0..ep.agent_count())
        .map(|i| Expert::new(ep.briefing(i).clone(), seed))
        .collect();
    while let Some(turn) = ep.current() {
        let reply = experts[turn.agent].act(turn.observation);
        ep.submit_reply(&reply)?;
    }
    Ok(ep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rationale_fixed_order() {
        let (a, r) = nav_rationale(Pos::new(1, 1), "target", Pos::new(3, 4), ActionName::Skip);
        assert_eq!(a, ActionName::East);
        assert_eq!(r, "At (1,1), target (3,4): 2 east, 3 north, so east.");
        let (a, r) = nav_rationale(Pos::new(3, 5), "target", Pos::new(3, 4), ActionName::Skip);
        assert_eq!(a, ActionName::South);
        assert_eq!(r, "At (3,5), target (3,4): 1 south, so south.");
        let (a, r) = nav_rationale(Pos::new(3, 4), "item a", Pos::new(3, 4), ActionName::Pick);
        assert_eq!(a, ActionName::Pick);
        assert_eq!(r, "At (3,4), item a (3,4): here, so pick.");
    }
}
