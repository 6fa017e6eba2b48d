//! `teamtune compare`: several training runs or several evaluations side by side: a table on
//! stdout and one figure (PNG + SVG). What the inputs are is recognised from them: run folders
//! (metrics.jsonl) give loss curves, eval folders (eval.json) a per-task table and a grouped bar
//! chart.

use anyhow::Context;
use clap::builder::PossibleValuesParser;
use std::path::PathBuf;
use teamtune_report::{Comparison, REFERENCE_NAMES};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// What to compare, all of one kind: training runs (run folders with metrics.jsonl, or
    /// metrics.jsonl files) or evaluation results (`teamtune eval --out` folders with eval.json,
    /// or eval .json files). At least two, or one evaluation with `--reference`.
    #[arg(required = true, num_args = 1..)]
    pub inputs: Vec<PathBuf>,
    /// Write PREFIX.png and PREFIX.svg.
    #[arg(long, value_name = "PREFIX", default_value = "compare")]
    pub out: PathBuf,
    /// Names for the inputs in the table and figure, in order [default: the run or eval
    /// folders' names].
    #[arg(long, value_delimiter = ',')]
    pub names: Option<Vec<String>>,
    /// Evaluations only: add published reference columns to the table and the chart (`study`:
    /// the study's base 8B / base 70B / fine-tuned 8B scores per task).
    #[arg(long, value_name = "NAME", value_parser = PossibleValuesParser::new(REFERENCE_NAMES))]
    pub reference: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.inputs.len() < 2 && args.reference.is_none() {
        anyhow::bail!(
            "2 inputs are required to compare (or one evaluation with --reference), got {}",
            args.inputs.len()
        );
    }
    let mut cmp = Comparison::detect_all(&args.inputs)?;
    if let Some(names) = &args.names {
        cmp.rename(names).context("--names")?;
    }
    if let Some(reference) = &args.reference {
        cmp.set_reference(reference).context("--reference")?;
    }
    print!("{}", cmp.table());
    let files = cmp
        .write_figure(&args.out)
        .context("writing the comparison figure")?;
    println!();
    println!("{}", files.png.display());
    println!("{}", files.svg.display());
    Ok(())
}
