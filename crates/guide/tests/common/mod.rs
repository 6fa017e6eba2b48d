//! The default model (SmolLM2-135M-Instruct), fetched the way users fetch it
//! (scripts/fetch-default-model.sh, idempotent): its tokenizer and vocabulary, and the model.
#![allow(dead_code)]

use std::sync::OnceLock;

use teamtune_guide::TokenVocab;
use teamtune_llama::ChatAssets;

/// SmolLM2's chat assets, its turn end (`<|im_end|>`) and the vocabulary ending turns there.
pub struct Tok {
    pub assets: ChatAssets,
    pub end_of_turn: u32,
    pub vocab: TokenVocab,
}

impl Tok {
    pub fn encode(&self, text: &str) -> Vec<u32> {
        self.assets
            .tokenizer
            .encode(text, false)
            .unwrap()
            .get_ids()
            .to_vec()
    }

    pub fn decode(&self, ids: &[u32]) -> String {
        self.assets.tokenizer.decode(ids, false).unwrap()
    }
}

pub fn smollm2() -> &'static Tok {
    static TOK: OnceLock<Tok> = OnceLock::new();
    TOK.get_or_init(|| {
        let assets = teamtune_testkit::default_model_assets().clone();
        let end_of_turn = assets
            .tokenizer
            .token_to_id("<|im_end|>")
            .expect("<|im_end|>");
        let vocab = TokenVocab::new(&assets.tokenizer, &[end_of_turn]).expect("vocabulary");
        Tok {
            assets,
            end_of_turn,
            vocab,
        }
    })
}
