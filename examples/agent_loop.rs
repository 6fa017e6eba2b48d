//! The grid-world's agents played by a model in-process, with or without a tuned adapter: every
//! reply decoded under its task's JSON schema (so it always parses), the episodes in play decoded
//! as one batch, each agent prompted with the system message and its current observation.
//! What `teamtune eval` does, in about 50 lines.
//!
//! `scripts/fetch-default-model.sh && cargo run --release --example agent_loop -- [ADAPTER_DIR]`
//! (an adapter from `teamtune train`, `teamtune demo` or `--example train_adapter`).

use std::path::PathBuf;

use candle_core::{DType, Device};
use teamtune::agents::{plan, run_episodes, ModelPolicy, ModelPolicyOptions, RunOptions};
use teamtune::gridworld::TaskSpec;
use teamtune::llama::LoadedModel;

// anyhow prints an error for people: its message, then what caused it.
fn main() -> anyhow::Result<()> {
    let adapter = std::env::args().nth(1).map(PathBuf::from);

    // The default model, and the adapter on top of it when one is given.
    let mut loaded = LoadedModel::load("", DType::F32, &Device::Cpu)?;
    if let Some(dir) = &adapter {
        loaded.model.load_adapter("agent", dir)?;
        loaded.model.set_active_adapter(Some("agent"))?;
    }
    let template = teamtune::guide::model_template(&loaded.assets)?;
    let options = ModelPolicyOptions {
        history: Some(1),
        max_new_tokens: 160,
        ..ModelPolicyOptions::default()
    };
    let mut policy = ModelPolicy::new(loaded.model, &loaded.assets, template, options)?;

    // Two episodes of two tasks, all four in play at once.
    let tasks = [
        TaskSpec::builtin("single_nav")?,
        TaskSpec::builtin("corners")?,
    ];
    let played = run_episodes(&mut policy, &plan(&tasks, 2, 0), &RunOptions::default())?;
    for p in &played {
        let r = &p.record;
        println!(
            "{:<12} seed {}: score {:>5.1}, {} turns, {} invalid replies, {} tokens written",
            r.task,
            r.seed,
            r.final_score,
            r.turns.len(),
            r.invalid_replies(),
            p.generated_tokens
        );
    }
    Ok(())
}
