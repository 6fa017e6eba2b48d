//! Policies and the episode runner: the experts through the runner, the OpenAI policy against a
//! loopback server, and the in-process model on the default model (constrained replies are
//! always usable; batched = one at a time; runs repeat).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device};
use teamtune_agents::{
    plan, run_episodes, EvalReport, ExpertPolicy, ModelPolicy, ModelPolicyOptions, OpenAiConfig,
    OpenAiPolicy, PlayedEpisode, Policy, RunOptions,
};
use teamtune_gridworld::{builtin_tasks, play_expert, TaskSpec};

fn quiet(parallel: usize) -> RunOptions {
    RunOptions {
        parallel,
        progress: false,
    }
}

/// Turns and scores: what must repeat.
fn outcome(played: &[PlayedEpisode]) -> Vec<(String, u64, f64, Vec<String>)> {
    played
        .iter()
        .map(|p| {
            (
                p.record.task.clone(),
                p.record.seed,
                p.record.final_score,
                p.record
                    .conversations
                    .iter()
                    .flat_map(|c| c.messages.iter().map(|m| m.content.clone()))
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn experts_through_the_runner_play_as_play_expert_in_any_batching() {
    let tasks = builtin_tasks();
    let plans = plan(&tasks, 2, 11);
    let one = run_episodes(&mut ExpertPolicy::default(), &plans, &quiet(1)).unwrap();
    let five = run_episodes(&mut ExpertPolicy::default(), &plans, &quiet(5)).unwrap();
    assert_eq!(outcome(&one), outcome(&five));
    for (p, played) in plans.iter().zip(&one) {
        let direct = play_expert(&p.task, p.seed).unwrap().record();
        assert_eq!(played.record.final_score, direct.final_score);
        assert_eq!(played.record.turns, direct.turns);
        assert_eq!(played.record.policy.as_deref(), Some("expert"));
    }
    let report = EvalReport::new("expert", &one, 1.0);
    assert_eq!(report.tasks.len(), 7);
    assert!(report
        .tasks
        .iter()
        .all(|t| t.episodes == 2 && t.invalid_reply_rate == 0.0));
    let mean: f64 = one.iter().map(|p| p.record.final_score).sum::<f64>() / one.len() as f64;
    // Every task has the same number of episodes, so the mean of task means is the mean.
    assert!((report.mean_score - mean).abs() < 1e-9);
    assert!(report.table().contains("single_nav"));
}

/// A loopback chat-completions server. Each request is checked and logged; it answers with
/// the first action of the schema it was sent, after `fail_first` 503s.
struct FakeServer {
    url: String,
    requests: Arc<Mutex<Vec<serde_json::Value>>>,
}

fn serve(fail_first: usize, key: &'static str) -> FakeServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let log = requests.clone();
    std::thread::spawn(move || {
        let mut served = 0usize;
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            let request_line = line.clone();
            let (mut len, mut auth) = (0usize, String::new());
            loop {
                line.clear();
                reader.read_line(&mut line).unwrap();
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if lower.starts_with("authorization:") {
                    auth = line["authorization:".len()..].trim().to_owned();
                }
            }
            let mut body = vec![0u8; len];
            reader.read_exact(&mut body).unwrap();
            served += 1;
            let (status, answer) = if !request_line.starts_with("POST /v1/chat/completions ") {
                (404, serde_json::json!({"error": "no such route"}))
            } else if auth != format!("Bearer {key}") {
                (401, serde_json::json!({"error": {"message": "bad key"}}))
            } else if served <= fail_first {
                (503, serde_json::json!({"error": "busy"}))
            } else {
                let req: serde_json::Value = serde_json::from_slice(&body).unwrap();
                log.lock().unwrap().push(req.clone());
                let schema = &req["response_format"]["json_schema"]["schema"];
                let action = first_action(schema);
                let reply = serde_json::json!({
                    "reflection": "", "rationale": "served", "action_name": action,
                    "action_parameters": {}, "message": "", "add_memory": ""
                });
                (
                    200,
                    serde_json::json!({
                        "choices": [{"message": {"role": "assistant", "content": reply.to_string()}}],
                        "usage": {"prompt_tokens": 100, "completion_tokens": 20}
                    }),
                )
            };
            let text = answer.to_string();
            write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            )
            .unwrap();
        }
    });
    FakeServer { url, requests }
}

/// The first action name a reply schema allows (single object or anyOf of objects).
fn first_action(schema: &serde_json::Value) -> String {
    let obj = schema.get("anyOf").and_then(|a| a.get(0)).unwrap_or(schema);
    obj["properties"]["action_name"]["enum"][0]
        .as_str()
        .expect("schema names the actions")
        .to_owned()
}

fn nav_task(rounds: u32) -> TaskSpec {
    let mut t = TaskSpec::builtin("single_nav").unwrap();
    t.rounds = rounds;
    t
}

#[test]
fn the_openai_policy_talks_to_a_compatible_server() {
    let server = serve(1, "sekret");
    let mut config = OpenAiConfig::new(&server.url, "served-70b");
    config.api_key = Some("sekret".into());
    let mut policy = OpenAiPolicy::new(config);
    assert_eq!(policy.name(), "openai:served-70b");
    let plans = plan(&[nav_task(2)], 1, 3);
    let played = run_episodes(&mut policy, &plans, &quiet(1)).unwrap();
    let record = &played[0].record;
    // The first attempt got a 503 and was retried; every turn was usable.
    assert_eq!(record.invalid_replies(), 0);
    assert!(!record.turns.is_empty());
    assert_eq!(played[0].generated_tokens, 20 * record.turns.len());
    let requests = server.requests.lock().unwrap();
    assert_eq!(requests.len(), record.turns.len());
    let first = &requests[0];
    assert_eq!(first["model"], "served-70b");
    assert_eq!(first["messages"][0]["role"], "system");
    assert_eq!(first["response_format"]["type"], "json_schema");
    assert_eq!(first["seed"], 3);

    // A wrong key is an error naming the endpoint and the status, without retries.
    let mut config = OpenAiConfig::new(&server.url, "served-70b");
    config.api_key = Some("wrong".into());
    let err = run_episodes(&mut OpenAiPolicy::new(config), &plans, &quiet(1))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&server.url) && err.contains("401"), "{err}");

    // Nothing listening: a clear error after the attempts.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/v1", closed.local_addr().unwrap());
    drop(closed);
    let mut config = OpenAiConfig::new(&url, "m");
    config.attempts = 2;
    let err = run_episodes(&mut OpenAiPolicy::new(config), &plans, &quiet(1))
        .unwrap_err()
        .to_string();
    assert!(err.contains("gave up after 2 attempts"), "{err}");
}

fn model_policy(constrained: bool) -> ModelPolicy {
    model_policy_with_limit(constrained, 160)
}

fn model_policy_with_limit(constrained: bool, max_new_tokens: usize) -> ModelPolicy {
    common::smollm2(); // fetches the default model
    let loaded = teamtune_llama::LoadedModel::load("", DType::F32, &Device::Cpu).unwrap();
    let template = teamtune_guide::model_template(&loaded.assets).unwrap();
    let options = ModelPolicyOptions {
        constrained,
        max_new_tokens,
        ..ModelPolicyOptions::default()
    };
    ModelPolicy::new(loaded.model, &loaded.assets, template, options).unwrap()
}

#[test]
fn the_model_policy_gives_usable_replies_batched_as_alone_and_repeats() {
    let mut two_agents = TaskSpec::builtin("random_points").unwrap();
    two_agents.rounds = 1;
    let tasks = vec![nav_task(2), two_agents];
    let plans = plan(&tasks, 2, 5);
    let mut policy = model_policy(true);
    let batched = run_episodes(&mut policy, &plans, &quiet(4)).unwrap();
    let alone = run_episodes(&mut policy, &plans, &quiet(1)).unwrap();
    assert_eq!(outcome(&batched), outcome(&alone));
    let again = run_episodes(&mut policy, &plans, &quiet(4)).unwrap();
    assert_eq!(outcome(&batched), outcome(&again));
    for p in &batched {
        assert_eq!(p.record.invalid_replies(), 0, "{:?}", p.record.turns);
        assert!(p.generated_tokens > 0);
    }
    // Later turns reuse the agent's cache: their new prompt is much shorter than the first.
    let report = EvalReport::new(&policy.name(), &batched, 1.0);
    assert_eq!(report.invalid_reply_rate, 0.0);
}

#[test]
fn the_unconstrained_model_policy_reports_what_it_wrote() {
    let mut policy = model_policy(false);
    let plans = plan(&[nav_task(1)], 1, 9);
    let played = run_episodes(&mut policy, &plans, &quiet(1)).unwrap();
    let record = &played[0].record;
    assert_eq!(record.turns.len(), 1);
    // Whatever it wrote is kept verbatim in the conversation, valid or not.
    let reply = &record.conversations[0].messages.last().unwrap().content;
    assert!(!reply.is_empty());
    let report = EvalReport::new("unconstrained", &played, 1.0);
    assert_eq!(
        report.invalid_reply_rate,
        record.invalid_replies() as f64 / record.turns.len() as f64
    );
}

#[test]
fn a_constrained_reply_is_never_cut_by_the_token_limit() {
    // A JSON reply needs far more than 8 tokens: unconstrained, the limit cuts it (invalid);
    // constrained, the limit rises to the schema's bound and every reply is complete.
    let plans = plan(&[nav_task(2)], 1, 3);
    let mut constrained = model_policy_with_limit(true, 8);
    assert_eq!(
        constrained.reply_token_limit(),
        teamtune_agents::SchemaOptions::default().max_reply_tokens()
    );
    let played = run_episodes(&mut constrained, &plans, &quiet(1)).unwrap();
    let record = &played[0].record;
    assert_eq!(record.invalid_replies(), 0, "{:?}", record.turns);
    assert!(played[0].generated_tokens > 8 * record.turns.len());
    let mut unconstrained = model_policy_with_limit(false, 8);
    assert_eq!(unconstrained.reply_token_limit(), 8);
    let played = run_episodes(&mut unconstrained, &plans, &quiet(1)).unwrap();
    assert_eq!(
        played[0].record.invalid_replies(),
        played[0].record.turns.len()
    );
}
