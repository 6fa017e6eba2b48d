//! `--adapter` as `generate`, `chat`, `export` and `merge` take it: a PEFT folder or a llama.cpp
//! LoRA GGUF, checked before anything loads.

use std::path::Path;

use anyhow::{bail, Context};
use teamtune_llama::LoadedModel;

use super::model_args::ModelArgs;

/// A PEFT folder (with adapter_config.json) or a `.gguf` file, or an error naming `--adapter`.
pub fn check_adapter(path: &Path) -> anyhow::Result<()> {
    let gguf = path.is_file() && path.extension().is_some_and(|e| e == "gguf");
    if !gguf && !path.join("adapter_config.json").is_file() {
        bail!(
            "--adapter {}: not a LoRA adapter (a PEFT folder with adapter_config.json, or a .gguf)",
            path.display()
        );
    }
    Ok(())
}

/// The model with `adapter` (if any) loaded and active.
pub fn load_with_adapter(model: &ModelArgs, adapter: Option<&Path>) -> anyhow::Result<LoadedModel> {
    let mut loaded = model.load()?;
    if let Some(dir) = adapter {
        loaded
            .model
            .load_adapter("adapter", dir)
            .with_context(|| format!("--adapter {}", dir.display()))?;
        loaded.model.set_active_adapter(Some("adapter"))?;
    }
    Ok(loaded)
}
