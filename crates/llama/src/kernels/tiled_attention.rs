//! Attention for training as one op, `softmax(q k^T * scale + bias) v`, computed a block of
//! query rows at a time so that no `[heads, time, keys]` tensor exists: neither the scores nor
//! the probabilities are stored for the backward, which recomputes them block by block from two
//! numbers per query row (the row's maximum and its sum of exponentials).
//!
//! A block of query rows takes its scores against the keys it may see at once (one
//! `[rows, keys]` tile, about `QUERY_BLOCK x context` floats per thread), so its softmax is
//! exact in two passes and needs none of flash attention's running rescaling; on a CPU the wider
//! tile makes fewer, larger products. The query heads of one grouped-query group share their
//! keys and values, so a block holds the same time steps of every head of the group: one
//! product against the keys serves them all, and the key and value gradients sum over the
//! whole group in one product (three times the depth of a single head's). Keys a block cannot see (the future of a causal mask, other
//! conversations of a packed row, padding at either end) are never multiplied: each query row's
//! visible keys are a range read from the bias once per forward.
//!
//! Only f32 on the CPU runs here; other dtypes and devices take the composed form
//! ([`super::attention_probs`] then `probs v`). The backward is deterministic: every query block
//! writes its own rows of `dq`, and the key and value gradients are summed from per-chunk
//! partials in a fixed order, whatever the number of threads.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use candle_core::{
    bail, CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;

use super::attention::{attention_probs, bias_rows};
use super::cpu::{contiguous_slice, gemm_f32};
use super::rows as simd;

/// Query rows per tile (all heads of a group together; at least one time step per block).
pub const QUERY_BLOCK: usize = 192;

/// Query rows whose key and value gradients share one partial sum in the backward: several
/// chunks per head give the threads balanced work under a causal mask, and the number of
/// partials (hence the summation order) depends on the shapes only. Four blocks of a group per
/// chunk: at 4,096 tokens one block per chunk meant ~200 MB of fresh partials per layer, and
/// their page faults and summing cost 4% of the op (`benches/attention.rs`).
const CHUNK_ROWS: usize = 4 * QUERY_BLOCK;

/// `softmax(q k^T * scale + bias) v` for `q` `[b, g, r, d]` and `k`, `v` `[b, g, s, d]`:
/// `[b, g, r, d]`. `bias` (additive; 0 where a query may attend, `-inf` where not) is
/// `[b or 1, 1, t, s]` with `r` a multiple of `t`: query row `i` uses bias row `i % t`, which is
/// how grouped-query attention stacks its query heads along time. Gradients flow to `q`, `k`
/// and `v`, not to the bias.
pub fn tiled_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let fused = q.device().is_cpu() && [q, k, v].iter().all(|x| x.dtype() == DType::F32);
    if !fused {
        return attention_probs(q, k, bias, scale)?
            .to_dtype(v.dtype())?
            .matmul(v);
    }
    let bias = match bias {
        Some(b) => Some(b.to_dtype(DType::F32)?.contiguous()?),
        None => None,
    };
    let op = TiledAttention {
        scale: scale as f32,
        bias,
        saved: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

struct TiledAttention {
    scale: f32,
    bias: Option<Tensor>,
    /// What the forward leaves for the backward.
    saved: Mutex<Option<Arc<Saved>>>,
}

/// Per query row: the maximum of its scaled, biased scores and the sum of their exponentials.
struct Saved {
    max: Vec<f32>,
    sum: Vec<f32>,
}

/// The shapes of one call and which keys each query row sees.
struct Plan {
    b: usize,
    g: usize,
    r: usize,
    s: usize,
    d: usize,
    /// Time steps (`t`, the rows of the bias), query heads per group (`r / t`) and whether the
    /// bias has one row set per batch row.
    t: usize,
    n_rep: usize,
    bias_per_batch: bool,
    /// `[lo, hi)` of the visible keys of each bias row (`[bias batch, t]`).
    ranges: Vec<(usize, usize)>,
    blocks: Vec<Block>,
}

/// The query rows of consecutive time steps of every head of one group, head by head: row `i`
/// of a block is time step `time0 + i % times` of the group's head `i / times`, which is row
/// `(i / times) * t + time0 + i % times` of `q`. The blocks' rows, one block after the other,
/// are the op's "block order", in which its tiles, statistics and `dq` are kept.
#[derive(Clone, Copy)]
struct Block {
    /// `batch * g + group`.
    head: usize,
    /// First time step and how many.
    time0: usize,
    times: usize,
    /// Rows (`times * n_rep`) and the first of them in block order.
    rows: usize,
    offset: usize,
    /// The union of the rows' visible keys.
    keys: (usize, usize),
}

impl Plan {
    fn new(lq: &Layout, lk: &Layout, lv: &Layout, bias: Option<(&[f32], &Layout)>) -> Result<Self> {
        let (b, g, r, d) = lq.shape().dims4()?;
        let (bk, gk, s, dk) = lk.shape().dims4()?;
        if (bk, gk, dk) != (b, g, d) || lv.shape().dims() != lk.shape().dims() {
            bail!(
                "tiled attention: q {:?}, k {:?} and v {:?} do not fit",
                lq.shape(),
                lk.shape(),
                lv.shape()
            )
        }
        let (t, bias_per_batch, ranges) = match bias {
            None => (r.max(1), false, vec![(0, s); r.max(1)]),
            Some((values, layout)) => {
                let (bb, t) = bias_rows("tiled attention", layout, (b, g, r, s))?;
                let ranges = values.chunks(s.max(1)).map(visible_range).collect();
                (t, bb == b && b > 1, ranges)
            }
        };
        let n_rep = r / t;
        let step = (QUERY_BLOCK / n_rep.max(1)).max(1);
        let mut blocks = Vec::new();
        let mut offset = 0;
        for head in 0..b * g {
            let bias_row0 = if bias_per_batch { head / g * t } else { 0 };
            for time0 in (0..t).step_by(step) {
                let times = step.min(t - time0);
                let keys = ranges[bias_row0 + time0..bias_row0 + time0 + times]
                    .iter()
                    .filter(|(lo, hi)| lo < hi)
                    .fold((s, 0), |(lo, hi), &(l, h)| (lo.min(l), hi.max(h)));
                let keys = if keys.0 < keys.1 { keys } else { (0, 0) };
                let rows = times * n_rep;
                blocks.push(Block {
                    head,
                    time0,
                    times,
                    rows,
                    offset,
                    keys,
                });
                offset += rows;
            }
        }
        Ok(Self {
            b,
            g,
            r,
            s,
            d,
            t,
            n_rep,
            bias_per_batch,
            ranges,
            blocks,
        })
    }

    /// The bias row and visible keys of time step `time` of head `head`.
    fn row_mask(&self, head: usize, time: usize) -> (usize, (usize, usize)) {
        let bias_row = if self.bias_per_batch {
            head / self.g * self.t
        } else {
            0
        } + time;
        (bias_row, self.ranges[bias_row])
    }

    /// Where the rows of `block` lie in a `[b, g, r, d]` tensor: one run of `times * d`
    /// values per head of the group, in block order.
    fn runs(&self, block: &Block) -> impl Iterator<Item = std::ops::Range<usize>> + '_ {
        let Block {
            head, time0, times, ..
        } = *block;
        let len = times * self.d;
        (0..self.n_rep).map(move |rep| {
            let at = (head * self.r + rep * self.t + time0) * self.d;
            at..at + len
        })
    }

    /// The rows of `block` copied out of `x` (`[b, g, r, d]`) into `tile`, in block order.
    fn gather<'a>(&self, block: &Block, x: &[f32], tile: &'a mut Vec<f32>) -> &'a [f32] {
        let tile = self::tile(tile, block.rows * self.d);
        let mut at = 0;
        for run in self.runs(block) {
            tile[at..at + run.len()].copy_from_slice(&x[run.clone()]);
            at += run.len();
        }
        tile
    }

    /// `x` in block order (every block's rows, one block after the other) laid out as
    /// `[b, g, r, d]`.
    fn to_tensor_order(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        for block in &self.blocks {
            let mut at = block.offset * self.d;
            for run in self.runs(block) {
                out[run.clone()].copy_from_slice(&x[at..at + run.len()]);
                at += run.len();
            }
        }
        out
    }
}

/// The keys a bias row lets through: from its first to its last finite entry (masked keys in
/// between keep their `-inf` and get zero probability).
fn visible_range(row: &[f32]) -> (usize, usize) {
    match row.iter().position(|x| x.is_finite()) {
        None => (0, 0),
        Some(lo) => (
            lo,
            row.iter().rposition(|x| x.is_finite()).unwrap_or(lo) + 1,
        ),
    }
}

thread_local! {
    /// Per thread, reused across blocks and calls: two score-sized tiles, and two for a
    /// block's query rows and output gradients gathered from their heads.
    static TILES: RefCell<[Vec<f32>; 4]> = const {
        RefCell::new([Vec::new(), Vec::new(), Vec::new(), Vec::new()])
    };
}

impl TiledAttention {
    /// The elements of the bias, if any, with its layout.
    fn with_bias<R>(&self, f: impl FnOnce(Option<(&[f32], &Layout)>) -> Result<R>) -> Result<R> {
        let Some(bias) = &self.bias else {
            return f(None);
        };
        let (storage, layout) = bias.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            bail!("tiled attention: the bias is not on the CPU")
        };
        f(Some((
            contiguous_slice::<f32>(cpu, layout, "attention bias")?,
            layout,
        )))
    }

    /// The probabilities of `block` against its keys, in `p` (`[rows, keys]`): the scores
    /// `q k^T` of the block's rows `qb` and keys `kb`, scaled, biased, and normalised with the
    /// saved statistics (the backward) or with new ones written to `stats` (the forward).
    #[allow(clippy::too_many_arguments)]
    fn probabilities(
        &self,
        plan: &Plan,
        block: &Block,
        bias: Option<&[f32]>,
        (qb, kb): (&[f32], &[f32]),
        p: &mut [f32],
        saved: Option<&Saved>,
        stats: Option<(&mut [f32], &mut [f32])>,
    ) {
        let (klo, khi) = block.keys;
        let width = khi - klo;
        let d = plan.d;
        gemm_f32(
            block.rows,
            width,
            d,
            p,
            width,
            false,
            (qb, d, 1),
            (kb, 1, d),
            1,
        );
        let mut stats = stats;
        for i in 0..block.rows {
            let time = block.time0 + i % block.times;
            let (bias_row, (lo, hi)) = plan.row_mask(block.head, time);
            let x = &mut p[i * width..(i + 1) * width];
            if lo >= hi {
                x.fill(0.0);
                continue;
            }
            let (lo, hi) = (lo - klo, hi - klo);
            x[..lo].fill(0.0);
            x[hi..].fill(0.0);
            let x = &mut x[lo..hi];
            let bias = bias.map(|v| &v[bias_row * plan.s + klo + lo..bias_row * plan.s + klo + hi]);
            let global = block.offset + i;
            match (saved, stats.as_mut()) {
                (Some(saved), _) => {
                    simd::scaled_exp(x, self.scale, bias, saved.max[global], saved.sum[global]);
                }
                (None, Some((max, sum))) => {
                    let (m, s) = simd::softmax(x, self.scale, bias);
                    max[i] = m;
                    sum[i] = s;
                }
                (None, None) => unreachable!("the forward keeps its statistics"),
            }
        }
    }
}

impl CustomOp3 for TiledAttention {
    fn name(&self) -> &'static str {
        "tiled-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        lq: &Layout,
        k: &CpuStorage,
        lk: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let q = contiguous_slice::<f32>(q, lq, "q")?;
        let k = contiguous_slice::<f32>(k, lk, "k")?;
        let v = contiguous_slice::<f32>(v, lv, "v")?;
        self.with_bias(|bias| {
            let plan = Plan::new(lq, lk, lv, bias)?;
            let bias = bias.map(|(values, _)| values);
            let (r, s, d) = (plan.r, plan.s, plan.d);
            let rows = plan.b * plan.g * r;
            // In block order; laid out as q at the end.
            let mut out = vec![0f32; rows * d];
            let mut max = vec![0f32; rows];
            let mut sum = vec![1f32; rows];
            // Each block owns its rows of the output and statistics: split them off in order.
            let mut tasks = Vec::with_capacity(plan.blocks.len());
            let (mut o_rest, mut m_rest, mut s_rest) = (&mut out[..], &mut max[..], &mut sum[..]);
            for block in &plan.blocks {
                let (o, o_next) = o_rest.split_at_mut(block.rows * d);
                let (m, m_next) = m_rest.split_at_mut(block.rows);
                let (sm, s_next) = s_rest.split_at_mut(block.rows);
                tasks.push((block, o, m, sm));
                (o_rest, m_rest, s_rest) = (o_next, m_next, s_next);
            }
            tasks.into_par_iter().for_each(|(block, o, m, sm)| {
                let (klo, khi) = block.keys;
                let width = khi - klo;
                if width == 0 {
                    return;
                }
                let kb = &k[(block.head * s + klo) * d..][..width * d];
                let vb = &v[(block.head * s + klo) * d..][..width * d];
                TILES.with_borrow_mut(|[p, _, qt, _]| {
                    let qb = plan.gather(block, q, qt);
                    let p = tile(p, block.rows * width);
                    self.probabilities(&plan, block, bias, (qb, kb), p, None, Some((m, sm)));
                    // o = p v
                    gemm_f32(
                        block.rows,
                        d,
                        width,
                        o,
                        d,
                        false,
                        (p, width, 1),
                        (vb, d, 1),
                        1,
                    );
                });
            });
            *self.saved.lock().unwrap_or_else(|e| e.into_inner()) =
                Some(Arc::new(Saved { max, sum }));
            let out = plan.to_tensor_order(&out);
            Ok((CpuStorage::F32(out), lq.shape().clone()))
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(saved) = self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            bail!("tiled attention: backward before forward")
        };
        let grad = grad.contiguous()?;
        let guards = [q, k, v, &grad].map(|t| t.storage_and_layout());
        let mut slices = Vec::with_capacity(4);
        for (storage, layout) in &guards {
            let Storage::Cpu(cpu) = &**storage else {
                bail!("tiled attention: backward off the CPU")
            };
            slices.push(contiguous_slice::<f32>(
                cpu,
                layout,
                "tiled attention input",
            )?);
        }
        let (lq, lk, lv) = (guards[0].1, guards[1].1, guards[2].1);
        let (dq, dk, dv) = self.with_bias(|bias| {
            let plan = Plan::new(lq, lk, lv, bias)?;
            let bias = bias.map(|(values, _)| values);
            Ok(self.backward(
                &plan,
                bias,
                &saved,
                [slices[0], slices[1], slices[2], slices[3]],
            ))
        })?;
        drop(guards);
        let device = Device::Cpu;
        Ok((
            Some(Tensor::from_vec(dq, lq.shape().clone(), &device)?),
            Some(Tensor::from_vec(dk, lk.shape().clone(), &device)?),
            Some(Tensor::from_vec(dv, lv.shape().clone(), &device)?),
        ))
    }
}

/// Consecutive blocks of one head whose key and value gradients go to one partial sum.
struct Chunk<'a> {
    blocks: &'a [Block],
    keys: (usize, usize),
    dq: &'a mut [f32],
}

/// One chunk's key and value gradients, over its keys from `keys_from` on.
struct Partial {
    head: usize,
    keys_from: usize,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

impl TiledAttention {
    /// `(dq, dk, dv)` from `[q, k, v, d out]`.
    fn backward(
        &self,
        plan: &Plan,
        bias: Option<&[f32]>,
        saved: &Saved,
        [q, k, v, dout]: [&[f32]; 4],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let (r, s, d) = (plan.r, plan.s, plan.d);
        let heads = plan.b * plan.g;
        // In block order, like the statistics.
        let mut dq = vec![0f32; heads * r * d];
        // Chunks in order, each a run of blocks of one head with at most CHUNK_ROWS rows.
        let mut chunks: Vec<Chunk> = Vec::new();
        let mut rest = &mut dq[..];
        let mut i = 0;
        while i < plan.blocks.len() {
            let head = plan.blocks[i].head;
            let mut j = i;
            let mut rows = 0;
            while j < plan.blocks.len()
                && plan.blocks[j].head == head
                && (j == i || rows + plan.blocks[j].rows <= CHUNK_ROWS)
            {
                rows += plan.blocks[j].rows;
                j += 1;
            }
            let blocks = &plan.blocks[i..j];
            let keys = blocks
                .iter()
                .filter(|b| b.keys.0 < b.keys.1)
                .fold((s, 0), |(lo, hi), b| (lo.min(b.keys.0), hi.max(b.keys.1)));
            let keys = if keys.0 < keys.1 { keys } else { (0, 0) };
            let (mine, next) = rest.split_at_mut(rows * d);
            chunks.push(Chunk {
                blocks,
                keys,
                dq: mine,
            });
            rest = next;
            i = j;
        }
        // Each chunk: its rows of dq, and partial dk, dv over its keys.
        let partials: Vec<Partial> = chunks
            .into_par_iter()
            .map(|chunk| {
                let (clo, chi) = chunk.keys;
                let mut dk = vec![0f32; (chi - clo) * d];
                let mut dv = vec![0f32; (chi - clo) * d];
                let mut dq_rest = &mut chunk.dq[..];
                for block in chunk.blocks {
                    let (dq_b, next) = dq_rest.split_at_mut(block.rows * d);
                    dq_rest = next;
                    let (klo, khi) = block.keys;
                    let width = khi - klo;
                    if width == 0 {
                        continue;
                    }
                    let kb = &k[(block.head * s + klo) * d..][..width * d];
                    let vb = &v[(block.head * s + klo) * d..][..width * d];
                    let dk_b = &mut dk[(klo - clo) * d..][..width * d];
                    let dv_b = &mut dv[(klo - clo) * d..][..width * d];
                    TILES.with_borrow_mut(|[p, dp, qt, gt]| {
                        let qb = plan.gather(block, q, qt);
                        let gb = plan.gather(block, dout, gt);
                        let n = block.rows * width;
                        let p = tile(p, n);
                        let dp = tile(dp, n);
                        self.probabilities(plan, block, bias, (qb, kb), p, Some(saved), None);
                        // dv += p^T d_out
                        gemm_f32(
                            width,
                            d,
                            block.rows,
                            dv_b,
                            d,
                            true,
                            (p, 1, width),
                            (gb, d, 1),
                            1,
                        );
                        // dp = d_out v^T, then ds = scale * p * (dp - sum(dp * p)) in place.
                        gemm_f32(
                            block.rows,
                            width,
                            d,
                            dp,
                            width,
                            false,
                            (gb, d, 1),
                            (vb, 1, d),
                            1,
                        );
                        for i in 0..block.rows {
                            let row = i * width..(i + 1) * width;
                            simd::softmax_grad(&p[row.clone()], &mut dp[row], self.scale);
                        }
                        // dq = ds k, dk += ds^T q
                        gemm_f32(
                            block.rows,
                            d,
                            width,
                            dq_b,
                            d,
                            false,
                            (dp, width, 1),
                            (kb, d, 1),
                            1,
                        );
                        gemm_f32(
                            width,
                            d,
                            block.rows,
                            dk_b,
                            d,
                            true,
                            (dp, 1, width),
                            (qb, d, 1),
                            1,
                        );
                    });
                }
                Partial {
                    head: chunk.blocks[0].head,
                    keys_from: clo,
                    dk,
                    dv,
                }
            })
            .collect();
        // Sum the partials of each head in chunk order.
        let mut dk = vec![0f32; heads * s * d];
        let mut dv = vec![0f32; heads * s * d];
        dk.par_chunks_mut(s * d)
            .zip(dv.par_chunks_mut(s * d))
            .enumerate()
            .for_each(|(head, (dk, dv))| {
                for p in partials.iter().filter(|p| p.head == head) {
                    let lo = p.keys_from;
                    for (x, y) in dk[lo * d..][..p.dk.len()].iter_mut().zip(&p.dk) {
                        *x += y;
                    }
                    for (x, y) in dv[lo * d..][..p.dv.len()].iter_mut().zip(&p.dv) {
                        *x += y;
                    }
                }
            });
        (plan.to_tensor_order(&dq), dk, dv)
    }
}

/// The first `n` elements of a reused buffer.
fn tile(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    &mut buf[..n]
}
