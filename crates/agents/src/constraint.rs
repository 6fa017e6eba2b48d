//! Schema-constrained decoding of agent replies with llguidance.
//!
//! Three levels, by how often they are built:
//! - [`TokenVocab`], once per tokenizer (the token trie: about a second for a 128k vocabulary);
//! - [`ReplyGrammar`], once per (tokenizer, task): the compiled reply schema;
//! - [`ReplyConstraint`], once per reply being decoded: a clone of the grammar's fresh parser,
//!   cheap enough for one per batch row and per turn. Rows are independent: committing to one
//!   never affects another (they share only llguidance's lazily built lexer cache, behind a
//!   lock, so they may also be driven from several threads).
//!
//! The end-of-turn token (`<|eot_id|>`, `<|im_end|>`) is llguidance's end of sequence here: it
//! is allowed exactly when the JSON object is complete, and committing it ends the reply.
//!
//! llguidance is bridged to our `tokenizers` version by [`TokenVocab`] itself rather than
//! through `toktrie_hf_tokenizers`, which would compile a second, older `tokenizers` whose
//! `Tokenizer` is a different type from the one the model crate loads.

use std::collections::HashSet;
use std::sync::Arc;

use llguidance::api::{StopReason, TopLevelGrammar};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;
use teamtune_gridworld::TaskSpec;
use tokenizers::Tokenizer;
use toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::schema::{reply_schema, SchemaError, SchemaOptions};

/// Why a constraint could not be built or refused a step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConstraintError {
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Schema(#[from] SchemaError),
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

/// A tokenizer's vocabulary as llguidance sees it: the bytes of every token, the end-of-turn
/// ids, and a parser factory. Built once per tokenizer; clones share it.
#[derive(Clone)]
pub struct TokenVocab {
    factory: Arc<ParserFactory>,
    end_of_turn: Arc<[u32]>,
}

impl std::fmt::Debug for TokenVocab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVocab")
            .field("vocab_size", &self.vocab_size())
            .field("end_of_turn", &self.end_of_turn)
            .finish()
    }
}

impl TokenVocab {
    /// `end_of_turn_ids` are the tokens that may end a reply: the chat template's turn end
    /// (`<|eot_id|>`, `<|im_end|>`), optionally others of the model's stop set. The first is
    /// the one [`ReplyConstraint::fast_forward`] appends when the reply is complete.
    pub fn new(tokenizer: &Tokenizer, end_of_turn_ids: &[u32]) -> Result<Self, ConstraintError> {
        let env = HfTokEnv::new(tokenizer, end_of_turn_ids)?;
        let tok_env: TokEnv = Arc::new(env);
        let mut factory = ParserFactory::new_simple(&tok_env)
            .map_err(|e| ConstraintError::Tokenizer(format!("llguidance: {e}")))?;
        factory.quiet();
        Ok(TokenVocab {
            factory: Arc::new(factory),
            end_of_turn: end_of_turn_ids.into(),
        })
    }

    /// Tokens the vocabulary has; masks cover exactly these ids.
    pub fn vocab_size(&self) -> usize {
        self.factory.tok_env().tok_trie().vocab_size()
    }

    pub fn end_of_turn_ids(&self) -> &[u32] {
        &self.end_of_turn
    }

    /// The bytes a token stands for, as the constraint matches them: text tokens their UTF-8
    /// bytes (possibly part of a character), special tokens 0xFF then their name. Lets a caller
    /// stream or locate text without a second decode.
    pub fn token_bytes(&self, token: u32) -> &[u8] {
        self.factory.tok_env().tok_trie().token(token)
    }

    /// A token shown for messages: its text quoted, or a special token's name.
    pub fn token_text(&self, token: u32) -> String {
        self.factory.tok_env().tok_trie().token_dbg(token)
    }
}

/// The compiled reply schema of one task for one tokenizer.
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
    /// Compiles the task's [`reply_schema`] for the vocabulary: once per task, as it costs
    /// about as much as a hundred constraints.
    pub fn new(
        vocab: &TokenVocab,
        task: &TaskSpec,
        options: &SchemaOptions,
    ) -> Result<Self, ConstraintError> {
        let schema = reply_schema(task, options)?;
        // Compact JSON, as `Reply::to_json` writes it (the training data's form, and fewer
        // tokens); string escapes limited to the printable ones a reply needs.
        let guidance = serde_json::json!({
            "whitespace_flexible": false,
            "json_allowed_escapes": "nt\"\\",
        });
        Self::compile(vocab, &task.id, schema, guidance)
    }

    /// Compiles any JSON schema (an object, e.g. an OpenAI `response_format`'s) for the
    /// vocabulary; `name` stands for the task in errors. Compact JSON, llguidance's default
    /// escapes. An invalid or unsupported schema is a [`ConstraintError::Grammar`].
    pub fn from_schema(
        vocab: &TokenVocab,
        name: &str,
        schema: &Value,
    ) -> Result<Self, ConstraintError> {
        let guidance = serde_json::json!({ "whitespace_flexible": false });
        Self::compile(vocab, name, schema.clone(), guidance)
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

/// llguidance's view of a `tokenizers` tokenizer: every token's bytes in a trie, special
/// tokens marked so that no text can ever produce them, and the end-of-turn ids as its EOS.
struct HfTokEnv {
    tokenizer: Tokenizer,
    trie: TokTrie,
}

impl HfTokEnv {
    fn new(tokenizer: &Tokenizer, end_of_turn: &[u32]) -> Result<Self, ConstraintError> {
        let err = |m: String| ConstraintError::Tokenizer(m);
        let vocab_size = tokenizer.get_vocab_size(true) as u32;
        if end_of_turn.is_empty() {
            return Err(err("no end-of-turn token given".into()));
        }
        if let Some(t) = end_of_turn.iter().find(|&&t| t >= vocab_size) {
            return Err(err(format!(
                "end-of-turn id {t} is outside the vocabulary of {vocab_size} tokens"
            )));
        }
        let decoder = serde_json::to_value(tokenizer.get_decoder())
            .map_err(|e| err(format!("decoder: {e}")))?;
        let kind = DecoderKind::of(&decoder).ok_or_else(|| {
            err(format!(
                "cannot tell how tokens map to bytes: decoder {decoder} is neither byte-level nor byte-fallback"
            ))
        })?;
        let added = tokenizer.get_added_tokens_decoder();
        let mut special: HashSet<u32> = added
            .iter()
            .filter(|(_, t)| t.special || (t.content.starts_with('<') && t.content.ends_with('>')))
            .map(|(&id, _)| id)
            .collect();
        // The turn end must never be spelled out inside a string: mark it special whatever
        // the tokenizer says.
        special.extend(end_of_turn.iter().copied());
        let byte_of = byte_level_map();
        let mut words = vec![Vec::new(); vocab_size as usize];
        for id in 0..vocab_size {
            let Some(name) = tokenizer.id_to_token(id) else {
                continue;
            };
            words[id as usize] = if special.contains(&id) {
                let mut b = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                b.extend_from_slice(name.as_bytes());
                b
            } else if let Some(t) = added.get(&id) {
                t.content.as_bytes().to_vec()
            } else {
                match kind {
                    DecoderKind::ByteLevel => {
                        match name
                            .chars()
                            .map(|c| byte_of.get(&c).copied())
                            .collect::<Option<Vec<u8>>>()
                        {
                            Some(b) => b,
                            None => {
                                return Err(err(format!(
                                    "token {id} {name:?} is not byte-level text"
                                )))
                            }
                        }
                    }
                    DecoderKind::ByteFallback { space } => {
                        if name.len() == 6 && name.starts_with("<0x") && name.ends_with('>') {
                            let b = u8::from_str_radix(&name[3..5], 16)
                                .map_err(|_| err(format!("token {id} {name:?}: bad byte")))?;
                            vec![b]
                        } else {
                            name.replace(space, " ").into_bytes()
                        }
                    }
                }
            };
        }
        let mut info = TokRxInfo::new(vocab_size, end_of_turn[0]);
        info.tok_end_of_turn = Some(end_of_turn[0]);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(end_of_turn);
        Ok(HfTokEnv {
            tokenizer: tokenizer.clone(),
            trie,
        })
    }
}

impl TokenizerEnv for HfTokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Used by llguidance to find the canonical tokens of forced text.
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |text| {
            self.tokenizer
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum DecoderKind {
    /// GPT-2 style: each byte is one printable character (Llama-3, SmolLM2).
    ByteLevel,
    /// SentencePiece style: text with a space stand-in, plus `<0xNN>` byte tokens.
    ByteFallback { space: char },
}

impl DecoderKind {
    fn of(decoder: &Value) -> Option<Self> {
        let mut byte_level = false;
        let mut byte_fallback = false;
        let mut space = ' ';
        fn walk(d: &Value, bl: &mut bool, bf: &mut bool, space: &mut char) {
            match d.get("type").and_then(Value::as_str) {
                Some("ByteLevel") => *bl = true,
                Some("ByteFallback") => *bf = true,
                Some("Replace") if d.get("content").and_then(Value::as_str) == Some(" ") => {
                    if let Some(s) = d.pointer("/pattern/String").and_then(Value::as_str) {
                        let mut c = s.chars();
                        if let (Some(ch), None) = (c.next(), c.next()) {
                            *space = ch;
                        }
                    }
                }
                Some("Sequence") => {
                    for d in d
                        .get("decoders")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        walk(d, bl, bf, space);
                    }
                }
                _ => {}
            }
        }
        walk(decoder, &mut byte_level, &mut byte_fallback, &mut space);
        if byte_fallback {
            Some(DecoderKind::ByteFallback { space })
        } else if byte_level {
            Some(DecoderKind::ByteLevel)
        } else {
            None
        }
    }
}

/// GPT-2's byte-to-character table, inverted: printable bytes stand for themselves, the others
/// are shifted to U+0100 and up, in byte order.
fn byte_level_map() -> std::collections::HashMap<char, u8> {
    let printable =
        |b: u8| matches!(b, b'!'..=b'~') || matches!(b, 0xA1..=0xAC) || matches!(b, 0xAE..=0xFF);
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (b as char, b)
            } else {
                let c = char::from_u32(next).expect("valid code point");
                next += 1;
                (c, b)
            }
        })
        .collect()
}
