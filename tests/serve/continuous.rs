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
