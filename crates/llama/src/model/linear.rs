//! The decoder's projections: [`Linear`] and its weight backends (dense through the frozen
//! matmul, quantised, packed bf16, or frozen in bf16 for training), with a LoRA adapter on top
//! when one is active.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Shape, Storage, Tensor, D};
use candle_nn::ops;

use super::llama::Mode;
use crate::error::{LlamaError, Result};
use crate::kernels::bf16_base::{Bf16Base, Bf16FrozenMatmul};
use crate::kernels::bf16_matmul::PackedBf16;
use crate::kernels::dropout::seeded_dropout;
use crate::kernels::fused_rows::{self, GroupWeight};
use crate::kernels::lora_rows::{add_lora_rows, RowGroup};
use crate::kernels::quant_rows::{QuantFormat, QuantRows};
use crate::kernels::skinny;
use crate::kernels::{self as train_ops, FrozenMatmul};
use crate::lora::adapter::ActiveLora;

/// Up to this many input rows a quantised projection uses its quantised weight.
const QUANTIZED_MAX_ROWS: usize = 16;

/// A frozen projection `y = x W^T` (no bias in Llama-3.x): dense, or (inference only) with
/// the weight kept quantised so that decoding reads a quarter or an eighth of the bytes, or
/// kept in bf16 for the CPU's bf16 dot products, or held only as a GGUF file's blocks.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `None` when the weight is held only as a file's blocks (`quant_rows`).
    weight: Option<Tensor>,
    /// Quantised for the decode steps on the CPU: 8 or 4-bit weights, activations rounded to
    /// 16 bits. Without a dense weight, every row count goes through it.
    quant_rows: Option<Arc<QuantRows>>,
    /// Quantised off the CPU (candle's kernels: activations quantised too).
    quantized: Option<QMatMul>,
    bf16: Option<Arc<PackedBf16>>,
    /// The frozen base of training in bf16 (`--base-dtype bf16`): forward and input gradient
    /// through bf16 products, in place of the dense weight.
    bf16_base: Option<Arc<Bf16Base>>,
}

impl Linear {
    pub fn new(weight: Tensor) -> Self {
        Linear {
            weight: Some(weight),
            quant_rows: None,
            quantized: None,
            bf16: None,
            bf16_base: None,
        }
    }

    /// A projection held only as a file's blocks (`--quantize gguf`, CPU inference): no dense
    /// copy, so the weight takes the file's memory.
    pub(crate) fn stored(rows: Arc<QuantRows>) -> Self {
        Linear {
            weight: None,
            quant_rows: Some(rows),
            quantized: None,
            bf16: None,
            bf16_base: None,
        }
    }

    /// The dense weight `[out, in]` (for training, merges and exports); an error, naming the
    /// flag, for a projection held only as a file's blocks or frozen in bf16 for training.
    pub fn weight(&self) -> Result<&Tensor> {
        if let Some(w) = &self.weight {
            return Ok(w);
        }
        Err(if self.bf16_base.is_some() {
            LlamaError::Config {
                path: "--base-dtype bf16".into(),
                message: "the model holds its frozen projections in bf16 for training; merging \
                          and exporting need the dense weights (load the model again)"
                    .into(),
            }
        } else {
            LlamaError::File {
                path: "--quantize gguf".into(),
                message: "the model holds its weights as the GGUF file's blocks; training, \
                          merging and exporting need the dense weights (load it without \
                          --quantize)"
                    .into(),
            }
        })
    }

    /// Freezes the projection in bf16 for training on the CPU: the dense weight is replaced by
    /// its two bf16 packs (forward and input gradient), the same bytes as the f32 weight.
    pub(super) fn freeze_in_bf16(&mut self) -> Result<()> {
        if self.bf16_base.is_some() {
            return Ok(());
        }
        let w = self.weight()?;
        if !w.device().is_cpu() {
            return Err(LlamaError::Config {
                path: "--base-dtype".into(),
                message: "bf16 is the CPU's bf16 dot-product path; on a GPU load the model \
                          with --dtype bf16"
                    .into(),
            });
        }
        let (n, k) = w.dims2()?;
        let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        self.bf16_base = Some(Arc::new(Bf16Base::new(&values, n, k)));
        self.weight = None;
        self.quant_rows = None;
        self.quantized = None;
        self.bf16 = None;
        Ok(())
    }

    /// Replaces the dense weight (a merge), dropping what was derived from the old one.
    pub(super) fn set_weight(&mut self, weight: Tensor) {
        self.weight = Some(weight);
        self.dequantize();
    }

    pub(super) fn quantize(&mut self, dtype: GgmlDType) -> Result<()> {
        self.dequantize();
        if self.bf16_base.is_some() {
            return Err(LlamaError::Config {
                path: "--quantize".into(),
                message: "the model's projections are frozen in bf16 for training".into(),
            });
        }
        let w = self.weight()?.to_dtype(DType::F32)?;
        if dtype == GgmlDType::BF16 {
            if !w.device().is_cpu() {
                return Err(LlamaError::Config {
                    path: "--quantize".into(),
                    message: "bf16 is the CPU's bf16 dot-product path; on a GPU use --dtype bf16"
                        .into(),
                });
            }
            let (n, k) = w.dims2()?;
            let values = w.flatten_all()?.to_vec1::<f32>()?;
            self.bf16 = Some(Arc::new(PackedBf16::new(&values, n, k)));
            return Ok(());
        }
        let format = match dtype {
            GgmlDType::Q8_0 => Some(QuantFormat::Int8),
            GgmlDType::Q4_0 => Some(QuantFormat::Int4),
            _ => None,
        };
        match format {
            Some(format) if w.device().is_cpu() => self.quantize_rows(format)?,
            _ => self.quantized = Some(QMatMul::from_qtensor(QTensor::quantize(&w, dtype)?)?),
        }
        Ok(())
    }

    /// Keeps the weight quantised in `format` for the decode steps on the CPU (activations rounded to 16 bits per block).
    pub(super) fn quantize_rows(&mut self, format: QuantFormat) -> Result<()> {
        self.dequantize();
        let w = self.weight()?.to_dtype(DType::F32)?;
        let (n, k) = w.dims2()?;
        let values = w.flatten_all()?.to_vec1::<f32>()?;
        self.quant_rows = Some(Arc::new(QuantRows::new(format, &values, n, k)));
        Ok(())
    }

    /// Back to the dense weight only (after it changed, e.g. an adapter merged into it). The
    /// blocks of a projection without a dense weight are all it has: they stay.
    pub(super) fn dequantize(&mut self) {
        if self.weight.is_some() {
            self.quant_rows = None;
        }
        self.quantized = None;
        self.bf16 = None;
    }
}

/// A weight kept in a CPU kernel's own layout (bf16 pairs, 8 or 4-bit blocks), for `x W^T`
/// with f32 in and out.
trait PackedWeight: Send + Sync {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32>;
}

impl PackedWeight for PackedBf16 {
    fn rows(&self) -> usize {
        PackedBf16::rows(self)
    }
    fn cols(&self) -> usize {
        PackedBf16::cols(self)
    }
    fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        PackedBf16::matmul_t(self, x, m)
    }
}

impl PackedWeight for QuantRows {
    fn rows(&self) -> usize {
        QuantRows::rows(self)
    }
    fn cols(&self) -> usize {
        QuantRows::cols(self)
    }
    fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        QuantRows::matmul_t(self, x, m)
    }
}

/// Blocks for many input rows: widened to f32 a tile of rows at a time for gemm.
struct ManyRows<'a>(&'a QuantRows);

impl PackedWeight for ManyRows<'_> {
    fn rows(&self) -> usize {
        self.0.rows()
    }
    fn cols(&self) -> usize {
        self.0.cols()
    }
    fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.0.matmul_t_many(x, m)
    }
}

/// `x W^T` through a [`PackedWeight`] (CPU, contiguous f32 `x [m, k]`).
struct PackedMatmul<'a>(&'a dyn PackedWeight);

impl CustomOp1 for PackedMatmul<'_> {
    fn name(&self) -> &'static str {
        "packed-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = l.shape().dims2()?;
        if k != self.0.cols() {
            candle_core::bail!(
                "packed matmul: input [{m}, {k}] does not fit weight [{}, {}]",
                self.0.rows(),
                self.0.cols()
            );
        }
        let (CpuStorage::F32(xs), Some((x0, x1))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("packed matmul: needs a contiguous f32 input");
        };
        let out = self.0.matmul_t(&xs[x0..x1], m);
        Ok((CpuStorage::F32(out), Shape::from((m, self.0.rows()))))
    }
}

/// `x W^T` for `x` `[.., inner]` of any float dtype through a packed weight, in the dtype of `x`.
fn packed_forward(x: &Tensor, w: &dyn PackedWeight) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let inner = dims[dims.len() - 1];
    let x2 = x
        .to_dtype(DType::F32)?
        .reshape((x.elem_count() / inner, inner))?
        .contiguous()?;
    let y = x2.apply_op1_no_bwd(&PackedMatmul(w))?;
    let mut out = dims.to_vec();
    *out.last_mut().unwrap() = w.rows();
    y.reshape(out)?.to_dtype(x.dtype())
}

impl Linear {
    /// The weight [`Module::forward`] multiplies `rows` rows of an f32 input by, when it takes
    /// a few-row CPU kernel for them: the quantised blocks, or the dense f32 weight.
    fn few_rows_path(&self, rows: usize) -> Option<FewRows<'_>> {
        if self.bf16_base.is_some() || self.bf16.is_some() || rows == 0 {
            return None;
        }
        if let Some(blocks) = &self.quant_rows {
            return (rows <= QUANTIZED_MAX_ROWS).then_some(FewRows::Blocks(blocks));
        }
        let w = self.weight.as_ref()?;
        let dense = self.quantized.is_none()
            && rows <= skinny::MAX_ROWS
            && w.dtype() == DType::F32
            && w.device().is_cpu()
            && w.is_contiguous();
        dense.then_some(FewRows::Dense(w))
    }

    /// `x W^T` for each projection of `linears` that read the same input (a layer's query, key
    /// and value projections; its gate and up projections), when each takes a few-row CPU
    /// kernel for `x` (f32): one parallel loop runs all of them
    /// ([`fused_rows`](crate::kernels::fused_rows)), each output the bits [`Module::forward`]
    /// gives. `None` otherwise (run them one by one).
    pub(super) fn forward_group<const N: usize>(
        linears: [&Linear; N],
        x: &Tensor,
    ) -> Result<Option<[Tensor; N]>> {
        let dims = x.dims();
        let inner = dims.last().copied().unwrap_or(0);
        let rows = x.elem_count() / inner.max(1);
        if !x.device().is_cpu() || x.dtype() != DType::F32 {
            return Ok(None);
        }
        let mut paths = Vec::with_capacity(N);
        for l in linears {
            match l.few_rows_path(rows) {
                Some(p) if p.cols()? == inner => paths.push(p),
                _ => return Ok(None),
            }
        }
        // Dense weights are read in place, under their storage's lock.
        let guards: Vec<_> = paths
            .iter()
            .map(|p| match p {
                FewRows::Dense(w) => Some(w.storage_and_layout()),
                FewRows::Blocks(_) => None,
            })
            .collect();
        let mut weights = Vec::with_capacity(N);
        for (path, guard) in paths.iter().zip(&guards) {
            weights.push(match (path, guard) {
                (FewRows::Dense(w), Some((storage, layout))) => {
                    let (Storage::Cpu(CpuStorage::F32(data)), Some((lo, hi))) =
                        (&**storage, layout.contiguous_offsets())
                    else {
                        return Ok(None);
                    };
                    GroupWeight::Dense {
                        values: &data[lo..hi],
                        rows: w.dim(0)?,
                    }
                }
                (FewRows::Blocks(b), _) => GroupWeight::Blocks(b),
                (FewRows::Dense(_), None) => return Ok(None),
            });
        }
        let x2 = x.reshape((rows, inner))?.contiguous()?;
        let values = x2.flatten_all()?.to_vec1::<f32>()?;
        let outs = fused_rows::matmul_t_group(&weights, &values, rows, inner);
        let mut tensors = Vec::with_capacity(N);
        for out in outs {
            let mut shape = dims.to_vec();
            *shape.last_mut().unwrap() = out.len() / rows;
            tensors.push(Tensor::from_vec(out, shape, x.device())?);
        }
        Ok(Some(tensors.try_into().expect("one output per projection")))
    }
}

/// The weight of a projection's few-row CPU kernel.
enum FewRows<'a> {
    Blocks(&'a QuantRows),
    Dense(&'a Tensor),
}

impl FewRows<'_> {
    fn cols(&self) -> Result<usize> {
        Ok(match self {
            FewRows::Blocks(b) => b.cols(),
            FewRows::Dense(w) => w.dim(1)?,
        })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims();
        let (rows, inner) = (x.elem_count() / dims[dims.len() - 1], dims[dims.len() - 1]);
        if let Some(base) = &self.bf16_base {
            // Differentiable: a projection without an adapter passes the input gradient on.
            let x2 = x
                .to_dtype(DType::F32)?
                .reshape((rows, inner))?
                .contiguous()?;
            let y = x2.apply_op1(Bf16FrozenMatmul(base.clone()))?;
            let mut out = dims.to_vec();
            *out.last_mut().unwrap() = base.rows();
            return y.reshape(out)?.to_dtype(x.dtype());
        }
        if let Some(packed) = &self.bf16 {
            // Every row count: bf16 products are twice an f32 FMA's per instruction, so the
            // prefill gains too, not only the weight-bound decode steps.
            return packed_forward(x, packed.as_ref());
        }
        // Few rows (decoding) are bound by weight bytes: the quantised weight wins. Many rows
        // (prefill) are bound by arithmetic, where the dense GEMM is faster; without a dense
        // weight, the blocks are widened a tile at a time for it.
        let Some(weight) = &self.weight else {
            let q = self
                .quant_rows
                .as_ref()
                .expect("a Linear holds a weight or blocks");
            return if rows <= QUANTIZED_MAX_ROWS {
                packed_forward(x, q.as_ref())
            } else {
                packed_forward(x, &ManyRows(q.as_ref()))
            };
        };
        if let Some(q) = self
            .quant_rows
            .as_ref()
            .filter(|_| rows <= QUANTIZED_MAX_ROWS && rows > 0)
        {
            return packed_forward(x, q.as_ref());
        }
        if let Some(q) = self
            .quantized
            .as_ref()
            .filter(|_| rows <= QUANTIZED_MAX_ROWS)
        {
            let dtype = x.dtype();
            return q
                .forward(&x.to_dtype(DType::F32)?.contiguous()?)?
                .to_dtype(dtype);
        }
        // Flatten leading dims so one GEMM runs against the transposed weight view (no copy).
        // The frozen op runs that same GEMM but gives no gradient to the weight.
        let x2 = x.reshape((rows, inner))?;
        let y = if rows == 0 {
            x2.matmul(&weight.t()?)?
        } else {
            x2.apply_op2(weight, FrozenMatmul)?
        };
        let mut out = dims.to_vec();
        *out.last_mut().unwrap() = weight.dim(0)?;
        y.reshape(out)
    }
}

impl Linear {
    /// `W x` plus, with an adapter, `scale * B(A(dropout(x)))` computed in f32 (dropout only
    /// in training) and cast back to the dtype of `x`.
    pub(super) fn forward_lora(
        &self,
        x: &Tensor,
        lora: Option<ActiveLora<'_>>,
        mode: Mode,
    ) -> Result<Tensor> {
        let lora = match lora {
            Some(l) if mode == Mode::Training && x.device().is_cpu() && x.elem_count() > 0 => {
                return self.forward_lora_training(x, l)
            }
            other => other,
        };
        let y = self.forward(x)?;
        self.add_lora(x, y, lora, mode)
    }

    /// `y` (this projection's `x W^T`) plus, with an adapter, `scale * B(A(dropout(x)))`: the
    /// rest of [`Self::forward_lora`] once the base product is known.
    pub(super) fn add_lora(
        &self,
        x: &Tensor,
        y: Tensor,
        lora: Option<ActiveLora<'_>>,
        mode: Mode,
    ) -> Result<Tensor> {
        let Some(lora) = lora else {
            return Ok(y);
        };
        if mode == Mode::Inference && fast_lora_rows(x, &y) {
            let rows = (x.elem_count() / x.dim(D::Minus1)?.max(1)) as u32;
            return self.add_lora_rows(x, y, &[(&lora, (0..rows).collect())]);
        }
        let xf = x.to_dtype(DType::F32)?;
        let xf = match (mode, lora.dropout_seed) {
            (Mode::Training, _) if lora.dropout == 0.0 => xf,
            (Mode::Training, Some(seed)) => seeded_dropout(&xf, lora.dropout, seed)?,
            (Mode::Training, None) => ops::dropout(&xf, lora.dropout)?,
            (Mode::Inference, _) => xf,
        };
        let dims = xf.dims().to_vec();
        let inner = dims[dims.len() - 1];
        let x2 = xf.reshape((xf.elem_count() / inner.max(1), inner))?;
        // The factors are trainable Vars: at inference, outputs computed from them would carry
        // the whole forward's op graph (every activation kept alive by the logits a session
        // holds, gigabytes per agent in an eval). Detached copies share the storage only.
        let (a, b) = match mode {
            Mode::Training => (
                lora.pair.a.as_tensor().clone(),
                lora.pair.b.as_tensor().clone(),
            ),
            Mode::Inference => (
                lora.pair.a.as_tensor().detach(),
                lora.pair.b.as_tensor().detach(),
            ),
        };
        let h = x2.matmul(&a.t()?)?.matmul(&b.t()?)?;
        let h = (h * lora.scale)?.to_dtype(y.dtype())?;
        let h = h.reshape(y.shape())?;
        Ok((y + h)?)
    }

    /// Inference with a different adapter per group of token rows (`x` `[1, tokens, in]`):
    /// the base projection runs once over every row, then each group adds its own
    /// `scale * B(A x)` to its rows, with the same operations in the same order as
    /// [`Self::forward_lora`] does for a sequence alone.
    pub(super) fn forward_lora_rows(
        &self,
        x: &Tensor,
        groups: &[(ActiveLora<'_>, &Tensor)],
    ) -> Result<Tensor> {
        let y = self.forward(x)?;
        self.add_lora_groups(x, y, groups)
    }

    /// `y` (this projection's `x W^T`) plus each group's adapter on its rows: the rest of
    /// [`Self::forward_lora_rows`] once the base product is known.
    pub(super) fn add_lora_groups(
        &self,
        x: &Tensor,
        y: Tensor,
        groups: &[(ActiveLora<'_>, &Tensor)],
    ) -> Result<Tensor> {
        if fast_lora_rows(x, &y) {
            let groups: Vec<_> = groups
                .iter()
                .map(|(l, rows)| Ok((l, rows.to_vec1::<u32>()?)))
                .collect::<Result<_>>()?;
            return self.add_lora_rows(x, y, &groups);
        }
        let (dims, inner, out) = (y.dims().to_vec(), x.dim(D::Minus1)?, y.dim(D::Minus1)?);
        let xf = x.to_dtype(DType::F32)?;
        let x2 = xf.reshape((xf.elem_count() / inner.max(1), inner))?;
        let mut y2 = y.reshape((y.elem_count() / out.max(1), out))?;
        for (lora, rows) in groups {
            let (a, b) = (
                lora.pair.a.as_tensor().detach(),
                lora.pair.b.as_tensor().detach(),
            );
            let h = x2.index_select(rows, 0)?.matmul(&a.t()?)?.matmul(&b.t()?)?;
            let h = (h * lora.scale)?.to_dtype(y2.dtype())?;
            y2 = y2.index_add(rows, &h, 0)?;
        }
        Ok(y2.reshape(dims)?)
    }

    /// `y` plus each group's `scale * B(A x)` on its rows, in one CPU pass
    /// ([`lora_rows`](crate::kernels::lora_rows)): the inference path on the CPU, alone or
    /// batched, so that a row's arithmetic does not depend on what shares its step.
    fn add_lora_rows(
        &self,
        x: &Tensor,
        y: Tensor,
        groups: &[(&ActiveLora<'_>, Vec<u32>)],
    ) -> Result<Tensor> {
        let (inner, out) = (x.dim(D::Minus1)?, y.dim(D::Minus1)?);
        let dims = y.dims().to_vec();
        let x2 = x
            .reshape((x.elem_count() / inner.max(1), inner))?
            .contiguous()?;
        let y2 = y
            .reshape((y.elem_count() / out.max(1), out))?
            .contiguous()?;
        let groups = groups
            .iter()
            .map(|(l, rows)| RowGroup {
                a: l.pair.a.as_tensor().detach(),
                b: l.pair.b.as_tensor().detach(),
                scale: l.scale as f32,
                rows: rows.clone(),
            })
            .collect();
        Ok(add_lora_rows(&y2, &x2, groups)?.reshape(dims)?)
    }

    /// The training forward of `forward_lora` with an adapter: the same values, from two ops
    /// that keep only their inputs and outputs (no dropout mask, dropped input, base output or
    /// unscaled adapter output is stored for the backward).
    fn forward_lora_training(&self, x: &Tensor, lora: ActiveLora<'_>) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inner = dims[dims.len() - 1];
        let x2 = x.reshape((x.elem_count() / inner, inner))?;
        let xf = x2.to_dtype(DType::F32)?;
        let a = lora.pair.a.as_tensor();
        let h = match lora.dropout_seed {
            _ if lora.dropout == 0.0 => xf.matmul(&a.t()?)?,
            Some(seed) => train_ops::dropout_matmul(&xf, a, lora.dropout, seed)?,
            None => ops::dropout(&xf, lora.dropout)?.matmul(&a.t()?)?,
        };
        let b = lora.pair.b.as_tensor();
        let (y, rows) = match &self.bf16_base {
            Some(base) => (
                train_ops::lora_linear_bf16(&xf, base, &h, b, lora.scale)?,
                base.rows(),
            ),
            None => {
                let weight = self.weight()?;
                let y = train_ops::lora_linear(&x2, weight, &h, b, lora.scale)?;
                (y, weight.dim(0)?)
            }
        };
        let mut out = dims;
        *out.last_mut().unwrap() = rows;
        Ok(y.reshape(out)?)
    }
}

/// Whether the inference LoRA term can take the one-pass CPU loop: f32 input and output on the
/// CPU (other dtypes and devices compose candle ops).
fn fast_lora_rows(x: &Tensor, y: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && y.dtype() == DType::F32
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::kernels::skinny::tests::values;

    fn quantised(n: usize, k: usize, seed: u32, format: QuantFormat) -> Linear {
        let w = Tensor::from_vec(values(n * k, seed), (n, k), &Device::Cpu).unwrap();
        let mut l = Linear::new(w);
        l.quantize_rows(format).unwrap();
        l
    }

    /// The fused projections of a decode step give each projection the bits of its own
    /// forward, quantised and dense alike; a projection with another kernel, or too many rows,
    /// leaves them to run one by one.
    #[test]
    fn a_group_forward_is_each_forward_or_none() {
        let k = 96;
        let q = quantised(48, k, 1, QuantFormat::Int4);
        let kp = quantised(16, k, 2, QuantFormat::Int8);
        // Dense f32 weights take the skinny kernel, in the same loop.
        let v = Linear::new(Tensor::from_vec(values(16 * k, 3), (16, k), &Device::Cpu).unwrap());
        for rows in [1, 4] {
            let x = Tensor::from_vec(values(rows * k, 9), (1, rows, k), &Device::Cpu).unwrap();
            let got = Linear::forward_group([&q, &kp, &v], &x).unwrap().unwrap();
            for (l, y) in [&q, &kp, &v].iter().zip(&got) {
                let alone = l.forward(&x).unwrap();
                assert_eq!(y.dims(), alone.dims());
                let (a, b): (Vec<f32>, Vec<f32>) = (
                    y.flatten_all().unwrap().to_vec1().unwrap(),
                    alone.flatten_all().unwrap().to_vec1().unwrap(),
                );
                assert!(a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
        // A bf16 weight takes its own kernel, not a few-row one.
        let mut bf16 =
            Linear::new(Tensor::from_vec(values(16 * k, 4), (16, k), &Device::Cpu).unwrap());
        bf16.quantize(GgmlDType::BF16).unwrap();
        let x = Tensor::from_vec(values(k, 5), (1, 1, k), &Device::Cpu).unwrap();
        assert!(Linear::forward_group([&q, &bf16], &x).unwrap().is_none());
        let many = Tensor::from_vec(values(17 * k, 6), (1, 17, k), &Device::Cpu).unwrap();
        assert!(Linear::forward_group([&q, &v], &many).unwrap().is_none());
    }
}
