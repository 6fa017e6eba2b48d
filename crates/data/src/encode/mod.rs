//! Token ids and loss masks for conversations.
//!
//! The rendered conversation is tokenised once, without adding special tokens (the template
//! already writes BOS, so adding it again would double it). The trained tokens are those of each
//! assistant reply and its end-of-turn token; headers, system and user turns are masked. Spans of
//! assistant output in the rendered text come from either
//! - the template's `{% generation %}` blocks, exactly as transformers'
//!   `return_assistant_tokens_mask` computes them, or
//! - for templates without them (most stock templates), the prefix difference: assistant turn `i`
//!   spans from the end of `render(messages[..i], add_generation_prompt=true)` to the end of
//!   `render(messages[..=i])`, checked to be prefixes of the full rendering (found in linear
//!   time, see `spans.rs`). Tokens after the last end-of-turn token of a span (ChatML's `\n`
//!   after `<|im_end|>`) are not trained: the model never generates them.
//!
//! Message content is text: special-token strings in it are tokenised as plain text
//! ([`SpecialText`]), unlike transformers, which reads them as control tokens.
//!
//! A token is trained when its byte range overlaps a span (transformers' rule). The first token of
//! a sequence is never trained: nothing predicts it.

use std::ops::Range;

use rayon::prelude::*;
use tokenizers::Tokenizer;

use crate::conversation::{Conversation, Message, Role, Source};
use crate::error::{DataError, Result};
use crate::special_text::SpecialText;
use crate::template::ChatTemplate;

mod decision;
mod spans;
pub use decision::DECISION;
use spans::{span_tokens, Rendered};

/// Which tokens carry loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TrainOn {
    /// Every assistant reply with its end-of-turn token.
    #[default]
    AllAssistant,
    /// Only the last assistant reply with its end-of-turn token.
    LastAssistant,
    /// Every token except the first (plain language modelling).
    AllTokens,
}

impl TrainOn {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "assistant" | "all-assistant" => Some(TrainOn::AllAssistant),
            "last" | "last-assistant" => Some(TrainOn::LastAssistant),
            "all" | "all-tokens" => Some(TrainOn::AllTokens),
            _ => None,
        }
    }
}

/// How the assistant spans are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaskMethod {
    /// `{% generation %}` blocks when the template has them, else the prefix difference, read
    /// from one rendering when the template shows content as given (checked against rendering
    /// prefixes on two turns; on any doubt every prefix is rendered).
    #[default]
    Auto,
    /// Only `{% generation %}` blocks (an error for templates without them).
    GenerationMarkers,
    /// Always the prefix difference, rendering every prefix (quadratic in the turns).
    PrefixDiff,
}

/// What to do with a conversation longer than `max_len` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overlong {
    /// Leave it out.
    #[default]
    Drop,
    /// Keep the longest prefix that ends with an assistant turn and fits; drop it when even the
    /// first assistant turn does not fit. No assistant reply is cut in half.
    CutAtTurn,
}

#[derive(Debug, Clone, Default)]
pub struct EncodeOptions {
    pub train_on: TrainOn,
    pub mask_method: MaskMethod,
    /// Longest sequence kept, in tokens.
    pub max_len: Option<usize>,
    pub overlong: Overlong,
    /// Token ids that end a turn; the trained part of a reply ends with the last of them in the
    /// reply's span. Empty: the template's `eos_token` and the usual end-of-turn tokens the
    /// vocabulary has (`<|eot_id|>`, `<|eom_id|>`, `<|im_end|>`, `<|end|>`, `<end_of_turn>`,
    /// `</s>`, `<|endoftext|>`, `<|end_of_text|>`).
    pub end_of_turn_ids: Vec<u32>,
    /// JSON fields of an assistant reply whose string values are decision tokens: marked
    /// [`DECISION`] in the loss mask, for a training loss that weights them (empty: none).
    pub decision_fields: Vec<String>,
}

/// Well-known end-of-turn tokens, looked up in the vocabulary when none are given.
pub const KNOWN_END_OF_TURN: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "</s>",
    "<|endoftext|>",
    "<|end_of_text|>",
];

/// A rendered and tokenised conversation with everything needed to inspect it.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// The rendered text.
    pub text: String,
    pub input_ids: Vec<u32>,
    /// Byte range of each token in `text`.
    pub offsets: Vec<(usize, usize)>,
    /// 1 where the token is a training target, [`DECISION`] where it is one inside a decision
    /// field's value, 0 elsewhere.
    pub loss_mask: Vec<u8>,
    /// Byte span of each assistant turn in `text` (all turns, whatever `train_on` says).
    pub assistant_spans: Vec<Range<usize>>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    pub fn trained_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m != 0).count()
    }
}

/// A training example: token ids and loss mask, with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// Non-zero where `input_ids[t]` is a training target (predicted from `input_ids[..t]`):
    /// [`DECISION`] inside a decision field's value, else 1.
    pub loss_mask: Vec<u8>,
    pub task: Option<String>,
    pub score: Option<f64>,
    pub source: Source,
    /// Whether later turns were cut off to fit `max_len`.
    pub cut: bool,
}

impl Example {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    pub fn trained_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m != 0).count()
    }
    /// Labels in the transformers convention: the token id where trained, -100 elsewhere (the
    /// model shifts them).
    pub fn labels(&self) -> Vec<i64> {
        transformers_labels(&self.input_ids, &self.loss_mask)
    }
}

/// The token id where `mask` is set, -100 elsewhere (transformers' `labels`).
pub(crate) fn transformers_labels(ids: &[u32], mask: &[u8]) -> Vec<i64> {
    ids.iter()
        .zip(mask)
        .map(|(&id, &m)| if m != 0 { id as i64 } else { -100 })
        .collect()
}

/// The result of encoding one conversation.
#[derive(Debug, Clone, PartialEq)]
pub enum EncodeOutcome {
    /// Kept, whole or cut at a turn boundary (`example.cut`).
    Kept(Example),
    /// Longer than `max_len` (and not cuttable): left out.
    Dropped { tokens: usize, source: Source },
}

/// Renders, tokenises and masks conversations. Cheap to share between threads.
pub struct Encoder {
    tokenizer: Tokenizer,
    template: ChatTemplate,
    options: EncodeOptions,
    end_of_turn: Vec<u32>,
    special: SpecialText,
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Encoder")
            .field("template", &self.template)
            .field("options", &self.options)
            .field("end_of_turn", &self.end_of_turn)
            .finish()
    }
}

fn conv_err(source: &Source, message: impl Into<String>) -> DataError {
    DataError::Conversation {
        source_name: source.to_string(),
        message: message.into(),
    }
}

impl Encoder {
    /// Checks that the template's special tokens are single tokens of this tokenizer (a template
    /// for another model family is an error here, not silently wrong data).
    pub fn new(
        tokenizer: Tokenizer,
        template: ChatTemplate,
        options: EncodeOptions,
    ) -> Result<Self> {
        for (what, tok) in [
            ("bos_token", &template.options().bos_token),
            ("eos_token", &template.options().eos_token),
        ] {
            if let Some(t) = tok {
                if !t.is_empty() && tokenizer.token_to_id(t).is_none() {
                    return Err(DataError::Config(format!(
                        "the chat template's {what} {t:?} is not a token of this tokenizer: \
                         template and tokenizer come from different models"
                    )));
                }
            }
        }
        if options.max_len == Some(0) {
            return Err(DataError::Config("max_len must be at least 1".into()));
        }
        let mut end_of_turn = options.end_of_turn_ids.clone();
        if end_of_turn.is_empty() {
            let eos = template.options().eos_token.as_deref();
            for t in eos.into_iter().chain(KNOWN_END_OF_TURN.iter().copied()) {
                if let Some(id) = tokenizer.token_to_id(t) {
                    end_of_turn.push(id);
                }
            }
        }
        end_of_turn.sort_unstable();
        end_of_turn.dedup();
        if options.mask_method == MaskMethod::GenerationMarkers
            && !template.has_generation_markers()
        {
            return Err(DataError::Config(
                "mask method `generation` needs a template with {% generation %} blocks".into(),
            ));
        }
        let special = SpecialText::of(&tokenizer);
        Ok(Encoder {
            tokenizer,
            template,
            options,
            end_of_turn,
            special,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }
    pub fn options(&self) -> &EncodeOptions {
        &self.options
    }
    /// The end-of-turn ids in use.
    pub fn end_of_turn_ids(&self) -> &[u32] {
        &self.end_of_turn
    }

    /// Renders, tokenises and masks a list of messages (no length handling).
    ///
    /// Content holding special-token strings is tokenised as plain text (see
    /// [`SpecialText`]); a template that rewrites such content, so that it cannot be found in
    /// the rendering, is an error for that conversation.
    pub fn encode_messages(&self, messages: &[Message], source: &Source) -> Result<Encoded> {
        let special = self.special.in_any(messages);
        let rendered = self.render_spans(messages, source, special, true)?;
        if let Some(e) = self.encode_rendered(rendered, messages, source)? {
            return Ok(e);
        }
        // The spans read from the content disagreed with the prefix difference: render every
        // prefix.
        let rendered = self.render_spans(messages, source, special, false)?;
        Ok(self
            .encode_rendered(rendered, messages, source)?
            .expect("prefix spans have nothing to check"))
    }

    /// Tokenises and masks a rendering; `None` when its checks fail.
    fn encode_rendered(
        &self,
        rendered: Rendered,
        messages: &[Message],
        source: &Source,
    ) -> Result<Option<Encoded>> {
        let Rendered {
            text,
            mut spans,
            cut_after_end_of_turn,
            content,
            checks,
        } = rendered;
        let as_text = self
            .special
            .spans_to_read_as_text(messages, content.as_deref())
            .map_err(|i| {
                let found = self.special.found_in(&messages[i].content).unwrap_or("");
                conv_err(
                    source,
                    format!(
                        "message {i} holds the special-token text {found:?}, and the chat \
                         template changes message content, so it cannot be tokenised as plain \
                         text; remove it from the data"
                    ),
                )
            })?;
        let (input_ids, offsets) = self
            .special
            .encode(&self.tokenizer, &text, &as_text)
            .map_err(|e| DataError::Tokenizer(format!("{source}: {e}")))?;
        let mut ranges = span_tokens(&offsets, &spans);
        if cut_after_end_of_turn {
            self.cut_after_end_of_turn(&input_ids, &mut ranges);
            if !checks.is_empty() {
                // Turns found in one rendering end at the next message's content: each must
                // hold an end-of-turn token, and the checked ones must equal the prefix
                // difference.
                let ends_at_turn_end = ranges.iter().flatten().all(|&(_, b)| {
                    self.end_of_turn.binary_search(&input_ids[b - 1]).is_ok()
                        || offsets[b - 1].1 >= text.len()
                });
                let exact: Vec<Range<usize>> = checks.iter().map(|(_, s)| s.clone()).collect();
                let mut exact_ranges = span_tokens(&offsets, &exact);
                self.cut_after_end_of_turn(&input_ids, &mut exact_ranges);
                let agree = checks
                    .iter()
                    .zip(&exact_ranges)
                    .all(|((k, _), r)| ranges[*k] == *r);
                if !ends_at_turn_end || !agree {
                    return Ok(None);
                }
            }
            // Each span ends with its trained tokens.
            for (span, r) in spans.iter_mut().zip(&ranges) {
                if let Some((_, b)) = r {
                    span.end = span.end.min(offsets[b - 1].1);
                }
            }
        }
        let n = input_ids.len();
        let mut loss_mask = vec![0u8; n];
        match self.options.train_on {
            TrainOn::AllAssistant => {
                for &(a, b) in ranges.iter().flatten() {
                    loss_mask[a..b].fill(1);
                }
            }
            TrainOn::LastAssistant => {
                if let Some(&(a, b)) = ranges.iter().rev().flatten().next() {
                    loss_mask[a..b].fill(1);
                }
            }
            TrainOn::AllTokens => loss_mask.fill(1),
        }
        if let Some(first) = loss_mask.first_mut() {
            *first = 0;
        }
        decision::mark_decisions(
            &text,
            &spans,
            &offsets,
            &self.options.decision_fields,
            &mut loss_mask,
        );
        Ok(Some(Encoded {
            text,
            input_ids,
            offsets,
            loss_mask,
            assistant_spans: spans,
        }))
    }

    /// Cuts each token range after its last end-of-turn token (ChatML's `\n` after
    /// `<|im_end|>` is never generated).
    fn cut_after_end_of_turn(&self, ids: &[u32], ranges: &mut [Option<(usize, usize)>]) {
        for r in ranges.iter_mut().flatten() {
            if let Some(last) = (r.0..r.1)
                .rev()
                .find(|&t| self.end_of_turn.binary_search(&ids[t]).is_ok())
            {
                r.1 = last + 1;
            }
        }
    }

    /// Whether any message of the conversation holds special-token text (tokenised as plain
    /// text, see [`SpecialText`]).
    pub fn holds_special_text(&self, conv: &Conversation) -> bool {
        self.special.in_any(&conv.messages)
    }

    fn example(&self, conv: &Conversation, e: Encoded, cut: bool) -> Example {
        Example {
            input_ids: e.input_ids,
            loss_mask: e.loss_mask,
            task: conv.task.clone(),
            score: conv.score,
            source: conv.source.clone(),
            cut,
        }
    }

    /// Encodes a conversation, applying `max_len` and the over-long policy.
    pub fn encode(&self, conv: &Conversation) -> Result<EncodeOutcome> {
        conv.validate()
            .map_err(|e| conv_err(&conv.source, e.message))?;
        let full = self.encode_messages(&conv.messages, &conv.source)?;
        let Some(max_len) = self.options.max_len else {
            return Ok(EncodeOutcome::Kept(self.example(conv, full, false)));
        };
        if full.len() <= max_len {
            return Ok(EncodeOutcome::Kept(self.example(conv, full, false)));
        }
        let dropped = EncodeOutcome::Dropped {
            tokens: full.len(),
            source: conv.source.clone(),
        };
        if self.options.overlong == Overlong::Drop {
            return Ok(dropped);
        }
        let assistant_idx: Vec<usize> = conv
            .messages
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == Role::Assistant)
            .map(|(i, _)| i)
            .collect();
        // Try the prefixes ending at earlier assistant turns, longest first. The token count of
        // a prefix is about the number of tokens of the full text that start before the end of
        // its span; re-encoding the prefix gives the exact ids.
        let last_message = conv.messages.len() - 1;
        for k in (0..assistant_idx.len()).rev() {
            if assistant_idx[k] == last_message {
                continue; // that is the whole conversation
            }
            let end = full.assistant_spans.get(k).map_or(0, |s| s.end);
            let estimate = full.offsets.partition_point(|&(s, _)| s < end);
            if estimate > max_len + 8 {
                continue;
            }
            let e = self.encode_messages(&conv.messages[..=assistant_idx[k]], &conv.source)?;
            if e.len() <= max_len && e.trained_tokens() > 0 {
                return Ok(EncodeOutcome::Kept(self.example(conv, e, true)));
            }
        }
        Ok(dropped)
    }

    /// Encodes many conversations in parallel, results in input order.
    pub fn encode_all(&self, convs: &[Conversation]) -> Vec<Result<EncodeOutcome>> {
        convs.par_iter().map(|c| self.encode(c)).collect()
    }
}
