//! `teamtune compare`: several runs side by side: a table on stdout and one figure (PNG + SVG).

use anyhow::Context;
use std::path::PathBuf;
use teamtune_report::Comparison;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Runs to compare: run folders (with metrics.jsonl) or metrics.jsonl files.
    #[arg(required = true, num_args = 2..)]
    pub inputs: Vec<PathBuf>,
    /// Write PREFIX.png and PREFIX.svg.
    #[arg(long, value_name = "PREFIX", default_value = "compare")]
    pub out: PathBuf,
    /// Names for the inputs in the table and figure, in order [default: the run folders' names].
    #[arg(long, value_delimiter = ',')]
    pub names: Option<Vec<String>>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let mut cmp = Comparison::detect_all(&args.inputs)?;
    if let Some(names) = &args.names {
        cmp.rename(names).context("--names")?;
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
