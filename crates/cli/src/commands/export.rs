//! `teamtune export`: a LoRA adapter out to llama.cpp and Ollama: a llama.cpp LoRA GGUF and an
//! Ollama `Modelfile` beside it. (`teamtune merge --format gguf` writes a whole model.)

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use teamtune_data::BuiltinTemplate;

use super::adapter_args::check_adapter;
use teamtune_llama::{
    load_chat_assets, load_config, ChatFormat, GgufType, LoraAdapter, ModelFiles, Modelfile,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model the adapter was trained on (a HF folder, a .gguf file or a hub id; it
    /// gives the heads the q and k factors are permuted by). Default: the default model.
    #[arg(long, default_value = "")]
    pub model: String,
    /// The adapter: a PEFT folder (e.g. a `teamtune train` run's adapter) or a LoRA GGUF.
    #[arg(long, value_name = "DIR")]
    pub adapter: PathBuf,
    /// The output format; `gguf` (llama.cpp's LoRA adapter file) is the one there is.
    #[arg(long, default_value = "gguf")]
    pub format: String,
    /// The adapter file to write.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Tensor type: f32, f16, bf16, or q8_0 (f16 for tensors whose rows do not split into
    /// blocks of 32, as llama.cpp's converter does).
    #[arg(long = "type", default_value = "f32")]
    pub ty: String,
    /// The Ollama Modelfile to write (default: `Modelfile` beside --out).
    #[arg(long, value_name = "FILE")]
    pub modelfile: Option<PathBuf>,
}

/// `Modelfile` beside `out` unless given; refused when it exists or is `out`.
pub fn modelfile_path(given: Option<&PathBuf>, out: &Path) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(p) => p.clone(),
        None => out
            .parent()
            .map(|d| d.join("Modelfile"))
            .unwrap_or_else(|| PathBuf::from("Modelfile")),
    };
    if path.exists() {
        bail!(
            "--modelfile {}: the file exists; give a new path",
            path.display()
        );
    }
    if teamtune_formats::same_path(out, &path) {
        bail!("--out and --modelfile are the same file");
    }
    Ok(path)
}

/// Writes the Ollama Modelfile for `model`'s chat format: `FROM from`, `ADAPTER adapter`
/// (absolute paths), the template and its stop tokens.
pub fn write_modelfile(
    model: &str,
    modelfile: &Path,
    from: &Path,
    adapter: Option<&Path>,
) -> anyhow::Result<()> {
    let assets = load_chat_assets(model).context("reading the model's tokenizer")?;
    let has = |t: &str| assets.tokenizer.token_to_id(t).is_some();
    let (format, stops) = match BuiltinTemplate::guess(has) {
        Some(BuiltinTemplate::ChatMl) => (ChatFormat::ChatMl, vec!["<|im_end|>".to_string()]),
        Some(BuiltinTemplate::Llama31) => (
            ChatFormat::Llama3,
            vec!["<|eot_id|>".to_string(), "<|end_of_text|>".to_string()],
        ),
        _ => (
            ChatFormat::Other,
            assets.eos_token.iter().cloned().collect(),
        ),
    };
    let absolute = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (from, adapter) = (absolute(from), adapter.map(absolute));
    let text = Modelfile {
        from: &from,
        adapter: adapter.as_deref(),
        format,
        stops: &stops,
    }
    .render();
    teamtune_formats::write_atomic(modelfile, text.as_bytes())
        .with_context(|| format!("--modelfile {}", modelfile.display()))
}

pub fn run(args: Args) -> anyhow::Result<()> {
    // Everything is checked before anything is read or written.
    if args.format != "gguf" {
        bail!(
            "--format `{}`: the one format there is is gguf",
            args.format
        );
    }
    // q4_0 is for merged models: an adapter's small factors lose too much in 4 bits.
    let Some(ty) = GgufType::parse(&args.ty).filter(|t| *t != GgufType::Q4_0) else {
        bail!("--type `{}` is not one of f32, f16, bf16, q8_0", args.ty);
    };
    if args.out.exists() {
        bail!(
            "--out {}: the file exists; give a new path",
            args.out.display()
        );
    }
    let modelfile = modelfile_path(args.modelfile.as_ref(), &args.out)?;
    check_adapter(&args.adapter)?;
    let name = if args.model.is_empty() {
        "(default)"
    } else {
        &args.model
    };
    let files = ModelFiles::resolve(&args.model).with_context(|| format!("model {name}"))?;
    let config = load_config(&files).with_context(|| format!("model {name}"))?;
    let device = candle_core::Device::Cpu;
    let adapter = LoraAdapter::open(&config, &args.adapter, &device)
        .with_context(|| format!("--adapter {}", args.adapter.display()))?;
    adapter
        .save_gguf(&config, &args.out, ty)
        .with_context(|| format!("--out {}", args.out.display()))?;
    write_modelfile(
        &args.model,
        &modelfile,
        Path::new(&files.describe()),
        Some(&args.out),
    )?;
    println!("{}", args.out.display());
    tracing::info!(
        adapter = %args.out.display(),
        modelfile = %modelfile.display(),
        rank = adapter.config().rank,
        "written: ollama create NAME -f {}",
        modelfile.display()
    );
    Ok(())
}
