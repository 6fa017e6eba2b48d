//! Template helpers against Jinja2 as transformers configures it (reference-templates.json, made
//! by scripts/make-data-reference.sh), and the fixed-date strftime_now.

mod common;

use common::*;
use teamtune_data::*;

fn options(reference: &serde_json::Value, kwargs: &serde_json::Value) -> TemplateOptions {
    let tok = |k: &str| reference["special_tokens"][k].as_str().map(str::to_string);
    TemplateOptions {
        bos_token: tok("bos_token"),
        eos_token: tok("eos_token"),
        unk_token: tok("unk_token"),
        pad_token: tok("pad_token"),
        extra: kwargs.as_object().cloned().unwrap_or_default(),
        ..Default::default()
    }
}

#[test]
fn helpers_render_like_transformers() {
    let reference: serde_json::Value =
        serde_json::from_str(&read_fixture("reference-templates.json")).unwrap();
    let mut failures = Vec::new();
    for case in reference["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let template = ChatTemplate::new(
            case["template"].as_str().unwrap(),
            options(&reference, &case["kwargs"]),
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let messages: Vec<Message> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                let mut m = m.as_object().unwrap().clone();
                let role = Role::parse(m.shift_remove("role").unwrap().as_str().unwrap()).unwrap();
                let content = m
                    .shift_remove("content")
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string();
                Message {
                    role,
                    content,
                    extra: m,
                }
            })
            .collect();
        let got = template.render(&messages, case["add_generation_prompt"].as_bool().unwrap());
        match (&got, case.get("output"), case.get("error")) {
            (Ok(text), Some(want), _) if text == want.as_str().unwrap() => {}
            (Err(e), None, Some(want)) if e.to_string().contains(want.as_str().unwrap()) => {}
            _ => failures.push(format!(
                "{name} (generation prompt {}):\n  got  {:?}\n  want {:?}",
                case["add_generation_prompt"],
                got.map_err(|e| e.to_string()),
                case.get("output").or(case.get("error")).unwrap()
            )),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn strftime_now_uses_the_fixed_date() {
    // The Llama-3.2 template's date logic.
    let src = "{%- if not date_string is defined %}{%- if strftime_now is defined %}{%- set date_string = strftime_now(\"%d %b %Y\") %}{%- else %}{%- set date_string = \"26 Jul 2024\" %}{%- endif %}{%- endif %}Today Date: {{ date_string }}";
    let t = ChatTemplate::new(src, Default::default()).unwrap();
    assert_eq!(
        t.render(&[Message::user("x")], false).unwrap(),
        "Today Date: 26 Jul 2024"
    );
    let t = ChatTemplate::new(
        src,
        TemplateOptions {
            date: FixedDate::parse("2025-01-05").unwrap(),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        t.render(&[Message::user("x")], false).unwrap(),
        "Today Date: 05 Jan 2025"
    );
}

#[test]
fn generation_blocks_on_their_own_lines_match_transformers() {
    let reference: serde_json::Value =
        serde_json::from_str(&read_fixture("reference-templates.json")).unwrap();
    let g = &reference["generation"];
    let template = ChatTemplate::new(
        g["template"].as_str().unwrap(),
        options(&reference, &serde_json::Value::Null),
    )
    .unwrap();
    assert!(template.has_generation_markers());
    let messages: Vec<Message> = g["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = Role::parse(m["role"].as_str().unwrap()).unwrap();
            let mut msg = Message::new(role, m["content"].as_str().unwrap());
            if let Some(n) = m.get("name") {
                msg.extra.insert("name".into(), n.clone());
            }
            msg
        })
        .collect();
    let encoder = Encoder::new(smollm2_tokenizer(), template, Default::default()).unwrap();
    let e = encoder
        .encode_messages(&messages, &Source::memory(0))
        .unwrap();
    assert_eq!(e.text, g["text"].as_str().unwrap());
    assert_eq!(e.input_ids, as_u32s(&g["input_ids"]));
    assert_eq!(e.loss_mask, as_u8s(&g["assistant_mask"]));
}

#[test]
fn for_model_prefers_the_model_template_then_a_matching_builtin() {
    let msgs = [Message::user("hi")];
    let opts = || TemplateOptions {
        bos_token: Some("<s>".into()),
        eos_token: Some("</s>".into()),
        ..Default::default()
    };
    let own = "{% for m in messages %}[{{ m.content }}]{% endfor %}";
    let (t, which) = ChatTemplate::for_model(Some(own), opts(), |_| false).unwrap();
    assert_eq!(which, None);
    assert_eq!(t.render(&msgs, false).unwrap(), "[hi]");

    let llama3 = ["<|start_header_id|>", "<|eot_id|>"];
    let (t, which) = ChatTemplate::for_model(None, opts(), |tok| llama3.contains(&tok)).unwrap();
    assert_eq!(which, Some(BuiltinTemplate::Llama31));
    // The built-in writes its own BOS, not the model's name for some other token.
    assert!(t
        .render(&msgs, true)
        .unwrap()
        .starts_with("<|begin_of_text|>"));

    let err = ChatTemplate::for_model(None, opts(), |_| false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no chat template"), "{err}");
}

#[test]
fn llama31_renders_tools_calls_and_results_as_transformers() {
    // scripts/make_tools_reference.py
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama31_tools.json");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let messages: Vec<teamtune_data::Message> =
        serde_json::from_value(reference["messages"].clone()).unwrap();
    let options = TemplateOptions {
        bos_token: Some("<|begin_of_text|>".into()),
        eos_token: Some("<|eot_id|>".into()),
        ..Default::default()
    };
    let t = ChatTemplate::builtin(BuiltinTemplate::Llama31, options).unwrap();
    assert!(t.renders_tools());
    let text = t
        .render_with_tools(&messages, Some(&reference["tools"]), true)
        .unwrap();
    assert_eq!(text, reference["text"].as_str().unwrap());
    // Without tools: as before, the plain render.
    assert_eq!(
        t.render_with_tools(&messages[..2], None, true).unwrap(),
        t.render(&messages[..2], true).unwrap()
    );
    let chatml = ChatTemplate::builtin(BuiltinTemplate::ChatMl, Default::default()).unwrap();
    assert!(!chatml.renders_tools());
}
