//! `teamtune plot`: a run's loss curves (train, eval, the base model's step-0 loss) as PNG and SVG.

use anyhow::Context;
use std::path::PathBuf;
use teamtune_report::{plot_run, RunMetrics};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run folder (with metrics.jsonl, from `teamtune train --out`) or its metrics.jsonl.
    pub run: PathBuf,
    /// Write PREFIX.png and PREFIX.svg [default: RUN/loss].
    #[arg(long, value_name = "PREFIX")]
    pub out: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let metrics = RunMetrics::read(&args.run)?;
    let prefix = args.out.unwrap_or_else(|| {
        let dir = if args.run.is_dir() {
            args.run.clone()
        } else {
            metrics.path.parent().map(PathBuf::from).unwrap_or_default()
        };
        dir.join("loss")
    });
    let files =
        plot_run(&metrics, &prefix).with_context(|| format!("plotting {}", args.run.display()))?;
    println!("{}", files.png.display());
    println!("{}", files.svg.display());
    Ok(())
}
