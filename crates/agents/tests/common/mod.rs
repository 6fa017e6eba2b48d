//! Helpers shared by the integration tests: the two real tokenizers, fetched the way users
//! fetch them (scripts/fetch-default-model.sh, idempotent), and their vocabularies.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use teamtune_guide::TokenVocab;
use tokenizers::Tokenizer;

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// (default model GGUF, Llama-3 tokenizer.json)
fn fetched() -> &'static (PathBuf, PathBuf) {
    static PATHS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    PATHS.get_or_init(|| {
        let out = Command::new("bash")
            .arg(repo_root().join("scripts/fetch-default-model.sh"))
            .output()
            .expect("run scripts/fetch-default-model.sh");
        assert!(
            out.status.success(),
            "fetch failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8(out.stdout).unwrap();
        let mut lines = stdout.lines().map(PathBuf::from);
        (
            lines.next().expect("model path"),
            lines.next().expect("tokenizer path"),
        )
    })
}

/// A real tokenizer with the token that ends an assistant turn in its chat format.
pub struct Tok {
    pub name: &'static str,
    pub tokenizer: Tokenizer,
    pub end_of_turn: u32,
    pub vocab: TokenVocab,
}

impl Tok {
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.tokenizer
            .encode(text, false)
            .unwrap()
            .get_ids()
            .to_vec()
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, false).unwrap()
    }
}

/// SmolLM2-135M-Instruct's tokenizer from the default model's GGUF (ChatML: `<|im_end|>`).
pub fn smollm2() -> &'static Tok {
    static TOK: OnceLock<Tok> = OnceLock::new();
    TOK.get_or_init(|| {
        let assets = teamtune_llama::load_chat_assets(fetched().0.to_str().unwrap())
            .expect("load the default model's tokenizer");
        make("smollm2", assets.tokenizer, "<|im_end|>")
    })
}

/// The real Llama-3 tokenizer (`<|eot_id|>`).
pub fn llama3() -> &'static Tok {
    static TOK: OnceLock<Tok> = OnceLock::new();
    TOK.get_or_init(|| {
        let tokenizer = Tokenizer::from_file(&fetched().1).expect("load the Llama-3 tokenizer");
        make("llama3", tokenizer, "<|eot_id|>")
    })
}

fn make(name: &'static str, tokenizer: Tokenizer, eot: &str) -> Tok {
    let end_of_turn = tokenizer
        .token_to_id(eot)
        .unwrap_or_else(|| panic!("{name} has no {eot}"));
    let vocab = TokenVocab::new(&tokenizer, &[end_of_turn]).expect("vocabulary");
    Tok {
        name,
        tokenizer,
        end_of_turn,
        vocab,
    }
}

pub fn both() -> [&'static Tok; 2] {
    [smollm2(), llama3()]
}
