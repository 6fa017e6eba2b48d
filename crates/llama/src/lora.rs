//! LoRA adapters on the decoder projections, PEFT-compatible on disk.
//!
//! An adapter adds `scale * B(A(dropout(x)))` to a frozen projection `W x`, with `A [r, in]`
//! and `B [out, r]` trainable f32 `Var`s (PEFT init: A uniform in +-1/sqrt(in), B zero, so a
//! fresh adapter leaves the model unchanged). `scale` is `alpha / r`, or `alpha / sqrt(r)`
//! with rsLoRA. The base weights go through [`FrozenMatmul`], whose backward returns only the
//! input gradient, so training never computes or stores a weight-sized gradient for them.
//!
//! Files follow PEFT's layout: `adapter_config.json` and `adapter_model.safetensors` with
//! tensors named `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight` etc.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor, Var};
use serde_json::{json, Value};

use crate::config::LlamaConfig;
use crate::error::{LlamaError, Result};

/// The file names of an adapter folder, as PEFT writes them.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";

/// A projection of a decoder layer that can carry an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraTarget {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl LoraTarget {
    pub const ALL: [LoraTarget; 7] = [
        LoraTarget::Q,
        LoraTarget::K,
        LoraTarget::V,
        LoraTarget::O,
        LoraTarget::Gate,
        LoraTarget::Up,
        LoraTarget::Down,
    ];

    /// The module name PEFT uses in `target_modules` (`q_proj`, ..., `down_proj`).
    pub fn module_name(self) -> &'static str {
        match self {
            LoraTarget::Q => "q_proj",
            LoraTarget::K => "k_proj",
            LoraTarget::V => "v_proj",
            LoraTarget::O => "o_proj",
            LoraTarget::Gate => "gate_proj",
            LoraTarget::Up => "up_proj",
            LoraTarget::Down => "down_proj",
        }
    }

    /// The path of the projection inside a decoder layer (`self_attn.q_proj`, `mlp.up_proj`).
    pub fn layer_path(self) -> String {
        let block = match self {
            LoraTarget::Q | LoraTarget::K | LoraTarget::V | LoraTarget::O => "self_attn",
            _ => "mlp",
        };
        format!("{block}.{}", self.module_name())
    }

    /// Parses `q_proj` (or a dotted path ending in it, e.g. `self_attn.q_proj`).
    pub fn parse(name: &str) -> Option<Self> {
        let last = name.rsplit('.').next().unwrap_or(name);
        LoraTarget::ALL
            .into_iter()
            .find(|t| t.module_name() == last)
    }

    /// `[out, in]` of this projection in a model with `config`.
    pub fn shape(self, c: &LlamaConfig) -> (usize, usize) {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let (nq, nkv) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        match self {
            LoraTarget::Q => (nq, h),
            LoraTarget::K | LoraTarget::V => (nkv, h),
            LoraTarget::O => (h, nq),
            LoraTarget::Gate | LoraTarget::Up => (i, h),
            LoraTarget::Down => (h, i),
        }
    }
}

/// The hyper-parameters of an adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Dropout on the adapter's input, applied in `Mode::Training` only.
    pub dropout: f32,
    /// rsLoRA: scale `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    pub targets: Vec<LoraTarget>,
    /// Written to `adapter_config.json` so that PEFT knows the base model.
    pub base_model_name_or_path: Option<String>,
    /// Seed of the A initialisation (deterministic on every device).
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.0,
            use_rslora: false,
            targets: LoraTarget::ALL.to_vec(),
            base_model_name_or_path: None,
            seed: 0,
        }
    }
}

impl LoraConfig {
    /// The factor of the adapter branch: `alpha / r` or, with rsLoRA, `alpha / sqrt(r)`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.rank == 0 {
            return Err("LoRA rank must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!(
                "LoRA dropout must be in [0, 1), got {}",
                self.dropout
            ));
        }
        if !self.alpha.is_finite() {
            return Err(format!("LoRA alpha must be finite, got {}", self.alpha));
        }
        if self.targets.is_empty() {
            return Err("LoRA needs at least one target module".into());
        }
        Ok(())
    }

    /// The targets sorted and without duplicates.
    fn normalized_targets(&self) -> Vec<LoraTarget> {
        let mut t = self.targets.clone();
        t.sort();
        t.dedup();
        t
    }
}

/// The two factors of one adapted projection, f32: `a [r, in]`, `b [out, r]`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Var,
    pub b: Var,
}

/// One adapter: its config and the factors of every adapted projection of every layer.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    config: LoraConfig,
    layers: Vec<BTreeMap<LoraTarget, LoraPair>>,
}

/// The adapter of one projection as the forward uses it.
pub(crate) struct ActiveLora<'a> {
    pub pair: &'a LoraPair,
    pub scale: f64,
    pub dropout: f32,
    /// Seed of this projection's dropout mask; `None`: the device's own generator.
    pub dropout_seed: Option<u64>,
}

/// PEFT's name of a factor: `base_model.model.model.layers.{i}.{path}.lora_{A|B}.weight`.
pub fn peft_tensor_name(layer: usize, target: LoraTarget, factor: char) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.lora_{factor}.weight",
        target.layer_path()
    )
}

impl LoraAdapter {
    /// A fresh adapter with PEFT's init for a model with `model_config` on `device`.
    pub fn new(model_config: &LlamaConfig, config: &LoraConfig, device: &Device) -> Result<Self> {
        config
            .validate()
            .map_err(|m| LlamaError::Shape(format!("invalid LoRA config: {m}")))?;
        let mut config = config.clone();
        config.targets = config.normalized_targets();
        let mut rng = SplitMix64(config.seed);
        let r = config.rank;
        let mut layers = Vec::with_capacity(model_config.num_hidden_layers);
        for _ in 0..model_config.num_hidden_layers {
            let mut map = BTreeMap::new();
            for &t in &config.targets {
                let (out, inp) = t.shape(model_config);
                // kaiming_uniform(a = sqrt(5)) as PEFT/nn.Linear: bound = 1/sqrt(fan_in).
                let bound = 1.0 / (inp as f64).sqrt();
                let data: Vec<f32> = (0..r * inp)
                    .map(|_| ((rng.next_f64() * 2.0 - 1.0) * bound) as f32)
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(data, (r, inp), device)?)?;
                let b = Var::zeros((out, r), DType::F32, device)?;
                map.insert(t, LoraPair { a, b });
            }
            layers.push(map);
        }
        Ok(LoraAdapter { config, layers })
    }

    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// The factors of `target` in `layer`, if adapted.
    pub fn pair(&self, layer: usize, target: LoraTarget) -> Option<&LoraPair> {
        self.layers.get(layer).and_then(|m| m.get(&target))
    }

    /// Every trainable tensor with its PEFT name, in a stable order (layer, target, A, B).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (l, map) in self.layers.iter().enumerate() {
            for (&t, p) in map {
                out.push((peft_tensor_name(l, t, 'A'), p.a.clone()));
                out.push((peft_tensor_name(l, t, 'B'), p.b.clone()));
            }
        }
        out
    }

    /// Every trainable tensor, in the order of [`Self::named_vars`].
    pub fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }

    pub(crate) fn active(&self, layer: usize, target: LoraTarget) -> Option<ActiveLora<'_>> {
        self.pair(layer, target).map(|pair| ActiveLora {
            pair,
            scale: self.config.scale(),
            dropout: self.config.dropout,
            dropout_seed: None,
        })
    }

    /// `scale * B @ A`, f32 `[out, in]`: what merging adds to the base weight.
    pub fn delta(&self, layer: usize, target: LoraTarget) -> Result<Option<Tensor>> {
        match self.pair(layer, target) {
            None => Ok(None),
            Some(p) => Ok(Some(
                (p.b.as_tensor().matmul(p.a.as_tensor())? * self.config.scale())?,
            )),
        }
    }

    /// `adapter_config.json` as PEFT writes it for this adapter.
    pub fn peft_config_json(&self) -> Value {
        let c = &self.config;
        let targets: Vec<&str> = c.targets.iter().map(|t| t.module_name()).collect();
        // f32 -> f64 through the shortest decimal form: 0.05, not 0.05000000074505806.
        let dropout: f64 = c.dropout.to_string().parse().unwrap_or(c.dropout as f64);
        json!({
            "alpha_pattern": {},
            "base_model_name_or_path": c.base_model_name_or_path,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "layers_pattern": null,
            "layers_to_transform": null,
            "lora_alpha": c.alpha,
            "lora_dropout": dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": c.rank,
            "rank_pattern": {},
            "revision": null,
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": c.use_rslora,
        })
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (created if
    /// needed), each through a temporary file and a rename so that a crash never leaves a
    /// half-written adapter.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| LlamaError::io(dir, e))?;
        let tensors: HashMap<String, Tensor> = self
            .named_vars()
            .into_iter()
            .map(|(n, v)| Ok((n, v.as_tensor().contiguous()?)))
            .collect::<Result<_>>()?;
        let weights = dir.join(ADAPTER_WEIGHTS);
        let tmp = dir.join(format!(".{ADAPTER_WEIGHTS}.tmp"));
        candle_core::safetensors::save(&tensors, &tmp).map_err(|e| LlamaError::Weights {
            path: tmp.clone(),
            message: format!("cannot write adapter weights: {e}"),
        })?;
        std::fs::rename(&tmp, &weights).map_err(|e| LlamaError::io(&weights, e))?;
        let text = serde_json::to_string_pretty(&self.peft_config_json())
            .expect("a JSON value always serialises");
        write_atomic(&dir.join(ADAPTER_CONFIG), text.as_bytes())
    }

    /// Reads a PEFT LoRA adapter folder for a model with `model_config`, checking that its
    /// type, target modules and every tensor's name and shape fit that model.
    pub fn load(model_config: &LlamaConfig, dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join(ADAPTER_CONFIG);
        let config = read_peft_config(&config_path)?;
        let weights_path = dir.join(ADAPTER_WEIGHTS);
        if !weights_path.exists() {
            return Err(LlamaError::NotFound(weights_path.display().to_string()));
        }
        let mut tensors = candle_core::safetensors::load(&weights_path, device).map_err(|e| {
            LlamaError::Weights {
                path: weights_path.clone(),
                message: format!("cannot read adapter weights (truncated or corrupt?): {e}"),
            }
        })?;
        let err = |message: String| LlamaError::Weights {
            path: weights_path.clone(),
            message,
        };
        let r = config.rank;
        let mut layers = Vec::with_capacity(model_config.num_hidden_layers);
        for l in 0..model_config.num_hidden_layers {
            let mut map = BTreeMap::new();
            for &t in &config.targets {
                let (out, inp) = t.shape(model_config);
                let mut take = |factor: char, shape: [usize; 2]| -> Result<Var> {
                    let name = peft_tensor_name(l, t, factor);
                    let tensor = tensors.remove(&name).ok_or_else(|| {
                        err(format!(
                            "tensor `{name}` is missing (adapter_config.json targets {})",
                            t.module_name()
                        ))
                    })?;
                    if tensor.dims() != shape {
                        return Err(err(format!(
                            "tensor `{name}` has shape {:?}, the base model and r = {r} imply {:?} \
                             (adapter made for another base model?)",
                            tensor.dims(),
                            shape
                        )));
                    }
                    Ok(Var::from_tensor(&tensor.to_dtype(DType::F32)?)?)
                };
                let a = take('A', [r, inp])?;
                let b = take('B', [out, r])?;
                map.insert(t, LoraPair { a, b });
            }
            layers.push(map);
        }
        if let Some(name) = tensors.keys().min() {
            return Err(err(format!(
                "tensor `{name}` does not belong to any targeted projection of the base model \
                 ({} layers, targets {:?}; adapter made for another base model?)",
                model_config.num_hidden_layers,
                config
                    .targets
                    .iter()
                    .map(|t| t.module_name())
                    .collect::<Vec<_>>()
            )));
        }
        Ok(LoraAdapter { config, layers })
    }
}

/// Parses and checks a PEFT `adapter_config.json`: LoRA only, features that change the
/// forward (DoRA, bias, per-layer ranks, ...) are refused with the field's name.
pub fn read_peft_config(path: &Path) -> Result<LoraConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| LlamaError::io(path, e))?;
    let bad = |message: String| LlamaError::Config {
        path: path.to_path_buf(),
        message,
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("");
    if peft_type != "LORA" {
        return Err(bad(format!(
            "peft_type is `{peft_type}`, only LORA adapters are supported"
        )));
    }
    let rank = v
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| bad("`r` must be a positive integer".into()))? as usize;
    let alpha = v
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("`lora_alpha` must be a number".into()))?;
    let dropout = v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0) as f32;
    let flag = |key: &str| v.get(key).and_then(Value::as_bool).unwrap_or(false);
    let use_rslora = flag("use_rslora");
    for key in [
        "use_dora",
        "fan_in_fan_out",
        "lora_bias",
        "use_qalora",
        "use_bdlora",
    ] {
        if flag(key) {
            return Err(bad(format!("`{key}` is true, which is not supported")));
        }
    }
    if let Some(bias) = v.get("bias").and_then(Value::as_str) {
        if bias != "none" {
            return Err(bad(format!(
                "bias `{bias}` is not supported (only \"none\")"
            )));
        }
    }
    // Fields that, when set, make the adapter differ from plain LoRA on the listed modules.
    for key in [
        "rank_pattern",
        "alpha_pattern",
        "layers_to_transform",
        "layer_replication",
        "modules_to_save",
        "exclude_modules",
        "target_parameters",
        "trainable_token_indices",
        "alora_invocation_tokens",
    ] {
        let set = match v.get(key) {
            None | Some(Value::Null) => false,
            Some(Value::Object(m)) => !m.is_empty(),
            Some(Value::Array(a)) => !a.is_empty(),
            Some(_) => true,
        };
        if set {
            return Err(bad(format!("`{key}` is set, which is not supported")));
        }
    }
    let names: Vec<String> = match v.get("target_modules") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| bad("`target_modules` must list strings".into()))
            })
            .collect::<Result<_>>()?,
        Some(Value::String(s)) if s == "all-linear" => LoraTarget::ALL
            .iter()
            .map(|t| t.module_name().to_owned())
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => return Err(bad("`target_modules` is missing".into())),
    };
    let mut targets = names
        .iter()
        .map(|n| {
            LoraTarget::parse(n).ok_or_else(|| {
                bad(format!(
                    "target module `{n}` is not one of q_proj, k_proj, v_proj, o_proj, \
                     gate_proj, up_proj, down_proj"
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    targets.sort();
    targets.dedup();
    if targets.is_empty() {
        return Err(bad("`target_modules` is empty".into()));
    }
    let config = LoraConfig {
        rank,
        alpha,
        dropout,
        use_rslora,
        targets,
        base_model_name_or_path: v
            .get("base_model_name_or_path")
            .and_then(Value::as_str)
            .map(str::to_owned),
        seed: 0,
    };
    config.validate().map_err(bad)?;
    Ok(config)
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp: PathBuf = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).map_err(|e| LlamaError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| LlamaError::io(path, e))
}

/// A small deterministic generator (SplitMix64) for the A initialisation.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `x [m, k] @ w^T` for a frozen `w [n, k]`: the same GEMM as `x.matmul(&w.t())`, but the
/// backward returns only the input gradient `g @ w`. candle's matmul backward would also
/// compute and keep a weight-sized gradient for `w^T` even though nothing trains it.
pub struct FrozenMatmul;

fn frozen_matmul_fwd<S: BackendStorage>(
    x: &S,
    lx: &Layout,
    w: &S,
    lw: &Layout,
) -> candle_core::Result<(S, Shape)> {
    let (m, k) = lx.shape().dims2()?;
    let (n, k2) = lw.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("frozen matmul: input [{m}, {k}] does not fit weight [{n}, {k2}]");
    }
    let wt = lw.transpose(0, 1)?;
    let out = x.matmul(w, (1, m, n, k), lx, &wt)?;
    Ok((out, Shape::from((m, n))))
}

/// The CPU forward of [`FrozenMatmul`] (also the base projection of the LoRA training op, so
/// both give the same bits): decode steps, a few rows against contiguous f32 weights, take the
/// skinny kernel; the rest goes to gemm.
pub(crate) fn frozen_matmul_cpu(
    x: &CpuStorage,
    lx: &Layout,
    w: &CpuStorage,
    lw: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    if let (CpuStorage::F32(xs), CpuStorage::F32(ws)) = (x, w) {
        let ((m, k), (n, kw)) = (lx.shape().dims2()?, lw.shape().dims2()?);
        if let (true, Some((x0, x1)), Some((w0, w1))) = (
            m <= crate::skinny::MAX_ROWS && kw == k,
            lx.contiguous_offsets(),
            lw.contiguous_offsets(),
        ) {
            let out = crate::skinny::matmul_t(&xs[x0..x1], m, &ws[w0..w1], n, k);
            return Ok((CpuStorage::F32(out), Shape::from((m, n))));
        }
    }
    frozen_matmul_fwd(x, lx, w, lw)
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        frozen_matmul_cpu(x, lx, w, lw)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        frozen_matmul_fwd(x, lx, w, lw)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None))
    }
}
