//! Load test for `teamtune serve` (run by scripts/bench-serve.sh): N concurrent clients on
//! loopback send streamed chat completions until a request count or a time limit is reached,
//! and the bench reports requests/s, completion tokens/s, p50/p99 latency and p50/p99 time to
//! the first token. Every request must be answered (200) or refused (429): anything else, or a
//! request left without an answer, makes the bench fail.
//!
//! `cargo bench -p teamtune-serve --bench load -- --url http://127.0.0.1:8000/v1
//!  [--model M[,M2,...]] [--clients 8] [--requests 32] [--max-tokens 64] [--duration-s 600]
//!  [--api-key K] [--label NAME] [--retry-429 N]`
//!
//! With several models (e.g. adapters), client `c` sends to the `c mod n`-th.
//!
//! A refused request is sent again up to N times (default 0) after its Retry-After; the
//! figures count requests, not attempts.
//!
//! Prints a table line and, last, one JSON line with the figures.

use std::io::BufRead;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Varied short questions: different prompt lengths and replies, as concurrent agents send.
const PROMPTS: &[&str] = &[
    "What is the capital of France?",
    "Name three primary colours.",
    "Write a haiku about the sea.",
    "What is 12 times 12?",
    "Give one tip for learning to cook.",
    "Why is the sky blue? Answer in one sentence.",
    "List two animals that live in the desert.",
    "What does a compass show?",
];

struct Args {
    url: String,
    model: Option<String>,
    clients: usize,
    requests: usize,
    max_tokens: u64,
    duration: Duration,
    api_key: Option<String>,
    label: String,
    /// Times a refused request is sent again after its Retry-After (as the openai client does).
    retries: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        url: "http://127.0.0.1:8000/v1".into(),
        model: None,
        clients: 8,
        requests: 32,
        max_tokens: 64,
        duration: Duration::from_secs(600),
        api_key: None,
        label: "serve".into(),
        retries: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => a.url = value(),
            "--model" => a.model = Some(value()),
            "--clients" => a.clients = value().parse().expect("--clients N"),
            "--requests" => a.requests = value().parse().expect("--requests N"),
            "--max-tokens" => a.max_tokens = value().parse().expect("--max-tokens N"),
            "--duration-s" => {
                a.duration = Duration::from_secs_f64(value().parse().expect("--duration-s S"))
            }
            "--api-key" => a.api_key = Some(value()),
            "--label" => a.label = value(),
            "--retry-429" => a.retries = value().parse().expect("--retry-429 N"),
            // cargo bench passes --bench to harness=false targets.
            "--bench" => {}
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(a.clients >= 1 && a.requests >= 1);
    a
}

enum Outcome {
    Ok {
        latency: f64,
        /// Seconds to the first chunk with reply text.
        first_token: f64,
        tokens: u64,
    },
    /// 429, with the Retry-After it gave (seconds).
    Refused(u64),
    Failed(String),
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into()
}

fn call(agent: &ureq::Agent, args: &Args, model: &str, i: usize) -> Outcome {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[i % PROMPTS.len()]}],
        "temperature": 0,
        "max_tokens": args.max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut req = agent
        .post(format!("{}/chat/completions", args.url))
        .header("Content-Type", "application/json");
    if let Some(k) = &args.api_key {
        req = req.header("Authorization", &format!("Bearer {k}"));
    }
    let started = Instant::now();
    match req.send(body.to_string()) {
        Ok(mut resp) if resp.status().as_u16() == 200 => {
            // Server-sent events: the first text delta, the usage (a chunk of its own, or on
            // the last one from servers that always send it), then [DONE].
            let mut first_token = None;
            let mut tokens = None;
            let reader = std::io::BufReader::new(resp.body_mut().as_reader());
            for line in reader.lines() {
                let line = match line {
                    Ok(l) => l,
                    Err(e) => return Outcome::Failed(format!("reading: {e}")),
                };
                let Some(data) = line.strip_prefix("data: ") else {
                    continue;
                };
                if data == "[DONE]" {
                    break;
                }
                let v: Value = match serde_json::from_str(data) {
                    Ok(v) => v,
                    Err(e) => return Outcome::Failed(format!("not JSON ({e}): {data:.200}")),
                };
                if v.get("error").is_some() {
                    return Outcome::Failed(format!("error event: {data:.200}"));
                }
                let text = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
                if first_token.is_none() && !text.is_empty() {
                    first_token = Some(started.elapsed().as_secs_f64());
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    tokens = Some(n);
                }
            }
            let latency = started.elapsed().as_secs_f64();
            Outcome::Ok {
                latency,
                first_token: first_token.unwrap_or(latency),
                tokens: tokens.unwrap_or(0),
            }
        }
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let text = resp.body_mut().read_to_string().unwrap_or_default();
            match status {
                429 => Outcome::Refused(
                    resp.headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(1),
                ),
                s => Outcome::Failed(format!("HTTP {s}: {text:.200}")),
            }
        }
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() {
    let args = parse_args();
    let setup = agent(Duration::from_secs(30));
    let models: Vec<String> = match &args.model {
        Some(m) => m.split(',').map(str::to_string).collect(),
        None => {
            let mut req = setup.get(format!("{}/models", args.url));
            if let Some(k) = &args.api_key {
                req = req.header("Authorization", &format!("Bearer {k}"));
            }
            let text = req
                .call()
                .expect("GET /models")
                .body_mut()
                .read_to_string()
                .expect("read /models");
            let v: Value = serde_json::from_str(&text).expect("/models is JSON");
            vec![v["data"][0]["id"]
                .as_str()
                .expect("a served model")
                .to_string()]
        }
    };
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    let outcomes: Vec<(Outcome, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.clients)
            .map(|c| {
                let (args, model, next) = (&args, &models[c % models.len()], &next);
                s.spawn(move || {
                    let agent = agent(args.duration + Duration::from_secs(60));
                    let mut mine = Vec::new();
                    loop {
                        if started.elapsed() >= args.duration {
                            break;
                        }
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if i >= args.requests {
                            break;
                        }
                        let mut outcome = call(&agent, args, model, i);
                        let mut retried = 0;
                        while let Outcome::Refused(after) = outcome {
                            if retried == args.retries {
                                break;
                            }
                            retried += 1;
                            std::thread::sleep(Duration::from_secs(after));
                            outcome = call(&agent, args, model, i);
                        }
                        mine.push((outcome, retried));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("client thread"))
            .collect()
    });
    let wall = started.elapsed().as_secs_f64();
    let sent = outcomes.len();
    let mut latencies = Vec::new();
    let mut first_tokens = Vec::new();
    let mut tokens = 0;
    let mut refused = 0;
    let mut failures = Vec::new();
    let retries: usize = outcomes.iter().map(|(_, r)| r).sum();
    for (o, _) in outcomes {
        match o {
            Outcome::Ok {
                latency,
                first_token,
                tokens: t,
            } => {
                latencies.push(latency);
                first_tokens.push(first_token);
                tokens += t;
            }
            Outcome::Refused(_) => refused += 1,
            Outcome::Failed(e) => failures.push(e),
        }
    }
    latencies.sort_by(f64::total_cmp);
    first_tokens.sort_by(f64::total_cmp);
    let ok = latencies.len();
    let figures = json!({
        "label": args.label,
        "models": models,
        "clients": args.clients,
        "max_tokens": args.max_tokens,
        "sent": sent,
        "ok": ok,
        "refused_429": refused,
        "retried_429": retries,
        "failed": failures.len(),
        "wall_s": wall,
        "requests_per_s": ok as f64 / wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens as f64 / wall,
        "p50_s": percentile(&latencies, 50.0),
        "p99_s": percentile(&latencies, 99.0),
        "ttft_p50_s": percentile(&first_tokens, 50.0),
        "ttft_p99_s": percentile(&first_tokens, 99.0),
    });
    println!(
        "{:<12} clients {:>3}  sent {:>4}  ok {:>4}  429 {:>3} (retried {:>3})  failed {:>3}  {:>6.1} s  {:>6.2} req/s  {:>7.1} tok/s  p50 {:>6.2} s  p99 {:>6.2} s  first token p50 {:>6.2} s  p99 {:>6.2} s",
        args.label,
        args.clients,
        sent,
        ok,
        refused,
        retries,
        failures.len(),
        wall,
        figures["requests_per_s"].as_f64().unwrap(),
        figures["tokens_per_s"].as_f64().unwrap(),
        figures["p50_s"].as_f64().unwrap_or(f64::NAN),
        figures["p99_s"].as_f64().unwrap_or(f64::NAN),
        figures["ttft_p50_s"].as_f64().unwrap_or(f64::NAN),
        figures["ttft_p99_s"].as_f64().unwrap_or(f64::NAN),
    );
    println!("{figures}");
    for f in failures.iter().take(5) {
        eprintln!("failed: {f}");
    }
    if !failures.is_empty() || ok + refused != sent {
        std::process::exit(1);
    }
}
