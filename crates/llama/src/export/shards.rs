//! The weights of the HF folder: the state dict transformers saves, split into shards as
//! huggingface_hub splits it, and each shard written as a safetensors file.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Tensor};

use crate::error::{LlamaError, Result};
use crate::load::config::LlamaConfig;
use crate::load::config_json::dtype_names;
use crate::lora::config::LoraTarget;

/// One tensor of the exported state dict.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct PlannedTensor {
    pub name: String,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    pub(super) fn numel(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64
    }
}

/// The state dict of `LlamaForCausalLM` in the order transformers' `save_pretrained` shards
/// it: embeddings, every layer's projections and norms, the final norm, and the LM head unless
/// the embeddings are tied (transformers drops tied weights on save), sorted by
/// [`natural_key`] as transformers 5 does before sharding (4.x kept module order).
pub(super) fn state_dict_plan(c: &LlamaConfig) -> Vec<PlannedTensor> {
    let t = |name: String, shape: &[usize]| PlannedTensor {
        name,
        shape: shape.to_vec(),
    };
    let h = c.hidden_size;
    let mut out = vec![t("model.embed_tokens.weight".into(), &[c.vocab_size, h])];
    for l in 0..c.num_hidden_layers {
        for target in LoraTarget::ALL {
            let (o, i) = target.shape(c);
            out.push(t(
                format!("model.layers.{l}.{}.weight", target.layer_path()),
                &[o, i],
            ));
        }
        out.push(t(format!("model.layers.{l}.input_layernorm.weight"), &[h]));
        out.push(t(
            format!("model.layers.{l}.post_attention_layernorm.weight"),
            &[h],
        ));
    }
    out.push(t("model.norm.weight".into(), &[h]));
    if !c.tie_word_embeddings {
        out.push(t("lm_head.weight".into(), &[c.vocab_size, h]));
    }
    out.sort_by_cached_key(|t| natural_key(&t.name));
    out
}

/// One dot-separated part of a name as transformers' `dot_natural_key` orders it: numbers
/// first (numerically), then text with an optional numeric suffix.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum NamePart {
    Num(u64),
    Text(String, Option<u64>),
}

/// transformers' `dot_natural_key`: `layers.2` before `layers.10`, `lm_head` before `model`.
pub(super) fn natural_key(name: &str) -> Vec<NamePart> {
    name.split('.')
        .map(|part| {
            if !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
                if let Ok(n) = part.parse() {
                    return NamePart::Num(n);
                }
            }
            let text = part.trim_end_matches(|c: char| c.is_ascii_digit());
            let digits = &part[text.len()..];
            NamePart::Text(text.to_owned(), digits.parse().ok())
        })
        .collect()
}

/// huggingface_hub's `split_state_dict_into_shards_factory`: walk the tensors in order, start
/// a new shard when the next tensor would overflow the current one; a tensor larger than the
/// limit gets a shard of its own (appended at once, the current shard stays open).
pub(super) fn plan_shards(tensors: &[PlannedTensor], elem_size: u64, max: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_size = 0u64;
    for (i, t) in tensors.iter().enumerate() {
        let size = t.numel() * elem_size;
        if size > max {
            shards.push(vec![i]);
            continue;
        }
        if current_size + size > max {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// The shard file names transformers uses for `n` shards.
pub(super) fn shard_names(n: usize) -> Vec<String> {
    if n == 1 {
        return vec!["model.safetensors".into()];
    }
    (1..=n)
        .map(|i| format!("model-{i:05}-of-{n:05}.safetensors"))
        .collect()
}

/// Writes one safetensors file: header (with `{"format":"pt"}` metadata, tensors in name
/// order as the safetensors library lays them out, padded to 8 bytes), then each tensor's
/// bytes as it is produced.
pub(super) fn write_shard(
    path: &Path,
    tensors: &[&PlannedTensor],
    dtype: DType,
    mut produce: impl FnMut(&PlannedTensor) -> Result<Tensor>,
    progress: &mut dyn FnMut(u64),
) -> Result<()> {
    let (st_name, _, elem) = dtype_names(dtype)?;
    let mut sorted: Vec<&PlannedTensor> = tensors.to_vec();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut offset = 0u64;
    for t in &sorted {
        let size = t.numel() * elem;
        header.push_str(&format!(
            ",{}:{{\"dtype\":\"{st_name}\",\"shape\":{},\"data_offsets\":[{offset},{}]}}",
            serde_json::to_string(&t.name).expect("a string serialises"),
            serde_json::to_string(&t.shape).expect("a shape serialises"),
            offset + size
        ));
        offset += size;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let file = std::fs::File::create(path).map_err(|e| LlamaError::io(path, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    let io = |e| LlamaError::io(path, e);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    for t in &sorted {
        let tensor = produce(t)?;
        let bytes = safetensors::View::data(&tensor);
        if bytes.len() as u64 != t.numel() * elem {
            return Err(LlamaError::Shape(format!(
                "tensor `{}`: {} bytes, expected {}",
                t.name,
                bytes.len(),
                t.numel() * elem
            )));
        }
        w.write_all(&bytes).map_err(io)?;
        progress(bytes.len() as u64);
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, n: usize) -> PlannedTensor {
        PlannedTensor {
            name: name.into(),
            shape: vec![n],
        }
    }

    #[test]
    fn sharding_follows_huggingface_hub() {
        // The docstring's example: sizes [6, 6, 2, 6, 2, 2] with a limit of 10.
        let ts: Vec<_> = [6, 6, 2, 6, 2, 2]
            .iter()
            .enumerate()
            .map(|(i, &n)| t(&format!("t{i}"), n))
            .collect();
        assert_eq!(
            plan_shards(&ts, 1, 10),
            vec![vec![0], vec![1, 2], vec![3, 4, 5]]
        );
        // An oversized tensor gets its own shard, appended while the current one stays open.
        let ts = vec![t("a", 3), t("big", 20), t("b", 3), t("c", 5)];
        assert_eq!(plan_shards(&ts, 1, 10), vec![vec![1], vec![0, 2], vec![3]]);
        assert_eq!(shard_names(1), vec!["model.safetensors"]);
        assert_eq!(shard_names(3)[2], "model-00003-of-00003.safetensors");
    }

    #[test]
    fn names_sort_like_transformers_dot_natural_key() {
        let mut names = vec![
            "model.layers.10.mlp.up_proj.weight",
            "model.norm.weight",
            "model.layers.2.self_attn.q_proj.weight",
            "lm_head.weight",
            "model.layers.2.input_layernorm.weight",
            "model.embed_tokens.weight",
            "a.shard11",
            "a.shard2",
            "a.shard",
        ];
        names.sort_by_key(|n| natural_key(n));
        assert_eq!(
            names,
            vec![
                "a.shard",
                "a.shard2",
                "a.shard11",
                "lm_head.weight",
                "model.embed_tokens.weight",
                "model.layers.2.input_layernorm.weight",
                "model.layers.2.self_attn.q_proj.weight",
                "model.layers.10.mlp.up_proj.weight",
                "model.norm.weight",
            ]
        );
    }
}
