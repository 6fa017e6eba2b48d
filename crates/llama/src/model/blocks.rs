//! The parts of a decoder layer: RMSNorm, RoPE rotations, grouped-query attention, the SwiGLU
//! MLP, and the adapter each layer's projections apply.

use candle_core::{DType, Tensor, D};
use candle_nn::ops;

use super::cache::KvCache;
use super::layout::TokenLayout;
use super::linear::Linear;
use super::llama::Mode;
use crate::error::Result;
use crate::kernels as train_ops;
use crate::kernels::decode_attention;
use crate::kernels::dropout::mix_seed;
use crate::lora::adapter::{ActiveLora, LoraAdapter};
use crate::lora::config::LoraTarget;

/// The adapter of one layer, if any, and the seed its dropout masks derive from. In a
/// forward whose sequences use different adapters, `groups` says which token rows take which
/// one (and `adapter` is unused).
#[derive(Clone, Copy)]
pub(super) struct LayerLora<'a> {
    pub(super) adapter: Option<&'a LoraAdapter>,
    pub(super) layer: usize,
    pub(super) dropout_seed: Option<u64>,
    pub(super) groups: &'a [AdapterRows<'a>],
}

/// The token rows (u32 indices into the stacked `[1, tokens, features]` input) of the
/// sequences that use `adapter`, in an inference forward of mixed adapters.
pub(super) struct AdapterRows<'a> {
    pub(super) adapter: &'a LoraAdapter,
    pub(super) rows: Tensor,
}

impl<'a> LayerLora<'a> {
    /// `linear`'s output for `x`, with this layer's adapter (or each row group's) on it.
    pub(super) fn apply(
        &self,
        linear: &Linear,
        x: &Tensor,
        target: LoraTarget,
        mode: Mode,
    ) -> Result<Tensor> {
        if self.groups.is_empty() {
            return linear.forward_lora(x, self.get(target), mode);
        }
        linear.forward_lora_rows(x, &self.groups_of(target))
    }

    /// [`Self::apply`] for projections that read the same `x`: at inference, their base
    /// products in one pass when they can share it ([`Linear::forward_group`]), each adapter
    /// added after as [`Self::apply`] adds it.
    pub(super) fn apply_group<const N: usize>(
        &self,
        projections: [(&Linear, LoraTarget); N],
        x: &Tensor,
        mode: Mode,
    ) -> Result<[Tensor; N]> {
        let fused = match mode {
            Mode::Inference => Linear::forward_group(projections.map(|p| p.0), x)?,
            Mode::Training => None,
        };
        let Some(ys) = fused else {
            let mut out = Vec::with_capacity(N);
            for (linear, target) in projections {
                out.push(self.apply(linear, x, target, mode)?);
            }
            return Ok(out.try_into().expect("one output per projection"));
        };
        let mut out = Vec::with_capacity(N);
        for ((linear, target), y) in projections.into_iter().zip(ys) {
            out.push(if self.groups.is_empty() {
                linear.add_lora(x, y, self.get(target), mode)?
            } else {
                linear.add_lora_groups(x, y, &self.groups_of(target))?
            });
        }
        Ok(out.try_into().expect("one output per projection"))
    }

    /// Each row group's adapter for `target`, with its rows.
    fn groups_of(&self, target: LoraTarget) -> Vec<(ActiveLora<'a>, &'a Tensor)> {
        self.groups
            .iter()
            .filter_map(|g| Some((g.adapter.active(self.layer, target)?, &g.rows)))
            .collect()
    }

    pub(super) fn get(&self, t: LoraTarget) -> Option<ActiveLora<'a>> {
        let mut active = self.adapter.and_then(|a| a.active(self.layer, t))?;
        active.dropout_seed = self
            .dropout_seed
            .map(|s| mix_seed(&[s, self.layer as u64, t as u64]));
        Some(active)
    }
}

#[derive(Debug, Clone)]
pub(super) struct RmsNorm {
    pub(super) weight: Tensor,
    pub(super) eps: f64,
}

impl RmsNorm {
    pub(super) fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        match mode {
            Mode::Inference if x.is_contiguous() => {
                return Ok(ops::rms_norm(x, &self.weight, self.eps as f32)?)
            }
            Mode::Training => return Ok(train_ops::rms_norm(x, &self.weight, self.eps)?),
            Mode::Inference => {}
        }
        // As transformers: normalise in (at least) f32, cast back, then scale.
        let dtype = x.dtype();
        let xf = match dtype {
            DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
            _ => x.clone(),
        };
        let var = xf.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = xf
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .to_dtype(dtype)?;
        Ok(normed.broadcast_mul(&self.weight)?)
    }
}

/// cos/sin of every token's rotation angles, `[batch, time, head_dim/2]`, shared by all layers.
pub(super) struct Rotation {
    cos: Tensor,
    sin: Tensor,
}

impl Rotation {
    pub(super) fn new(inv_freq: &Tensor, layout: &TokenLayout, dtype: DType) -> Result<Self> {
        let device = inv_freq.device();
        let pos = layout.positions_tensor(device)?.to_dtype(DType::F32)?;
        let angles = pos
            .unsqueeze(D::Minus1)?
            .broadcast_mul(&inv_freq.reshape((1, 1, ()))?)?;
        Ok(Rotation {
            cos: angles.cos()?.to_dtype(dtype)?.contiguous()?,
            sin: angles.sin()?.to_dtype(dtype)?.contiguous()?,
        })
    }

    /// Rotate-half RoPE on `[batch, heads, time, head_dim]`.
    pub(super) fn apply(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if mode == Mode::Inference {
            return Ok(candle_nn::rotary_emb::rope(
                &x.contiguous()?,
                &self.cos,
                &self.sin,
            )?);
        }
        Ok(train_ops::rope(x, &self.cos, &self.sin)?)
    }
}

#[derive(Debug, Clone)]
pub(super) struct Attention {
    pub(super) q_proj: Linear,
    pub(super) k_proj: Linear,
    pub(super) v_proj: Linear,
    pub(super) o_proj: Linear,
    pub(super) n_heads: usize,
    pub(super) n_kv_heads: usize,
    pub(super) head_dim: usize,
}

impl Attention {
    pub(super) fn forward(
        &self,
        x: &Tensor,
        rot: &Rotation,
        bias: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
        lora: LayerLora<'_>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (q, k, v) = self.project(x, lora, mode)?;
        let out = self.attend(&q, &k, &v, rot, bias, cache, mode)?;
        lora.apply(&self.o_proj, &out, LoraTarget::O, mode)
    }

    /// The query, key and value projections `[batch, time, heads * head_dim]` of `x`.
    pub(super) fn project(
        &self,
        x: &Tensor,
        lora: LayerLora<'_>,
        mode: Mode,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let [q, k, v] = lora.apply_group(
            [
                (&self.q_proj, LoraTarget::Q),
                (&self.k_proj, LoraTarget::K),
                (&self.v_proj, LoraTarget::V),
            ],
            x,
            mode,
        )?;
        Ok((q, k, v))
    }

    /// Attention of projected `q`, `k`, `v` (`[batch, time, heads * head_dim]`): RoPE, the
    /// cache, and the weighted values `[batch, time, n_heads * head_dim]` before `o_proj`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        rot: &Rotation,
        bias: Option<&Tensor>,
        cache: Option<(&mut KvCache, usize)>,
        mode: Mode,
    ) -> Result<Tensor> {
        let (b, t, _) = q.dims3()?;
        let heads = |y: &Tensor, n: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, n, self.head_dim))?.transpose(1, 2)?)
        };
        let q = heads(q, self.n_heads)?;
        let k = heads(k, self.n_kv_heads)?;
        let v = heads(v, self.n_kv_heads)?.contiguous()?;
        let q = rot.apply(&q, mode)?;
        let k = rot.apply(&k, mode)?;
        let (k, v) = match cache {
            Some((cache, layer)) => cache.append(layer, &k.contiguous()?, &v)?,
            None => (k, v),
        };
        // Grouped-query attention without copying K/V per query head: the n_rep query heads
        // that share a KV head are stacked along time, so one matmul serves the whole group.
        let n_rep = self.n_heads / self.n_kv_heads;
        let s = k.dim(2)?;
        let q = q
            .contiguous()?
            .reshape((b, self.n_kv_heads, n_rep * t, self.head_dim))?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let decode_step = mode == Mode::Inference
            && q.device().is_cpu()
            && q.dtype() == DType::F32
            && n_rep * t <= decode_attention::MAX_QUERY_ROWS;
        // The weighted values `[b, n_kv_heads, n_rep * t, head_dim]`.
        // A decode step reads an f16 cache as stored (widening each chunk as it goes); the
        // other paths take keys and values in the queries' type.
        let (k, v) = if decode_step || k.dtype() == q.dtype() {
            (k, v)
        } else {
            (k.to_dtype(q.dtype())?, v.to_dtype(q.dtype())?)
        };
        let out = if decode_step {
            decode_attention::attention(&q, &k, &v, bias, scale)?
        } else if mode == Mode::Training || (q.device().is_cpu() && q.dtype() == DType::F32) {
            // One op from q, k, v to the weighted values: neither the scores nor the
            // probabilities are stored for the backward. A prompt's prefill on the CPU takes
            // it too: the composed form below makes `[heads, rows, keys]` scores and
            // probabilities (fresh pages, zero-filled, then a libm `exp` per score), which
            // cost an evaluation a fifth of its time once the projections ran on AMX.
            train_ops::tiled_attention(&q, &k, &v, bias, scale)?
        } else {
            let scores = (q.matmul(&k.t()?)? * scale)?;
            // Softmax in f32 at least, as transformers does for half-precision models.
            let scores = match scores.dtype() {
                DType::F16 | DType::BF16 => scores.to_dtype(DType::F32)?,
                _ => scores,
            };
            let scores = match bias {
                Some(bias) => scores
                    .reshape((b, self.n_kv_heads, n_rep, t, s))?
                    .broadcast_add(&bias.to_dtype(scores.dtype())?.unsqueeze(2)?)?
                    .reshape((b, self.n_kv_heads, n_rep * t, s))?,
                None => scores,
            };
            ops::softmax_last_dim(&scores)?
                .to_dtype(v.dtype())?
                .matmul(&v)?
        };
        Ok(out
            .reshape((b, self.n_heads, t, self.head_dim))?
            .transpose(1, 2)?
            .reshape((b, t, self.n_heads * self.head_dim))?)
    }
}

#[derive(Debug, Clone)]
pub(super) struct Mlp {
    pub(super) gate_proj: Linear,
    pub(super) up_proj: Linear,
    pub(super) down_proj: Linear,
}

impl Mlp {
    pub(super) fn forward(&self, x: &Tensor, lora: LayerLora<'_>, mode: Mode) -> Result<Tensor> {
        let [gate, up] = lora.apply_group(
            [
                (&self.gate_proj, LoraTarget::Gate),
                (&self.up_proj, LoraTarget::Up),
            ],
            x,
            mode,
        )?;
        // One fused pass in both modes: the same rounding as candle's silu then `*`, without
        // the intermediate tensor (inference) or storing it for the backward (training).
        let gated = train_ops::silu_mul(&gate, &up)?;
        lora.apply(&self.down_proj, &gated, LoraTarget::Down, mode)
    }
}

#[derive(Debug, Clone)]
pub(super) struct Block {
    pub(super) input_layernorm: RmsNorm,
    pub(super) self_attn: Attention,
    pub(super) post_attention_layernorm: RmsNorm,
    pub(super) mlp: Mlp,
}
