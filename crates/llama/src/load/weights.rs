//! Named tensors in Hugging Face layout, whatever file they come from: memory-mapped
//! safetensors (one file or shards with an index) or a GGUF file (dequantised, Q/K rows
//! un-permuted back to HF order). The model asks for `model.layers.0.self_attn.q_proj.weight`
//! and never learns where it came from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{gguf_file, GgmlDType};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use crate::error::{LlamaError, Result};

pub enum WeightSource {
    Safetensors {
        files: Vec<PathBuf>,
        tensors: MmapedSafetensors,
    },
    Gguf(GgufWeights),
}

pub struct GgufWeights {
    pub(crate) path: PathBuf,
    pub(crate) content: gguf_file::Content,
    pub(crate) n_heads: usize,
    pub(crate) n_kv_heads: usize,
}

impl WeightSource {
    /// Memory-maps the given safetensors files (all shards of one model).
    pub fn safetensors(files: Vec<PathBuf>) -> Result<Self> {
        for f in &files {
            if !f.exists() {
                return Err(LlamaError::NotFound(f.display().to_string()));
            }
        }
        // Safety: the files are mapped read-only; a concurrent writer would be a user error
        // that the safetensors header checks cannot catch, as with every mmap-based loader.
        let tensors =
            unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| LlamaError::Weights {
                path: files.first().cloned().unwrap_or_default(),
                message: format!("cannot read safetensors (truncated or corrupt?): {e}"),
            })?;
        Ok(WeightSource::Safetensors { files, tensors })
    }

    /// The safetensors shards listed in `model.safetensors.index.json`, in a stable order.
    pub fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
        let text = crate::load::text_file::read_text_file(index)?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| LlamaError::Weights {
                path: index.to_path_buf(),
                message: format!("not valid JSON: {e}"),
            })?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| LlamaError::Weights {
                path: index.to_path_buf(),
                message: "no `weight_map` object".into(),
            })?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|v| v.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        Ok(files)
    }

    pub fn origin(&self) -> &Path {
        match self {
            WeightSource::Safetensors { files, .. } => {
                files.first().map(|p| p.as_path()).unwrap_or(Path::new(""))
            }
            WeightSource::Gguf(g) => &g.path,
        }
    }

    pub fn contains(&self, hf_name: &str) -> bool {
        match self {
            WeightSource::Safetensors { tensors, .. } => tensors.get(hf_name).is_ok(),
            WeightSource::Gguf(g) => g
                .content
                .tensor_infos
                .contains_key(&gguf_name(hf_name).unwrap_or_default()),
        }
    }

    /// Loads `hf_name`, checks its shape and converts it to `dtype` on `device`.
    pub fn get(
        &self,
        hf_name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let t = match self {
            WeightSource::Safetensors { tensors, files } => {
                let view = tensors.get(hf_name).map_err(|_| LlamaError::Weights {
                    path: files.first().cloned().unwrap_or_default(),
                    message: format!("tensor `{hf_name}` is missing"),
                })?;
                candle_core::safetensors::Load::load(&view, device).map_err(|e| {
                    LlamaError::Weights {
                        path: files.first().cloned().unwrap_or_default(),
                        message: format!("tensor `{hf_name}`: {e}"),
                    }
                })?
            }
            WeightSource::Gguf(g) => g.get(hf_name)?.to_device(device)?,
        };
        if t.dims() != shape {
            return Err(LlamaError::Weights {
                path: self.origin().to_path_buf(),
                message: format!(
                    "tensor `{hf_name}` has shape {:?}, the config implies {:?}",
                    t.dims(),
                    shape
                ),
            });
        }
        Ok(t.to_dtype(dtype)?)
    }
}

/// llama.cpp's name of a tensor type (`Q4_K`, where candle says `Q4K`).
pub(crate) fn ggml_type_name(t: GgmlDType) -> String {
    let name = format!("{t:?}");
    match name.strip_suffix('K') {
        Some(stem) if !stem.contains('_') => format!("{stem}_K"),
        _ => name,
    }
}

/// llama.cpp's name for a Hugging Face tensor name.
pub(crate) fn gguf_name(hf_name: &str) -> Option<String> {
    let fixed: HashMap<&str, &str> = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ]
    .into_iter()
    .collect();
    if let Some(n) = fixed.get(hf_name) {
        return Some(n.to_string());
    }
    let rest = hf_name.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let gguf_module = match module {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{gguf_module}"))
}

impl GgufWeights {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| LlamaError::io(path, e))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| LlamaError::Gguf {
            path: path.to_path_buf(),
            message: format!("cannot read the GGUF header: {e}"),
        })?;
        let arch = content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if arch != "llama" {
            return Err(LlamaError::Gguf {
                path: path.to_path_buf(),
                message: format!("architecture `{arch}` is not supported (only `llama`)"),
            });
        }
        let meta_usize = |key: &str| -> Result<usize> {
            content
                .metadata
                .get(key)
                .and_then(|v| {
                    v.to_u32()
                        .ok()
                        .or_else(|| v.to_u64().ok().map(|x| x as u32))
                })
                .map(|x| x as usize)
                .ok_or_else(|| LlamaError::Gguf {
                    path: path.to_path_buf(),
                    message: format!("metadata `{key}` is missing"),
                })
        };
        let n_heads = meta_usize("llama.attention.head_count")?;
        let n_kv_heads = meta_usize("llama.attention.head_count_kv").unwrap_or(n_heads);
        Ok(GgufWeights {
            path: path.to_path_buf(),
            content,
            n_heads,
            n_kv_heads,
        })
    }

    /// The quantised GGUF types of the file's tensors (`Q4_1`, `Q8_0`, ...), sorted: no kernel
    /// here multiplies them as stored, so they become f32 as they load.
    pub(crate) fn quantised_types(&self) -> Vec<String> {
        let mut types: Vec<String> = self
            .content
            .tensor_infos
            .values()
            .map(|info| info.ggml_dtype)
            .filter(|t| !matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16))
            .map(ggml_type_name)
            .collect();
        types.sort();
        types.dedup();
        types
    }

    /// Reads a tensor by its GGUF name, dequantised to f32 on the CPU.
    pub(crate) fn raw(&self, gguf: &str) -> Result<Tensor> {
        let mut file =
            std::fs::File::open(&self.path).map_err(|e| LlamaError::io(&self.path, e))?;
        let q = self
            .content
            .tensor(&mut file, gguf, &Device::Cpu)
            .map_err(|e| LlamaError::Gguf {
                path: self.path.clone(),
                message: format!("tensor `{gguf}`: {e}"),
            })?;
        Ok(q.dequantize(&Device::Cpu)?)
    }

    fn get(&self, hf_name: &str) -> Result<Tensor> {
        let gguf = gguf_name(hf_name).ok_or_else(|| LlamaError::Gguf {
            path: self.path.clone(),
            message: format!("no GGUF name for `{hf_name}`"),
        })?;
        if !self.content.tensor_infos.contains_key(&gguf) {
            return Err(LlamaError::Gguf {
                path: self.path.clone(),
                message: format!("tensor `{gguf}` (for `{hf_name}`) is missing"),
            });
        }
        let t = self.raw(&gguf)?;
        // llama.cpp interleaves the two rotary halves of every Q and K head; HF keeps them as
        // halves. Undo it so the HF rotate-half RoPE and HF-layout adapters apply unchanged.
        if gguf.ends_with("attn_q.weight") {
            unpermute(&t, self.n_heads)
        } else if gguf.ends_with("attn_k.weight") {
            unpermute(&t, self.n_kv_heads)
        } else {
            Ok(t)
        }
    }
}

/// llama.cpp's `permute(w, n_head)` (`convert_hf_to_gguf.py`): the rows of every head go from
/// HF's two rotary halves to interleaved pairs, row `h*d + j*d/2 + i` to `h*d + 2i + j`.
pub(crate) fn permute(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    Ok(w.reshape((n_heads, 2, rows / n_heads / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

/// Inverse of llama.cpp's `permute(w, n_head)`: rows `h*d + 2i + j` go back to `h*d + j*d/2 + i`.
pub(crate) fn unpermute(w: &Tensor, n_heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let d = rows / n_heads;
    Ok(w.reshape((n_heads, d / 2, 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quantised_types_of_a_gguf_are_named_for_the_load_notice() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let q8 = GgufWeights::open(&fixtures.join("tiny-llama31.q8_0.gguf")).unwrap();
        assert_eq!(q8.quantised_types(), ["Q8_0"]);
        assert_eq!(ggml_type_name(GgmlDType::Q4K), "Q4_K");
        assert_eq!(ggml_type_name(GgmlDType::Q4_1), "Q4_1");
        let dense = GgufWeights::open(&fixtures.join("tiny-llama31.gguf")).unwrap();
        assert!(
            dense.quantised_types().is_empty(),
            "{:?}",
            dense.quantised_types()
        );
    }

    /// llama.cpp's forward permutation, written independently from its Python definition:
    /// `w.reshape(n_head, 2, rows//n_head//2, cols).swapaxes(1, 2).reshape(rows, cols)`.
    fn permute(w: &Tensor, n_heads: usize) -> Tensor {
        let (rows, cols) = w.dims2().unwrap();
        w.reshape((n_heads, 2, rows / n_heads / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, cols))
            .unwrap()
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let w = Tensor::arange(0f32, 48.0 * 3.0, &Device::Cpu)
            .unwrap()
            .reshape((48, 3))
            .unwrap();
        for heads in [1, 2, 3] {
            let back = unpermute(&permute(&w, heads), heads).unwrap();
            assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
        }
        // And the row map is the documented one: gguf_row[h*D + 2i + j] = hf_row[h*D + j*D/2 + i].
        let p = permute(&w, 2).to_vec2::<f32>().unwrap();
        let hf = w.to_vec2::<f32>().unwrap();
        let d = 24;
        for h in 0..2 {
            for i in 0..d / 2 {
                for j in 0..2 {
                    assert_eq!(p[h * d + 2 * i + j], hf[h * d + j * d / 2 + i]);
                }
            }
        }
    }

    #[test]
    fn gguf_names() {
        assert_eq!(
            gguf_name("model.layers.3.mlp.down_proj.weight").unwrap(),
            "blk.3.ffn_down.weight"
        );
        assert_eq!(gguf_name("lm_head.weight").unwrap(), "output.weight");
        assert!(gguf_name("model.layers.3.mlp.foo").is_none());
    }
}
