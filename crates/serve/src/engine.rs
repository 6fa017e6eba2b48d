//! The model worker: one thread owns the model and decodes every running request together,
//! one step at a time (continuous batching).
//!
//! Requests wait in a bounded queue (full: [`ServeError::QueueFull`], a 429). Before each decode
//! step the worker moves the oldest waiting requests into the batch's free rows (up to
//! `max_batch` rows); their prompts are fed in the same ragged forward as the other rows'
//! tokens, at most `prefill_chunk` per step. Each row has its own adapter (or none), sampling
//! parameters, token limit, stop sequences and (for JSON replies) grammar: adapters share a
//! batch. Text streams out as it is decoded: the row's [`TokenFilter`] sees every token the
//! decoder appends, so it turns them into text, watches for stop sequences and for the client
//! having gone away (its receiver dropped), and ends the row there; a row that ends leaves the
//! batch at that step and is answered at once. A row whose grammar fails fails alone; a failed
//! forward fails the rows of that step, and the worker goes on with the next requests.
//!
//! With a prefix-cache budget, finished conversations keep their sessions (KV caches), keyed
//! by adapter: a request whose prompt starts like one of them (an agent's next turn, the same
//! system prompt) starts from a fork of it and runs only what differs.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use teamtune_guide::{common_prefix, reuse_prefix, ConstraintFilter, ReplyGrammar, TokenVocab};
use teamtune_llama::{
    ContinuousBatch, Finished, Llama, SamplingParams, Session, StopReason, TextStream, TokenFilter,
};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::oneshot;

use crate::api::{FinishReason, Usage};
use crate::error::{Result, ServeError};
use crate::logprobs::TokenLogprobs;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Most requests decoded together (1: one at a time).
    pub max_batch: usize,
    /// Most requests waiting (not yet decoding); one more is refused with a 429.
    pub queue_size: usize,
    /// Tokens of finished conversations whose KV caches are kept (per adapter) so that a
    /// request continuing one (an agent's next turn, a shared system prompt) runs only what
    /// is new; 0 keeps none.
    pub prefix_cache_tokens: usize,
    /// Most prompt tokens a joining request feeds per decode step, so that a long prompt
    /// does not stall the rows already decoding (at least 1).
    pub prefill_chunk: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            max_batch: 8,
            queue_size: 64,
            prefix_cache_tokens: 0,
            prefill_chunk: 256,
        }
    }
}

/// One request for the worker.
pub struct Job {
    /// The adapter to decode with; `None`: the base model.
    pub adapter: Option<String>,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub grammar: Option<ReplyGrammar>,
    /// Send text deltas as they come (streamed requests); otherwise only [`Event::Done`].
    pub stream: bool,
    /// Replies to the prompt (OpenAI's `n`, at least 1): the prompt runs once and the choices
    /// fork from it; choice `i` samples with the seed plus `i`.
    pub n: usize,
    /// Report each token's log-probability, with this many alternatives.
    pub logprobs: Option<usize>,
    pub events: UnboundedSender<Event>,
}

/// What the worker tells a request's handler.
#[derive(Debug)]
pub enum Event {
    /// New text of a choice's reply (streamed requests only).
    Text {
        choice: usize,
        text: String,
    },
    /// A choice's reply is complete: all of its text, why it ended, the token counts.
    Done {
        choice: usize,
        text: String,
        finish: FinishReason,
        usage: Usage,
        /// OpenAI's `logprobs` object, when asked for.
        logprobs: Option<serde_json::Value>,
    },
    Failed(ServeError),
}

/// Counters for `/health` and the tests.
#[derive(Debug, Default)]
struct Counters {
    running: AtomicUsize,
    completed: AtomicUsize,
    cancelled: AtomicUsize,
    failed: AtomicUsize,
    batches: AtomicUsize,
    largest_batch: AtomicUsize,
    generated_tokens: AtomicUsize,
    cached_prompt_tokens: AtomicUsize,
}

/// A snapshot of the engine's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub queued: usize,
    pub running: usize,
    pub completed: usize,
    pub cancelled: usize,
    pub failed: usize,
    pub batches: usize,
    pub largest_batch: usize,
    pub generated_tokens: usize,
    /// Prompt tokens taken from the prefix cache instead of being run again.
    pub cached_prompt_tokens: usize,
}

/// A change to the served adapters, made by the worker between decode steps. `done` gets
/// the outcome (dropped unanswered if the server stops first).
pub enum AdapterChange {
    /// Load a PEFT adapter folder under `name`.
    Load {
        name: String,
        dir: PathBuf,
        done: oneshot::Sender<Result<()>>,
    },
    /// Remove the adapter once no running or waiting request uses it.
    Unload {
        name: String,
        done: oneshot::Sender<Result<()>>,
    },
}

struct Queue {
    jobs: VecDeque<Job>,
    changes: Vec<AdapterChange>,
    closing: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    counters: Counters,
    /// Set on shutdown past its grace period: every running row ends at its next token.
    cancel_all: AtomicBool,
    config: EngineConfig,
}

/// The handle of the model worker.
pub struct Engine {
    shared: Arc<Shared>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Starts the worker thread; it owns `model` (with its adapters loaded) from now on.
    /// `stop_ids` end a reply (the first is the turn end the grammars append).
    /// `vocab` gives the tokens' bytes (for `logprobs`).
    pub fn start(
        model: Llama,
        tokenizer: Tokenizer,
        vocab: TokenVocab,
        stop_ids: Vec<u32>,
        config: EngineConfig,
    ) -> Self {
        let config = EngineConfig {
            max_batch: config.max_batch.max(1),
            ..config
        };
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                changes: Vec::new(),
                closing: false,
            }),
            wake: Condvar::new(),
            counters: Counters::default(),
            cancel_all: AtomicBool::new(false),
            config,
        });
        let worker = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("model-worker".into())
                .spawn(move || Worker::new(model, tokenizer, vocab, stop_ids, shared).run())
                .expect("spawn the model worker thread")
        };
        Engine {
            shared,
            worker: Mutex::new(Some(worker)),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.config
    }

    /// Queues a request, or refuses it when the queue is full or the engine is closing.
    pub fn submit(&self, job: Job) -> Result<()> {
        let mut q = self.shared.queue.lock().expect("queue lock");
        if q.closing {
            return Err(ServeError::ShuttingDown);
        }
        if q.jobs.len() >= self.shared.config.queue_size {
            return Err(ServeError::QueueFull {
                waiting: q.jobs.len(),
                retry_after_s: 1,
            });
        }
        q.jobs.push_back(job);
        drop(q);
        self.shared.wake.notify_one();
        Ok(())
    }

    /// Asks the worker to load or unload an adapter between two decode steps.
    pub fn change_adapter(&self, change: AdapterChange) -> Result<()> {
        let mut q = self.shared.queue.lock().expect("queue lock");
        if q.closing {
            return Err(ServeError::ShuttingDown);
        }
        q.changes.push(change);
        drop(q);
        self.shared.wake.notify_one();
        Ok(())
    }

    pub fn stats(&self) -> Stats {
        let queued = self.shared.queue.lock().expect("queue lock").jobs.len();
        let c = &self.shared.counters;
        let get = |a: &AtomicUsize| a.load(Ordering::SeqCst);
        Stats {
            queued,
            running: get(&c.running),
            completed: get(&c.completed),
            cancelled: get(&c.cancelled),
            failed: get(&c.failed),
            batches: get(&c.batches),
            largest_batch: get(&c.largest_batch),
            generated_tokens: get(&c.generated_tokens),
            cached_prompt_tokens: get(&c.cached_prompt_tokens),
        }
    }

    /// Ends every running and waiting request at its next token (shutdown past its grace).
    pub fn cancel_all(&self) {
        self.shared.cancel_all.store(true, Ordering::SeqCst);
    }

    /// Refuses new requests, lets the worker finish what is queued and running, and joins it.
    pub fn shutdown(&self) {
        self.shared.queue.lock().expect("queue lock").closing = true;
        self.shared.wake.notify_all();
        if let Some(worker) = self.worker.lock().expect("worker lock").take() {
            if worker.join().is_err() {
                tracing::error!("the model worker panicked");
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct Worker {
    model: Llama,
    tokenizer: Tokenizer,
    vocab: TokenVocab,
    stop_ids: Vec<u32>,
    shared: Arc<Shared>,
    /// Finished conversations by adapter (a cache belongs to the adapter that filled it),
    /// oldest first.
    prefixes: Vec<(Option<String>, Session)>,
    /// Unloads waiting for the requests that use their adapter to finish.
    unloading: Vec<(String, oneshot::Sender<Result<()>>)>,
}

impl Worker {
    fn new(
        model: Llama,
        tokenizer: Tokenizer,
        vocab: TokenVocab,
        stop_ids: Vec<u32>,
        shared: Arc<Shared>,
    ) -> Self {
        Worker {
            model,
            tokenizer,
            vocab,
            stop_ids,
            shared,
            prefixes: Vec::new(),
            unloading: Vec::new(),
        }
    }

    /// Loads adapters and takes in unloads; then removes every unloading adapter that no
    /// running (`in_use`) or waiting request uses any more.
    fn change_adapters(&mut self, changes: Vec<AdapterChange>, in_use: &[Option<String>]) {
        for change in changes {
            match change {
                AdapterChange::Load { name, dir, done } => {
                    let outcome = if self.model.adapter(&name).is_some() {
                        Err(ServeError::invalid_value(
                            format!("an adapter named `{name}` is already loaded"),
                            "lora_name",
                        ))
                    } else {
                        match self.model.load_adapter(&name, &dir) {
                            Ok(_) => {
                                tracing::info!(adapter = %name, dir = %dir.display(), "adapter loaded");
                                Ok(())
                            }
                            Err(e) => Err(ServeError::invalid_value(
                                format!("cannot load the adapter from {}: {e}", dir.display()),
                                "lora_path",
                            )),
                        }
                    };
                    let _ = done.send(outcome);
                }
                AdapterChange::Unload { name, done } => self.unloading.push((name, done)),
            }
        }
        if self.unloading.is_empty() {
            return;
        }
        let queued: Vec<Option<String>> = {
            let q = self.shared.queue.lock().expect("queue lock");
            q.jobs.iter().map(|j| j.adapter.clone()).collect()
        };
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.unloading)
            .into_iter()
            .partition(|(name, _)| {
                let used = |a: &Option<String>| a.as_deref() == Some(name.as_str());
                !in_use.iter().any(used) && !queued.iter().any(used)
            });
        self.unloading = waiting;
        for (name, done) in ready {
            self.model.remove_adapter(&name);
            self.prefixes
                .retain(|(a, _)| a.as_deref() != Some(name.as_str()));
            tracing::info!(adapter = %name, "adapter unloaded");
            let _ = done.send(Ok(()));
        }
    }

    /// The decode loop: admit waiting requests into the free rows, run one step, answer
    /// the rows that ended; until closing with nothing left.
    fn run(mut self) {
        let tokenizer = self.tokenizer.clone();
        let vocab = self.vocab.clone();
        let stop_ids = self.stop_ids.clone();
        let shared = self.shared.clone();
        let config = &shared.config;
        let mut batch = ContinuousBatch::new(stop_ids.clone(), config.prefill_chunk);
        while let Some((jobs, changes)) = self.admit(batch.len()) {
            self.change_adapters(changes, &batch.adapters());
            for job in jobs {
                // Unloaded between the request's check and now: it fails alone.
                if let Some(name) = job
                    .adapter
                    .as_deref()
                    .filter(|n| self.model.adapter(n).is_none())
                {
                    self.fail(&job.events, ServeError::ModelNotFound(name.to_string()));
                    continue;
                }
                let session = match self.session_for(&job.adapter, &job.prompt) {
                    Ok(s) => s,
                    Err(e) => {
                        self.fail(&job.events, e);
                        continue;
                    }
                };
                let choices = (0..job.n.max(1))
                    .map(|choice| {
                        let mut params = job.params.clone();
                        params.seed = params.seed.wrapping_add(choice as u64);
                        let filter = RowFilter::new(
                            &job,
                            choice,
                            &tokenizer,
                            &vocab,
                            &stop_ids,
                            &shared.cancel_all,
                        );
                        (filter, params)
                    })
                    .collect();
                if let Err(e) =
                    batch.add_choices(session, choices, job.max_tokens, job.adapter.clone())
                {
                    self.fail(&job.events, ServeError::from(e));
                }
            }
            if batch.is_empty() {
                continue;
            }
            let c = &shared.counters;
            c.running.store(batch.len(), Ordering::SeqCst);
            c.batches.fetch_add(1, Ordering::SeqCst);
            c.largest_batch.fetch_max(batch.len(), Ordering::SeqCst);
            // The step runs on one of rayon's workers (teamtune_llama::on_compute_threads says
            // why); this thread sleeps meanwhile.
            let model = &self.model;
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                teamtune_llama::on_compute_threads(|| batch.step(model))
            }));
            let failure = match outcome {
                Ok(Ok(finished)) => {
                    // Counted out before their replies go: a client that has its reply never
                    // sees its row still running in /health.
                    c.running.store(batch.len(), Ordering::SeqCst);
                    for f in finished {
                        self.answer(f);
                    }
                    None
                }
                Ok(Err(e)) => Some(ServeError::from(e)),
                Err(_) => Some(ServeError::Internal("the model worker panicked".into())),
            };
            // A failed forward leaves no row in a known state: every live row fails.
            if let Some(e) = failure {
                let rows = batch.drain();
                tracing::error!(error = %e, rows = rows.len(), "a decode step failed");
                for (_, filter) in rows {
                    self.fail(filter.events(), e.clone());
                }
            }
            c.running.store(batch.len(), Ordering::SeqCst);
            // Rows that ended may have been the last users of an adapter being unloaded.
            if !self.unloading.is_empty() {
                self.change_adapters(Vec::new(), &batch.adapters());
            }
        }
        tracing::debug!("model worker stopped");
    }

    /// Waiting requests for the `live` rows' free places, oldest first, and the adapter
    /// changes asked for; waits when nothing runs. `None` once closing with nothing queued or
    /// running.
    fn admit(&mut self, live: usize) -> Option<(Vec<Job>, Vec<AdapterChange>)> {
        let mut q = self.shared.queue.lock().expect("queue lock");
        loop {
            // Requests whose client left while waiting are dropped unanswered.
            let before = q.jobs.len();
            q.jobs.retain(|j| !j.events.is_closed());
            let gone = before - q.jobs.len();
            if gone > 0 {
                self.shared
                    .counters
                    .cancelled
                    .fetch_add(gone, Ordering::SeqCst);
            }
            if live > 0 || !q.jobs.is_empty() || !q.changes.is_empty() {
                break;
            }
            if q.closing {
                return None;
            }
            q = self.shared.wake.wait(q).expect("queue lock");
        }
        let free = self.shared.config.max_batch.saturating_sub(live);
        let take = free.min(q.jobs.len());
        let changes = std::mem::take(&mut q.changes);
        Some((q.jobs.drain(..take).collect(), changes))
    }

    fn fail(&self, events: &UnboundedSender<Event>, e: ServeError) {
        self.shared.counters.failed.fetch_add(1, Ordering::SeqCst);
        let _ = events.send(Event::Failed(e));
    }

    /// Answers a row that left the batch and keeps its conversation for the prefix cache.
    fn answer(&mut self, f: Finished<RowFilter<'_>>) {
        let c = &self.shared.counters;
        let d = match f.outcome {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "a request failed");
                self.fail(f.filter.events(), ServeError::from(e));
                return;
            }
        };
        c.generated_tokens
            .fetch_add(d.tokens.len(), Ordering::SeqCst);
        c.cached_prompt_tokens
            .fetch_add(d.cached_tokens, Ordering::SeqCst);
        let mut filter = f.filter;
        if filter.cancelled() {
            c.cancelled.fetch_add(1, Ordering::SeqCst);
        } else {
            let finish = match d.stop {
                StopReason::MaxTokens if !filter.stopped => FinishReason::Length,
                _ => FinishReason::Stop,
            };
            let usage = Usage {
                prompt_tokens: filter.prompt_tokens,
                completion_tokens: d.tokens.len(),
                cached_tokens: d.cached_tokens,
            };
            let events = filter.events.clone();
            let filter_choice = filter.choice;
            let vocab = filter.vocab;
            let logprobs = filter.logprobs.take();
            match filter.finish() {
                Ok(text) => {
                    c.completed.fetch_add(1, Ordering::SeqCst);
                    let logprobs = logprobs.map(|l| l.to_json(vocab, text.len()));
                    let _ = events.send(Event::Done {
                        choice: filter_choice,
                        logprobs,
                        text,
                        finish,
                        usage,
                    });
                }
                Err(e) => self.fail(&events, e),
            }
        }
        self.keep_prefix(&f.adapter, f.session);
    }

    /// A session holding `prompt`: a fork of the kept conversation of the same adapter that
    /// shares the longest start with it (only the rest pending), or a new one.
    fn session_for(&mut self, adapter: &Option<String>, prompt: &[u32]) -> Result<Session> {
        let best = self
            .prefixes
            .iter()
            .enumerate()
            .filter(|(_, (a, _))| a == adapter)
            .map(|(i, (_, s))| (i, common_prefix(&s.tokens()[..s.cached_len()], prompt)))
            .max_by_key(|&(_, n)| n);
        let mut session = match best {
            Some((i, n)) if n > 0 => {
                let s = self.prefixes[i].1.fork();
                // Used again: it is evicted last.
                let entry = self.prefixes.remove(i);
                self.prefixes.push(entry);
                s
            }
            _ => Session::new(&self.model),
        };
        reuse_prefix(&mut session, prompt)?;
        Ok(session)
    }

    /// Keeps a finished conversation for later requests, evicting the least recently used
    /// past the token budget.
    fn keep_prefix(&mut self, adapter: &Option<String>, session: Session) {
        let budget = self.shared.config.prefix_cache_tokens;
        if budget == 0 || session.cached_len() == 0 || session.cached_len() > budget {
            return;
        }
        // A conversation that another kept one extends (or equals) is not worth keeping too.
        self.prefixes.retain(|(a, s)| {
            !(a == adapter && common_prefix(s.tokens(), session.tokens()) >= s.cached_len())
        });
        self.prefixes.push((adapter.clone(), session));
        let mut total: usize = self.prefixes.iter().map(|(_, s)| s.cached_len()).sum();
        while total > budget {
            let (_, old) = self.prefixes.remove(0);
            total -= old.cached_len();
        }
    }
}

/// One row of a batch: the grammar (if any), text as it decodes, stop sequences,
/// cancellation.
struct RowFilter<'a> {
    constrained: Option<ConstraintFilter>,
    text_stream: TextStream<'a>,
    stop_ids: &'a [u32],
    stops: Vec<String>,
    prompt_tokens: usize,
    /// Which of the request's choices this row answers.
    choice: usize,
    vocab: &'a TokenVocab,
    logprobs: Option<TokenLogprobs>,
    /// Longest stop sequence in bytes: text that might be the start of one is held back.
    hold: usize,
    /// The reply's text so far (cut at a stop sequence once one is found).
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
    /// A stop sequence was found: the reply is complete.
    stopped: bool,
    stream: bool,
    events: UnboundedSender<Event>,
    cancel_all: &'a AtomicBool,
}

impl<'a> RowFilter<'a> {
    fn new(
        job: &Job,
        choice: usize,
        tokenizer: &'a Tokenizer,
        vocab: &'a TokenVocab,
        stop_ids: &'a [u32],
        cancel_all: &'a AtomicBool,
    ) -> Self {
        RowFilter {
            constrained: job.grammar.as_ref().map(ReplyGrammar::filter),
            text_stream: TextStream::new(tokenizer),
            stop_ids,
            hold: job.stop.iter().map(String::len).max().unwrap_or(0),
            stops: job.stop.clone(),
            prompt_tokens: job.prompt.len(),
            choice,
            vocab,
            logprobs: job.logprobs.map(TokenLogprobs::new),
            text: String::new(),
            sent: 0,
            stopped: false,
            stream: job.stream,
            events: job.events.clone(),
            cancel_all,
        }
    }

    fn events(&self) -> &UnboundedSender<Event> {
        &self.events
    }

    /// The client left (its receiver is gone) or the server is shutting down.
    fn cancelled(&self) -> bool {
        self.events.is_closed() || self.cancel_all.load(Ordering::Relaxed)
    }

    /// Appends decoded text: cuts it at the first stop sequence, and sends what can no longer
    /// be the start of one.
    fn add_text(&mut self, piece: &str) {
        if self.stopped {
            return;
        }
        self.text.push_str(piece);
        let search_from = self.sent.saturating_sub(self.hold);
        let search_from = floor_char_boundary(&self.text, search_from);
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.text[search_from..].find(s.as_str()))
            .min();
        let safe = match found {
            Some(pos) => {
                self.text.truncate(search_from + pos);
                self.stopped = true;
                self.text.len()
            }
            None => floor_char_boundary(
                &self.text,
                self.text.len().saturating_sub(self.hold.saturating_sub(1)),
            ),
        };
        self.send_upto(safe);
    }

    fn send_upto(&mut self, end: usize) {
        if end > self.sent {
            if self.stream {
                let _ = self.events.send(Event::Text {
                    choice: self.choice,
                    text: self.text[self.sent..end].to_string(),
                });
            }
            self.sent = end;
        }
    }

    /// The decode ended: flushes the held-back text; returns the whole reply.
    fn finish(mut self) -> Result<String> {
        if !self.stopped {
            if let Some(rest) = self.text_stream.finish()? {
                self.add_text(&rest);
            }
        }
        let end = self.text.len();
        self.send_upto(end);
        Ok(self.text)
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

impl TokenFilter for RowFilter<'_> {
    fn forced(&mut self) -> Vec<u32> {
        match &mut self.constrained {
            Some(c) => c.forced(),
            None => Vec::new(),
        }
    }

    fn mask(&mut self, logits: &mut [f32]) -> teamtune_llama::Result<()> {
        if let Some(l) = &mut self.logprobs {
            l.observe(logits);
        }
        match &mut self.constrained {
            Some(c) => c.mask(logits),
            None => Ok(()),
        }
    }

    fn commit(&mut self, token: u32) -> teamtune_llama::Result<()> {
        if let Some(c) = &mut self.constrained {
            c.commit(token)?;
        }
        if self.stop_ids.contains(&token) || self.stopped {
            return Ok(());
        }
        if let Some(l) = &mut self.logprobs {
            l.record(token);
        }
        if let Some(piece) = self.text_stream.push(token)? {
            self.add_text(&piece);
        }
        Ok(())
    }

    fn is_done(&self) -> bool {
        self.stopped || self.cancelled() || self.constrained.as_ref().is_some_and(|c| c.is_done())
    }
}
