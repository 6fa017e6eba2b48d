//! Helpers shared by the integration tests: the two real tokenizers, fetched the way users
//! fetch them (scripts/fetch-default-model.sh, idempotent), and their vocabularies.
#![allow(dead_code)]

use std::sync::OnceLock;

use teamtune_guide::TokenVocab;
use tokenizers::Tokenizer;

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
        let tokenizer = teamtune_testkit::default_model_assets().tokenizer.clone();
        make("smollm2", tokenizer, "<|im_end|>")
    })
}

/// The real Llama-3 tokenizer (`<|eot_id|>`).
pub fn llama3() -> &'static Tok {
    static TOK: OnceLock<Tok> = OnceLock::new();
    TOK.get_or_init(|| make("llama3", teamtune_testkit::llama3_tokenizer(), "<|eot_id|>"))
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
