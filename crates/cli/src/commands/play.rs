//! `teamtune play`: one grid-world episode shown turn by turn (grid, prompt, reply, result).

use anyhow::{bail, Context};
use std::path::PathBuf;
use teamtune_gridworld::{
    append_records, render_snapshots, render_text, ActionName, Episode, Expert, RandomPolicy,
    TaskRegistry,
};

#[derive(clap::Args)]
pub struct Args {
    /// Task id (built-in: single_nav, corners, alphabetical, random_points, single_pick,
    /// multi_pick, permission_pick, or one from --tasks).
    #[arg(long)]
    pub task: String,
    /// Episode seed: the same seed gives the same episode.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Who plays: `expert` (scripted, sees only its prompts) or `random` (random legal actions).
    #[arg(long, default_value = "expert")]
    pub policy: String,
    /// A TOML file of extra task variants (`[[task]]` tables, as crates/gridworld/tasks/builtin.toml).
    #[arg(long)]
    pub tasks: Option<PathBuf>,
    /// Append the episode record to this JSON Lines file (written atomically).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Draw the episode (a grid per round) to this PNG or SVG file.
    #[arg(long)]
    pub png: Option<PathBuf>,
    /// Also print the system message of each agent and every user message.
    #[arg(long)]
    pub prompts: bool,
    /// Print only the final line.
    #[arg(long, short)]
    pub quiet: bool,
}

pub fn registry(tasks: Option<&PathBuf>) -> anyhow::Result<TaskRegistry> {
    let mut reg = TaskRegistry::builtin();
    if let Some(path) = tasks {
        reg.add_file(path)
            .with_context(|| format!("loading task variants from {}", path.display()))?;
    }
    Ok(reg)
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `--png FILE` draws PNG or SVG, chosen by the extension: anything else is refused before the
/// episode is played (it surfaced as the image library's Debug error after it).
pub fn check_drawing(path: Option<&std::path::Path>) -> anyhow::Result<()> {
    if let Some(p) = path {
        let ext = p
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        if !matches!(ext.as_deref(), Some("png") | Some("svg")) {
            anyhow::bail!("--png {}: give a .png or .svg file", p.display());
        }
    }
    Ok(())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    check_drawing(args.png.as_deref())?;
    let reg = registry(args.tasks.as_ref())?;
    let spec = reg.get(&args.task)?.clone();
    let mut ep = Episode::new(&spec, args.seed)?;
    let n = ep.agent_count();
    let mut experts: Vec<Expert> = (0..n)
        .map(|i| Expert::new(ep.briefing(i).clone(), args.seed))
        .collect();
    let mut randoms: Vec<RandomPolicy> = (0..n)
        .map(|i| RandomPolicy::new(ep.briefing(i), args.seed))
        .collect();
    let random = match args.policy.as_str() {
        "expert" => false,
        "random" => true,
        other => bail!("unknown policy `{other}` (this command knows: expert, random)"),
    };
    let show = !args.quiet;
    if show {
        println!(
            "task {} (seed {}): {}x{} grid, {} rounds, agents {}",
            spec.id,
            args.seed,
            ep.world().width,
            ep.world().height,
            spec.rounds,
            ep.agent_names().join(", ")
        );
        if args.prompts {
            for i in 0..n {
                println!(
                    "\n[system: {}]\n{}",
                    ep.agent_names()[i],
                    indent(&ep.messages(i)[0].content)
                );
            }
        }
        println!("\n{}", render_text(ep.world()));
    }
    while let Some(turn) = ep.current() {
        let (agent, round, name) = (turn.agent, turn.round, turn.name.to_string());
        if show {
            println!("\n── round {round}/{} · {name} ──", spec.rounds);
            if args.prompts {
                println!("[user]\n{}", indent(turn.user_message));
            }
        }
        let reply = if random {
            randoms[agent].act(turn.observation)
        } else {
            experts[agent].act(turn.observation)
        };
        let out = ep.submit_reply(&reply)?;
        if show {
            println!("[assistant]\n    {}", reply.to_json());
            println!("=> {} score {}", out.result, out.score);
            if reply.action_name != ActionName::Skip {
                println!("{}", render_text(ep.world()));
            }
        }
    }
    let mut record = ep.record();
    record.policy = Some(args.policy.clone());
    println!(
        "final score {} ({:?}) after {} turns",
        record.final_score,
        record.end,
        record.turns.len()
    );
    if let Some(path) = &args.out {
        append_records(path, std::slice::from_ref(&record))
            .with_context(|| format!("writing {}", path.display()))?;
        tracing::info!(path = %path.display(), "record appended");
    }
    if let Some(path) = &args.png {
        render_snapshots(path, ep.snapshots())
            .with_context(|| format!("drawing {}", path.display()))?;
        tracing::info!(path = %path.display(), "episode drawn");
    }
    Ok(())
}
