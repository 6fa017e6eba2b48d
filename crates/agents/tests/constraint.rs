//! Constrained decoding with the real SmolLM2 and Llama-3 tokenizers, for every built-in task.

mod common;

use common::{both, smollm2, Tok};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use teamtune_agents::{reply_grammar, SchemaOptions, FIELDS};
use teamtune_gridworld::{builtin_tasks, parse_reply, play_expert, ActionName, Role, TaskSpec};
use teamtune_guide::{ConstraintError, ReplyConstraint, ReplyGrammar, TokenMask};

/// A token drawn uniformly among the allowed ones (rejection sampling, then the full list
/// where few are allowed: both uniform, so the mixture is too).
fn uniform(mask: &TokenMask, vocab: usize, rng: &mut ChaCha8Rng) -> u32 {
    for _ in 0..64 {
        let t = rng.random_range(0..vocab as u32);
        if mask.is_allowed(t) {
            return t;
        }
    }
    let ids = mask.allowed_ids();
    assert!(!ids.is_empty(), "empty mask");
    ids[rng.random_range(0..ids.len())]
}

/// A random reply: every token uniform among the allowed ones, with or without taking the
/// forced tokens by fast-forward. Returns all tokens, the end-of-turn token last.
fn random_walk(
    tok: &Tok,
    g: &ReplyGrammar,
    rng: &mut ChaCha8Rng,
    fast_forward: bool,
    max_tokens: usize,
) -> Vec<u32> {
    let vocab = g.vocab().vocab_size();
    let mut c = g.constraint();
    let mut ids = Vec::new();
    while !c.is_done() {
        assert!(
            ids.len() < max_tokens,
            "{} {}: no end after {max_tokens} tokens: {:?}",
            tok.name,
            g.task(),
            tok.decode(&ids)
        );
        if fast_forward {
            ids.extend(c.fast_forward().unwrap());
            if c.is_done() {
                break;
            }
        }
        let mask = c.allowed().unwrap();
        if mask.is_allowed(tok.end_of_turn) {
            // the turn may end only once the JSON is closed, and then nothing else may come
            assert_eq!(
                mask.count(),
                1,
                "{}: end-of-turn offered with others",
                tok.name
            );
        }
        let t = uniform(&mask, vocab, rng);
        c.commit(t).unwrap();
        ids.push(t);
    }
    ids
}

/// Checks one finished walk: ends with (only) the end-of-turn token, decodes to a reply that
/// parses for the task, keys in order, strings within the limits, the same bytes the
/// constraint matched.
fn check_reply(tok: &Tok, task: &TaskSpec, o: &SchemaOptions, ids: &[u32]) -> Value {
    let (last, body) = ids.split_last().unwrap();
    assert_eq!(
        *last, tok.end_of_turn,
        "{}: reply must end the turn",
        tok.name
    );
    assert!(!body.contains(&tok.end_of_turn));
    let text = tok.decode(body);
    let bytes: Vec<u8> = body
        .iter()
        .flat_map(|&t| tok.vocab.token_bytes(t).to_vec())
        .collect();
    assert_eq!(text.as_bytes(), &bytes[..], "{}: decode differs", tok.name);
    let allowed = task.allowed_actions();
    let reply = parse_reply(&text, &allowed)
        .unwrap_or_else(|e| panic!("{} {}: {e}: {text}", tok.name, task.id));
    assert!(allowed.contains(&reply.action_name));
    let v: Value = serde_json::from_str(&text).unwrap();
    let obj = v.as_object().unwrap();
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    assert_eq!(keys, FIELDS, "{text}");
    for (field, max) in [
        ("reflection", o.max_reflection_chars),
        ("rationale", o.max_rationale_chars),
        ("message", o.max_message_chars),
        ("add_memory", o.max_memory_chars),
    ] {
        let n = obj[field].as_str().unwrap().chars().count();
        assert!(n <= max, "{field} has {n} > {max} chars: {text}");
    }
    let params = obj["action_parameters"].as_object().unwrap();
    if reply.action_name == ActionName::Pick {
        assert!(params.keys().all(|k| k == "item"), "{text}");
    } else {
        assert!(params.is_empty(), "{text}");
    }
    v
}

fn random_walks(tok: &Tok) {
    let o = SchemaOptions::uniform(24);
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let mut all_items = 0;
    for task in builtin_tasks() {
        let g = reply_grammar(&tok.vocab, &task, &o).unwrap();
        let mut actions = std::collections::HashSet::new();
        let mut items = 0;
        let mut lengths = Vec::new();
        for i in 0..50 {
            let ids = random_walk(tok, &g, &mut rng, i % 2 == 0, 400);
            let v = check_reply(tok, &task, &o, &ids);
            actions.insert(v["action_name"].as_str().unwrap().to_string());
            items += v["action_parameters"].get("item").is_some() as usize;
            lengths.push(ids.len());
        }
        eprintln!(
            "{} {}: 50 walks, {} actions seen, {items} with an item, tokens min {} max {}",
            tok.name,
            task.id,
            actions.len(),
            lengths.iter().min().unwrap(),
            lengths.iter().max().unwrap()
        );
        assert!(actions.len() >= 2, "{}: walks are degenerate", task.id);
        all_items += items;
    }
    assert!(all_items > 0, "{}: no walk picked a named item", tok.name);
}

#[test]
fn random_walks_parse_smollm2() {
    random_walks(smollm2());
}

#[test]
fn random_walks_parse_llama3() {
    random_walks(common::llama3());
}

/// At the parser's own limits (1000/300/200 characters) the replies still parse: the schema
/// counts characters as `parse_reply` does.
#[test]
fn walks_at_the_parsers_limits_parse() {
    let tok = smollm2();
    let o = SchemaOptions::uniform(usize::MAX);
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut near_limit = 0;
    for task in builtin_tasks() {
        let g = reply_grammar(&tok.vocab, &task, &o).unwrap();
        let ids = random_walk(tok, &g, &mut rng, true, 5000);
        let v = check_reply(tok, &task, &o, &ids);
        for (f, max) in [
            ("rationale", o.max_rationale_chars),
            ("add_memory", o.max_memory_chars),
        ] {
            near_limit += (v[f].as_str().unwrap().chars().count() * 10 >= max * 9) as usize;
        }
    }
    // uniform walks rarely close a string early, so the limits themselves were exercised
    assert!(
        near_limit >= 7,
        "only {near_limit} strings near their limit"
    );
}

/// Commits `text` token by token. Returns the index of the first refused token and the error,
/// after checking that the mask refused it too. (The converse need not hold: where the schema
/// forces text, the mask offers only its canonical token, while `commit` takes any
/// tokenisation of valid text.)
fn commit_text(tok: &Tok, c: &mut ReplyConstraint, text: &str) -> Option<(usize, ConstraintError)> {
    for (i, t) in tok.encode(text).into_iter().enumerate() {
        let mask = c.allowed().unwrap();
        match c.commit(t) {
            Ok(()) => {}
            Err(e) => {
                assert!(
                    !mask.is_allowed(t),
                    "{}: refused an allowed token: {e}",
                    tok.name
                );
                // a refusal leaves the constraint as it was
                assert_eq!(c.allowed().unwrap().allowed_ids(), mask.allowed_ids());
                return Some((i, e));
            }
        }
    }
    None
}

const PREFIX: &str = r#"{"reflection":"x","rationale":"y","action_name":""#;

#[test]
fn actions_outside_the_task_are_never_allowed() {
    for tok in both() {
        for task in builtin_tasks() {
            let allowed = task.allowed_actions();
            let g = reply_grammar(&tok.vocab, &task, &SchemaOptions::default()).unwrap();
            let mut c = g.constraint();
            assert!(commit_text(tok, &mut c, PREFIX).is_none());
            // every token allowed here spells the start of an allowed action
            let fits = |t: &[u8]| {
                allowed.iter().any(|a| {
                    let full = format!("{a}\",\"action_parameters\":{{");
                    full.as_bytes().starts_with(t) || t.starts_with(full.as_bytes())
                })
            };
            let mask = c.allowed().unwrap();
            for t in mask.allowed_ids() {
                let b = tok.vocab.token_bytes(t);
                assert!(
                    fits(b),
                    "{} {}: token {t} {:?} allowed at the action",
                    tok.name,
                    task.id,
                    String::from_utf8_lossy(b)
                );
            }
            // and forcing a foreign name fails at its first distinctive token
            let mut foreign: Vec<String> = ActionName::ALL
                .iter()
                .filter(|a| !allowed.contains(a))
                .map(|a| a.to_string())
                .collect();
            foreign.extend(["fly", "North", "move north", "northeast"].map(String::from));
            for name in foreign {
                let mut c2 = c.clone();
                let text = format!("{name}\",");
                // bytes every allowed name shares with this one: the refusal comes at the token
                // that holds the first byte past them
                let p = allowed
                    .iter()
                    .map(|a| {
                        let a = format!("{a}\"");
                        a.bytes()
                            .zip(text.bytes())
                            .take_while(|(x, y)| x == y)
                            .count()
                    })
                    .max()
                    .unwrap();
                let (i, e) = commit_text(tok, &mut c2, &text)
                    .unwrap_or_else(|| panic!("{} {}: {name} accepted", tok.name, task.id));
                let ids = tok.encode(&text);
                let start: usize = ids[..i]
                    .iter()
                    .map(|&t| tok.vocab.token_bytes(t).len())
                    .sum();
                let end = start + tok.vocab.token_bytes(ids[i]).len();
                assert!(
                    start <= p && p < end,
                    "{} {}: {name} refused at bytes {start}..{end}, expected at {p}",
                    tok.name,
                    task.id
                );
                let msg = e.to_string();
                assert!(msg.contains(&task.id) && msg.contains("refused"), "{msg}");
            }
        }
    }
}

/// The scripted experts' replies (the training data's form) are accepted token by token with
/// the default limits, and the turn may end exactly after the closing brace.
#[test]
fn expert_replies_are_accepted_to_the_end() {
    for tok in both() {
        let mut longest = [0usize; 4];
        for task in builtin_tasks() {
            let g = reply_grammar(&tok.vocab, &task, &SchemaOptions::default()).unwrap();
            let mut replies = 0;
            for seed in 0..4 {
                let record = play_expert(&task, seed).unwrap().record();
                for conv in &record.conversations {
                    for m in conv.messages.iter().filter(|m| m.role == Role::Assistant) {
                        let v: Value = serde_json::from_str(&m.content).unwrap();
                        for (k, f) in ["reflection", "rationale", "message", "add_memory"]
                            .iter()
                            .enumerate()
                        {
                            longest[k] = longest[k].max(v[f].as_str().unwrap().chars().count());
                        }
                        let mut c = g.constraint();
                        let ids = tok.encode(&m.content);
                        for (i, &t) in ids.iter().enumerate() {
                            let mask = c.allowed().unwrap();
                            assert!(
                                !mask.is_allowed(tok.end_of_turn),
                                "{}: end offered at token {i} of {}",
                                tok.name,
                                m.content
                            );
                            c.commit(t).unwrap_or_else(|e| {
                                panic!("{} {}: {e} in {}", tok.name, task.id, m.content)
                            });
                        }
                        let mask = c.allowed().unwrap();
                        assert_eq!(mask.allowed_ids(), vec![tok.end_of_turn]);
                        assert_eq!(c.fast_forward().unwrap(), vec![tok.end_of_turn]);
                        assert!(c.is_done());
                        assert!(matches!(
                            c.commit(tok.end_of_turn),
                            Err(ConstraintError::Finished { .. })
                        ));
                        replies += 1;
                    }
                }
            }
            assert!(replies > 0);
        }
        eprintln!(
            "{}: longest expert reflection, rationale, message, memory: {longest:?}",
            tok.name
        );
    }
}

/// Invalid replies are refused at the token that holds the first invalid byte (marked `|`).
#[test]
fn invalid_replies_are_refused_at_the_right_token() {
    let long = "a".repeat(SchemaOptions::default().max_message_chars);
    let cases: Vec<(&str, String)> = vec![
        ("single_nav", r#"{"reflection":"a","rationale":"b","action_name":"|pick","#.into()),
        ("single_nav", r#"{| "reflection":"a""#.into()),
        ("single_nav", r#"{"r|ationale":"b""#.into()),
        ("corners", r#"{"reflection":"a","rationale":"b","action_name":"north| ","#.into()),
        (
            "corners",
            r#"{"reflection":"a","rationale":"b","action_name":"north","action_parameters":{|"item":"a"}"#
                .into(),
        ),
        (
            "single_pick",
            r#"{"reflection":"a","rationale":"b","action_name":"pick","action_parameters":{"item":"|z"}"#
                .into(),
        ),
        (
            "single_pick",
            format!(
                r#"{{"reflection":"a","rationale":"b","action_name":"drop","action_parameters":{{}},"message":"{long}|a""#
            ),
        ),
        (
            "multi_pick",
            r#"{"reflection":"a","rationale":"b","action_name":"skip","action_parameters":{},"message":"","add_memory":""|,"x":1}"#
                .into(),
        ),
        (
            "alphabetical",
            r#"{"reflection":"a","rationale":"b","action_name":"west","action_parameters":{},"message":|null"#
                .into(),
        ),
        (
            "alphabetical",
            r#"{"reflection":"a","rationale":"b","action_name":"west","action_parameters":{},"message":"","add_memory":""}| x"#
                .into(),
        ),
        ("random_points", "{\"reflection\":\"a|\u{1}\"".into()),
    ];
    for tok in both() {
        for (task_id, marked) in &cases {
            let task = TaskSpec::builtin(task_id).unwrap();
            let p = marked.find('|').unwrap();
            let text = marked.replacen('|', "", 1);
            let g = reply_grammar(&tok.vocab, &task, &SchemaOptions::default()).unwrap();
            let mut c = g.constraint();
            let (i, e) = commit_text(tok, &mut c, &text)
                .unwrap_or_else(|| panic!("{} {task_id}: accepted {text}", tok.name));
            let ids = tok.encode(&text);
            let start: usize = ids[..i]
                .iter()
                .map(|&t| tok.vocab.token_bytes(t).len())
                .sum();
            let end = start + tok.vocab.token_bytes(ids[i]).len();
            assert!(
                start <= p && p < end,
                "{} {task_id}: {text}: refused at bytes {start}..{end}, expected at {p}: {e}",
                tok.name
            );
        }
        // the end of the turn is refused while the JSON is open
        let g = reply_grammar(
            &tok.vocab,
            &TaskSpec::builtin("corners").unwrap(),
            &SchemaOptions::default(),
        )
        .unwrap();
        let mut c = g.constraint();
        assert!(commit_text(tok, &mut c, PREFIX).is_none());
        let e = c.commit(tok.end_of_turn).unwrap_err().to_string();
        assert!(e.contains("corners") && e.contains("not complete"), "{e}");
    }
}

/// Constraints of one grammar, and clones of a constraint, do not affect each other.
#[test]
fn rows_are_independent() {
    // one grammar shared by the threads of a batch, one constraint moved to each row's worker
    fn shared<T: Send + Sync>() {}
    fn per_row<T: Send>() {}
    shared::<ReplyGrammar>();
    shared::<teamtune_guide::TokenVocab>();
    per_row::<ReplyConstraint>();
    per_row::<TokenMask>();
    let tok = smollm2();
    let g = reply_grammar(
        &tok.vocab,
        &TaskSpec::builtin("corners").unwrap(),
        &SchemaOptions::default(),
    )
    .unwrap();
    let mut a = g.constraint();
    let mut b = g.constraint();
    let start = a.allowed().unwrap().allowed_ids();
    assert!(commit_text(tok, &mut a, PREFIX).is_none());
    let mut a2 = a.clone();
    assert!(commit_text(tok, &mut a, "north\"").is_none());
    assert!(commit_text(tok, &mut a2, "skip\"").is_none());
    assert_eq!(b.allowed().unwrap().allowed_ids(), start);
    assert!(commit_text(tok, &mut b, "{\"reflection\":\"zz").is_none());
    // a fresh constraint still starts at the beginning
    assert_eq!(g.constraint().allowed().unwrap().allowed_ids(), start);
    // logits masking: -inf outside the mask, padded rows included
    let mut logits = vec![0.5f32; g.vocab().vocab_size() + 7];
    let mask = a.allowed().unwrap();
    a.mask_logits(&mut logits).unwrap();
    for (i, l) in logits.iter().enumerate() {
        assert_eq!(*l == 0.5, mask.is_allowed(i as u32), "id {i}");
    }
    assert!(logits[g.vocab().vocab_size()..]
        .iter()
        .all(|l| *l == f32::NEG_INFINITY));
}

#[test]
fn a_whole_reply_by_fast_forward_and_greedy_choice() {
    // Always the lowest allowed id: deterministic, and shows the fast-forwarded tokens are
    // the ones the mask would have forced.
    for tok in both() {
        let task = TaskSpec::builtin("permission_pick").unwrap();
        let g = reply_grammar(&tok.vocab, &task, &SchemaOptions::uniform(8)).unwrap();
        let mut c = g.constraint();
        let mut slow = g.constraint();
        let mut ids = Vec::new();
        let mut forced = 0;
        while !c.is_done() {
            let ff = c.fast_forward().unwrap();
            forced += ff.len();
            for &t in &ff {
                let m = slow.allowed().unwrap();
                assert_eq!(
                    m.allowed_ids(),
                    vec![t],
                    "{}: ff token not forced",
                    tok.name
                );
                slow.commit(t).unwrap();
            }
            ids.extend(ff);
            if c.is_done() {
                break;
            }
            let t = c.allowed().unwrap().allowed_ids()[0];
            c.commit(t).unwrap();
            slow.commit(t).unwrap();
            ids.push(t);
            assert!(ids.len() < 400);
        }
        assert!(slow.is_done());
        assert!(forced > 5, "{}: {forced} forced tokens", tok.name);
        let text = tok.decode(&ids[..ids.len() - 1]);
        parse_reply(&text, &task.allowed_actions()).unwrap();
    }
}

/// Rows of one grammar decoded on several threads at once (as a batch would be) give the same
/// replies as one after another.
#[test]
fn rows_on_threads_match_rows_in_sequence() {
    let tok = common::llama3();
    let task = TaskSpec::builtin("multi_pick").unwrap();
    let o = SchemaOptions::uniform(16);
    let g = reply_grammar(&tok.vocab, &task, &o).unwrap();
    let walk = |seed: u64| {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        random_walk(tok, &g, &mut rng, seed.is_multiple_of(2), 400)
    };
    let sequential: Vec<Vec<u32>> = (0..8).map(walk).collect();
    let threaded: Vec<Vec<u32>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..8).map(|seed| s.spawn(move || walk(seed))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(sequential, threaded);
    for ids in &threaded {
        check_reply(tok, &task, &o, ids);
    }
}
