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

mod batching;
mod continuous;
mod formats;
mod requests;
mod runtime_lora;
mod shutdown;
mod tools;

pub const ADAPTER: &str = "tuned";
pub const BASE: &str = "tiny";

pub struct Server {
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
                // The f32 path on every machine: these tests lean on the f32 model's replies
                // (one that runs to its limit), and a CPU with AVX512-BF16 would otherwise
                // serve bf16 products.
                "--dtype",
                "f32",
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
pub struct Resp {
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

pub fn dechunk(mut s: &str) -> String {
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

pub fn ask(model: &str, prompt: &str, max_tokens: u64) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "system", "content": "You are tiny."}, {"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": max_tokens,
    })
}

/// A request that decodes until its token limit (the tiny model never ends this reply; the
/// test checks it) and streams.
pub fn long_stream(model: &str, max_tokens: u64) -> Value {
    let mut r = ask(model, "tell me everything", max_tokens);
    r["stream"] = json!(true);
    r
}

/// Opens a streamed request and returns the connection once its first content arrived.
pub fn open_stream(server: &Server, body: &Value) -> BufReader<TcpStream> {
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
