//! Token ids and masks against transformers (fixtures made by scripts/make-data-reference.sh).
//! Conversations quoting special-token text differ on purpose: we tokenise it as text.

mod common;

use common::*;
use teamtune_data::*;

fn check_config(config: Config, template: ChatTemplate, method: MaskMethod) {
    let reference = config.reference();
    let convs = fixture_conversations();
    let refs = reference["conversations"].as_array().unwrap();
    assert_eq!(refs.len(), convs.len());
    for train_on in [TrainOn::AllAssistant, TrainOn::LastAssistant] {
        let encoder = Encoder::new(
            config.tokenizer(),
            template.clone(),
            EncodeOptions {
                train_on,
                mask_method: method,
                ..Default::default()
            },
        )
        .unwrap();
        for (conv, r) in convs.iter().zip(refs) {
            let k = r["index"].as_u64().unwrap();
            let e = encoder
                .encode_messages(&conv.messages, &conv.source)
                .unwrap();
            assert_eq!(
                e.text,
                r["text"].as_str().unwrap(),
                "{config:?} #{k}: rendered text"
            );
            if encoder.holds_special_text(conv) {
                // transformers reads special-token strings in content as control tokens; we read
                // them as text (content is text): the same text, fewer control tokens.
                assert_eq!(
                    encoder.tokenizer().decode(&e.input_ids, false).unwrap(),
                    e.text,
                    "{config:?} #{k}: ids decode to the text"
                );
                let specials = encoder.tokenizer().get_added_tokens_decoder();
                let control = |ids: &[u32]| {
                    ids.iter()
                        .filter(|id| specials.get(id).is_some_and(|t| t.special))
                        .count()
                };
                let quoted: usize = conv
                    .messages
                    .iter()
                    .map(|m| {
                        specials
                            .values()
                            .filter(|t| t.special && !t.content.is_empty())
                            .map(|t| m.content.matches(t.content.as_str()).count())
                            .sum::<usize>()
                    })
                    .sum();
                assert!(quoted > 0);
                assert_eq!(
                    control(&e.input_ids) + quoted,
                    control(&as_u32s(&r["input_ids"])),
                    "{config:?} #{k}: special-token text in content is not a control token"
                );
                continue;
            }
            assert_eq!(
                e.input_ids,
                as_u32s(&r["input_ids"]),
                "{config:?} #{k}: ids"
            );
            let want = match train_on {
                TrainOn::AllAssistant => as_u8s(&r["assistant_mask"]),
                _ => as_u8s(&r["last_assistant_mask"]),
            };
            assert_eq!(
                e.loss_mask, want,
                "{config:?} #{k} {train_on:?} {method:?}: mask\n{}",
                e.text
            );
        }
    }
}

#[test]
fn llama31_ids_and_masks_match_transformers() {
    check_config(
        Config::Llama31,
        Config::Llama31.template(),
        MaskMethod::Auto,
    );
}

#[test]
fn llama31_generation_markers_match_transformers() {
    let t = Config::Llama31.generation_template().unwrap();
    assert!(t.has_generation_markers());
    check_config(Config::Llama31, t, MaskMethod::GenerationMarkers);
}

#[test]
fn smollm2_chatml_ids_and_masks_match_transformers() {
    check_config(
        Config::SmolLm2,
        Config::SmolLm2.template(),
        MaskMethod::Auto,
    );
}

#[test]
fn smollm2_generation_markers_match_transformers() {
    let t = Config::SmolLm2.generation_template().unwrap();
    check_config(Config::SmolLm2, t, MaskMethod::GenerationMarkers);
}

#[test]
fn builtin_chatml_matches_transformers() {
    check_config(Config::ChatMl, Config::ChatMl.template(), MaskMethod::Auto);
}

#[test]
fn llama31_single_bos_and_eot_trained() {
    let encoder = Config::Llama31.encoder(Default::default());
    for conv in fixture_conversations() {
        let e = encoder
            .encode_messages(&conv.messages, &conv.source)
            .unwrap();
        assert_eq!(e.input_ids[0], 128000, "starts with <|begin_of_text|>");
        assert_eq!(
            e.input_ids.iter().filter(|&&t| t == 128000).count(),
            1,
            "exactly one BOS"
        );
        // Every assistant reply ends with a trained <|eot_id|>; header tokens are never trained.
        let mut trained_eot = 0;
        for (t, (&id, &m)) in e.input_ids.iter().zip(&e.loss_mask).enumerate() {
            if m == 1 && (id == 128006 || id == 128007) {
                panic!("header token trained at {t}");
            }
            if m == 1 && id == 128009 && e.loss_mask.get(t + 1).copied().unwrap_or(0) == 0 {
                trained_eot += 1;
            }
        }
        assert_eq!(trained_eot, conv.assistant_turns(), "{}", e.text);
    }
}

#[test]
fn reference_has_single_bos() {
    for r in Config::Llama31.reference()["conversations"]
        .as_array()
        .unwrap()
    {
        assert_eq!(r["bos_count"], 1);
    }
}

#[test]
fn trained_text_matches_reference_decode() {
    for config in Config::ALL {
        let encoder = config.encoder(Default::default());
        let reference = config.reference();
        for (conv, r) in fixture_conversations()
            .iter()
            .zip(reference["conversations"].as_array().unwrap())
        {
            let e = encoder
                .encode_messages(&conv.messages, &conv.source)
                .unwrap();
            let mut runs = Vec::new();
            let mut t = 0;
            while t < e.len() {
                if e.loss_mask[t] == 1 {
                    let a = t;
                    while t < e.len() && e.loss_mask[t] == 1 {
                        t += 1;
                    }
                    runs.push(
                        encoder
                            .tokenizer()
                            .decode(&e.input_ids[a..t], false)
                            .unwrap(),
                    );
                } else {
                    t += 1;
                }
            }
            let want: Vec<String> = r["trained_text"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect();
            assert_eq!(runs, want, "{config:?}");
        }
    }
}
