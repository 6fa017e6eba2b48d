//! The agent runtime of teamtune (issue 6): the agents' prompts and the JSON schema of a reply
//! in each task ([`reply_schema`], compiled for a tokenizer by [`reply_grammar`]), the
//! policies that answer turns (the in-process model, the scripted experts, an
//! OpenAI-compatible endpoint), the episode runner and evaluation, and the split of a run's
//! episodes across machines ([`Shard`]) with the merge of their outputs ([`merge_shards`]).
//!
//! A model reply is usable by construction: it is decoded under its task's schema, so every
//! reply a constrained model can write parses with [`teamtune_gridworld::parse_reply`] and
//! names an action the task allows.
//!
//! This crate must not own tensor code (that is `teamtune-llama`'s) nor the llguidance bridge:
//! schema-constrained decoding itself, the decoder's filter adapter, stop tokens and prompt
//! reuse are `teamtune-guide`'s, which the server shares.

mod error;
mod eval;
mod model_policy;
mod openai;
mod policy;
mod runner;
mod schema;
mod shard;
mod shard_merge;

pub use error::{AgentError, Result};
pub use eval::{EvalReport, TaskResult, EVAL_FORMAT};
pub use model_policy::{ModelPolicy, ModelPolicyOptions};
pub use openai::{OpenAiConfig, OpenAiPolicy};
pub use policy::{ExpertPolicy, Policy, PolicyReply, TurnRequest};
pub use runner::{plan, run_episodes, EpisodePlan, PlayedEpisode, RunOptions};
pub use schema::{reply_grammar, reply_schema, schema_actions, SchemaError, SchemaOptions, FIELDS};
pub use shard::{Shard, ShardError};
pub use shard_merge::{merge_shards, MergedRun, RunIdentity, ShardEpisode, ShardManifest};
