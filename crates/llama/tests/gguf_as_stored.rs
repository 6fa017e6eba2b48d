//! `--quantize gguf`: a GGUF file's own blocks as the decode steps' weights, on the tiny model
//! rewritten with a different type per projection.

mod common;

use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use teamtune_llama::{load_model, LoadedModel, ModelFiles, Quantization, TokenLayout};

/// The tiny model's GGUF with its projections in Q4_0, Q4_1, Q5_0 and Q8_0 by kind, the embedding in
/// Q8_0, and the LM head left F16 (no kernel: it must stay dense and still decode).
fn mixed_types(dir: &Path) -> PathBuf {
    let src = common::fixtures().join("tiny-llama31.gguf");
    let mut f = std::fs::File::open(&src).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let kind = |name: &str| -> Option<GgmlDType> {
        let types = [
            ("attn_q.", GgmlDType::Q4_0),
            ("attn_k.", GgmlDType::Q4_1),
            ("attn_v.", GgmlDType::Q8_0),
            ("attn_output.", GgmlDType::Q4_1),
            ("ffn_gate.", GgmlDType::Q4_0),
            ("ffn_up.", GgmlDType::Q5_0),
            ("ffn_down.", GgmlDType::Q4_1),
            ("token_embd.", GgmlDType::Q8_0),
            ("output.", GgmlDType::F16),
        ];
        types
            .iter()
            .find(|(p, _)| name.contains(p))
            .map(|&(_, t)| t)
    };
    let tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|name| {
            let t = content.tensor(&mut f, name, &Device::Cpu).unwrap();
            let t = match kind(name) {
                Some(dtype) => {
                    QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), dtype).unwrap()
                }
                None => t,
            };
            (name.clone(), t)
        })
        .collect();
    let meta: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let path = dir.join("tiny-mixed.gguf");
    gguf_file::write(&mut std::fs::File::create(&path).unwrap(), &meta, &refs).unwrap();
    path
}

fn load(path: &Path) -> LoadedModel {
    LoadedModel::load(path.to_str().unwrap(), DType::F32, &Device::Cpu).unwrap()
}

/// The logits of one decode step (one row: the stored blocks are used) after a prefill of
/// `prompt` (many rows: the dense weights are).
fn decode_step(m: &LoadedModel, prompt: &[u32], next: u32) -> Vec<f32> {
    let mut cache = m.model.new_cache(1);
    let input = Tensor::new(prompt, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.model
        .forward_last(
            &input,
            &TokenLayout::contiguous(1, prompt.len(), 0),
            Some(&mut cache),
        )
        .unwrap();
    let input = Tensor::new(&[next], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.model
        .forward_last(
            &input,
            &TokenLayout::contiguous(1, 1, prompt.len() as u32),
            Some(&mut cache),
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The stored blocks are the numbers the dense load dequantises them to: the prompt's tiles give
/// the dense products, and a decode step moves only by the activations' 16-bit rounding: close,
/// but not the same bits (the blocks are in use). Wrongly ordered Q/K rows or a misread block
/// would move logits by their size.
#[test]
fn a_gguf_decodes_with_its_own_blocks_within_the_activations_rounding() {
    let dir = tempfile::tempdir().unwrap();
    let path = mixed_types(dir.path());
    let dense = load(&path);
    let mut stored = load(&path);
    stored.quantize(Quantization::GgufAsStored).unwrap();
    assert_eq!(stored.model.quantized(), Some(Quantization::GgufAsStored));
    let prompt: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 200).collect();
    for next in [5u32, 77, 150] {
        let want = decode_step(&dense, &prompt, next);
        let got = decode_step(&stored, &prompt, next);
        let mean_rel: f64 = got
            .iter()
            .zip(&want)
            .map(|(g, w)| ((g - w).abs() / (w.abs() + 1e-3)) as f64)
            .sum::<f64>()
            / want.len() as f64;
        assert!(
            mean_rel > 0.0 && mean_rel < 1e-3,
            "token {next}: mean relative error {mean_rel:e}"
        );
    }
}

/// A LoRA adapter on a model held as blocks adds its term on top of the stored projections:
/// the adapted logits within the same rounding of the dense model's with the same adapter,
/// and away from the unadapted ones.
#[test]
fn an_adapter_applies_on_top_of_the_stored_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let path = mixed_types(dir.path());
    let adapter = common::fixtures().join("tiny-lora");
    let (mut dense, mut stored) = (load(&path), load(&path));
    stored.quantize(Quantization::GgufAsStored).unwrap();
    let prompt: Vec<u32> = (0..30).map(|i| (i * 11 + 5) % 200).collect();
    let plain = decode_step(&stored, &prompt, 9);
    for m in [&mut dense, &mut stored] {
        m.model.load_adapter("a", &adapter).unwrap();
        m.model.set_active_adapter(Some("a")).unwrap();
    }
    let (want, got) = (
        decode_step(&dense, &prompt, 9),
        decode_step(&stored, &prompt, 9),
    );
    let mean_rel = |a: &[f32], b: &[f32]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| ((x - y).abs() / (y.abs() + 1e-3)) as f64)
            .sum::<f64>()
            / b.len() as f64
    };
    assert!(mean_rel(&got, &want) < 1e-3, "{:e}", mean_rel(&got, &want));
    assert!(
        mean_rel(&got, &plain) > 1e-2,
        "{:e}: the adapter did nothing",
        mean_rel(&got, &plain)
    );
}

/// Without a dense copy, what needs one (a merge here; training and exports alike) is refused
/// in plain words, and the model is left as it was.
#[test]
fn a_model_held_as_blocks_refuses_to_merge() {
    let dir = tempfile::tempdir().unwrap();
    let path = mixed_types(dir.path());
    let mut stored = load(&path);
    stored.quantize(Quantization::GgufAsStored).unwrap();
    stored
        .model
        .add_adapter("a", &teamtune_llama::LoraConfig::default())
        .unwrap();
    let err = stored.model.merge_adapter("a").unwrap_err().to_string();
    assert!(
        err.contains("--quantize gguf") && err.contains("dense weights"),
        "{err}"
    );
}

/// Loading with a quantisation (what `--quantize` does) puts the model on it, whichever kind.
#[test]
fn loading_with_a_quantisation_applies_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = mixed_types(dir.path());
    for q in [
        Quantization::Requantize(GgmlDType::Q8_0),
        Quantization::Requantize(GgmlDType::Q4_0),
        Quantization::GgufAsStored,
    ] {
        let m =
            LoadedModel::load_quantized(path.to_str().unwrap(), DType::F32, &Device::Cpu, Some(q))
                .unwrap();
        assert_eq!(m.model.quantized(), Some(q));
    }
    assert_eq!(load(&path).model.quantized(), None);
}

#[test]
fn gguf_blocks_of_a_folder_model_are_refused_in_plain_words() {
    // The folder has no tokenizer; the GGUF's serves (quantize does not use it).
    let folder =
        ModelFiles::resolve(common::fixtures().join("tiny-llama31").to_str().unwrap()).unwrap();
    let mut m = LoadedModel {
        model: load_model(&folder, DType::F32, &Device::Cpu).unwrap(),
        assets: load(&common::fixtures().join("tiny-llama31.gguf")).assets,
        files: folder,
    };
    let err = m
        .quantize(Quantization::GgufAsStored)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--quantize") && err.contains("not a GGUF file"),
        "{err}"
    );
}
