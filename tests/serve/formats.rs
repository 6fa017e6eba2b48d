//! The server's reply format for clients that send none (`--json-schema`, `--json-schema-file`,
//! `--adapter-schema`): every such reply parses and follows the schema, streamed or not, even
//! under a token limit too small for it; a request's own `response_format` wins; bad flags are
//! refused before the model loads.

use serde_json::{json, Value};

use super::*;

/// A schema with finitely many replies, so that every reply ends well inside its token limit.
fn verdict_schema() -> Value {
    json!({"type": "object",
           "properties": {"verdict": {"enum": ["yes", "no", "maybe"]}, "sure": {"type": "boolean"}},
           "required": ["verdict", "sure"], "additionalProperties": false})
}

fn move_schema() -> Value {
    json!({"type": "object", "properties": {"move": {"enum": ["up", "down", "left", "right"]}},
           "required": ["move"], "additionalProperties": false})
}

/// The reply's JSON, checked against the schema's one object level: every required key, no
/// other, each value among its enum or of its type.
fn follows(reply: &str, schema: &Value) -> Value {
    let v: Value = serde_json::from_str(reply).unwrap_or_else(|e| panic!("{reply:?}: {e}"));
    let props = schema["properties"].as_object().unwrap();
    let obj = v
        .as_object()
        .unwrap_or_else(|| panic!("not an object: {reply}"));
    for key in schema["required"].as_array().unwrap() {
        assert!(
            obj.contains_key(key.as_str().unwrap()),
            "{key} missing: {reply}"
        );
    }
    for (k, val) in obj {
        let p = props
            .get(k)
            .unwrap_or_else(|| panic!("extra key {k}: {reply}"));
        if let Some(allowed) = p["enum"].as_array() {
            assert!(allowed.contains(val), "{k} = {val}: {reply}");
        } else {
            assert_eq!(p["type"], "boolean");
            assert!(val.is_boolean(), "{k} = {val}: {reply}");
        }
    }
    v
}

#[test]
fn requests_without_a_format_get_the_servers_schema_and_their_own_format_wins() {
    let dir = tempfile::tempdir().unwrap();
    let adapter_schema = dir.path().join("move.json");
    std::fs::write(&adapter_schema, move_schema().to_string()).unwrap();
    let adapter_flag = format!("{ADAPTER}={}", adapter_schema.display());
    let server_schema = verdict_schema().to_string();
    let server = Server::start(&[
        "--json-schema",
        &server_schema,
        "--adapter-schema",
        &adapter_flag,
    ]);
    let content = |r: &Resp| {
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    // The program of the issue: messages, model and temperature only.
    for prompt in ["hello", "the cat sat on the mat", "and you?"] {
        let base = json!({"model": BASE, "temperature": 0,
                          "messages": [{"role": "user", "content": prompt}]});
        follows(&content(&server.chat(&base)), &verdict_schema());
        let mut tuned = base.clone();
        tuned["model"] = json!(ADAPTER);
        follows(&content(&server.chat(&tuned)), &move_schema());
        // Sampled replies follow it too.
        let mut sampled = base.clone();
        sampled["temperature"] = json!(1.0);
        sampled["seed"] = json!(7);
        follows(&content(&server.chat(&sampled)), &verdict_schema());
    }
    // A token limit too small for the schema is raised to its bound: never cut JSON.
    let mut tight = ask(BASE, "hello", 2);
    tight["messages"] = json!([{"role": "user", "content": "hello"}]);
    let r = server.chat(&tight);
    follows(&content(&r), &verdict_schema());
    assert!(r.json()["usage"]["completion_tokens"].as_u64().unwrap() > 2);
    // Streamed: the deltas put together are the same JSON.
    let mut streamed = ask(BASE, "hello", 64);
    streamed["stream"] = json!(true);
    let r = server.chat(&streamed);
    let text: String = r
        .events()
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    follows(&text, &verdict_schema());
    // The request's own format wins: free text is what `teamtune generate` prints, and a
    // request's schema replaces the server's.
    let mut text_req = ask(BASE, "hello", 12);
    text_req["response_format"] = json!({"type": "text"});
    let r = server.chat(&text_req);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        server.generate(&[
            "--system",
            "You are tiny.",
            "--prompt",
            "hello",
            "--max-tokens",
            "12"
        ]),
    );
    let mut own = ask(ADAPTER, "hello", 64);
    own["response_format"] =
        json!({"type": "json_schema", "json_schema": {"name": "v", "schema": verdict_schema()}});
    follows(&content(&server.chat(&own)), &verdict_schema());
}

#[test]
fn bad_schema_flags_are_refused_before_the_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let not_object = dir.path().join("list.json");
    std::fs::write(&not_object, "[1, 2]").unwrap();
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, "{\"type\": ").unwrap();
    let missing = dir.path().join("missing.json");
    let not_object_flag = format!("tuned={}", not_object.display());
    let nobody_flag = format!("nobody={}", not_object.display());
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["--json-schema", "[1]"],
            "--json-schema: a JSON schema must be an object".into(),
        ),
        (
            vec!["--json-schema", "{oops"],
            "--json-schema: not valid JSON".into(),
        ),
        (
            vec!["--json-schema-file", broken.to_str().unwrap()],
            format!("--json-schema-file {}: not valid JSON", broken.display()),
        ),
        (
            vec!["--json-schema-file", missing.to_str().unwrap()],
            format!("--json-schema-file {}", missing.display()),
        ),
        (
            vec![
                "--adapter",
                "tuned=unused",
                "--adapter-schema",
                &not_object_flag,
            ],
            "a JSON schema must be an object".into(),
        ),
        (
            vec!["--adapter-schema", &nobody_flag],
            "no --adapter is named `nobody`".into(),
        ),
        (
            vec!["--adapter-schema", "tuned"],
            "expected NAME=FILE".into(),
        ),
    ];
    for (flags, want) in cases {
        // `--model` names nothing: the error must come from the flags, before any loading.
        let out = crate::util::teamtune()
            .args(["serve", "--model", "/nonexistent/model", "--port", "0"])
            .args(&flags)
            .env("RUST_LOG", "warn")
            .env_remove("TEAMTUNE_API_KEY")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{flags:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&want), "{flags:?}: {err}");
        assert!(
            !err.contains("nonexistent"),
            "{flags:?} loaded the model first: {err}"
        );
    }
}

#[test]
fn a_schema_the_grammar_compiler_refuses_names_its_flag() {
    let server_err = {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(dir.path());
        let out = crate::util::teamtune()
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0"])
            .args(["--json-schema", r#"{"type": "no-such-type"}"#])
            .env("RUST_LOG", "warn")
            .env_remove("TEAMTUNE_API_KEY")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    assert!(
        server_err.contains("--json-schema: the JSON schema cannot be used"),
        "{server_err}"
    );
}
