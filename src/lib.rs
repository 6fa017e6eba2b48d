//! teamtune: fine-tune LLaMA-3.x chat models with LoRA on multi-agent trajectories, and run the
//! tuned model as the agents of a cooperative grid-world, in-process or behind an
//! OpenAI-compatible server.
//!
//! This crate is the front door: it re-exports each crate of the workspace under a short name,
//! so that `cargo add teamtune` is enough to use any of them, and builds the `teamtune` binary.
//! It owns no logic of its own. The crates, from the leaves up:
//!
//! | module | crate | what it owns |
//! |---|---|---|
//! | [`seed`] | `teamtune-seed` | SplitMix64 and seed mixing: everything seeded replays bit for bit |
//! | [`formats`] | `teamtune-formats` | the chat message, file-format tags, the atomic write |
//! | [`gridworld`] | `teamtune-gridworld` | the world, the seven tasks, scoring, observations, experts |
//! | [`data`] | `teamtune-data` | chat templates, tokenisation with assistant masks, JSONL trajectories, batches |
//! | [`llama`] | `teamtune-llama` | the model: loading, decoder, kernels, LoRA, export, decoding |
//! | [`guide`] | `teamtune-guide` | constrained decoding: JSON schema or grammar -> token filter, stop tokens, prompt reuse |
//! | [`train`] | `teamtune-train` | the training loop, optimizer, schedule, checkpoints, metrics |
//! | [`agents`] | `teamtune-agents` | prompts, reply schemas, policies, episodes, evaluation |
//! | [`serve`] | `teamtune-serve` | the OpenAI-compatible server |
//! | [`report`] | `teamtune-report` | metrics and eval files as types, figures, tables, the demo's report |
//!
//! `examples/` shows the library at work: `cargo run --release --example train_adapter`,
//! `--example custom_task`, `--example agent_loop`.

pub use teamtune_agents as agents;
pub use teamtune_data as data;
pub use teamtune_formats as formats;
pub use teamtune_gridworld as gridworld;
pub use teamtune_guide as guide;
pub use teamtune_llama as llama;
pub use teamtune_report as report;
pub use teamtune_seed as seed;
pub use teamtune_serve as serve;
pub use teamtune_train as train;
