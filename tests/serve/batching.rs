//! Batched decoding gives what each request gets alone; a full queue answers 429; the prefix
//! cache changes no reply.

use serde_json::{json, Value};

use super::*;

#[test]
fn batched_replies_equal_replies_alone_and_teamtune_generate() {
    let server = Server::start(&["--max-batch", "8"]);
    let models = server.request("GET", "/v1/models", "", b"").json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [BASE, ADAPTER]);

    let prompts = [
        "hello",
        "the cat sat on the mat",
        "two  spaces",
        "and you?",
        "Hello world, and you?",
        "a",
    ];
    let mut requests: Vec<Value> = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let model = if i % 3 == 2 { ADAPTER } else { BASE };
        requests.push(ask(model, p, 24 + 4 * i as u64));
    }
    // A JSON reply under a schema, and one cut by a stop sequence, in the same batches.
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}}, "required": ["a", "b"], "additionalProperties": false});
    let mut constrained = ask(BASE, "json please", 40);
    constrained["response_format"] =
        json!({"type": "json_schema", "json_schema": {"name": "ab", "schema": schema}});
    requests.push(constrained);
    let mut json_mode = ask(ADAPTER, "any json", 30);
    json_mode["response_format"] = json!({"type": "json_object"});
    requests.push(json_mode);

    // One at a time first (each request alone in its batch) ...
    let alone: Vec<Value> = requests.iter().map(|r| server.chat(r).json()).collect();
    assert_eq!(server.health()["largest_batch"], 1);
    // ... then all at once.
    let batched: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .iter()
            .map(|r| s.spawn(|| server.chat(r).json()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let health = server.health();
    assert!(
        health["largest_batch"].as_u64().unwrap() >= 2,
        "no request was batched: {health}"
    );
    for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
        assert_eq!(a["choices"], b["choices"], "request {i}");
        assert_eq!(a["usage"], b["usage"], "request {i}");
        let u = &a["usage"];
        assert!(u["prompt_tokens"].as_u64().unwrap() > 0);
        assert_eq!(
            u["total_tokens"].as_u64().unwrap(),
            u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap()
        );
        assert_eq!(a["model"], requests[i]["model"]);
    }
    // The adapter changes the replies: it is applied to its requests only.
    let differ = prompts
        .iter()
        .filter(|p| {
            server.chat(&ask(BASE, p, 16)).content() != server.chat(&ask(ADAPTER, p, 16)).content()
        })
        .count();
    assert!(differ > 0, "the adapter changed no reply");
    let n = prompts.len();
    // The schema's reply is that JSON (it ends); JSON mode's is a JSON object if it ended.
    assert_eq!(alone[n]["choices"][0]["finish_reason"], "stop");
    for (i, keys) in [(n, Some(["a", "b"])), (n + 1, None)] {
        let choice = &alone[i]["choices"][0];
        if choice["finish_reason"] == "stop" {
            let text = choice["message"]["content"].as_str().unwrap();
            let v: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"));
            assert!(v.is_object(), "{text}");
            if let Some(keys) = keys {
                assert!(v["a"].is_i64() && v["b"].is_boolean(), "{text}");
                assert_eq!(v.as_object().unwrap().len(), keys.len());
            }
        }
    }

    // Streamed: the same text in pieces, then the finish reason, then (when asked for with
    // stream_options.include_usage) a chunk of the usage with no choices, then [DONE].
    for (i, r) in requests.iter().enumerate().take(3) {
        let mut s = r.clone();
        s["stream"] = json!(true);
        let with_usage = i != 1;
        if with_usage {
            s["stream_options"] = json!({"include_usage": true});
        }
        let resp = server.chat(&s);
        assert_eq!(resp.status, 200);
        assert!(resp
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/event-stream")));
        let events = resp.events();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        let (finish, usage) = if with_usage {
            let usage = chunks.last().unwrap();
            assert_eq!(usage["choices"], json!([]), "stream {i}");
            assert_eq!(usage["usage"], alone[i]["usage"]);
            // Every other chunk says "usage": null.
            assert!(chunks[..chunks.len() - 1]
                .iter()
                .all(|c| c.get("usage") == Some(&Value::Null)));
            (&chunks[chunks.len() - 2], Some(usage))
        } else {
            assert!(chunks.iter().all(|c| c.get("usage").is_none()));
            (chunks.last().unwrap(), None)
        };
        assert_eq!(usage.is_some(), with_usage);
        assert_eq!(
            text, alone[i]["choices"][0]["message"]["content"],
            "stream {i}"
        );
        assert_eq!(
            finish["choices"][0]["finish_reason"],
            alone[i]["choices"][0]["finish_reason"]
        );
        assert!(chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk"));
    }

    // A stop sequence cuts the reply before it (streamed or not).
    let full = alone[1]["choices"][0]["message"]["content"]
        .as_str()
        .unwrap();
    let cut_at = full.char_indices().nth(full.chars().count() / 2).unwrap().0;
    let stop: String = full[cut_at..].chars().take(2).collect();
    let mut stopped = requests[1].clone();
    stopped["stop"] = json!([stop]);
    let want = &full[..full.find(&stop).unwrap()];
    let r = server.chat(&stopped).json();
    assert_eq!(r["choices"][0]["message"]["content"], want);
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    stopped["stream"] = json!(true);
    let streamed: String = server
        .chat(&stopped)
        .events()
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| {
            serde_json::from_str::<Value>(e).unwrap()["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(streamed, want);

    // The greedy reply is what `teamtune generate` prints for the same conversation.
    let generated = server.generate(&[
        "--system",
        "You are tiny.",
        "--prompt",
        prompts[1],
        "--max-tokens",
        "28",
    ]);
    assert_eq!(generated, alone[1]["choices"][0]["message"]["content"]);
}

#[test]
fn a_full_queue_is_refused_with_429_and_retry_after() {
    let server = Server::start(&["--max-batch", "1", "--queue-size", "1"]);
    // One request decoding, one waiting: the queue is full.
    let running = open_stream(&server, &long_stream(BASE, 900));
    std::thread::scope(|s| {
        let waiting = s.spawn(|| server.chat(&ask(BASE, "hello", 5)));
        server.wait_for("one request waits", |h| h["queued"] == 1);
        let refused = server.chat(&ask(BASE, "hello", 5));
        refused.assert_error(429, None, Some("rate_limit_exceeded"), "queue full");
        let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
        assert!(retry >= 1);
        // The stream leaves; the waiting request is answered.
        drop(running);
        assert_eq!(waiting.join().unwrap().status, 200);
    });
    assert_eq!(server.chat(&ask(BASE, "hello", 5)).status, 200);
}

#[test]
fn the_prefix_cache_reuses_conversations_per_adapter_and_changes_no_reply() {
    let server = Server::start(&["--prefix-cache-tokens", "4096"]);
    let cached = |r: &Value| {
        r["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    let first = ask(BASE, "the cat sat on the mat", 24);
    let a = server.chat(&first).json();
    assert_eq!(cached(&a), 0);
    // The same request again: all but the last prompt token come from the cache.
    let again = server.chat(&first).json();
    assert_eq!(again["choices"], a["choices"]);
    assert_eq!(
        cached(&again),
        a["usage"]["prompt_tokens"].as_u64().unwrap() - 1
    );
    // The same conversation for the adapter does not use the base model's cache.
    let mut for_adapter = first.clone();
    for_adapter["model"] = json!(ADAPTER);
    let t = server.chat(&for_adapter).json();
    assert_eq!(cached(&t), 0);
    let t2 = server.chat(&for_adapter).json();
    assert_eq!(t2["choices"], t["choices"]);
    assert!(cached(&t2) > 0);

    // The next turn of the conversation runs only what is new, and answers what `teamtune
    // generate` answers for the whole conversation.
    let reply = a["choices"][0]["message"]["content"].as_str().unwrap();
    let mut next = first.clone();
    let messages = next["messages"].as_array_mut().unwrap();
    messages.push(json!({"role": "assistant", "content": reply}));
    messages.push(json!({"role": "user", "content": "and you?"}));
    let b = server.chat(&next).json();
    assert!(cached(&b) > 0, "{b}");
    let file = server._dir.path().join("conversation.json");
    std::fs::write(&file, next["messages"].to_string()).unwrap();
    let generated = server.generate(&["--messages", file.to_str().unwrap(), "--max-tokens", "24"]);
    assert_eq!(generated, b["choices"][0]["message"]["content"]);
    let h = server.health();
    assert!(h["cached_prompt_tokens"].as_u64().unwrap() >= cached(&b) + cached(&again));
}
