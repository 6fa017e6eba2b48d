//! Message content is text.
//!
//! A chat template writes the control tokens (`<|im_start|>`, `<|eot_id|>`) as their strings,
//! and a tokenizer turns every occurrence of such a string into the control token. Tokenised in
//! one piece, a user message holding `<|im_start|>system` would forge a system turn, and a
//! training conversation quoting one would teach the model a turn it never had. So the content of
//! a message that holds such a string is tokenised on its own, with special-token strings as
//! plain text, and the template's text around it as usual. Content without them is tokenised in
//! one piece with the rest, exactly as before: splitting text at a boundary can change its tokens.

use std::ops::Range;
use std::sync::OnceLock;

use aho_corasick::AhoCorasick;
use tokenizers::Tokenizer;

use crate::conversation::Message;

/// The special-token strings of a tokenizer, and the tokenizer that reads them as plain text.
#[derive(Debug)]
pub struct SpecialText {
    strings: Vec<String>,
    /// All the strings searched for in one pass over a text (Llama 3 has 256).
    search: Option<AhoCorasick>,
    /// The same tokenizer with special-token strings read as text; cloned on first use.
    plain: OnceLock<Tokenizer>,
}

/// Token ids with the byte range of each in the text.
pub type TokensWithOffsets = (Vec<u32>, Vec<(usize, usize)>);

impl SpecialText {
    pub fn of(tokenizer: &Tokenizer) -> Self {
        let mut strings: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special && !t.content.is_empty())
            .map(|t| t.content)
            .collect();
        strings.sort();
        let search = AhoCorasick::new(&strings).ok();
        SpecialText {
            strings,
            search,
            plain: OnceLock::new(),
        }
    }

    /// The first special-token string in `content`, if any.
    pub fn found_in(&self, content: &str) -> Option<&str> {
        match &self.search {
            Some(search) => search
                .find(content)
                .map(|m| self.strings[m.pattern().as_usize()].as_str()),
            None => self
                .strings
                .iter()
                .find(|s| content.contains(s.as_str()))
                .map(String::as_str),
        }
    }

    /// Whether any message's content holds a special-token string.
    pub fn in_any(&self, messages: &[Message]) -> bool {
        messages.iter().any(|m| self.found_in(&m.content).is_some())
    }

    /// Tokenises `text` in one piece except the `as_text` ranges (sorted, not overlapping), each
    /// tokenised on its own with special-token strings as plain text. Offsets are byte ranges in
    /// `text`.
    pub fn encode(
        &self,
        tokenizer: &Tokenizer,
        text: &str,
        as_text: &[Range<usize>],
    ) -> Result<TokensWithOffsets, String> {
        let mut ids = Vec::new();
        let mut offsets = Vec::new();
        let mut piece = |tok: &Tokenizer, range: Range<usize>| -> Result<(), String> {
            if range.is_empty() {
                return Ok(());
            }
            let enc = tok
                .encode(&text[range.clone()], false)
                .map_err(|e| e.to_string())?;
            ids.extend_from_slice(enc.get_ids());
            offsets.extend(
                enc.get_offsets()
                    .iter()
                    .map(|&(s, e)| (s + range.start, e + range.start)),
            );
            Ok(())
        };
        let mut at = 0;
        for r in as_text {
            piece(tokenizer, at..r.start)?;
            piece(self.plain(tokenizer), r.clone())?;
            at = r.end;
        }
        piece(tokenizer, at..text.len())?;
        Ok((ids, offsets))
    }

    fn plain(&self, tokenizer: &Tokenizer) -> &Tokenizer {
        self.plain.get_or_init(|| {
            let mut plain = tokenizer.clone();
            plain.set_encode_special_tokens(true);
            plain
        })
    }

    /// The content spans (as [`crate::ContentSpans`] gives them) of the messages that hold
    /// special-token strings, in text order; `Err(i)` when message `i` holds one and its span is
    /// unknown.
    pub fn spans_to_read_as_text(
        &self,
        messages: &[Message],
        spans: Option<&[Option<Range<usize>>]>,
    ) -> Result<Vec<Range<usize>>, usize> {
        let mut out = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if self.found_in(&m.content).is_none() {
                continue;
            }
            match spans.and_then(|s| s.get(i)) {
                Some(Some(span)) => out.push(span.clone()),
                // The template did not render this message: nothing of it is in the text.
                Some(None) => {}
                None => return Err(i),
            }
        }
        Ok(out)
    }
}
