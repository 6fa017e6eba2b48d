//! Broken inputs give errors that name the file and what is wrong.

mod common;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use teamtune_llama::{LoadedModel, ModelFiles};

fn copy_tiny(to: &std::path::Path) {
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(common::fixtures().join("tiny-llama31").join(f), to.join(f)).unwrap();
    }
}

fn load_err(spec: &std::path::Path) -> String {
    match LoadedModel::load(spec.to_str().unwrap(), DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", spec.display()),
        Err(e) => e.to_string(),
    }
}

fn model_err(spec: &std::path::Path) -> String {
    let files = ModelFiles::resolve(spec.to_str().unwrap()).unwrap();
    match teamtune_llama::load_model(&files, DType::F32, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", spec.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn truncated_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    copy_tiny(dir.path());
    let f = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let err = model_err(dir.path());
    assert!(
        err.contains("model.safetensors") && err.contains("truncated or corrupt"),
        "{err}"
    );
}

#[test]
fn config_missing_hidden_size() {
    let dir = tempfile::tempdir().unwrap();
    copy_tiny(dir.path());
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"hidden_size\": 64,", "");
    std::fs::write(&cfg, text).unwrap();
    let err = model_err(dir.path());
    assert!(
        err.contains("config.json") && err.contains("`hidden_size`"),
        "{err}"
    );
}

#[test]
fn weights_that_do_not_fit_the_config() {
    let dir = tempfile::tempdir().unwrap();
    copy_tiny(dir.path());
    let cfg = dir.path().join("config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"intermediate_size\": 160", "\"intermediate_size\": 128");
    std::fs::write(&cfg, text).unwrap();
    let err = model_err(dir.path());
    assert!(
        err.contains("gate_proj.weight") && err.contains("[160, 64]") && err.contains("[128, 64]"),
        "{err}"
    );
}

#[test]
fn gguf_of_an_unsupported_architecture() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gpt2.gguf");
    let w = QTensor::quantize(
        &Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    let arch = gguf_file::Value::String("gpt2".into());
    let mut file = std::fs::File::create(&path).unwrap();
    gguf_file::write(
        &mut file,
        &[("general.architecture", &arch)],
        &[("token_embd.weight", &w)],
    )
    .unwrap();
    drop(file);
    let err = load_err(&path);
    assert!(
        err.contains("gpt2.gguf") && err.contains("architecture `gpt2`"),
        "{err}"
    );
}

#[test]
fn not_a_gguf_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("noise.gguf");
    std::fs::write(&path, b"this is not a gguf file at all").unwrap();
    let err = load_err(&path);
    assert!(err.contains("noise.gguf") && err.contains("GGUF"), "{err}");
}

#[test]
fn tokenizer_that_does_not_fit_the_vocab() {
    // The tiny model (320 tokens) with the real Llama-3 tokenizer (128256 tokens).
    let dir = tempfile::tempdir().unwrap();
    copy_tiny(dir.path());
    let llama3 = common::llama3_tokenizer();
    std::fs::copy(llama3, dir.path().join("tokenizer.json")).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("128256") && err.contains("320"), "{err}");
}

#[test]
fn missing_tokenizer_is_named() {
    let dir = tempfile::tempdir().unwrap();
    copy_tiny(dir.path());
    let err = load_err(dir.path());
    assert!(err.contains("tokenizer.json"), "{err}");
}

/// `num_hidden_layers` 0 (blank output) or fewer than the weights hold (the rest silently
/// dropped) is refused, naming the file.
#[test]
fn layer_counts_that_do_not_fit_the_weights() {
    for (layers, file, want) in [
        ("0", "config.json", "num_hidden_layers is 0"),
        ("1", "model.safetensors", "more layers than num_hidden_layers = 1 (there is `model.layers.1.input_layernorm.weight`)"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        copy_tiny(dir.path());
        let cfg = dir.path().join("config.json");
        let text = std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("\"num_hidden_layers\": 2", &format!("\"num_hidden_layers\": {layers}"));
        std::fs::write(&cfg, text).unwrap();
        let err = model_err(dir.path());
        assert!(err.contains(file) && err.contains(want), "{layers}: {err}");
    }
}

/// An adapter with a NaN or an infinity would merge into a model that writes nothing: refused
/// at load, naming the tensor.
#[test]
fn adapter_weights_that_are_not_finite() {
    let dir = tempfile::tempdir().unwrap();
    let lora = common::fixtures().join("tiny-lora");
    std::fs::copy(
        lora.join("adapter_config.json"),
        dir.path().join("adapter_config.json"),
    )
    .unwrap();
    let mut tensors =
        candle_core::safetensors::load(lora.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let name = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight";
    let good = tensors[name].clone();
    for bad_value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut v: Vec<f32> = good.flatten_all().unwrap().to_vec1().unwrap();
        v[3] = bad_value;
        let bad = Tensor::from_vec(v, good.dims(), &Device::Cpu).unwrap();
        tensors.insert(name.to_string(), bad);
        candle_core::safetensors::save(&tensors, dir.path().join("adapter_model.safetensors"))
            .unwrap();
        let mut m = teamtune_testkit::tiny_model(DType::F32);
        let err = m
            .load_adapter("a", dir.path())
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(name) && err.contains("not finite"),
            "{bad_value}: {err}"
        );
    }
}
