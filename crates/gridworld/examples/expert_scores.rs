//! Mean expert score per task over N seeds: `cargo run -p teamtune-gridworld --release --example expert_scores -- 200`
use teamtune_gridworld::{play_expert, TaskSpec, BUILTIN_IDS};

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    println!("| task | episodes | mean score | solved | invalid replies |");
    println!("|---|---|---|---|---|");
    for id in BUILTIN_IDS {
        let spec = TaskSpec::builtin(id).unwrap();
        let (mut sum, mut solved, mut invalid) = (0.0, 0, 0);
        for seed in 0..n {
            let ep = play_expert(&spec, seed).unwrap();
            sum += ep.score();
            solved += (ep.score() >= 100.0) as u32;
            invalid += ep.record().invalid_replies();
        }
        println!(
            "| {id} | {n} | {:.1} | {solved} | {invalid} |",
            sum / n as f64
        );
    }
}
