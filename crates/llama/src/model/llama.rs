//! The LLaMA decoder: embeddings, N blocks of (RMSNorm, grouped-query attention with RoPE,
//! RMSNorm, SwiGLU MLP), a final RMSNorm and the LM head. Reads like the transformers
//! implementation on purpose, so that logits match it position by position.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Module, Tensor};

use super::blocks::{AdapterRows, Attention, Block, LayerLora, Mlp, RmsNorm, Rotation};
use super::cache::KvCache;
use super::layout::TokenLayout;
use super::linear::Linear;
use crate::device::Quantization;
use crate::error::{LlamaError, Result};
use crate::kernels::bf16_matmul::PackedBf16;
use crate::kernels::quant_rows::{QuantFormat, QuantRows};
use crate::load::config::LlamaConfig;
use crate::load::weights::WeightSource;
use crate::lora::adapter::LoraAdapter;
use crate::lora::config::{LoraConfig, LoraTarget};

/// Which kernels a forward uses. candle's fused RMSNorm, RoPE and last-dim softmax have no
/// backward and silently cut gradients, so training uses our own ops with a backward
/// ([`crate::kernels`]: they also keep far fewer activations alive than the composed forms);
/// inference keeps candle's fused ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Inference,
    Training,
}

/// One sequence of a [`Llama::forward_ragged_last`]: its new tokens and its own (batch 1)
/// cache, which the forward extends.
pub struct RaggedRow<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// A LLaMA-3.x causal language model with frozen weights in one dtype on one device.
#[derive(Debug, Clone)]
pub struct Llama {
    config: LlamaConfig,
    embed_tokens: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    inv_freq: Tensor,
    dtype: DType,
    device: Device,
    quantized: Option<Quantization>,
    adapters: BTreeMap<String, LoraAdapter>,
    active_adapter: Option<String>,
    dropout_seed: Option<u64>,
    /// The type new caches store keys and values in; `None`: the model's dtype.
    kv_storage: Option<DType>,
}

/// The token embedding table: dense, or a GGUF file's blocks (`--quantize gguf`), whose rows
/// are widened as tokens look them up.
#[derive(Debug, Clone)]
enum Embedding {
    Dense(Tensor),
    Stored(Arc<QuantRows>),
}

/// What every decoder layer of one forward shares: the attention bias and the rotations.
pub struct LayerContext {
    bias: Option<Tensor>,
    rot: Rotation,
}

impl Llama {
    pub fn load(
        config: &LlamaConfig,
        weights: &WeightSource,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::load_with(config, weights, dtype, device, &mut |_| Ok(None))
    }

    /// [`Self::load`] for CPU inference with the projections, the embedding and the LM head
    /// that `stored` gives (by Hugging Face name) held only as those blocks (`--quantize
    /// gguf`); the rest is read dense as usual.
    pub(crate) fn load_stored(
        config: &LlamaConfig,
        weights: &WeightSource,
        dtype: DType,
        stored: &mut dyn FnMut(&str) -> Result<Option<QuantRows>>,
    ) -> Result<Self> {
        let mut model = Self::load_with(config, weights, dtype, &Device::Cpu, stored)?;
        model.quantized = Some(Quantization::GgufAsStored);
        Ok(model)
    }

    fn load_with(
        config: &LlamaConfig,
        weights: &WeightSource,
        dtype: DType,
        device: &Device,
        stored: &mut dyn FnMut(&str) -> Result<Option<QuantRows>>,
    ) -> Result<Self> {
        let c = config;
        // A config that says fewer layers than the weights hold would silently drop the rest
        // (and zero layers give blank output): both are refused, naming the file. (config.json
        // is checked where it is read; this also covers GGUF metadata and configs made in code.)
        if c.num_hidden_layers == 0 {
            return Err(LlamaError::Config {
                path: weights.origin().to_path_buf(),
                message: "num_hidden_layers is 0: the model would have no layers".into(),
            });
        }
        let next = format!(
            "model.layers.{}.input_layernorm.weight",
            c.num_hidden_layers
        );
        if weights.contains(&next) {
            return Err(LlamaError::Config {
                path: weights.origin().to_path_buf(),
                message: format!(
                    "the weights hold more layers than num_hidden_layers = {} (there is `{next}`)",
                    c.num_hidden_layers
                ),
            });
        }
        let get = |name: &str, shape: &[usize]| weights.get(name, shape, dtype, device);
        let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
        let (nq, nkv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let norm = |name: &str| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: get(name, &[h])?,
                eps: c.rms_norm_eps,
            })
        };
        // A tensor as its stored blocks, checked against the shape the config implies.
        let mut blocks_of = |name: &str, shape: &[usize]| -> Result<Option<Arc<QuantRows>>> {
            let Some(rows) = stored(name)? else {
                return Ok(None);
            };
            if [rows.rows(), rows.cols()] != shape {
                return Err(LlamaError::Config {
                    path: weights.origin().to_path_buf(),
                    message: format!(
                        "tensor `{name}` has shape [{}, {}], the config implies {shape:?}",
                        rows.rows(),
                        rows.cols()
                    ),
                });
            }
            Ok(Some(Arc::new(rows)))
        };
        let embed_name = "model.embed_tokens.weight";
        let embed_tokens = match blocks_of(embed_name, &[c.vocab_size, h])? {
            Some(rows) => Embedding::Stored(rows),
            None => Embedding::Dense(get(embed_name, &[c.vocab_size, h])?),
        };
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut lin = |name: &str, shape: &[usize]| -> Result<Linear> {
                let name = format!("{p}.{name}.weight");
                Ok(match blocks_of(&name, shape)? {
                    Some(rows) => Linear::stored(rows),
                    None => Linear::new(get(&name, shape)?),
                })
            };
            blocks.push(Block {
                input_layernorm: norm(&format!("{p}.input_layernorm.weight"))?,
                self_attn: Attention {
                    q_proj: lin("self_attn.q_proj", &[nq, h])?,
                    k_proj: lin("self_attn.k_proj", &[nkv, h])?,
                    v_proj: lin("self_attn.v_proj", &[nkv, h])?,
                    o_proj: lin("self_attn.o_proj", &[h, nq])?,
                    n_heads: c.num_attention_heads,
                    n_kv_heads: c.num_key_value_heads,
                    head_dim: hd,
                },
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate_proj: lin("mlp.gate_proj", &[i, h])?,
                    up_proj: lin("mlp.up_proj", &[i, h])?,
                    down_proj: lin("mlp.down_proj", &[h, i])?,
                },
            });
        }
        // Some checkpoints with tied embeddings still ship an lm_head; use it when present.
        let lm_head = if c.tie_word_embeddings && !weights.contains("lm_head.weight") {
            match &embed_tokens {
                Embedding::Dense(table) => Linear::new(table.clone()),
                Embedding::Stored(rows) => Linear::stored(rows.clone()),
            }
        } else {
            match blocks_of("lm_head.weight", &[c.vocab_size, h])? {
                Some(rows) => Linear::stored(rows),
                None => Linear::new(get("lm_head.weight", &[c.vocab_size, h])?),
            }
        };
        let inv_freq = Tensor::new(c.inv_freq(), device)?;
        Ok(Llama {
            config: c.clone(),
            embed_tokens,
            blocks,
            norm: norm("model.norm.weight")?,
            lm_head,
            inv_freq,
            dtype,
            device: device.clone(),
            quantized: None,
            adapters: BTreeMap::new(),
            active_adapter: None,
            dropout_seed: None,
            kv_storage: None,
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Keeps every decoder projection quantised (e.g. Q8_0) for inference: decoding
    /// on a CPU is bound by the bytes of weights read per token. Activations are quantised
    /// too, so logits move slightly; training needs the dense weights and refuses a quantised
    /// model. `BF16` (CPU only) keeps the projections in bf16 for AVX512-BF16's dot products
    /// at every row count, prefill included (the bf16 matmul of [`crate::kernels`]).
    pub fn quantize_for_inference(&mut self, dtype: GgmlDType) -> Result<()> {
        if dtype == GgmlDType::BF16 && !PackedBf16::has_fast_kernel() {
            tracing::warn!(
                "this CPU lacks AVX512-BF16: bf16 projections run a portable loop, slower than f32"
            );
        }
        for b in &mut self.blocks {
            let a = &mut b.self_attn;
            for l in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
                l.quantize(dtype)?;
            }
            for l in [
                &mut b.mlp.gate_proj,
                &mut b.mlp.up_proj,
                &mut b.mlp.down_proj,
            ] {
                l.quantize(dtype)?;
            }
        }
        // The LM head is as many weights as a third of SmolLM2's decoder, and read at every
        // decode step. It is kept in 8 bits under Q8_0 and Q4_0 alike, with the final hidden
        // state rounded to 16 bits per block (kernels/quant_rows.rs): rounding that state to 8
        // bits (candle's integer dot products) flipped near ties between top tokens (SmolLM2's
        // first answer token on "What is the capital of France?" has a 0.08 margin). bf16
        // keeps 8 significant bits of every value.
        match dtype {
            GgmlDType::BF16 => self.lm_head.quantize(dtype)?,
            GgmlDType::Q8_0 | GgmlDType::Q4_0 if self.device.is_cpu() => {
                self.lm_head.quantize_rows(QuantFormat::Int8)?
            }
            _ => {}
        }
        self.quantized = Some(Quantization::Requantize(dtype));
        Ok(())
    }

    /// Freezes every decoder projection in bf16 for LoRA training on the CPU (`--base-dtype
    /// bf16`): the forward and the input gradient of each run through AVX512-BF16's dot
    /// products (bf16 operands, f32 sums), in place of the f32 weights. The embedding, the LM
    /// head, the norms and the adapters stay f32. Merging and exporting then need the model
    /// loaded again.
    pub fn freeze_base_in_bf16(&mut self) -> Result<()> {
        if !PackedBf16::has_fast_kernel() {
            tracing::warn!(
                "this CPU lacks AVX512-BF16: the bf16 base runs a portable loop, much slower than f32"
            );
        }
        for b in &mut self.blocks {
            let a = &mut b.self_attn;
            for l in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj] {
                l.freeze_in_bf16()?;
            }
            for l in [
                &mut b.mlp.gate_proj,
                &mut b.mlp.up_proj,
                &mut b.mlp.down_proj,
            ] {
                l.freeze_in_bf16()?;
            }
        }
        Ok(())
    }

    /// The quantisation of the inference path, if any.
    pub fn quantized(&self) -> Option<Quantization> {
        self.quantized
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Adds a fresh LoRA adapter named `name` (PEFT init: B = 0, so the model's output does
    /// not change until it trains), replacing one of the same name. It is not activated.
    pub fn add_adapter(&mut self, name: &str, config: &LoraConfig) -> Result<&LoraAdapter> {
        let adapter = LoraAdapter::new(&self.config, config, &self.device)?;
        Ok(self.insert_adapter(name, adapter))
    }

    /// Loads a LoRA adapter as `name`: a PEFT folder (`adapter_config.json`,
    /// `adapter_model.safetensors`) or a llama.cpp LoRA GGUF file (`*.gguf`); errors name the
    /// file and tensor that do not fit this model.
    pub fn load_adapter(&mut self, name: &str, dir: &Path) -> Result<&LoraAdapter> {
        let adapter = LoraAdapter::open(&self.config, dir, &self.device)?;
        Ok(self.insert_adapter(name, adapter))
    }

    fn insert_adapter(&mut self, name: &str, adapter: LoraAdapter) -> &LoraAdapter {
        self.adapters.insert(name.to_owned(), adapter);
        &self.adapters[name]
    }

    /// Writes adapter `name` in PEFT layout into `dir` (atomically, file by file).
    pub fn save_adapter(&self, name: &str, dir: &Path) -> Result<()> {
        self.adapter_or_err(name)?.save(dir)
    }

    pub fn adapter(&self, name: &str) -> Option<&LoraAdapter> {
        self.adapters.get(name)
    }

    /// Sets the input dropout of adapter `name` (see [`LoraAdapter::set_dropout`]).
    pub fn set_adapter_dropout(&mut self, name: &str, dropout: f32) -> Result<()> {
        self.adapter_or_err(name)?;
        self.adapters
            .get_mut(name)
            .expect("checked above")
            .set_dropout(dropout)
    }

    fn adapter_or_err(&self, name: &str) -> Result<&LoraAdapter> {
        self.adapters.get(name).ok_or_else(|| {
            LlamaError::Adapter(format!(
                "no adapter named `{name}` (loaded: {:?})",
                self.adapters.keys().collect::<Vec<_>>()
            ))
        })
    }

    /// The names of the loaded adapters, sorted.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.keys().map(String::as_str).collect()
    }

    /// Drops adapter `name` (deactivating it if it was active).
    pub fn remove_adapter(&mut self, name: &str) -> Option<LoraAdapter> {
        if self.active_adapter.as_deref() == Some(name) {
            self.active_adapter = None;
        }
        self.adapters.remove(name)
    }

    /// Chooses the adapter that the following forwards apply; `None` gives the base model's
    /// logits without unloading anything.
    pub fn set_active_adapter(&mut self, name: Option<&str>) -> Result<()> {
        if let Some(n) = name {
            self.adapter_or_err(n)?;
        }
        self.active_adapter = name.map(str::to_owned);
        Ok(())
    }

    pub fn active_adapter(&self) -> Option<&str> {
        self.active_adapter.as_deref()
    }

    /// Folds adapter `name` into the base weights, `W += scale * B @ A` computed in f32, and
    /// drops the adapter: the model then gives the adapted logits with no adapter active.
    pub fn merge_adapter(&mut self, name: &str) -> Result<()> {
        let adapter = self.adapter_or_err(name)?.clone();
        for (l, block) in self.blocks.iter_mut().enumerate() {
            for t in LoraTarget::ALL {
                let Some(delta) = adapter.delta(l, t)? else {
                    continue;
                };
                let lin = match t {
                    LoraTarget::Q => &mut block.self_attn.q_proj,
                    LoraTarget::K => &mut block.self_attn.k_proj,
                    LoraTarget::V => &mut block.self_attn.v_proj,
                    LoraTarget::O => &mut block.self_attn.o_proj,
                    LoraTarget::Gate => &mut block.mlp.gate_proj,
                    LoraTarget::Up => &mut block.mlp.up_proj,
                    LoraTarget::Down => &mut block.mlp.down_proj,
                };
                let merged = (lin.weight()?.to_dtype(DType::F32)? + delta)?.to_dtype(self.dtype)?;
                lin.set_weight(merged);
                if let Some(Quantization::Requantize(q)) = self.quantized {
                    lin.quantize(q)?;
                }
            }
        }
        self.remove_adapter(name);
        Ok(())
    }

    pub fn new_cache(&self, batch: usize) -> KvCache {
        KvCache::with_storage(self.config.num_hidden_layers, batch, self.kv_storage)
    }

    /// Stores the keys and values of caches made from now on as `dtype` (f16: half the bytes a
    /// decode step's attention reads, each value rounded once as it is stored; the attention
    /// itself still computes in f32). `None` or the model's own dtype: as computed. Only f16
    /// is offered beside the model's dtype: it keeps 11 significant bits where bf16 keeps 8,
    /// and keys and values of LLaMA models stay well inside its range.
    pub fn set_kv_cache_storage(&mut self, dtype: Option<DType>) -> Result<()> {
        match dtype {
            Some(d) if d == self.dtype => self.kv_storage = None,
            None => self.kv_storage = None,
            Some(DType::F16) if self.dtype == DType::F32 => self.kv_storage = Some(DType::F16),
            Some(d) => {
                return Err(LlamaError::Unsupported(format!(
                    "a KV cache stored as {} for a {} model: only f16 for an f32 model is offered",
                    d.as_str(),
                    self.dtype.as_str()
                )))
            }
        }
        Ok(())
    }

    /// The type caches store keys and values in, if not the model's.
    pub fn kv_cache_storage(&self) -> Option<DType> {
        self.kv_storage
    }

    /// Token embeddings `[batch, time, hidden]` of `input_ids` (u32 `[batch, time]`).
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ids = input_ids.flatten_all()?;
        if let Ok(max) = ids.max(0)?.to_scalar::<u32>() {
            if max as usize >= self.config.vocab_size {
                return Err(LlamaError::Shape(format!(
                    "token id {max} is outside the vocabulary of {}",
                    self.config.vocab_size
                )));
            }
        }
        let rows = match &self.embed_tokens {
            Embedding::Dense(table) => table.index_select(&ids, 0)?,
            Embedding::Stored(table) => {
                let h = table.cols();
                let ids = ids.to_vec1::<u32>()?;
                let mut values = vec![0f32; ids.len() * h];
                for (id, row) in ids.iter().zip(values.chunks_exact_mut(h.max(1))) {
                    table.dequantize_rows(*id as usize, 1, row);
                }
                Tensor::from_vec(values, (ids.len(), h), &self.device)?.to_dtype(self.dtype)?
            }
        };
        Ok(rows.reshape((b, t, ()))?)
    }

    /// Final hidden states (after the last RMSNorm) `[batch, time, hidden]` for `input_ids`.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        layout: &TokenLayout,
        cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        let x = self.embed(input_ids)?;
        self.forward_embeddings(&x, layout, cache, mode)
    }

    /// As `forward_hidden`, from embeddings: callers may inject their own input (e.g. a
    /// trainable tensor, to check that gradients reach the first layer).
    pub fn forward_embeddings(
        &self,
        x: &Tensor,
        layout: &TokenLayout,
        mut cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        layout.check(b, t)?;
        if mode == Mode::Training && self.quantized.is_some() {
            return Err(LlamaError::Shape(
                "a model quantised for inference cannot run a training forward".into(),
            ));
        }
        if let Some(c) = cache.as_deref() {
            if c.batch() != b {
                return Err(LlamaError::Shape(format!(
                    "cache batch {} != input batch {b}",
                    c.batch()
                )));
            }
            if layout.segments.is_some() && !c.is_empty() {
                return Err(LlamaError::Shape(
                    "packed sequences cannot continue a KV cache".into(),
                ));
            }
        }
        let no_cache: Vec<Vec<bool>> = vec![vec![]; b];
        let cached_valid = cache.as_deref().map_or(&no_cache[..], |c| c.valid());
        let ctx = LayerContext {
            bias: layout.attention_bias(cached_valid, &self.device)?,
            rot: Rotation::new(&self.inv_freq, layout, self.dtype)?,
        };
        let mut x = x.clone();
        for l in 0..self.blocks.len() {
            x = self.block_forward(l, &x, &ctx, cache.as_deref_mut(), mode)?;
        }
        if let Some(c) = cache {
            c.commit(&layout.valid, &layout.positions);
        }
        self.norm.forward(&x, mode)
    }

    fn block_forward(
        &self,
        l: usize,
        x: &Tensor,
        ctx: &LayerContext,
        cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        let block = &self.blocks[l];
        let lora = LayerLora {
            adapter: self.active_adapter.as_ref().map(|n| &self.adapters[n]),
            layer: l,
            dropout_seed: self.dropout_seed,
            groups: &[],
        };
        let h = block.input_layernorm.forward(x, mode)?;
        let h = block.self_attn.forward(
            &h,
            &ctx.rot,
            ctx.bias.as_ref(),
            cache.map(|c| (c, l)),
            lora,
            mode,
        )?;
        let x1 = (x + h)?;
        let h = block.post_attention_layernorm.forward(&x1, mode)?;
        Ok((&x1 + block.mlp.forward(&h, lora, mode)?)?)
    }

    /// The shared inputs of [`Self::forward_layer`] for a forward over `layout` without a
    /// cache: with these, a caller can run the decoder one layer at a time (gradient
    /// checkpointing keeps only each layer's input and recomputes the layer in the backward).
    pub fn layer_context(&self, layout: &TokenLayout) -> Result<LayerContext> {
        let no_cache: Vec<Vec<bool>> = vec![vec![]; layout.valid.len()];
        Ok(LayerContext {
            bias: layout.attention_bias(&no_cache, &self.device)?,
            rot: Rotation::new(&self.inv_freq, layout, self.dtype)?,
        })
    }

    /// Decoder layer `layer` on hidden states `[batch, time, hidden]`. Running every layer in
    /// turn on [`Self::embed`]'s output and then [`Self::final_norm`] is `forward_hidden`.
    pub fn forward_layer(
        &self,
        layer: usize,
        x: &Tensor,
        ctx: &LayerContext,
        mode: Mode,
    ) -> Result<Tensor> {
        if layer >= self.blocks.len() {
            return Err(LlamaError::Shape(format!(
                "layer {layer} of a {}-layer model",
                self.blocks.len()
            )));
        }
        if mode == Mode::Training && self.quantized.is_some() {
            return Err(LlamaError::Shape(
                "a model quantised for inference cannot run a training forward".into(),
            ));
        }
        self.block_forward(layer, x, ctx, None, mode)
    }

    /// The final RMSNorm, whose output goes to the LM head.
    pub fn final_norm(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.norm.forward(x, mode)
    }

    pub fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    /// Makes the dropout masks of the following training forwards a function of `seed` (and
    /// of layer and projection), so that a forward can be repeated exactly: by gradient
    /// checkpointing's recomputation, or by a resumed run. `None`: the device's generator.
    pub fn set_dropout_seed(&mut self, seed: Option<u64>) {
        self.dropout_seed = seed;
    }

    /// Logits `[.., vocab]` for hidden states `[.., hidden]`, in f32 (f64 for an f64 model).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.lm_head.forward(hidden)?;
        Ok(match logits.dtype() {
            DType::F64 => logits,
            _ => logits.to_dtype(DType::F32)?,
        })
    }

    /// The next-token loss `-log p(target)` of each row of hidden states `[rows, hidden]`
    /// (after the final norm): `[rows]` in f32 (f64 for an f64 model). Through the LM head and
    /// the softmax in one op, so the rows' logits are never kept for a backward.
    pub fn token_nll(&self, hidden: &Tensor, targets: &[u32]) -> Result<Tensor> {
        Ok(crate::kernels::linear_cross_entropy(
            hidden,
            self.lm_head.weight()?,
            targets,
        )?)
    }

    /// Logits at every position `[batch, time, vocab]` (training, evaluation).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        layout: &TokenLayout,
        cache: Option<&mut KvCache>,
        mode: Mode,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(input_ids, layout, cache, mode)?;
        self.logits(&h)
    }

    /// Logits of each row's last column `[batch, vocab]` (generation; rows are left-padded so
    /// the last column is always a real token). Only that column goes through the LM head.
    pub fn forward_last(
        &self,
        input_ids: &Tensor,
        layout: &TokenLayout,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(input_ids, layout, cache, Mode::Inference)?;
        let t = h.dim(1)?;
        self.logits(&h.narrow(1, t - 1, 1)?.squeeze(1)?)
    }

    /// Logits after the last new token of each row, `[rows, vocab]`: several sequences' new
    /// tokens (any number each) in one forward without padding them to a common shape.
    ///
    /// The projections and the MLP see every new token of every row stacked into one matrix,
    /// so the weights are read once per forward however many sequences ride along (what makes
    /// batched decoding pay on a CPU). Attention runs per sequence against its own cache, so
    /// sequences of different lengths are never padded to the longest, and a cache is never
    /// merged into or split out of a batched one. Each row gets what it would get alone, up to
    /// the summation order of the stacked projections. Inference only.
    pub fn forward_ragged_last(&self, rows: &mut [RaggedRow<'_>]) -> Result<Tensor> {
        let active = self.active_adapter.as_deref();
        self.forward_ragged_mixed(rows, &vec![active; rows.len()])
    }

    /// [`Self::forward_ragged_last`] with each sequence's own adapter (`None`: the base
    /// model), whatever adapter is active: the frozen projections run once over every
    /// sequence's tokens, and each adapter adds its product to its own sequences' rows. Each
    /// sequence gets the logits it gets alone with its adapter active.
    pub fn forward_ragged_mixed(
        &self,
        rows: &mut [RaggedRow<'_>],
        adapters: &[Option<&str>],
    ) -> Result<Tensor> {
        use rayon::prelude::*;
        if rows.is_empty() {
            return Err(LlamaError::Shape("a ragged forward of no sequences".into()));
        }
        if adapters.len() != rows.len() {
            return Err(LlamaError::Shape(format!(
                "ragged forward: {} adapters for {} sequences",
                adapters.len(),
                rows.len()
            )));
        }
        let mut named = Vec::with_capacity(adapters.len());
        for name in adapters {
            named.push(match name {
                None => None,
                Some(n) => Some(self.adapters.get(*n).ok_or_else(|| {
                    LlamaError::Shape(format!("no adapter named `{n}` is loaded"))
                })?),
            });
        }
        let mut layouts = Vec::with_capacity(rows.len());
        let mut contexts = Vec::with_capacity(rows.len());
        let mut ids = Vec::new();
        let mut spans = Vec::with_capacity(rows.len());
        for (i, r) in rows.iter().enumerate() {
            if r.tokens.is_empty() {
                return Err(LlamaError::Shape(format!(
                    "ragged forward: sequence {i} has no new tokens"
                )));
            }
            if r.cache.batch() != 1 || r.cache.num_layers() != self.blocks.len() {
                return Err(LlamaError::Shape(format!(
                    "ragged forward: sequence {i} needs a batch-1 cache of {} layers, got batch {} of {}",
                    self.blocks.len(),
                    r.cache.batch(),
                    r.cache.num_layers()
                )));
            }
            let layout = TokenLayout::contiguous(1, r.tokens.len(), r.cache.next_positions()[0]);
            contexts.push(LayerContext {
                bias: layout.attention_bias(r.cache.valid(), &self.device)?,
                rot: Rotation::new(&self.inv_freq, &layout, self.dtype)?,
            });
            layouts.push(layout);
            spans.push((ids.len(), r.tokens.len()));
            ids.extend_from_slice(r.tokens);
        }
        let total = ids.len();
        // One adapter for all (or none): the plain path. Several: the token rows of each.
        let mixed = named.iter().any(|a| !same_adapter(*a, named[0]));
        let mut groups: Vec<AdapterRows<'_>> = Vec::new();
        if mixed {
            let mut by_adapter: Vec<(&LoraAdapter, Vec<u32>)> = Vec::new();
            for (adapter, &(start, len)) in named.iter().zip(&spans) {
                let Some(adapter) = adapter else { continue };
                let token_rows = (start as u32)..((start + len) as u32);
                match by_adapter
                    .iter_mut()
                    .find(|(a, _)| std::ptr::eq(*a, *adapter))
                {
                    Some((_, r)) => r.extend(token_rows),
                    None => by_adapter.push((adapter, token_rows.collect())),
                }
            }
            for (adapter, r) in by_adapter {
                let n = r.len();
                groups.push(AdapterRows {
                    adapter,
                    rows: Tensor::from_vec(r, n, &self.device)?,
                });
            }
        }
        let mut x = self.embed(&Tensor::from_vec(ids, (1, total), &self.device)?)?;
        let mode = Mode::Inference;
        for (l, block) in self.blocks.iter().enumerate() {
            let lora = LayerLora {
                adapter: if mixed { None } else { named[0] },
                layer: l,
                dropout_seed: None,
                groups: &groups,
            };
            let h = block.input_layernorm.forward(&x, mode)?;
            let attn = &block.self_attn;
            let (q, k, v) = attn.project(&h, lora, mode)?;
            // Sequences are independent here: each attends over its own cache.
            let outs = rows
                .par_iter_mut()
                .zip(contexts.par_iter())
                .zip(spans.par_iter())
                .map(|((r, ctx), &(start, len))| {
                    attn.attend(
                        &q.narrow(1, start, len)?,
                        &k.narrow(1, start, len)?,
                        &v.narrow(1, start, len)?,
                        &ctx.rot,
                        ctx.bias.as_ref(),
                        Some((&mut *r.cache, l)),
                        mode,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let out = Tensor::cat(&outs, 1)?;
            let h = lora.apply(&attn.o_proj, &out, LoraTarget::O, mode)?;
            let x1 = (&x + h)?;
            let h = block.post_attention_layernorm.forward(&x1, mode)?;
            x = (&x1 + block.mlp.forward(&h, lora, mode)?)?;
        }
        for (r, layout) in rows.iter_mut().zip(&layouts) {
            r.cache.commit(&layout.valid, &layout.positions);
        }
        let last: Vec<u32> = spans.iter().map(|&(s, n)| (s + n - 1) as u32).collect();
        let last = Tensor::new(last.as_slice(), &self.device)?;
        let h = x.squeeze(0)?.index_select(&last, 0)?.unsqueeze(0)?;
        self.logits(&self.norm.forward(&h, mode)?.squeeze(0)?)
    }
}

/// Whether two sequences of a ragged forward use the same adapter (the same loaded one, or
/// both none).
fn same_adapter(a: Option<&LoraAdapter>, b: Option<&LoraAdapter>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => std::ptr::eq(a, b),
        _ => false,
    }
}
