//! Reading the small text files of a model and of the command line (config, tokenizer, chat
//! template, adapter config, recipe, schema, messages) with a bound: a device (`/dev/zero`), an
//! endless pipe or a file far larger than any such file is refused by name instead of read until
//! memory runs out.

use std::io::Read;
use std::path::Path;

use crate::error::{LlamaError, Result};

/// Larger than any tokenizer.json or config a model ships (Llama 3's tokenizer is 9 MB).
pub const MAX_TEXT_FILE_BYTES: u64 = 256 << 20;

/// The whole of `path` as UTF-8, read only up to [`MAX_TEXT_FILE_BYTES`]. A device or a folder
/// is refused before anything is read; a pipe (`/dev/stdin`) is read up to the bound.
pub fn read_text_file(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(|e| LlamaError::io(path, e))?;
    let refuse = |why: String| LlamaError::File {
        path: path.to_path_buf(),
        message: why,
    };
    if meta.is_dir() || is_device(&meta) {
        return Err(refuse(
            "not a regular file (a device or a folder cannot be read as one)".into(),
        ));
    }
    let too_large = || {
        refuse(format!(
            "larger than the {} MiB such a file can be",
            MAX_TEXT_FILE_BYTES >> 20
        ))
    };
    if meta.len() > MAX_TEXT_FILE_BYTES {
        return Err(too_large());
    }
    let mut text = String::with_capacity(meta.len() as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_TEXT_FILE_BYTES + 1).read_to_string(&mut text))
        .map_err(|e| LlamaError::io(path, e))?;
    if text.len() as u64 > MAX_TEXT_FILE_BYTES {
        return Err(too_large());
    }
    Ok(text)
}

#[cfg(unix)]
fn is_device(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    meta.file_type().is_char_device() || meta.file_type().is_block_device()
}

#[cfg(not(unix))]
fn is_device(_: &std::fs::Metadata) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_folders_are_refused_files_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_text_file(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/dev/zero: ") && e.contains("not a regular file"),
            "{e}"
        );
        let e = read_text_file(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let f = dir.path().join("config.json");
        std::fs::write(&f, "{}").unwrap();
        assert_eq!(read_text_file(&f).unwrap(), "{}");
    }
}
