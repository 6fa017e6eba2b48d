//! Keys and values of earlier tokens, per layer, so that generation feeds only new tokens.

use candle_core::{Tensor, D};

use crate::error::{LlamaError, Result};

#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer `(k, v)`, each `[batch, kv_heads, cached, head_dim]`, before GQA repetition.
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Per row: which cached keys are real tokens (left padding leaves holes).
    valid: Vec<Vec<bool>>,
    /// Per row: the position id the next real token gets.
    next_position: Vec<u32>,
}

impl KvCache {
    pub fn new(num_layers: usize, batch: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            valid: vec![vec![]; batch],
            next_position: vec![0; batch],
        }
    }

    pub fn batch(&self) -> usize {
        self.valid.len()
    }

    /// Number of cached key slots (padding included).
    pub fn len(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn next_positions(&self) -> &[u32] {
        &self.next_position
    }

    pub(crate) fn valid(&self) -> &[Vec<bool>] {
        &self.valid
    }

    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| LlamaError::Shape(format!("cache has no layer {layer}")))?;
        let (k, v) = match slot.take() {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (
                Tensor::cat(&[&pk, k], D::Minus2)?,
                Tensor::cat(&[&pv, v], D::Minus2)?,
            ),
        };
        *slot = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Records the new tokens' validity and positions once every layer has appended them.
    pub(crate) fn commit(&mut self, valid: &[Vec<bool>], positions: &[Vec<u32>]) {
        for (row, (new, pos)) in valid.iter().zip(positions).enumerate() {
            self.valid[row].extend_from_slice(new);
            let last_real = new
                .iter()
                .zip(pos)
                .rev()
                .find(|(v, _)| **v)
                .map(|(_, p)| *p);
            if let Some(last) = last_real {
                self.next_position[row] = last + 1;
            }
        }
    }
}
