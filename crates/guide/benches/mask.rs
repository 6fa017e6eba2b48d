//! Cost of constrained decoding per step: building the vocabulary and the grammars, taking a
//! constraint per reply, and computing a mask, on the default model's tokenizer (SmolLM2,
//! 49,152 tokens) and, when fetched, the Llama-3 tokenizer (128,256). The grammars are the
//! grid-world tasks' reply schemas (the agents' [`reply_grammar`], realistic inputs; this is
//! why the crate has the agents as a dev-dependency), and masks are timed along the scripted
//! experts' replies (text like a model writes) of every built-in task.
//!
//! scripts/fetch-default-model.sh && cargo bench -p teamtune-guide --bench mask

use std::time::{Duration, Instant};

use teamtune_agents::{reply_grammar, SchemaOptions};
use teamtune_gridworld::{builtin_tasks, play_expert, Role};
use teamtune_guide::TokenVocab;
use tokenizers::Tokenizer;

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn bench(name: &str, tokenizer: &Tokenizer, eot: &str) {
    let eot = tokenizer.token_to_id(eot).expect("end-of-turn token");
    let t = Instant::now();
    let vocab = TokenVocab::new(tokenizer, &[eot]).expect("vocabulary");
    let vocab_time = t.elapsed();

    let mut compile = Vec::new();
    let mut clone = Vec::new();
    let mut masks = Vec::new();
    let mut commits = Vec::new();
    let mut tokens = 0usize;
    for task in builtin_tasks() {
        let t = Instant::now();
        let g = reply_grammar(&vocab, &task, &SchemaOptions::default()).expect("grammar");
        compile.push(t.elapsed());
        for seed in 0..3 {
            let record = play_expert(&task, seed).expect("expert episode").record();
            for conv in &record.conversations {
                for m in conv.messages.iter().filter(|m| m.role == Role::Assistant) {
                    let ids = tokenizer.encode(m.content.as_str(), false).unwrap();
                    let t = Instant::now();
                    let mut c = g.constraint();
                    clone.push(t.elapsed());
                    // every step masked, as a decoder that samples each token would
                    for &id in ids.get_ids() {
                        let t = Instant::now();
                        let mask = c.allowed().expect("mask");
                        masks.push(t.elapsed());
                        assert!(mask.is_allowed(id));
                        let t = Instant::now();
                        c.commit(id).expect("commit");
                        commits.push(t.elapsed());
                    }
                    tokens += ids.len();
                }
            }
        }
    }
    masks.sort();
    let mean = |v: &[Duration]| micros(v.iter().sum::<Duration>()) / v.len().max(1) as f64;
    let pct = |q: f64| micros(masks[((masks.len() - 1) as f64 * q) as usize]);
    println!(
        "{name}: vocab {} tokens, TokenVocab::new {:.0} ms, reply_grammar mean {:.2} ms, constraint() mean {:.1} us",
        vocab.vocab_size(),
        vocab_time.as_secs_f64() * 1e3,
        mean(&compile) / 1e3,
        mean(&clone),
    );
    println!(
        "{name}: mask over {} steps of expert replies ({tokens} tokens): mean {:.0} us, median {:.0} us, p99 {:.0} us, max {:.0} us; commit mean {:.1} us",
        masks.len(),
        mean(&masks),
        pct(0.5),
        pct(0.99),
        micros(*masks.last().unwrap()),
        mean(&commits),
    );
}

fn main() {
    let path = teamtune_llama::default_model_path();
    if !path.exists() {
        eprintln!(
            "{} missing: run scripts/fetch-default-model.sh",
            path.display()
        );
        std::process::exit(1);
    }
    let assets = teamtune_llama::load_chat_assets("").expect("default model's tokenizer");
    bench("smollm2", &assets.tokenizer, "<|im_end|>");
    let llama3 = teamtune_llama::teamtune_home().join("tokenizers/llama3/tokenizer.json");
    if llama3.exists() {
        let tok = Tokenizer::from_file(&llama3).expect("Llama-3 tokenizer");
        bench("llama3", &tok, "<|eot_id|>");
    }
}
