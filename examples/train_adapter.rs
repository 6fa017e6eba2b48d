//! Train a LoRA adapter from Rust code: scripted experts play a task, their conversations become
//! training data, and the study's adapter (r 8, alpha 16, dropout 0.2, all seven projections) is
//! trained on the default model for a few steps, with the base model's validation loss at step 0.
//! What `teamtune collect` + `teamtune train` do, in about 60 lines.
//!
//! `scripts/fetch-default-model.sh && cargo run --release --example train_adapter -- OUT_DIR`
//! (OUT_DIR defaults to `runs/example-adapter`; it gets metrics.jsonl, checkpoints/ and adapter/,
//! which `teamtune eval --adapter OUT_DIR/adapter` and `teamtune plot OUT_DIR` read).

use std::path::PathBuf;

use candle_core::{DType, Device};
use teamtune::data::{
    choose_pad_id, make_batches, prepare, Batch, BatchOptions, EncodeOptions, Encoder, Overlong,
    PrepareOptions,
};
use teamtune::gridworld::{play_expert, write_jsonl_atomic, TaskSpec};
use teamtune::llama::LoadedModel;
use teamtune::train::{study_lora, TrainConfig, Trainer};

// anyhow prints an error for people: its message, then what caused it.
fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "runs/example-adapter".into()),
    );

    // Data: expert episodes of one task, one training conversation per turn (the system message
    // and the current observation, as the agents are prompted by default).
    let task = TaskSpec::builtin("single_nav")?;
    let mut conversations = Vec::new();
    for seed in 1_000..1_008 {
        for whole in play_expert(&task, seed)?.record().training_lines() {
            conversations.extend(whole.windows(1));
        }
    }
    let data = out.join("data.jsonl");
    write_jsonl_atomic(&data, &conversations, false)?;

    // The model ("" is the default model) and its chat template; tokenised as in training.
    let mut loaded = LoadedModel::load("", DType::F32, &Device::Cpu)?;
    let template = teamtune::guide::model_template(&loaded.assets)?;
    let options = EncodeOptions {
        max_len: Some(512),
        overlong: Overlong::CutAtTurn,
        ..Default::default()
    };
    let encoder = Encoder::new(loaded.assets.tokenizer.clone(), template, options)?;
    let prepared = prepare(&[data], &encoder, &PrepareOptions::default())?;
    let eos = encoder.end_of_turn_ids().to_vec();
    let pad = choose_pad_id(
        encoder.tokenizer(),
        loaded.model.config().pad_token_id,
        &eos,
    )?;
    let batches = BatchOptions {
        max_rows: Some(2),
        ..BatchOptions::new(1024, pad)
    };
    let eval = make_batches(&prepared.validation, &batches, &eos, 0)?;

    // The study's adapter and schedule, at a short run's learning rate.
    loaded.model.add_adapter("train", &study_lora())?;
    let mut config = TrainConfig::study("train", pad);
    config.max_steps = Some(8);
    config.eval_every = Some(4);
    config.lr = 1e-3;
    let train = &prepared.train;
    let mut source = |epoch: usize| -> teamtune::train::Result<Vec<Batch>> {
        Ok(make_batches(train, &batches, &eos, epoch as u64)?)
    };
    let summary = Trainer::new(config, &out)?.run(&mut loaded.model, &mut source, &eval, None)?;
    loaded.model.save_adapter("train", &out.join("adapter"))?;

    println!(
        "{} conversations: {summary}; adapter in {}",
        train.len(),
        out.join("adapter").display()
    );
    Ok(())
}
