//! `teamtune merge`: a LoRA adapter folded into its base model, written as a standard Hugging
//! Face folder (safetensors shards + index, config, generation config, tokenizer files).

use std::path::PathBuf;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use teamtune_llama::{export_merged, parse_dtype, parse_size, ExportOptions, ModelFiles};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model: a HF folder, a .gguf file, or a hub id. Default: SmolLM2-135M-Instruct
    /// from $TEAMTUNE_HOME (scripts/fetch-default-model.sh).
    #[arg(long, default_value = "")]
    pub model: String,
    /// PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).
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
}

pub fn run(args: Args) -> anyhow::Result<()> {
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
