//! Continuous batching over HTTP: requests that arrive while a long reply decodes join its
//! batch at once, base and adapter rows together, end long before it, and every reply is the
//! one it gets alone (greedy).

use serde_json::Value;

use super::*;

#[test]
fn requests_join_a_running_batch_and_leave_it_with_their_replies_alone() {
    let server = Server::start(&["--max-batch", "8", "--prefill-chunk", "8"]);
    let long = ask(BASE, "tell me everything", 500);
    let short = [
        ask(BASE, "hello", 6),
        ask(ADAPTER, "hello", 6),
        ask(
            ADAPTER,
            "the cat sat on the mat, and then the dog came and sat too",
            10,
        ),
        ask(BASE, "and you?", 8),
    ];
    let content = |r: &Value| r["choices"][0]["message"]["content"].clone();
    let long_alone = server.chat(&long).json();
    assert_eq!(
        long_alone["choices"][0]["finish_reason"], "length",
        "{long_alone}"
    );
    let alone: Vec<Value> = short
        .iter()
        .map(|r| content(&server.chat(r).json()))
        .collect();
    let before = server.health();

    std::thread::scope(|s| {
        let long_reply = s.spawn(|| server.chat(&long).json());
        server.wait_for("the long reply decodes", |h| h["running"] == 1);
        let replies: Vec<Value> = std::thread::scope(|s2| {
            let handles: Vec<_> = short
                .iter()
                .map(|r| s2.spawn(|| content(&server.chat(r).json())))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // All four came back while the long reply still decodes: none waited for it.
        let h = server.health();
        assert_eq!(h["running"], 1, "{h}");
        assert_eq!(
            h["completed"].as_u64().unwrap(),
            before["completed"].as_u64().unwrap() + 4,
            "{h}"
        );
        for (i, (a, b)) in alone.iter().zip(&replies).enumerate() {
            assert_eq!(a, b, "request {i}");
        }
        // The rows joining and leaving did not change the long reply.
        assert_eq!(long_reply.join().unwrap()["choices"], long_alone["choices"]);
    });
    // The long base row and adapter rows shared steps.
    let h = server.health();
    assert!(h["largest_batch"].as_u64().unwrap() >= 3, "{h}");
}

/// `n` choices fork from one prefill: greedy, every choice is the reply alone; sampled, each
/// choice samples with its own seed (choice i with seed + i), streamed or not.
#[test]
fn n_choices_fork_from_one_prompt() {
    let server = Server::start(&["--max-batch", "8"]);
    let mut greedy = ask(ADAPTER, "the cat sat on the mat", 10);
    let alone = server.chat(&greedy).json();
    greedy["n"] = json!(3);
    let three = server.chat(&greedy).json();
    let choices = three["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["message"], alone["choices"][0]["message"], "choice {i}");
    }
    // The prompt counts once, every reply's tokens count.
    let (u1, u3) = (&alone["usage"], &three["usage"]);
    assert_eq!(u3["prompt_tokens"], u1["prompt_tokens"]);
    assert_eq!(
        u3["completion_tokens"].as_u64().unwrap(),
        3 * u1["completion_tokens"].as_u64().unwrap()
    );

    // Sampled: choice i is the single reply with seed + i.
    let sampled = |seed: u64, n: u64| {
        let mut r = ask(BASE, "hello", 12);
        r["temperature"] = json!(1.0);
        r["seed"] = json!(seed);
        r["n"] = json!(n);
        r
    };
    let two = server.chat(&sampled(40, 2)).json();
    for i in 0..2 {
        let single = server.chat(&sampled(40 + i, 1)).json();
        assert_eq!(
            two["choices"][i as usize]["message"], single["choices"][0]["message"],
            "choice {i}"
        );
    }
    assert_ne!(two["choices"][0]["message"], two["choices"][1]["message"]);

    // Streamed: each choice's deltas carry its index and add up to its reply; one usage chunk.
    let mut streamed = sampled(40, 2);
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let events = server.chat(&streamed).events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    for i in 0..2u64 {
        let of_i = chunks.iter().filter(|c| c["choices"][0]["index"] == i);
        let text: String = of_i
            .clone()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, two["choices"][i as usize]["message"]["content"]);
        assert_eq!(
            of_i.filter(|c| !c["choices"][0]["finish_reason"].is_null())
                .count(),
            1
        );
    }
    assert_eq!(chunks.last().unwrap()["usage"], two["usage"]);
}
