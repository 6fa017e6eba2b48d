//! Continuous batching: rows join and leave a running batch between decode steps.
//!
//! [`decode_batch`](super::batch::decode_batch) answers a fixed set of sessions and returns when
//! the last one ends, so a request arriving meanwhile waits for the whole batch. A
//! [`ContinuousBatch`] instead runs one step at a time ([`ContinuousBatch::step`]): every live
//! row picks its next token (or forced run) under its own filter and sampling parameters, then
//! one ragged forward ([`Llama::forward_ragged_mixed`]) feeds each row what it has queued. A
//! row added between steps is prefilled in that same forward, at most `prefill_chunk` of its
//! tokens per step so that a long prompt does not stall the rows already decoding; a finished
//! row leaves at the step it ends. Each row carries its own adapter (or none): the frozen
//! projections run once over all rows. Per row, the arithmetic is what it gets alone, so
//! greedy rows decode the same tokens whatever joins or leaves around them.

use candle_core::{DType, Tensor};

use super::batch::Row;
use super::generate::StopReason;
use super::sampling::{Sampler, SamplingParams};
use super::session::{Decoded, Session, TokenFilter};
use crate::error::{LlamaError, Result};
use crate::model::llama::{Llama, RaggedRow};

/// A step's forward feeds at most this many tokens (all rows together).
const MAX_STEP_TOKENS: usize = 4096;

/// A row of the batch, known to its caller by the id [`ContinuousBatch::add`] returned.
struct Live<F> {
    id: u64,
    session: Session,
    filter: F,
    adapter: Option<String>,
    row: Row,
    /// Rows to fork from this one once its prompt has run (more choices of one request):
    /// their ids, filters and sampling parameters.
    forks: Vec<(u64, F, SamplingParams)>,
}

/// A row that left the batch: its session (holding the reply), its filter, and what it
/// decoded; or the error that ended it alone (its filter failed).
pub struct Finished<F> {
    pub id: u64,
    pub session: Session,
    pub filter: F,
    pub adapter: Option<String>,
    pub outcome: Result<Decoded>,
}

/// Rows decoding together, joining and leaving between steps. See the module documentation.
pub struct ContinuousBatch<F> {
    rows: Vec<Live<F>>,
    stop_ids: Vec<u32>,
    prefill_chunk: usize,
    next_id: u64,
}

impl<F: TokenFilter> ContinuousBatch<F> {
    /// `stop_ids` end a reply; a joining row's prompt is fed at most `prefill_chunk` tokens
    /// per step (at least 1).
    pub fn new(stop_ids: Vec<u32>, prefill_chunk: usize) -> Self {
        ContinuousBatch {
            rows: Vec::new(),
            stop_ids,
            prefill_chunk: prefill_chunk.max(1),
            next_id: 0,
        }
    }

    /// Live rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The adapter of every live row.
    pub fn adapters(&self) -> Vec<Option<String>> {
        self.rows.iter().map(|l| l.adapter.clone()).collect()
    }

    /// Takes every live row out (ids and filters, rows still to fork included), e.g. to fail
    /// them all after a step failed.
    pub fn drain(&mut self) -> Vec<(u64, F)> {
        let mut out = Vec::new();
        for l in self.rows.drain(..) {
            out.extend(l.forks.into_iter().map(|(id, f, _)| (id, f)));
            out.push((l.id, l.filter));
        }
        out
    }

    /// Adds a row that decodes a reply to `session` (its pending tokens are fed from the next
    /// step) with `adapter` (`None`: the base model), at most `max_new` tokens. Returns the
    /// row's id. The session must hold tokens, and the adapter must be loaded in the model the
    /// steps run.
    pub fn add(
        &mut self,
        session: Session,
        filter: F,
        params: SamplingParams,
        max_new: usize,
        adapter: Option<String>,
    ) -> Result<u64> {
        let ids = self.add_choices(session, vec![(filter, params)], max_new, adapter)?;
        Ok(ids[0])
    }

    /// Adds several rows answering the same `session` (OpenAI's `n`), one per filter and
    /// sampling parameters: the prompt runs once, in the first row, and the others fork from
    /// it (its KV cache and logits) before anything is sampled. Returns their ids in order.
    pub fn add_choices(
        &mut self,
        session: Session,
        choices: Vec<(F, SamplingParams)>,
        max_new: usize,
        adapter: Option<String>,
    ) -> Result<Vec<u64>> {
        if choices.is_empty() {
            return Ok(Vec::new());
        }
        let logits = match session.last_logits() {
            Some(l) => Some(l.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None if session.pending().is_empty() => {
                return Err(LlamaError::Shape(
                    "a session that holds no tokens has nothing to decode from".into(),
                ))
            }
            None => None,
        };
        let ids: Vec<u64> = (self.next_id..self.next_id + choices.len() as u64).collect();
        self.next_id += choices.len() as u64;
        let mut choices = ids.iter().copied().zip(choices);
        let (id, (filter, params)) = choices.next().expect("at least one choice");
        let row = Row {
            sampler: Sampler::new(params),
            max_new,
            fed: session.fed,
            logits,
            out: Decoded {
                tokens: Vec::new(),
                stop: StopReason::MaxTokens,
                prompt_tokens: session.len() - session.fed,
                cached_tokens: session.fed,
                forced_tokens: 0,
            },
            finished: false,
        };
        let mut live = Live {
            id,
            session,
            filter,
            adapter,
            row,
            forks: choices.map(|(id, (f, p))| (id, f, p)).collect(),
        };
        // Nothing to run first: the choices fork now.
        let forked = live.fork_if_ready();
        self.rows.push(live);
        self.rows.extend(forked);
        Ok(ids)
    }

    /// One step: every row that has run all its tokens picks what follows (rows that end
    /// here leave and are returned), then one forward feeds every live row's queued tokens.
    /// A row whose filter fails leaves with its error; the others go on. An error of the
    /// forward itself is returned: each live row's session then keeps a cache that agrees
    /// with its `cached_len`, the tokens picked this step pending.
    pub fn step(&mut self, model: &Llama) -> Result<Vec<Finished<F>>> {
        let stop_ids = &self.stop_ids;
        let mut failed = Vec::new();
        for (i, live) in self.rows.iter_mut().enumerate() {
            if live.row.fed == live.session.len() && !live.row.finished {
                if let Err(e) = live.row.step(&mut live.session, &mut live.filter, stop_ids) {
                    failed.push((i, e));
                }
            }
        }
        let mut done = Vec::new();
        let mut errors = failed.into_iter().peekable();
        let mut kept = Vec::with_capacity(self.rows.len());
        for (i, live) in std::mem::take(&mut self.rows).into_iter().enumerate() {
            let error = errors.next_if(|(j, _)| *j == i).map(|(_, e)| e);
            if error.is_none() && !live.row.finished {
                kept.push(live);
                continue;
            }
            let Live {
                id,
                mut session,
                filter,
                adapter,
                row,
                ..
            } = live;
            // The logits after the last token stay with the session (a next turn may start
            // from them) when they are all it holds.
            session.last_logits = match (row.logits, row.fed == session.len()) {
                (Some(l), true) => Some(Tensor::new(l.as_slice(), model.device())?),
                _ => None,
            };
            done.push(Finished {
                id,
                session,
                filter,
                adapter,
                outcome: match error {
                    Some(e) => Err(e),
                    None => Ok(row.out),
                },
            });
        }
        self.rows = kept;
        if !self.rows.is_empty() {
            self.forward(model)?;
        }
        Ok(done)
    }

    /// One ragged forward over the rows' queued tokens (up to `prefill_chunk` each and
    /// [`MAX_STEP_TOKENS`] in all; rows past the budget wait for the next step).
    fn forward(&mut self, model: &Llama) -> Result<()> {
        let mut budget = MAX_STEP_TOKENS;
        let mut fed = Vec::new();
        let mut ragged = Vec::new();
        let mut adapters = Vec::new();
        for (i, live) in self.rows.iter_mut().enumerate() {
            let start = live.row.fed;
            let queued = live.session.tokens.len() - start;
            // Prompts (and long forced runs) take several steps, the other rows one token.
            let len = queued.min(self.prefill_chunk.max(1)).min(budget);
            if len == 0 {
                continue;
            }
            budget -= len;
            fed.push((i, len));
            let Session { tokens, cache, .. } = &mut live.session;
            ragged.push(RaggedRow {
                tokens: &tokens[start..start + len],
                cache,
            });
            adapters.push(live.adapter.as_deref());
        }
        if ragged.is_empty() {
            return Ok(());
        }
        let logits = model
            .forward_ragged_mixed(&mut ragged, &adapters)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        let mut forked = Vec::new();
        for ((i, len), l) in fed.into_iter().zip(logits) {
            let live = &mut self.rows[i];
            live.row.fed += len;
            live.session.fed = live.row.fed;
            live.row.logits = (live.row.fed == live.session.len()).then_some(l);
            forked.extend(live.fork_if_ready());
        }
        self.rows.extend(forked);
        Ok(())
    }
}

impl<F> Live<F> {
    /// Once the prompt has run (logits, nothing sampled yet): the rows of the other choices,
    /// each with a copy of the cache and the logits.
    fn fork_if_ready(&mut self) -> Vec<Live<F>> {
        if self.forks.is_empty() || self.row.logits.is_none() || !self.row.out.tokens.is_empty() {
            return Vec::new();
        }
        std::mem::take(&mut self.forks)
            .into_iter()
            .map(|(id, filter, params)| Live {
                id,
                session: self.session.fork(),
                filter,
                adapter: self.adapter.clone(),
                row: Row {
                    sampler: Sampler::new(params),
                    max_new: self.row.max_new,
                    fed: self.row.fed,
                    logits: self.row.logits.clone(),
                    out: Decoded {
                        tokens: Vec::new(),
                        stop: StopReason::MaxTokens,
                        prompt_tokens: self.row.out.prompt_tokens,
                        cached_tokens: self.row.out.cached_tokens,
                        forced_tokens: 0,
                    },
                    finished: false,
                },
                forks: Vec::new(),
            })
            .collect()
    }
}
