//! Masked next-token cross-entropy in f32, from final hidden states, in chunks of positions.
//!
//! Only positions with a non-zero weight go through the LM head, `chunk` rows at a time, and
//! through [`Llama::token_nll`], which never keeps their logits: the `[tokens, vocab]` logits of
//! a batch exist neither in the forward nor for the backward.

use candle_core::{DType, Device, Tensor};
use teamtune_data::Batch;
use teamtune_llama::{Llama, TokenLayout};

use crate::error::Result;

/// `sum_t w_t * -log p(target_t)` over the positions of `hidden` (`[batch, time, hidden]`,
/// flattened row-major like `targets` and `weights`): a scalar f32 tensor with its graph.
pub fn masked_nll_sum(
    model: &Llama,
    hidden: &Tensor,
    targets: &[u32],
    weights: &[f32],
    chunk: usize,
) -> Result<Tensor> {
    let device = hidden.device();
    let h = hidden.dim(hidden.rank() - 1)?;
    let flat = hidden.reshape(((), h))?;
    let keep: Vec<u32> = (0..weights.len() as u32)
        .filter(|&i| weights[i as usize] != 0.0)
        .collect();
    let mut total = Tensor::zeros((), DType::F32, device)?;
    for part in keep.chunks(chunk.max(1)) {
        let idx = Tensor::new(part, device)?;
        let rows = flat.index_select(&idx, 0)?;
        let tgt: Vec<u32> = part.iter().map(|&i| targets[i as usize]).collect();
        let w: Vec<f32> = part.iter().map(|&i| weights[i as usize]).collect();
        let nll = model.token_nll(&rows, &tgt)?.to_dtype(DType::F32)?;
        total = (total + (nll * Tensor::new(w, device)?)?.sum_all()?)?;
    }
    Ok(total)
}

/// The input ids `[rows, seq_len]` and token layout of a batch.
pub fn batch_inputs(batch: &Batch, device: &Device) -> Result<(Tensor, TokenLayout)> {
    let ids = Tensor::from_slice(&batch.input_ids, (batch.rows, batch.seq_len), device)?;
    let rows = |v: &[u32]| -> Vec<Vec<u32>> {
        v.chunks(batch.seq_len.max(1)).map(|c| c.to_vec()).collect()
    };
    let layout = TokenLayout {
        positions: rows(&batch.position_ids),
        valid: batch
            .attention_mask
            .chunks(batch.seq_len.max(1))
            .map(|c| c.iter().map(|&m| m != 0).collect())
            .collect(),
        segments: batch.packed.then(|| rows(&batch.segment_ids)),
    };
    Ok((ids, layout))
}
