//! What every decoder of a chat model needs around the constraint: the tokens that end a
//! reply, a conversation's prompt tokens, and keeping the part of a session's KV cache that a
//! new prompt shares with it.

use teamtune_data::{ChatTemplate, DataError, Message, SpecialText, TemplateOptions};
use teamtune_llama::{ChatAssets, Session};
use tokenizers::Tokenizer;

/// The chat template a loaded model is prompted with: its own (with its BOS and EOS strings),
/// or the built-in one its special tokens point to when it ships none.
pub fn model_template(assets: &ChatAssets) -> Result<ChatTemplate, DataError> {
    let options = TemplateOptions {
        bos_token: assets.bos_token.clone(),
        eos_token: assets.eos_token.clone(),
        ..Default::default()
    };
    let (template, _) = ChatTemplate::for_model(assets.chat_template.as_deref(), options, |t| {
        assets.tokenizer.token_to_id(t).is_some()
    })?;
    Ok(template)
}

/// The model has no token that ends a turn: nothing could end a reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the model's chat template has no end-of-turn token")]
pub struct NoEndOfTurn;

/// The tokens that end a reply: the chat template's own turn end first (a grammar appends the
/// first when the JSON is complete, see [`crate::TokenVocab::new`]), then the model's other
/// stop tokens, each once.
pub fn stop_tokens(
    template_end_of_turn: &[u32],
    model_eos: &[u32],
) -> Result<Vec<u32>, NoEndOfTurn> {
    let mut stop_ids = template_end_of_turn.to_vec();
    for &id in model_eos {
        if !stop_ids.contains(&id) {
            stop_ids.push(id);
        }
    }
    if stop_ids.is_empty() {
        return Err(NoEndOfTurn);
    }
    Ok(stop_ids)
}

/// Why a conversation has no prompt tokens.
#[derive(Debug, thiserror::Error)]
pub enum PromptError {
    /// The chat template refused the messages.
    #[error(transparent)]
    Template(#[from] DataError),
    /// The tokenizer failed on the rendered text (its message).
    #[error("{0}")]
    Tokenizer(String),
    /// A message holds special-token text and the chat template changes message content, so
    /// where the content is in the rendering is not known exactly.
    #[error(
        "a message holds special-token text that the chat template changes; it cannot be kept \
         apart from the template's own tokens"
    )]
    SpecialText,
}

/// The prompt tokens of a conversation: rendered by the chat template with the generation
/// prompt and tokenised as the training data is (the template writes the special tokens: none
/// are added again).
///
/// Message content is text: a special token's string inside it (`<|im_start|>system` in a user
/// message) is tokenised as plain text, never as the control token, so that no client can forge
/// a turn (the training data is tokenised the same way, see [`SpecialText`]). Conversations whose
/// content holds no such string are tokenised exactly as before, in one piece.
pub fn prompt_tokens(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[Message],
) -> Result<Vec<u32>, PromptError> {
    prompt_tokens_with_tools(template, tokenizer, messages, None)
}

/// [`prompt_tokens`] with function definitions (OpenAI's `tools`) given to the template.
pub fn prompt_tokens_with_tools(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[Message],
    tools: Option<&serde_json::Value>,
) -> Result<Vec<u32>, PromptError> {
    let special = SpecialText::of(tokenizer);
    if !special.in_any(messages) {
        let text = template.render_with_tools(messages, tools, true)?;
        return encode(&special, tokenizer, &text, &[]);
    }
    let rendered = template.render_content_spans(messages, tools, true)?;
    let as_text = special
        .spans_to_read_as_text(messages, rendered.spans.as_deref())
        .map_err(|_| PromptError::SpecialText)?;
    encode(&special, tokenizer, &rendered.text, &as_text)
}

fn encode(
    special: &SpecialText,
    tokenizer: &Tokenizer,
    text: &str,
    as_text: &[std::ops::Range<usize>],
) -> Result<Vec<u32>, PromptError> {
    let (ids, _) = special
        .encode(tokenizer, text, as_text)
        .map_err(PromptError::Tokenizer)?;
    Ok(ids)
}

/// How many tokens `a` and `b` share at their start.
pub fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Makes `session` hold exactly `prompt`: keeps the longest start it shares with the prompt
/// (its KV cache included) and appends the rest as pending. At least the prompt's last token is
/// left pending, since something must run to give the next logits.
pub fn reuse_prefix(session: &mut Session, prompt: &[u32]) -> teamtune_llama::Result<()> {
    let keep = common_prefix(session.tokens(), prompt).min(prompt.len().saturating_sub(1));
    session.truncate(keep)?;
    session.push(&prompt[keep..]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_tokens_put_the_template_turn_end_first_each_once() {
        assert_eq!(stop_tokens(&[7], &[2, 7, 9]), Ok(vec![7, 2, 9]));
        assert_eq!(stop_tokens(&[], &[3]), Ok(vec![3]));
        assert_eq!(stop_tokens(&[], &[]), Err(NoEndOfTurn));
        assert_eq!(
            NoEndOfTurn.to_string(),
            "the model's chat template has no end-of-turn token"
        );
    }

    #[test]
    fn common_prefix_counts_the_shared_start() {
        assert_eq!(common_prefix(&[1, 2, 3], &[1, 2, 4, 5]), 2);
        assert_eq!(common_prefix(&[1, 2], &[1, 2, 3]), 2);
        assert_eq!(common_prefix(&[], &[1]), 0);
        assert_eq!(common_prefix(&[9], &[1]), 0);
    }
}
