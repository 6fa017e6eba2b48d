//! Writing GGUF files (adapters and merged models): the tensor types offered, and the file
//! written whole or not at all (candle's writer into a temporary file, then a rename).

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{LlamaError, Result};

/// The element type of an exported GGUF's matrices. Vectors (norms) stay f32, as llama.cpp keeps
/// them; a matrix whose rows do not split into the type's blocks falls back to f16, as
/// llama.cpp's converters do (a LoRA B's rows are `r` long).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
}

impl GgufType {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Some(Self::F32),
            "f16" => Some(Self::F16),
            "bf16" => Some(Self::Bf16),
            "q8_0" => Some(Self::Q8_0),
            "q4_0" => Some(Self::Q4_0),
            _ => None,
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            Self::F32 => GgmlDType::F32,
            Self::F16 => GgmlDType::F16,
            Self::Bf16 => GgmlDType::BF16,
            Self::Q8_0 => GgmlDType::Q8_0,
            Self::Q4_0 => GgmlDType::Q4_0,
        }
    }

    /// llama.cpp's `general.file_type` (`llama_ftype`).
    pub(crate) fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 7,
            Self::Bf16 => 32,
        }
    }

    /// `t` in this type (or f32 / f16, as said above).
    pub(crate) fn quantize(self, t: &Tensor) -> Result<QTensor> {
        let ggml = if t.rank() < 2 {
            GgmlDType::F32
        } else if t.dim(t.rank() - 1)? % self.ggml().block_size() != 0 {
            GgmlDType::F16
        } else {
            self.ggml()
        };
        Ok(QTensor::quantize(&t.to_device(&Device::Cpu)?, ggml)?)
    }
}

/// Writes `metadata` and `tensors` to `out` (through a temporary file and a rename); returns the
/// file's size. `what` names the file in errors ("the merged GGUF", "the GGUF adapter").
pub(crate) fn write_gguf(
    out: &Path,
    metadata: &[(String, Value)],
    tensors: &[(String, QTensor)],
    what: &str,
) -> Result<u64> {
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    teamtune_formats::write_atomic_with(out, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        gguf_file::write(&mut f, &meta, &refs).map_err(std::io::Error::other)?;
        f.sync_all()
    })
    .map_err(|e| LlamaError::Weights {
        path: out.to_path_buf(),
        message: format!("cannot write {what}: {e}"),
    })?;
    Ok(std::fs::metadata(out).map(|m| m.len()).unwrap_or(0))
}
