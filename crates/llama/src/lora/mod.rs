//! LoRA adapters on the decoder projections: their config and math, their files on disk apart
//! from the math (PEFT's folders, llama.cpp's GGUF), and merging an adapter into base weights.

pub(crate) mod adapter;
pub(crate) mod config;
pub(crate) mod gguf;
pub(crate) mod merge;
pub(crate) mod peft;
