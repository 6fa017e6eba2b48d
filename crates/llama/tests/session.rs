//! Sessions: the KV cache kept across turns gives the logits of recomputing the whole
//! conversation, forks are independent, and decoding many sessions as one batch gives each
//! the tokens it gets alone (greedy), with filters, stop ids and token limits per row.

mod common;

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use teamtune_llama::{
    decode_batch, generate, Decoded, Llama, LlamaConfig, LoadedModel, NoFilter, Result,
    SamplingParams, Session, StopReason, TokenFilter, TokenLayout, WeightSource,
};

fn tiny() -> &'static Llama {
    static M: OnceLock<Llama> = OnceLock::new();
    M.get_or_init(|| {
        let dir = common::fixtures().join("tiny-llama31");
        let cfg = LlamaConfig::from_file(&dir.join("config.json")).unwrap();
        let weights = WeightSource::safetensors(vec![dir.join("model.safetensors")]).unwrap();
        Llama::load(&cfg, &weights, DType::F32, &Device::Cpu).unwrap()
    })
}

fn smol() -> &'static LoadedModel {
    static M: OnceLock<LoadedModel> = OnceLock::new();
    M.get_or_init(|| {
        let path = common::default_model();
        LoadedModel::load(path.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap()
    })
}

/// Deterministic token ids in `4..vocab` (the tiny model's ids 0-3 are special).
fn ids(seed: u64, n: usize, vocab: u32) -> Vec<u32> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            4 + ((x >> 33) as u32) % (vocab - 4)
        })
        .collect()
}

/// Logits `[vocab]` after the last of `tokens`, one forward from scratch without a cache.
fn scratch_logits(m: &Llama, tokens: &[u32]) -> Vec<f32> {
    let input = Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.forward_last(&input, &TokenLayout::contiguous(1, tokens.len(), 0), None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_logits_match(m: &Llama, got: &Tensor, tokens: &[u32], what: &str) {
    let want = scratch_logits(m, tokens);
    let got: Vec<f32> = got.to_vec1().unwrap();
    let err = common::max_rel_err(&got, &want, 1.0);
    assert!(
        err <= 1e-4,
        "{what}: max rel err {err} over {} tokens",
        tokens.len()
    );
}

/// SmolLM2's ChatML, as its template renders it (checked against transformers' renderings in
/// `chatml_helper_matches_the_model_template`).
fn chatml(messages: &[(&str, &str)], generation_prompt: bool) -> String {
    let mut s = String::new();
    if messages.first().is_none_or(|(r, _)| *r != "system") {
        s.push_str("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n");
    }
    for (role, content) in messages {
        s.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
    }
    if generation_prompt {
        s.push_str("<|im_start|>assistant\n");
    }
    s
}

/// The tokens of a new user turn after an assistant reply that ended on `<|im_end|>` (which the
/// session already holds).
fn user_turn(text: &str) -> Vec<u32> {
    let s = format!("\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n");
    smol().assets.encode(&s, false).unwrap()
}

fn encode(text: &str) -> Vec<u32> {
    smol().assets.encode(text, false).unwrap()
}

fn greedy() -> SamplingParams {
    SamplingParams::default()
}

#[test]
fn chatml_helper_matches_the_model_template() {
    let m = smol();
    let template = m.assets.chat_template.as_deref().unwrap();
    assert!(template.contains("<|im_start|>"), "{template}");
    let f = common::json("smollm2/reference.json");
    let mut checked = 0;
    for case in f["cases"].as_array().unwrap() {
        let Some(msgs) = case["messages"].as_array() else {
            continue;
        };
        let msgs: Vec<(&str, &str)> = msgs
            .iter()
            .map(|m| (m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        assert_eq!(chatml(&msgs, true), case["prompt_text"].as_str().unwrap());
        checked += 1;
    }
    assert!(checked >= 3);
}

// (a) KV reuse across turns.

#[test]
fn kv_reuse_across_turns_equals_a_full_forward_tiny() {
    let m = tiny();
    let mut s = Session::new(m);
    let l1 = s.prefill(m, &ids(1, 40, 320)).unwrap();
    assert_logits_match(m, &l1, s.tokens(), "turn 1");
    let d = s.decode(m, &mut NoFilter, &greedy(), 10, &[]).unwrap();
    assert_eq!(
        (d.tokens.len(), d.stop.clone()),
        (10, StopReason::MaxTokens)
    );
    assert_eq!((d.prompt_tokens, d.cached_tokens), (0, 40));
    // The last reply token is pending: the next forward runs it with the new turn.
    assert_eq!(s.pending(), &d.tokens[9..]);
    assert_eq!(s.cached_len(), 49);
    let l2 = s.prefill(m, &ids(2, 25, 320)).unwrap();
    assert_eq!(s.len(), 75);
    assert_eq!(s.cache().len(), 75);
    assert_logits_match(m, &l2, s.tokens(), "turn 2");
    // A third turn, and decoding again from there.
    let d3 = s.decode(m, &mut NoFilter, &greedy(), 5, &[]).unwrap();
    let l3 = s.prefill(m, &ids(3, 7, 320)).unwrap();
    assert_eq!(d3.cached_tokens, 75);
    assert_logits_match(m, &l3, s.tokens(), "turn 3");
}

#[test]
fn kv_reuse_across_turns_equals_a_full_forward_default_model() {
    let lm = smol();
    let m = &lm.model;
    let eos = &lm.assets.eos_token_ids;
    let prompt = encode(&chatml(
        &[
            (
                "system",
                "You are a terse assistant. Answer with one short sentence.",
            ),
            ("user", "Name three primary colors."),
        ],
        true,
    ));
    let mut s = Session::new(m);
    s.prefill(m, &prompt).unwrap();
    let d = s.decode(m, &mut NoFilter, &greedy(), 40, eos).unwrap();
    // The same reply as the crate's plain generation from the whole prompt.
    let g = generate(m, &prompt, &greedy(), 40, eos, |_| true).unwrap();
    assert_eq!(d.tokens, g.tokens);
    assert_eq!(d.stop, g.stop);
    assert!(matches!(d.stop, StopReason::Eos(_)), "{d:?}");
    let l2 = s
        .prefill(m, &user_turn("And three secondary colors?"))
        .unwrap();
    assert_logits_match(m, &l2, s.tokens(), "turn 2");
    // The session's tokens are the whole conversation as the template renders it.
    let reply = lm.assets.decode(&d.tokens, false).unwrap();
    let text = lm.assets.decode(s.tokens(), false).unwrap();
    assert!(text.ends_with(&format!(
        "{reply}<|im_end|>\n<|im_start|>user\nAnd three secondary colors?<|im_end|>\n<|im_start|>assistant\n"
    )));
}

// (b) batched decoding equals decoding each session alone.

/// Decodes clones of `sessions` one at a time and all together; asserts the same replies and
/// the same session tokens; returns the batched sessions and replies.
fn alone_vs_batched(
    m: &Llama,
    sessions: &[Session],
    max: &[usize],
    stop: &[u32],
) -> (Vec<Session>, Vec<Decoded>) {
    let mut alone = sessions.to_vec();
    let alone_out: Vec<Decoded> = alone
        .iter_mut()
        .enumerate()
        .map(|(i, s)| {
            s.decode(m, &mut NoFilter, &greedy(), max[i.min(max.len() - 1)], stop)
                .unwrap()
        })
        .collect();
    let mut batched = sessions.to_vec();
    let mut refs: Vec<&mut Session> = batched.iter_mut().collect();
    let out = decode_batch(m, &mut refs, &mut [], &[greedy()], max, stop).unwrap();
    for (i, (a, b)) in alone_out.iter().zip(&out).enumerate() {
        assert_eq!(a, b, "session {i}");
        assert_eq!(alone[i].tokens(), batched[i].tokens(), "session {i}");
        assert_eq!(
            alone[i].cached_len(),
            batched[i].cached_len(),
            "session {i}"
        );
        // The split removed the batch's padding.
        assert_eq!(
            batched[i].cache().len(),
            batched[i].cached_len(),
            "session {i}"
        );
        assert_eq!(batched[i].cache().batch(), 1);
    }
    (batched, out)
}

#[test]
fn batched_decode_equals_alone_tiny() {
    let m = tiny();
    let mut sessions = Vec::new();
    for (i, (hist, turn)) in [(5, 3), (60, 9), (17, 0), (33, 31)].into_iter().enumerate() {
        let mut s = Session::new(m);
        s.prefill(m, &ids(10 + i as u64, hist, 320)).unwrap();
        // A pending new turn (run by the batched prefill), or none (decode from the logits).
        s.push(&ids(20 + i as u64, turn, 320));
        sessions.push(s);
    }
    let (after, out) = alone_vs_batched(m, &sessions, &[12], &[]);
    assert!(out.iter().all(|d| d.tokens.len() == 12));
    assert_eq!(out[3].prompt_tokens, 31);
    assert_eq!(out[3].cached_tokens, 33);
    // A second batched turn, from the split caches; one session has a much longer turn,
    // which runs alone before the batch.
    let mut next = after;
    for (i, s) in next.iter_mut().enumerate() {
        s.push(&ids(30 + i as u64, if i == 1 { 90 } else { 4 + i }, 320));
    }
    let (after2, _) = alone_vs_batched(m, &next, &[6, 9, 3, 12], &[]);
    // (c) the sessions continue: a further turn alone matches a full recompute.
    for (i, mut s) in after2.into_iter().enumerate() {
        let l = s.prefill(m, &ids(40 + i as u64, 6, 320)).unwrap();
        assert_logits_match(m, &l, s.tokens(), &format!("session {i} after the batch"));
    }
}

fn smol_sessions() -> Vec<Session> {
    let lm = smol();
    let m = &lm.model;
    let eos = &lm.assets.eos_token_ids;
    let mut sessions = Vec::new();
    // Different histories: one turn, two turns (the first reply decoded here), a long system
    // prompt; the last one's new turn stays pending for the batched prefill.
    let mut s = Session::new(m);
    s.prefill(
        m,
        &encode(&chatml(&[("user", "What is the capital of France?")], true)),
    )
    .unwrap();
    sessions.push(s);

    let mut s = Session::new(m);
    s.prefill(
        m,
        &encode(&chatml(
            &[("user", "Can you help me with some arithmetic?")],
            true,
        )),
    )
    .unwrap();
    s.decode(m, &mut NoFilter, &greedy(), 30, eos).unwrap();
    s.prefill(m, &user_turn("What is 12 times 7?")).unwrap();
    sessions.push(s);

    let mut s = Session::new(m);
    s.prefill(
        m,
        &encode(&chatml(
            &[
                ("system", "You are an agent in a grid world. You can move north, south, east or west, pick up items and talk to your teammates. Reply with one short sentence that names your next action."),
                ("user", "You are at (2, 3). A key lies at (4, 3). Your teammate is at (0, 0)."),
            ],
            true,
        )),
    )
    .unwrap();
    sessions.push(s);

    let mut s = Session::new(m);
    s.prefill(
        m,
        &encode(&chatml(
            &[(
                "system",
                "You are a terse assistant. Answer with one short sentence.",
            )],
            false,
        )),
    )
    .unwrap();
    s.push(&encode(
        "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n",
    ));
    sessions.push(s);
    sessions
}

#[test]
fn batched_decode_equals_alone_default_model() {
    let lm = smol();
    let m = &lm.model;
    let eos = &lm.assets.eos_token_ids;
    let sessions = smol_sessions();
    let lens: Vec<usize> = sessions.iter().map(Session::len).collect();
    assert!(lens.windows(2).all(|w| w[0] != w[1]), "{lens:?}");
    let (after, out) = alone_vs_batched(m, &sessions, &[48], eos);
    // Replies of different lengths: rows left the batch at different steps.
    let n: Vec<usize> = out.iter().map(|d| d.tokens.len()).collect();
    assert!(n.iter().any(|&k| k != n[0]), "{n:?}");
    let first = lm.assets.decode(&out[0].tokens, false).unwrap();
    assert_eq!(first, "The capital of France is Paris.");
    // Also against plain generation from each whole conversation.
    for (s, d) in sessions.iter().zip(&out) {
        let g = generate(m, s.tokens(), &greedy(), 48, eos, |_| true).unwrap();
        assert_eq!((&g.tokens, &g.stop), (&d.tokens, &d.stop));
    }
    // (c) each session continues with the same logits as recomputing its conversation.
    for (i, mut s) in after.into_iter().enumerate() {
        let l = s
            .prefill(m, &user_turn("Thanks. Now say it again."))
            .unwrap();
        assert_logits_match(m, &l, s.tokens(), &format!("session {i} after the batch"));
    }
}

// (d) filters.

/// Forbids one token; records what it was told.
struct Forbid {
    token: u32,
    committed: Vec<u32>,
}

impl TokenFilter for Forbid {
    fn mask(&mut self, logits: &mut [f32]) -> Result<()> {
        logits[self.token as usize] = f32::NEG_INFINITY;
        Ok(())
    }
    fn commit(&mut self, token: u32) -> Result<()> {
        self.committed.push(token);
        Ok(())
    }
    fn is_done(&self) -> bool {
        false
    }
}

/// Forces `script` at the start and again after `again_after` free tokens; done after
/// `done_after` committed tokens.
struct Script {
    script: Vec<u32>,
    again_after: usize,
    done_after: usize,
    free: usize,
    forced_times: usize,
    committed: Vec<u32>,
}

impl Script {
    fn new(script: Vec<u32>, again_after: usize, done_after: usize) -> Self {
        Script {
            script,
            again_after,
            done_after,
            free: 0,
            forced_times: 0,
            committed: Vec::new(),
        }
    }
}

impl TokenFilter for Script {
    fn forced(&mut self) -> Vec<u32> {
        if self.forced_times == 0 || (self.forced_times == 1 && self.free == self.again_after) {
            self.forced_times += 1;
            self.free = 0;
            return self.script.clone();
        }
        self.free += 1;
        Vec::new()
    }
    fn mask(&mut self, _logits: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn commit(&mut self, token: u32) -> Result<()> {
        self.committed.push(token);
        Ok(())
    }
    fn is_done(&self) -> bool {
        self.committed.len() >= self.done_after
    }
}

fn filters_in_batch_and_alone(m: &Llama, sessions: &[Session], script: &[u32], stop: &[u32]) {
    // What greedy says first for session 0: forbid exactly that.
    let mut probe = sessions[0].clone();
    let free = probe.decode(m, &mut NoFilter, &greedy(), 8, stop).unwrap();
    let banned = free.tokens[0];
    let make = || -> (Forbid, Script) {
        (
            Forbid {
                token: banned,
                committed: vec![],
            },
            Script::new(script.to_vec(), 3, 2 * script.len() + 6),
        )
    };
    let max = [20, 40, 20];

    let (mut f0, mut f1) = make();
    let mut f2 = NoFilter;
    let mut alone = sessions.to_vec();
    let a0 = alone[0]
        .decode(m, &mut f0, &greedy(), max[0], stop)
        .unwrap();
    let a1 = alone[1]
        .decode(m, &mut f1, &greedy(), max[1], stop)
        .unwrap();
    let a2 = alone[2]
        .decode(m, &mut f2, &greedy(), max[2], stop)
        .unwrap();

    let (mut g0, mut g1) = make();
    let mut g2 = NoFilter;
    let mut batched = sessions.to_vec();
    let mut refs: Vec<&mut Session> = batched.iter_mut().collect();
    let out = decode_batch(
        m,
        &mut refs,
        &mut [&mut g0 as &mut dyn TokenFilter, &mut g1, &mut g2],
        &[greedy()],
        &max,
        stop,
    )
    .unwrap();
    assert_eq!(out, vec![a0.clone(), a1.clone(), a2]);
    for i in 0..3 {
        assert_eq!(alone[i].tokens(), batched[i].tokens());
    }
    assert_eq!(f0.committed, g0.committed);
    assert_eq!(f1.committed, g1.committed);

    // The forbidden token never comes, and the filter saw every token of the reply.
    assert!(!a0.tokens.contains(&banned), "{a0:?}");
    assert_ne!(a0.tokens, free.tokens);
    assert!(g0.committed.starts_with(&a0.tokens));
    // The script came first, three free tokens, the script again, then done.
    let k = script.len();
    assert_eq!(&a1.tokens[..k], script);
    assert_eq!(&a1.tokens[k + 3..2 * k + 3], script);
    assert_eq!(a1.tokens.len(), 2 * k + 6);
    assert_eq!(a1.forced_tokens, 2 * k);
    assert_eq!(a1.stop, StopReason::Callback);
    assert_eq!(g1.committed, a1.tokens);
    // The session holds the reply; its last token is pending.
    let s1 = &batched[1];
    assert!(s1.tokens().ends_with(&a1.tokens));
    assert_eq!(s1.pending(), &a1.tokens[a1.tokens.len() - 1..]);
    for (i, s) in batched.iter_mut().enumerate() {
        let l = s.flush(m).unwrap();
        assert_logits_match(m, &l, s.tokens(), &format!("session {i} after filters"));
    }
}

#[test]
fn filters_are_obeyed_in_batch_and_alone_tiny() {
    let m = tiny();
    let sessions: Vec<Session> = [(9, 20), (30, 40), (12, 3)]
        .iter()
        .map(|&(seed, n)| {
            let mut s = Session::new(m);
            s.prefill(m, &ids(seed, n, 320)).unwrap();
            s
        })
        .collect();
    filters_in_batch_and_alone(m, &sessions, &ids(77, 5, 320), &[]);
}

#[test]
fn filters_are_obeyed_in_batch_and_alone_default_model() {
    let lm = smol();
    let sessions = smol_sessions()[..3].to_vec();
    let script = encode("{\"action_name\": \"");
    assert!(script.len() >= 3, "{script:?}");
    filters_in_batch_and_alone(&lm.model, &sessions, &script, &lm.assets.eos_token_ids);
}

// (e) fork.

#[test]
fn forks_of_a_prefix_diverge_independently() {
    for (m, prefix, turns) in [
        (tiny(), ids(5, 30, 320), [ids(6, 10, 320), ids(7, 14, 320)]),
        (
            &smol().model,
            encode(&chatml(
                &[(
                    "system",
                    "You are an agent in a grid world. Answer in one sentence.",
                )],
                false,
            )),
            [
                encode("<|im_start|>user\nWhere is the key?<|im_end|>\n<|im_start|>assistant\n"),
                encode("<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n"),
            ],
        ),
    ] {
        let mut base = Session::new(m);
        base.prefill(m, &prefix).unwrap();
        let mut a = base.fork();
        let mut b = base.fork();
        let la = a.prefill(m, &turns[0]).unwrap();
        assert_logits_match(m, &la, a.tokens(), "fork a");
        // b decodes in a batch with another fork of the base; a alone.
        let mut c = base.fork();
        c.push(&turns[0]);
        b.push(&turns[1]);
        let da = a.decode(m, &mut NoFilter, &greedy(), 12, &[]).unwrap();
        let out = decode_batch(m, &mut [&mut b, &mut c], &mut [], &[greedy()], &[12], &[]).unwrap();
        // c is a's twin, its turn run in the batch rather than prefilled alone.
        assert_eq!((&out[1].tokens, &out[1].stop), (&da.tokens, &da.stop));
        assert_eq!(
            (out[1].prompt_tokens, out[1].cached_tokens),
            (turns[0].len(), prefix.len())
        );
        assert_ne!(out[0].tokens, da.tokens);
        // The base is untouched by its forks.
        assert_eq!(base.tokens(), &prefix[..]);
        assert_eq!(
            (base.cached_len(), base.cache().len()),
            (prefix.len(), prefix.len())
        );
        let lb = base.flush(m).unwrap();
        assert_logits_match(m, &lb, &prefix, "base");
        for (name, s) in [("a", &mut a), ("b", &mut b), ("c", &mut c)] {
            assert!(s.tokens().starts_with(&prefix));
            let l = s.prefill(m, &turns[1]).unwrap();
            assert_logits_match(m, &l, s.tokens(), name);
        }
    }
}

// (f) stop ids and token limits per row.

#[test]
fn stop_ids_and_token_limits_per_row() {
    let m = tiny();
    let sessions: Vec<Session> = (0..4)
        .map(|i| {
            let mut s = Session::new(m);
            s.prefill(m, &ids(50 + i, 10 + 7 * i as usize, 320))
                .unwrap();
            s
        })
        .collect();
    // Each row's free greedy continuation.
    let free: Vec<Vec<u32>> = sessions
        .iter()
        .map(|s| {
            s.clone()
                .decode(m, &mut NoFilter, &greedy(), 20, &[])
                .unwrap()
                .tokens
        })
        .collect();
    // Stop on row 2's 6th token and row 3's 9th: each row stops at its own first stop id.
    let stop = [free[2][5], free[3][8]];
    let max = [0, 3, 20, 20];
    let mut batched = sessions.clone();
    let mut refs: Vec<&mut Session> = batched.iter_mut().collect();
    let out = decode_batch(m, &mut refs, &mut [], &[greedy()], &max, &stop).unwrap();
    for (i, d) in out.iter().enumerate() {
        let cut = free[i].iter().position(|t| stop.contains(t));
        let (want, reason) = match cut {
            Some(c) if c < max[i] => (&free[i][..c], StopReason::Eos(free[i][c])),
            _ => (&free[i][..max[i]], StopReason::MaxTokens),
        };
        assert_eq!((d.tokens.as_slice(), &d.stop), (want, &reason), "row {i}");
        if let StopReason::Eos(t) = reason {
            // The stop token is in the session, pending for the next turn.
            assert_eq!(batched[i].pending(), &[t]);
        }
    }
    assert_eq!(out[0].tokens, Vec::<u32>::new());
    assert_eq!(out[1].tokens.len(), 3);
    assert!(matches!(out[2].stop, StopReason::Eos(_)));
    // Row 0 produced nothing: the session is as it was, logits ready.
    assert_eq!(batched[0].tokens(), sessions[0].tokens());
    assert!(batched[0].last_logits().is_some());
    // Several sampling params: a seeded row is repeatable, and the greedy row is unaffected.
    let hot = SamplingParams {
        temperature: 1.0,
        seed: 11,
        ..Default::default()
    };
    let run = || {
        let mut s = sessions.clone();
        let mut refs: Vec<&mut Session> = s.iter_mut().collect();
        decode_batch(
            m,
            &mut refs,
            &mut [],
            &[greedy(), hot.clone(), greedy(), hot.clone()],
            &[10],
            &[],
        )
        .unwrap()
    };
    let (x, y) = (run(), run());
    assert_eq!(x, y);
    assert_eq!(x[0].tokens, free[0][..10]);
    let alone = sessions[1]
        .clone()
        .decode(m, &mut NoFilter, &hot, 10, &[])
        .unwrap();
    assert_eq!(x[1], alone);
}

#[test]
fn bad_arguments_are_errors() {
    let m = tiny();
    let mut a = Session::new(m);
    // Nothing to decode from.
    assert!(a.decode(m, &mut NoFilter, &greedy(), 3, &[]).is_err());
    a.prefill(m, &ids(1, 4, 320)).unwrap();
    let mut b = a.fork();
    let two = [greedy(), greedy()];
    assert!(decode_batch(
        m,
        &mut [&mut a, &mut b],
        &mut [],
        &two[..1],
        &[1, 2, 3],
        &[]
    )
    .is_err());
    assert!(decode_batch(
        m,
        &mut [&mut a, &mut b],
        &mut [&mut NoFilter as &mut dyn TokenFilter],
        &two,
        &[1],
        &[]
    )
    .is_err());
    assert!(decode_batch(m, &mut [], &mut [], &two, &[1], &[])
        .unwrap()
        .is_empty());
}

#[test]
fn truncate_rebuilds_a_history_window() {
    let m = tiny();
    let mut s = Session::new(m);
    s.prefill(m, &ids(1, 20, 320)).unwrap();
    s.decode(m, &mut NoFilter, &greedy(), 5, &[]).unwrap();
    s.prefill(m, &ids(2, 10, 320)).unwrap();
    // Keep the first 12 tokens (a "system prompt") and a new window.
    s.truncate(12).unwrap();
    assert_eq!((s.len(), s.cached_len(), s.cache().len()), (12, 12, 12));
    assert!(s.last_logits().is_none());
    let l = s.prefill(m, &ids(3, 9, 320)).unwrap();
    assert_logits_match(m, &l, s.tokens(), "after truncate");
}

/// The q8_0 inference path quantises each row's activations on its own, so a decode batch
/// (up to the 16 rows that path takes) still gives each row its tokens alone. (A batched
/// prefill of new turns runs dense and may round differently, which quantisation can turn
/// into a different near-tie: this test decodes from prefilled sessions only.)
#[test]
fn batched_decode_equals_alone_quantized_default_model() {
    let lm = smol();
    let mut m = lm.model.clone();
    m.quantize_for_inference(candle_core::quantized::GgmlDType::Q8_0)
        .unwrap();
    let sessions: Vec<Session> = smol_sessions()
        .into_iter()
        .map(|s| {
            let mut q = Session::new(&m);
            q.prefill(&m, s.tokens()).unwrap();
            q
        })
        .collect();
    alone_vs_batched(&m, &sessions, &[24], &lm.assets.eos_token_ids);
}

/// `--quantize bf16` runs every row count, the batched prefill of a pending turn included,
/// through the bf16 kernel, whose outputs do not depend on the rows beside them: a batch
/// gives each session its tokens alone, new turn and all.
#[test]
fn batched_decode_equals_alone_bf16_default_model() {
    let lm = smol();
    let mut m = lm.model.clone();
    m.quantize_for_inference(candle_core::quantized::GgmlDType::BF16)
        .unwrap();
    let (_, out) = alone_vs_batched(&m, &smol_sessions(), &[32], &lm.assets.eos_token_ids);
    let first = lm.assets.decode(&out[0].tokens, false).unwrap();
    assert!(first.contains("Paris"), "{first}");
}

/// The cache writes new keys in place while it alone owns its buffers: forks, and a truncated
/// session's fork, must never see each other's writes.
#[test]
fn forks_written_alternately_stay_independent() {
    let m = tiny();
    let mut base = Session::new(m);
    base.prefill(m, &ids(60, 20, 320)).unwrap();
    let mut a = base.fork();
    let mut b = base.fork();
    a.prefill(m, &ids(61, 5, 320)).unwrap();
    b.prefill(m, &ids(62, 7, 320)).unwrap();
    let la = a.prefill(m, &ids(63, 3, 320)).unwrap();
    assert_logits_match(m, &la, a.tokens(), "a");
    let lb = b.prefill(m, &ids(64, 2, 320)).unwrap();
    assert_logits_match(m, &lb, b.tokens(), "b");
    let l = base.prefill(m, &ids(65, 4, 320)).unwrap();
    assert_logits_match(m, &l, base.tokens(), "base");
    // Truncating a and writing over the freed slots leaves a's fork c alone.
    let mut c = a.fork();
    a.truncate(22).unwrap();
    let la = a.prefill(m, &ids(66, 9, 320)).unwrap();
    assert_logits_match(m, &la, a.tokens(), "a truncated");
    let lc = c.prefill(m, &ids(67, 1, 320)).unwrap();
    assert_logits_match(m, &lc, c.tokens(), "c");
    // Sessions split from one batch, each continuing on its own.
    let mut x = base.fork();
    let mut y = base.fork();
    x.push(&ids(68, 3, 320));
    decode_batch(m, &mut [&mut x, &mut y], &mut [], &[greedy()], &[4], &[]).unwrap();
    let lx = x.prefill(m, &ids(69, 2, 320)).unwrap();
    let ly = y.prefill(m, &ids(70, 5, 320)).unwrap();
    assert_logits_match(m, &lx, x.tokens(), "x");
    assert_logits_match(m, &ly, y.tokens(), "y");
}

/// The ragged forward (the CPU's batched decode step) gives every sequence the logits, and
/// leaves it the cache, that its own forward gives it: sequences with and without history,
/// one new token or several, side by side.
#[test]
fn a_ragged_forward_equals_each_sequence_alone_tiny() {
    use teamtune_llama::{KvCache, RaggedRow};
    let m = tiny();
    let vocab = m.config().vocab_size as u32;
    // (history, new tokens) per sequence.
    let shapes = [(5, 3), (0, 7), (12, 1), (3, 20)];
    let mut histories = Vec::new();
    let mut caches = Vec::new();
    for (k, &(hist, _)) in shapes.iter().enumerate() {
        let h = ids(100 + k as u64, hist, vocab);
        let mut cache = m.new_cache(1);
        if hist > 0 {
            let input = Tensor::new(h.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            m.forward_last(
                &input,
                &TokenLayout::contiguous(1, hist, 0),
                Some(&mut cache),
            )
            .unwrap();
        }
        histories.push(h);
        caches.push(cache);
    }
    let news: Vec<Vec<u32>> = shapes
        .iter()
        .enumerate()
        .map(|(k, &(_, n))| ids(200 + k as u64, n, vocab))
        .collect();
    // Two steps: the new tokens, then one more token each on top of the extended caches.
    let nexts: Vec<Vec<u32>> = (0..shapes.len())
        .map(|k| ids(300 + k as u64, 1, vocab))
        .collect();
    let mut alone: Vec<KvCache> = caches.clone();
    let mut ragged: Vec<KvCache> = caches;
    for (step, inputs) in [&news, &nexts].into_iter().enumerate() {
        let mut rows: Vec<RaggedRow> = ragged
            .iter_mut()
            .zip(inputs.iter())
            .map(|(cache, tokens)| RaggedRow { tokens, cache })
            .collect();
        let got = m.forward_ragged_last(&mut rows).unwrap();
        assert_eq!(got.dims(), &[shapes.len(), vocab as usize]);
        for (k, (cache, tokens)) in alone.iter_mut().zip(inputs.iter()).enumerate() {
            let start = cache.next_positions()[0];
            let input = Tensor::new(tokens.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let want: Vec<f32> = m
                .forward_last(
                    &input,
                    &TokenLayout::contiguous(1, tokens.len(), start),
                    Some(cache),
                )
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            let row: Vec<f32> = got.get(k).unwrap().to_vec1().unwrap();
            let err = common::max_rel_err(&row, &want, 1.0);
            assert!(err <= 1e-5, "step {step}, sequence {k}: max rel err {err}");
            assert_eq!(
                ragged[k].len(),
                cache.len(),
                "step {step}, sequence {k}: cache length"
            );
            assert_eq!(ragged[k].next_positions(), cache.next_positions());
        }
        // And both equal a forward from scratch over everything so far.
        if step == 1 {
            for k in 0..shapes.len() {
                let all: Vec<u32> = [&histories[k][..], &news[k], &nexts[k]].concat();
                assert_logits_match(m, &got.get(k).unwrap(), &all, "ragged after two steps");
            }
        }
    }
    // Bad rows are errors, not panics.
    let mut empty = m.new_cache(1);
    let mut wide = m.new_cache(2);
    assert!(m
        .forward_ragged_last(&mut [RaggedRow {
            tokens: &[],
            cache: &mut empty
        }])
        .is_err());
    assert!(m
        .forward_ragged_last(&mut [RaggedRow {
            tokens: &[5],
            cache: &mut wide
        }])
        .is_err());
    assert!(m.forward_ragged_last(&mut []).is_err());
}
