//! `teamtune serve` end to end over loopback, on a tiny random Llama (the tiny-llama31 fixture's
//! weights and toy tokenizer, given a chat template here) with the fixture's LoRA adapter served
//! by name. The client is a raw TcpStream, so malformed requests and disconnects can be sent.
//!
//! - every kind of bad request gets its status and an OpenAI error body, and the server keeps
//!   answering;
//! - concurrent requests decoded in batches give what each gets alone (greedy), streamed or
//!   not, base or adapter, and what `teamtune generate` prints;
//! - a full queue answers 429 with Retry-After;
//! - a client leaving mid-stream cancels its decode;
//! - SIGTERM lets the request in flight finish, then the server exits 0; past
//!   `--shutdown-grace` the request is cancelled instead (error event, `[DONE]`), exit 0.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::util::{fixtures, output_ok, teamtune, tiny_model};

const ADAPTER: &str = "tuned";
const BASE: &str = "tiny";

struct Server {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
    model: PathBuf,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let model = tiny_model(dir.path());
        let adapter = format!("{ADAPTER}={}", fixtures().join("tiny-lora").display());
        let mut child = teamtune()
            .args([
                "serve",
                "--model",
                model.to_str().unwrap(),
                "--served-model-name",
                BASE,
                "--adapter",
                &adapter,
                "--port",
                "0",
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .env_remove("TEAMTUNE_API_KEY")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("http://")
            .and_then(|s| s.strip_suffix("/v1"))
            .unwrap_or_else(|| panic!("the server printed {line:?}"))
            .to_string();
        Server {
            child,
            addr,
            _dir: dir,
            model,
        }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s
    }

    /// Sends a raw request (method, path, extra header lines, body) and reads the response.
    fn request(&self, method: &str, path: &str, headers: &str, body: &[u8]) -> Resp {
        let mut s = self.connect();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{headers}\r\n",
            self.addr,
            body.len()
        )
        .unwrap();
        s.write_all(body).unwrap();
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).unwrap();
        Resp::parse(&raw)
    }

    fn chat(&self, body: &Value) -> Resp {
        self.request(
            "POST",
            "/v1/chat/completions",
            "",
            body.to_string().as_bytes(),
        )
    }

    fn health(&self) -> Value {
        self.request("GET", "/health", "", b"").json()["engine"].clone()
    }

    /// What `teamtune generate` prints (its last newline removed) for the served model with
    /// these flags, greedy.
    fn generate(&self, args: &[&str]) -> String {
        let out = output_ok(
            teamtune()
                .args(["generate", "--model", self.model.to_str().unwrap()])
                .args(args)
                .args(["--temperature", "0"])
                .env("RUST_LOG", "warn"),
        );
        let generated = String::from_utf8(out.stdout).unwrap();
        generated.strip_suffix('\n').unwrap().to_string()
    }

    fn sigterm(&self) {
        let pid = self.child.id().to_string();
        let kill = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(kill.success());
    }

    /// The server's exit status (or panics after 60 s).
    fn wait_exit(&mut self) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "still running");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls /health until `done` holds (or panics after 60 s).
    fn wait_for(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let h = self.health();
            if done(&h) {
                return h;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "{what}: {h}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn parse(raw: &[u8]) -> Resp {
        let text = String::from_utf8_lossy(raw);
        let (head, rest) = text
            .split_once("\r\n\r\n")
            .expect("a complete HTTP response");
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
        let body = if chunked {
            dechunk(rest)
        } else {
            rest.to_string()
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    /// The response once `raw` holds all of it (by its Content-Length).
    fn try_parse(raw: &[u8]) -> Option<Resp> {
        let text = String::from_utf8_lossy(raw);
        let (head, rest) = text.split_once("\r\n\r\n")?;
        let len: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))?
            .1
            .trim()
            .parse()
            .ok()?;
        (rest.len() >= len).then(|| Resp::parse(raw))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    fn content(&self) -> String {
        assert_eq!(self.status, 200, "{}", self.body);
        self.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The `data:` payloads of a server-sent-event body.
    fn events(&self) -> Vec<String> {
        self.body
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }

    /// An OpenAI error with this status and, if given, this `param` / `code`.
    fn assert_error(&self, status: u16, param: Option<&str>, code: Option<&str>, case: &str) {
        assert_eq!(self.status, status, "{case}: {}", self.body);
        let v = self.json();
        let e = &v["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{case}: {v}"
        );
        assert!(e["type"].is_string(), "{case}: {v}");
        for key in ["param", "code"] {
            assert!(e.get(key).is_some(), "{case}: no {key}: {v}");
        }
        if let Some(p) = param {
            assert_eq!(e["param"], p, "{case}: {v}");
        }
        if let Some(c) = code {
            assert_eq!(e["code"], c, "{case}: {v}");
        }
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    loop {
        let Some((size, rest)) = s.split_once("\r\n") else {
            return out;
        };
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
}

fn ask(model: &str, prompt: &str, max_tokens: u64) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "system", "content": "You are tiny."}, {"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

/// A request that decodes until its token limit (the tiny model never ends this reply; the
/// test checks it) and streams.
fn long_stream(model: &str, max_tokens: u64) -> Value {
    let mut r = ask(model, "tell me everything", max_tokens);
    r["stream"] = json!(true);
    r
}

/// Opens a streamed request and returns the connection once its first content arrived.
fn open_stream(server: &Server, body: &Value) -> BufReader<TcpStream> {
    let mut s = server.connect();
    let body = body.to_string();
    write!(
        s,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") || seen.matches("data: ").count() < 2 {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "stream ended: {seen}");
        seen.push_str(&line);
    }
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    r
}

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
        ("n = 2", with(json!({"n": 2})).to_string().into(), 400, Some("n"), None),
        ("unknown model", with(json!({"model": "gpt-17"})).to_string().into(), 404, Some("model"), Some("model_not_found")),
        ("unknown response_format type", with(json!({"response_format": {"type": "xml"}})).to_string().into(), 400, Some("response_format.type"), None),
        ("schema that is not an object", with(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}})).to_string().into(), 400, Some("response_format.json_schema.schema"), None),
        ("schema llguidance refuses", with(json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}})).to_string().into(), 400, Some("response_format.json_schema.schema"), None),
        ("too many stop sequences", with(json!({"stop": ["a", "b", "c", "d", "e"]})).to_string().into(), 400, Some("stop"), None),
        ("prompt over the context", with(json!({"messages": [{"role": "user", "content": long_prompt}]})).to_string().into(), 413, Some("messages"), Some("context_length_exceeded")),
        ("logprobs asked", with(json!({"logprobs": true})).to_string().into(), 400, Some("logprobs"), None),
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
    // Health checks need no key.
    assert_eq!(server.request("GET", "/health", "", b"").status, 200);
}

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

    // Streamed: the same text in pieces, then the finish reason and usage, then [DONE].
    for (i, r) in requests.iter().enumerate().take(3) {
        let mut s = r.clone();
        s["stream"] = json!(true);
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
        let last = chunks.last().unwrap();
        assert_eq!(
            text, alone[i]["choices"][0]["message"]["content"],
            "stream {i}"
        );
        assert_eq!(
            last["choices"][0]["finish_reason"],
            alone[i]["choices"][0]["finish_reason"]
        );
        assert_eq!(last["usage"], alone[i]["usage"]);
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
fn sigterm_finishes_the_request_in_flight_and_exits_0() {
    let mut server = Server::start(&[]);
    let mut stream = open_stream(&server, &long_stream(BASE, 300));
    server.sigterm();
    // The stream runs to its end and closes properly.
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");
    assert!(rest.contains("data: [DONE]"), "{rest}");
    let status = server.wait_exit();
    assert!(status.success(), "{status:?}");
    assert!(TcpStream::connect(&server.addr).is_err());
}

#[test]
fn sigterm_past_the_grace_period_cancels_the_stream_and_exits_0() {
    let mut server = Server::start(&["--shutdown-grace", "0"]);
    let mut stream = open_stream(&server, &long_stream(BASE, 500));
    let before = server.health();
    server.sigterm();
    // The stream is cut: an error event naming the shutdown, then [DONE], no finish reason.
    let mut rest = String::new();
    stream.read_to_string(&mut rest).unwrap();
    assert!(rest.contains("\"code\":\"server_shutting_down\""), "{rest}");
    assert!(rest.contains("data: [DONE]"), "{rest}");
    assert!(!rest.contains("\"finish_reason\":\"length\""), "{rest}");
    assert!(before["running"] == 1, "{before}");
    let status = server.wait_exit();
    assert!(status.success(), "{status:?}");
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
