//! Adapters loaded and unloaded while the server runs (vLLM's routes, `--allow-runtime-lora`):
//! a loaded adapter is served at once and answers as one loaded at start; a bad one is a 400
//! naming the file and the server keeps serving; unloading stops serving the name at once and
//! waits for the requests using it.

use std::io::BufRead;

use serde_json::{json, Value};

use super::*;

fn post(server: &Server, path: &str, body: &Value) -> Resp {
    server.request("POST", path, "", body.to_string().as_bytes())
}

fn served(server: &Server) -> Vec<String> {
    server.request("GET", "/v1/models", "", b"").json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn runtime_adapters_are_refused_without_the_flag() {
    let server = Server::start(&[]);
    let lora = fixtures().join("tiny-lora");
    let r = post(
        &server,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "x", "lora_path": lora}),
    );
    r.assert_error(403, None, Some("forbidden"), "load without the flag");
    assert!(r.body.contains("--allow-runtime-lora"), "{}", r.body);
    assert_eq!(served(&server), [BASE, ADAPTER]);
}

#[test]
fn load_serve_and_unload_adapters_while_requests_run() {
    let server = Server::start(&["--allow-runtime-lora"]);
    let lora = fixtures().join("tiny-lora");
    let ok = post(
        &server,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "again", "lora_path": lora}),
    );
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(served(&server), [BASE, ADAPTER, "again"]);
    // The same folder as the adapter loaded at start: the same replies.
    for prompt in ["hello", "the cat sat on the mat"] {
        assert_eq!(
            server.chat(&ask("again", prompt, 12)).content(),
            server.chat(&ask(ADAPTER, prompt, 12)).content()
        );
    }

    // Bad loads: each a 400 naming what is wrong; the server keeps serving.
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    let config = "adapter_config.json";
    std::fs::copy(lora.join(config), broken.join(config)).unwrap();
    std::fs::write(broken.join("adapter_model.safetensors"), b"not safetensors").unwrap();
    let missing = dir.path().join("missing");
    let cases = [
        (
            json!({"lora_name": "b", "lora_path": missing}),
            Some("lora_path"),
            missing.display().to_string(),
        ),
        (
            json!({"lora_name": "b", "lora_path": broken}),
            Some("lora_path"),
            "adapter_model.safetensors".to_string(),
        ),
        (
            json!({"lora_name": ADAPTER, "lora_path": lora}),
            Some("lora_name"),
            "already served".to_string(),
        ),
        (
            json!({"lora_name": BASE, "lora_path": lora}),
            Some("lora_name"),
            "already served".to_string(),
        ),
        (
            json!({"lora_name": " ", "lora_path": lora}),
            Some("lora_name"),
            "printable".to_string(),
        ),
        // A missing field is named in the message (serde reports no path for it).
        (
            json!({"lora_name": "b"}),
            None,
            "missing field `lora_path`".to_string(),
        ),
    ];
    for (body, param, words) in cases {
        let r = post(&server, "/v1/load_lora_adapter", &body);
        r.assert_error(400, param, None, &body.to_string());
        assert!(r.body.contains(&words), "{body}: {}", r.body);
    }
    assert_eq!(served(&server), [BASE, ADAPTER, "again"]);
    assert_eq!(server.chat(&ask(BASE, "hello", 4)).status, 200);

    // Unloading while a request decodes with the adapter: the name goes at once, the
    // running reply finishes, then the unload answers.
    let mut stream = open_stream(&server, &long_stream("again", 300));
    std::thread::scope(|s| {
        let unload = s.spawn(|| {
            post(
                &server,
                "/v1/unload_lora_adapter",
                &json!({"lora_name": "again"}),
            )
        });
        let start = Instant::now();
        while served(&server).contains(&"again".to_string()) {
            assert!(start.elapsed() < Duration::from_secs(30), "still served");
            std::thread::sleep(Duration::from_millis(5));
        }
        server.chat(&ask("again", "hello", 4)).assert_error(
            404,
            Some("model"),
            Some("model_not_found"),
            "unloaded name",
        );
        assert!(
            !unload.is_finished(),
            "the unload did not wait for the running reply"
        );
        let mut rest = String::new();
        while !rest.contains("data: [DONE]") {
            let mut line = String::new();
            assert!(
                stream.read_line(&mut line).unwrap() > 0,
                "stream cut: {rest}"
            );
            rest.push_str(&line);
        }
        assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
        let r = unload.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    });
    assert_eq!(served(&server), [BASE, ADAPTER]);
    post(
        &server,
        "/v1/unload_lora_adapter",
        &json!({"lora_name": "again"}),
    )
    .assert_error(
        404,
        Some("model"),
        Some("model_not_found"),
        "unloaded twice",
    );
    // The name can be loaded again.
    let again = post(
        &server,
        "/v1/load_lora_adapter",
        &json!({"lora_name": "again", "lora_path": fixtures().join("tiny-lora")}),
    );
    assert_eq!(again.status, 200, "{}", again.body);
}
