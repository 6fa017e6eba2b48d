//! Prints an expert episode's conversations: `cargo run -p teamtune-gridworld --example show -- TASK SEED`
use teamtune_gridworld::{play_expert, render_text, TaskSpec};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let spec = TaskSpec::builtin(&args[1]).unwrap();
    let seed: u64 = args[2].parse().unwrap();
    let ep = play_expert(&spec, seed).unwrap();
    println!("{}\n", render_text(&ep.snapshots()[0].1));
    for i in 0..ep.agent_count() {
        println!("==== {}", ep.agent_names()[i]);
        for m in ep.messages(i) {
            println!("[{:?}]\n{}", m.role, m.content);
        }
    }
    println!("{}", render_text(ep.world()));
}
