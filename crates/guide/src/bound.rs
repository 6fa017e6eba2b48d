//! How long a reply under a JSON schema can be, when the schema bounds it: the token budget that
//! guarantees a constrained reply is never cut into invalid JSON by a token limit.
//!
//! Every token is at least one byte, so a bound on the bytes of the compact JSON (llguidance's
//! form here: no whitespace) is a bound on its tokens. A string character is at most twelve
//! bytes (an escaped surrogate pair, `\uD83D\uDE00`). A schema bounds its replies when every
//! string has `maxLength` (or an `enum` / `const`), every array `maxItems`, every integer
//! `minimum` and `maximum`, and every object lists its properties with
//! `additionalProperties: false`; numbers other than integers, `$ref` and patterns do not.

use serde_json::Value;

/// Bytes of one character of a JSON string at most (`\uXXXX\uXXXX`).
const CHAR_BYTES: usize = 12;

/// The most bytes a compact JSON value under `schema` can take, if the schema bounds it.
pub fn max_json_bytes(schema: &Value) -> Option<usize> {
    let m = match schema {
        Value::Bool(false) => return Some(0),
        Value::Object(m) => m,
        _ => return None,
    };
    if let Some(c) = m.get("const") {
        return Some(literal_bytes(c));
    }
    if let Some(Value::Array(values)) = m.get("enum") {
        return values.iter().map(literal_bytes).max();
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(branches)) = m.get(key) {
            return branches
                .iter()
                .map(max_json_bytes)
                .collect::<Option<Vec<_>>>()?
                .into_iter()
                .max();
        }
    }
    if m.contains_key("$ref") || m.contains_key("allOf") || m.contains_key("not") {
        return None;
    }
    match m.get("type")? {
        Value::String(t) => type_bytes(t, m),
        Value::Array(types) => types
            .iter()
            .map(|t| type_bytes(t.as_str()?, m))
            .collect::<Option<Vec<_>>>()?
            .into_iter()
            .max(),
        _ => None,
    }
}

/// The bytes of a literal (`const`, `enum` values) written as JSON, every string character
/// counted at its longest escape.
fn literal_bytes(v: &Value) -> usize {
    match v {
        Value::String(s) => CHAR_BYTES * s.chars().count() + 2,
        Value::Array(items) => 2 + items.iter().map(|i| literal_bytes(i) + 1).sum::<usize>(),
        Value::Object(o) => {
            2 + o
                .iter()
                .map(|(k, v)| CHAR_BYTES * k.chars().count() + 3 + literal_bytes(v) + 1)
                .sum::<usize>()
        }
        other => other.to_string().len(),
    }
}

fn int_bytes(v: &Value) -> Option<usize> {
    Some(v.as_i64()?.to_string().len())
}

fn type_bytes(t: &str, m: &serde_json::Map<String, Value>) -> Option<usize> {
    match t {
        "null" => Some(4),
        "boolean" => Some(5),
        "string" => Some(CHAR_BYTES * m.get("maxLength")?.as_u64()? as usize + 2),
        "integer" => Some(int_bytes(m.get("minimum")?)?.max(int_bytes(m.get("maximum")?)?)),
        "array" => {
            let most = m.get("maxItems")?.as_u64()? as usize;
            if most == 0 {
                return Some(2);
            }
            Some(2 + most * (max_json_bytes(m.get("items")?)? + 1))
        }
        "object" => {
            if m.get("additionalProperties") != Some(&Value::Bool(false)) {
                return None;
            }
            let mut total = 2;
            if let Some(Value::Object(props)) = m.get("properties") {
                for (k, v) in props {
                    total += CHAR_BYTES * k.chars().count() + 3 + max_json_bytes(v)? + 1;
                }
            }
            Some(total)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn bounded_schemas_have_a_bound_at_least_their_longest_reply() {
        let s = json!({"type": "object", "additionalProperties": false,
            "properties": {"move": {"enum": ["up", "down"]}, "why": {"type": "string", "maxLength": 5},
                           "n": {"type": "integer", "minimum": -100, "maximum": 7},
                           "tags": {"type": "array", "maxItems": 2, "items": {"type": "boolean"}},
                           "x": {"anyOf": [{"type": "null"}, {"const": "yes"}]}}});
        let bound = max_json_bytes(&s).unwrap();
        let longest = json!({"move": "down", "why": "\u{1F600}\u{1F600}\u{1F600}\u{1F600}\u{1F600}",
                             "n": -100, "tags": [false, false], "x": "yes"});
        // Escaped the longest way: each emoji as a surrogate pair.
        let escaped = longest.to_string().replace('\u{1F600}', "\\uD83D\\uDE00");
        assert!(escaped.len() <= bound, "{} > {bound}", escaped.len());
        assert!(bound < 400, "{bound}");
    }

    #[test]
    fn unbounded_schemas_have_none() {
        for s in [
            json!({"type": "string"}),
            json!({"type": "number"}),
            json!({"type": "integer", "minimum": 0}),
            json!({"type": "array", "items": {"type": "boolean"}}),
            json!({"type": "object", "properties": {"a": {"type": "boolean"}}}),
            json!({"$ref": "#/definitions/x"}),
            json!({"anyOf": [{"type": "null"}, {"type": "string"}]}),
            json!({}),
        ] {
            assert_eq!(max_json_bytes(&s), None, "{s}");
        }
        assert_eq!(
            max_json_bytes(&json!({"type": "array", "maxItems": 0})),
            Some(2)
        );
    }
}
