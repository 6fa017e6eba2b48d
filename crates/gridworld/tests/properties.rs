//! Property tests over random tasks, seeds and (often broken) random replies: agents never leave
//! the grid; items are never created or lost; only the assigned agent holds a permission item;
//! the score equals an independent recount; the same seed gives the same episode; an agent's
//! observation does not depend on where the other agents are.

mod common;

use common::*;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use teamtune_gridworld::{
    CellView, Episode, EpisodeRecord, GoalView, Pos, TaskSpec, World, BUILTIN_IDS,
};

/// A random reply: mostly valid actions (some not allowed in the task), some broken text.
fn random_reply(rng: &mut ChaCha8Rng) -> String {
    const ACTIONS: [&str; 7] = ["north", "south", "east", "west", "skip", "pick", "drop"];
    match rng.random_range(0..10) {
        0 => "no json here".to_string(),
        1 => r#"{"action_name": "north""#.to_string(),
        2 => r#"{"action": "teleport"}"#.to_string(),
        3 => format!(
            r#"{{"action_name":"pick","action_parameters":{{"item":"{}"}}}}"#,
            (b'a' + rng.random_range(0..4u8)) as char
        ),
        _ => act(ACTIONS[rng.random_range(0..ACTIONS.len())], ""),
    }
}

fn check_invariants(spec: &TaskSpec, w: &World, n_items: usize) {
    for a in &w.agents {
        assert!(w.in_bounds(a.pos), "{} left the grid: {}", a.name, a.pos);
    }
    assert_eq!(w.items.len(), n_items, "items created or lost");
    for (k, it) in w.items.iter().enumerate() {
        match (it.pos, it.holder) {
            (Some(p), None) => assert!(w.in_bounds(p)),
            (None, Some(h)) => {
                assert_eq!(w.agents[h].holding, Some(k), "holder does not hold it");
                if spec.permissions {
                    assert_eq!(Some(h), it.owner, "item {} held by a non-owner", it.id);
                }
            }
            other => panic!("item {} is {other:?}", it.id),
        }
    }
    let held = w.agents.iter().filter(|a| a.holding.is_some()).count();
    let held_items = w.items.iter().filter(|i| i.holder.is_some()).count();
    assert_eq!(held, held_items);
    assert_eq!(w.score(), recount(w), "score differs from a recount");
}

/// The goal and cell an agent sees are the same wherever the other agents stand.
fn check_no_leak(spec: &TaskSpec, w: &World, me: usize, rng: &mut ChaCha8Rng) {
    let goal = GoalView::new(w, me, spec.owners_in_goal);
    let cell = CellView::new(w, me);
    let mut moved = w.clone();
    for (i, a) in moved.agents.iter_mut().enumerate() {
        if i != me {
            a.pos = Pos::new(rng.random_range(0..w.width), rng.random_range(0..w.height));
        }
    }
    assert_eq!(GoalView::new(&moved, me, spec.owners_in_goal), goal);
    assert_eq!(CellView::new(&moved, me), cell);
}

fn run(task: usize, seed: u64, policy_seed: u64) -> EpisodeRecord {
    let spec = spec(BUILTIN_IDS[task]);
    let mut ep = Episode::new(&spec, seed).unwrap();
    let n_items = ep.world().items.len();
    let mut rng = ChaCha8Rng::seed_from_u64(policy_seed);
    check_invariants(&spec, ep.world(), n_items);
    let mut turns = 0;
    while let Some(turn) = ep.current() {
        let me = turn.agent;
        // the text shown is a function of the observation
        assert_eq!(turn.user_message, turn.observation.user_message());
        check_no_leak(&spec, ep.world(), me, &mut rng);
        let reply = random_reply(&mut rng);
        let out = ep.submit(&reply).unwrap();
        assert_eq!(out.score, ep.score());
        check_invariants(&spec, ep.world(), n_items);
        turns += 1;
        assert!(turns <= spec.rounds as usize * ep.agent_count());
    }
    let rec = ep.record();
    assert_eq!(rec.final_score, recount(ep.world()));
    rec
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn invariants_hold_under_random_play(task in 0usize..7, seed in any::<u64>(), policy in any::<u64>()) {
        let rec = run(task, seed, policy);
        // and the same seeds give the same episode
        prop_assert_eq!(run(task, seed, policy), rec.clone());
        // replaying the record gives the same scores
        let rep = teamtune_gridworld::replay(&rec).unwrap();
        prop_assert!(rep.is_ok(), "{:?}", rep.mismatches);
    }

    #[test]
    fn same_seed_same_world(task in 0usize..7, seed in any::<u64>()) {
        let spec = spec(BUILTIN_IDS[task]);
        let a = Episode::new(&spec, seed).unwrap();
        let b = Episode::new(&spec, seed).unwrap();
        prop_assert_eq!(a.world(), b.world());
        prop_assert_eq!(a.messages(0), b.messages(0));
    }

    /// The system message states the grid and all four corners correctly.
    #[test]
    fn system_message_corners(task in 0usize..7, seed in any::<u64>()) {
        let spec = spec(BUILTIN_IDS[task]);
        let ep = Episode::new(&spec, seed).unwrap();
        let w = ep.world();
        let (mx, my) = (w.width - 1, w.height - 1);
        let sys = &ep.messages(0)[0].content;
        let grid = format!("Grid {}x{}", w.width, w.height);
        let corners = format!("Corners: SW (0,0), SE ({mx},0), NW (0,{my}), NE ({mx},{my}).");
        prop_assert!(sys.contains(&grid));
        prop_assert!(sys.contains(&corners));
    }
}

/// In whole expert episodes (which do send messages), an agent's user message never shows
/// another agent's position except where that agent itself said it in a message, or where it
/// is also a cell the goal or the agent's own situation names.
#[test]
fn user_messages_do_not_show_other_positions() {
    for id in BUILTIN_IDS {
        for seed in 0..30 {
            let spec = spec(id);
            let mut ep = Episode::new(&spec, seed).unwrap();
            let mut experts: Vec<_> = (0..ep.agent_count())
                .map(|i| teamtune_gridworld::Expert::new(ep.briefing(i).clone(), seed))
                .collect();
            while let Some(turn) = ep.current() {
                let me = turn.agent;
                let obs = turn.observation.clone();
                // the user message without the inbox and memory (which carry what agents chose to say)
                let mut own = obs.clone();
                own.inbox.clear();
                own.memory.clear();
                let text = own.user_message();
                let shown: Vec<Pos> = Pos::find_all(&text);
                let w = ep.world();
                let goal_cells: Vec<Pos> = Pos::find_all(&own.goal.text(own.pos));
                for (i, a) in w.agents.iter().enumerate() {
                    if i == me || a.pos == w.agents[me].pos {
                        continue;
                    }
                    if shown.contains(&a.pos) {
                        assert!(
                            goal_cells.contains(&a.pos)
                                || Pos::find_all(&own.last).contains(&a.pos),
                            "{id} seed {seed}: {}'s position {} leaks into {}'s message:\n{text}",
                            a.name,
                            a.pos,
                            w.agents[me].name
                        );
                    }
                }
                let reply = experts[me].act(&obs);
                ep.submit_reply(&reply).unwrap();
            }
        }
    }
}
