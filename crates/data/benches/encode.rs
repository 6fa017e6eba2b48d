//! Tokenise + mask throughput: a file of about 1M tokens of agent-like conversations (system
//! prompt, JSON observations, JSON replies) read, rendered, tokenised and masked with `prepare`.
//!
//! `cargo bench -p teamtune-data --bench encode` (needs scripts/fetch-default-model.sh's Llama-3
//! tokenizer; `TEAMTUNE_BENCH_TOKENS` sets the size, `RAYON_NUM_THREADS` the threads).

use std::io::Write;
use std::time::Instant;

use teamtune_data::*;

fn conversation(i: usize) -> serde_json::Value {
    let actions = ["up", "down", "left", "right", "stay", "pick", "drop"];
    let mut messages = vec![serde_json::json!({"role": "system", "content":
        "You are agent A in a cooperative grid world with agents B and C. Each turn you get an \
         observation as JSON and reply with JSON: {\"reflection\", \"rationale\", \"action\", \
         \"message\", \"memory\"}. Actions: up, down, left, right, stay, pick, drop. Work with \
         your teammates: share what you see, avoid collisions, finish the task in few steps."})];
    for t in 0..(3 + i % 4) {
        messages.push(serde_json::json!({"role": "user", "content": serde_json::json!({
            "step": t, "position": [i % 9, (i + t) % 9],
            "visible": [["#", ".", "K"], [".", "A", "B"], ["D", ".", "#"]],
            "messages": {"B": format!("I am at ({}, {}), going to the door", t, i % 5), "C": "waiting"},
            "inventory": [], "task": "open the door with the key"}).to_string()}));
        messages.push(
            serde_json::json!({"role": "assistant", "content": serde_json::json!({
            "reflection": format!("Step {t}: the key is north-east of me; B heads to the door."),
            "rationale": "Picking the key first lets B open the door without waiting.",
            "action": actions[(i + t) % actions.len()],
            "message": "B: I take the key, meet me at the door",
            "memory": ["key at (2, 0)", format!("B at ({t}, {})", i % 5)]}).to_string()}),
        );
    }
    serde_json::json!({"messages": messages, "task": format!("task{}", i % 7), "score": 50 + (i % 50), "episode": i})
}

fn main() {
    let target: usize = std::env::var("TEAMTUNE_BENCH_TOKENS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let tokenizer = teamtune_testkit::llama3_tokenizer();
    let template = ChatTemplate::builtin(BuiltinTemplate::Llama31, Default::default()).unwrap();
    let encoder = Encoder::new(tokenizer, template, EncodeOptions::default()).unwrap();

    // Size the file: tokens per conversation from a sample.
    let sample: usize = (0..28)
        .map(|i| {
            let c = Conversation::from_json(conversation(i), Source::memory(0)).unwrap();
            encoder
                .encode_messages(&c.messages, &c.source)
                .unwrap()
                .len()
        })
        .sum();
    let n = target * 28 / sample + 1;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.jsonl");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    for i in 0..n {
        writeln!(f, "{}", conversation(i)).unwrap();
    }
    f.flush().unwrap();
    drop(f);
    let bytes = std::fs::metadata(&path).unwrap().len();

    let options = PrepareOptions {
        prune: PruneOptions::keep_all(),
        split: SplitOptions {
            validation_fraction: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut times = Vec::new();
    let mut tokens = 0;
    for _ in 0..3 {
        let t0 = Instant::now();
        let p = prepare(std::slice::from_ref(&path), &encoder, &options).unwrap();
        times.push(t0.elapsed().as_secs_f64());
        tokens = p.report.train.tokens;
        assert_eq!(p.train.len(), n);
    }
    times.sort_by(f64::total_cmp);
    let median = times[1];
    println!(
        "encode: {n} conversations, {tokens} tokens, {:.1} MB, threads {}: median {:.2} s ({:.0} tokens/s), runs {:?}",
        bytes as f64 / 1e6,
        rayon::current_num_threads(),
        median,
        tokens as f64 / median,
        times.iter().map(|t| format!("{t:.2}")).collect::<Vec<_>>()
    );
}
