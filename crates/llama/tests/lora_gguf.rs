//! LoRA adapters in llama.cpp's GGUF form, both ways (no llama.cpp needed; scripts/check_gguf.sh
//! runs llama.cpp itself): the file has llama.cpp's metadata, names and shapes, q and k `B` rows
//! permuted as `convert_hf_to_gguf.py` permutes q_proj/k_proj; read back it equals the PEFT
//! tensors and gives the same logits; rsLoRA keeps its scale; files that do not fit are clear
//! errors naming the tensor.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use teamtune_llama::{GgufType, LoraAdapter, LoraTarget, Mode, TokenLayout};

fn peft_dir() -> PathBuf {
    common::fixtures().join("tiny-lora")
}

fn model() -> teamtune_llama::Llama {
    teamtune_testkit::tiny_model(DType::F32)
}

/// llama.cpp's permutation, from its Python definition:
/// `w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)`.
fn permute(w: &Tensor, n_heads: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((n_heads, 2, rows / n_heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

fn read(path: &Path) -> (gguf_file::Content, std::fs::File) {
    let mut f = std::fs::File::open(path).unwrap();
    (gguf_file::Content::read(&mut f).unwrap(), f)
}

fn tensor(path: &Path, name: &str) -> Tensor {
    let (c, mut f) = read(path);
    c.tensor(&mut f, name, &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
}

const GGUF_NAMES: [(LoraTarget, &str); 7] = [
    (LoraTarget::Q, "attn_q"),
    (LoraTarget::K, "attn_k"),
    (LoraTarget::V, "attn_v"),
    (LoraTarget::O, "attn_output"),
    (LoraTarget::Gate, "ffn_gate"),
    (LoraTarget::Up, "ffn_up"),
    (LoraTarget::Down, "ffn_down"),
];

#[test]
fn written_as_llama_cpp_names_permutes_and_reads_it() {
    let m = model();
    let config = m.config().clone();
    let peft = LoraAdapter::load(&config, &peft_dir(), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("adapter.gguf");
    peft.save_gguf(&config, &path, GgufType::F32).unwrap();

    let (content, _) = read(&path);
    let meta = |k: &str| content.metadata[k].to_string().unwrap().clone();
    assert_eq!(meta("general.type"), "adapter");
    assert_eq!(meta("general.architecture"), "llama");
    assert_eq!(meta("adapter.type"), "lora");
    // llama.cpp scales by alpha / r: PEFT's 8 / 4.
    assert_eq!(
        content.metadata["adapter.lora.alpha"].to_f32().unwrap(),
        8.0
    );
    assert_eq!(content.tensor_infos.len(), 2 * 7 * config.num_hidden_layers);
    for layer in 0..config.num_hidden_layers {
        for (target, gguf) in GGUF_NAMES {
            let pair = peft.pair(layer, target).unwrap();
            let name = format!("blk.{layer}.{gguf}.weight");
            let a = tensor(&path, &format!("{name}.lora_a"));
            let b = tensor(&path, &format!("{name}.lora_b"));
            // GGUF dims innermost first: [in, r] and [r, out] there, [r, in] and [out, r] here.
            assert_eq!(a.dims(), pair.a.as_tensor().dims(), "{name}");
            assert_eq!(
                teamtune_testkit::flat(&a),
                teamtune_testkit::flat(pair.a.as_tensor()),
                "{name}.lora_a"
            );
            let want_b = match target {
                LoraTarget::Q => permute(pair.b.as_tensor(), config.num_attention_heads),
                LoraTarget::K => permute(pair.b.as_tensor(), config.num_key_value_heads),
                _ => pair.b.as_tensor().clone(),
            };
            assert_eq!(
                teamtune_testkit::flat(&b),
                teamtune_testkit::flat(&want_b),
                "{name}.lora_b"
            );
        }
    }
    // The permutation is real here (it moves rows), so skipping it would show.
    let q_b = peft.pair(0, LoraTarget::Q).unwrap().b.as_tensor();
    assert_ne!(
        teamtune_testkit::flat(&permute(q_b, config.num_attention_heads)),
        teamtune_testkit::flat(q_b)
    );

    // Read back: every factor as PEFT's, and the same logits as the PEFT folder.
    let back = LoraAdapter::load_gguf(&config, &path, &Device::Cpu).unwrap();
    assert_eq!(back.config().rank, 4);
    assert_eq!(back.config().scale(), peft.config().scale());
    for (n, v) in peft.named_vars() {
        let got = back
            .named_vars()
            .into_iter()
            .find(|(m, _)| *m == n)
            .unwrap_or_else(|| panic!("{n} missing"))
            .1;
        assert_eq!(
            teamtune_testkit::flat(got.as_tensor()),
            teamtune_testkit::flat(v.as_tensor()),
            "{n}"
        );
    }
    let logits = |adapter: &Path| {
        let mut m = model();
        m.load_adapter("a", adapter).unwrap();
        m.set_active_adapter(Some("a")).unwrap();
        let ids: Vec<u32> = (0..40).map(|i| (i * 7 % 300) as u32).collect();
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        teamtune_testkit::flat(
            &m.forward(
                &input,
                &TokenLayout::contiguous(1, 40, 0),
                None,
                Mode::Inference,
            )
            .unwrap(),
        )
    };
    assert_eq!(logits(&path), logits(&peft_dir()));
}

#[test]
fn rslora_keeps_its_scale_and_smaller_types_stay_close() {
    let m = model();
    let config = m.config().clone();
    let dir = tempfile::tempdir().unwrap();
    let rs = dir.path().join("rs");
    std::fs::create_dir(&rs).unwrap();
    std::fs::copy(
        peft_dir().join("adapter_model.safetensors"),
        rs.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(peft_dir().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    cfg["use_rslora"] = serde_json::json!(true);
    std::fs::write(rs.join("adapter_config.json"), cfg.to_string()).unwrap();
    let peft = LoraAdapter::load(&config, &rs, &Device::Cpu).unwrap();
    assert_eq!(peft.config().scale(), 8.0 / 2.0); // alpha / sqrt(4)
    let path = dir.path().join("rs.gguf");
    peft.save_gguf(&config, &path, GgufType::F32).unwrap();
    let (content, _) = read(&path);
    // llama.cpp's alpha / r must give rsLoRA's alpha / sqrt(r): alpha' = 4 * 4.
    assert_eq!(
        content.metadata["adapter.lora.alpha"].to_f32().unwrap(),
        16.0
    );
    let back = LoraAdapter::load_gguf(&config, &path, &Device::Cpu).unwrap();
    assert_eq!(back.config().scale(), peft.config().scale());

    for (ty, tol) in [
        (GgufType::F16, 1e-3),
        (GgufType::Bf16, 1e-2),
        (GgufType::Q8_0, 2e-2),
    ] {
        let p = dir.path().join(format!("{ty:?}.gguf"));
        peft.save_gguf(&config, &p, ty).unwrap();
        let (content, _) = read(&p);
        let a_type = content.tensor_infos["blk.0.attn_q.weight.lora_a"].ggml_dtype;
        let b_type = content.tensor_infos["blk.0.attn_q.weight.lora_b"].ggml_dtype;
        match ty {
            // A's rows (64) split into blocks of 32, B's (4) do not: f16, as llama.cpp falls back.
            GgufType::Q8_0 => {
                assert_eq!((a_type, b_type), (GgmlDType::Q8_0, GgmlDType::F16))
            }
            GgufType::F16 => assert_eq!(a_type, GgmlDType::F16),
            _ => assert_eq!(a_type, GgmlDType::BF16),
        }
        let back = LoraAdapter::load_gguf(&config, &p, &Device::Cpu).unwrap();
        for (n, v) in peft.named_vars() {
            let got = back
                .named_vars()
                .into_iter()
                .find(|(m, _)| *m == n)
                .unwrap()
                .1;
            let (g, w) = (
                teamtune_testkit::flat(got.as_tensor()),
                teamtune_testkit::flat(v.as_tensor()),
            );
            let worst = g
                .iter()
                .zip(&w)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let scale = w.iter().map(|x| x.abs()).fold(0f32, f32::max);
            assert!(
                worst <= tol * scale.max(1e-6),
                "{ty:?} {n}: {worst} of {scale}"
            );
        }
    }
}

/// Rewrites `src` with its metadata and tensors changed by `edit`.
fn rewritten(
    src: &Path,
    dst: &Path,
    edit: impl Fn(&mut Vec<(String, Value)>, &mut Vec<(String, QTensor)>),
) {
    let (content, mut f) = read(src);
    let mut meta: Vec<(String, Value)> = content.metadata.clone().into_iter().collect();
    let mut tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|n| (n.clone(), content.tensor(&mut f, n, &Device::Cpu).unwrap()))
        .collect();
    edit(&mut meta, &mut tensors);
    let m: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut out = std::fs::File::create(dst).unwrap();
    gguf_file::write(&mut out, &m, &t).unwrap();
}

#[test]
fn files_that_do_not_fit_are_refused_naming_the_tensor() {
    let m = model();
    let config = m.config().clone();
    let peft = LoraAdapter::load(&config, &peft_dir(), &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.gguf");
    peft.save_gguf(&config, &good, GgufType::F32).unwrap();
    let set = |key: &'static str, v: &'static str| {
        move |meta: &mut Vec<(String, Value)>, _: &mut Vec<(String, QTensor)>| {
            for (k, val) in meta.iter_mut() {
                if k == key {
                    *val = Value::String(v.into());
                }
            }
        }
    };
    type Edit = Box<dyn Fn(&mut Vec<(String, Value)>, &mut Vec<(String, QTensor)>)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "another architecture",
            Box::new(set("general.architecture", "qwen2")),
            "architecture qwen2",
        ),
        (
            "a model, not an adapter",
            Box::new(set("general.type", "model")),
            "not \"adapter\"",
        ),
        (
            "a missing factor",
            Box::new(
                |_: &mut Vec<(String, Value)>, t: &mut Vec<(String, QTensor)>| {
                    t.retain(|(n, _)| n != "blk.1.ffn_up.weight.lora_b")
                },
            ),
            "`blk.1.ffn_up.weight.lora_b` is missing",
        ),
        (
            "a rank that does not match",
            Box::new(
                |_: &mut Vec<(String, Value)>, t: &mut Vec<(String, QTensor)>| {
                    for (n, q) in t.iter_mut() {
                        if n == "blk.0.attn_v.weight.lora_b" {
                            let small = Tensor::zeros((32, 2), DType::F32, &Device::Cpu).unwrap();
                            *q = QTensor::quantize(&small, GgmlDType::F32).unwrap();
                        }
                    }
                },
            ),
            "`blk.0.attn_v.weight.lora_b` has shape [32, 2]",
        ),
        (
            "a tensor of no projection",
            Box::new(
                |_: &mut Vec<(String, Value)>, t: &mut Vec<(String, QTensor)>| {
                    let extra = Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap();
                    t.push((
                        "blk.9.attn_q.weight.lora_a".into(),
                        QTensor::quantize(&extra, GgmlDType::F32).unwrap(),
                    ));
                },
            ),
            "`blk.9.attn_q.weight.lora_a` does not belong",
        ),
    ];
    for (what, edit, want) in cases {
        let bad = dir.path().join("bad.gguf");
        rewritten(&good, &bad, edit);
        let err = LoraAdapter::load_gguf(&config, &bad, &Device::Cpu)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{what}: {err}");
        assert!(err.contains("bad.gguf"), "{what}: the file is named: {err}");
    }
}

/// `teamtune merge --format gguf`: the tiny GGUF with the adapter merged, as one GGUF, gives the
/// logits of the base GGUF with the adapter applied (f32), keeps the base's tokenizer and chat
/// template, and in q8_0 holds the same matrices within Q8_0's rounding.
#[test]
fn a_merged_gguf_gives_the_adapted_logits() {
    use teamtune_llama::{export_merged_gguf, GgufType, LoadedModel, ModelFiles};
    let base = common::fixtures().join("tiny-llama31.gguf");
    let files = ModelFiles::Gguf { path: base.clone() };
    let dir = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = (0..50).map(|i| (i * 11 % 300) as u32).collect();
    let logits = |m: &teamtune_llama::Llama| {
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        teamtune_testkit::flat(
            &m.forward(
                &input,
                &TokenLayout::contiguous(1, ids.len(), 0),
                None,
                Mode::Inference,
            )
            .unwrap(),
        )
    };
    let mut adapted = LoadedModel::load(base.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    adapted.model.load_adapter("a", &peft_dir()).unwrap();
    adapted.model.set_active_adapter(Some("a")).unwrap();
    let want = logits(&adapted.model);
    let adapter = adapted.model.adapter("a").unwrap().clone();
    let f32_path = dir.path().join("merged-f32.gguf");
    let report = export_merged_gguf(
        &files,
        Some(&adapter),
        &f32_path,
        GgufType::F32,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(report.merged, 7 * 2);
    let merged = LoadedModel::load(f32_path.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    // |a - b| / max(|b|, 1): merging rounds W + BA once, the adapter adds Wx and B(Ax).
    let worst = teamtune_testkit::max_rel_err(&logits(&merged.model), &want, 1.0);
    assert!(worst <= 1e-5, "max relative difference {worst}");
    // The base's tokenizer and template came along.
    assert_eq!(
        merged.assets.tokenizer.get_vocab_size(true),
        adapted.assets.tokenizer.get_vocab_size(true)
    );
    assert_eq!(merged.assets.chat_template, adapted.assets.chat_template);
    // q8_0: every matrix within its blocks' rounding of the f32 merge (scale max|block| / 127).
    let q8_path = dir.path().join("merged-q8_0.gguf");
    export_merged_gguf(
        &files,
        Some(&adapter),
        &q8_path,
        GgufType::Q8_0,
        &mut |_, _| {},
    )
    .unwrap();
    let (content, _) = read(&q8_path);
    let mut quantised = 0;
    for (name, info) in &content.tensor_infos {
        let (q, f) = (tensor(&q8_path, name), tensor(&f32_path, name));
        let (q, f) = (teamtune_testkit::flat(&q), teamtune_testkit::flat(&f));
        let worst = q
            .iter()
            .zip(&f)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let scale = f.iter().map(|x| x.abs()).fold(0f32, f32::max);
        assert!(worst <= scale / 127.0, "{name}: {worst} of {scale}");
        quantised += usize::from(info.ggml_dtype == GgmlDType::Q8_0);
    }
    assert!(quantised >= 7 * 2, "{quantised} tensors in q8_0");
    // Without the adapter's q/k permutation the logits would differ: the base alone is far.
    let plain = LoadedModel::load(base.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let base_logits = logits(&plain.model);
    let moved = base_logits
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(moved > 1e-2, "the adapter changes the logits by {moved}");
}

/// From a Hugging Face folder, `merge --format gguf` writes what `convert_hf_to_gguf.py` wrote
/// for the tiny fixture (tiny-llama31.gguf): the same `llama.*` and tokenizer metadata, the same
/// tensors (q and k permuted, llama3 rope as `rope_freqs`); with the adapter, the logits of the
/// folder with the adapter applied.
#[test]
fn a_hugging_face_folder_becomes_the_gguf_llama_cpp_converts_it_to() {
    use teamtune_llama::{export_merged_gguf, GgufType, LoadedModel, ModelFiles};
    let dir = tempfile::tempdir().unwrap();
    let hf = teamtune_testkit::tiny_chat_model(dir.path());
    let files = ModelFiles::resolve(hf.to_str().unwrap()).unwrap();
    let out = dir.path().join("plain.gguf");
    export_merged_gguf(&files, None, &out, GgufType::F32, &mut |_, _| {}).unwrap();
    let reference = common::fixtures().join("tiny-llama31.gguf");
    let ((ours, _), (theirs, _)) = (read(&out), read(&reference));
    for (key, want) in &theirs.metadata {
        // The name is the folder's; the template is the one given to the tiny chat model.
        if ["general.name", "tokenizer.chat_template"].contains(&key.as_str()) {
            continue;
        }
        let got = ours
            .metadata
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing"));
        assert_eq!(format!("{got:?}"), format!("{want:?}"), "{key}");
    }
    let mut names: Vec<_> = theirs.tensor_infos.keys().collect();
    names.sort();
    let mut ours_names: Vec<_> = ours.tensor_infos.keys().collect();
    ours_names.sort();
    assert_eq!(ours_names, names);
    for name in names {
        let (a, b) = (tensor(&out, name), tensor(&reference, name));
        assert_eq!(a.dims(), b.dims(), "{name}");
        let worst = teamtune_testkit::max_rel_err(
            &teamtune_testkit::flat(&a),
            &teamtune_testkit::flat(&b),
            1.0,
        );
        assert!(worst <= 1e-6, "{name}: {worst}");
    }

    // With the adapter: the logits of the folder with the adapter applied.
    let with = dir.path().join("merged.gguf");
    let mut adapted = LoadedModel::load(hf.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    adapted.model.load_adapter("a", &peft_dir()).unwrap();
    adapted.model.set_active_adapter(Some("a")).unwrap();
    let adapter = adapted.model.adapter("a").unwrap().clone();
    export_merged_gguf(&files, Some(&adapter), &with, GgufType::F32, &mut |_, _| {}).unwrap();
    let merged = LoadedModel::load(with.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..40).map(|i| (i * 13 % 300) as u32).collect();
    let logits = |m: &teamtune_llama::Llama| {
        let input = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        teamtune_testkit::flat(
            &m.forward(
                &input,
                &TokenLayout::contiguous(1, ids.len(), 0),
                None,
                Mode::Inference,
            )
            .unwrap(),
        )
    };
    let worst = teamtune_testkit::max_rel_err(&logits(&merged.model), &logits(&adapted.model), 1.0);
    assert!(worst <= 1e-5, "max relative difference {worst}");
    assert_eq!(merged.assets.chat_template, adapted.assets.chat_template);
    let text = "hello world, and you?";
    assert_eq!(
        merged.assets.encode(text, true).unwrap(),
        adapted.assets.encode(text, true).unwrap()
    );
}
