//! The in-process model as the agents: each agent's conversation is a [`Session`] whose KV
//! cache lives from turn to turn, the waiting agents of several episodes decode as one batch,
//! and (by default) every reply is decoded under its task's JSON schema.
//!
//! A turn's prompt is the conversation rendered by the chat template, as the training data
//! is. The session keeps the longest common prefix of what it holds and the new prompt and runs
//! only the rest: normally the new user turn, but also whatever changed, e.g. when a generated
//! reply re-tokenises differently as text, or a history window drops old messages. So the
//! model always sees exactly the tokens a from-scratch render would give it. The first agent
//! of an episode leaves its prompt as the episode's prefix; the others start from a fork of
//! it and keep what they share (the common start of the system prompts).

use std::collections::HashMap;

use teamtune_data::{ChatTemplate, EncodeOptions, Encoder, Message};
use teamtune_gridworld::window;
use teamtune_guide::{
    prompt_tokens, reuse_prefix, stop_tokens, PromptError, ReplyGrammar, TokenVocab,
};
use teamtune_llama::{
    decode_batch, mix_seed, ChatAssets, Llama, NoFilter, SamplingParams, Session, StopReason,
    TokenFilter,
};

use crate::error::{AgentError, Result};
use crate::policy::{Policy, PolicyReply, TurnRequest};
use crate::schema::{reply_grammar, SchemaOptions};

#[derive(Debug, Clone)]
pub struct ModelPolicyOptions {
    /// Decode under the task's reply schema (off: measure how often the model fails alone).
    pub constrained: bool,
    pub schema: SchemaOptions,
    /// Greedy by default; a non-zero temperature samples with a seed derived per turn from
    /// (this seed, episode seed, agent, round), so runs repeat.
    pub sampling: SamplingParams,
    /// Longest reply in tokens. A constrained reply may run to its schema's bound
    /// ([`SchemaOptions::max_reply_tokens`]) when that is longer: cutting it would make it
    /// invalid, and a constrained reply is valid by construction.
    pub max_new_tokens: usize,
    /// Keep the system message and the last N messages (the study's window); `None`: all.
    pub history: Option<usize>,
    /// Name in records and tables.
    pub name: String,
}

impl Default for ModelPolicyOptions {
    fn default() -> Self {
        ModelPolicyOptions {
            constrained: true,
            schema: SchemaOptions::default(),
            sampling: SamplingParams::default(),
            max_new_tokens: 512,
            history: None,
            name: "model".into(),
        }
    }
}

pub struct ModelPolicy {
    model: Llama,
    encoder: Encoder,
    vocab: Option<TokenVocab>,
    grammars: HashMap<String, ReplyGrammar>,
    sessions: HashMap<(usize, usize), Session>,
    prefixes: HashMap<usize, Session>,
    stop_ids: Vec<u32>,
    options: ModelPolicyOptions,
}

impl ModelPolicy {
    /// `model` with its adapter (if any) already active; `assets` and `template` of the model.
    pub fn new(
        model: Llama,
        assets: &ChatAssets,
        template: ChatTemplate,
        options: ModelPolicyOptions,
    ) -> Result<Self> {
        let encoder = Encoder::new(assets.tokenizer.clone(), template, EncodeOptions::default())?;
        let stop_ids = stop_tokens(encoder.end_of_turn_ids(), &assets.eos_token_ids)
            .map_err(|e| AgentError::Config(e.to_string()))?;
        let vocab = if options.constrained {
            Some(TokenVocab::new(&assets.tokenizer, &stop_ids)?)
        } else {
            None
        };
        Ok(ModelPolicy {
            model,
            encoder,
            vocab,
            grammars: HashMap::new(),
            sessions: HashMap::new(),
            prefixes: HashMap::new(),
            stop_ids,
            options,
        })
    }

    /// The token limit of one reply (see [`ModelPolicyOptions::max_new_tokens`]).
    pub fn reply_token_limit(&self) -> usize {
        if self.options.constrained {
            self.options
                .max_new_tokens
                .max(self.options.schema.max_reply_tokens())
        } else {
            self.options.max_new_tokens
        }
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The prompt tokens of a turn: the (windowed) conversation rendered with the generation
    /// prompt, tokenised as the training data is.
    pub fn prompt_tokens(&self, messages: &[Message]) -> Result<Vec<u32>> {
        let kept = match self.options.history {
            Some(n) => window(messages, n),
            None => messages.to_vec(),
        };
        let template = self.encoder.template();
        prompt_tokens(template, self.encoder.tokenizer(), &kept).map_err(|e| match e {
            PromptError::Template(e) => AgentError::Data(e),
            e @ PromptError::SpecialText => AgentError::Config(e.to_string()),
            PromptError::Tokenizer(e) => AgentError::Config(format!("tokenizing a prompt: {e}")),
        })
    }

    /// The session of `(slot, agent)` made to hold exactly `prompt`, with what it does not
    /// share with the prompt pending.
    fn session_for(&mut self, slot: usize, agent: usize, prompt: &[u32]) -> Result<Session> {
        let mut session = match self.sessions.remove(&(slot, agent)) {
            Some(s) => s,
            None => match self.prefixes.get(&slot) {
                Some(p) => p.fork(),
                None => Session::new(&self.model),
            },
        };
        reuse_prefix(&mut session, prompt)?;
        Ok(session)
    }

    fn grammar(&mut self, task: &teamtune_gridworld::TaskSpec) -> Result<ReplyGrammar> {
        let vocab = self
            .vocab
            .as_ref()
            .expect("constrained policies have a vocab");
        if !self.grammars.contains_key(&task.id) {
            let g = reply_grammar(vocab, task, &self.options.schema)?;
            self.grammars.insert(task.id.clone(), g);
        }
        Ok(self.grammars[&task.id].clone())
    }
}

impl Policy for ModelPolicy {
    fn name(&self) -> String {
        self.options.name.clone()
    }

    fn reply(&mut self, requests: &[TurnRequest<'_>]) -> Result<Vec<PolicyReply>> {
        let mut sessions = Vec::with_capacity(requests.len());
        let mut params = Vec::with_capacity(requests.len());
        let mut constraints = Vec::new();
        for r in requests {
            let prompt = self.prompt_tokens(r.messages)?;
            sessions.push(self.session_for(r.slot, r.agent, &prompt)?);
            let mut p = self.options.sampling.clone();
            let round = r.messages.len() as u64;
            p.seed = mix_seed(&[p.seed, r.seed, r.agent as u64, round]);
            params.push(p);
            if self.options.constrained {
                constraints.push(self.grammar(r.task)?.filter());
            }
        }
        let mut no_filters: Vec<NoFilter> = Vec::new();
        let mut filters: Vec<&mut dyn TokenFilter> = if self.options.constrained {
            constraints
                .iter_mut()
                .map(|c| c as &mut dyn TokenFilter)
                .collect()
        } else {
            no_filters.resize(requests.len(), NoFilter);
            no_filters
                .iter_mut()
                .map(|f| f as &mut dyn TokenFilter)
                .collect()
        };
        let started = std::time::Instant::now();
        let decoded = {
            let mut rows: Vec<&mut Session> = sessions.iter_mut().collect();
            decode_batch(
                &self.model,
                &mut rows,
                &mut filters,
                &params,
                &[self.reply_token_limit()],
                &self.stop_ids,
            )?
        };
        tracing::debug!(
            rows = decoded.len(),
            prompt_tokens = decoded.iter().map(|d| d.prompt_tokens).sum::<usize>(),
            cached_tokens = decoded.iter().map(|d| d.cached_tokens).sum::<usize>(),
            generated = decoded.iter().map(|d| d.tokens.len()).sum::<usize>(),
            forced = decoded.iter().map(|d| d.forced_tokens).sum::<usize>(),
            seconds = started.elapsed().as_secs_f64(),
            "decoded a batch of replies"
        );
        let mut replies = Vec::with_capacity(requests.len());
        for ((r, session), d) in requests.iter().zip(sessions).zip(decoded) {
            let text = self
                .encoder
                .tokenizer()
                .decode(&d.tokens, true)
                .map_err(|e| AgentError::Config(format!("decoding a reply: {e}")))?;
            if matches!(d.stop, StopReason::MaxTokens) {
                tracing::debug!(task = %r.task.id, "reply cut at the token limit");
            }
            replies.push(PolicyReply {
                text,
                prompt_tokens: d.prompt_tokens,
                generated_tokens: d.tokens.len(),
            });
            self.prefixes
                .entry(r.slot)
                .or_insert_with(|| session.fork());
            self.sessions.insert((r.slot, r.agent), session);
        }
        Ok(replies)
    }

    fn end_episode(&mut self, slot: usize) {
        self.sessions.retain(|(s, _), _| *s != slot);
        self.prefixes.remove(&slot);
    }
}
