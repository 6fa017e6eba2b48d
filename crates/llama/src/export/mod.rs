//! A model, with a LoRA adapter merged in, written as a standard Hugging Face folder that
//! transformers loads with `from_pretrained`: safetensors weights under HF names, sharded the
//! way transformers' `save_pretrained` shards them (`model-00001-of-0000N.safetensors` and
//! `model.safetensors.index.json`, or one `model.safetensors`), `config.json`,
//! `generation_config.json` and the tokenizer files.
//!
//! Weights are streamed tensor by tensor from the (memory-mapped or GGUF) source: each is
//! read, merged (`W + scale * B @ A` in f32), cast and appended to its shard, so memory stays
//! about one tensor whatever the model's size. Everything is written into a temporary sibling
//! folder that is renamed into place at the end, so a failure never leaves a half folder.

mod gguf_from_hf;
pub(crate) mod gguf_model;
pub(crate) mod gguf_write;
mod metadata;
pub(crate) mod modelfile;
mod shards;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::{json, Map, Value};

use self::metadata::{generation_config, json_text, write_tokenizer};
use self::shards::{plan_shards, shard_names, state_dict_plan, write_shard, PlannedTensor};
use crate::error::{LlamaError, Result};
use crate::load::assets::ChatAssets;
use crate::load::config::LlamaConfig;
use crate::load::config_json::{dtype_names, hf_config_json};
use crate::load::source::ModelFiles;
use crate::load::weights::{GgufWeights, WeightSource};
use crate::lora::adapter::LoraAdapter;
use crate::lora::merge::merged_tensor;

/// transformers' default `max_shard_size` up to 4.x (5.x raised it to 50GB).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

/// How to write the merged folder.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// Dtype of the written weights (f32, bf16 or f16); `None` keeps the source's dtype
    /// (f32 for a GGUF source, whose weights are dequantised to f32).
    pub dtype: Option<DType>,
    /// Largest shard in bytes, as transformers counts it (tensor bytes only).
    pub max_shard_size: u64,
    /// Replace a non-empty existing output folder.
    pub force: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        ExportOptions {
            dtype: None,
            max_shard_size: DEFAULT_MAX_SHARD_SIZE,
            force: false,
        }
    }
}

/// What was written.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub dir: PathBuf,
    pub dtype: DType,
    /// Shard file names in order.
    pub shards: Vec<String>,
    pub tensors: usize,
    /// Bytes of tensor data (the index's `metadata.total_size`).
    pub total_size: u64,
    /// Whether tokenizer files were written (an HF source folder may have none).
    pub tokenizer: bool,
}

/// Parses a shard size as huggingface_hub does (`5GB`, `500MB`, `10KB`, `1TB`, decimal
/// units, a fractional value allowed) or a plain number of bytes.
pub fn parse_size(spec: &str) -> Result<u64> {
    let s = spec.trim();
    let bad = || LlamaError::Config {
        path: "--max-shard-size".into(),
        message: format!("`{spec}` is not a size (e.g. 5GB, 500MB, 10KB or a number of bytes)"),
    };
    if let Ok(n) = s.parse::<u64>() {
        return if n > 0 { Ok(n) } else { Err(bad()) };
    }
    if s.len() < 3 || !s.is_char_boundary(s.len() - 2) {
        return Err(bad());
    }
    let (value, unit) = s.split_at(s.len() - 2);
    let mult: f64 = match unit.to_ascii_uppercase().as_str() {
        "TB" => 1e12,
        "GB" => 1e9,
        "MB" => 1e6,
        "KB" => 1e3,
        _ => return Err(bad()),
    };
    let v: f64 = value.trim().parse().map_err(|_| bad())?;
    let n = (v * mult) as u64;
    if !v.is_finite() || n == 0 {
        return Err(bad());
    }
    Ok(n)
}

/// The source dtype of a safetensors model (of its embeddings).
fn source_dtype(weights: &WeightSource) -> DType {
    use safetensors::Dtype as D;
    match weights {
        WeightSource::Safetensors { tensors, .. } => {
            match tensors.get("model.embed_tokens.weight").map(|v| v.dtype()) {
                Ok(D::BF16) => DType::BF16,
                Ok(D::F16) => DType::F16,
                _ => DType::F32,
            }
        }
        WeightSource::Gguf(_) => DType::F32,
    }
}

/// Removes a temporary folder unless disarmed.
struct TmpDir(Option<PathBuf>);

impl Drop for TmpDir {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}

/// Whether `dir` exists and holds anything.
fn non_empty(dir: &Path) -> Result<bool> {
    if !dir.exists() {
        return Ok(false);
    }
    if !dir.is_dir() {
        return Err(LlamaError::Config {
            path: dir.to_path_buf(),
            message: "the output path exists and is not a folder".into(),
        });
    }
    let mut entries = std::fs::read_dir(dir).map_err(|e| LlamaError::io(dir, e))?;
    Ok(entries.next().is_some())
}

/// Opens `files`: config, weights and (when the source has them) tokenizer assets.
fn open_source(files: &ModelFiles) -> Result<(LlamaConfig, WeightSource, Option<ChatAssets>)> {
    match files {
        ModelFiles::HfFolder { dir, weights } => {
            let config = LlamaConfig::from_file(&dir.join("config.json"))?;
            let w = WeightSource::safetensors(weights.clone())?;
            let assets = if dir.join("tokenizer.json").exists() {
                let a = ChatAssets::load(files, &config.eos_token_ids)?;
                a.check_fits(config.vocab_size)?;
                Some(a)
            } else {
                tracing::warn!(dir = %dir.display(), "no tokenizer.json: the merged folder will have no tokenizer files");
                None
            };
            Ok((config, w, assets))
        }
        ModelFiles::Gguf { path } => {
            let g = GgufWeights::open(path)?;
            let config = g.config()?;
            let assets = ChatAssets::from_gguf(&g, &config.eos_token_ids)?;
            assets.check_fits(config.vocab_size)?;
            Ok((config, WeightSource::Gguf(g), Some(assets)))
        }
    }
}

/// Merges the PEFT adapter in `adapter` (if any) into the model `files` and writes the HF
/// folder `out`. `progress(done, total)` is called with bytes of tensor data written.
/// Removes the `.NAME.partial-PID` folders that merges into `NAME` killed before they finished
/// left behind (their process is gone), saying so; a running merge's folder is left alone.
fn remove_stale_partials(parent: &Path, out_name: &str) {
    let prefix = format!(".{out_name}.partial-");
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix(&prefix)
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || process_alive(pid) != Some(false) {
            if pid != std::process::id() {
                tracing::warn!(folder = %entry.path().display(), "a merge into the same folder may be running (or was interrupted): its partial folder is left");
            }
            continue;
        }
        match std::fs::remove_dir_all(entry.path()) {
            Ok(()) => tracing::warn!(
                folder = %entry.path().display(),
                "removed the partial folder of an interrupted merge"
            ),
            Err(e) => {
                tracing::warn!(folder = %entry.path().display(), error = %e, "cannot remove an interrupted merge's partial folder")
            }
        }
    }
}

/// Whether process `pid` runs; `None` where this cannot be told.
fn process_alive(pid: u32) -> Option<bool> {
    if cfg!(target_os = "linux") {
        Some(Path::new(&format!("/proc/{pid}")).exists())
    } else {
        None
    }
}

pub fn export_merged(
    files: &ModelFiles,
    adapter: Option<&Path>,
    out: &Path,
    options: &ExportOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ExportReport> {
    // Checked first, before anything is read: --force would delete the input with the output.
    let base = match files {
        ModelFiles::HfFolder { dir, .. } => dir.as_path(),
        ModelFiles::Gguf { path } => path.as_path(),
    };
    let inputs = std::iter::once(base).chain(adapter);
    if let Some(input) = inputs
        .into_iter()
        .find(|i| teamtune_formats::overlaps(out, i))
    {
        return Err(LlamaError::Config {
            path: out.to_path_buf(),
            message: format!(
                "the output folder is, contains or is inside the input {}: choose another",
                input.display()
            ),
        });
    }
    let (config, weights, assets) = open_source(files)?;
    // Everything that can be checked before writing is checked first: the adapter's shapes,
    // the output folder, the dtype and the config's expressibility.
    let adapter = adapter
        .map(|dir| LoraAdapter::open(&config, dir, &Device::Cpu))
        .transpose()?;
    if non_empty(out)? && !options.force {
        return Err(LlamaError::Config {
            path: out.to_path_buf(),
            message: "the output folder exists and is not empty (use --force to replace it)".into(),
        });
    }
    let dtype = options.dtype.unwrap_or_else(|| source_dtype(&weights));
    let (_, _, elem) = dtype_names(dtype)?;
    let config_json = hf_config_json(&config, dtype)?;

    let plan = state_dict_plan(&config);
    let shards = plan_shards(&plan, elem, options.max_shard_size.max(1));
    let names = shard_names(shards.len());
    let total_size: u64 = plan.iter().map(|t| t.numel() * elem).sum();
    let total_params: u64 = plan.iter().map(|t| t.numel()).sum();

    let out_name = out
        .file_name()
        .ok_or_else(|| LlamaError::Config {
            path: out.to_path_buf(),
            message: "the output path has no folder name".into(),
        })?
        .to_string_lossy()
        .into_owned();
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| LlamaError::io(&parent, e))?;
    remove_stale_partials(&parent, &out_name);
    let tmp = parent.join(format!(".{out_name}.partial-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| LlamaError::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| LlamaError::io(&tmp, e))?;
    let mut guard = TmpDir(Some(tmp.clone()));

    tracing::info!(
        out = %out.display(),
        ?dtype,
        shards = shards.len(),
        total_size,
        merged = adapter.is_some(),
        "writing merged model"
    );
    let mut done = 0u64;
    progress(0, total_size);
    let mut weight_map = Map::new();
    for (shard, file) in shards.iter().zip(&names) {
        let tensors: Vec<&PlannedTensor> = shard.iter().map(|&i| &plan[i]).collect();
        for t in &tensors {
            weight_map.insert(t.name.clone(), Value::String(file.clone()));
        }
        write_shard(
            &tmp.join(file),
            &tensors,
            dtype,
            |t| merged_tensor(&weights, adapter.as_ref(), &t.name, &t.shape, dtype),
            &mut |n| {
                done += n;
                progress(done, total_size);
            },
        )?;
    }
    let write = |name: &str, text: &str| -> Result<()> {
        let p = tmp.join(name);
        std::fs::write(&p, text).map_err(|e| LlamaError::io(&p, e))
    };
    if names.len() > 1 {
        let index = json!({
            "metadata": {"total_parameters": total_params, "total_size": total_size},
            "weight_map": weight_map,
        });
        write("model.safetensors.index.json", &json_text(&index))?;
    }
    write("config.json", &json_text(&config_json))?;
    let source_dir = match files {
        ModelFiles::HfFolder { dir, .. } => Some(dir.as_path()),
        ModelFiles::Gguf { .. } => None,
    };
    write(
        "generation_config.json",
        &json_text(&generation_config(source_dir, &config, assets.as_ref())?),
    )?;
    if let Some(assets) = &assets {
        write_tokenizer(&tmp, source_dir, &config, assets, &weights)?;
    }

    // Into place: an existing (empty, or --force) folder is moved aside first and removed
    // only after the new one is in place.
    let old = parent.join(format!(".{out_name}.old-{}", std::process::id()));
    let had_old = out.exists();
    if had_old {
        std::fs::rename(out, &old).map_err(|e| LlamaError::io(out, e))?;
    }
    if let Err(e) = std::fs::rename(&tmp, out) {
        if had_old {
            let _ = std::fs::rename(&old, out);
        }
        return Err(LlamaError::io(out, e));
    }
    guard.0 = None;
    if had_old {
        std::fs::remove_dir_all(&old).map_err(|e| LlamaError::io(&old, e))?;
    }
    Ok(ExportReport {
        dir: out.to_path_buf(),
        dtype,
        shards: names,
        tensors: plan.len(),
        total_size,
        tokenizer: assets.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_huggingface_hub() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("500mb").unwrap(), 500_000_000);
        assert_eq!(parse_size("1.5KB").unwrap(), 1500);
        assert_eq!(parse_size("1234").unwrap(), 1234);
        assert!(parse_size("5GiB").is_err());
        assert!(parse_size("GB").is_err());
        assert!(parse_size("0").is_err());
    }
}
