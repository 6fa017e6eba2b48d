//! Where each message's content lands in a rendering.
//!
//! Every message's content is wrapped in private-use markers that carry its index, the
//! conversation is rendered once, and the markers are taken out again. This is linear in the
//! conversation (finding spans by rendering every prefix is quadratic) and it is exact, not a
//! search for the content's text: a rendering whose text without the markers differs from the
//! plain rendering (a template that inspects, escapes or rewrites content) gives no spans rather
//! than wrong ones.
//!
//! Leading and trailing whitespace stay outside the markers, so a template that trims the content
//! (Llama 3.1's `| trim`) renders the same text. Whether a template kept a message's leading
//! whitespace cannot always be read from the text (a header ending in `\n` before content
//! starting with `\n`), so a second marked rendering with that whitespace replaced by an EM SPACE
//! (U+2003, which `trim` removes too, and no header writes) tells: a span starts at its
//! kept leading whitespace.

use std::ops::Range;

use minijinja::value::Value;

use super::{message_value, ChatTemplate};
use crate::conversation::Message;
use crate::error::Result;

/// Opens a message's markers; the index follows in hex digits.
const OPEN: char = '\u{E002}';
/// Ends the index: the content starts.
const BODY: char = '\u{E003}';
/// The content ends.
const CLOSE: char = '\u{E004}';
/// `U+E010 + d` is the hex digit `d` of a message index.
const DIGIT0: u32 = 0xE010;

/// Whether `c` is one of the private-use characters the renderer uses to mark spans (generation
/// blocks and message content): content holding them cannot be marked.
pub(crate) fn is_marker(c: char) -> bool {
    matches!(c as u32, 0xE000..=0xE004 | 0xE010..=0xE01F)
}

/// The leading whitespace, the rest without whitespace at either end, and the trailing
/// whitespace (all whitespace content is all lead).
fn split_whitespace_ends(content: &str) -> (&str, &str, &str) {
    let core = content.trim();
    if core.is_empty() {
        return (content, "", "");
    }
    let lead_len = content.len() - content.trim_start().len();
    (
        &content[..lead_len],
        core,
        &content[lead_len + core.len()..],
    )
}

/// Stands in for a message's leading whitespace in the rendering that tells whether the
/// template kept it.
const LEAD_PROBE: &str = "\u{2003}";

/// The content of message `index` with its markers, whitespace outside them; `lead` replaces
/// the leading whitespace when given.
fn wrap(index: usize, content: &str, lead: Option<&str>) -> String {
    let (own_lead, core, trail) = split_whitespace_ends(content);
    let lead = if own_lead.is_empty() {
        own_lead
    } else {
        lead.unwrap_or(own_lead)
    };
    let mut out = String::with_capacity(content.len() + 24);
    out.push_str(lead);
    out.push(OPEN);
    let digits = format!("{index:x}");
    for d in digits.bytes() {
        let v = (d as char).to_digit(16).expect("hex digit");
        out.push(char::from_u32(DIGIT0 + v).expect("private-use digit"));
    }
    out.push(BODY);
    out.push_str(core);
    out.push(CLOSE);
    out.push_str(trail);
    out
}

/// Takes the markers out of `raw`. `None` unless they are well formed: each message at most
/// once, in message order, never nested.
fn unwrap(raw: &str, messages: usize) -> Option<(String, Vec<Option<Range<usize>>>)> {
    let mut text = String::with_capacity(raw.len());
    let mut spans: Vec<Option<Range<usize>>> = vec![None; messages];
    let mut next = 0usize; // the lowest index that may come next
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            OPEN => {
                let mut index = 0usize;
                let mut digits = 0;
                loop {
                    let d = chars.next()?;
                    if d == BODY {
                        break;
                    }
                    let v = (d as u32).checked_sub(DIGIT0).filter(|&v| v < 16)?;
                    index = index.checked_mul(16)?.checked_add(v as usize)?;
                    digits += 1;
                }
                if digits == 0 || index < next || index >= messages {
                    return None;
                }
                let start = text.len();
                loop {
                    match chars.next()? {
                        CLOSE => break,
                        c if is_marker(c) => return None,
                        c => text.push(c),
                    }
                }
                spans[index] = Some(start..text.len());
                next = index + 1;
            }
            BODY | CLOSE => return None,
            c if (DIGIT0..DIGIT0 + 16).contains(&(c as u32)) => return None,
            c => text.push(c),
        }
    }
    Some((text, spans))
}

/// A rendering with the byte span of each message's content in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentSpans {
    /// The rendered text, exactly the plain rendering.
    pub text: String,
    /// For each message, the span of its content as rendered: from its leading whitespace when
    /// the template kept it, to the end of its last character that is not whitespace; `None` for
    /// a message the template did not render. `None` as a whole when the spans are
    /// not known exactly: the template inspects or rewrites content, or content holds the
    /// private-use characters U+E000-U+E004 or U+E010-U+E01F.
    pub spans: Option<Vec<Option<Range<usize>>>>,
}

impl ChatTemplate {
    /// Renders as [`ChatTemplate::render_with_tools`] does, with where each message's content
    /// landed. Two renderings: the marked one, and the plain one it is checked against.
    pub fn render_content_spans(
        &self,
        messages: &[Message],
        tools: Option<&serde_json::Value>,
        add_generation_prompt: bool,
    ) -> Result<ContentSpans> {
        let text = self.render_with_tools(messages, tools, add_generation_prompt)?;
        if messages.iter().any(|m| m.content.contains(is_marker)) {
            return Ok(ContentSpans { text, spans: None });
        }
        let render = |lead: Option<&str>| {
            let marked: Vec<Value> = messages
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    message_value(&Message {
                        content: wrap(i, &m.content, lead),
                        ..m.clone()
                    })
                })
                .collect();
            // A template may refuse the marked content (it tests it): the spans are unknown.
            self.render_values_with_tools(marked, tools, add_generation_prompt)
                .ok()
                .and_then(|raw| unwrap(&raw, messages.len()))
        };
        let Some(mut spans) = render(None)
            .filter(|(plain, _)| *plain == text)
            .map(|(_, spans)| spans)
        else {
            return Ok(ContentSpans { text, spans: None });
        };
        let leads: Vec<usize> = messages
            .iter()
            .map(|m| split_whitespace_ends(&m.content).0.len())
            .collect();
        if leads.iter().any(|&n| n > 0) {
            let Some((probe_text, probe_spans)) = render(Some(LEAD_PROBE)) else {
                return Ok(ContentSpans { text, spans: None });
            };
            for ((span, probe), lead) in spans.iter_mut().zip(&probe_spans).zip(&leads) {
                match (span, probe) {
                    (Some(span), Some(probe)) => {
                        if *lead > 0 && probe_text[..probe.start].ends_with(LEAD_PROBE) {
                            span.start -= lead;
                        }
                    }
                    (None, None) => {}
                    _ => return Ok(ContentSpans { text, spans: None }),
                }
            }
        }
        Ok(ContentSpans {
            text,
            spans: Some(spans),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_then_unwrap_gives_the_content_back() {
        for (i, content) in [(0, "hello"), (17, "  two words \n"), (300, ""), (5, " \t ")] {
            let raw = format!("<a>{}<b>", wrap(i, content, None));
            let (text, spans) = unwrap(&raw, 301).unwrap();
            assert_eq!(text, format!("<a>{content}<b>"));
            let span = spans[i].clone().unwrap();
            assert_eq!(&text[span], content.trim());
            assert_eq!(spans.iter().flatten().count(), 1);
        }
    }

    #[test]
    fn malformed_markers_give_no_spans() {
        let one = wrap(1, "x", None);
        let zero = wrap(0, "y", None);
        // out of order, repeated, index past the end, stray close, nested
        assert!(unwrap(&format!("{one}{zero}"), 2).is_none());
        assert!(unwrap(&format!("{one}{one}"), 2).is_none());
        assert!(unwrap(&one, 1).is_none());
        assert!(unwrap("a\u{E004}b", 1).is_none());
        assert!(unwrap(&format!("\u{E002}\u{E010}\u{E003}a{zero}"), 2).is_none());
        assert!(unwrap("\u{E002}\u{E003}a\u{E004}", 1).is_none()); // no digits
        assert!(unwrap("\u{E002}\u{E010}", 1).is_none()); // cut short
    }
}
