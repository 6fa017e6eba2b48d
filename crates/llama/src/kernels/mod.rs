//! Hand-written CPU kernels: the training forward's fused ops with their backward, the decode
//! step's skinny matmuls and attention, bf16 dot products and reproducible dropout masks.
//!
//! This module is public on purpose, so that the training ops can be tested against the
//! composed candle ops they replace and reused by code that builds its own forward; the
//! decode-only kernels stay private to the crate.
//!
//! # Training ops
//!
//! The training forward's fused kernels, each a candle custom op with its own backward.
//!
//! candle's fused RMSNorm, RoPE and last-dim softmax have no backward, and the composed,
//! differentiable forms keep every intermediate alive until the backward (candle's graph holds
//! each op's inputs): the attention softmax alone kept about six `[batch, heads, time, keys]`
//! tensors per layer. These ops keep only what their backward needs, which their callers keep
//! anyway:
//!
//! - [`attention_probs`]: `softmax(q k^T * scale + bias)` over the last dim, the `q k^T` product
//!   included, so that the scores are never stored: only the probabilities (the output, which
//!   the following `probs @ v` keeps) and `q`, `k`. Backward:
//!   `ds = scale * y * (g - sum(g * y))`, `dq = ds k`, `dk = ds^T q`.
//! - [`tiled_attention`]: the whole of `softmax(q k^T * scale + bias) v`, a block of query rows
//!   at a time against only the keys it may see, storing two numbers per query row; the
//!   backward recomputes the probabilities block by block. What the training forward runs in f32.
//! - [`linear_cross_entropy`]: the LM head and the token loss, `-log softmax(x W^T)[target]`,
//!   a block of rows at a time: no `[tokens, vocab]` tensor; the gradient of `x` is computed
//!   with each block's logits in the forward, and the backward only scales it.
//! - [`rms_norm`]: transformers' RMSNorm with a frozen weight; keeps its input only (the
//!   residual stream, alive anyway). Backward to the input only: no weight gradient.
//! - [`rope`]: rotate-half RoPE; keeps nothing but the shared cos/sin tables. Backward: the
//!   gradient rotated back.
//! - [`silu_mul`]: `silu(gate) * up`, keeping only its inputs. Backward to both.
//! - [`dropout_matmul`]: LoRA's `dropout(x) A^T` with a seeded mask that the backward draws
//!   again, so neither the mask nor the dropped input is stored.
//! - [`lora_linear`]: the frozen projection plus LoRA's up projection, `x W^T + scale h B^T`,
//!   without storing the base output or the adapter's unscaled and scaled outputs.
//!   With `--base-dtype bf16` the frozen weight is a pair of bf16 packs (`bf16_base`): the
//!   forward and the input gradient as AVX512-BF16 products with f32 sums.
//!
//! Backwards return detached gradients: candle stores a `Var`'s gradient as returned, and one
//! that carried its graph would keep that graph's tensors alive with it.
//!
//! The forwards are hand-written loops (f32, f64, bf16 and f16) on the CPU that round
//! exactly as the composed candle ops they replace (same operations in the same order and
//! precision, f32 for half types where the composed code upcasts), so the logits of a training
//! forward do not move. Backwards are tensor ops, so they run wherever those run. On other
//! devices the functions fall back to the composed ops (no CUDA kernels yet).

mod attention;
pub(crate) mod bf16_base;
pub(crate) mod bf16_matmul;
mod cpu;
mod cross_entropy;
pub(crate) mod decode_attention;
pub(crate) mod dropout;
pub(crate) mod fused_rows;
mod lora_matmul;
pub(crate) mod lora_rows;
mod norm_rope;
pub(crate) mod quant_rows;
mod rows;
pub(crate) mod skinny;
mod swiglu;
mod tiled_attention;

pub use attention::attention_probs;
pub use cross_entropy::linear_cross_entropy;
pub use dropout::{apply_dropout, dropout_mask, mix_seed, seeded_dropout};
pub(crate) use lora_matmul::lora_linear_bf16;
pub use lora_matmul::{dropout_matmul, lora_linear, FrozenMatmul};
pub use norm_rope::{rms_norm, rope};
pub use swiglu::silu_mul;
pub use tiled_attention::{tiled_attention, QUERY_BLOCK};
