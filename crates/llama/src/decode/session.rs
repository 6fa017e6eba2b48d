//! Conversations that keep their KV cache from turn to turn.
//!
//! A [`Session`] is one conversation: the tokens it holds and the keys and values of those
//! already run through the model (its own batch-1 [`KvCache`]). A new turn is appended with
//! [`Session::push`] (run later, together with other sessions) or [`Session::prefill`] (run
//! now); only the new tokens go through the model. [`Session::fork`] copies a session cheaply
//! (candle tensors are reference-counted and a cache only ever grows by new tensors), so a
//! shared prefix such as a system prompt is run once and forked per agent.
//!
//! Decoding many sessions as one batch is [`decode_batch`] (in `batch`).

use candle_core::{DType, Tensor};

use super::batch::decode_batch;
use super::generate::StopReason;
use super::sampling::SamplingParams;
use crate::error::{LlamaError, Result};
use crate::model::cache::KvCache;
use crate::model::layout::TokenLayout;
use crate::model::llama::Llama;

/// Constrained decoding: which tokens a reply may continue with. Implemented e.g. over a
/// grammar engine; [`NoFilter`] allows everything.
pub trait TokenFilter {
    /// Tokens that must come next whatever the model says (grammar fast-forward); empty if
    /// none. They are fed to the model without sampling and each is passed to
    /// [`commit`](Self::commit) like a sampled token (an implementation whose fast-forward
    /// already advanced its state should ignore those commits).
    fn forced(&mut self) -> Vec<u32> {
        Vec::new()
    }
    /// Set disallowed entries of `logits` (one row, vocab-sized, f32) to -inf before sampling.
    fn mask(&mut self, logits: &mut [f32]) -> Result<()>;
    /// The sampled (or forced) token was appended.
    fn commit(&mut self, token: u32) -> Result<()>;
    /// The reply is complete (e.g. the grammar accepted and the end-of-turn token was
    /// committed).
    fn is_done(&self) -> bool;
}

/// The filter that allows every token and never ends a reply.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoFilter;

impl TokenFilter for NoFilter {
    fn mask(&mut self, _logits: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn commit(&mut self, _token: u32) -> Result<()> {
        Ok(())
    }
    fn is_done(&self) -> bool {
        false
    }
}

/// One conversation's state: the tokens it holds, the KV cache of those already run, and the
/// logits after the last of them.
///
/// `tokens()[..cached_len()]` are in the cache; the rest (`pending()`) were appended but not
/// run yet (a new turn pushed for a batched prefill, or the last token a decode produced,
/// which the next forward feeds). Positions run 0, 1, 2, ... over `tokens()`. A cache belongs
/// to the model (and active adapter) that filled it.
#[derive(Debug, Clone)]
pub struct Session {
    pub(super) cache: KvCache,
    pub(super) tokens: Vec<u32>,
    pub(super) fed: usize,
    /// `[vocab]` f32 after `tokens[fed - 1]`; `None` while tokens are pending.
    pub(super) last_logits: Option<Tensor>,
}

impl Session {
    /// An empty conversation for `model`.
    pub fn new(model: &Llama) -> Self {
        Session {
            cache: model.new_cache(1),
            tokens: Vec::new(),
            fed: 0,
            last_logits: None,
        }
    }

    /// Every token of the conversation, pending ones included.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// How many tokens the KV cache holds.
    pub fn cached_len(&self) -> usize {
        self.fed
    }

    /// Appended tokens not yet run through the model.
    pub fn pending(&self) -> &[u32] {
        &self.tokens[self.fed..]
    }

    /// The position id the next token to run gets.
    pub fn next_position(&self) -> u32 {
        self.fed as u32
    }

    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// The logits `[vocab]` (f32) after the last token, if every token has been run.
    pub fn last_logits(&self) -> Option<&Tensor> {
        self.last_logits.as_ref().filter(|_| self.fed == self.len())
    }

    /// Appends `tokens` (e.g. a user turn and the assistant header) without running them: the
    /// next [`prefill`](Self::prefill), [`flush`](Self::flush) or [`decode_batch`] does.
    pub fn push(&mut self, tokens: &[u32]) {
        if !tokens.is_empty() {
            self.tokens.extend_from_slice(tokens);
            self.last_logits = None;
        }
    }

    /// Appends `tokens` and runs everything pending through the model now (one forward over
    /// the new tokens only); returns the logits `[vocab]` after the last token.
    pub fn prefill(&mut self, model: &Llama, tokens: &[u32]) -> Result<Tensor> {
        self.push(tokens);
        self.flush(model)
    }

    /// Runs the pending tokens (if any); returns the logits `[vocab]` after the last token.
    pub fn flush(&mut self, model: &Llama) -> Result<Tensor> {
        if self.fed == self.len() {
            return self.last_logits.clone().ok_or_else(|| {
                LlamaError::Shape("the session holds no tokens: nothing to predict from".into())
            });
        }
        let new = &self.tokens[self.fed..];
        let ids = Tensor::new(new, model.device())?.unsqueeze(0)?;
        let layout = TokenLayout::contiguous(1, new.len(), self.cache.next_positions()[0]);
        let logits = model
            .forward_last(&ids, &layout, Some(&mut self.cache))?
            .squeeze(0)?
            .to_dtype(DType::F32)?;
        self.fed = self.len();
        self.last_logits = Some(logits.clone());
        Ok(logits)
    }

    /// An independent copy that shares the tensors of the cache so far (no copy of them).
    pub fn fork(&self) -> Session {
        self.clone()
    }

    /// Keeps the first `len` tokens (a history window: keep the system prompt, then push the
    /// messages to keep again). Cached tokens beyond `len` leave the cache.
    pub fn truncate(&mut self, len: usize) -> Result<()> {
        if len >= self.len() {
            return Ok(());
        }
        self.tokens.truncate(len);
        if len < self.fed {
            self.cache.truncate(len)?;
            self.fed = len;
            self.last_logits = None;
        }
        Ok(())
    }

    /// Decodes this session alone: [`decode_batch`] with one row.
    pub fn decode(
        &mut self,
        model: &Llama,
        filter: &mut dyn TokenFilter,
        params: &SamplingParams,
        max_new_tokens: usize,
        stop_ids: &[u32],
    ) -> Result<Decoded> {
        let mut out = decode_batch(
            model,
            &mut [self],
            &mut [filter],
            std::slice::from_ref(params),
            &[max_new_tokens],
            stop_ids,
        )?;
        Ok(out.remove(0))
    }
}

/// What one session's decode produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// New tokens, forced ones included, the stop token excluded (it is in the session,
    /// pending, so the next turn's forward runs it).
    pub tokens: Vec<u32>,
    /// `Eos(id)`: a stop id came (sampled or forced); `MaxTokens`: the row's limit;
    /// `Callback`: the row's [`TokenFilter::is_done`] said the reply is complete.
    pub stop: StopReason,
    /// Tokens of the session that were pending when the call began (the new turn), run as
    /// the prompt of this reply.
    pub prompt_tokens: usize,
    /// Tokens that were already in the session's KV cache (not recomputed).
    pub cached_tokens: usize,
    /// How many of `tokens` the filter forced rather than the sampler chose.
    pub forced_tokens: usize,
}
