//! Keys and values of earlier tokens, per layer, so that generation feeds only new tokens.
//!
//! Each layer's keys and values live in a buffer with room to grow: a new token is written in
//! place instead of concatenating (which would copy the whole cache at every step). Clones of
//! a cache share buffers; a buffer is written in place only while one cache owns it, and is
//! copied first otherwise, so forks stay independent.
//!
//! A cache may store its keys and values in a narrower type than the model computes them in
//! (f16, as llama.cpp's default cache does): half the memory, which at dozens of sequences of
//! thousands of tokens is most of an evaluation's (6.6 -> 4.0 GB peak for the demo adapter's
//! x10 evaluation). It did not make that evaluation faster on a 2-core AVX-512 machine
//! (docs/BENCHMARKS.md). Each token's keys and values are rounded once, when stored, the same
//! whether it came in a prompt or a decode step, so a sequence keeps the same bits alone,
//! batched and resumed.

use std::sync::Arc;

use candle_core::{DType, Tensor, D};

use crate::error::{LlamaError, Result};

/// One layer's keys and values, `[batch, kv_heads, capacity, head_dim]` each (before GQA
/// repetition); the first [`KvCache::len`] slots are in use.
#[derive(Debug, Clone)]
struct LayerKv {
    k: Tensor,
    v: Tensor,
    /// Shared by the clones of the cache that share these buffers: in-place writes only while
    /// this is the only reference.
    owner: Arc<()>,
}

impl LayerKv {
    fn new(k: Tensor, v: Tensor) -> Self {
        LayerKv {
            k,
            v,
            owner: Arc::new(()),
        }
    }

    /// The first `len` slots.
    fn view(&self, len: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.k.narrow(D::Minus2, 0, len)?,
            self.v.narrow(D::Minus2, 0, len)?,
        ))
    }
}

/// Free slots to leave after `needed` when a buffer is (re)allocated.
fn headroom(needed: usize) -> usize {
    (needed / 4).max(64)
}

/// `t` followed by `extra` zero slots along the slot dimension.
fn with_room(t: &Tensor, extra: usize) -> Result<Tensor> {
    let (b, h, _, d) = t.dims4()?;
    let zeros = Tensor::zeros((b, h, extra, d), t.dtype(), t.device())?;
    Ok(Tensor::cat(&[t, &zeros], D::Minus2)?)
}

fn storage_name(storage: Option<DType>) -> &'static str {
    storage.map_or("the model's type", |d| d.as_str())
}

#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer keys and values.
    layers: Vec<Option<LayerKv>>,
    /// Per row: which cached keys are real tokens (left padding leaves holes).
    valid: Vec<Vec<bool>>,
    /// Per row: the position id the next real token gets.
    next_position: Vec<u32>,
    /// The type keys and values are stored in; `None`: as the model computes them.
    storage: Option<DType>,
}

impl KvCache {
    pub fn new(num_layers: usize, batch: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            valid: vec![vec![]; batch],
            next_position: vec![0; batch],
            storage: None,
        }
    }

    /// An empty cache that stores keys and values as `dtype` (`None`: as computed).
    pub fn with_storage(num_layers: usize, batch: usize, dtype: Option<DType>) -> Self {
        KvCache {
            storage: dtype,
            ..KvCache::new(num_layers, batch)
        }
    }

    /// The type keys and values are stored in, if not the model's.
    pub fn storage(&self) -> Option<DType> {
        self.storage
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

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Stacks the rows of `caches` (each of any batch, all of the same model) into one cache:
    /// every row is left-padded with zero keys and values marked invalid up to the longest,
    /// and keeps its own next position. The result continues each row exactly as its own cache
    /// would (padding is masked out of attention).
    pub fn merge(caches: &[&KvCache]) -> Result<KvCache> {
        let first = caches
            .first()
            .ok_or_else(|| LlamaError::Shape("merging no KV caches".into()))?;
        let num_layers = first.layers.len();
        if let Some(c) = caches.iter().find(|c| c.layers.len() != num_layers) {
            return Err(LlamaError::Shape(format!(
                "merging KV caches of {num_layers} and {} layers",
                c.layers.len()
            )));
        }
        if let Some(c) = caches.iter().find(|c| c.storage != first.storage) {
            return Err(LlamaError::Shape(format!(
                "merging KV caches stored as {} and {}",
                storage_name(first.storage),
                storage_name(c.storage)
            )));
        }
        if caches.len() == 1 {
            return Ok((*first).clone());
        }
        let slots = caches.iter().map(|c| c.len()).max().unwrap_or(0);
        let mut merged = KvCache {
            layers: vec![None; num_layers],
            valid: Vec::new(),
            next_position: Vec::new(),
            storage: first.storage,
        };
        for c in caches {
            let pad = slots - c.len();
            for row in &c.valid {
                let mut v = vec![false; pad];
                v.extend_from_slice(row);
                merged.valid.push(v);
            }
            merged.next_position.extend_from_slice(&c.next_position);
        }
        if slots == 0 {
            return Ok(merged);
        }
        for layer in 0..num_layers {
            // Shape, dtype and device of this layer's keys, from any cache that has them.
            let Some(proto) = caches
                .iter()
                .find_map(|c| c.layers[layer].as_ref().map(|l| &l.k))
            else {
                return Err(LlamaError::Shape(format!(
                    "KV cache layer {layer} is empty in every cache"
                )));
            };
            let (_, heads, _, head_dim) = proto.dims4()?;
            let pad_to = |t: &Tensor, batch: usize, have: usize| -> Result<Tensor> {
                if have == slots {
                    return Ok(t.clone());
                }
                let zeros = Tensor::zeros(
                    (batch, heads, slots - have, head_dim),
                    proto.dtype(),
                    proto.device(),
                )?;
                Ok(Tensor::cat(&[&zeros, t], D::Minus2)?)
            };
            let room = headroom(slots);
            let mut ks = Vec::with_capacity(caches.len());
            let mut vs = Vec::with_capacity(caches.len());
            for c in caches {
                match (&c.layers[layer], c.len()) {
                    (Some(l), have) => {
                        let (k, v) = l.view(have)?;
                        ks.push(pad_to(&k, c.batch(), have)?);
                        vs.push(pad_to(&v, c.batch(), have)?);
                    }
                    (None, 0) => {
                        let z = Tensor::zeros(
                            (c.batch(), heads, slots, head_dim),
                            proto.dtype(),
                            proto.device(),
                        )?;
                        ks.push(z.clone());
                        vs.push(z);
                    }
                    (None, n) => {
                        return Err(LlamaError::Shape(format!(
                            "KV cache has {n} slots but no layer {layer}"
                        )))
                    }
                }
            }
            merged.layers[layer] = Some(LayerKv::new(
                with_room(&Tensor::cat(&ks, 0)?, room)?,
                with_room(&Tensor::cat(&vs, 0)?, room)?,
            ));
        }
        Ok(merged)
    }

    /// Row `row` alone (batch 1) without its invalid slots: the cache that row would have had
    /// if it had been run by itself.
    pub fn row(&self, row: usize) -> Result<KvCache> {
        let valid = self.valid.get(row).ok_or_else(|| {
            LlamaError::Shape(format!("KV cache row {row} of batch {}", self.batch()))
        })?;
        let keep: Vec<u32> = (0..valid.len() as u32)
            .filter(|&i| valid[i as usize])
            .collect();
        let mut out = KvCache::with_storage(self.layers.len(), 1, self.storage);
        out.next_position[0] = self.next_position[row];
        out.valid[0] = vec![true; keep.len()];
        if keep.is_empty() {
            return Ok(out);
        }
        for (slot, layer) in out.layers.iter_mut().zip(&self.layers) {
            let Some(l) = layer else {
                return Err(LlamaError::Shape("KV cache with slots but no layer".into()));
            };
            if keep.len() == valid.len() {
                // No holes: the row's part of the buffers, shared (so the first write copies).
                *slot = Some(LayerKv {
                    k: l.k.narrow(0, row, 1)?,
                    v: l.v.narrow(0, row, 1)?,
                    owner: l.owner.clone(),
                });
                continue;
            }
            let idx = Tensor::new(keep.as_slice(), l.k.device())?;
            let pick = |t: &Tensor| -> Result<Tensor> {
                let t = t.narrow(0, row, 1)?.narrow(D::Minus2, 0, valid.len())?;
                with_room(
                    &t.contiguous()?.index_select(&idx, 2)?,
                    headroom(keep.len()),
                )
            };
            *slot = Some(LayerKv::new(pick(&l.k)?, pick(&l.v)?));
        }
        Ok(out)
    }

    /// Every row alone, as [`Self::row`] gives it.
    pub fn split(&self) -> Result<Vec<KvCache>> {
        (0..self.batch()).map(|r| self.row(r)).collect()
    }

    /// The cache of `rows` only (in that order), without the leading slots that none of them
    /// uses: dropping finished rows from a batch.
    pub fn select_rows(&self, rows: &[usize]) -> Result<KvCache> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.batch()) {
            return Err(LlamaError::Shape(format!(
                "KV cache row {bad} of batch {}",
                self.batch()
            )));
        }
        let identity = rows.len() == self.batch() && rows.iter().enumerate().all(|(i, &r)| i == r);
        let skip = rows
            .iter()
            .map(|&r| {
                self.valid[r]
                    .iter()
                    .position(|&v| v)
                    .unwrap_or(self.valid[r].len())
            })
            .min()
            .unwrap_or(0);
        if identity && skip == 0 {
            return Ok(self.clone());
        }
        let slots = self.len() - skip;
        let mut out = KvCache {
            layers: vec![None; self.layers.len()],
            valid: rows
                .iter()
                .map(|&r| self.valid[r][skip..].to_vec())
                .collect(),
            next_position: rows.iter().map(|&r| self.next_position[r]).collect(),
            storage: self.storage,
        };
        if slots == 0 || rows.is_empty() {
            return Ok(out);
        }
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        for (slot, layer) in out.layers.iter_mut().zip(&self.layers) {
            let Some(l) = layer else {
                return Err(LlamaError::Shape("KV cache with slots but no layer".into()));
            };
            let pick = |t: &Tensor| -> Result<Tensor> {
                let t = t.narrow(2, skip, slots)?;
                let t = if identity {
                    t
                } else {
                    let idx = Tensor::new(idx.as_slice(), t.device())?;
                    t.contiguous()?.index_select(&idx, 0)?
                };
                with_room(&t, headroom(slots))
            };
            *slot = Some(LayerKv::new(pick(&l.k)?, pick(&l.v)?));
        }
        Ok(out)
    }

    /// Keeps the first `len` slots. Each row's next position becomes the number of valid slots
    /// it keeps: right for caches whose real tokens sit at positions 0, 1, 2, ... (a session's,
    /// or a left-padded batch that started at 0).
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len() {
            return Ok(());
        }
        for row in 0..self.batch() {
            self.valid[row].truncate(len);
            self.next_position[row] = self.valid[row].iter().filter(|&&v| v).count() as u32;
        }
        // The buffers stay; the slots past `len` are free room again (a clone sharing them
        // still sees its own: writes copy first while the buffers are shared).
        if len == 0 {
            self.layers.iter_mut().for_each(|l| *l = None);
        }
        Ok(())
    }

    /// Adds the keys and values `[batch, kv_heads, new, head_dim]` of the tokens of this
    /// forward to `layer`; returns all of that layer's keys and values so far (views, in the
    /// cache's storage type).
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.storage {
            Some(dtype) if dtype != k.dtype() => (k.to_dtype(dtype)?, v.to_dtype(dtype)?),
            _ => (k.clone(), v.clone()),
        };
        let (k, v) = (&k, &v);
        // Slots in use before this forward (`commit` counts the new ones after all layers).
        let used = self.len();
        let slot = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| LlamaError::Shape(format!("cache has no layer {layer}")))?;
        let new = k.dim(D::Minus2)?;
        let needed = used + new;
        match slot {
            Some(l) if l.k.dim(D::Minus2)? >= needed && Arc::strong_count(&l.owner) == 1 => {
                l.k.slice_set(&k.contiguous()?, D::Minus2, used)?;
                l.v.slice_set(&v.contiguous()?, D::Minus2, used)?;
            }
            _ => {
                let (k, v) = match slot.take() {
                    None => (k.clone(), v.clone()),
                    Some(l) => {
                        let (pk, pv) = l.view(used)?;
                        (
                            Tensor::cat(&[&pk, k], D::Minus2)?,
                            Tensor::cat(&[&pv, v], D::Minus2)?,
                        )
                    }
                };
                let room = headroom(needed);
                *slot = Some(LayerKv::new(with_room(&k, room)?, with_room(&v, room)?));
            }
        }
        slot.as_ref().expect("just set").view(needed)
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
