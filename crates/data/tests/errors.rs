//! Bad input: every kind is a clear error naming file, line and field, or a counted skip.

mod common;

use std::io::Write;

use common::*;
use teamtune_data::*;

const GOOD: &str = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "score": 60}"#;

/// (line, expected field, words the message must contain)
const BAD: &[(&str, Option<&str>, &str)] = &[
    (r#"{"messages": [{"role": "user""#, None, "not valid JSON"),
    (r#"[1, 2]"#, None, "expected a JSON object"),
    (r#"{"task": "t", "score": 70}"#, Some("messages"), "missing"),
    (
        r#"{"messages": "hello"}"#,
        Some("messages"),
        "expected an array",
    ),
    (
        r#"{"messages": []}"#,
        Some("messages"),
        "at least one assistant",
    ),
    (
        r#"{"messages": ["hello"]}"#,
        Some("messages[0]"),
        "expected an object",
    ),
    (
        r#"{"messages": [{"content": "x"}]}"#,
        Some("messages[0].role"),
        "missing",
    ),
    (
        r#"{"messages": [{"role": 3, "content": "x"}]}"#,
        Some("messages[0].role"),
        "expected a string",
    ),
    (
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}"#,
        Some("messages[1].role"),
        "unknown role \"bot\"",
    ),
    (
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}"#,
        Some("messages[1].content"),
        "missing",
    ),
    (
        r#"{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "b"}]}"#,
        Some("messages[0].content"),
        "got null",
    ),
    (
        r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}, {"role": "assistant", "content": "b"}]}"#,
        Some("messages[0].content"),
        "expected a string, got an array",
    ),
    (
        r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}"#,
        Some("messages"),
        "no assistant turn",
    ),
    (
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "score": "high"}"#,
        Some("score"),
        "expected a number, got string \"high\"",
    ),
    (
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "task": 7}"#,
        Some("task"),
        "expected a string, got number 7",
    ),
    (
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "score": 1e400}"#,
        None,
        "out of range",
    ),
];

fn bad_file(dir: &std::path::Path) -> std::path::PathBuf {
    let p = dir.join("bad.jsonl");
    let mut f = std::fs::File::create(&p).unwrap();
    writeln!(f, "{GOOD}").unwrap();
    for (line, _, _) in BAD {
        writeln!(f, "{line}").unwrap();
        writeln!(f).unwrap(); // blank lines are ignored
    }
    // Invalid UTF-8.
    f.write_all(b"{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}\n")
        .unwrap();
    writeln!(f, "{GOOD}").unwrap();
    p
}

#[test]
fn each_bad_line_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    for (i, (line, field, words)) in BAD.iter().enumerate() {
        let p = temp_jsonl(dir.path(), &format!("one{i}.jsonl"), &[GOOD, line]);
        let err =
            read_conversations(std::slice::from_ref(&p), &ReadOptions::default()).unwrap_err();
        let DataError::Invalid(rec) = &err else {
            panic!("{line}: expected an invalid-record error, got {err}")
        };
        assert_eq!(rec.file, p);
        assert_eq!(rec.line, 2, "{line}");
        assert_eq!(rec.field.as_deref(), *field, "{line}: {rec}");
        assert!(rec.message.contains(words), "{line}: {rec}");
        let shown = err.to_string();
        assert!(shown.contains(&format!("one{i}.jsonl:2")), "{shown}");
        if let Some(f) = field {
            assert!(shown.contains(f), "{shown}");
        }
    }
}

#[test]
fn skip_invalid_counts_and_reports_every_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let p = bad_file(dir.path());
    let err = read_conversations(std::slice::from_ref(&p), &ReadOptions::default()).unwrap_err();
    assert!(err.to_string().contains("bad.jsonl:2"), "{err}");

    let (convs, report) = read_conversations(
        &[p],
        &ReadOptions {
            skip_invalid: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(convs.len(), 2);
    assert_eq!(report.invalid as usize, BAD.len() + 1);
    assert_eq!(report.conversations, 2);
    assert_eq!(report.blank_lines as usize, BAD.len());
    assert_eq!(report.invalid_examples.len(), BAD.len() + 1);
    let utf8 = report.invalid_examples.last().unwrap();
    assert!(utf8.message.contains("UTF-8"), "{utf8}");
    assert_eq!(convs[1].source.line, report.lines);
}

#[test]
fn missing_file_and_empty_folder() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.jsonl");
    let err = read_conversations(&[missing], &ReadOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }), "{err}");
    assert!(err.to_string().contains("nope.jsonl"), "{err}");

    std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
    let err = read_conversations(&[dir.path().to_path_buf()], &ReadOptions::default()).unwrap_err();
    assert!(matches!(err, DataError::NoFiles(_)), "{err}");
}

#[test]
fn truncated_gzip_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    for _ in 0..200 {
        writeln!(enc, "{GOOD}").unwrap();
    }
    let bytes = enc.finish().unwrap();
    let p = dir.path().join("cut.jsonl.gz");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let err = read_conversations(
        &[p],
        &ReadOptions {
            skip_invalid: true,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(err.to_string().contains("cut.jsonl.gz"), "{err}");
}

#[test]
fn folders_and_gzip_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    temp_jsonl(dir.path(), "a.jsonl", &[GOOD, GOOD]);
    std::fs::write(dir.path().join("ignored.txt"), "not jsonl").unwrap();
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    writeln!(enc, "\u{feff}{GOOD}").unwrap(); // a byte order mark is skipped
    writeln!(enc, "{GOOD}").unwrap();
    writeln!(enc, "{GOOD}").unwrap();
    std::fs::write(sub.join("b.jsonl.gz"), enc.finish().unwrap()).unwrap();
    let (convs, report) =
        read_conversations(&[dir.path().to_path_buf()], &ReadOptions::default()).unwrap();
    assert_eq!(convs.len(), 5);
    assert_eq!(report.files.len(), 2);
    assert!(convs[4].source.file.ends_with("sub/b.jsonl.gz"));
    assert_eq!(convs[4].source.line, 3);
}

#[test]
fn extra_fields_are_kept_as_metadata() {
    let line = r#"{"episode": 7, "messages": [{"role": "user", "content": "a", "name": "A", "gone": null}, {"role": "assistant", "content": "b"}], "task": "t", "score": 51, "agents": ["A", "B"], "seed": null}"#;
    let dir = tempfile::tempdir().unwrap();
    let p = temp_jsonl(dir.path(), "m.jsonl", &[line]);
    let (convs, _) = read_conversations(&[p], &ReadOptions::default()).unwrap();
    let c = &convs[0];
    assert_eq!(c.task.as_deref(), Some("t"));
    assert_eq!(c.score, Some(51.0));
    let keys: Vec<&str> = c.metadata.keys().map(String::as_str).collect();
    assert_eq!(keys, ["episode", "agents", "seed"]);
    assert_eq!(
        c.messages[0].extra.len(),
        1,
        "null-valued message fields are dropped"
    );
    assert_eq!(c.messages[0].extra["name"], "A");
}

#[test]
fn template_errors_name_the_conversation() {
    // A template that raises, as stock templates do for unsupported input.
    let t = ChatTemplate::new(
        "{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m.content }}{% endfor %}",
        Default::default(),
    )
    .unwrap();
    let enc = Encoder::new(smollm2_tokenizer(), t, Default::default()).unwrap();
    let mut conv = Conversation::new(vec![
        Message::system("s"),
        Message::user("u"),
        Message::assistant("a"),
    ]);
    conv.source = Source::new("episodes.jsonl", 12);
    let err = enc.encode(&conv).unwrap_err().to_string();
    assert!(err.contains("episodes.jsonl:12"), "{err}");
    assert!(err.contains("System role not supported"), "{err}");

    // A syntax error in the template.
    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }", Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("chat template:"), "{err}");
}

#[test]
fn template_of_another_family_is_refused() {
    let t = ChatTemplate::builtin(BuiltinTemplate::Llama31, Default::default()).unwrap();
    let err = Encoder::new(smollm2_tokenizer(), t, Default::default()).unwrap_err();
    assert!(err.to_string().contains("<|begin_of_text|>"), "{err}");
}

#[test]
fn history_rewriting_template_is_refused_without_generation_blocks() {
    // Drops the content of every assistant turn but the last, like Qwen3 drops old reasoning.
    let t = ChatTemplate::new(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and not loop.last %}...{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
        Default::default(),
    )
    .unwrap();
    let enc = Encoder::new(smollm2_tokenizer(), t, Default::default()).unwrap();
    let conv = Conversation::new(vec![
        Message::user("a"),
        Message::assistant("b"),
        Message::user("c"),
        Message::assistant("d"),
    ]);
    let err = enc.encode(&conv).unwrap_err().to_string();
    assert!(err.contains("not prefix-stable"), "{err}");
}

#[test]
fn reserved_marker_characters_are_refused_with_generation_templates() {
    let t = Config::SmolLm2.generation_template().unwrap();
    let enc = Encoder::new(smollm2_tokenizer(), t, Default::default()).unwrap();
    let conv = Conversation::new(vec![Message::user("a"), Message::assistant("b\u{e000}")]);
    let err = enc.encode(&conv).unwrap_err().to_string();
    assert!(err.contains("U+E000"), "{err}");
}

#[test]
fn render_failures_are_counted_with_skip_invalid() {
    let enc = Config::Llama31.encoder(Default::default());
    // The Llama-3.1 template cannot render the empty prefix before an opening assistant turn.
    let bad = Conversation::new(vec![
        Message::assistant("first"),
        Message::user("u"),
        Message::assistant("b"),
    ])
    .with_score(90.0);
    let good =
        Conversation::new(vec![Message::user("u"), Message::assistant("b")]).with_score(90.0);
    let opts = PrepareOptions {
        read: ReadOptions {
            skip_invalid: true,
            ..Default::default()
        },
        split: SplitOptions {
            validation_fraction: 0.0,
            ..Default::default()
        },
        ..Default::default()
    };
    let p = prepare_conversations(vec![bad.clone(), good.clone()], &enc, &opts).unwrap();
    assert_eq!(p.train.len(), 1);
    assert_eq!(p.report.totals().render_failed, 1);
    assert_eq!(p.report.render_errors.len(), 1);
    let strict = PrepareOptions {
        read: ReadOptions {
            skip_invalid: false,
            ..Default::default()
        },
        ..opts
    };
    assert!(prepare_conversations(vec![bad, good], &enc, &strict).is_err());
}
