//! Writing a GGUF file whole or not at all: candle's writer into a temporary file, then a rename.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::QTensor;

use crate::error::{LlamaError, Result};

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
