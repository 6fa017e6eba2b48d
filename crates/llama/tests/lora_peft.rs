//! LoRA adapters in PEFT's file layout both ways: saved and loaded exactly, a PEFT-made adapter
//! gives PEFT's logits, one saved here gives PEFT ours, names, shapes and config as PEFT
//! writes them, and adapters that do not fit are refused with the file and tensor.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::lora::*;
use teamtune_llama::{peft_tensor_name, read_peft_config};
use teamtune_llama::{LoraConfig, LoraTarget, Mode};

fn peft_dir() -> std::path::PathBuf {
    common::fixtures().join("tiny-lora")
}

/// input_ids_0 and PEFT's logits for it with the tiny-lora adapter.
fn peft_reference() -> (Vec<u32>, Tensor) {
    let t = candle_core::safetensors::load(peft_dir().join("reference.safetensors"), &Device::Cpu)
        .unwrap();
    let ids = t["input_ids_0"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    (ids, t["logits_0"].clone())
}

#[test]
fn save_then_load_is_exact() {
    let config = LoraConfig {
        rank: 4,
        alpha: 12.0,
        dropout: 0.05,
        use_rslora: true,
        targets: vec![LoraTarget::Q, LoraTarget::Down, LoraTarget::O],
        base_model_name_or_path: Some("tiny-llama31".into()),
        seed: 7,
    };
    let m = with_adapter(&config, true);
    let dir = tempfile::tempdir().unwrap();
    m.save_adapter("a", dir.path()).unwrap();
    let mut names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["adapter_config.json", "adapter_model.safetensors"],
        "no temporary files left"
    );
    let mut fresh = load(DType::F32);
    let loaded = fresh.load_adapter("b", dir.path()).unwrap();
    // Targets come back in the canonical order, the seed is not part of the file.
    let want_config = LoraConfig {
        seed: 0,
        ..m.adapter("a").unwrap().config().clone()
    };
    assert_eq!(
        want_config.targets,
        [LoraTarget::Q, LoraTarget::O, LoraTarget::Down]
    );
    assert_eq!(config.rank, want_config.rank);
    assert_eq!(loaded.config(), &want_config);
    let a = m.adapter("a").unwrap().named_vars();
    let b = loaded.named_vars();
    assert_eq!(a.len(), b.len());
    for ((na, va), (nb, vb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        assert_eq!(flat(va.as_tensor()), flat(vb.as_tensor()), "{na}");
    }
    fresh.set_active_adapter(Some("b")).unwrap();
    assert_eq!(
        flat(&common::logits(&fresh, &ids(25), Mode::Inference)),
        flat(&common::logits(&m, &ids(25), Mode::Inference))
    );
}

#[test]
fn a_peft_made_adapter_gives_peft_logits() {
    let mut m = load(DType::F32);
    let a = m.load_adapter("peft", &peft_dir()).unwrap();
    assert_eq!(a.config().rank, 4);
    assert_eq!(a.config().targets, LoraTarget::ALL.to_vec());
    m.set_active_adapter(Some("peft")).unwrap();
    let (input, want) = peft_reference();
    let got = common::logits(&m, &input, Mode::Inference);
    let err = rel_err(&got, &want);
    eprintln!(
        "PEFT adapter logits, {} positions: max rel err {err:e}",
        input.len()
    );
    assert!(err <= 1e-4, "max relative error {err:e}");
    // The adapter matters: the base logits are far from PEFT's.
    m.set_active_adapter(None).unwrap();
    let base = common::logits(&m, &input, Mode::Inference);
    assert!(rel_err(&base, &want) > 1e-2);
    // Merged, too.
    m.merge_adapter("peft").unwrap();
    let merged = common::logits(&m, &input, Mode::Inference);
    assert!(rel_err(&merged, &want) <= 1e-4);
}

/// name -> shape of every tensor in a safetensors file.
fn tensor_list(path: &Path) -> BTreeMap<String, Vec<usize>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(n, t)| (n, t.dims().to_vec()))
        .collect()
}

#[test]
fn a_saved_adapter_has_peft_names_shapes_and_config() {
    let m = with_adapter(
        &LoraConfig {
            rank: 4,
            alpha: 8.0,
            base_model_name_or_path: Some("tiny-llama31".into()),
            ..LoraConfig::default()
        },
        false,
    );
    let dir = tempfile::tempdir().unwrap();
    m.save_adapter("a", dir.path()).unwrap();
    let ours = tensor_list(&dir.path().join("adapter_model.safetensors"));
    let peft = tensor_list(&peft_dir().join("adapter_model.safetensors"));
    assert_eq!(ours, peft);
    assert!(ours.contains_key(&peft_tensor_name(1, LoraTarget::Down, 'B')));
    let dtypes: HashMap<_, _> =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.dtype()))
            .collect();
    assert!(dtypes.values().all(|&d| d == DType::F32));

    let read = |p: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    let (ours, peft) = (read(dir.path()), read(&peft_dir()));
    for key in [
        "peft_type",
        "task_type",
        "r",
        "lora_dropout",
        "base_model_name_or_path",
        "bias",
        "use_rslora",
        "fan_in_fan_out",
        "use_dora",
        "modules_to_save",
        "init_lora_weights",
        "inference_mode",
    ] {
        assert_eq!(ours[key], peft[key], "adapter_config.json `{key}`");
    }
    assert_eq!(ours["lora_alpha"].as_f64(), peft["lora_alpha"].as_f64());
    let set = |v: &serde_json::Value| -> Vec<String> {
        let mut s: Vec<String> = v["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_owned())
            .collect();
        s.sort();
        s
    };
    assert_eq!(set(&ours), set(&peft));
    // Our own config reader agrees with PEFT's file.
    assert_eq!(
        read_peft_config(&dir.path().join("adapter_config.json")).unwrap(),
        read_peft_config(&peft_dir().join("adapter_config.json")).unwrap()
    );
}

/// A copy of the PEFT fixture with its config edited by `edit` and its tensors by `tensors`.
fn broken_copy(
    edit: impl FnOnce(&mut serde_json::Value),
    tensors: impl FnOnce(&mut HashMap<String, Tensor>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(peft_dir().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    edit(&mut config);
    std::fs::write(
        dir.path().join("adapter_config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    let mut t =
        candle_core::safetensors::load(peft_dir().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    tensors(&mut t);
    candle_core::safetensors::save(&t, dir.path().join("adapter_model.safetensors")).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    let mut m = load(DType::F32);
    m.load_adapter("x", dir).unwrap_err().to_string()
}

#[test]
fn adapters_that_do_not_fit_are_refused_with_the_file_and_tensor() {
    let name = peft_tensor_name(1, LoraTarget::Up, 'A');
    let cases: Vec<(tempfile::TempDir, Vec<String>)> = vec![
        (
            broken_copy(|c| c["peft_type"] = "IA3".into(), |_| {}),
            vec!["adapter_config.json".into(), "IA3".into(), "LORA".into()],
        ),
        (
            broken_copy(
                |_| {},
                |t| {
                    t.insert(
                        name.clone(),
                        Tensor::zeros((4, 96), DType::F32, &Device::Cpu).unwrap(),
                    );
                },
            ),
            vec![
                "adapter_model.safetensors".into(),
                name.clone(),
                "[4, 96]".into(),
                "[4, 64]".into(),
            ],
        ),
        (
            broken_copy(
                |_| {},
                |t| {
                    t.remove(&name);
                },
            ),
            vec![
                "adapter_model.safetensors".into(),
                name.clone(),
                "missing".into(),
            ],
        ),
        (
            broken_copy(
                |_| {},
                |t| {
                    t.insert(
                        peft_tensor_name(5, LoraTarget::Q, 'A'),
                        Tensor::zeros((4, 64), DType::F32, &Device::Cpu).unwrap(),
                    );
                },
            ),
            vec!["layers.5.self_attn.q_proj.lora_A".into(), "2 layers".into()],
        ),
        (
            broken_copy(|c| c["r"] = 8.into(), |_| {}),
            vec!["adapter_model.safetensors".into(), "r = 8".into()],
        ),
        (
            broken_copy(
                |c| c["target_modules"] = serde_json::json!(["q_proj", "lm_head"]),
                |_| {},
            ),
            vec!["adapter_config.json".into(), "lm_head".into()],
        ),
        (
            broken_copy(
                |c| c["target_modules"] = serde_json::json!(["q_proj"]),
                |_| {},
            ),
            vec!["does not belong".into(), "layers.0.mlp.down_proj".into()],
        ),
        (
            broken_copy(|c| c["use_dora"] = true.into(), |_| {}),
            vec!["adapter_config.json".into(), "use_dora".into()],
        ),
    ];
    for (dir, wants) in cases {
        let err = load_err(dir.path());
        for w in wants {
            assert!(err.contains(&w), "error {err:?} should mention {w:?}");
        }
    }
}

/// The direction users need most: an adapter written here, loaded by PEFT on the same base,
/// gives PEFT the logits we compute. `tiny-lora-ours/` holds the adapter this test builds
/// (rsLoRA, rank 4, seeded A and B; `TEAMTUNE_WRITE_FIXTURES=1` rewrites it) and
/// `peft_logits.safetensors`, what PEFT computed from that folder
/// (`$(scripts/ref-env.sh) scripts/make_lora_reference.py`).
#[test]
fn an_adapter_saved_here_gives_peft_the_same_logits() {
    let dir = common::fixtures().join("tiny-lora-ours");
    let config = LoraConfig {
        rank: 4,
        alpha: 8.0,
        use_rslora: true,
        base_model_name_or_path: Some("tiny-llama31".into()),
        seed: 11,
        ..Default::default()
    };
    let mut m = load(DType::F32);
    m.add_adapter("ours", &config).unwrap();
    randomize_b(&m, "ours", 5);
    m.set_active_adapter(Some("ours")).unwrap();
    if std::env::var("TEAMTUNE_WRITE_FIXTURES").is_ok_and(|v| v == "1") {
        m.save_adapter("ours", &dir).unwrap();
    }
    // What we save now is what PEFT read.
    let tmp = tempfile::tempdir().unwrap();
    m.save_adapter("ours", tmp.path()).unwrap();
    let now =
        candle_core::safetensors::load(tmp.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let committed =
        candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert_eq!(now.len(), committed.len());
    for (name, t) in &now {
        assert_eq!(flat(t), flat(&committed[name]), "{name}");
    }
    let peft =
        candle_core::safetensors::load(dir.join("peft_logits.safetensors"), &Device::Cpu).unwrap();
    let ids = peft["input_ids_0"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec1::<u32>()
        .unwrap();
    let ours = common::logits(&m, &ids, Mode::Inference);
    let err = rel_err(&ours, &peft["logits_0"]);
    assert!(err < 1e-4, "max relative error {err:e} against PEFT");
    // And the adapter matters: PEFT's logits are not the base model's.
    m.set_active_adapter(None).unwrap();
    assert!(
        rel_err(
            &common::logits(&m, &ids, Mode::Inference),
            &peft["logits_0"]
        ) > 1e-2
    );
}
