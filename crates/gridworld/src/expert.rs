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
use crate::observe::{Briefing, GoalView, ItemPlace, Observation};
use crate::reply::Reply;
use crate::task::{ActionName, TaskKind, TaskSpec};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

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
    /// Hidden points: cells known to hold no target (or one already held by another agent).
    checked: BTreeSet<Pos>,
    /// Hidden points: found targets and who holds each (`None`: free).
    known: BTreeMap<Pos, Option<String>>,
    /// Hidden points: the target this agent holds.
    mine_target: Option<Pos>,
    /// Hidden points: where each other agent last said it was, if still searching.
    searchers: BTreeMap<String, Pos>,
    /// Hidden points: cells others said they head for.
    reserved: BTreeMap<String, Pos>,
    /// Carry: items claimed by others -> (claimant, target).
    claims: BTreeMap<char, (String, Pos)>,
    /// Carry: this agent's claim (item, target).
    mine: Option<(char, Pos)>,
    /// Carry: owners learnt from cells or messages (when the goal does not name them).
    owners: BTreeMap<char, String>,
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
            checked: BTreeSet::new(),
            known: BTreeMap::new(),
            mine_target: None,
            searchers: BTreeMap::new(),
            reserved: BTreeMap::new(),
            claims: BTreeMap::new(),
            mine: None,
            owners: BTreeMap::new(),
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

    /// Hidden points. Rules, in order: stand on a target nobody holds (and say so); a holder
    /// stays while a found target is still free or nothing more can be searched in time, else
    /// it searches cells from which it can still get back; a non-holder goes to a free found
    /// target, else searches the nearest unchecked cell (nearer to it than to other searchers).
    fn hidden_points(&mut self, obs: &Observation) -> Reply {
        let me = self.b.my_name().to_string();
        for m in &obs.inbox {
            let ps = Pos::find_all(&m.text);
            let Some(&at) = ps.first() else { continue };
            if m.text.starts_with("Target at") {
                for holder in self.known.values_mut() {
                    if holder.as_deref() == Some(m.from.as_str()) {
                        *holder = None;
                    }
                }
                self.known.insert(at, Some(m.from.clone()));
                if self.mine_target == Some(at) {
                    self.mine_target = None;
                }
                self.checked.insert(at);
                self.searchers.remove(&m.from);
                self.reserved.remove(&m.from);
            } else if m.text.starts_with("No target at") || m.text.starts_with("Leaving") {
                if m.text.starts_with("No target at") {
                    self.checked.insert(at);
                }
                self.searchers.insert(m.from.clone(), at);
                match ps.get(1) {
                    Some(&next) => {
                        self.reserved.insert(m.from.clone(), next);
                    }
                    None => {
                        self.reserved.remove(&m.from);
                    }
                }
            }
        }
        let here = obs.pos;
        let turns_left = (obs.rounds + 1).saturating_sub(obs.round);
        let on_target = obs.cell.hidden_target;
        let holder_here = self.known.get(&here).cloned().flatten();
        // 1. A target nobody holds (new, or given up): take it.
        if on_target && holder_here.is_none() {
            let old = self.mine_target.replace(here);
            if let Some(old) = old {
                self.known.insert(old, None);
            }
            self.known.insert(here, Some(me.clone()));
            self.checked.insert(here);
            let rationale = match old {
                Some(old) => {
                    format!("At {here}, cell: hidden target; {old} is found too, so skip.")
                }
                None => format!("At {here}, cell: hidden target, so skip."),
            };
            let mut r = Self::reply(ActionName::Skip, rationale);
            r.message = match old {
                Some(old) => format!("Target at {here}. I stay here. {old} is free."),
                None => format!("Target at {here}. I stay here."),
            };
            r.add_memory = format!("I hold target {here}.");
            return r;
        }
        if !on_target {
            self.checked.insert(here);
        }
        let free_found: Vec<Pos> = self
            .known
            .iter()
            .filter(|(_, h)| h.is_none())
            .map(|(p, _)| *p)
            .collect();
        let all_found = self.known.len() >= self.b.hidden_targets;
        // 2. A holder.
        if let Some(t) = self.mine_target {
            let stay_reason = if !free_found.is_empty() {
                Some("a found target is free")
            } else if all_found {
                Some("all targets found")
            } else {
                None
            };
            let next = if stay_reason.is_none() {
                self.search_cell(here, |p| here.dist(p) + p.dist(t) <= turns_left)
            } else {
                None
            };
            let Some(next) = next else {
                let why = stay_reason.unwrap_or("no unchecked cell in reach");
                let (a, rat) = nav_rationale(here, "my target", t, ActionName::Skip);
                return Self::reply(a, format!("{}. {rat}", capitalize(why)));
            };
            let (a, facts) = nav_facts(here, next, ActionName::Skip);
            let rat = format!(
                "At {here}, my target {t}, {turns_left} turns left; unchecked {next} in reach: {facts}."
            );
            let mut r = Self::reply(a, rat);
            r.message = if here == t {
                format!("Leaving {here} to search {next}; back in time.")
            } else {
                format!("No target at {here}. Next {next}.")
            };
            return r;
        }
        // 3. A free found target: go there.
        if let Some(&t) = free_found.iter().min_by_key(|p| (here.dist(**p), p.y, p.x)) {
            let (a, rat) = nav_rationale(here, "free target", t, ActionName::Skip);
            let mut r = Self::reply(a, rat);
            if self.b.names.len() > 1 && !on_target {
                r.message = format!("No target at {here}. Next {t}.");
            }
            return r;
        }
        // 4. Search.
        let Some(next) = self.search_cell(here, |_| true) else {
            let mut r = Self::reply(
                ActionName::Skip,
                format!("At {here}, no target; no unchecked cell, so skip."),
            );
            r.message = format!("No target at {here}.");
            return r;
        };
        let (a, facts) = nav_facts(here, next, ActionName::Skip);
        let what = if on_target {
            "target held by another"
        } else {
            "no target"
        };
        let rat = format!("At {here}, {what}; nearest unchecked {next}: {facts}.");
        let mut r = Self::reply(a, rat);
        if self.b.names.len() > 1 && !on_target {
            r.message = format!("No target at {here}. Next {next}.");
        }
        r
    }

    /// The unchecked cell to search next among those `ok` accepts: nearest to `here`,
    /// preferring cells nearer to me than to other searchers, then cells with fewer unchecked
    /// neighbours (leaving no isolated cells behind), then farther from other searchers.
    fn search_cell(&self, here: Pos, ok: impl Fn(Pos) -> bool) -> Option<Pos> {
        let reserved: BTreeSet<Pos> = self.reserved.values().copied().collect();
        let mut cells = Vec::new();
        for y in 0..self.b.height {
            for x in 0..self.b.width {
                let p = Pos::new(x, y);
                if !self.checked.contains(&p) && !reserved.contains(&p) && ok(p) {
                    cells.push(p);
                }
            }
        }
        let others: Vec<Pos> = self.searchers.values().copied().collect();
        let other_dist = |p: Pos| others.iter().map(|o| o.dist(p)).min().unwrap_or(u32::MAX);
        let unchecked_nb = |p: Pos| {
            Dir::ALL
                .iter()
                .map(|d| p.step(*d))
                .filter(|q| {
                    q.x >= 0
                        && q.y >= 0
                        && q.x < self.b.width
                        && q.y < self.b.height
                        && *q != here
                        && !self.checked.contains(q)
                })
                .count()
        };
        let near: Vec<Pos> = cells
            .iter()
            .copied()
            .filter(|&p| here.dist(p) <= other_dist(p))
            .collect();
        let pool = if near.is_empty() { &cells } else { &near };
        pool.iter().copied().min_by_key(|&p| {
            (
                here.dist(p),
                unchecked_nb(p),
                std::cmp::Reverse(other_dist(p)),
                p.y,
                p.x,
            )
        })
    }

    fn carry(&mut self, obs: &Observation) -> Reply {
        let me = self.b.my_name().to_string();
        for m in &obs.inbox {
            // one message may hold several sentences: "Item a at (1,2) is Bob's. I take item b to (0,0)."
            for sentence in m.text.split_inclusive(". ") {
                let text = sentence.trim();
                let ps = Pos::find_all(text);
                if let Some(rest) = text.strip_prefix("I take item ") {
                    if let (Some(id), Some(&t)) = (rest.chars().next(), ps.first()) {
                        self.claims.insert(id, (m.from.clone(), t));
                    }
                } else if let Some(rest) = text.strip_prefix("Item ") {
                    // "Item a at (1,2) is Bob's." releases the sender's claim on it
                    if let (Some(id), Some(idx)) = (rest.chars().next(), text.find(" is ")) {
                        let owner = text[idx + 4..].trim_end_matches('.').trim_end_matches("'s");
                        if !owner.is_empty() && !owner.contains(' ') {
                            self.owners.insert(id, owner.to_string());
                        }
                        if self.claims.get(&id).is_some_and(|(who, _)| *who == m.from) {
                            self.claims.remove(&id);
                        }
                    }
                } else if let Some(rest) = text.strip_prefix("Dropped item ") {
                    if let Some(id) = rest.chars().next() {
                        self.claims.remove(&id);
                    }
                }
            }
        }
        let GoalView::Carry { items, targets } = &obs.goal else {
            return Self::reply(ActionName::Skip, "No items given, so skip.".into());
        };
        for it in items {
            if let Some(o) = &it.owner {
                self.owners.insert(it.id, o.clone());
            }
        }
        for ci in &obs.cell.items {
            if let Some(o) = &ci.owner {
                self.owners.insert(ci.id, o.clone());
            }
        }
        let here = obs.pos;
        let target_cells: BTreeSet<Pos> = targets.iter().map(|t| t.pos).collect();
        let claimed_targets: BTreeSet<Pos> = self.claims.values().map(|(_, t)| *t).collect();
        let free_targets: Vec<Pos> = targets
            .iter()
            .filter(|t| !t.filled && !claimed_targets.contains(&t.pos))
            .map(|t| t.pos)
            .collect();
        let nearest_target = |from: Pos| {
            free_targets
                .iter()
                .copied()
                .min_by_key(|t| (from.dist(*t), t.y, t.x))
        };

        // Holding an item: carry it to my target.
        if let Some(h) = obs.holding {
            let keep = match self.mine {
                Some((id, t)) if id == h => {
                    !targets.iter().any(|tv| tv.pos == t && tv.filled) || here == t
                }
                _ => false,
            };
            let mut note = String::new();
            let mut message = String::new();
            let mut memory = String::new();
            if !keep {
                match nearest_target(here) {
                    Some(t) => {
                        self.mine = Some((h, t));
                        note = format!("Free targets nearest: {t}. ");
                        message = format!("I take item {h} to {t}.");
                        memory = format!("Mine: item {h} to {t}.");
                    }
                    None => {
                        return Self::reply(
                            ActionName::Skip,
                            format!("At {here}, holding {h}; no free target, so skip."),
                        )
                    }
                }
            }
            let (_, t) = self.mine.expect("set above");
            let (a, rat) =
                nav_rationale(here, &format!("holding {h}; target"), t, ActionName::Drop);
            let mut r = Self::reply(a, format!("{note}{rat}"));
            if a == ActionName::Drop {
                message = format!("Dropped item {h} on {t}.");
                memory = format!("Delivered item {h}.");
                self.mine = None;
            }
            r.message = message;
            r.add_memory = memory;
            return r;
        }

        // Not holding. Is my claimed item still on the ground and not delivered?
        let on_ground = |id: char| {
            items.iter().find_map(|it| match (&it.place, it.id == id) {
                (ItemPlace::Ground(p), true) => Some(*p),
                _ => None,
            })
        };
        if let Some((id, t)) = self.mine {
            let still = on_ground(id).filter(|p| !target_cells.contains(p));
            let target_ok = !targets.iter().any(|tv| tv.pos == t && tv.filled);
            if still.is_none() || !target_ok {
                self.mine = None;
            }
        }
        let may = |s: &Self, id: char| match s.owners.get(&id) {
            Some(o) => *o == me,
            None => true,
        };
        // An item here that I learnt is not mine: tell its owner, drop my claim.
        let mut message = String::new();
        let mut note = String::new();
        let mut memory = String::new();
        if let Some((id, _)) = self.mine {
            if !may(self, id) {
                let owner = self.owners[&id].clone();
                message = format!("Item {id} at {here} is {owner}'s.");
                note = format!("Item {id} is {owner}'s. ");
                memory = format!("Item {id} is {owner}'s, not mine.");
                self.mine = None;
            }
        }
        if self.mine.is_none() {
            let mut best: Option<(u32, char, Pos, Pos)> = None;
            for it in items {
                let ItemPlace::Ground(p) = it.place else {
                    continue;
                };
                if target_cells.contains(&p)
                    || self.claims.contains_key(&it.id)
                    || !may(self, it.id)
                {
                    continue;
                }
                let Some(t) = nearest_target(p) else { continue };
                let cost = here.dist(p) + p.dist(t);
                if best.is_none_or(|(c, id, _, _)| (cost, it.id) < (c, id)) {
                    best = Some((cost, it.id, p, t));
                }
            }
            match best {
                Some((_, id, p, t)) => {
                    self.mine = Some((id, t));
                    note.push_str(&format!(
                        "Best free item {id} at {p}, then target {t} ({} steps). ",
                        here.dist(p) + p.dist(t)
                    ));
                    if self.b.names.len() > 1 {
                        if !message.is_empty() {
                            message.push(' ');
                        }
                        message.push_str(&format!("I take item {id} to {t}."));
                    }
                    if !memory.is_empty() {
                        memory.push(' ');
                    }
                    memory.push_str(&format!("Mine: item {id} to {t}."));
                }
                None => {
                    let mut r = Self::reply(
                        ActionName::Skip,
                        format!("{note}At {here}, holding nothing; no free item for me, so skip."),
                    );
                    r.message = message;
                    r.add_memory = memory;
                    return r;
                }
            }
        }
        let (id, _) = self.mine.expect("set above");
        let p = on_ground(id).expect("claimed items are on the ground");
        // "holding nothing" first, copied from the prompt's "You hold nothing.": the sub-goal
        // (item or target) follows from it, as it does for the experts.
        let (a, rat) = nav_rationale(
            here,
            &format!("holding nothing; item {id}"),
            p,
            ActionName::Pick,
        );
        let mut r = Self::reply(a, format!("{note}{rat}"));
        if a == ActionName::Pick {
            r.action_parameters
                .insert("item".into(), Value::String(id.to_string()));
        }
        r.message = message;
        r.add_memory = memory;
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
