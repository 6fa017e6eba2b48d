//! What the tests of every crate share, in one place: the downloaded default model and the
//! Llama-3 tokenizer (fetched the way users fetch them, once per test process), the tiny fixture
//! models, and the tolerances numerical tests compare with.
//!
//! Owns: test helpers only; it is a dev-dependency and nothing a user links depends on it. Must not
//! own: assertions of a particular crate's behaviour (those stay in that crate's tests), and it
//! never writes into the repository.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use teamtune_llama::{ChatAssets, Llama, LlamaConfig, WeightSource};
use tokenizers::Tokenizer;

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The model fixtures (tiny LLaMA-3.1 models, adapters, reference logits) of `crates/llama`.
pub fn fixtures() -> PathBuf {
    repo_root().join("crates/llama/tests/fixtures")
}

/// A JSON fixture of [`fixtures`], parsed.
pub fn json(relative: &str) -> serde_json::Value {
    let path = fixtures().join(relative);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Where scripts/fetch-default-model.sh put the downloaded files.
pub struct Downloaded {
    /// SmolLM2-135M-Instruct, Q4_1 GGUF (the default model).
    pub model: PathBuf,
    /// The real Llama-3 tokenizer.json.
    pub llama3_tokenizer: PathBuf,
}

/// Runs scripts/fetch-default-model.sh (idempotent: nothing is downloaded twice) once per test
/// process and returns the paths it prints.
pub fn downloaded() -> &'static Downloaded {
    static PATHS: OnceLock<Downloaded> = OnceLock::new();
    PATHS.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/fetch-default-model.sh"))
            .output()
            .expect("run scripts/fetch-default-model.sh");
        assert!(
            out.status.success(),
            "scripts/fetch-default-model.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).expect("paths are UTF-8");
        let mut lines = stdout.lines().map(PathBuf::from);
        Downloaded {
            model: lines.next().expect("the model's path"),
            llama3_tokenizer: lines.next().expect("the tokenizer's path"),
        }
    })
}

/// The default model's GGUF file (downloaded on first use).
pub fn default_model() -> PathBuf {
    downloaded().model.clone()
}

/// The real Llama-3 tokenizer (downloaded on first use), loaded once per process.
pub fn llama3_tokenizer() -> Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        Tokenizer::from_file(&downloaded().llama3_tokenizer).expect("load the Llama-3 tokenizer")
    })
    .clone()
}

/// The default model's tokenizer and chat template, read from its GGUF, loaded once per process.
pub fn default_model_assets() -> &'static ChatAssets {
    static ASSETS: OnceLock<ChatAssets> = OnceLock::new();
    ASSETS.get_or_init(|| {
        teamtune_llama::load_chat_assets(default_model().to_str().expect("a UTF-8 path"))
            .expect("load the default model's tokenizer")
    })
}

/// The tiny LLaMA-3.1 fixture folder (config.json, model.safetensors; no tokenizer).
pub fn tiny_model_dir() -> PathBuf {
    fixtures().join("tiny-llama31")
}

/// The tiny LLaMA-3.1 fixture loaded on the CPU in `dtype`.
pub fn tiny_model(dtype: DType) -> Llama {
    let dir = tiny_model_dir();
    let config = LlamaConfig::from_file(&dir.join("config.json")).expect("tiny config");
    let weights =
        WeightSource::safetensors(vec![dir.join("model.safetensors")]).expect("tiny weights");
    Llama::load(&config, &weights, dtype, &Device::Cpu).expect("load the tiny model")
}

/// A chat-ready HF folder under `dir`: the tiny fixture's config and weights, its GGUF's toy
/// tokenizer as tokenizer.json, and a chat template (the fixture has none). What the binary's
/// end-to-end tests run `train`, `serve` and `demo` on.
pub fn tiny_chat_model(dir: &std::path::Path) -> PathBuf {
    let out = dir.join("tiny-chat");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(tiny_model_dir().join(f), out.join(f)).unwrap();
    }
    let gguf = fixtures().join("tiny-llama31.gguf");
    let assets = teamtune_llama::load_chat_assets(gguf.to_str().unwrap()).unwrap();
    assets
        .tokenizer
        .save(out.join("tokenizer.json"), false)
        .unwrap();
    let template = "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}";
    let config = serde_json::json!({
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "chat_template": template,
    });
    std::fs::write(out.join("tokenizer_config.json"), config.to_string()).unwrap();
    out
}

/// A tensor's values as f32, flattened.
pub fn flat(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .expect("a tensor readable as f32")
}

/// Largest |a-b| / max(|b|, floor) over two equally long slices.
pub fn max_rel_err(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len(), "compared slices differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(floor))
        .fold(0.0, f32::max)
}

/// Largest |a-b| / max(|b|, 1) over two tensors of the same shape: the relative error of logits
/// and gradients, absolute where the reference is small.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "compared tensors differ in shape");
    max_rel_err(&flat(a), &flat(b), 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_error_is_absolute_below_the_floor_and_relative_above() {
        assert_eq!(max_rel_err(&[1.5, 0.1], &[1.0, 0.0], 1.0), 0.5);
        assert_eq!(max_rel_err(&[20.0], &[10.0], 1.0), 1.0);
        assert_eq!(max_rel_err(&[0.0], &[0.0], 1.0), 0.0);
    }

    #[test]
    fn the_tiny_model_loads_from_the_fixtures() {
        let m = tiny_model(DType::F32);
        assert!(m.config().num_hidden_layers > 0);
    }
}
