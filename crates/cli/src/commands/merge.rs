//! `teamtune merge`: a LoRA adapter folded into its base model, written as a standard Hugging
//! Face folder (safetensors shards + index, config, generation config, tokenizer files) or, with
//! `--format gguf`, as one GGUF file for llama.cpp and Ollama (with a Modelfile beside it).

use std::path::PathBuf;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use teamtune_llama::{
    export_merged, export_merged_gguf, load_config, parse_dtype, parse_size, ExportOptions,
    GgufType, LoraAdapter, ModelFiles,
};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model: a HF folder, a .gguf file, or a hub id. Default: SmolLM2-135M-Instruct
    /// from $TEAMTUNE_HOME (scripts/fetch-default-model.sh).
    #[arg(long, default_value = "")]
    pub model: String,
    /// LoRA adapter: a PEFT folder (adapter_config.json + adapter_model.safetensors) or a
    /// llama.cpp LoRA GGUF.
    #[arg(long, required_unless_present = "no_adapter")]
    pub adapter: Option<PathBuf>,
    /// Export the base model as it is (e.g. a GGUF model to an HF folder).
    #[arg(long, conflicts_with = "adapter")]
    pub no_adapter: bool,
    /// Output folder (written beside it, then renamed into place).
    #[arg(long)]
    pub out: PathBuf,
    /// Dtype of the written weights: auto (the source's; f32 for GGUF), f32, bf16 or f16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Largest shard (5GB, 500MB, ... as transformers' save_pretrained; decimal units).
    #[arg(long, default_value = "5GB")]
    pub max_shard_size: String,
    /// Replace a non-empty output folder.
    #[arg(long)]
    pub force: bool,
    /// `hf` (a Hugging Face folder) or `gguf` (one file llama.cpp and Ollama load: a GGUF base's
    /// metadata and tokenizer kept, an HF base's written as llama.cpp's converter writes them).
    #[arg(long, default_value = "hf")]
    pub format: String,
    /// With --format gguf: the matrices' type, f32, f16, bf16, q8_0 or q4_0.
    #[arg(long = "type", default_value = "f32")]
    pub ty: String,
    /// With --format gguf: the Ollama Modelfile to write (default: `Modelfile` beside --out).
    #[arg(long, value_name = "FILE")]
    pub modelfile: Option<PathBuf>,
}

/// `--format gguf`: the merged model as one GGUF file and an Ollama Modelfile.
fn run_gguf(args: &Args) -> anyhow::Result<()> {
    let Some(ty) = GgufType::parse(&args.ty) else {
        bail!(
            "--type `{}` is not one of f32, f16, bf16, q8_0, q4_0",
            args.ty
        );
    };
    if args.out.exists() && !args.force {
        bail!(
            "--out {}: the file exists; give a new path (or --force to replace it)",
            args.out.display()
        );
    }
    let modelfile = super::export::modelfile_path(args.modelfile.as_ref(), &args.out)?;
    if let Some(a) = &args.adapter {
        super::adapter_args::check_adapter(a)?;
    }
    let name = if args.model.is_empty() {
        "(default)"
    } else {
        &args.model
    };
    let files = ModelFiles::resolve(&args.model).with_context(|| format!("model {name}"))?;
    let base = PathBuf::from(files.describe());
    for input in std::iter::once(base.as_path()).chain(args.adapter.as_deref()) {
        if teamtune_formats::overlaps(&args.out, input) {
            bail!(
                "--out {} is the input {}: choose another",
                args.out.display(),
                input.display()
            );
        }
    }
    let config = load_config(&files).with_context(|| format!("model {name}"))?;
    let device = candle_core::Device::Cpu;
    let adapter = match &args.adapter {
        Some(a) => Some(
            LoraAdapter::open(&config, a, &device)
                .with_context(|| format!("--adapter {}", a.display()))?,
        ),
        None => None,
    };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} tensors ({eta})")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message("merging");
    let report = export_merged_gguf(
        &files,
        adapter.as_ref(),
        &args.out,
        ty,
        &mut |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    )
    .with_context(|| format!("merging into {}", args.out.display()))?;
    bar.finish_and_clear();
    super::export::write_modelfile(&args.model, &modelfile, &args.out, None)?;
    eprintln!(
        "{} tensors ({} with the adapter merged), {:.1} MB as {}; Modelfile: {}",
        report.tensors,
        report.merged,
        report.bytes as f64 / 1e6,
        args.ty,
        modelfile.display()
    );
    println!("{}", args.out.display());
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.format.as_str() {
        "hf" => {}
        "gguf" => return run_gguf(&args),
        other => bail!("--format `{other}` is not one of hf, gguf"),
    }
    let dtype = match args.dtype.as_str() {
        "auto" => None,
        "f32" | "bf16" | "f16" => Some(parse_dtype(&args.dtype, &candle_core::Device::Cpu)?),
        other => bail!("--dtype `{other}` is not one of auto, f32, bf16, f16"),
    };
    let options = ExportOptions {
        dtype,
        max_shard_size: parse_size(&args.max_shard_size)?,
        force: args.force,
    };
    let name = if args.model.is_empty() {
        "(default)"
    } else {
        &args.model
    };
    let files = ModelFiles::resolve(&args.model).with_context(|| format!("model {name}"))?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message("writing");
    let report = export_merged(
        &files,
        args.adapter.as_deref(),
        &args.out,
        &options,
        &mut |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    )
    .with_context(|| format!("merging into {}", args.out.display()))?;
    bar.finish_and_clear();
    eprintln!(
        "{} tensors, {} shard(s), {:.1} MB as {:?}{}",
        report.tensors,
        report.shards.len(),
        report.total_size as f64 / 1e6,
        report.dtype,
        if report.tokenizer {
            ""
        } else {
            " (no tokenizer files: the source has none)"
        }
    );
    println!("{}", report.dir.display());
    Ok(())
}
