//! Decoding many sessions as one batch gives each the tokens it gets alone (greedy), also on
//! the quantised and bf16 paths, with filters, stop ids and token limits per row.

mod common;

use common::session::*;
use teamtune_llama::{
    decode_batch, generate, Decoded, Llama, NoFilter, Result, SamplingParams, Session, StopReason,
    TokenFilter,
};

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
