//! Comparing paths that name inputs and outputs, so that a command can refuse to write over
//! what it reads: made absolute, with symlinks resolved as far as the path exists.

use std::path::{Path, PathBuf};

/// `path` made absolute, with its longest existing ancestor's symlinks resolved (the rest, not
/// yet created, appended as given).
pub fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |p, part| p.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return absolute,
        }
    }
}

/// Whether `a` and `b` name the same file or folder.
pub fn same_path(a: &Path, b: &Path) -> bool {
    resolved(a) == resolved(b)
}

/// Whether `a` and `b` are the same path or one lies inside the other.
pub fn overlaps(a: &Path, b: &Path) -> bool {
    let (a, b) = (resolved(a), resolved(b));
    a.starts_with(&b) || b.starts_with(&a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_compare_through_dots_and_symlinks_existing_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&real, &link).unwrap();
        #[cfg(not(unix))]
        let link = real.clone();
        assert!(same_path(
            &real.join("x.jsonl"),
            &link.join("../real/x.jsonl")
        ));
        assert!(same_path(&real.join("new/x"), &link.join("new/x")));
        assert!(!same_path(&real.join("a"), &real.join("b")));
        assert!(overlaps(&link, &real.join("inside/deeper")));
        assert!(overlaps(&real.join("inside"), &link));
        assert!(!overlaps(&real.join("a"), &real.join("ab")));
    }
}
