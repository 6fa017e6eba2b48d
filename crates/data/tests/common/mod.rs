//! Shared helpers of the integration tests.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use teamtune_data::*;
use tokenizers::Tokenizer;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub use teamtune_testkit::llama3_tokenizer;

/// SmolLM2-135M-Instruct's tokenizer as transformers loads it from the default model's GGUF.
pub fn smollm2_tokenizer() -> Tokenizer {
    static TOK: OnceLock<Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let f = std::fs::File::open(fixtures().join("smollm2-tokenizer.json.gz")).unwrap();
        let mut s = String::new();
        flate2::read::GzDecoder::new(f)
            .read_to_string(&mut s)
            .unwrap();
        s.parse::<Tokenizer>().expect("parse SmolLM2 tokenizer")
    })
    .clone()
}

pub fn read_fixture(name: &str) -> String {
    std::fs::read_to_string(fixtures().join(name)).unwrap()
}

pub fn fixture_conversations() -> Vec<Conversation> {
    read_conversations(
        &[fixtures().join("conversations.jsonl")],
        &ReadOptions::default(),
    )
    .unwrap()
    .0
}

/// The three configurations of the reference fixtures.
#[derive(Clone, Copy, Debug)]
pub enum Config {
    Llama31,
    SmolLm2,
    ChatMl,
}

impl Config {
    pub const ALL: [Config; 3] = [Config::Llama31, Config::SmolLm2, Config::ChatMl];

    pub fn name(self) -> &'static str {
        match self {
            Config::Llama31 => "llama31",
            Config::SmolLm2 => "smollm2",
            Config::ChatMl => "chatml",
        }
    }

    pub fn tokenizer(self) -> Tokenizer {
        match self {
            Config::Llama31 => llama3_tokenizer(),
            _ => smollm2_tokenizer(),
        }
    }

    /// The stock template (no generation markers).
    pub fn template(self) -> ChatTemplate {
        match self {
            Config::Llama31 => ChatTemplate::builtin(BuiltinTemplate::Llama31, Default::default()),
            Config::SmolLm2 => ChatTemplate::new(
                &read_fixture("smollm2-chat_template.jinja"),
                TemplateOptions {
                    bos_token: Some("<|im_start|>".into()),
                    eos_token: Some("<|im_end|>".into()),
                    ..Default::default()
                },
            ),
            Config::ChatMl => ChatTemplate::builtin(BuiltinTemplate::ChatMl, Default::default()),
        }
        .unwrap()
    }

    /// The template patched with {% generation %} blocks (None for the generic ChatML one, whose
    /// patched copy only the Python script makes).
    pub fn generation_template(self) -> Option<ChatTemplate> {
        let (file, bos, eos) = match self {
            Config::Llama31 => (
                "llama31-generation.jinja",
                Some("<|begin_of_text|>"),
                "<|eot_id|>",
            ),
            Config::SmolLm2 => (
                "smollm2-generation.jinja",
                Some("<|im_start|>"),
                "<|im_end|>",
            ),
            Config::ChatMl => return None,
        };
        Some(
            ChatTemplate::new(
                &read_fixture(file),
                TemplateOptions {
                    bos_token: bos.map(Into::into),
                    eos_token: Some(eos.into()),
                    ..Default::default()
                },
            )
            .unwrap(),
        )
    }

    pub fn encoder(self, options: EncodeOptions) -> Encoder {
        Encoder::new(self.tokenizer(), self.template(), options).unwrap()
    }

    pub fn reference(self) -> serde_json::Value {
        serde_json::from_str(&read_fixture(&format!("reference-{}.json", self.name()))).unwrap()
    }
}

pub fn as_u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn as_u8s(v: &serde_json::Value) -> Vec<u8> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u8)
        .collect()
}

/// Writes lines to a temporary .jsonl file.
pub fn temp_jsonl(dir: &Path, name: &str, lines: &[&str]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, lines.join("\n")).unwrap();
    p
}
