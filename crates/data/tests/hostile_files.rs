//! Files a careless hand or an attacker gives the reader: an endless line is an error naming the
//! file and line, not a full memory; a symlink loop is read once; random bytes and random JSON
//! never panic and always end.

use std::io::Write;
use std::path::PathBuf;

use proptest::prelude::*;
use teamtune_data::{discover, read_conversations, ConversationReader, ReadOptions};

#[test]
fn a_line_past_the_limit_is_an_error_naming_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("long.jsonl");
    let ok = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#;
    std::fs::write(&p, format!("{ok}\n{}\n{ok}\n", "x".repeat(5000))).unwrap();
    let options = ReadOptions {
        max_line_bytes: 1000,
        ..Default::default()
    };
    let err = read_conversations(std::slice::from_ref(&p), &options)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("long.jsonl") && err.contains("line 2 is longer than"),
        "{err}"
    );
    // A line exactly at the limit is read.
    let exact = dir.path().join("exact.jsonl");
    std::fs::write(&exact, format!("{ok}\n")).unwrap();
    let options = ReadOptions {
        max_line_bytes: ok.len(),
        ..Default::default()
    };
    assert_eq!(read_conversations(&[exact], &options).unwrap().0.len(), 1);
}

#[cfg(unix)]
#[test]
fn an_endless_stream_stops_at_the_limit() {
    let options = ReadOptions {
        max_line_bytes: 1 << 20,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let err = read_conversations(&[PathBuf::from("/dev/zero")], &options)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("/dev/zero") && err.contains("line 1 is longer than 1 MiB"),
        "{err}"
    );
    assert!(started.elapsed().as_secs() < 10);
}

#[cfg(unix)]
#[test]
fn a_symlink_loop_is_read_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.jsonl"), "").unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("sub").join("b.jsonl"), "").unwrap();
    std::os::unix::fs::symlink(dir.path(), dir.path().join("sub").join("loop")).unwrap();
    std::os::unix::fs::symlink(dir.path().join("sub"), dir.path().join("again")).unwrap();
    let files = discover(&[dir.path().to_path_buf()]).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["a.jsonl", "b.jsonl"], "{files:?}");
}

fn read_all(bytes: &[u8], skip_invalid: bool) {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    let options = ReadOptions {
        skip_invalid,
        max_line_bytes: 4096,
    };
    let reader = ConversationReader::open(&[f.path().to_path_buf()], options).unwrap();
    // Ends (an error ends it too), and never panics.
    let n = reader.take(10_000).count();
    assert!(n <= bytes.len() + 1);
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::Bool),
        any::<i64>().prop_map(|n| serde_json::json!(n)),
        "[a-z\\\\\"<|>\u{e000}]{0,12}".prop_map(serde_json::Value::String),
        Just(serde_json::json!("user")),
        Just(serde_json::json!("assistant")),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("messages".to_string()),
                        Just("role".to_string()),
                        Just("content".to_string()),
                        Just("score".to_string()),
                        "[a-z]{1,6}"
                    ],
                    inner
                ),
                0..6
            )
            .prop_map(|kv| serde_json::Value::Object(kv.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048), skip in any::<bool>()) {
        read_all(&bytes, skip);
    }

    #[test]
    fn random_json_lines_never_panic(lines in prop::collection::vec(json_value(), 0..8), skip in any::<bool>()) {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        read_all(text.as_bytes(), skip);
    }
}
