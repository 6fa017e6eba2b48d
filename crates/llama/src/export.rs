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

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Map, Value};

use crate::assets::ChatAssets;
use crate::config::{LlamaConfig, RopeScaling};
use crate::error::{LlamaError, Result};
use crate::lora::{LoraAdapter, LoraTarget};
use crate::source::ModelFiles;
use crate::weights::{GgufWeights, WeightSource};

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

/// One tensor of the exported state dict.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    fn numel(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64
    }
}

/// The state dict of `LlamaForCausalLM` in the order transformers' `save_pretrained` shards
/// it: embeddings, every layer's projections and norms, the final norm, and the LM head unless
/// the embeddings are tied (transformers drops tied weights on save), sorted by
/// [`natural_key`] as transformers 5 does before sharding (4.x kept module order).
pub fn state_dict_plan(c: &LlamaConfig) -> Vec<PlannedTensor> {
    let t = |name: String, shape: &[usize]| PlannedTensor {
        name,
        shape: shape.to_vec(),
    };
    let h = c.hidden_size;
    let mut out = vec![t("model.embed_tokens.weight".into(), &[c.vocab_size, h])];
    for l in 0..c.num_hidden_layers {
        for target in LoraTarget::ALL {
            let (o, i) = target.shape(c);
            out.push(t(
                format!("model.layers.{l}.{}.weight", target.layer_path()),
                &[o, i],
            ));
        }
        out.push(t(format!("model.layers.{l}.input_layernorm.weight"), &[h]));
        out.push(t(
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            &[h],
        ));
    }
    out.push(t("model.norm.weight".into(), &[h]));
    if !c.tie_word_embeddings {
        out.push(t("lm_head.weight".into(), &[c.vocab_size, h]));
    }
    out.sort_by_cached_key(|t| natural_key(&t.name));
    out
}

/// One dot-separated part of a name as transformers' `dot_natural_key` orders it: numbers
/// first (numerically), then text with an optional numeric suffix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum NamePart {
    Num(u64),
    Text(String, Option<u64>),
}

/// transformers' `dot_natural_key`: `layers.2` before `layers.10`, `lm_head` before `model`.
pub fn natural_key(name: &str) -> Vec<NamePart> {
    name.split('.')
        .map(|part| {
            if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
                if let Ok(n) = part.parse() {
                    return NamePart::Num(n);
                }
            }
            let text = part.trim_end_matches(|c: char| c.is_ascii_digit());
            let digits = &part[text.len()..];
            NamePart::Text(text.to_owned(), digits.parse().ok())
        })
        .collect()
}

/// huggingface_hub's `split_state_dict_into_shards_factory`: walk the tensors in order, start
/// a new shard when the next tensor would overflow the current one; a tensor larger than the
/// limit gets a shard of its own (appended at once, the current shard stays open).
pub fn plan_shards(tensors: &[PlannedTensor], elem_size: u64, max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let size = t.numel() * elem_size;
        if size > max {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > max {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// The shard file names transformers uses for `n` shards.
pub fn shard_names(n: usize) -> Vec<String> {
    if n == 1 {
        return vec!["model.safetensors".into()];
    }
    (1..=n)
        .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
        .collect()
}

fn dtype_names(dtype: DType) -> Result<(&'static str, &'static str, u64)> {
    Ok(match dtype {
        DType::F32 => ("F32", "float32", 4),
        DType::BF16 => ("BF16", "bfloat16", 2),
        DType::F16 => ("F16", "float16", 2),
        other => {
            return Err(LlamaError::Config {
                path: "--dtype".into(),
                message: format!("cannot export weights as {other:?} (f32, bf16, f16)"),
            })
        }
    })
}

/// An f64 that came from an f32 (GGUF metadata) written as the f32's shortest decimal, so
/// that `1e-5` stays `1e-5` instead of `9.999999747378752e-6`.
fn clean_f64(x: f64) -> f64 {
    let f = x as f32;
    if f as f64 == x {
        f.to_string().parse().unwrap_or(x)
    } else {
        x
    }
}

/// The HF `rope_scaling` object for `c`, `None` for plain RoPE. A GGUF file stores Llama-3.1
/// scaling only as per-frequency divisors (`rope_freqs.weight`); the llama3 parameters that
/// give exactly those frequencies are searched for, and an error says so if none do.
pub fn hf_rope_scaling(c: &LlamaConfig) -> Result<Option<Value>> {
    match &c.rope_scaling {
        RopeScaling::None => Ok(None),
        RopeScaling::Linear { factor } => Ok(Some(
            json!({"factor": clean_f64(*factor), "rope_type": "linear"}),
        )),
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => Ok(Some(json!({
            "factor": clean_f64(*factor),
            "high_freq_factor": clean_f64(*high_freq_factor),
            "low_freq_factor": clean_f64(*low_freq_factor),
            "original_max_position_embeddings": original_max_position_embeddings,
            "rope_type": "llama3",
        }))),
        RopeScaling::FrequencyDivisors(div) => {
            let want = c.inv_freq();
            let close = |got: &[f32]| {
                got.iter()
                    .zip(&want)
                    .all(|(g, w)| ((g - w) / w).abs() <= 1e-5)
            };
            let plain = LlamaConfig {
                rope_scaling: RopeScaling::None,
                ..c.clone()
            };
            if close(&plain.inv_freq()) {
                return Ok(None);
            }
            let max = div.iter().cloned().fold(1.0f32, f32::max) as f64;
            let factor = if (max - max.round()).abs() < 1e-3 {
                max.round()
            } else {
                clean_f64(max as f32 as f64)
            };
            // Only the ratios old/low and old/high matter; Llama's own low = 1, high = 4 first.
            for low in [1.0, 0.5, 2.0] {
                for high in [4.0, 2.0, 8.0, 1.5, 3.0, 16.0] {
                    for old in (4..=20).map(|k| 1usize << k) {
                        if high <= low {
                            continue;
                        }
                        let s = RopeScaling::Llama3 {
                            factor,
                            low_freq_factor: low,
                            high_freq_factor: high,
                            original_max_position_embeddings: old,
                        };
                        let cand = LlamaConfig {
                            rope_scaling: s.clone(),
                            ..c.clone()
                        };
                        if close(&cand.inv_freq()) {
                            let c2 = LlamaConfig {
                                rope_scaling: s,
                                ..c.clone()
                            };
                            return hf_rope_scaling(&c2);
                        }
                    }
                }
            }
            Err(LlamaError::Config {
                path: "rope_freqs.weight".into(),
                message: "the GGUF's per-frequency RoPE divisors match no llama3 rope_scaling; \
                          an HF config.json cannot express them"
                    .into(),
            })
        }
    }
}

/// `config.json` of `LlamaForCausalLM` (transformers 4 form: `rope_theta` + `rope_scaling`,
/// which transformers 5 reads too) for `c` with weights in `dtype`.
pub fn hf_config_json(c: &LlamaConfig, dtype: DType) -> Result<Value> {
    let (_, torch_dtype, _) = dtype_names(dtype)?;
    let eos: Value = match c.eos_token_ids.as_slice() {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    };
    Ok(json!({
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "attention_dropout": 0.0,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": eos,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "mlp_bias": false,
        "model_type": "llama",
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads,
        "pad_token_id": c.pad_token_id,
        "pretraining_tp": 1,
        "rms_norm_eps": clean_f64(c.rms_norm_eps),
        "rope_scaling": hf_rope_scaling(c)?,
        "rope_theta": clean_f64(c.rope_theta),
        "tie_word_embeddings": c.tie_word_embeddings,
        "torch_dtype": torch_dtype,
        "use_cache": true,
        "vocab_size": c.vocab_size,
    }))
}

/// Pretty JSON as Python's `json.dumps(indent=2, sort_keys=True)` plus a newline (for
/// objects built from sorted keys).
fn json_text(v: &Value) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let b: BTreeMap<&String, Value> = m.iter().map(|(k, v)| (k, sorted(v))).collect();
                let mut out = Map::new();
                for (k, v) in b {
                    out.insert(k.clone(), v);
                }
                Value::Object(out)
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    let mut s = serde_json::to_string_pretty(&sorted(v)).expect("JSON always serialises");
    s.push('\n');
    s
}

fn read_json_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| LlamaError::io(path, e))?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(m)) => Ok(Some(m)),
        _ => Err(LlamaError::Config {
            path: path.to_path_buf(),
            message: "not a JSON object".into(),
        }),
    }
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

/// The merged tensor `name`: read from the source in f32, plus `scale * B @ A` (f32) when
/// the adapter targets it, then cast to `dtype`.
fn merged_tensor(
    weights: &WeightSource,
    adapter: Option<&LoraAdapter>,
    t: &PlannedTensor,
    dtype: DType,
) -> Result<Tensor> {
    let delta = match (adapter, lora_site(&t.name)) {
        (Some(a), Some((layer, target))) => a.delta(layer, target)?,
        _ => None,
    };
    let w = match delta {
        Some(d) => (weights.get(&t.name, &t.shape, DType::F32, &Device::Cpu)? + d)?,
        None => weights.get(&t.name, &t.shape, DType::F32, &Device::Cpu)?,
    };
    Ok(w.to_dtype(dtype)?.contiguous()?)
}

/// `(layer, target)` of `model.layers.{l}.{self_attn|mlp}.{x}_proj.weight`.
fn lora_site(name: &str) -> Option<(usize, LoraTarget)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let module = module.strip_suffix(".weight")?;
    let target = LoraTarget::parse(module)?;
    (target.layer_path() == module).then_some(())?;
    Some((layer.parse().ok()?, target))
}

/// Writes one safetensors file: header (with `{"format":"pt"}` metadata, tensors in name
/// order as the safetensors library lays them out, padded to 8 bytes), then each tensor's
/// bytes as it is produced.
fn write_shard(
    path: &Path,
    tensors: &[&PlannedTensor],
    dtype: DType,
    mut produce: impl FnMut(&PlannedTensor) -> Result<Tensor>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let (st_name, _, elem) = dtype_names(dtype)?;
    let mut sorted: Vec<&PlannedTensor> = tensors.to_vec();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut offset = 0u64;
    for t in &sorted {
        let size = t.numel() * elem;
        header.push_str(&format!(
            ",{}:{{\"dtype\":\"{st_name}\",\"shape\":{},\"data_offsets\":[{offset},{}]}}",
            serde_json::to_string(&t.name).expect("a string serialises"),
            serde_json::to_string(&t.shape).expect("a shape serialises"),
            offset + size
        ));
        offset += size;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let file = std::fs::File::create(path).map_err(|e| LlamaError::io(path, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let io = |e| LlamaError::io(path, e);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    for t in &sorted {
        let tensor = produce(t)?;
        let bytes = safetensors::View::data(&tensor);
        if bytes.len() as u64 != t.numel() * elem {
            return Err(LlamaError::Shape(format!(
                "tensor `{}`: {} bytes, expected {}",
                t.name,
                bytes.len(),
                t.numel() * elem
            )));
        }
        w.write_all(&bytes).map_err(io)?;
        progress(bytes.len() as u64);
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(())
}

/// Merges the PEFT adapter in `adapter` (if any) into the model `files` and writes the HF
/// folder `out`. `progress(done, total)` is called with bytes of tensor data written.
pub fn export_merged(
    files: &ModelFiles,
    adapter: Option<&Path>,
    out: &Path,
    options: &ExportOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ExportReport> {
    let (config, weights, assets) = open_source(files)?;
    // Everything that can be checked before writing is checked first: the adapter's shapes,
    // the output folder, the dtype and the config's expressibility.
    let adapter = adapter
        .map(|dir| LoraAdapter::load(&config, dir, &Device::Cpu))
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
            |t| merged_tensor(&weights, adapter.as_ref(), t, dtype),
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

/// The source's `generation_config.json` (sampling defaults kept) or a new one, with BOS and
/// the EOS ids (config EOS and the turn-end tokens generation stops on) filled in if absent.
fn generation_config(
    source_dir: Option<&Path>,
    c: &LlamaConfig,
    assets: Option<&ChatAssets>,
) -> Result<Value> {
    let mut g = match source_dir {
        Some(d) => read_json_object(&d.join("generation_config.json"))?,
        None => None,
    }
    .unwrap_or_else(|| {
        let mut m = Map::new();
        m.insert("_from_model_config".into(), Value::Bool(true));
        m
    });
    if !g.contains_key("bos_token_id") {
        g.insert("bos_token_id".into(), json!(c.bos_token_id));
    }
    if !g.contains_key("eos_token_id") {
        let mut eos = c.eos_token_ids.clone();
        if let Some(a) = assets {
            eos.extend(&a.eos_token_ids);
        }
        eos.sort_unstable();
        eos.dedup();
        g.insert("eos_token_id".into(), json!(eos));
    }
    if !g.contains_key("pad_token_id") {
        if let Some(p) = c.pad_token_id {
            g.insert("pad_token_id".into(), json!(p));
        }
    }
    Ok(Value::Object(g))
}

/// `tokenizer.json` (copied from an HF source, else saved by the tokenizers crate) and
/// `tokenizer_config.json` (the source's, completed with the chat template, BOS/EOS/pad token
/// strings and `model_max_length`).
fn write_tokenizer(
    tmp: &Path,
    source_dir: Option<&Path>,
    c: &LlamaConfig,
    assets: &ChatAssets,
    weights: &WeightSource,
) -> Result<()> {
    let tok_path = tmp.join("tokenizer.json");
    let mut tok_config = Map::new();
    let mut has_jinja = false;
    match source_dir {
        Some(dir) => {
            let src = dir.join("tokenizer.json");
            std::fs::copy(&src, &tok_path).map_err(|e| LlamaError::io(&src, e))?;
            for extra in ["special_tokens_map.json", "chat_template.jinja"] {
                let p = dir.join(extra);
                if p.exists() {
                    let dst = tmp.join(extra);
                    std::fs::copy(&p, &dst).map_err(|e| LlamaError::io(&p, e))?;
                    has_jinja |= extra == "chat_template.jinja";
                }
            }
            if let Some(m) = read_json_object(&dir.join("tokenizer_config.json"))? {
                tok_config = m;
            }
        }
        None => {
            assets
                .tokenizer
                .save(&tok_path, true)
                .map_err(|e| LlamaError::Tokenizer(format!("{}: {e}", tok_path.display())))?;
        }
    }
    let mut set_default = |key: &str, v: Value| {
        if !tok_config.contains_key(key) && !v.is_null() {
            tok_config.insert(key.into(), v);
        }
    };
    if !has_jinja {
        set_default("chat_template", json!(assets.chat_template));
    }
    set_default("bos_token", json!(assets.bos_token));
    set_default("eos_token", json!(assets.eos_token));
    let pad = match weights {
        WeightSource::Gguf(g) => g.special_token("tokenizer.ggml.padding_token_id"),
        WeightSource::Safetensors { .. } => c
            .pad_token_id
            .and_then(|id| assets.tokenizer.id_to_token(id)),
    };
    set_default("pad_token", json!(pad));
    set_default("model_max_length", json!(c.max_position_embeddings));
    set_default("clean_up_tokenization_spaces", json!(false));
    set_default("tokenizer_class", json!("PreTrainedTokenizerFast"));
    let p = tmp.join("tokenizer_config.json");
    std::fs::write(&p, json_text(&Value::Object(tok_config))).map_err(|e| LlamaError::io(&p, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, n: usize) -> PlannedTensor {
        PlannedTensor {
            name: name.into(),
            shape: vec![n],
        }
    }

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

    #[test]
    fn sharding_follows_huggingface_hub() {
        // The docstring's example: sizes [6, 6, 2, 6, 2, 2] with a limit of 10.
        let ts: Vec<_> = [6, 6, 2, 6, 2, 2]
            .iter()
            .enumerate()
            .map(|(i, &n)| t(&format!("t{i}"), n))
            .collect();
        assert_eq!(
            plan_shards(&ts, 1, 10),
            vec![vec![0], vec![1, 2], vec![3, 4, 5]]
        );
        // An oversized tensor gets its own shard, appended while the current one stays open.
        let ts = vec![t("a", 3), t("big", 20), t("b", 3), t("c", 5)];
        assert_eq!(plan_shards(&ts, 1, 10), vec![vec![1], vec![0, 2], vec![3]]);
        assert_eq!(shard_names(1), vec!["model.safetensors"]);
        assert_eq!(shard_names(3)[2], "model-00003-of-00003.safetensors");
    }

    #[test]
    fn names_sort_like_transformers_dot_natural_key() {
        let mut names = vec![
            "model.layers.10.mlp.up_proj.weight",
            "model.norm.weight",
            "model.layers.2.self_attn.q_proj.weight",
            "lm_head.weight",
            "model.layers.2.input_layernorm.weight",
            "model.embed_tokens.weight",
            "a.shard11",
            "a.shard2",
            "a.shard",
        ];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(
            names,
            vec![
                "a.shard",
                "a.shard2",
                "a.shard11",
                "lm_head.weight",
                "model.embed_tokens.weight",
                "model.layers.2.input_layernorm.weight",
                "model.layers.2.self_attn.q_proj.weight",
                "model.layers.10.mlp.up_proj.weight",
                "model.norm.weight",
            ]
        );
    }

    #[test]
    fn lora_sites_are_parsed() {
        assert_eq!(
            lora_site("model.layers.12.mlp.down_proj.weight"),
            Some((12, LoraTarget::Down))
        );
        assert_eq!(
            lora_site("model.layers.0.self_attn.q_proj.weight"),
            Some((0, LoraTarget::Q))
        );
        assert_eq!(lora_site("model.layers.0.mlp.q_proj.weight"), None);
        assert_eq!(lora_site("model.layers.0.input_layernorm.weight"), None);
        assert_eq!(lora_site("lm_head.weight"), None);
    }

    #[test]
    fn f32_metadata_values_are_written_short() {
        assert_eq!(clean_f64(1e-5f32 as f64), 1e-5);
        assert_eq!(clean_f64(1e-5), 1e-5);
        assert_eq!(clean_f64(500000.0), 500000.0);
    }
}
