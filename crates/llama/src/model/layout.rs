//! Where the tokens of a forward pass sit: their position ids, which are padding, and (for
//! packed training sequences) which conversation each belongs to. From that and the keys in
//! the KV cache comes the additive attention mask.

use candle_core::{Device, Tensor};

use crate::error::{LlamaError, Result};

/// Per row of a `[batch, time]` input: position id, validity and optional segment of each token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLayout {
    pub positions: Vec<Vec<u32>>,
    pub valid: Vec<Vec<bool>>,
    /// Packing: tokens attend only to earlier tokens of the same segment.
    pub segments: Option<Vec<Vec<u32>>>,
}

impl TokenLayout {
    /// `batch` rows of `len` real tokens at positions `start..start+len`.
    pub fn contiguous(batch: usize, len: usize, start: u32) -> Self {
        TokenLayout {
            positions: vec![(start..start + len as u32).collect(); batch],
            valid: vec![vec![true; len]; batch],
            segments: None,
        }
    }

    /// Rows of the given lengths padded on the right to the longest (training batches).
    pub fn right_padded(lengths: &[usize]) -> Self {
        let t = lengths.iter().copied().max().unwrap_or(0);
        TokenLayout {
            positions: lengths
                .iter()
                .map(|&n| (0..t as u32).map(|p| p.min(n.max(1) as u32 - 1)).collect())
                .collect(),
            valid: lengths
                .iter()
                .map(|&n| (0..t).map(|i| i < n).collect())
                .collect(),
            segments: None,
        }
    }

    /// Rows of the given lengths padded on the left, continuing from `starts` (generation: the
    /// last column is every row's newest token).
    pub fn left_padded(lengths: &[usize], starts: &[u32]) -> Self {
        let t = lengths.iter().copied().max().unwrap_or(0);
        let mut positions = Vec::new();
        let mut valid = Vec::new();
        for (&n, &start) in lengths.iter().zip(starts) {
            let pad = t - n;
            positions.push(
                (0..t)
                    .map(|i| start + i.saturating_sub(pad) as u32)
                    .collect(),
            );
            valid.push((0..t).map(|i| i >= pad).collect());
        }
        TokenLayout {
            positions,
            valid,
            segments: None,
        }
    }

    /// One row per entry, each row the concatenation of several sequences whose positions
    /// restart at 0 and which never attend to each other; rows are right-padded.
    pub fn packed(rows: &[Vec<usize>]) -> Self {
        let t = rows
            .iter()
            .map(|r| r.iter().sum::<usize>())
            .max()
            .unwrap_or(0);
        let mut layout = TokenLayout {
            positions: vec![],
            valid: vec![],
            segments: Some(vec![]),
        };
        for row in rows {
            let mut pos = Vec::with_capacity(t);
            let mut seg = Vec::with_capacity(t);
            for (s, &n) in row.iter().enumerate() {
                pos.extend(0..n as u32);
                seg.extend(std::iter::repeat_n(s as u32, n));
            }
            let used = pos.len();
            pos.resize(t, 0);
            seg.resize(t, u32::MAX);
            layout.valid.push((0..t).map(|i| i < used).collect());
            layout.positions.push(pos);
            layout.segments.as_mut().unwrap().push(seg);
        }
        layout
    }

    pub fn batch(&self) -> usize {
        self.positions.len()
    }

    pub fn len(&self) -> usize {
        self.positions.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn check(&self, batch: usize, len: usize) -> Result<()> {
        let rows_ok = |v: &Vec<Vec<_>>| v.len() == batch && v.iter().all(|r| r.len() == len);
        let seg_ok = self
            .segments
            .as_ref()
            .is_none_or(|s| s.len() == batch && s.iter().all(|r| r.len() == len));
        if rows_ok(&self.positions)
            && self.valid.len() == batch
            && self.valid.iter().all(|r| r.len() == len)
            && seg_ok
        {
            Ok(())
        } else {
            Err(LlamaError::Shape(format!(
                "token layout does not match input ids of shape [{batch}, {len}]"
            )))
        }
    }

    pub(crate) fn is_plain(&self) -> bool {
        self.segments.is_none() && self.valid.iter().all(|r| r.iter().all(|&v| v))
    }

    pub(crate) fn positions_tensor(&self, device: &Device) -> Result<Tensor> {
        let flat: Vec<u32> = self.positions.iter().flatten().copied().collect();
        Ok(Tensor::from_vec(flat, (self.batch(), self.len()), device)?)
    }

    /// Additive mask `[batch, 1, time, cached + time]` (0 where a query may attend, -inf where
    /// not), or `None` when plain causal attention over a single new token needs none.
    /// `cached_valid[b]` says which cached keys of row b are real tokens.
    pub(crate) fn attention_bias(
        &self,
        cached_valid: &[Vec<bool>],
        device: &Device,
    ) -> Result<Option<Tensor>> {
        let (b, t) = (self.batch(), self.len());
        let cached = cached_valid.first().map_or(0, Vec::len);
        let all_cached_valid = cached_valid.iter().all(|r| r.iter().all(|&v| v));
        if t == 1 && self.is_plain() && all_cached_valid {
            return Ok(None);
        }
        let s = cached + t;
        let mut bias = vec![0f32; b * t * s];
        for row in 0..b {
            let seg = self.segments.as_ref().map(|s| &s[row]);
            for q in 0..t {
                let out = &mut bias[(row * t + q) * s..(row * t + q + 1) * s];
                for (k, slot) in out.iter_mut().enumerate() {
                    let allowed = if k < cached {
                        cached_valid[row][k]
                    } else {
                        let kk = k - cached;
                        kk <= q && self.valid[row][kk] && seg.is_none_or(|seg| seg[kk] == seg[q])
                    };
                    if !allowed {
                        *slot = f32::NEG_INFINITY;
                    }
                }
                // A padding query would see no key at all and turn into NaN; let it see
                // itself. Its output is never used.
                if !self.valid[row][q] {
                    out[cached + q] = 0.0;
                }
            }
        }
        Ok(Some(Tensor::from_vec(bias, (b, 1, t, s), device)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(bias: &Tensor) -> Vec<Vec<Vec<bool>>> {
        let v = bias.squeeze(1).unwrap().to_vec3::<f32>().unwrap();
        v.into_iter()
            .map(|r| {
                r.into_iter()
                    .map(|q| q.into_iter().map(|x| x == 0.0).collect())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn causal_mask_with_cache_offset() {
        let l = TokenLayout::contiguous(1, 2, 3);
        let bias = l
            .attention_bias(&[vec![true; 3]], &Device::Cpu)
            .unwrap()
            .unwrap();
        assert_eq!(
            allowed(&bias)[0],
            vec![vec![true, true, true, true, false], vec![true; 5]]
        );
    }

    #[test]
    fn single_plain_token_needs_no_mask() {
        let l = TokenLayout::contiguous(2, 1, 7);
        assert!(l
            .attention_bias(&[vec![true; 7], vec![true; 7]], &Device::Cpu)
            .unwrap()
            .is_none());
    }

    #[test]
    fn packed_sequences_do_not_see_each_other() {
        let l = TokenLayout::packed(&[vec![2, 2]]);
        assert_eq!(l.positions[0], vec![0, 1, 0, 1]);
        let m = allowed(&l.attention_bias(&[vec![]], &Device::Cpu).unwrap().unwrap());
        assert_eq!(
            m[0],
            vec![
                vec![true, false, false, false],
                vec![true, true, false, false],
                vec![false, false, true, false],
                vec![false, false, true, true],
            ]
        );
    }

    #[test]
    fn left_padding_hides_pad_keys_and_positions_continue() {
        let l = TokenLayout::left_padded(&[1, 3], &[5, 0]);
        assert_eq!(l.positions, vec![vec![5, 5, 5], vec![0, 1, 2]]);
        let m = allowed(
            &l.attention_bias(&[vec![], vec![]], &Device::Cpu)
                .unwrap()
                .unwrap(),
        );
        // Row 0: two pads then a real token that sees only itself.
        assert_eq!(m[0][2], vec![false, false, true]);
        assert_eq!(m[0][0], vec![true, false, false]);
        assert_eq!(m[1][2], vec![true, true, true]);
    }
}
