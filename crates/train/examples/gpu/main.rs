//! The GPU developer harness: parity checks and a benchmark for a `--features cuda` build. Not
//! part of the `teamtune` binary; `scripts/gpu/build-cuda.sh` builds it next to `teamtune` and
//! packs it as `bin/teamtune-gpu`, and `scripts/gpu/check.sh` and `bench.sh` run it:
//!
//! ```sh
//! cargo run --release -p teamtune-train --example gpu -- check --device cpu --reference cpu \
//!     --tiny crates/llama/tests/fixtures/tiny-llama31 --skip-model
//! cargo run --release -p teamtune-train --example gpu --features cuda -- bench --device cuda
//! ```
//!
//! - `check`: the device under test against a reference device (CUDA against the CPU):
//!   logits of the tiny model (inference and training forwards), LoRA gradients through the
//!   training step (plain and checkpointed), the default model's greedy continuation, and a
//!   few bf16 training steps whose loss must track f32 (frozen base bf16, LoRA factors and
//!   optimizer moments f32). `--device cpu --reference cpu` exercises every check on a machine
//!   without a GPU (the tests below do).
//! - `bench`: random weights of LLaMA-3.1-8B's shape made on the device (no download):
//!   LoRA training tokens/s and peak memory per sequence length, with and without gradient
//!   checkpointing; prefill and decode tokens/s per batch size; a markdown table.
//!   `--config tiny` runs the same code on a tiny shape (a CPU smoke test).
//!
//! `check.rs` and `bench.rs` hold the two commands, `common.rs` what both use.

use std::io::Write as IoWrite;

use clap::{Parser, Subcommand};

mod bench;
mod check;
mod common;

use bench::{run_bench, BenchArgs};
use check::{run_check, CheckArgs};

#[derive(Parser)]
#[command(
    name = "teamtune-gpu",
    about = "GPU developer checks and benchmark for teamtune (scripts/gpu/check.sh, bench.sh)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Device vs reference parity (scripts/gpu/check.sh).
    Check(CheckArgs),
    /// LLaMA-3.1-8B-shaped random weights: training and inference speed (scripts/gpu/bench.sh).
    Bench(BenchArgs),
}

fn main() -> anyhow::Result<()> {
    // candle's idle workers park after a short spin, as in the `teamtune` binary.
    teamtune_llama::share_cores_with_candle();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    run(Cli::parse(), &mut std::io::stdout())
}

/// Runs a parsed command, its results (PASS/FAIL lines, the table) written to `out`.
fn run(cli: Cli, out: &mut dyn IoWrite) -> anyhow::Result<()> {
    match cli.command {
        Command::Check(args) => run_check(args, out),
        Command::Bench(args) => run_bench(args, out),
    }
}

/// The harness on the CPU (device = reference = cpu), so its logic is exercised without a GPU:
/// `check` on the tiny model and `bench --config tiny`. (These were `crates/cli/tests/gpu.rs`
/// when the harness was the hidden `teamtune gpu-check`/`gpu-bench`.)
#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> String {
        teamtune_testkit::tiny_model_dir()
            .to_string_lossy()
            .into_owned()
    }

    /// Parses `teamtune-gpu ARGS...` and runs it; its output and result.
    fn run_args(args: &[&str]) -> (String, anyhow::Result<()>) {
        let cli = Cli::try_parse_from(std::iter::once("teamtune-gpu").chain(args.iter().copied()))
            .unwrap();
        let mut out = Vec::new();
        let result = run(cli, &mut out);
        (String::from_utf8(out).unwrap(), result)
    }

    /// Runs `teamtune-gpu ARGS...`, asserts success and returns its output.
    fn run_ok(args: &[&str]) -> String {
        let (out, result) = run_args(args);
        if let Err(e) = result {
            panic!("{e:#}\n{out}");
        }
        out
    }

    #[test]
    fn gpu_check_passes_cpu_against_cpu() {
        let out = run_ok(&[
            "check",
            "--device",
            "cpu",
            "--reference",
            "cpu",
            "--tiny",
            &tiny(),
            "--skip-model",
        ]);
        for check in [
            "tiny-logits-f32-inference",
            "tiny-logits-f32-training",
            "tiny-kv-cache-f32",
            "tiny-lora-grads-plain",
            "tiny-lora-grads-checkpointed",
            "train-bf16-tracks-f32",
            "train-dtypes",
        ] {
            assert!(
                out.contains(&format!("PASS {check}:")),
                "{check} missing in:\n{out}"
            );
        }
        assert!(!out.contains("FAIL"), "{out}");
        assert!(out.contains("all checks passed"), "{out}");
    }

    #[test]
    fn gpu_bench_tiny_writes_a_table() {
        let dir = tempfile::tempdir().unwrap();
        let table = dir.path().join("bench.md");
        let out = run_ok(&[
            "bench",
            "--device",
            "cpu",
            "--config",
            "tiny",
            "--seq",
            "32",
            "--batch",
            "1,2",
            "--prefill-len",
            "16",
            "--decode-tokens",
            "3",
            "--steps",
            "1",
            "--out",
            table.to_str().unwrap(),
        ]);
        let md = std::fs::read_to_string(&table).unwrap();
        assert_eq!(md, out);
        // Two training rows (with and without checkpointing) and two batch sizes, all measured.
        assert!(md.contains("| 32 | no | "), "{md}");
        assert!(md.contains("| 32 | yes | "), "{md}");
        assert!(md.contains("| 1 | ") && md.contains("| 2 | "), "{md}");
        assert!(!md.contains("error") && !md.contains("OOM"), "{md}");
    }

    #[test]
    fn gpu_bench_rejects_an_unknown_shape() {
        let (_, result) = run_args(&["bench", "--device", "cpu", "--config", "70b"]);
        let e = result.unwrap_err();
        assert!(format!("{e:#}").contains("expected 8b or tiny"), "{e:#}");
    }
}
