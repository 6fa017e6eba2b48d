//! LoRA adapters on the decoder projections: their config and math, PEFT's files on disk
//! apart from the math, and merging an adapter into base weights.

pub(crate) mod adapter;
pub(crate) mod config;
pub(crate) mod merge;
pub(crate) mod peft;
