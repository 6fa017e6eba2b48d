//! The world state of one episode: grid, agents, items, targets; generation from a seed, the
//! rules of actions, and scoring. This is the ground truth ("god view"): policies must not read
//! it, only the [`crate::Observation`] built from it.

use crate::error::SpecError;
use crate::geom::{Dir, Pos};
use crate::task::{TaskKind, TaskSpec, NAMES};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// An agent: name, position, the index of the item it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentState {
    pub name: String,
    pub pos: Pos,
    pub holding: Option<usize>,
}

/// An item: on the ground at `pos`, or held by agent `holder` (exactly one of the two).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// `a`, `b`, ...
    pub id: char,
    pub pos: Option<Pos>,
    pub holder: Option<usize>,
    /// With permissions: the only agent that may pick it.
    pub owner: Option<usize>,
}

/// An action, as applied to the world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Move(Dir),
    Skip,
    /// Pick an item from the cell: the named one, or the first this agent may pick.
    Pick(Option<char>),
    Drop,
}

impl Action {
    pub fn name(&self) -> crate::task::ActionName {
        use crate::task::ActionName as A;
        match self {
            Action::Move(Dir::North) => A::North,
            Action::Move(Dir::South) => A::South,
            Action::Move(Dir::East) => A::East,
            Action::Move(Dir::West) => A::West,
            Action::Skip => A::Skip,
            Action::Pick(_) => A::Pick,
            Action::Drop => A::Drop,
        }
    }
}

/// The world of one episode.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct World {
    pub kind: TaskKind,
    pub width: i32,
    pub height: i32,
    pub agents: Vec<AgentState>,
    pub items: Vec<Item>,
    /// Visible targets: the navigate target, or the carry targets.
    pub targets: Vec<Pos>,
    /// Hidden targets (hidden_points).
    pub hidden: Vec<Pos>,
    pub permissions: bool,
}

/// A uniform index in `0..n` from the raw ChaCha stream (our own, so that recorded episodes do
/// not depend on the sampling algorithms of a `rand` version).
fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    debug_assert!(n > 0);
    ((rng.next_u64() as u128 * n as u128) >> 64) as usize
}

fn pick_one<T: Copy>(rng: &mut ChaCha8Rng, values: &[T]) -> T {
    values[below(rng, values.len())]
}

/// `k` distinct values out of `0..n`, in draw order (partial Fisher-Yates).
fn distinct(rng: &mut ChaCha8Rng, n: usize, k: usize) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in 0..k {
        let j = i + below(rng, n - i);
        v.swap(i, j);
    }
    v.truncate(k);
    v
}

impl World {
    /// A world holding only the given agents at the given cells (no items, targets or
    /// randomness): for tests and tools that set up a position by hand.
    pub fn with_agents(
        kind: TaskKind,
        width: i32,
        height: i32,
        agents: &[(&str, (i32, i32))],
    ) -> World {
        World {
            kind,
            width,
            height,
            agents: agents
                .iter()
                .map(|(n, p)| AgentState {
                    name: n.to_string(),
                    pos: Pos::from(*p),
                    holding: None,
                })
                .collect(),
            items: vec![],
            targets: vec![],
            hidden: vec![],
            permissions: false,
        }
    }

    /// Draws an episode's world from the task and seed. Draw order: width, height, agent count,
    /// item count, names, start cells, then the task's cells (target / hidden targets / items
    /// and targets and owners).
    ///
    /// A world that is already solved is drawn again from the same stream (a random-points
    /// episode with both agents starting on the targets would have no turns at all).
    pub fn generate(spec: &TaskSpec, seed: u64) -> Result<World, SpecError> {
        spec.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut world = Self::draw(spec, &mut rng);
        for _ in 0..1000 {
            if !world.is_complete() {
                break;
            }
            world = Self::draw(spec, &mut rng);
        }
        Ok(world)
    }

    fn draw(spec: &TaskSpec, rng: &mut ChaCha8Rng) -> World {
        let width = pick_one(rng, &spec.width);
        let height = pick_one(rng, &spec.height);
        let n = pick_one(rng, &spec.agents);
        let n_items = if spec.kind != TaskKind::Carry {
            0
        } else if spec.items.is_empty() {
            n
        } else {
            pick_one(rng, &spec.items)
        };
        let cells = (width * height) as usize;
        let cell = |i: usize| Pos::new((i % width as usize) as i32, (i / width as usize) as i32);
        let names = distinct(rng, NAMES.len(), n);
        let starts = distinct(rng, cells, n);
        let agents = names
            .iter()
            .zip(&starts)
            .map(|(&ni, &ci)| AgentState {
                name: NAMES[ni].to_string(),
                pos: cell(ci),
                holding: None,
            })
            .collect::<Vec<_>>();
        let mut world = World {
            kind: spec.kind,
            width,
            height,
            agents,
            items: Vec::new(),
            targets: Vec::new(),
            hidden: Vec::new(),
            permissions: spec.permissions,
        };
        match spec.kind {
            TaskKind::Navigate => {
                // Distinct from the first agent's start, so there is something to do.
                let mut t = below(rng, cells - 1);
                if t >= starts[0] {
                    t += 1;
                }
                world.targets.push(cell(t));
            }
            TaskKind::HiddenPoints => {
                world.hidden = distinct(rng, cells, spec.hidden_targets)
                    .into_iter()
                    .map(cell)
                    .collect();
            }
            TaskKind::Carry => {
                let spots = distinct(rng, cells, 2 * n_items);
                let owners = if spec.permissions {
                    // Balanced: every agent gets its share before any gets more.
                    let mut base: Vec<usize> = (0..n_items).map(|i| i % n).collect();
                    for i in (1..base.len()).rev() {
                        let j = below(rng, i + 1);
                        base.swap(i, j);
                    }
                    base.into_iter().map(Some).collect()
                } else {
                    vec![None; n_items]
                };
                world.items = (0..n_items)
                    .map(|i| Item {
                        id: (b'a' + i as u8) as char,
                        pos: Some(cell(spots[i])),
                        holder: None,
                        owner: owners[i],
                    })
                    .collect();
                world.targets = spots[n_items..].iter().map(|&c| cell(c)).collect();
            }
            TaskKind::Corners | TaskKind::Alphabetical => {}
        }
        world
    }

    pub fn in_bounds(&self, p: Pos) -> bool {
        p.x >= 0 && p.y >= 0 && p.x < self.width && p.y < self.height
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

    /// Agent names in alphabetical order.
    pub fn sorted_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.agents.iter().map(|a| a.name.as_str()).collect();
        v.sort_unstable();
        v
    }

    /// The cell agent `i` belongs at in the alphabetical task.
    pub fn alphabetical_cell(&self, i: usize) -> Pos {
        let name = &self.agents[i].name;
        let k = self
            .sorted_names()
            .iter()
            .position(|n| n == name)
            .unwrap_or(0);
        Pos::new(k as i32, 0)
    }

    /// Indices of the items lying on cell `p`.
    pub fn items_at(&self, p: Pos) -> Vec<usize> {
        (0..self.items.len())
            .filter(|&i| self.items[i].pos == Some(p))
            .collect()
    }

    pub fn item_index(&self, id: char) -> Option<usize> {
        self.items.iter().position(|it| it.id == id)
    }

    /// (achieved, needed) for the current state; the score is `100 * achieved / needed`.
    pub fn progress(&self) -> (usize, usize) {
        let occupied = |p: &Pos| self.agents.iter().any(|a| a.pos == *p);
        match self.kind {
            TaskKind::Navigate => (
                self.targets.iter().filter(|t| occupied(t)).count(),
                self.targets.len(),
            ),
            TaskKind::Corners => {
                let mut cs = self.corners().to_vec();
                cs.sort();
                cs.dedup();
                let got = cs.iter().filter(|c| occupied(c)).count();
                let need = self.agents.len().min(cs.len());
                (got.min(need), need)
            }
            TaskKind::Alphabetical => (
                (0..self.agents.len())
                    .filter(|&i| self.agents[i].pos == self.alphabetical_cell(i))
                    .count(),
                self.agents.len(),
            ),
            TaskKind::HiddenPoints => (
                self.hidden.iter().filter(|t| occupied(t)).count(),
                self.hidden.len(),
            ),
            TaskKind::Carry => (
                self.targets
                    .iter()
                    .filter(|t| self.items.iter().any(|it| it.pos == Some(**t)))
                    .count(),
                self.targets.len(),
            ),
        }
    }

    /// The score, 0 to 100, of the current state.
    pub fn score(&self) -> f64 {
        let (got, need) = self.progress();
        if need == 0 {
            return 0.0;
        }
        100.0 * got as f64 / need as f64
    }

    pub fn is_complete(&self) -> bool {
        let (got, need) = self.progress();
        need > 0 && got == need
    }

    /// Applies an action of agent `i`; returns the observation text of its result.
    pub fn apply(&mut self, i: usize, action: &Action) -> String {
        let here = self.agents[i].pos;
        match action {
            Action::Move(d) => {
                let to = here.step(*d);
                if self.in_bounds(to) {
                    self.agents[i].pos = to;
                    // No direction here: with it, "Last: moved east" was the nearest cue for
                    // the next move, and a tuned small model learned to repeat its last
                    // direction instead of comparing its position with its target.
                    format!("moved to {to}.")
                } else {
                    format!("{d} is off the grid; you stayed at {here}.")
                }
            }
            Action::Skip => format!("stayed at {here}."),
            Action::Drop => match self.agents[i].holding.take() {
                None => "drop failed: you hold nothing.".to_string(),
                Some(k) => {
                    let item = &mut self.items[k];
                    item.holder = None;
                    item.pos = Some(here);
                    if self.targets.contains(&here) {
                        format!("dropped item {} at {here}, a target.", item.id)
                    } else {
                        format!("dropped item {} at {here}.", item.id)
                    }
                }
            },
            Action::Pick(wanted) => {
                if let Some(k) = self.agents[i].holding {
                    return format!(
                        "pick refused: you already hold item {}; drop it first.",
                        self.items[k].id
                    );
                }
                let here_items = self.items_at(here);
                if here_items.is_empty() {
                    return format!("pick failed: no item at {here}.");
                }
                let candidates: Vec<usize> = match wanted {
                    Some(id) => {
                        let c: Vec<usize> = here_items
                            .iter()
                            .copied()
                            .filter(|&k| self.items[k].id == *id)
                            .collect();
                        if c.is_empty() {
                            return format!("pick failed: item {id} is not at {here}.");
                        }
                        c
                    }
                    None => here_items,
                };
                let may = |k: usize| match self.items[k].owner {
                    Some(o) if self.permissions => o == i,
                    _ => true,
                };
                match candidates.iter().copied().find(|&k| may(k)) {
                    Some(k) => {
                        let item = &mut self.items[k];
                        item.pos = None;
                        item.holder = Some(i);
                        self.agents[i].holding = Some(k);
                        format!("picked item {} at {here}.", item.id)
                    }
                    None => {
                        let k = candidates[0];
                        let owner = self.items[k].owner.map(|o| self.agents[o].name.clone());
                        format!(
                            "pick refused: item {} may be picked only by {}.",
                            self.items[k].id,
                            owner.unwrap_or_default()
                        )
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(id: &str) -> TaskSpec {
        TaskSpec::builtin(id).unwrap()
    }

    /// A hand-built world: no randomness.
    pub(crate) fn world(kind: TaskKind, w: i32, h: i32, agents: &[(&str, (i32, i32))]) -> World {
        World::with_agents(kind, w, h, agents)
    }

    fn item(id: char, p: (i32, i32), owner: Option<usize>) -> Item {
        Item {
            id,
            pos: Some(Pos::from(p)),
            holder: None,
            owner,
        }
    }

    #[test]
    fn same_seed_same_world_and_different_seeds_differ() {
        for id in crate::task::BUILTIN_IDS {
            let a = World::generate(&spec(id), 42).unwrap();
            let b = World::generate(&spec(id), 42).unwrap();
            assert_eq!(a, b);
            let distinct = (0..20u64)
                .map(|s| format!("{:?}", World::generate(&spec(id), s).unwrap()))
                .collect::<std::collections::HashSet<_>>();
            assert!(distinct.len() > 10, "{id}: seeds give too few worlds");
        }
    }

    #[test]
    fn generated_worlds_respect_the_table() {
        for seed in 0..300u64 {
            for id in crate::task::BUILTIN_IDS {
                let s = spec(id);
                let w = World::generate(&s, seed).unwrap();
                assert!(s.width.contains(&w.width) && s.height.contains(&w.height));
                assert!(s.agents.contains(&w.agents.len()));
                let mut starts: Vec<_> = w.agents.iter().map(|a| a.pos).collect();
                starts.sort();
                starts.dedup();
                assert_eq!(starts.len(), w.agents.len(), "{id}: start cells distinct");
                let mut names: Vec<_> = w.agents.iter().map(|a| &a.name).collect();
                names.sort();
                names.dedup();
                assert_eq!(names.len(), w.agents.len());
                match id {
                    "single_nav" => {
                        assert_eq!(w.targets.len(), 1);
                        assert_ne!(w.targets[0], w.agents[0].pos);
                    }
                    "random_points" => assert_eq!(w.hidden.len(), 2),
                    "single_pick" => assert_eq!((w.items.len(), w.targets.len()), (1, 1)),
                    "multi_pick" | "permission_pick" => {
                        assert_eq!(w.items.len(), w.agents.len());
                        assert_eq!(w.targets.len(), w.agents.len());
                        let mut cells: Vec<_> = w
                            .items
                            .iter()
                            .map(|i| i.pos.unwrap())
                            .chain(w.targets.iter().copied())
                            .collect();
                        cells.sort();
                        cells.dedup();
                        assert_eq!(cells.len(), 2 * w.items.len());
                        if id == "permission_pick" {
                            // balanced: every agent owns exactly one item
                            let mut owners: Vec<_> =
                                w.items.iter().map(|i| i.owner.unwrap()).collect();
                            owners.sort();
                            assert_eq!(owners, (0..w.agents.len()).collect::<Vec<_>>());
                        } else {
                            assert!(w.items.iter().all(|i| i.owner.is_none()));
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    #[test]
    fn corners_are_correct() {
        let w = world(TaskKind::Corners, 5, 4, &[("Alice", (0, 0))]);
        assert_eq!(
            w.corners(),
            [
                Pos::new(0, 0),
                Pos::new(4, 0),
                Pos::new(0, 3),
                Pos::new(4, 3)
            ]
        );
    }

    #[test]
    fn moves_and_off_grid() {
        let mut w = world(TaskKind::Corners, 4, 5, &[("Alice", (0, 0))]);
        assert_eq!(w.apply(0, &Action::Move(Dir::North)), "moved to (0,1).");
        assert_eq!(w.agents[0].pos, Pos::new(0, 1));
        assert_eq!(
            w.apply(0, &Action::Move(Dir::West)),
            "west is off the grid; you stayed at (0,1)."
        );
        assert_eq!(w.agents[0].pos, Pos::new(0, 1));
        w.agents[0].pos = Pos::new(3, 4);
        assert!(w
            .apply(0, &Action::Move(Dir::North))
            .contains("off the grid"));
        assert!(w
            .apply(0, &Action::Move(Dir::East))
            .contains("off the grid"));
        assert_eq!(w.agents[0].pos, Pos::new(3, 4));
        w.apply(0, &Action::Move(Dir::South));
        assert_eq!(w.agents[0].pos, Pos::new(3, 3));
        w.apply(0, &Action::Move(Dir::West));
        assert_eq!(w.agents[0].pos, Pos::new(2, 3));
        assert_eq!(w.apply(0, &Action::Skip), "stayed at (2,3).");
    }

    #[test]
    fn score_navigate() {
        let mut w = world(TaskKind::Navigate, 4, 4, &[("Alice", (0, 0))]);
        w.targets = vec![Pos::new(2, 3)];
        assert_eq!(w.score(), 0.0);
        w.agents[0].pos = Pos::new(2, 3);
        assert_eq!(w.score(), 100.0);
        assert!(w.is_complete());
    }

    #[test]
    fn score_corners_counts_distinct_corners() {
        let mut w = world(
            TaskKind::Corners,
            5,
            4,
            &[
                ("Alice", (0, 0)),
                ("Bob", (0, 0)),
                ("Eve", (4, 3)),
                ("Zane", (2, 2)),
            ],
        );
        assert_eq!(w.score(), 50.0);
        w.agents[1].pos = Pos::new(4, 0);
        assert_eq!(w.score(), 75.0);
        w.agents[3].pos = Pos::new(0, 3);
        assert_eq!(w.score(), 100.0);
    }

    #[test]
    fn score_alphabetical() {
        let mut w = world(
            TaskKind::Alphabetical,
            5,
            2,
            &[
                ("Zane", (3, 0)),
                ("Bob", (0, 0)),
                ("Eve", (2, 1)),
                ("Ivy", (2, 0)),
            ],
        );
        // sorted: Bob (0,0), Eve (1,0), Ivy (2,0), Zane (3,0)
        assert_eq!(w.alphabetical_cell(2), Pos::new(1, 0));
        assert_eq!(w.score(), 75.0);
        w.agents[2].pos = Pos::new(1, 0);
        assert_eq!(w.score(), 100.0);
        w.agents[0].pos = Pos::new(4, 0);
        assert_eq!(w.score(), 75.0);
    }

    #[test]
    fn score_hidden_points_needs_simultaneous_occupation() {
        let mut w = world(
            TaskKind::HiddenPoints,
            4,
            4,
            &[("Alice", (1, 1)), ("Bob", (0, 0))],
        );
        w.hidden = vec![Pos::new(1, 1), Pos::new(3, 3)];
        assert_eq!(w.score(), 50.0);
        w.agents[1].pos = Pos::new(3, 3);
        assert_eq!(w.score(), 100.0);
        w.agents[0].pos = Pos::new(1, 2);
        assert_eq!(w.score(), 50.0);
        w.agents[0].pos = Pos::new(3, 3);
        assert_eq!(w.score(), 50.0, "two agents on one target count once");
    }

    #[test]
    fn carry_pick_drop_and_score() {
        let mut w = world(TaskKind::Carry, 4, 4, &[("Alice", (1, 1)), ("Bob", (0, 0))]);
        w.items = vec![item('a', (1, 1), None), item('b', (2, 2), None)];
        w.targets = vec![Pos::new(3, 3), Pos::new(0, 3)];
        assert_eq!(w.score(), 0.0);
        assert_eq!(w.apply(0, &Action::Drop), "drop failed: you hold nothing.");
        assert_eq!(
            w.apply(1, &Action::Pick(None)),
            "pick failed: no item at (0,0)."
        );
        assert_eq!(w.apply(0, &Action::Pick(None)), "picked item a at (1,1).");
        assert_eq!(w.agents[0].holding, Some(0));
        assert_eq!(w.items[0].pos, None);
        assert_eq!(w.items[0].holder, Some(0));
        // pick while holding is refused and loses nothing
        w.agents[0].pos = Pos::new(2, 2);
        assert_eq!(
            w.apply(0, &Action::Pick(None)),
            "pick refused: you already hold item a; drop it first."
        );
        assert_eq!(w.agents[0].holding, Some(0));
        assert_eq!(w.items[1].pos, Some(Pos::new(2, 2)));
        assert_eq!(w.items[0].holder, Some(0));
        w.agents[0].pos = Pos::new(3, 3);
        assert_eq!(
            w.apply(0, &Action::Drop),
            "dropped item a at (3,3), a target."
        );
        assert_eq!(w.score(), 50.0);
        // a second item on the same target does not count twice
        w.agents[0].pos = Pos::new(2, 2);
        w.apply(0, &Action::Pick(Some('b')));
        w.agents[0].pos = Pos::new(3, 3);
        w.apply(0, &Action::Drop);
        assert_eq!(w.score(), 50.0);
        assert_eq!(w.items_at(Pos::new(3, 3)), vec![0, 1]);
        // picking a named item that is elsewhere
        w.agents[1].pos = Pos::new(3, 3);
        assert_eq!(
            w.apply(1, &Action::Pick(Some('z'))),
            "pick failed: item z is not at (3,3)."
        );
        assert_eq!(
            w.apply(1, &Action::Pick(Some('b'))),
            "picked item b at (3,3)."
        );
        w.agents[1].pos = Pos::new(0, 3);
        w.apply(1, &Action::Drop);
        assert_eq!(w.score(), 100.0);
    }

    #[test]
    fn permissions_only_owner_picks() {
        let mut w = world(TaskKind::Carry, 4, 4, &[("Alice", (1, 1)), ("Bob", (1, 1))]);
        w.permissions = true;
        w.items = vec![item('a', (1, 1), Some(1))];
        w.targets = vec![Pos::new(3, 3)];
        assert_eq!(
            w.apply(0, &Action::Pick(None)),
            "pick refused: item a may be picked only by Bob."
        );
        assert_eq!(w.items[0].pos, Some(Pos::new(1, 1)));
        assert_eq!(w.apply(1, &Action::Pick(None)), "picked item a at (1,1).");
        // after a drop the permission still holds
        w.apply(1, &Action::Drop);
        assert!(w
            .apply(0, &Action::Pick(Some('a')))
            .starts_with("pick refused"));
        // without permissions on, owners are ignored
        w.permissions = false;
        assert_eq!(w.apply(0, &Action::Pick(None)), "picked item a at (1,1).");
    }

    #[test]
    fn pick_prefers_an_item_the_agent_may_pick() {
        let mut w = world(TaskKind::Carry, 4, 4, &[("Alice", (1, 1)), ("Bob", (0, 0))]);
        w.permissions = true;
        w.items = vec![item('a', (1, 1), Some(1)), item('b', (1, 1), Some(0))];
        w.targets = vec![Pos::new(3, 3), Pos::new(2, 3)];
        assert_eq!(w.apply(0, &Action::Pick(None)), "picked item b at (1,1).");
    }
}
