//! Turning a growing list of token ids into text pieces as they become printable: a token can
//! end in the middle of a UTF-8 character, so text is released only once it decodes cleanly.

use tokenizers::Tokenizer;

use crate::error::{LlamaError, Result};

pub struct TextStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl<'a> TextStream<'a> {
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        TextStream {
            tokenizer,
            ids: Vec::new(),
            printed: 0,
        }
    }

    fn decode(&self) -> Result<String> {
        self.tokenizer
            .decode(&self.ids, true)
            .map_err(|e| LlamaError::Tokenizer(e.to_string()))
    }

    /// Adds a token; returns the text that became printable, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = self.decode()?;
        if text.len() > self.printed
            && !text.ends_with('\u{FFFD}')
            && text.is_char_boundary(self.printed)
        {
            let piece = text[self.printed..].to_string();
            self.printed = text.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Whatever is left when generation ends.
    pub fn finish(&mut self) -> Result<Option<String>> {
        let text = self.decode()?;
        if text.len() > self.printed && text.is_char_boundary(self.printed) {
            let piece = text[self.printed..].to_string();
            self.printed = text.len();
            return Ok(Some(piece));
        }
        Ok(None)
    }
}
