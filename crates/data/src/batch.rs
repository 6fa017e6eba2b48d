//! Batches for the trainer: length-bucketed padded batches, or packed sequences.
//!
//! A [`Batch`] is plain row-major data (`rows * seq_len` values per field) that the trainer turns
//! into tensors. Every batch holds at most `max_tokens` positions (`rows * seq_len`, padding
//! included).
//!
//! - Padded: examples of similar length share a batch (sorted by length within windows of
//!   `bucket_window` examples, so that batches still mix), padded on the right with `pad_id`.
//! - Packed: several examples share a row (best-fit decreasing into rows of `pack_len`). Position
//!   ids restart at 0 for each example and `segment_ids` numbers the examples of a row (1, 2, ...;
//!   0 is padding), so the model can use a block-diagonal causal mask: position `q` may attend to
//!   `k` iff `k <= q` and `segment_ids[k] == segment_ids[q] != 0`. [`Batch::next_token_targets`]
//!   never asks a segment's last token to predict the next segment's first.
//!
//! The pad id must not be an end-of-turn id: the model has to learn to emit EOS, and a collator or
//! trainer that derives masks from `input_ids != pad_id` would mask it away.

use crate::encode::Example;
use crate::error::{DataError, Result};
use teamtune_seed::{mix64, SplitMix64};

#[derive(Debug, Clone, PartialEq)]
pub struct BatchOptions {
    /// Token budget per batch: `rows * seq_len`, padding included.
    pub max_tokens: usize,
    /// At most this many rows per batch.
    pub max_rows: Option<usize>,
    /// Pack several examples per row instead of padding each.
    pub pack: bool,
    /// Row length when packing.
    pub pack_len: usize,
    /// Round `seq_len` up to a multiple of this (1: no rounding).
    pub pad_to_multiple_of: usize,
    pub pad_id: u32,
    /// Examples sorted by length together when padding.
    pub bucket_window: usize,
    /// Shuffle seed; the epoch is mixed in.
    pub seed: u64,
    pub shuffle: bool,
}

impl BatchOptions {
    pub fn new(max_tokens: usize, pad_id: u32) -> Self {
        BatchOptions {
            max_tokens,
            max_rows: None,
            pack: false,
            pack_len: max_tokens,
            pad_to_multiple_of: 1,
            pad_id,
            bucket_window: 1024,
            seed: 0,
            shuffle: true,
        }
    }
}

/// One batch, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    /// 1 where the token is a training target.
    pub loss_mask: Vec<u8>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u8>,
    /// Position of each token within its example.
    pub position_ids: Vec<u32>,
    /// Example number within the row, from 1; 0 for padding. With padded batches every real token
    /// has segment 1.
    pub segment_ids: Vec<u32>,
    /// Whether rows hold several examples (use the block-diagonal mask).
    pub packed: bool,
    /// For each row, the indices (into the example slice) of the examples it holds, in order.
    pub examples: Vec<Vec<usize>>,
}

impl Batch {
    fn empty(rows: usize, seq_len: usize, pad_id: u32, packed: bool) -> Self {
        let n = rows * seq_len;
        Batch {
            rows,
            seq_len,
            input_ids: vec![pad_id; n],
            loss_mask: vec![0; n],
            attention_mask: vec![0; n],
            position_ids: vec![0; n],
            segment_ids: vec![0; n],
            packed,
            examples: vec![Vec::new(); rows],
        }
    }

    fn place(&mut self, row: usize, at: usize, ex: &Example, index: usize) {
        let seg = self.examples[row].len() as u32 + 1;
        let base = row * self.seq_len + at;
        let n = ex.len();
        self.input_ids[base..base + n].copy_from_slice(&ex.input_ids);
        self.loss_mask[base..base + n].copy_from_slice(&ex.loss_mask);
        self.attention_mask[base..base + n].fill(1);
        for (i, p) in self.position_ids[base..base + n].iter_mut().enumerate() {
            *p = i as u32;
        }
        self.segment_ids[base..base + n].fill(seg);
        self.examples[row].push(index);
    }

    /// Positions (padding included).
    pub fn positions(&self) -> usize {
        self.rows * self.seq_len
    }
    /// Real (non-padding) tokens.
    pub fn real_tokens(&self) -> usize {
        self.attention_mask.iter().map(|&m| m as usize).sum()
    }
    /// Tokens that carry loss. Normalise the loss of a gradient-accumulation window by the sum of
    /// this over all its micro-batches, not per micro-batch.
    pub fn trained_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m != 0).count()
    }

    /// Labels in the transformers convention (-100 where not trained), row-major.
    pub fn labels(&self) -> Vec<i64> {
        crate::encode::transformers_labels(&self.input_ids, &self.loss_mask)
    }

    /// The sum of the training weights: trained tokens, decision tokens counted
    /// `decision_weight` times (the sum of [`Batch::weighted_next_token_targets`]'s weights).
    pub fn trained_weight(&self, decision_weight: f32) -> f64 {
        self.loss_mask
            .iter()
            .map(|&m| match m {
                0 => 0.0,
                crate::DECISION => decision_weight as f64,
                _ => 1.0,
            })
            .sum()
    }

    /// Next-token targets, already shifted: for position `t` the target is the token at `t + 1`
    /// and the weight is 1 when that token is trained and belongs to the same example, else 0
    /// (target `pad_id`, safe to gather). The sum of the weights equals
    /// [`Batch::trained_tokens`], since the first token of an example is never trained.
    pub fn next_token_targets(&self, pad_id: u32) -> (Vec<u32>, Vec<f32>) {
        self.weighted_next_token_targets(pad_id, 1.0)
    }

    /// [`Batch::next_token_targets`] with weight `decision_weight` instead of 1 where the
    /// target token is a decision token ([`crate::DECISION`] in the loss mask).
    pub fn weighted_next_token_targets(
        &self,
        pad_id: u32,
        decision_weight: f32,
    ) -> (Vec<u32>, Vec<f32>) {
        let n = self.positions();
        let mut targets = vec![pad_id; n];
        let mut weights = vec![0f32; n];
        for r in 0..self.rows {
            let row = r * self.seq_len;
            for t in 0..self.seq_len.saturating_sub(1) {
                let (a, b) = (row + t, row + t + 1);
                if self.loss_mask[b] != 0
                    && self.segment_ids[a] == self.segment_ids[b]
                    && self.segment_ids[a] != 0
                {
                    targets[a] = self.input_ids[b];
                    weights[a] = if self.loss_mask[b] == crate::DECISION {
                        decision_weight
                    } else {
                        1.0
                    };
                }
            }
        }
        (targets, weights)
    }

    /// Whether query position `q` may attend to key position `k` in row `row` (causal, same
    /// example, not padding).
    pub fn may_attend(&self, row: usize, q: usize, k: usize) -> bool {
        let s = &self.segment_ids[row * self.seq_len..(row + 1) * self.seq_len];
        k <= q && s[q] != 0 && s[q] == s[k]
    }

    /// The full causal block-diagonal mask, `rows * seq_len * seq_len` bytes (1 = may attend).
    /// Memory grows with the square of `seq_len`; a fused kernel should use `segment_ids`.
    pub fn attention_matrix(&self) -> Vec<u8> {
        let l = self.seq_len;
        let mut m = vec![0u8; self.rows * l * l];
        for r in 0..self.rows {
            for q in 0..l {
                for k in 0..=q {
                    m[(r * l + q) * l + k] = self.may_attend(r, q, k) as u8;
                }
            }
        }
        m
    }
}

/// The shuffling generator of an epoch: SplitMix64 from the seed mixed with the epoch.
fn epoch_rng(seed: u64, epoch: u64) -> SplitMix64 {
    SplitMix64::new(mix64(
        seed ^ mix64(epoch.wrapping_add(0x5851_f42d_4c95_7f2d)),
    ))
}

fn round_up(n: usize, m: usize) -> usize {
    n.div_ceil(m.max(1)) * m.max(1)
}

/// Picks a padding id that is not an end-of-turn/EOS id: `preferred` when allowed, else the first
/// of the usual padding tokens the vocabulary has (`<|finetune_right_pad_id|>`,
/// `<|reserved_special_token_2|>` (the same id, 128004, in Llama-3.0 vocabularies), `<pad>`,
/// `<|pad|>`, `[PAD]`, `<|endoftext|>`, `<unk>`), else the special token with the highest id that is
/// neither an end-of-turn id nor a start token. The batches carry explicit masks, so the pad id
/// only has to be a valid id that is not EOS.
pub fn choose_pad_id(
    tokenizer: &tokenizers::Tokenizer,
    preferred: Option<u32>,
    eos_ids: &[u32],
) -> Result<u32> {
    if let Some(p) = preferred {
        if !eos_ids.contains(&p) {
            return Ok(p);
        }
    }
    for name in [
        "<|finetune_right_pad_id|>",
        "<|reserved_special_token_2|>",
        "<pad>",
        "<|pad|>",
        "[PAD]",
        "<|endoftext|>",
        "<unk>",
    ] {
        if let Some(id) = tokenizer.token_to_id(name) {
            if !eos_ids.contains(&id) {
                return Ok(id);
            }
        }
    }
    let starts = [
        "<|im_start|>",
        "<|begin_of_text|>",
        "<s>",
        "<bos>",
        "<|start_header_id|>",
    ];
    tokenizer
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(id, t)| t.special && !eos_ids.contains(id) && !starts.contains(&t.content.as_str()))
        .map(|(id, _)| id)
        .max()
        .ok_or_else(|| {
            DataError::Config(format!(
                "no padding token distinct from the end-of-turn ids {eos_ids:?}: give one explicitly"
            ))
        })
}

/// Builds the batches of one epoch. Deterministic for a given seed and epoch.
pub fn make_batches(
    examples: &[Example],
    options: &BatchOptions,
    eos_ids: &[u32],
    epoch: u64,
) -> Result<Vec<Batch>> {
    if eos_ids.contains(&options.pad_id) {
        return Err(DataError::Config(format!(
            "pad id {} is an end-of-turn id: EOS would be confused with padding",
            options.pad_id
        )));
    }
    if options.max_tokens == 0 || (options.pack && options.pack_len == 0) {
        return Err(DataError::Config(
            "the token budget must be positive".into(),
        ));
    }
    let limit = if options.pack {
        options.pack_len.min(options.max_tokens)
    } else {
        options.max_tokens
    };
    if let Some((i, e)) = examples.iter().enumerate().find(|(_, e)| e.len() > limit) {
        return Err(DataError::Config(format!(
            "example {i} ({}) has {} tokens, more than the {} a row can hold: set max_len",
            e.source,
            e.len(),
            limit
        )));
    }
    let mut rng = epoch_rng(options.seed, epoch);
    let mut order: Vec<usize> = (0..examples.len()).collect();
    if options.shuffle {
        rng.shuffle(&mut order);
    }
    let max_rows = options.max_rows.unwrap_or(usize::MAX).max(1);
    let mult = options.pad_to_multiple_of.max(1);
    let mut batches = if options.pack {
        pack(examples, &order, options, max_rows, mult)
    } else {
        pad(examples, &mut order, options, max_rows, mult)
    };
    if options.shuffle {
        rng.shuffle(&mut batches);
    }
    Ok(batches)
}

fn pad(
    examples: &[Example],
    order: &mut [usize],
    options: &BatchOptions,
    max_rows: usize,
    mult: usize,
) -> Vec<Batch> {
    let window = options.bucket_window.max(1);
    for chunk in order.chunks_mut(window) {
        chunk.sort_by_key(|&i| examples[i].len());
    }
    let mut groups: Vec<(Vec<usize>, usize)> = Vec::new();
    let mut cur: Vec<usize> = Vec::new();
    let mut cur_len = 0;
    for &i in order.iter() {
        let len = round_up(examples[i].len().max(1), mult);
        let new_len = cur_len.max(len);
        if !cur.is_empty()
            && ((cur.len() + 1) * new_len > options.max_tokens || cur.len() >= max_rows)
        {
            groups.push((std::mem::take(&mut cur), cur_len));
            cur_len = 0;
        }
        cur_len = cur_len.max(len);
        cur.push(i);
    }
    if !cur.is_empty() {
        groups.push((cur, cur_len));
    }
    groups
        .into_iter()
        .map(|(idx, seq_len)| {
            let mut b = Batch::empty(idx.len(), seq_len, options.pad_id, false);
            for (row, &i) in idx.iter().enumerate() {
                b.place(row, 0, &examples[i], i);
            }
            b
        })
        .collect()
}

fn pack(
    examples: &[Example],
    order: &[usize],
    options: &BatchOptions,
    max_rows: usize,
    mult: usize,
) -> Vec<Batch> {
    let cap = options.pack_len.min(options.max_tokens);
    // Best-fit decreasing: longest first, each into the fullest row it still fits in.
    let mut by_len: Vec<usize> = order.to_vec();
    by_len.sort_by_key(|&i| std::cmp::Reverse(examples[i].len()));
    let mut rows: Vec<(usize, Vec<usize>)> = Vec::new(); // (used, examples)
    let mut free: std::collections::BTreeMap<(usize, usize), ()> = Default::default(); // (space, row)
    for i in by_len {
        let len = examples[i].len();
        let slot = free.range((len, 0)..).next().map(|(&k, _)| k);
        let row = match slot {
            Some(key) => {
                free.remove(&key);
                key.1
            }
            None => {
                rows.push((0, Vec::new()));
                rows.len() - 1
            }
        };
        rows[row].0 += len;
        rows[row].1.push(i);
        let space = cap - rows[row].0;
        if space > 0 {
            free.insert((space, row), ());
        }
    }
    // Rows keep the shuffled order of their first example, so batches mix.
    let rank: std::collections::HashMap<usize, usize> =
        order.iter().enumerate().map(|(r, &i)| (i, r)).collect();
    for r in rows.iter_mut() {
        r.1.sort_by_key(|i| rank[i]);
    }
    rows.sort_by_key(|r| rank[&r.1[0]]);
    let per_batch = (options.max_tokens / round_up(cap, mult).max(1)).clamp(1, max_rows);
    rows.chunks(per_batch)
        .map(|chunk| {
            let seq_len = round_up(chunk.iter().map(|r| r.0).max().unwrap_or(1), mult);
            let mut b = Batch::empty(chunk.len(), seq_len, options.pad_id, true);
            for (row, (_, idx)) in chunk.iter().enumerate() {
                let mut at = 0;
                for &i in idx {
                    b.place(row, at, &examples[i], i);
                    at += examples[i].len();
                }
            }
            b
        })
        .collect()
}
