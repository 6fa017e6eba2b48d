//! teamtune-data: conversation files to the token ids and loss masks the Hugging Face stack would
//! produce, fast, with errors a user can act on.
//!
//! It owns chat templates (minijinja), tokenisation with assistant masks, JSONL trajectories and
//! their validation, pruning, splits, batching and packing, and token statistics with their
//! printers. It must not own model code (weights, tensors, decoding) nor tasks; the chat message
//! itself is `teamtune-formats`' [`Message`], shared with the grid-world and the agents.
//!
//! The flow the trainer runs:
//! ```no_run
//! use teamtune_data::*;
//! # fn main() -> Result<(), DataError> {
//! let tokenizer = tokenizers::Tokenizer::from_file("tokenizer.json").unwrap();
//! let template = ChatTemplate::builtin(BuiltinTemplate::Llama31, TemplateOptions::default())?;
//! let encoder = Encoder::new(tokenizer, template, EncodeOptions { max_len: Some(4096), ..Default::default() })?;
//! let prepared = prepare(&["episodes.jsonl".into()], &encoder, &PrepareOptions::default())?;
//! let pad = choose_pad_id(encoder.tokenizer(), None, encoder.end_of_turn_ids())?;
//! let batches = make_batches(&prepared.train, &BatchOptions::new(8192, pad), encoder.end_of_turn_ids(), 0)?;
//! # Ok(()) }
//! ```
//! The crate knows nothing of models: the caller passes a `tokenizers::Tokenizer` and a template
//! (the model's own `chat_template`, or a built-in one).

mod batch;
mod conversation;
mod encode;
mod error;
mod filter;
mod pipeline;
mod reader;
mod special_text;
mod split;
mod stats;
mod summary;
mod template;

/// The tokenizers crate this one is built with, for callers that construct a `Tokenizer`.
pub use tokenizers;

pub use batch::{choose_pad_id, make_batches, Batch, BatchOptions};
pub use conversation::{Conversation, FieldError, Message, Role, Source};
pub use encode::{
    EncodeOptions, EncodeOutcome, Encoded, Encoder, Example, MaskMethod, Overlong, TrainOn,
    DECISION,
};
pub use error::{DataError, InvalidRecord, Result};
pub use filter::{MissingScore, PruneOptions, PruneReason, DEFAULT_MIN_SCORE};
pub use pipeline::{
    prepare, prepare_conversations, PrepareOptions, PrepareReport, Prepared, TaskCounts,
};
pub use reader::{discover, read_conversations, ConversationReader, ReadOptions, ReadReport};
pub use special_text::{SpecialText, TokensWithOffsets};
pub use split::{assign_splits, conversation_key, Split, SplitBy, SplitOptions};
pub use stats::{percentile, Percentiles, TokenStats};
pub use summary::StatsSettings;
pub use template::{
    options_from_tokenizer_config, BuiltinTemplate, ChatTemplate, ContentSpans, FixedDate,
    TemplateOptions,
};
