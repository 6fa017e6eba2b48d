//! A tokenizer's vocabulary as llguidance sees it.
//!
//! llguidance is bridged to our `tokenizers` version here rather than through
//! `toktrie_hf_tokenizers`, which would compile a second, older `tokenizers` whose `Tokenizer`
//! is a different type from the one the model crate loads.

use std::collections::HashSet;
use std::sync::Arc;

use llguidance::ParserFactory;
use serde_json::Value;
use tokenizers::Tokenizer;
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use crate::constraint::ConstraintError;

/// A tokenizer's vocabulary as llguidance sees it: the bytes of every token, the end-of-turn
/// ids, and a parser factory. Built once per tokenizer; clones share it.
#[derive(Clone)]
pub struct TokenVocab {
    pub(crate) factory: Arc<ParserFactory>,
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
    /// the one [`ReplyConstraint::fast_forward`](crate::ReplyConstraint::fast_forward) appends
    /// when the reply is complete.
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
