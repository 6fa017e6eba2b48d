//! Where a model comes from and how its files are read: `config.json` in every Llama-3.x form
//! (and written back), safetensors and GGUF weights, the hub, the tokenizer and chat template.

pub(crate) mod assets;
pub(crate) mod config;
pub(crate) mod config_json;
pub(crate) mod gguf;
pub(crate) mod gguf_blocks;
pub(crate) mod hub;
pub(crate) mod open;
pub(crate) mod source;
pub(crate) mod text_file;
pub(crate) mod weights;
