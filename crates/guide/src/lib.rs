//! Constrained decoding for teamtune's decoders (the agents' model policy, the server's
//! batching engine), through [`teamtune_llama::TokenFilter`] and [`teamtune_llama::Session`].
//!
//! This crate owns: compiling a JSON schema for a tokenizer into a token filter with
//! llguidance ([`TokenVocab`] once per tokenizer, [`ReplyGrammar`] once per schema,
//! [`ReplyConstraint`] per reply), the one adapter of a constraint to the decoder
//! ([`ConstraintFilter`]), the stop tokens and chat template of a chat model ([`stop_tokens`], [`model_template`]), a conversation's
//! prompt tokens ([`prompt_tokens`]) and reusing the KV cache a new prompt shares with a
//! session ([`common_prefix`], [`reuse_prefix`]), and the token budget that keeps a reply under a
//! bounded schema from being cut ([`max_json_bytes`]).
//!
//! It must not own tasks (which schema a grid-world reply has is `teamtune-agents`' business)
//! nor HTTP (`teamtune-serve`'s).
//!
//! Per reply: each step, [`ReplyConstraint::mask_logits`] before sampling,
//! [`ReplyConstraint::commit`] the sampled token, [`ReplyConstraint::fast_forward`] to append
//! forced tokens without sampling them, until [`ReplyConstraint::is_done`]; or hand the decoder
//! [`ReplyGrammar::filter`], which does all of that.

mod bound;
mod constraint;
mod filter;
mod prompt;
mod vocab;

pub use bound::max_json_bytes;
pub use constraint::{ConstraintError, JsonStyle, ReplyConstraint, ReplyGrammar, TokenMask};
pub use filter::ConstraintFilter;
pub use prompt::{
    common_prefix, model_template, prompt_tokens, prompt_tokens_with_tools, reuse_prefix,
    stop_tokens, NoEndOfTurn, PromptError,
};
pub use vocab::TokenVocab;
