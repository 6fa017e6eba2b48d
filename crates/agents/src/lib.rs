//! The agent runtime of teamtune (issue 6). This first layer makes model replies usable by
//! construction: a reply is decoded under the JSON schema of its task ([`reply_schema`]), so
//! that every reply a constrained model can write parses with
//! [`teamtune_gridworld::parse_reply`] and names an action the task allows.
//!
//! Build a [`TokenVocab`] once per tokenizer, a [`ReplyGrammar`] once per task, and take a
//! [`ReplyConstraint`] per reply (per batch row): each step, [`ReplyConstraint::mask_logits`]
//! before sampling, [`ReplyConstraint::commit`] the sampled token,
//! [`ReplyConstraint::fast_forward`] to append forced tokens without sampling them, until
//! [`ReplyConstraint::is_done`].

pub mod constraint;
pub mod error;
pub mod eval;
pub mod model_policy;
pub mod openai;
pub mod policy;
pub mod runner;
pub mod schema;

pub use constraint::{ConstraintError, ReplyConstraint, ReplyGrammar, TokenMask, TokenVocab};
pub use error::{AgentError, Result};
pub use eval::{EvalReport, TaskResult, EVAL_FORMAT};
pub use model_policy::{ModelPolicy, ModelPolicyOptions};
pub use openai::{OpenAiConfig, OpenAiPolicy};
pub use policy::{ExpertPolicy, Policy, PolicyReply, TurnRequest};
pub use runner::{plan, run_episodes, EpisodePlan, PlayedEpisode, RunOptions};
pub use schema::{reply_schema, schema_actions, SchemaError, SchemaOptions, FIELDS};
