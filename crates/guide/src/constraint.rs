//! Schema-constrained decoding of replies with llguidance.
//!
//! Three levels, by how often they are built:
//! - [`TokenVocab`], once per tokenizer (the token trie: about a second for a 128k vocabulary);
//! - [`ReplyGrammar`], once per (tokenizer, JSON schema): the compiled schema;
//! - [`ReplyConstraint`], once per reply being decoded: a clone of the grammar's fresh parser,
//!   cheap enough for one per batch row and per turn. Rows are independent: committing to one
//!   never affects another (they share only llguidance's lazily built lexer cache, behind a
//!   lock, so they may also be driven from several threads).
//!
//! The end-of-turn token (`<|eot_id|>`, `<|im_end|>`) is llguidance's end of sequence here: it
//! is allowed exactly when the JSON object is complete, and committing it ends the reply.

use std::sync::Arc;

use llguidance::api::{StopReason, TopLevelGrammar};
use llguidance::Matcher;
use serde_json::Value;
use toktrie::{SimpleVob, TokTrie};

use crate::vocab::TokenVocab;

/// Why a constraint could not be built or refused a step. `task` is the name the grammar was
/// compiled under (an agent task's id, an OpenAI response format's name).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("reply grammar for task `{task}`: {reason}")]
    Grammar { task: String, reason: String },
    /// A token that the schema does not allow at this point; the constraint is unchanged and
    /// may be used further.
    #[error("reply in task `{task}`: token {token} ({text}) refused: {reason}")]
    Rejected {
        task: String,
        token: u32,
        text: String,
        reason: String,
    },
    #[error("reply in task `{task}`: already ended with the end-of-turn token")]
    Finished { task: String },
}

/// How a reply writes its JSON beyond what the schema says; always compact (no whitespace
/// between tokens).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JsonStyle {
    /// The only characters allowed after a backslash in strings (llguidance's
    /// `json_allowed_escapes`, e.g. `nt"\`); `None`: llguidance's default.
    pub allowed_escapes: Option<String>,
}

/// A JSON schema compiled for one tokenizer.
#[derive(Clone)]
pub struct ReplyGrammar {
    shared: Arc<Shared>,
    /// A fresh parser; every constraint starts as a clone of it (compiling the grammar again
    /// would cost about a millisecond per reply).
    fresh: Matcher,
}

struct Shared {
    task: String,
    schema: Value,
    vocab: TokenVocab,
}

impl std::fmt::Debug for ReplyGrammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyGrammar")
            .field("task", &self.shared.task)
            .field("vocab", &self.shared.vocab)
            .finish()
    }
}

impl ReplyGrammar {
    /// Compiles any JSON schema (an object, e.g. an OpenAI `response_format`'s) for the
    /// vocabulary; `name` stands for the task in errors. Compact JSON, llguidance's default
    /// escapes. An invalid or unsupported schema is a [`ConstraintError::Grammar`].
    pub fn from_schema(
        vocab: &TokenVocab,
        name: &str,
        schema: &Value,
    ) -> Result<Self, ConstraintError> {
        Self::with_style(vocab, name, schema.clone(), &JsonStyle::default())
    }

    /// [`from_schema`](Self::from_schema) written in `style`. Compiling costs about as much as
    /// a hundred constraints: compile once per schema and keep the grammar.
    pub fn with_style(
        vocab: &TokenVocab,
        name: &str,
        schema: Value,
        style: &JsonStyle,
    ) -> Result<Self, ConstraintError> {
        let mut guidance = serde_json::json!({ "whitespace_flexible": false });
        if let Some(escapes) = &style.allowed_escapes {
            guidance["json_allowed_escapes"] = Value::String(escapes.clone());
        }
        Self::compile(vocab, name, schema, guidance)
    }

    fn compile(
        vocab: &TokenVocab,
        name: &str,
        schema: Value,
        guidance: Value,
    ) -> Result<Self, ConstraintError> {
        let grammar_err = |reason: String| ConstraintError::Grammar {
            task: name.to_string(),
            reason,
        };
        let mut with_options = schema.clone();
        match &mut with_options {
            Value::Object(m) => {
                m.insert("x-guidance".into(), guidance);
            }
            _ => return Err(grammar_err("a JSON schema must be an object".into())),
        }
        let parser = vocab
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(with_options))
            .map_err(|e| grammar_err(e.to_string()))?;
        let fresh = Matcher::new(Ok(parser));
        if let Some(e) = fresh.get_error() {
            return Err(grammar_err(e));
        }
        Ok(ReplyGrammar {
            shared: Arc::new(Shared {
                task: name.to_string(),
                schema,
                vocab: vocab.clone(),
            }),
            fresh,
        })
    }

    /// The constraint of one new reply.
    pub fn constraint(&self) -> ReplyConstraint {
        ReplyConstraint {
            shared: self.shared.clone(),
            matcher: self.fresh.clone(),
            done: false,
        }
    }

    /// The JSON schema compiled (without llguidance's own options), e.g. to send to an
    /// OpenAI-compatible endpoint as the response format.
    pub fn schema(&self) -> &Value {
        &self.shared.schema
    }

    /// The name the grammar was compiled under (errors call it the task).
    pub fn task(&self) -> &str {
        &self.shared.task
    }

    pub fn vocab(&self) -> &TokenVocab {
        &self.shared.vocab
    }
}

/// The set of tokens allowed at one step.
#[derive(Debug, Clone)]
pub struct TokenMask {
    vob: SimpleVob,
    vocab_size: usize,
}

impl TokenMask {
    pub fn is_allowed(&self, token: u32) -> bool {
        (token as usize) < self.vocab_size && self.vob.is_allowed(token)
    }

    pub fn allowed_ids(&self) -> Vec<u32> {
        let mut v = Vec::new();
        self.vob.iter_set_entries(|i| {
            if i < self.vocab_size {
                v.push(i as u32)
            }
        });
        v
    }

    pub fn count(&self) -> usize {
        self.vob.num_set()
    }

    /// Sets every disallowed logit to -inf. Logits past the tokenizer's vocabulary (a model
    /// whose embedding rows are padded) are disallowed too: no text maps to them.
    pub fn apply(&self, logits: &mut [f32]) {
        let words = self.vob.as_slice();
        for (i, l) in logits.iter_mut().enumerate() {
            let allowed =
                i < self.vocab_size && words.get(i / 32).is_some_and(|w| w >> (i % 32) & 1 == 1);
            if !allowed {
                *l = f32::NEG_INFINITY;
            }
        }
    }
}

/// The state of one reply being decoded: which tokens may come next.
#[derive(Clone)]
pub struct ReplyConstraint {
    shared: Arc<Shared>,
    matcher: Matcher,
    done: bool,
}

impl std::fmt::Debug for ReplyConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyConstraint")
            .field("task", &self.shared.task)
            .field("done", &self.done)
            .finish()
    }
}

impl ReplyConstraint {
    /// The tokens that may come next. After the end-of-turn token there are none: an error.
    pub fn allowed(&mut self) -> Result<TokenMask, ConstraintError> {
        self.check_live()?;
        let vob = if self.json_complete()? {
            let trie = self.trie();
            let mut v = trie.alloc_token_set();
            for &t in self.shared.vocab.end_of_turn_ids() {
                v.allow_token(t);
            }
            v
        } else {
            self.matcher
                .compute_mask()
                .map_err(|e| self.internal(e.to_string()))?
        };
        Ok(TokenMask {
            vob,
            vocab_size: self.shared.vocab.vocab_size(),
        })
    }

    /// [`allowed`](Self::allowed) applied to one row of logits.
    pub fn mask_logits(&mut self, logits: &mut [f32]) -> Result<(), ConstraintError> {
        self.allowed()?.apply(logits);
        Ok(())
    }

    /// Takes the next token of the reply. A token the schema does not allow is refused and
    /// leaves the constraint as it was.
    ///
    /// Any tokenisation of valid text is taken, also where the mask is narrower (where the
    /// schema forces text, the mask offers only the canonical token of it): so a reply
    /// tokenised as a whole, e.g. a recorded one replayed into the KV cache, is accepted.
    pub fn commit(&mut self, token: u32) -> Result<(), ConstraintError> {
        self.check_live()?;
        let complete = self.json_complete()?;
        if self.shared.vocab.end_of_turn_ids().contains(&token) {
            if complete || self.matcher.is_accepting().unwrap_or(false) {
                self.done = true;
                return Ok(());
            }
            return Err(self.rejected(token, "the reply's JSON is not complete yet"));
        }
        if complete {
            return Err(self.rejected(
                token,
                "the reply's JSON is complete; only the end-of-turn token may follow",
            ));
        }
        if (token as usize) >= self.shared.vocab.vocab_size() {
            return Err(self.rejected(token, "not in the tokenizer's vocabulary"));
        }
        match self.matcher.validate_tokens(&[token]) {
            Ok(1) => {}
            Ok(_) => return Err(self.rejected(token, "not allowed by the reply schema here")),
            Err(e) => return Err(self.internal(e.to_string())),
        }
        self.matcher
            .consume_token(token)
            .map_err(|e| self.internal(e.to_string()))
    }

    /// Commits and returns the tokens the schema forces from here (keys, punctuation, the
    /// end-of-turn token once the JSON is complete): the caller feeds them to the model as
    /// one prefill chunk instead of sampling each. Empty when the next token is a choice.
    pub fn fast_forward(&mut self) -> Result<Vec<u32>, ConstraintError> {
        if self.done {
            return Ok(Vec::new());
        }
        let mut forced = Vec::new();
        if !self.json_complete()? {
            forced = self.matcher.compute_ff_tokens();
            if let Some(e) = self.matcher.get_error() {
                return Err(self.internal(e));
            }
            if !forced.is_empty() {
                self.matcher
                    .consume_tokens(&forced)
                    .map_err(|e| self.internal(e.to_string()))?;
            }
        }
        if self.json_complete()? {
            let eot = self.shared.vocab.end_of_turn_ids()[0];
            self.done = true;
            forced.push(eot);
        }
        Ok(forced)
    }

    /// Whether the reply has ended (an end-of-turn token was committed).
    pub fn is_done(&self) -> bool {
        self.done
    }

    pub fn task(&self) -> &str {
        &self.shared.task
    }

    /// The JSON object is closed: nothing but the end-of-turn token may follow.
    fn json_complete(&self) -> Result<bool, ConstraintError> {
        if !self.matcher.is_stopped() {
            return Ok(false);
        }
        match self.matcher.stop_reason() {
            StopReason::NoExtension | StopReason::EndOfSentence => Ok(true),
            other => Err(self.internal(
                self.matcher
                    .get_error()
                    .unwrap_or_else(|| format!("the parser stopped: {other}")),
            )),
        }
    }

    fn check_live(&self) -> Result<(), ConstraintError> {
        if self.done {
            return Err(ConstraintError::Finished {
                task: self.shared.task.clone(),
            });
        }
        Ok(())
    }

    fn trie(&self) -> &TokTrie {
        self.shared.vocab.factory.tok_env().tok_trie()
    }

    fn rejected(&self, token: u32, reason: &str) -> ConstraintError {
        ConstraintError::Rejected {
            task: self.shared.task.clone(),
            token,
            text: self.shared.vocab.token_text(token),
            reason: reason.to_string(),
        }
    }

    fn internal(&self, reason: String) -> ConstraintError {
        ConstraintError::Grammar {
            task: self.shared.task.clone(),
            reason,
        }
    }
}
