//! Bad requests get OpenAI error bodies; the API key is checked.

use std::io::{Read, Write};

use serde_json::{json, Value};

use super::*;

/// A bad request: what it is, its body, and the status, `param` and `code` it must get.
type Case<'a> = (&'a str, Vec<u8>, u16, Option<&'a str>, Option<&'a str>);

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let server = Server::start(&[]);
    let good = ask(BASE, "hello", 5);
    let expected = server.chat(&good).content();
    let with = |patch: Value| {
        let mut r = ask(BASE, "hello", 5);
        for (k, v) in patch.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    };
    let long_prompt = "the cat sat on the mat ".repeat(400);
    let cases: Vec<Case> = vec![
        ("invalid JSON", b"{\"model\": \"tiny\", \"messages\": [".to_vec(), 400, None, None),
        ("not an object", b"[1, 2]".to_vec(), 400, None, None),
        ("missing model", br#"{"messages":[{"role":"user","content":"x"}]}"#.to_vec(), 400, None, None),
        ("temperature of the wrong type", with(json!({"temperature": "hot"})).to_string().into(), 400, Some("temperature"), None),
        ("messages of the wrong type", with(json!({"messages": "hi"})).to_string().into(), 400, Some("messages"), None),
        ("empty messages", with(json!({"messages": []})).to_string().into(), 400, Some("messages"), None),
        ("unknown role", with(json!({"messages": [{"role": "wizard", "content": "x"}]})).to_string().into(), 400, Some("messages[0].role"), None),
        ("temperature out of range", with(json!({"temperature": 7})).to_string().into(), 400, Some("temperature"), None),
        ("huge max_tokens", with(json!({"max_tokens": 1_000_000_000u64})).to_string().into(), 400, Some("max_tokens"), None),
        ("zero max_completion_tokens", with(json!({"max_completion_tokens": 0})).to_string().into(), 400, Some("max_completion_tokens"), None),
        ("n = 17", with(json!({"n": 17})).to_string().into(), 400, Some("n"), None),
        ("n = 0", with(json!({"n": 0})).to_string().into(), 400, Some("n"), None),
        ("unknown model", with(json!({"model": "gpt-17"})).to_string().into(), 404, Some("model"), Some("model_not_found")),
        ("unknown response_format type", with(json!({"response_format": {"type": "xml"}})).to_string().into(), 400, Some("response_format.type"), None),
        ("schema that is not an object", with(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}})).to_string().into(), 400, Some("response_format.json_schema.schema"), None),
        ("schema llguidance refuses", with(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}})).to_string().into(), 400, Some("response_format.json_schema.schema"), None),
        ("too many stop sequences", with(json!({"stop": ["a", "b", "c", "d", "e"]})).to_string().into(), 400, Some("stop"), None),
        ("prompt over the context", with(json!({"messages": [{"role": "user", "content": long_prompt}]})).to_string().into(), 413, Some("messages"), Some("context_length_exceeded")),
        ("logprobs streamed", with(json!({"logprobs": true, "stream": true})).to_string().into(), 400, Some("logprobs"), None),
    ];
    assert!(cases.len() >= 12);
    for (case, body, status, param, code) in &cases {
        let r = server.request("POST", "/v1/chat/completions", "", body);
        r.assert_error(*status, *param, *code, case);
        // Still serving, and still the same answer.
        assert_eq!(server.chat(&good).content(), expected, "after {case}");
    }
    // A body over the limit.
    let mut s = server.connect();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        9 << 20
    )
    .unwrap();
    let mut writer = s.try_clone().unwrap();
    // The server may answer and close before all of it is sent: write errors are expected.
    std::thread::spawn(move || {
        let block = vec![b' '; 1 << 16];
        for _ in 0..(9 << 4) {
            if writer.write_all(&block).is_err() {
                break;
            }
        }
    });
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        if Resp::try_parse(&raw).is_some() {
            break;
        }
    }
    Resp::try_parse(&raw).expect("a response").assert_error(
        413,
        None,
        Some("request_too_large"),
        "body too large",
    );
    assert_eq!(server.chat(&good).content(), expected, "after a huge body");
    server
        .request("GET", "/v1/chat/completions", "", b"")
        .assert_error(405, None, Some("unknown_url"), "wrong method");
    server
        .request("POST", "/v1/completions-typo", "", b"{}")
        .assert_error(404, None, Some("unknown_url"), "unknown route");
    // No key was asked for: a bearer token is not needed (nor harmful).
    let r = server.request(
        "POST",
        "/v1/chat/completions",
        "Authorization: Bearer anything\r\n",
        good.to_string().as_bytes(),
    );
    assert_eq!(r.content(), expected);

    // A client leaving mid-stream: its decode ends at the next token, far from its limit.
    let max = 500;
    let full = server.chat(&ask(BASE, "tell me everything", max));
    assert_eq!(
        full.json()["choices"][0]["finish_reason"],
        "length",
        "the test needs a reply that runs to its limit: {}",
        full.body
    );
    let before = server.health();
    let stream = open_stream(&server, &long_stream(BASE, max));
    drop(stream);
    let after = server.wait_for("the abandoned stream is cancelled", |h| {
        h["cancelled"] == before["cancelled"].as_u64().unwrap() + 1 && h["running"] == 0
    });
    let decoded =
        after["generated_tokens"].as_u64().unwrap() - before["generated_tokens"].as_u64().unwrap();
    eprintln!("decoded after the disconnect: {decoded}");
    assert!(
        decoded < max / 2,
        "the abandoned stream went on: {decoded} tokens"
    );
    assert_eq!(server.chat(&good).content(), expected, "after a disconnect");
}

#[test]
fn the_api_key_is_required_when_set() {
    let server = Server::start(&["--api-key", "sekret"]);
    let body = ask(BASE, "hello", 3).to_string();
    let post =
        |headers: &str| server.request("POST", "/v1/chat/completions", headers, body.as_bytes());
    post("").assert_error(401, None, Some("invalid_api_key"), "missing bearer");
    post("Authorization: Bearer wrong\r\n").assert_error(
        401,
        None,
        Some("invalid_api_key"),
        "wrong bearer",
    );
    post("Authorization: sekret\r\n").assert_error(401, None, None, "not a bearer");
    server.request("GET", "/v1/models", "", b"").assert_error(
        401,
        None,
        None,
        "models without a key",
    );
    assert_eq!(post("Authorization: Bearer sekret\r\n").status, 200);
    // The scheme is case-insensitive (RFC 9110).
    assert_eq!(post("Authorization: bearer sekret\r\n").status, 200);
    assert_eq!(post("Authorization: BEARER sekret\r\n").status, 200);
    // Health checks need no key.
    assert_eq!(server.request("GET", "/health", "", b"").status, 200);
}

#[test]
fn an_empty_api_key_is_refused_at_start() {
    for (flag, env) in [(Some(""), None), (None, Some("  "))] {
        let mut cmd = crate::util::teamtune();
        cmd.args(["serve", "--model", "unused", "--port", "0"])
            .env("RUST_LOG", "warn")
            .env_remove("TEAMTUNE_API_KEY");
        if let Some(f) = flag {
            cmd.args(["--api-key", f]);
        }
        if let Some(e) = env {
            cmd.env("TEAMTUNE_API_KEY", e);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(1));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--api-key (or TEAMTUNE_API_KEY) is empty"),
            "{err}"
        );
    }
}

/// `logprobs` / `top_logprobs`: one entry per reply token; greedy, each token is its step's most
/// likely one, so its log-probability is the first alternative's; alternatives sorted.
#[test]
fn logprobs_follow_the_greedy_tokens() {
    let server = Server::start(&[]);
    let mut r = crate::serve::ask(BASE, "the cat sat on the mat", 8);
    r["logprobs"] = json!(true);
    r["top_logprobs"] = json!(3);
    r["n"] = json!(2);
    let v = server.chat(&r).json();
    let plain = server
        .chat(&crate::serve::ask(BASE, "the cat sat on the mat", 8))
        .json();
    assert!(plain["choices"][0]["logprobs"].is_null());
    for choice in v["choices"].as_array().unwrap() {
        assert_eq!(choice["message"], plain["choices"][0]["message"]);
        let content = choice["logprobs"]["content"].as_array().unwrap();
        assert_eq!(
            content.len() as u64,
            v["usage"]["completion_tokens"].as_u64().unwrap() / 2,
            "{v}"
        );
        for t in content {
            let lp = t["logprob"].as_f64().unwrap();
            assert!(lp <= 0.0, "{t}");
            let top = t["top_logprobs"].as_array().unwrap();
            assert_eq!(top.len(), 3);
            assert_eq!(
                top[0]["token"], t["token"],
                "greedy takes the most likely: {t}"
            );
            assert_eq!(top[0]["logprob"].as_f64().unwrap(), lp);
            let lps: Vec<f64> = top.iter().map(|a| a["logprob"].as_f64().unwrap()).collect();
            assert!(lps.windows(2).all(|w| w[0] >= w[1]), "{lps:?}");
            assert!(lps.iter().map(|l| l.exp()).sum::<f64>() <= 1.0 + 1e-6);
        }
    }
}

/// A recursive schema (`$ref` to itself) fails its own request with a 400 naming
/// `response_format` and no internal state, never the innocent requests decoding beside it.
#[test]
fn a_hostile_schema_fails_alone() {
    let server = Server::start(&["--max-batch", "8"]);
    let innocent = crate::serve::ask(BASE, "hello", 24);
    let alone = server.chat(&innocent).json();
    let mut hostile = crate::serve::ask(BASE, "hello", 24);
    hostile["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "loop",
        "schema": {"type": "object", "properties": {"child": {"$ref": "#"}}, "required": ["child"]}}});
    let (h, a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| server.chat(&innocent));
        let h = s.spawn(|| server.chat(&hostile));
        let b = s.spawn(|| server.chat(&innocent));
        (h.join().unwrap(), a.join().unwrap(), b.join().unwrap())
    });
    for r in [&a, &b] {
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["choices"], alone["choices"]);
    }
    eprintln!("hostile: {} {}", h.status, h.body);
    assert!(h.status == 400 || h.status == 200, "{}", h.body);
    if h.status == 400 {
        assert!(h.body.contains("response_format"), "{}", h.body);
    } else {
        // Decodable after all (the recursion bottoms out): then the reply is its JSON.
        let v = h.json();
        assert!(v["choices"][0]["message"]["content"].is_string(), "{v}");
    }
    assert!(
        !h.body.contains("Parser") && !h.body.contains("<state>"),
        "{}",
        h.body
    );
}

/// Templating and tokenising run off the async threads: while four near-limit bodies are
/// being tokenised, `/health` still answers at once.
#[test]
fn big_bodies_do_not_stall_the_server() {
    let server = Server::start(&[]);
    let text = "the cat sat on the mat and ".repeat(7_000_000 / 27);
    let mut big = crate::serve::ask(BASE, &text, 4);
    big["messages"] = json!([{"role": "user", "content": text}]);
    let body = big.to_string();
    assert!(body.len() < 8 << 20);
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| server.request("POST", "/v1/chat/completions", "", body.as_bytes()))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let mut slowest = Duration::ZERO;
        while !handles.iter().all(|h| h.is_finished()) {
            let t = std::time::Instant::now();
            assert_eq!(server.request("GET", "/health", "", b"").status, 200);
            slowest = slowest.max(t.elapsed());
            std::thread::sleep(Duration::from_millis(50));
        }
        for h in handles {
            let r = h.join().unwrap();
            // Far over the tiny model's context.
            r.assert_error(
                413,
                Some("messages"),
                Some("context_length_exceeded"),
                "big body",
            );
        }
        eprintln!(
            "big bodies took {:?}; slowest /health {slowest:?}",
            started.elapsed()
        );
        assert!(
            slowest < Duration::from_millis(500),
            "/health took {slowest:?}"
        );
    });
}
