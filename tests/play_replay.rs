//! `teamtune play` and `teamtune replay` end to end: play writes records (appending, never
//! losing what was there), replay re-runs them and checks the scores; a tampered record fails.

use crate::util::teamtune;

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn play_writes_records_and_replay_checks_them() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("episodes.jsonl");
    let f = file.to_str().unwrap();
    let shown = ok(&teamtune()
        .args(["play", "--task", "corners", "--seed", "3", "--out", f])
        .output()
        .unwrap());
    assert!(shown.contains("round 1/10"), "{shown}");
    assert!(shown.contains("\"action_name\""));
    assert!(shown.contains("final score 100"));
    let png = dir.path().join("ep.png");
    ok(&teamtune()
        .args([
            "play",
            "--task",
            "random_points",
            "--seed",
            "5",
            "--policy",
            "random",
        ])
        .args(["--out", f, "-q", "--png", png.to_str().unwrap()])
        .output()
        .unwrap());
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"));
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 2);

    let out = ok(&teamtune()
        .args(["replay", f, "--index", "1"])
        .output()
        .unwrap());
    assert!(out.contains("record 1 (random_points seed 5)"), "{out}");
    assert!(out.contains("matches"));
    let out = ok(&teamtune().args(["replay", f, "--show"]).output().unwrap());
    assert_eq!(out.matches("matches").count(), 2, "{out}");

    // a record whose scores were edited does not replay
    let text = std::fs::read_to_string(&file).unwrap();
    let first = text.lines().next().unwrap();
    let mut v: serde_json::Value = serde_json::from_str(first).unwrap();
    v["turns"][0]["score"] = serde_json::json!(99.0);
    std::fs::write(&file, format!("{v}\n")).unwrap();
    let out = teamtune()
        .args(["replay", f, "--index", "0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("MISMATCH"));

    // unknown task and policy are clear errors
    let out = teamtune()
        .args(["play", "--task", "nope"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown task `nope`"));
    let out = teamtune()
        .args(["play", "--task", "corners", "--policy", "genius"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown policy"));
}

#[test]
fn replay_refuses_an_empty_file_and_a_record_of_another_format() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let fails = |path: &std::path::Path| {
        let out = crate::util::teamtune()
            .args(["replay", path.to_str().unwrap()])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = fails(&empty);
    assert!(
        err.contains("empty.jsonl: holds no episode records"),
        "{err}"
    );
    // A record written by a later format version: named, not replayed as if it were ours.
    let good = dir.path().join("good.jsonl");
    crate::util::run_ok(&[
        "collect",
        "--task",
        "single_nav",
        "--episodes",
        "1",
        "--out",
        good.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(&good).unwrap();
    assert!(text.contains(teamtune_formats::EPISODE_FORMAT));
    let other = dir.path().join("other.jsonl");
    std::fs::write(
        &other,
        text.replace(teamtune_formats::EPISODE_FORMAT, "teamtune-episode/9"),
    )
    .unwrap();
    let err = fails(&other);
    assert!(
        err.contains("record 0 is in format `teamtune-episode/9`"),
        "{err}"
    );
}

/// `--png` draws PNG or SVG by its extension; another is refused before the episode is played
/// (it failed after, with the image library's Debug error).
#[test]
fn a_drawing_of_another_format_is_refused_before_playing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("episodes.jsonl");
    let gif = dir.path().join("x.gif");
    let o = teamtune()
        .args([
            "play",
            "--task",
            "single_nav",
            "--policy",
            "expert",
            "--out",
        ])
        .arg(&out)
        .arg("--png")
        .arg(&gif)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "--png {}: give a .png or .svg file",
            gif.display()
        )),
        "{err}"
    );
    assert!(!err.contains("BackendError"), "{err}");
    assert!(
        !out.exists() && !gif.exists(),
        "the episode was played anyway"
    );
    // The same name in upper case is fine.
    let png = dir.path().join("x.PNG");
    let o = teamtune()
        .args([
            "play",
            "--task",
            "single_nav",
            "--policy",
            "expert",
            "--png",
        ])
        .arg(&png)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(png.exists());
}
