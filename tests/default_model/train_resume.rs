//! `kill -9` in the middle of `teamtune train`, then `--resume`: the loss curve and the adapter
//! come out exactly as those of a run that was never interrupted (CPU, same seed, LoRA dropout
//! on: its masks are a function of seed and step).

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::util::{collect_conversations, fetch_default_model, run_ok, teamtune};

fn train_args<'a>(data: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        data,
        "--out",
        out,
        "--max-steps",
        "4",
        "--batch-size",
        "1",
        "--micro-batch",
        "1",
        "--checkpoint-every",
        "2",
        "--eval-every",
        "2",
        "--lr",
        "1e-3",
        "--validation-fraction",
        "0.5",
        "--max-len",
        "400",
    ]
}

/// (step, loss, lr, grad_norm) of a train record.
type TrainPoint = (u64, f64, f64, f64);

/// The train records and the (step, eval_loss) evaluations of a run: what must repeat exactly
/// (timings and memory may not).
fn curve(run: &Path) -> (Vec<TrainPoint>, Vec<(u64, f64)>) {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train = records
        .iter()
        .filter(|r| r.get("loss").is_some())
        .map(|r| {
            (
                r["step"].as_u64().unwrap(),
                r["loss"].as_f64().unwrap(),
                r["lr"].as_f64().unwrap(),
                r["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect();
    let eval = records
        .iter()
        .filter_map(|r| Some((r["step"].as_u64()?, r.get("eval_loss")?.as_f64()?)))
        .collect();
    (train, eval)
}

#[test]
fn kill_9_then_resume_continues_the_loss_curve_exactly() {
    fetch_default_model();
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let data = collect_conversations(dir.path());
    let (straight, killed) = (p("straight"), p("killed"));
    run_ok(&train_args(&data, &straight));

    let mut child = teamtune()
        .args(train_args(&data, &killed))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first_checkpoint = Path::new(&killed).join("checkpoints/step-000002");
    let started = Instant::now();
    while !first_checkpoint.is_dir() {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "no checkpoint after 10 minutes"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "training ended before it could be killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(9), "the run was killed, not finished");
    let (partial, _) = curve(Path::new(&killed));
    assert!(partial.len() < 4, "killed after {} steps", partial.len());

    let mut resume = train_args(&data, &killed);
    resume.extend(["--resume", &killed]);
    run_ok(&resume);

    let (train_a, eval_a) = curve(Path::new(&straight));
    let (train_b, eval_b) = curve(Path::new(&killed));
    assert_eq!(train_a.len(), 4);
    assert_eq!(eval_a.iter().map(|e| e.0).collect::<Vec<_>>(), [0, 2, 4]);
    // A short run lowers the validation loss below the base model's (step 0, adapter off).
    assert!(
        eval_a[2].1 < eval_a[0].1,
        "validation loss {} -> {}",
        eval_a[0].1,
        eval_a[2].1
    );
    assert_eq!(train_b, train_a);
    assert_eq!(eval_b, eval_a);
    let weights = |run: &str| {
        std::fs::read(Path::new(run).join("adapter/adapter_model.safetensors")).unwrap()
    };
    assert!(weights(&killed) == weights(&straight), "adapters differ");
    // The run folder records the recipe it used.
    let recipe = std::fs::read_to_string(Path::new(&killed).join("train.toml")).unwrap();
    assert!(recipe.contains("dropout = 0.2"), "{recipe}");
}
