//! A grid-world task of your own, played by the scripted experts and by a policy you write.
//!
//! Tasks are data: a TOML table with the layout of `crates/gridworld/tasks/builtin.toml` adds a
//! variant of one of the five task kinds (here: carrying items on a larger board, each item owned
//! by one agent). The experts play it as they play the built-in tasks, so the same episodes can
//! become training data (`teamtune collect --tasks FILE`).
//!
//! `cargo run --release --example custom_task`

use teamtune::gridworld::{play_expert, render_text, Episode, Expert, TaskRegistry};

const MY_TASKS: &str = r#"
[[task]]
id = "big_permission_pick"
kind = "carry"
description = "three agents carry their own items across an 8x8 board"
width = [8]
height = [8]
agents = [3]
items = [3]
permissions = true
owners_in_goal = true
rounds = 30
"#;

// anyhow prints an error for people: its message, then what caused it.
fn main() -> anyhow::Result<()> {
    let mut tasks = TaskRegistry::builtin();
    tasks.add_toml(MY_TASKS)?;
    let spec = tasks.get("big_permission_pick")?.clone();

    // The experts: one episode per seed, scored by the task's own rule.
    for seed in 0..5 {
        let episode = play_expert(&spec, seed)?;
        println!(
            "seed {seed}: expert score {:>5.1} in {} rounds",
            episode.score(),
            episode.round()
        );
    }

    // Your own policy: drive the turn loop yourself. Each turn gives the agent's user message
    // (what a model would be prompted with) and takes back its reply as JSON text. Here the
    // policy is the expert again, so the loop shows the API without a model.
    let mut episode = Episode::new(&spec, 42)?;
    let mut experts: Vec<Expert> = (0..episode.agent_count())
        .map(|i| Expert::new(episode.briefing(i).clone(), 42 + i as u64))
        .collect();
    println!("\n{}", render_text(episode.world()));
    while let Some(turn) = episode.current() {
        let agent = turn.agent;
        let reply = experts[agent].act(turn.observation);
        episode.submit(&reply.to_json())?;
    }
    println!("{}", render_text(episode.world()));
    println!(
        "seed 42, your loop: score {:.1}, {} turns, {} invalid replies",
        episode.score(),
        episode.turns().len(),
        episode.record().invalid_replies()
    );
    Ok(())
}
