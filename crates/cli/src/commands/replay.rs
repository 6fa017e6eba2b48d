//! `teamtune replay`: re-runs recorded grid-world episodes and checks that every turn gives the
//! recorded action, result and score.

use anyhow::{bail, Context};
use std::path::PathBuf;
use teamtune_gridworld::{read_records, render_snapshots, render_text, replay, EpisodeRecord};

#[derive(clap::Args)]
pub struct Args {
    /// A JSON Lines file of episode records (from `teamtune play --out` or `collect`).
    pub file: PathBuf,
    /// The record to replay (0-based); all records when absent.
    #[arg(long)]
    pub index: Option<usize>,
    /// Print the turns (grid per round, each reply's action, message, result, score).
    #[arg(long)]
    pub show: bool,
    /// Draw the replayed episode to this PNG or SVG file (needs --index).
    #[arg(long)]
    pub png: Option<PathBuf>,
}

fn show(rec: &EpisodeRecord, snapshots: &[(u32, teamtune_gridworld::World)]) {
    println!(
        "task {} seed {} ({}x{}, agents {}, policy {})",
        rec.task,
        rec.seed,
        rec.width,
        rec.height,
        rec.agents.join(", "),
        rec.policy.as_deref().unwrap_or("?")
    );
    let mut frames = snapshots.iter().peekable();
    if let Some((_, w)) = frames.next() {
        println!("{}", render_text(w));
    }
    for (k, t) in rec.turns.iter().enumerate() {
        let action = match (&t.action, &t.error) {
            (Some(a), _) => a.to_string(),
            (None, Some(e)) => format!("(unusable: {e})"),
            (None, None) => "(none)".into(),
        };
        let msg = if t.message.is_empty() {
            String::new()
        } else {
            format!(" says \"{}\"", t.message)
        };
        println!(
            "r{} {}: {action}{msg} => {} score {}",
            t.round, t.name, t.result, t.score
        );
        let round_over = rec.turns.get(k + 1).is_none_or(|n| n.round != t.round);
        if round_over {
            if let Some((_, w)) = frames.next() {
                println!("{}", render_text(w));
            }
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let records = read_records(&args.file)?;
    if records.is_empty() {
        bail!("{}: holds no episode records", args.file.display());
    }
    let chosen: Vec<(usize, &EpisodeRecord)> = match args.index {
        Some(k) => match records.get(k) {
            Some(r) => vec![(k, r)],
            None => bail!(
                "{}: no record at index {k} ({} records)",
                args.file.display(),
                records.len()
            ),
        },
        None => records.iter().enumerate().collect(),
    };
    super::play::check_drawing(args.png.as_deref())?;
    if args.png.is_some() && chosen.len() != 1 {
        bail!("--png draws one episode: give --index");
    }
    let mut failed = 0;
    for (k, rec) in chosen {
        let report = replay(rec).with_context(|| format!("replaying record {k}"))?;
        if args.show {
            show(rec, report.episode.snapshots());
        }
        if report.is_ok() {
            println!(
                "record {k} ({} seed {}): {} turns replayed, final score {} matches",
                rec.task, rec.seed, report.turns, report.final_score
            );
        } else {
            failed += 1;
            println!(
                "record {k} ({} seed {}): MISMATCH after {} turns",
                rec.task, rec.seed, report.turns
            );
            for m in &report.mismatches {
                println!("  {m}");
            }
        }
        if let Some(path) = &args.png {
            render_snapshots(path, report.episode.snapshots())
                .with_context(|| format!("drawing {}", path.display()))?;
        }
    }
    if failed > 0 {
        bail!("{failed} record(s) did not replay to the recorded scores");
    }
    Ok(())
}
