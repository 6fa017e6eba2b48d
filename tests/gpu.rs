//! The GPU developer commands run on the CPU too (device = reference = cpu), so their logic is
//! exercised without a GPU: `gpu-check` on the tiny model and `gpu-bench --config tiny`.

use crate::util::{fixtures, run_ok};

fn tiny() -> String {
    fixtures()
        .join("tiny-llama31")
        .to_string_lossy()
        .into_owned()
}

#[test]
fn gpu_check_passes_cpu_against_cpu() {
    let out = run_ok(&[
        "gpu-check",
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
        "gpu-bench",
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
    let out = crate::util::teamtune()
        .args(["gpu-bench", "--device", "cpu", "--config", "70b"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected 8b or tiny"));
}
