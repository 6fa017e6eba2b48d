//! Models by hub id through hf-hub: the local HF cache first (works offline), then the network
//! with `HF_TOKEN` for gated models such as meta-llama/Llama-3.1-8B-Instruct.
//!
//! The hub only downloads: it returns the local folder the files landed in, and
//! `ModelFiles::from_folder` (in `source`) decides what that folder holds.

use std::path::PathBuf;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::Cache;

use crate::error::{LlamaError, Result};
use crate::load::weights::WeightSource;

const SMALL_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// Downloads (or finds in the HF cache) the config, weights and tokenizer files of `repo_id`
/// and returns the local folder that holds them.
pub(crate) fn download(repo_id: &str) -> Result<PathBuf> {
    let cache = Cache::from_env();
    let offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v == "true");
    let cached = cache.model(repo_id.to_string());
    let fetch = |file: &str| -> Result<std::path::PathBuf> {
        if let Some(p) = cached.get(file) {
            return Ok(p);
        }
        if offline {
            return Err(LlamaError::Hub(format!(
                "{repo_id}/{file} is not in the HF cache and HF_HUB_OFFLINE is set"
            )));
        }
        let token = std::env::var("HF_TOKEN").ok().or_else(|| cache.token());
        let api = ApiBuilder::from_env()
            .with_token(token)
            .with_progress(true)
            .build()
            .map_err(|e| LlamaError::Hub(e.to_string()))?;
        api.model(repo_id.to_string()).get(file).map_err(|e| {
            LlamaError::Hub(format!(
                "cannot download {repo_id}/{file}: {e} (offline? gated model without HF_TOKEN? \
                 a local folder or .gguf also works as --model)"
            ))
        })
    };
    let config = fetch("config.json")?;
    let dir = config.parent().unwrap().to_path_buf();
    match fetch("model.safetensors.index.json") {
        Ok(index) => {
            for shard in WeightSource::shards_from_index(&index)? {
                fetch(&shard.file_name().unwrap().to_string_lossy())?;
            }
        }
        Err(_) => {
            fetch("model.safetensors")?;
        }
    }
    for f in SMALL_FILES {
        let _ = fetch(f); // optional files
    }
    Ok(dir)
}
