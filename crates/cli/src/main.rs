//! `teamtune`: the command line over the teamtune crates. It parses arguments and calls.
//!
//! Each subcommand lives in its own module under `commands/`: its flags (clap), and the calls
//! that load what the flags name, run the library crates and print or write their results.
//! This file only parses arguments and dispatches. The few things the binary owns are the glue
//! between commands: the training recipe's file and flags (`commands/recipe.rs`, whose defaults
//! come from `teamtune_train`), the demo's plan and phases (`commands/demo/`) and the improve
//! loop's rounds (`commands/improve/`), both composed of plain commands (`commands/plain.rs`).
//!
//! It must not own logic of its own (models, data, training, evaluation, serving belong to
//! their crates), Markdown or report writers (`teamtune-report`), text printers of library
//! types (next to the type: e.g. `teamtune_data::PrepareReport::render`), or benchmark and
//! check harnesses (developer binaries: the GPU harness is `crates/train/examples/gpu/`).

mod commands;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "teamtune",
    version,
    about = "Fine-tune LLaMA-3.x chat models with LoRA on multi-agent trajectories"
)]
struct Cli {
    /// Debug logs, and a backtrace with an error (as TEAMTUNE_BACKTRACE=1; RUST_BACKTRACE
    /// alone, which many machines set, does not print one).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole flow on the default model within a time budget: expert episodes, base-model
    /// eval, LoRA training, tuned eval, and a report folder (report.md, figures, adapter).
    Demo(commands::demo::Args),
    /// Answer a prompt with a model (chat template applied), streaming the text to stdout.
    Generate(commands::generate::Args),
    /// Inspect conversation files: token statistics, rendered conversations with trained spans.
    Data(commands::data::Args),
    /// Play one grid-world episode and show it turn by turn (grid, prompt, reply, score).
    Play(commands::play::Args),
    /// Re-run recorded grid-world episodes and check that the scores come out the same.
    Replay(commands::replay::Args),
    /// Play many episodes (all tasks by default) and write their records and training lines.
    Collect(commands::collect::Args),
    /// Play every task N times with a policy (the model, an adapter, the experts or an
    /// OpenAI-compatible endpoint) and report scores, success and invalid replies per task.
    Eval(commands::eval::Args),
    /// Train a LoRA adapter on conversation files (the study's recipe by default).
    Train(commands::train::Args),
    /// Rejection-sampling self-improvement: per round the adapter plays at a temperature,
    /// its episodes at or above --min-score (or the experts' where it kept none) train it
    /// further, and each round is evaluated; resumes after the last finished round.
    Improve(commands::improve::Args),
    /// Merge a LoRA adapter into its base model and write a Hugging Face model folder.
    Merge(commands::merge::Args),
    /// Draw a run's loss curves (train, eval, base model at step 0) as PNG and SVG.
    Plot(commands::plot::Args),
    /// Compare runs: a table of their losses and speed, and one figure with all their curves.
    Compare(commands::compare::Args),
    /// Serve the model and its adapters behind an OpenAI-compatible chat-completions API.
    Serve(commands::serve::Args),
    /// Write a LoRA adapter for llama.cpp and Ollama: a LoRA GGUF and a Modelfile.
    Export(commands::export::Args),
    /// Talk with the model (and an adapter) in the terminal: a line is a turn; /reset,
    /// /save FILE, /quit.
    Chat(commands::chat::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before anything starts a thread.
    teamtune_llama::share_cores_with_candle();
    if cli.verbose {
        // anyhow captures a backtrace only when asked to by the environment.
        std::env::set_var("RUST_LIB_BACKTRACE", "1");
        std::env::set_var("TEAMTUNE_BACKTRACE", "1");
    }
    // Logs go to stderr so that stdout carries only what a command produces.
    let level = if cli.verbose { "debug" } else { "info" };
    // Colours only for a terminal: a log file or a pipe gets plain text.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .init();
    let result = match cli.command {
        // The server's model thread runs its own steps on rayon's workers; its HTTP threads
        // must not wait behind a worker parked in the server's accept loop.
        Command::Serve(args) => commands::serve::run(args),
        // Everything else runs on one of rayon's workers, the calling thread asleep
        // (teamtune_llama::on_compute_threads says why).
        command => teamtune_llama::on_compute_threads(|| run(command)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            print_error(&err);
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo(args) => commands::demo::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Data(args) => commands::data::run(args),
        Command::Play(args) => commands::play::run(args),
        Command::Replay(args) => commands::replay::run(args),
        Command::Collect(args) => commands::collect::run(args),
        Command::Train(args) => commands::train::run(args),
        Command::Improve(args) => commands::improve::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Merge(args) => commands::merge::run(args),
        Command::Plot(args) => commands::plot::run(args),
        Command::Compare(args) => commands::compare::run(args),
        Command::Serve(args) => commands::serve::run(args),
        Command::Chat(args) => commands::chat::run(args),
        Command::Export(args) => commands::export::run(args),
    }
}

/// An error for people: its message and causes. anyhow captures a backtrace whenever
/// RUST_BACKTRACE is set, which many machines set for every program; it is printed only when
/// the user asks for it with `-v` or TEAMTUNE_BACKTRACE=1.
fn print_error(err: &anyhow::Error) {
    if std::env::var_os("TEAMTUNE_BACKTRACE").is_some_and(|v| v == "1") {
        eprintln!("Error: {err:?}");
        return;
    }
    eprintln!("Error: {err}");
    let causes: Vec<String> = err.chain().skip(1).map(|c| c.to_string()).collect();
    if !causes.is_empty() {
        eprintln!("\nCaused by:");
        for (i, cause) in causes.iter().enumerate() {
            eprintln!("    {i}: {cause}");
        }
    }
}
