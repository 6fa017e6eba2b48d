//! `teamtune train --init-adapter` and `teamtune improve` end to end on the tiny random Llama
//! (the demo's test model) with tiny numbers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::{collect_conversations, run_ok as teamtune, teamtune as command, tiny_model};

/// Trains a small adapter into `dir/name` on `data`; returns the run folder.
fn train(model: &str, data: &str, dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let out = dir.join(name);
    let mut args = vec![
        "train",
        "--model",
        model,
        "--data",
        data,
        "--out",
        out.to_str().unwrap(),
        "--lr",
        "1e-2",
        "--batch-size",
        "1",
        "--validation-fraction",
        "0.5",
        "--min-score",
        "0",
        "--max-len",
        "4096",
        "--seed",
        "3",
    ];
    args.extend_from_slice(extra);
    teamtune(&args);
    out
}

fn eval_losses(run: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|m| Some((m["step"].as_u64()?, m["eval_loss"].as_f64()?)))
        .collect()
}

fn adapter_tensors(run: &Path) -> BTreeMap<String, Vec<f32>> {
    let path = run.join("adapter/adapter_model.safetensors");
    candle_core::safetensors::load(&path, &candle_core::Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn train_from_an_adapter_keeps_its_weights_at_zero_steps_and_starts_from_its_loss() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let model = model.to_str().unwrap();
    let data = collect_conversations(dir.path());
    let first = train(model, &data, dir.path(), "first", &["--max-steps", "3"]);
    let first_losses = eval_losses(&first);
    let (base, trained) = (first_losses[0].1, first_losses.last().unwrap().1);
    assert_ne!(base, trained, "{first_losses:?}");
    let init = first.join("adapter");
    let init = init.to_str().unwrap();

    // Zero steps from the adapter: the same weights and config come out.
    let zero = train(
        model,
        &data,
        dir.path(),
        "zero",
        &["--init-adapter", init, "--max-steps", "0"],
    );
    assert_eq!(adapter_tensors(&zero), adapter_tensors(&first));
    let config = |run: &Path| -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(run.join("adapter/adapter_config.json")).unwrap(),
        )
        .unwrap()
    };
    assert_eq!(config(&zero), config(&first));

    // Steps from the adapter: step 0 is the adapter's own validation loss (the same split, the
    // same validation conversations as its last evaluation), not the base model's, and the
    // weights move on from there.
    let more = train(
        model,
        &data,
        dir.path(),
        "more",
        &["--init-adapter", init, "--max-steps", "2"],
    );
    let losses = eval_losses(&more);
    assert_eq!(losses[0].0, 0);
    assert!(
        (losses[0].1 - trained).abs() <= 1e-6 * trained.abs(),
        "step 0 {} vs the adapter's {trained} (base {base})",
        losses[0].1
    );
    // The comparison table says whose loss step 0 is.
    let figure = dir.path().join("compare");
    let table = teamtune(&[
        "compare",
        first.to_str().unwrap(),
        more.to_str().unwrap(),
        "--out",
        figure.to_str().unwrap(),
    ]);
    assert!(
        table.contains("more: trained an existing adapter further")
            && !table.contains("first: trained"),
        "{table}"
    );
    let (a, b) = (adapter_tensors(&first), adapter_tensors(&more));
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a.iter().all(|(k, v)| b[k] != *v), "every factor trains");

    // A flag that asks for another shape is refused before any work, naming the flag and the
    // adapter's value; so is a folder that is not an adapter.
    for (extra, said) in [
        (
            vec!["--init-adapter", init, "--rank", "4"],
            "--rank 4 differs from the adapter's 8",
        ),
        (
            vec!["--init-adapter", init, "--alpha", "32"],
            "--alpha 32 differs from the adapter's 16",
        ),
        (
            vec!["--init-adapter", init, "--targets", "q_proj,v_proj"],
            "--targets q_proj,v_proj differs from the adapter's",
        ),
        (vec!["--init-adapter", &data], "not a LoRA adapter folder"),
    ] {
        let refused = dir.path().join("refused");
        let out = command()
            .args(["train", "--model", model, "--data", &data])
            .args(["--out", refused.to_str().unwrap()])
            .args(&extra)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains(said), "{said}: {err}");
        assert!(!refused.exists(), "{extra:?} did work before failing");
    }
    // The same shape given as flags is no conflict.
    train(
        model,
        &data,
        dir.path(),
        "same",
        &["--init-adapter", init, "--max-steps", "0", "--rank", "8"],
    );
}

/// The tiny test's improve arguments: two single-agent tasks, two episodes each, two steps.
fn improve_args<'a>(
    model: &'a str,
    adapter: &'a str,
    out: &'a str,
    rounds: &'a str,
    min_score: &'a str,
) -> Vec<&'a str> {
    vec![
        "improve",
        "--model",
        model,
        "--adapter",
        adapter,
        "--out",
        out,
        "--rounds",
        rounds,
        "--min-score",
        min_score,
        "--task",
        "single_nav,single_pick",
        "--episodes",
        "2",
        "--eval-episodes",
        "1",
        "--steps",
        "2",
        "--max-len",
        "4096",
        "--max-new-tokens",
        "12",
        "--parallel",
        "4",
        "--seed",
        "5",
    ]
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// improve.json without its wall times (the only thing two equal runs may differ in).
fn without_wall_times(mut v: Value) -> Value {
    match &mut v {
        Value::Object(map) => {
            map.remove("wall_seconds");
            for x in map.values_mut() {
                *x = without_wall_times(x.take());
            }
        }
        Value::Array(items) => {
            for x in items.iter_mut() {
                *x = without_wall_times(x.take());
            }
        }
        _ => {}
    }
    v
}

fn records(path: &Path) -> Vec<teamtune_gridworld::EpisodeRecord> {
    if path.exists() {
        teamtune_gridworld::read_records(path).unwrap()
    } else {
        Vec::new()
    }
}

/// (task, seed) of every training conversation in a file.
fn conversation_episodes(path: &Path) -> std::collections::BTreeSet<(String, u64)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (
                v["task"].as_str().unwrap().to_owned(),
                v["seed"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// A round's records agree with improve.json and with its training data: the kept records
/// score at least `min`, the pruned ones less, and the kept conversations are those of the
/// kept episodes, no others.
fn check_round(round_dir: &Path, round: &Value, min: f64, episodes: u64) {
    let kept = records(&round_dir.join("model/kept.jsonl"));
    let pruned = records(&round_dir.join("model/pruned.jsonl"));
    assert!(kept.iter().all(|r| r.final_score >= min));
    assert!(pruned.iter().all(|r| r.final_score < min));
    let seed = round["play_seed"].as_u64().unwrap();
    for t in round["tasks"].as_array().unwrap() {
        let task = t["task"].as_str().unwrap();
        let of =
            |v: &[teamtune_gridworld::EpisodeRecord]| v.iter().filter(|r| r.task == task).count();
        assert_eq!(t["played"], episodes, "{t}");
        assert_eq!(t["model_kept"], of(&kept) as u64, "{t}");
        assert_eq!(of(&kept) + of(&pruned), episodes as usize, "{t}");
        assert_eq!(t["expert_fallback"], of(&kept) == 0, "{t}");
    }
    // Fresh seeds: the round's, never an evaluation seed.
    assert!(kept
        .iter()
        .chain(&pruned)
        .all(|r| r.seed >= seed && r.seed < seed + episodes));
    let kept_episodes: std::collections::BTreeSet<_> =
        kept.iter().map(|r| (r.task.clone(), r.seed)).collect();
    let conversations = round_dir.join("model/conversations.jsonl");
    if conversations.exists() {
        assert_eq!(conversation_episodes(&conversations), kept_episodes);
    } else {
        assert!(kept_episodes.is_empty());
    }
    // The experts played exactly the tasks the model kept nothing of, on the same seeds.
    let expert = records(&round_dir.join("expert/kept.jsonl"));
    let expert_pruned = records(&round_dir.join("expert/pruned.jsonl"));
    for r in expert.iter().chain(&expert_pruned) {
        let t = round["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["task"] == r.task.as_str())
            .unwrap();
        assert_eq!(t["expert_fallback"], true, "{}", r.task);
        assert!(r.seed >= seed && r.seed < seed + episodes);
    }
    assert!(expert.iter().all(|r| r.final_score >= min));
}

/// The tiny model in `dir`, the experts' conversations collected there, and an adapter trained
/// one step on them: what an improve run starts from.
fn start_adapter(dir: &Path) -> (String, String, PathBuf) {
    let model = tiny_model(dir);
    let model = model.to_str().unwrap().to_owned();
    let data = collect_conversations(dir);
    let start = train(&model, &data, dir, "start", &["--max-steps", "1"]);
    (model, data, start.join("adapter"))
}

#[test]
fn improve_runs_rounds_keeps_what_scores_falls_back_to_experts_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (model, data, adapter) = start_adapter(dir.path());
    let (model, adapter) = (model.as_str(), adapter.to_str().unwrap());

    // Two rounds straight. The tiny random model fails these tasks, so the experts' episodes
    // stand in, and the summary says so per task.
    let a = dir.path().join("a");
    let said = teamtune(&improve_args(
        model,
        adapter,
        a.to_str().unwrap(),
        "2",
        "50",
    ));
    let log = read_json(&a.join("improve.json"));
    assert_eq!(
        log["tasks"],
        serde_json::json!(["single_nav", "single_pick"])
    );
    let rounds = log["rounds"].as_array().unwrap();
    assert_eq!(rounds.len(), 2);
    for (k, round) in rounds.iter().enumerate() {
        let r = k + 1;
        assert_eq!(round["round"], r);
        let rd = a.join(format!("round-{r}"));
        for f in [
            "run/adapter/adapter_model.safetensors",
            "run/metrics.jsonl",
            "eval/eval.json",
        ] {
            assert!(rd.join(f).is_file(), "{} missing", rd.join(f).display());
        }
        check_round(&rd, round, 50.0, 2);
        assert!(round["conversations"].as_u64().unwrap() > 0);
        assert_eq!(round["steps"], 2);
    }
    let fell_back: Vec<&Value> = rounds
        .iter()
        .flat_map(|r| r["tasks"].as_array().unwrap())
        .filter(|t| t["expert_fallback"] == true)
        .collect();
    assert!(!fell_back.is_empty(), "{log}");
    assert!(fell_back
        .iter()
        .all(|t| t["expert_kept"].as_u64().unwrap() > 0));
    // Round 2 trained on from round 1's adapter.
    let train2 = std::fs::read_to_string(a.join("report.md")).unwrap();
    assert!(
        train2.contains(&format!(
            "--init-adapter {}",
            a.join("round-1/run/adapter").display()
        )),
        "{train2}"
    );
    // The table: round 0 (the adapter given) and one row per round, a column per task.
    let table: Vec<Vec<&str>> = said
        .lines()
        .skip_while(|l| !l.starts_with("round "))
        .take(4)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        table[0],
        ["round", "single_nav", "single_pick", "mean"],
        "{said}"
    );
    assert_eq!(table[1][..2], ["0", "(start)"], "{said}");
    assert_eq!(table[3][0], "2", "{said}");
    let eval2 = read_json(&a.join("round-2/eval/eval.json"));
    let mean2 = eval2["tasks"][1]["mean_score"].as_f64().unwrap();
    assert_eq!(table[3][2], format!("{mean2:.1}"), "{said}");
    assert!(
        train2.contains("| round | single_nav | single_pick | mean |"),
        "{train2}"
    );
    assert!(train2.contains("so the experts'"), "{train2}");
    // Evaluations play the fixed seeds every round.
    let eval_seeds = |d: &Path| -> Vec<u64> {
        records(&d.join("eval/episodes.jsonl"))
            .iter()
            .map(|r| r.seed)
            .collect()
    };
    assert_eq!(eval_seeds(&a.join("round-0")), [5, 5]);
    assert_eq!(eval_seeds(&a.join("round-2")), [5, 5]);

    // Again with more rounds done than asked: nothing replayed, the record unchanged.
    let before = std::fs::read(a.join("improve.json")).unwrap();
    teamtune(&improve_args(
        model,
        adapter,
        a.to_str().unwrap(),
        "2",
        "50",
    ));
    assert_eq!(std::fs::read(a.join("improve.json")).unwrap(), before);

    // Stopped after round 1, with a half-done round 2 left behind: the second run keeps round
    // 1 as it was, redoes round 2 from scratch and gives the straight run's record (the same
    // seed, the same tables).
    let c = dir.path().join("c");
    let c_str = c.to_str().unwrap();
    teamtune(&improve_args(model, adapter, c_str, "1", "50"));
    let round1 = c.join("round-1/eval/eval.json");
    let round1_time = round1.metadata().unwrap().modified().unwrap();
    std::fs::create_dir_all(c.join("round-2/model")).unwrap();
    std::fs::write(c.join("round-2/model/kept.jsonl"), "half-done\n").unwrap();
    std::fs::write(c.join("notes.txt"), "mine\n").unwrap();
    let out = output(&improve_args(model, adapter, c_str, "2", "50"));
    assert!(out.contains("continuing from round 2"), "{out}");
    assert!(!out.contains("round 1/2"), "round 1 was replayed: {out}");
    assert_eq!(round1.metadata().unwrap().modified().unwrap(), round1_time);
    assert_eq!(
        std::fs::read_to_string(c.join("notes.txt")).unwrap(),
        "mine\n"
    );
    assert_eq!(
        without_wall_times(read_json(&c.join("improve.json"))),
        without_wall_times(log.clone())
    );

    // Other settings on the same folder are refused by name before any work.
    let mut other = improve_args(model, adapter, c_str, "3", "50");
    other.extend(["--temperature", "0.9"]);
    let refused = command().args(&other).output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{err}");
    assert!(err.contains("--temperature 0.7, not 0.9"), "{err}");
    assert!(!c.join("round-3").exists());
    // A weight on decision tokens is a setting of its own (a run without one has weight 1).
    let mut other = improve_args(model, adapter, c_str, "3", "50");
    other.extend(["--decision-weight", "3"]);
    let refused = command().args(&other).output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("--decision-weight"), "{err}");
    assert!(!c.join("round-3").exists());
    let mut other = improve_args(model, adapter, c_str, "3", "50");
    other.extend(["--decision-weight", "0"]);
    let err = String::from_utf8_lossy(&command().args(&other).output().unwrap().stderr).to_string();
    assert!(
        err.contains("--decision-weight must be a number above 0"),
        "{err}"
    );
    // A folder in use by a live process (this test's own) is refused, naming the process.
    std::fs::write(c.join(".lock"), format!("{}\n", std::process::id())).unwrap();
    let refused = command()
        .args(improve_args(model, adapter, c_str, "3", "50"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("in use by process"), "{err}");
    assert!(!c.join("round-3").exists());
    std::fs::remove_file(c.join(".lock")).unwrap();
    // So is an adapter that is not one, before --out is made.
    let none = dir.path().join("none");
    let refused = command()
        .args(improve_args(
            model,
            &data,
            none.to_str().unwrap(),
            "1",
            "50",
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("--adapter") && err.contains("not a LoRA adapter"),
        "{err}"
    );
    assert!(!none.exists());
}

/// Runs `teamtune args...`, asserts success and returns stderr (the progress lines).
fn output(args: &[&str]) -> String {
    let out = crate::util::output_ok(command().args(args));
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn improve_keeps_the_model_s_own_episodes_when_they_score() {
    let dir = tempfile::tempdir().unwrap();
    let (model, _, adapter) = start_adapter(dir.path());
    let model = model.as_str();
    // At --min-score 0 every episode the model plays is kept: no expert plays.
    let k = dir.path().join("k");
    teamtune(&improve_args(
        model,
        adapter.to_str().unwrap(),
        k.to_str().unwrap(),
        "1",
        "0",
    ));
    let log = read_json(&k.join("improve.json"));
    let round = &log["rounds"][0];
    check_round(&k.join("round-1"), round, 0.0, 2);
    for t in round["tasks"].as_array().unwrap() {
        assert_eq!(t["model_kept"], 2, "{t}");
        assert_eq!(t["expert_fallback"], false, "{t}");
    }
    assert!(!k.join("round-1/expert").exists());
    let report = std::fs::read_to_string(k.join("report.md")).unwrap();
    assert!(
        report.contains("single_nav: the model kept 2 of 2 episodes"),
        "{report}"
    );
    assert!(!report.contains("--policy expert"), "{report}");
    // The report names the run's own command, every setting spelled out.
    assert!(
        report.contains(&format!(
            "teamtune improve --adapter {} --out {}",
            adapter.display(),
            k.display()
        )) && report.contains("--rounds 1 --min-score 0 --temperature 0.7 --episodes 2"),
        "{report}"
    );
}

/// Conversations longer than `--max-len` are cut at a turn (or dropped when their first turn
/// alone is longer), and the run says how many at its start and which flag changes it.
#[test]
fn train_warns_how_many_conversations_the_length_limit_cut_and_names_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let data = collect_conversations(dir.path());
    let out = dir.path().join("run");
    let run = command()
        .args(["train", "--model", model.to_str().unwrap(), "--data", &data])
        .args([
            "--out",
            out.to_str().unwrap(),
            "--max-steps",
            "1",
            "--batch-size",
            "1",
        ])
        .args([
            "--min-score",
            "0",
            "--validation-fraction",
            "0",
            "--max-len",
            "1200",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    let warning = err
        .lines()
        .find(|l| l.contains("were longer than 1200 tokens"))
        .unwrap_or_else(|| panic!("no length warning: {err}"));
    assert!(warning.contains("--max-len"), "{warning}");
    let cut: usize = warning
        .split(" were cut")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of cut conversations: {warning}"));
    assert!(cut > 0, "{warning}");
}
