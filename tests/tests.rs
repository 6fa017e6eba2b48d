//! End-to-end tests of the `teamtune` binary, compiled as one test binary (one link, one
//! process to schedule) with shared helpers in `util`. Each module drives one command the way a
//! user types it. Tests that fetch and run the downloaded default model (SmolLM2-135M-Instruct,
//! through scripts/fetch-default-model.sh) live under `default_model`; every other test runs on
//! the tiny fixture model or on no model at all.

mod util;

mod chat;
mod collect;
mod demo;
mod errors;
mod export;
mod improve;
mod merge;
mod play_replay;
mod plot_compare;
mod serve;
mod shard;

/// Tests that need the downloaded default model.
mod default_model {
    mod generate;
    mod train;
    mod train_resume;
}
