//! Sessions: the KV cache kept across turns gives the logits of recomputing the whole
//! conversation, forks are independent (also when written alternately or truncated), and the
//! ragged forward gives each sequence its own logits. Batched decoding is in `batched_decode.rs`.

mod common;

use candle_core::{Device, Tensor};
use common::session::*;
use teamtune_llama::{decode_batch, generate, NoFilter, Session, StopReason, TokenLayout};

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
