//! Decoding many conversations as one batch.
//!
//! [`decode_batch`] answers several sessions at once: their pending turns are run together, and
//! each step samples one token per row under that row's [`TokenFilter`] and sampling
//! parameters. On the CPU each step is one ragged forward ([`Llama::forward_ragged_last`]):
//! the projections see every row's new tokens stacked, attention runs per session against its
//! own cache, so nothing is padded and a finished row just stops being fed. On other devices,
//! where many small per-session kernels would cost more than padding, the caches are merged
//! into one batched cache (each row left-padded with invalid slots to the longest, positions
//! kept per row) and a row that finishes has its cache row split off into its session.

use candle_core::{DType, Device, Tensor};

use super::generate::StopReason;
use super::sampling::{Sampler, SamplingParams};
use super::session::{Decoded, NoFilter, Session, TokenFilter};
use crate::error::{LlamaError, Result};
use crate::model::cache::KvCache;
use crate::model::layout::TokenLayout;
use crate::model::llama::{Llama, RaggedRow};

/// A step (or the batched prefill) may be this wide only while at most half of the fed
/// slots are padding; a row with more pending tokens feeds them over several steps (decode)
/// or runs them alone first (prefill).
const MIN_FILL: f64 = 0.5;

/// The widest step `t` (tokens fed per row) with `sum(min(len, t)) >= MIN_FILL * rows * t`.
fn plan_width(lens: &[usize]) -> usize {
    let max = lens.iter().copied().max().unwrap_or(0);
    (1..=max)
        .rev()
        .find(|&t| {
            let real: usize = lens.iter().map(|&l| l.min(t)).sum();
            real as f64 >= MIN_FILL * (lens.len() * t) as f64
        })
        .unwrap_or(1)
}

pub(super) struct Row {
    pub(super) sampler: Sampler,
    pub(super) max_new: usize,
    /// Tokens of the session that are in the batched cache.
    pub(super) fed: usize,
    /// Logits after `fed` tokens, when that is all of the session's tokens.
    pub(super) logits: Option<Vec<f32>>,
    pub(super) out: Decoded,
    pub(super) finished: bool,
}

impl Row {
    /// Chooses what follows the session's last token: the filter's forced tokens or one
    /// sampled token; records them in the session and decides whether the row is finished.
    pub(super) fn step(
        &mut self,
        session: &mut Session,
        filter: &mut dyn TokenFilter,
        stop_ids: &[u32],
    ) -> Result<()> {
        if self.out.tokens.len() >= self.max_new {
            return self.finish(StopReason::MaxTokens);
        }
        if filter.is_done() {
            return self.finish(StopReason::Callback);
        }
        let forced = filter.forced();
        if !forced.is_empty() {
            for t in forced {
                if self.accept(session, filter, t, stop_ids)? {
                    return Ok(());
                }
                self.out.forced_tokens += 1;
            }
            // A fast-forward may complete the reply as a whole: ask once it is all in.
            if filter.is_done() {
                self.finish(StopReason::Callback)?;
            }
            return Ok(());
        }
        let mut logits = self
            .logits
            .take()
            .ok_or_else(|| LlamaError::Shape("decode row without logits".into()))?;
        filter.mask(&mut logits)?;
        if logits.iter().all(|&l| l == f32::NEG_INFINITY) {
            return Err(LlamaError::Shape(
                "the token filter allowed no token at all".into(),
            ));
        }
        let n = logits.len();
        let logits = Tensor::from_vec(logits, n, &Device::Cpu)?;
        let t = self.sampler.sample(&logits, &session.tokens)?;
        if !self.accept(session, filter, t, stop_ids)? && filter.is_done() {
            self.finish(StopReason::Callback)?;
        }
        Ok(())
    }

    /// Appends `t`; true when that finished the row (stop id or token limit).
    fn accept(
        &mut self,
        session: &mut Session,
        filter: &mut dyn TokenFilter,
        t: u32,
        stop_ids: &[u32],
    ) -> Result<bool> {
        filter.commit(t)?;
        session.tokens.push(t);
        if stop_ids.contains(&t) {
            self.finish(StopReason::Eos(t))?;
            return Ok(true);
        }
        self.out.tokens.push(t);
        if self.out.tokens.len() >= self.max_new {
            self.finish(StopReason::MaxTokens)?;
            return Ok(true);
        }
        Ok(false)
    }

    fn finish(&mut self, stop: StopReason) -> Result<()> {
        self.out.stop = stop;
        self.finished = true;
        Ok(())
    }
}

/// One argument per row, or one shared by all rows.
fn per_row<'a, T>(items: &'a [T], rows: usize, what: &str) -> Result<impl Fn(usize) -> &'a T> {
    if items.len() != 1 && items.len() != rows {
        return Err(LlamaError::Shape(format!(
            "{} {what} for {rows} sessions (give one, or one per session)",
            items.len()
        )));
    }
    Ok(move |i: usize| &items[if items.len() == 1 { 0 } else { i }])
}

/// Decodes a reply for each of `sessions` together, one batch row per session, and leaves
/// each session holding its reply (so the next turn continues from its cache).
///
/// - `filters`: one per session, or empty for [`NoFilter`] everywhere.
/// - `params`, `max_new_tokens`: one per session, or one for all. Each row samples with its
///   own [`Sampler`] (seeded from its params) and the repetition-penalty history of its own
///   session's tokens, exactly as it would alone.
/// - `stop_ids`: tokens that end a reply (e.g. the end-of-turn ids).
///
/// On the CPU every step feeds each live row all it has queued (its new turn, the sampled
/// token, or a forced run), up to [`MAX_RAGGED_TOKENS`] in all, in one ragged forward. On
/// other devices each session's pending tokens are left-padded into one batched forward when
/// that wastes at most half of the work on padding (a session whose turn is much longer runs
/// it alone first), forced runs follow the same padding rule per step, and finished rows leave
/// the batch at once. With greedy params and no filter, every row gets the tokens it gets alone
/// (the arithmetic per row is the same up to float summation order).
///
/// On error, each session keeps a cache that agrees with its `cached_len` (what ran before the
/// error), with the rest of its tokens, decoded ones included, pending; filters may have
/// advanced.
pub fn decode_batch(
    model: &Llama,
    sessions: &mut [&mut Session],
    filters: &mut [&mut dyn TokenFilter],
    params: &[SamplingParams],
    max_new_tokens: &[usize],
    stop_ids: &[u32],
) -> Result<Vec<Decoded>> {
    let ragged = model.device().is_cpu();
    decode_batch_with(
        model,
        sessions,
        filters,
        params,
        max_new_tokens,
        stop_ids,
        ragged,
    )
}

/// [`decode_batch`] with the loop chosen by the caller (tests run both on the CPU).
fn decode_batch_with(
    model: &Llama,
    sessions: &mut [&mut Session],
    filters: &mut [&mut dyn TokenFilter],
    params: &[SamplingParams],
    max_new_tokens: &[usize],
    stop_ids: &[u32],
    ragged: bool,
) -> Result<Vec<Decoded>> {
    let n = sessions.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    if !filters.is_empty() && filters.len() != n {
        return Err(LlamaError::Shape(format!(
            "{} token filters for {n} sessions (give none, or one per session)",
            filters.len()
        )));
    }
    let params_of = per_row(params, n, "sampling params")?;
    let max_of = per_row(max_new_tokens, n, "token limits")?;

    // The prefill: rows whose pending turn is far longer than the rest run it alone (padding
    // them all to it would waste more than it saves); the others go into the first batched
    // step. A row with nothing pending samples from its stored logits (one token to feed).
    // On the CPU every prefill-sized turn runs alone: tens of tokens already keep gemm
    // arithmetic-bound, so a batched prefill saves little, while in one forward each row's
    // new tokens attend over the whole merged cache, padding included (agents of different
    // episodes differ in history several-fold).
    let before: Vec<(usize, usize)> = sessions.iter().map(|s| (s.fed, s.len())).collect();
    if !ragged {
        let pending: Vec<usize> = sessions.iter().map(|s| s.pending().len().max(1)).collect();
        let width = plan_width(&pending);
        for s in sessions.iter_mut() {
            if s.pending().len() > width {
                s.flush(model)?;
            }
        }
    }

    let mut rows = Vec::with_capacity(n);
    for (i, s) in sessions.iter().enumerate() {
        let logits = match s.last_logits() {
            Some(l) => Some(l.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None if s.pending().is_empty() => {
                return Err(LlamaError::Shape(format!(
                    "session {i} holds no tokens: nothing to decode from"
                )))
            }
            None => None,
        };
        rows.push(Row {
            sampler: Sampler::new(params_of(i).clone()),
            max_new: *max_of(i),
            fed: s.fed,
            logits,
            out: Decoded {
                tokens: Vec::new(),
                stop: StopReason::MaxTokens,
                prompt_tokens: before[i].1 - before[i].0,
                cached_tokens: before[i].0,
                forced_tokens: 0,
            },
            finished: false,
        });
    }

    let mut stats = BatchStats::default();
    if ragged {
        decode_ragged(model, sessions, filters, &mut rows, stop_ids, &mut stats)?;
    } else {
        decode_merged(model, sessions, filters, &mut rows, stop_ids, &mut stats)?;
    }
    tracing::debug!(
        rows = n,
        forwards = stats.forwards,
        fed = stats.fed,
        padding = stats.padding,
        max_slots = stats.max_slots,
        forward_s = stats.forward_s,
        pick_s = stats.pick_s,
        "decode_batch"
    );
    Ok(rows.into_iter().map(|r| r.out).collect())
}

/// A ragged forward feeds at most this many tokens (all rows together), so that a batch of
/// long new turns does not hold activations for all of them at once; rows over the limit
/// feed the rest of their turn in the next steps.
const MAX_RAGGED_TOKENS: usize = 4096;

/// Lets every row that has run all its tokens pick what comes next (see [`Row::step`]).
fn pick_all(
    members: &[usize],
    rows: &mut [Row],
    sessions: &mut [&mut Session],
    filters: &mut [&mut dyn TokenFilter],
    stop_ids: &[u32],
    stats: &mut BatchStats,
) -> Result<()> {
    let picking = std::time::Instant::now();
    let mut no_filter = NoFilter;
    for &i in members {
        let (row, s) = (&mut rows[i], &mut *sessions[i]);
        if row.fed == s.len() && !row.finished {
            let filter: &mut dyn TokenFilter = if filters.is_empty() {
                &mut no_filter
            } else {
                &mut *filters[i]
            };
            row.step(s, filter, stop_ids)?;
        }
    }
    stats.pick_s += picking.elapsed().as_secs_f64();
    Ok(())
}

/// The CPU loop: every session keeps its own cache and each step is one
/// [`Llama::forward_ragged_last`] over the rows still decoding, each feeding all it has
/// queued (the new turn, a sampled token or a forced run). Nothing is padded, and a finished
/// row simply stops being fed: no cache is merged, split or copied.
fn decode_ragged(
    model: &Llama,
    sessions: &mut [&mut Session],
    filters: &mut [&mut dyn TokenFilter],
    rows: &mut [Row],
    stop_ids: &[u32],
    stats: &mut BatchStats,
) -> Result<()> {
    let mut members: Vec<usize> = (0..sessions.len()).collect();
    loop {
        pick_all(&members, rows, sessions, filters, stop_ids, stats)?;
        for &i in &members {
            if rows[i].finished {
                let (row, s) = (&rows[i], &mut *sessions[i]);
                s.last_logits = match (&row.logits, row.fed == s.len()) {
                    (Some(l), true) => Some(Tensor::new(l.as_slice(), model.device())?),
                    _ => None,
                };
            }
        }
        members.retain(|&i| !rows[i].finished);
        if members.is_empty() {
            return Ok(());
        }
        let mut budget = MAX_RAGGED_TOKENS;
        let mut fed = Vec::new();
        let mut ragged = Vec::new();
        for (i, session) in sessions.iter_mut().enumerate() {
            if budget == 0 {
                break;
            }
            if rows[i].finished {
                continue;
            }
            let Session { tokens, cache, .. } = &mut **session;
            let start = rows[i].fed;
            let len = (tokens.len() - start).min(budget);
            budget -= len;
            fed.push((i, len));
            ragged.push(RaggedRow {
                tokens: &tokens[start..start + len],
                cache,
            });
        }
        let forward = std::time::Instant::now();
        let logits = model
            .forward_ragged_last(&mut ragged)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        stats.forwards += 1;
        stats.forward_s += forward.elapsed().as_secs_f64();
        for ((i, len), l) in fed.into_iter().zip(logits) {
            stats.fed += len;
            let (row, s) = (&mut rows[i], &mut *sessions[i]);
            row.fed += len;
            // The cache holds these tokens now: the session says so even if a later step
            // fails.
            s.fed = row.fed;
            row.logits = (row.fed == s.len()).then_some(l);
            stats.max_slots = stats.max_slots.max(s.cache.len());
        }
    }
}

/// The loop for devices where many small per-sequence kernels cost more than padding: the
/// sessions' caches are merged into one left-padded batch, finished rows are split off.
fn decode_merged(
    model: &Llama,
    sessions: &mut [&mut Session],
    filters: &mut [&mut dyn TokenFilter],
    rows: &mut [Row],
    stop_ids: &[u32],
    stats: &mut BatchStats,
) -> Result<()> {
    let n = sessions.len();
    let caches: Vec<&KvCache> = sessions.iter().map(|s| &s.cache).collect();
    let mut batch = KvCache::merge(&caches)?;
    // Batch row -> session index.
    let mut members: Vec<usize> = (0..n).collect();
    loop {
        // Every row that has run all its tokens picks what comes next.
        pick_all(&members, rows, sessions, filters, stop_ids, stats)?;
        // Finished rows leave the batch now rather than being fed padding to the end: their
        // cache rows are split off once (one copy of the batch's cache, like one step's
        // append), after which every step computes and caches only live rows. Feeding padding
        // instead would cost each later step the finished rows' projections, attention and
        // cache growth, and replies differ widely in length.
        if members.iter().any(|&i| rows[i].finished) {
            let mut keep = Vec::new();
            for (b, &i) in members.iter().enumerate() {
                if rows[i].finished {
                    let (row, s) = (&mut rows[i], &mut *sessions[i]);
                    s.cache = batch.row(b)?;
                    s.fed = row.fed;
                    s.last_logits = match (&row.logits, row.fed == s.len()) {
                        (Some(l), true) => Some(Tensor::new(l.as_slice(), model.device())?),
                        _ => None,
                    };
                } else {
                    keep.push(b);
                }
            }
            if keep.is_empty() {
                break;
            }
            batch = batch.select_rows(&keep)?;
            members = keep.iter().map(|&b| members[b]).collect();
        }

        // One forward: each row feeds its next tokens (normally the one just sampled; a
        // forced run or the new turn may be longer), left-padded to the widest.
        let queued: Vec<usize> = members
            .iter()
            .map(|&i| sessions[i].len() - rows[i].fed)
            .collect();
        let width = plan_width(&queued);
        let lens: Vec<usize> = queued.iter().map(|&q| q.min(width)).collect();
        let mut ids = Vec::with_capacity(members.len() * width);
        for (&i, &len) in members.iter().zip(&lens) {
            ids.extend(std::iter::repeat_n(0u32, width - len));
            let fed = rows[i].fed;
            ids.extend_from_slice(&sessions[i].tokens[fed..fed + len]);
        }
        let ids = Tensor::from_vec(ids, (members.len(), width), model.device())?;
        let layout = TokenLayout::left_padded(&lens, batch.next_positions());
        let forward = std::time::Instant::now();
        let logits = model
            .forward_last(&ids, &layout, Some(&mut batch))?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        stats.forwards += 1;
        stats.fed += lens.iter().sum::<usize>();
        stats.padding += members.len() * width - lens.iter().sum::<usize>();
        stats.forward_s += forward.elapsed().as_secs_f64();
        tracing::trace!(
            rows = members.len(),
            width,
            slots = batch.len(),
            seconds = forward.elapsed().as_secs_f64(),
            "forward"
        );
        stats.max_slots = stats.max_slots.max(batch.len());
        for ((&i, &len), l) in members.iter().zip(&lens).zip(logits) {
            let row = &mut rows[i];
            row.fed += len;
            row.logits = (row.fed == sessions[i].len()).then_some(l);
        }
    }
    Ok(())
}

/// Where a [`decode_batch`] call spent its work (logged at debug level).
#[derive(Debug, Default)]
struct BatchStats {
    forwards: usize,
    /// Real tokens fed through the batched forwards.
    fed: usize,
    /// Padding slots fed beside them.
    padding: usize,
    /// The batched cache's widest slot count (padding included).
    max_slots: usize,
    forward_s: f64,
    /// Masks, fast-forwards and sampling.
    pick_s: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LlamaConfig, WeightSource};

    /// The merged loop runs only on non-CPU devices in use; here both loops decode the same
    /// sessions (different histories, new turns of different lengths, a token limit and a
    /// stop id) and must give the same replies and leave sessions that continue alike.
    #[test]
    fn the_ragged_and_the_merged_loop_decode_alike() {
        let m = tiny_model();
        let ids = |seed: u32, n: usize| -> Vec<u32> {
            (0..n as u32)
                .map(|i| 4 + (seed * 131 + i * 17) % 300)
                .collect()
        };
        let mut sessions = Vec::new();
        for (k, (hist, new)) in [(0, 9), (14, 3), (5, 1), (30, 40)].into_iter().enumerate() {
            let mut s = Session::new(&m);
            if hist > 0 {
                s.prefill(&m, &ids(k as u32, hist)).unwrap();
            }
            s.push(&ids(10 + k as u32, new));
            sessions.push(s);
        }
        let params = [SamplingParams::default()];
        let limits = [12, 5, 12, 12];
        let run = |ragged: bool| {
            let mut s = sessions.clone();
            let mut refs: Vec<&mut Session> = s.iter_mut().collect();
            let out =
                decode_batch_with(&m, &mut refs, &mut [], &params, &limits, &[7], ragged).unwrap();
            (out, s)
        };
        let (ragged, mut after_ragged) = run(true);
        let (merged, mut after_merged) = run(false);
        assert_eq!(ragged, merged);
        assert!(ragged.iter().any(|d| d.tokens.len() > 1));
        // The next turn continues alike from either loop's sessions.
        for (a, b) in after_ragged.iter_mut().zip(after_merged.iter_mut()) {
            assert_eq!(a.tokens(), b.tokens());
            let (la, lb) = (
                a.prefill(&m, &[9, 10]).unwrap(),
                b.prefill(&m, &[9, 10]).unwrap(),
            );
            let diff = (la - lb).unwrap().abs().unwrap().max(0).unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
        }
    }

    /// New turns that add up to more than one ragged forward may feed: the row that crosses
    /// the budget feeds part of its turn in one step and the rest in the next, while the rows
    /// after it wait. Every row must still reply as it does alone.
    #[test]
    fn turns_over_the_ragged_token_budget_decode_as_alone() {
        let m = tiny_model();
        let ids = |seed: u32, n: usize| -> Vec<u32> {
            (0..n as u32)
                .map(|i| 4 + (seed * 131 + i * 17 + i * i / 7) % 300)
                .collect()
        };
        let turns = [(0, 1000), (12, 900), (0, 1000), (5, 800), (0, 700), (3, 1)];
        let total: usize = turns.iter().map(|(h, n)| h + n).sum();
        assert!(total > MAX_RAGGED_TOKENS, "the test must cross the budget");
        let sessions: Vec<Session> = turns
            .iter()
            .enumerate()
            .map(|(k, &(hist, new))| {
                let mut s = Session::new(&m);
                if hist > 0 {
                    s.prefill(&m, &ids(k as u32, hist)).unwrap();
                }
                s.push(&ids(20 + k as u32, new));
                s
            })
            .collect();
        let params = [SamplingParams::default()];
        let limits = [6];

        let mut together = sessions.clone();
        let mut refs: Vec<&mut Session> = together.iter_mut().collect();
        let batched =
            decode_batch_with(&m, &mut refs, &mut [], &params, &limits, &[], true).unwrap();
        for (k, s) in sessions.iter().enumerate() {
            let mut alone = s.clone();
            let reply =
                decode_batch_with(&m, &mut [&mut alone], &mut [], &params, &limits, &[], true)
                    .unwrap()
                    .remove(0);
            assert_eq!(batched[k], reply, "row {k}");
            assert_eq!(together[k].tokens(), alone.tokens(), "row {k}");
            assert_eq!(together[k].cached_len(), alone.cached_len(), "row {k}");
            let (a, b) = (
                together[k].prefill(&m, &[9]).unwrap(),
                alone.prefill(&m, &[9]).unwrap(),
            );
            let diff = (a - b).unwrap().abs().unwrap().max(0).unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-4, "row {k}");
        }
    }

    fn tiny_model() -> Llama {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama31");
        let cfg = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
        let weights = WeightSource::safetensors(vec![dir.join("model.safetensors")]).unwrap();
        Llama::load(&cfg, &weights, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn width_keeps_padding_at_most_half() {
        assert_eq!(plan_width(&[1, 1, 1]), 1);
        assert_eq!(plan_width(&[5]), 5);
        assert_eq!(plan_width(&[300, 280, 290, 1]), 300);
        // One long turn among short ones: the short ones set the width.
        assert_eq!(plan_width(&[300, 50, 50, 50]), 150);
        assert_eq!(plan_width(&[6, 1, 1, 1, 1, 1, 1, 1]), 2);
        assert_eq!(plan_width(&[6, 6, 6, 6, 1, 1, 1, 1]), 6);
    }
}
