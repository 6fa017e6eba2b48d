//! Where the assistant turns are in a rendered conversation.
//!
//! With `{% generation %}` blocks the spans are the blocks'. Otherwise they are the prefix
//! difference: assistant turn `i` spans from the end of `render(messages[..i],
//! add_generation_prompt=true)` to the end of `render(messages[..=i])`. Rendering every prefix
//! is quadratic in the conversation (a 4,000-message one took 19 s), so the same spans are read
//! from one rendering that marks where each message's content landed
//! ([`crate::ContentSpans`]), and two turns are checked against the prefix difference.

use std::ops::Range;

use crate::conversation::{Message, Role, Source};
use crate::error::{DataError, Result};
use crate::template::{ChatTemplate, GEN_END, GEN_START};

use super::{conv_err, Encoder, MaskMethod};

/// A rendered conversation with its assistant spans (see [`Encoder::render_spans`]).
pub(super) struct Rendered {
    pub(super) text: String,
    pub(super) spans: Vec<Range<usize>>,
    /// Whether each span is cut after its last end-of-turn token.
    pub(super) cut_after_end_of_turn: bool,
    /// Where each message's content is, when known.
    pub(super) content: Option<Vec<Option<Range<usize>>>>,
    /// `(k, span)`: assistant turn `k` found by prefix difference, to compare with `spans[k]`.
    pub(super) checks: Vec<(usize, Range<usize>)>,
}

/// The tokens of each span: a token is in a span when its byte range overlaps it
/// (transformers' rule); a token overlapping two spans belongs to the first.
pub(super) fn span_tokens(
    offsets: &[(usize, usize)],
    spans: &[Range<usize>],
) -> Vec<Option<(usize, usize)>> {
    let mut ranges: Vec<Option<(usize, usize)>> = vec![None; spans.len()];
    let mut si = 0;
    for (t, &(ts, te)) in offsets.iter().enumerate() {
        while si < spans.len() && ts >= spans[si].end {
            si += 1;
        }
        if si == spans.len() {
            break;
        }
        if te > spans[si].start {
            ranges[si] = Some(match ranges[si] {
                None => (t, t + 1),
                Some((a, _)) => (a, t + 1),
            });
        }
    }
    ranges
}

/// The assistant spans by prefix difference, read from where each message's content landed in
/// one rendering: turn `i` starts at its content (with the leading whitespace the template kept)
/// and ends where the next rendered message's content starts (or at the end). `None` when an
/// assistant message was not rendered.
fn assistant_spans_from_content(
    text: &str,
    content: &[Option<Range<usize>>],
    assistants: &[usize],
) -> Option<Vec<Range<usize>>> {
    let mut spans = Vec::with_capacity(assistants.len());
    for &i in assistants {
        let start = content.get(i)?.as_ref()?.start;
        let end = content[i + 1..]
            .iter()
            .flatten()
            .next()
            .map_or(text.len(), |next| next.start);
        spans.push(start..end);
    }
    Some(spans)
}

/// A template error names the conversation.
fn template_err(source: &Source, e: DataError) -> DataError {
    match e {
        DataError::Template(m) => conv_err(source, format!("chat template: {m}")),
        other => other,
    }
}

impl Encoder {
    pub(super) fn use_markers(&self) -> bool {
        match self.options.mask_method {
            MaskMethod::Auto | MaskMethod::GenerationMarkers => {
                self.template.has_generation_markers()
            }
            MaskMethod::PrefixDiff => false,
        }
    }

    /// Renders the messages with the byte span of every assistant turn.
    ///
    /// With `{% generation %}` blocks the spans are the blocks'. Otherwise they are the prefix
    /// difference, found in one rendering when `fast`: an assistant turn runs from its content
    /// (with the leading whitespace the template kept) to the content of the next rendered
    /// message, and is cut after its last end-of-turn token. The first and last assistant turns
    /// are also found by rendering prefixes (`checks`), for [`Self::encode_rendered`] to compare:
    /// rendering every prefix is quadratic in the conversation.
    pub(super) fn render_spans(
        &self,
        messages: &[Message],
        source: &Source,
        need_content: bool,
        fast: bool,
    ) -> Result<Rendered> {
        let vals = ChatTemplate::message_values(messages);
        let wrap = |e| template_err(source, e);
        if self.use_markers() {
            if messages
                .iter()
                .any(|m| m.content.contains([GEN_START, GEN_END]))
            {
                return Err(conv_err(
                    source,
                    "content holds U+E000/U+E001, reserved for marking {% generation %} blocks",
                ));
            }
            let (text, spans) = self
                .template
                .render_with_generation_spans(&vals, false)
                .map_err(wrap)?;
            let content = if need_content {
                let marked = self
                    .template
                    .render_content_spans(messages, None, false)
                    .map_err(wrap)?;
                marked.spans.filter(|_| marked.text == text)
            } else {
                None
            };
            return Ok(Rendered {
                text,
                spans,
                cut_after_end_of_turn: false,
                content,
                checks: Vec::new(),
            });
        }
        let assistants: Vec<usize> = (0..messages.len())
            .filter(|&i| messages[i].role == Role::Assistant)
            .collect();
        let fast = fast && self.options.mask_method == MaskMethod::Auto;
        let (full, content) = if fast || need_content {
            let marked = self
                .template
                .render_content_spans(messages, None, false)
                .map_err(wrap)?;
            (marked.text, marked.spans)
        } else {
            (
                self.template.render_prepared(&vals, false).map_err(wrap)?,
                None,
            )
        };
        let fast_spans = content
            .as_deref()
            .filter(|_| fast)
            .and_then(|c| assistant_spans_from_content(&full, c, &assistants));
        if let Some(spans) = fast_spans {
            let mut checks = Vec::new();
            for k in [0, assistants.len().saturating_sub(1)] {
                if k < assistants.len() && checks.iter().all(|(c, _)| *c != k) {
                    let span = self.prefix_span(&vals, assistants[k], &full, source)?;
                    checks.push((k, span));
                }
            }
            return Ok(Rendered {
                text: full,
                spans,
                cut_after_end_of_turn: true,
                content,
                checks,
            });
        }
        let spans = assistants
            .iter()
            .map(|&i| self.prefix_span(&vals, i, &full, source))
            .collect::<Result<Vec<_>>>()?;
        Ok(Rendered {
            text: full,
            spans,
            cut_after_end_of_turn: true,
            content,
            checks: Vec::new(),
        })
    }

    /// Assistant turn `i` (a message index) by prefix difference: from the end of
    /// `render(messages[..i], add_generation_prompt=true)` to the end of `render(messages[..=i])`,
    /// both checked to be prefixes of the whole rendering `full`.
    fn prefix_span(
        &self,
        vals: &[minijinja::Value],
        i: usize,
        full: &str,
        source: &Source,
    ) -> Result<Range<usize>> {
        let wrap = |e| template_err(source, e);
        let pre = self
            .template
            .render_prepared(&vals[..i], true)
            .map_err(|e| {
                conv_err(
                    source,
                    format!(
                        "rendering the {i} messages before assistant turn {i} with the \
                         generation prompt failed ({}); the template cannot render this \
                         prefix, so its assistant span is unknown (add {{% generation %}} \
                         blocks to the template)",
                        wrap(e)
                    ),
                )
            })?;
        let post_owned;
        let post: &str = if i + 1 == vals.len() {
            full
        } else {
            post_owned = self
                .template
                .render_prepared(&vals[..=i], false)
                .map_err(wrap)?;
            &post_owned
        };
        if !full.starts_with(post) {
            return Err(conv_err(
                source,
                format!(
                    "the chat template is not prefix-stable: the first {} messages do not \
                     render as a prefix of the whole conversation (it rewrites earlier \
                     turns); add {{% generation %}} blocks to the template",
                    i + 1
                ),
            ));
        }
        if !post.starts_with(pre.as_str()) {
            return Err(conv_err(
                source,
                format!(
                    "the chat template's generation prompt is not how it renders assistant \
                     turn {i}; add {{% generation %}} blocks to the template"
                ),
            ));
        }
        Ok(pre.len()..post.len())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::encode::EncodeOptions;
    use crate::template::BuiltinTemplate;

    fn smollm2_tokenizer() -> tokenizers::Tokenizer {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/smollm2-tokenizer.json.gz"
        );
        let mut s = String::new();
        flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
            .read_to_string(&mut s)
            .unwrap();
        s.parse().unwrap()
    }

    /// 10,000 messages: the spans come from one rendering (two turns checked by prefixes), not
    /// from rendering 5,000 prefixes, and the checks agree.
    #[test]
    fn a_long_conversation_takes_the_linear_path() {
        let messages: Vec<Message> = (0..10_000)
            .map(|i| match i % 2 {
                0 => Message::user(format!("\n go {i}")),
                _ => Message::assistant(format!("  step {i}\n")),
            })
            .collect();
        let source = Source::memory(0);
        for (template, tokenizer) in [
            (BuiltinTemplate::ChatMl, smollm2_tokenizer()),
            (
                BuiltinTemplate::Llama31,
                teamtune_testkit::llama3_tokenizer(),
            ),
        ] {
            let template = ChatTemplate::builtin(template, Default::default()).unwrap();
            let encoder = Encoder::new(tokenizer, template, EncodeOptions::default()).unwrap();
            let rendered = encoder
                .render_spans(&messages, &source, false, true)
                .unwrap();
            assert_eq!(rendered.spans.len(), 5_000);
            let checked: Vec<usize> = rendered.checks.iter().map(|(k, _)| *k).collect();
            assert_eq!(checked, [0, 4_999]);
            let e = encoder
                .encode_rendered(rendered, &messages, &source)
                .unwrap()
                .expect("the checked turns agree with the prefix difference");
            let eot = encoder.end_of_turn_ids();
            // 5,000 trained runs, each ending with the end-of-turn token.
            let ends = (1..e.len())
                .filter(|&t| e.loss_mask[t] == 1 && e.loss_mask.get(t + 1) != Some(&1))
                .inspect(|&t| assert!(eot.contains(&e.input_ids[t])))
                .count();
            assert_eq!(ends, 5_000);
        }
    }
}
