//! Decision tokens: the values of chosen fields of a JSON assistant reply (the grid-world's
//! `rationale` and `action_name`), marked in the loss mask so that training can weight them
//! above the free text around them (`reflection`, `message`).
//!
//! A reply that is not JSON, or lacks a field, marks nothing for it: the mask stays a plain
//! trained/untrained mask there.

use std::ops::Range;

/// Loss-mask value of a trained token that lies in a decision field's value (trained tokens
/// are otherwise 1, untrained 0).
pub const DECISION: u8 = 2;

/// The byte range of the string value of `"field": "..."` in `reply` (without its quotes),
/// found at the first occurrence of the key; `None` if the key is absent or its value is not a
/// string.
fn string_value(reply: &str, field: &str) -> Option<Range<usize>> {
    let key = format!("\"{field}\"");
    let at = reply.find(&key)? + key.len();
    let body = reply[at..]
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let start = reply.len() - body.len();
    let mut escaped = false;
    for (i, c) in body.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(start..start + i),
            _ => {}
        }
    }
    None
}

/// Sets [`DECISION`] on every trained token (mask 1) whose bytes overlap the value of one of
/// `fields` in an assistant span of `text`.
pub(super) fn mark_decisions(
    text: &str,
    spans: &[Range<usize>],
    offsets: &[(usize, usize)],
    fields: &[String],
    mask: &mut [u8],
) {
    if fields.is_empty() {
        return;
    }
    let mut values: Vec<Range<usize>> = Vec::new();
    for span in spans {
        let Some(reply) = text.get(span.clone()) else {
            continue;
        };
        for field in fields {
            if let Some(v) = string_value(reply, field) {
                if v.start < v.end {
                    values.push(span.start + v.start..span.start + v.end);
                }
            }
        }
    }
    for (t, &(a, b)) in offsets.iter().enumerate() {
        if mask[t] == 1 && values.iter().any(|v| a < v.end && v.start < b) {
            mask[t] = DECISION;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_values_are_found_with_escapes_and_spaces() {
        let reply = r#"{"reflection":"Moved.","rationale" : "At (1,1), \"x\": 1 east, so east.","action_name":"east"}"#;
        let r = string_value(reply, "rationale").unwrap();
        assert_eq!(&reply[r], r#"At (1,1), \"x\": 1 east, so east."#);
        let a = string_value(reply, "action_name").unwrap();
        assert_eq!(&reply[a], "east");
        assert_eq!(string_value(reply, "message"), None);
        assert_eq!(string_value(r#"{"rationale": 3}"#, "rationale"), None);
        assert_eq!(
            string_value(r#"{"rationale": "unterminated"#, "rationale"),
            None
        );
    }

    #[test]
    fn only_trained_tokens_inside_a_value_are_marked() {
        // one "token" per 4 bytes
        let text = r#"USER{"action_name":"east","message":"hi"}"#;
        let offsets: Vec<(usize, usize)> = (0..text.len())
            .step_by(4)
            .map(|a| (a, (a + 4).min(text.len())))
            .collect();
        let mut mask: Vec<u8> = offsets.iter().map(|&(a, _)| (a >= 4) as u8).collect();
        let fields = vec!["action_name".to_string()];
        let span = 4..text.len();
        mark_decisions(
            text,
            std::slice::from_ref(&span),
            &offsets,
            &fields,
            &mut mask,
        );
        let value = text.find("east").unwrap()..text.find("east").unwrap() + 4;
        for (t, &(a, b)) in offsets.iter().enumerate() {
            let inside = a < value.end && value.start < b;
            let want = if a < 4 {
                0
            } else if inside {
                DECISION
            } else {
                1
            };
            assert_eq!(mask[t], want, "token {t} bytes {a}..{b}");
        }
        assert!(mask.contains(&DECISION));
    }
}
