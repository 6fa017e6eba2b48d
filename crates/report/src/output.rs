//! Figure files: where a figure's PNG and SVG go, written atomically (temporary file + rename).

use crate::error::{ReportError, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The two files a figure is written to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FigureFiles {
    pub png: PathBuf,
    pub svg: PathBuf,
}

impl FigureFiles {
    /// `PREFIX.png` and `PREFIX.svg` (the suffix is appended, so a prefix may contain dots).
    pub fn at(prefix: &Path) -> Self {
        let with = |ext: &str| {
            let mut s = prefix.as_os_str().to_owned();
            s.push(".");
            s.push(ext);
            PathBuf::from(s)
        };
        FigureFiles {
            png: with("png"),
            svg: with("svg"),
        }
    }
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `path` by letting `write` fill a temporary file beside it (same extension, so that
/// encoders that go by it still work), then renaming it over `path`. The parent folder is
/// created if needed; on failure the temporary file is removed and `path` is untouched.
pub(crate) fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let io = |source: std::io::Error| ReportError::Write {
        path: path.to_path_buf(),
        why: source.to_string(),
    };
    let name = path
        .file_name()
        .ok_or_else(|| ReportError::Write {
            path: path.to_path_buf(),
            why: "not a file name".into(),
        })?
        .to_string_lossy()
        .into_owned();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let ext = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{name}.{}-{n}.tmp{ext}", std::process::id()));
    let result = write(&tmp).and_then(|()| std::fs::rename(&tmp, path).map_err(io));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_keeps_dots_and_folders() {
        let f = FigureFiles::at(Path::new("runs/a.v2/loss"));
        assert_eq!(f.png, PathBuf::from("runs/a.v2/loss.png"));
        let f = FigureFiles::at(Path::new("cmp.v2"));
        assert_eq!(f.svg, PathBuf::from("cmp.v2.svg"));
    }

    #[test]
    fn failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.svg");
        let err = write_atomic(&path, |tmp| {
            std::fs::write(tmp, "partial").unwrap();
            Err(ReportError::Write {
                path: tmp.to_path_buf(),
                why: "boom".into(),
            })
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
