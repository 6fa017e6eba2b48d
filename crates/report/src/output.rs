//! Figure files: where a figure's PNG and SVG go, written atomically (temporary file + rename).

use crate::error::{ReportError, Result};
use std::path::{Path, PathBuf};

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

/// Writes `path` by letting `write` fill a temporary file beside it (same extension, so that
/// encoders that go by it still work), then renaming it over `path`
/// ([`teamtune_formats::write_atomic_with`]). The parent folder is created if needed; on failure
/// the temporary file is removed and `path` is untouched.
pub(crate) fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    // The writer's own error is kept as it is; only the file system's errors are wrapped.
    let mut failed = None;
    teamtune_formats::write_atomic_with(path, |tmp| {
        write(tmp).map_err(|e| {
            let io = std::io::Error::other(e.to_string());
            failed = Some(e);
            io
        })
    })
    .map_err(|source| {
        failed.take().unwrap_or_else(|| ReportError::Write {
            path: path.to_path_buf(),
            why: source.to_string(),
        })
    })
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
