//! Continuous batching: rows that join a running batch, leave it, and use different adapters in
//! the same forward each decode exactly the tokens they decode alone (greedy).

mod common;

use common::session::*;
use teamtune_llama::{ContinuousBatch, Decoded, Llama, NoFilter, Session, StopReason};

/// The tiny model with two different adapters loaded (PEFT's fixture and ours), none active.
fn with_adapters() -> Llama {
    let mut m = tiny().clone();
    m.load_adapter("peft", &common::fixtures().join("tiny-lora"))
        .unwrap();
    m.load_adapter("ours", &common::fixtures().join("tiny-lora-ours"))
        .unwrap();
    m
}

struct Request {
    prompt: Vec<u32>,
    adapter: Option<&'static str>,
    max_new: usize,
    /// Added before this step of the batch.
    joins_at: usize,
}

fn alone(m: &mut Llama, r: &Request, stop: &[u32]) -> (Decoded, Vec<u32>) {
    m.set_active_adapter(r.adapter).unwrap();
    let mut s = Session::new(m);
    s.push(&r.prompt);
    let d = s
        .decode(m, &mut NoFilter, &greedy(), r.max_new, stop)
        .unwrap();
    m.set_active_adapter(None).unwrap();
    (d, s.tokens().to_vec())
}

#[test]
fn rows_joining_leaving_and_mixing_adapters_decode_as_alone() {
    joining_leaving_and_mixing_decode_as_alone(with_adapters());
}

/// The same with keys and values stored as f16: each token's are rounded once as stored, the
/// same alone and batched, so batching still changes no reply.
#[test]
fn rows_decode_as_alone_with_an_f16_cache() {
    let mut m = with_adapters();
    m.set_kv_cache_storage(Some(candle_core::DType::F16))
        .unwrap();
    assert_eq!(m.new_cache(1).storage(), Some(candle_core::DType::F16));
    joining_leaving_and_mixing_decode_as_alone(m);
}

fn joining_leaving_and_mixing_decode_as_alone(mut m: Llama) {
    let stop = [7u32];
    let requests = [
        Request {
            prompt: ids(1, 9, 320),
            adapter: None,
            max_new: 12,
            joins_at: 0,
        },
        Request {
            prompt: ids(2, 30, 320),
            adapter: Some("peft"),
            max_new: 5,
            joins_at: 0,
        },
        Request {
            prompt: ids(3, 4, 320),
            adapter: Some("ours"),
            max_new: 20,
            joins_at: 2,
        },
        // A long prompt, prefilled over several steps while the others decode.
        Request {
            prompt: ids(4, 75, 320),
            adapter: Some("peft"),
            max_new: 9,
            joins_at: 3,
        },
        Request {
            prompt: ids(5, 13, 320),
            adapter: None,
            max_new: 16,
            joins_at: 8,
        },
        Request {
            prompt: ids(6, 21, 320),
            adapter: Some("ours"),
            max_new: 1,
            joins_at: 9,
        },
    ];
    let want: Vec<_> = requests.iter().map(|r| alone(&mut m, r, &stop)).collect();
    // The adapters change the replies, so mixing them up would show.
    let (base_reply, _) = alone(
        &mut m,
        &Request {
            adapter: None,
            ..clone(&requests[2])
        },
        &stop,
    );
    assert_ne!(
        base_reply.tokens, want[2].0.tokens,
        "the adapter changes nothing"
    );

    let mut batch = ContinuousBatch::new(stop.to_vec(), 16);
    let mut ids_of = Vec::new();
    let mut got: Vec<Option<(Decoded, Vec<u32>)>> = vec![None; requests.len()];
    let mut most_live = 0;
    let mut step = 0;
    while got.iter().any(Option::is_none) {
        for (i, r) in requests.iter().enumerate() {
            if r.joins_at == step {
                let mut s = Session::new(&m);
                s.push(&r.prompt);
                let id = batch
                    .add(
                        s,
                        NoFilter,
                        greedy(),
                        r.max_new,
                        r.adapter.map(str::to_string),
                    )
                    .unwrap();
                ids_of.push((id, i));
            }
        }
        most_live = most_live.max(batch.len());
        for f in batch.step(&m).unwrap() {
            let i = ids_of.iter().find(|(id, _)| *id == f.id).unwrap().1;
            assert_eq!(f.adapter.as_deref(), requests[i].adapter);
            got[i] = Some((f.outcome.unwrap(), f.session.tokens().to_vec()));
        }
        step += 1;
        assert!(step < 200, "the batch never emptied");
    }
    assert!(batch.is_empty());
    assert!(
        most_live >= 4,
        "rows never overlapped: at most {most_live} live"
    );
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        let g = g.as_ref().unwrap();
        assert_eq!(w.0, g.0, "request {i}: the reply");
        assert_eq!(w.1, g.1, "request {i}: the session's tokens");
    }
    assert_eq!(got[5].as_ref().unwrap().0.stop, StopReason::MaxTokens);
}

fn clone(r: &Request) -> Request {
    Request {
        prompt: r.prompt.clone(),
        adapter: r.adapter,
        max_new: r.max_new,
        joins_at: r.joins_at,
    }
}

#[test]
fn a_mixed_forward_gives_each_sequence_its_adapters_logits() {
    let mut m = with_adapters();
    let prompts = [
        ids(11, 17, 320),
        ids(12, 5, 320),
        ids(13, 40, 320),
        ids(14, 1, 320),
    ];
    let adapters = [Some("ours"), None, Some("peft"), Some("ours")];
    let mut want = Vec::new();
    for (p, a) in prompts.iter().zip(adapters) {
        m.set_active_adapter(a).unwrap();
        want.push(
            Session::new(&m)
                .prefill(&m, p)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    m.set_active_adapter(None).unwrap();
    let mut caches: Vec<_> = prompts.iter().map(|_| m.new_cache(1)).collect();
    let mut rows: Vec<_> = prompts
        .iter()
        .zip(caches.iter_mut())
        .map(|(p, cache)| teamtune_llama::RaggedRow { tokens: p, cache })
        .collect();
    let got = m
        .forward_ragged_mixed(&mut rows, &adapters)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    // The same up to float summation order (gemm blocks a 63-row product differently from a
    // 5-row one); a wrong adapter moves logits by far more.
    let max_diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert!(max_diff(w, g) < 1e-4, "sequence {i}: {}", max_diff(w, g));
    }
    let base_of_0 = Session::new(&m)
        .prefill(&m, &prompts[0])
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(
        max_diff(&base_of_0, &got[0]) > 1e-2,
        "the adapter changes nothing"
    );
    let err = m
        .forward_ragged_mixed(&mut rows[..1], &[Some("nobody")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no adapter named `nobody`"), "{err}");
}
