//! `export_merged`: a PEFT-made adapter merged into the tiny fixture and written as an HF
//! folder (sharded like transformers, same tensor names and shapes as transformers' own file,
//! PEFT's logits when loaded back, config and tokenizer round-trips), and its refusals.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use teamtune_llama::{export_merged, parse_size, ExportOptions, ExportReport};
use teamtune_llama::{
    load_model, ChatAssets, LlamaConfig, LoadedModel, LoraAdapter, LoraConfig, Mode, ModelFiles,
};

fn tiny_hf() -> ModelFiles {
    ModelFiles::resolve(common::fixtures().join("tiny-llama31").to_str().unwrap()).unwrap()
}

fn tiny_gguf() -> ModelFiles {
    ModelFiles::Gguf {
        path: common::fixtures().join("tiny-llama31.gguf"),
    }
}

fn peft_dir() -> PathBuf {
    common::fixtures().join("tiny-lora")
}

fn export(
    files: &ModelFiles,
    adapter: Option<&Path>,
    out: &Path,
    options: &ExportOptions,
) -> teamtune_llama::Result<ExportReport> {
    export_merged(files, adapter, out, options, &mut |_, _| {})
}

/// input_ids_0 and PEFT's logits for it with the tiny-lora adapter.
fn peft_reference() -> (Vec<u32>, Vec<f32>) {
    let t = candle_core::safetensors::load(peft_dir().join("reference.safetensors"), &Device::Cpu)
        .unwrap();
    let ids = t["input_ids_0"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    (ids, flat(&t["logits_0"]))
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Logits of the model in `dir` (our own loader) for `ids`.
fn folder_logits(dir: &Path, ids: &[u32]) -> Vec<f32> {
    let files = ModelFiles::resolve(dir.to_str().unwrap()).unwrap();
    let m = load_model(&files, DType::F32, &Device::Cpu).unwrap();
    flat(&common::logits(&m, ids, Mode::Inference))
}

/// name -> (dtype, shape).
type TensorInfos = BTreeMap<String, (String, Vec<usize>)>;

/// Every tensor of one safetensors file, and its metadata.
fn header(path: &Path) -> (TensorInfos, Option<Value>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let v: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut out = BTreeMap::new();
    let mut meta = None;
    for (k, t) in v.as_object().unwrap() {
        if k == "__metadata__" {
            meta = Some(t.clone());
            continue;
        }
        let shape = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        out.insert(k.clone(), (t["dtype"].as_str().unwrap().to_owned(), shape));
    }
    // The file is exactly header + data, and safetensors itself accepts it.
    safetensors::SafeTensors::deserialize(&bytes).unwrap();
    (out, meta)
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn a_peft_adapter_merges_into_a_sharded_hf_folder_with_peft_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let options = ExportOptions {
        dtype: Some(DType::F32),
        max_shard_size: parse_size("200KB").unwrap(),
        force: false,
    };
    let mut calls = 0;
    let mut last = (0, 0);
    let report = export_merged(
        &tiny_hf(),
        Some(&peft_dir()),
        &out,
        &options,
        &mut |done, total| {
            calls += 1;
            last = (done, total);
        },
    )
    .unwrap();
    assert!(
        report.shards.len() >= 3,
        "{} shards: {:?}",
        report.shards.len(),
        report.shards
    );
    assert_eq!(last, (report.total_size, report.total_size));
    assert!(calls > report.tensors);
    assert!(!report.tokenizer, "the tiny HF fixture has no tokenizer");

    // The index covers every tensor exactly once, with the right shard and total size.
    let index = json(&out.join("model.safetensors.index.json"));
    let weight_map = index["weight_map"].as_object().unwrap();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut bytes = 0u64;
    let mut params = 0u64;
    let mut shapes = BTreeMap::new();
    for (i, shard) in report.shards.iter().enumerate() {
        assert_eq!(
            shard,
            &format!(
                "model-{:05}-of-{:05}.safetensors",
                i + 1,
                report.shards.len()
            )
        );
        let path = out.join(shard);
        let (tensors, meta) = header(&path);
        assert_eq!(meta, Some(serde_json::json!({"format": "pt"})));
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size < 200_000 + 10_000, "{shard}: {size} bytes");
        for (name, (dtype, shape)) in tensors {
            assert_eq!(dtype, "F32");
            assert_eq!(weight_map[&name].as_str(), Some(shard.as_str()), "{name}");
            *seen.entry(name.clone()).or_default() += 1;
            let n: usize = shape.iter().product();
            bytes += 4 * n as u64;
            params += n as u64;
            shapes.insert(name, shape);
        }
    }
    assert!(seen.values().all(|&c| c == 1), "{seen:?}");
    assert_eq!(
        seen.keys().collect::<BTreeSet<_>>(),
        weight_map.keys().collect::<BTreeSet<_>>()
    );
    assert_eq!(index["metadata"]["total_size"].as_u64(), Some(bytes));
    assert_eq!(index["metadata"]["total_parameters"].as_u64(), Some(params));
    assert_eq!(report.total_size, bytes);
    // transformers 5.24's own save_pretrained(max_shard_size="200KB") of this model groups
    // the tensors so (names in dot-natural order, scripts/check_merge.py compares it whole).
    let first = "model-00001-of-00003.safetensors";
    for name in [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
    ] {
        assert_eq!(weight_map[name], first, "{name}");
    }
    assert_eq!(
        weight_map.values().filter(|v| *v == first).count(),
        3,
        "{weight_map:?}"
    );
    assert_eq!(
        weight_map["model.layers.1.input_layernorm.weight"],
        "model-00002-of-00003.safetensors"
    );
    assert_eq!(
        weight_map["model.norm.weight"],
        "model-00003-of-00003.safetensors"
    );
    assert!(!out.join("model.safetensors").exists());

    // Names and shapes are those of transformers' own file for this model (untied: lm_head).
    let (theirs, _) = header(&common::fixtures().join("tiny-llama31/model.safetensors"));
    let theirs: BTreeMap<String, Vec<usize>> =
        theirs.into_iter().map(|(n, (_, s))| (n, s)).collect();
    assert_eq!(shapes, theirs);

    // Loaded back by our own loader: PEFT's logits for base + adapter.
    let (ids, want) = peft_reference();
    let got = folder_logits(&out, &ids);
    let err = common::max_rel_err(&got, &want, 1.0);
    eprintln!("merged folder vs PEFT: max rel err {err:e}");
    assert!(err <= 1e-4, "max relative error {err:e}");

    // config.json round-trips to the same LlamaConfig, and says what transformers needs.
    let original =
        LlamaConfig::from_file(&common::fixtures().join("tiny-llama31/config.json")).unwrap();
    assert_eq!(
        LlamaConfig::from_file(&out.join("config.json")).unwrap(),
        original
    );
    let cfg = json(&out.join("config.json"));
    assert_eq!(
        cfg["architectures"],
        serde_json::json!(["LlamaForCausalLM"])
    );
    assert_eq!(cfg["model_type"], "llama");
    assert_eq!(cfg["torch_dtype"], "float32");
    assert_eq!(cfg["rope_scaling"]["rope_type"], "llama3");
    let gen = json(&out.join("generation_config.json"));
    assert_eq!(gen["bos_token_id"], 1);
    assert_eq!(gen["eos_token_id"], serde_json::json!([2, 3]));
    // Nothing temporary is left beside the folder.
    let names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("merged")]);
}

#[test]
fn a_gguf_source_exports_one_file_with_tokenizer_and_config() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let report = export(
        &tiny_gguf(),
        Some(&peft_dir()),
        &out,
        &ExportOptions::default(),
    )
    .unwrap();
    assert_eq!(report.shards, vec!["model.safetensors"]);
    assert_eq!(report.dtype, DType::F32);
    assert!(!out.join("model.safetensors.index.json").exists());
    let (tensors, _) = header(&out.join("model.safetensors"));
    let (theirs, _) = header(&common::fixtures().join("tiny-llama31/model.safetensors"));
    assert_eq!(tensors, theirs);

    // The GGUF holds the fixture's weights: PEFT's logits again.
    let (ids, want) = peft_reference();
    let err = common::max_rel_err(&folder_logits(&out, &ids), &want, 1.0);
    assert!(err <= 1e-4, "max relative error {err:e}");

    // rope_freqs.weight became the llama3 rope_scaling of the original config.
    let hf = LlamaConfig::from_file(&common::fixtures().join("tiny-llama31/config.json")).unwrap();
    let ours = LlamaConfig::from_file(&out.join("config.json")).unwrap();
    assert_eq!(ours.rope_scaling, hf.rope_scaling);
    assert_eq!(ours.rms_norm_eps, hf.rms_norm_eps);
    assert_eq!(
        (ours.vocab_size, ours.hidden_size, ours.num_key_value_heads),
        (hf.vocab_size, hf.hidden_size, hf.num_key_value_heads)
    );

    // The folder's tokenizer encodes like the GGUF's, and the chat assets carry over.
    let original = ChatAssets::load(&tiny_gguf(), &[]).unwrap();
    let loaded = LoadedModel::load(out.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap();
    let cases = common::json("tiny-llama31/tokenizer_cases.json");
    for case in cases["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        for special in [false, true] {
            assert_eq!(
                loaded.assets.encode(text, special).unwrap(),
                original.encode(text, special).unwrap(),
                "{text:?} special={special}"
            );
        }
    }
    assert_eq!(loaded.assets.chat_template, original.chat_template);
    assert_eq!(loaded.assets.bos_token, original.bos_token);
    assert_eq!(loaded.assets.eos_token, original.eos_token);
    assert_eq!(loaded.assets.eos_token_ids, original.eos_token_ids);
    let tc = json(&out.join("tokenizer_config.json"));
    assert_eq!(tc["bos_token"], "<|begin_of_text|>");
    assert_eq!(tc["model_max_length"], ours.max_position_embeddings);
}

#[test]
fn bf16_is_the_f32_merge_cast_once() {
    let tmp = tempfile::tempdir().unwrap();
    let f32_dir = tmp.path().join("f32");
    let bf16_dir = tmp.path().join("bf16");
    let opts = |dtype| ExportOptions {
        dtype: Some(dtype),
        ..ExportOptions::default()
    };
    export(&tiny_hf(), Some(&peft_dir()), &f32_dir, &opts(DType::F32)).unwrap();
    export(&tiny_hf(), Some(&peft_dir()), &bf16_dir, &opts(DType::BF16)).unwrap();
    let a =
        candle_core::safetensors::load(f32_dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let b =
        candle_core::safetensors::load(bf16_dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert_eq!(b[name].dtype(), DType::BF16, "{name}");
        let want = flat(&t.to_dtype(DType::BF16).unwrap());
        assert_eq!(flat(&b[name]), want, "{name}");
    }
    assert_eq!(
        json(&bf16_dir.join("config.json"))["torch_dtype"],
        "bfloat16"
    );
}

#[test]
fn a_non_empty_output_folder_is_refused_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let err = export(
        &tiny_hf(),
        Some(&peft_dir()),
        &out,
        &ExportOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("not empty") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );

    // An empty folder is fine; --force replaces a full one.
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    export(&tiny_hf(), None, &empty, &ExportOptions::default()).unwrap();
    let forced = ExportOptions {
        force: true,
        ..ExportOptions::default()
    };
    export(&tiny_hf(), Some(&peft_dir()), &out, &forced).unwrap();
    assert!(!out.join("keep.txt").exists());
    assert!(out.join("model.safetensors").exists());
    let mut names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["empty", "merged"]);
}

#[test]
fn an_adapter_that_does_not_fit_is_a_clear_error_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    // An adapter made for a wider model: every factor has the wrong shape.
    let mut wide =
        LlamaConfig::from_file(&common::fixtures().join("tiny-llama31/config.json")).unwrap();
    wide.hidden_size = 96;
    let adapter = LoraAdapter::new(
        &wide,
        &LoraConfig {
            rank: 4,
            ..LoraConfig::default()
        },
        &Device::Cpu,
    )
    .unwrap();
    let adapter_dir = tmp.path().join("adapter");
    adapter.save(&adapter_dir).unwrap();
    let out = tmp.path().join("merged");
    let err = export(
        &tiny_hf(),
        Some(&adapter_dir),
        &out,
        &ExportOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("shape") && err.contains("another base model"),
        "{err}"
    );
    let mut names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["adapter"], "nothing but the adapter");
}

/// For `scripts/check_merge.py`: with `MERGE_CHECK_DIR` set, writes a fresh adapter with
/// random B for `MERGE_CHECK_MODEL` (default: the default model) to `$DIR/adapter` and our
/// own f32 logits of base + adapter (unmerged) for fixed ids to `$DIR/ours.safetensors`.
#[test]
#[ignore = "driven by scripts/check_merge.py"]
fn dump_adapter_and_logits_for_the_python_check() {
    let Some(dir) = std::env::var_os("MERGE_CHECK_DIR").map(PathBuf::from) else {
        eprintln!("MERGE_CHECK_DIR is not set; nothing to do");
        return;
    };
    let model = std::env::var("MERGE_CHECK_MODEL").unwrap_or_default();
    let mut loaded = LoadedModel::load(&model, DType::F32, &Device::Cpu).unwrap();
    let m = &mut loaded.model;
    m.add_adapter(
        "random",
        &LoraConfig {
            rank: 8,
            alpha: 16.0,
            seed: 7,
            base_model_name_or_path: Some(if model.is_empty() {
                "default".into()
            } else {
                model.clone()
            }),
            ..LoraConfig::default()
        },
    )
    .unwrap();
    for (k, (name, var)) in m
        .adapter("random")
        .unwrap()
        .named_vars()
        .into_iter()
        .enumerate()
    {
        if name.contains("lora_B") {
            let (out, r) = var.as_tensor().dims2().unwrap();
            let data: Vec<f32> = (0..out * r)
                .map(|i| {
                    let x = (i as u32)
                        .wrapping_mul(2_654_435_761)
                        .wrapping_add(k as u32 * 7919);
                    ((x % 2001) as f32 / 1000.0 - 1.0) * 0.05
                })
                .collect();
            var.set(&Tensor::from_vec(data, (out, r), &Device::Cpu).unwrap())
                .unwrap();
        }
    }
    m.save_adapter("random", &dir.join("adapter")).unwrap();
    let vocab = m.config().vocab_size as u32;
    let ids: Vec<u32> = (0..48u32).map(|i| (i * 7919 + 13) % vocab).collect();
    m.set_active_adapter(Some("random")).unwrap();
    let with = common::logits(m, &ids, Mode::Inference);
    m.set_active_adapter(None).unwrap();
    let base = common::logits(m, &ids, Mode::Inference);
    let ids_t = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::I64)
        .unwrap();
    let tensors = std::collections::HashMap::from([
        ("input_ids".to_string(), ids_t),
        ("logits".to_string(), with),
        ("base_logits".to_string(), base),
    ]);
    candle_core::safetensors::save(&tensors, dir.join("ours.safetensors")).unwrap();
    eprintln!("wrote {}", dir.display());
}
