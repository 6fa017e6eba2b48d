//! A run folder is made once, used by one process at a time, and resumed only with the data it
//! was made with.
//!
//! - [`RunFolder::open`] takes `RUN/.lock` (the process id, created exclusively; a lock left by
//!   a process that no longer runs is taken over) and refuses a folder that already holds a run
//!   unless the caller resumes it or starts over on purpose.
//! - `RUN/data.json` keeps a fingerprint of the training data's bytes; a resume with other data
//!   is refused unless the caller says so.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{io_err, Result, TrainError};

/// What a run folder holds once a run has started in it.
const RUN_FILES: [&str; 3] = ["metrics.jsonl", "checkpoints", "adapter"];
const LOCK: &str = ".lock";
/// The data fingerprint of a run.
const DATA_FILE: &str = "data.json";

/// How a run folder is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// A new run: the folder must not hold one.
    Fresh,
    /// Continue the run in the folder (with the data it was made with).
    Resume,
    /// Start over or resume regardless of what the folder holds (`--force`): a fresh start
    /// removes the old run's metrics and checkpoints first.
    Force { resume: bool },
}

/// A locked run folder; the lock goes when this is dropped.
#[derive(Debug)]
pub struct RunFolder {
    dir: PathBuf,
}

/// The training data a run was made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataFingerprint {
    pub files: Vec<String>,
    /// FNV-1a (64 bit) over every file's bytes in order, as hex.
    pub fingerprint: String,
}

impl DataFingerprint {
    /// Reads every file (in the given order) once.
    pub fn of(files: &[PathBuf]) -> Result<Self> {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for path in files {
            let bytes = std::fs::read(path).map_err(io_err(path))?;
            for &b in bytes.iter().chain(&[0xff]) {
                hash = (hash ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        Ok(DataFingerprint {
            files: files.iter().map(|p| p.display().to_string()).collect(),
            fingerprint: format!("{hash:016x}"),
        })
    }
}

impl RunFolder {
    /// Creates (if needed) and locks `dir` for a run opened as `mode`, checking it against
    /// `data`: a fresh run writes the fingerprint, a resumed one must match it.
    pub fn open(dir: &Path, mode: OpenMode, data: &DataFingerprint) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let folder = RunFolder::lock(dir)?;
        let has_run = RUN_FILES.iter().any(|f| dir.join(f).exists());
        let resume = matches!(mode, OpenMode::Resume | OpenMode::Force { resume: true });
        match mode {
            OpenMode::Fresh if has_run => {
                return Err(TrainError::Config(format!(
                    "{} already holds a run (metrics.jsonl, checkpoints or adapter): continue it \
                     with --resume {}, choose another --out, or give --force to start over",
                    dir.display(),
                    dir.display()
                )))
            }
            OpenMode::Force { resume: false } => {
                for f in ["metrics.jsonl", "checkpoints", DATA_FILE] {
                    let p = dir.join(f);
                    if p.is_dir() {
                        std::fs::remove_dir_all(&p).map_err(io_err(&p))?;
                    } else if p.exists() {
                        std::fs::remove_file(&p).map_err(io_err(&p))?;
                    }
                }
            }
            _ => {}
        }
        let path = dir.join(DATA_FILE);
        let recorded =
            match std::fs::read(&path) {
                Ok(bytes) => Some(serde_json::from_slice::<DataFingerprint>(&bytes).map_err(
                    |e| TrainError::State {
                        path: path.clone(),
                        message: e.to_string(),
                    },
                )?),
                Err(_) => None,
            };
        match recorded {
            // A new run records its own data, whatever an earlier attempt left.
            _ if !resume => {
                let text = serde_json::to_vec_pretty(data)?;
                teamtune_formats::write_atomic(&path, &text).map_err(io_err(&path))?;
            }
            Some(old) if old.fingerprint != data.fingerprint => {
                if mode == OpenMode::Resume {
                    return Err(TrainError::Config(format!(
                        "the run in {} was made with other training data ({}, fingerprint {}) \
                         than --data ({}, fingerprint {}): resume it with its own data, or give \
                         --force to continue on this data",
                        dir.display(),
                        old.files.join(", "),
                        old.fingerprint,
                        data.files.join(", "),
                        data.fingerprint
                    )));
                }
                tracing::warn!(
                    "continuing {} on other training data than it was made with (--force)",
                    dir.display()
                );
            }
            Some(_) => {}
            None => {
                let text = serde_json::to_vec_pretty(data)?;
                teamtune_formats::write_atomic(&path, &text).map_err(io_err(&path))?;
            }
        }
        Ok(folder)
    }

    /// Creates (if needed) and locks `dir` alone, without looking for a run in it: for a
    /// folder of other work (`teamtune improve`'s) that one process at a time may use.
    pub fn lock_only(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        RunFolder::lock(dir)
    }

    /// Takes `dir/.lock`, or fails naming the process that holds it.
    fn lock(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK);
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    writeln!(f, "{}", std::process::id()).map_err(io_err(&path))?;
                    return Ok(RunFolder {
                        dir: dir.to_path_buf(),
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path)
                        .ok()
                        .and_then(|s| s.trim().parse::<u32>().ok());
                    match holder {
                        Some(pid) if process_runs(pid) => {
                            return Err(TrainError::Config(format!(
                                "{} is in use by process {pid} (its lock is {}); wait for it, \
                                 or choose another --out",
                                dir.display(),
                                path.display()
                            )))
                        }
                        // Left by a process that is gone: take it over.
                        _ => {
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                Err(e) => return Err(io_err(&path)(e)),
            }
        }
        Err(TrainError::Config(format!(
            "cannot take the lock {}",
            path.display()
        )))
    }
}

impl Drop for RunFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(self.dir.join(LOCK));
    }
}

/// Whether a process with this id runs (Linux: `/proc/PID`; elsewhere assumed running, so a
/// stale lock is reported rather than broken).
fn process_runs(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if cfg!(target_os = "linux") {
        Path::new("/proc").join(pid.to_string()).exists()
    } else {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(dir: &Path, text: &str) -> DataFingerprint {
        let p = dir.join("data.jsonl");
        std::fs::write(&p, text).unwrap();
        DataFingerprint::of(&[p]).unwrap()
    }

    #[test]
    fn one_process_at_a_time_and_a_stale_lock_is_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let d = data(tmp.path(), "a");
        let held = RunFolder::open(&run, OpenMode::Fresh, &d).unwrap();
        let e = RunFolder::open(&run, OpenMode::Resume, &d).unwrap_err();
        assert!(e.to_string().contains("in use by process"), "{e}");
        drop(held);
        assert!(!run.join(LOCK).exists());
        // A lock whose process is gone (pid 0 is never a user process).
        std::fs::write(run.join(LOCK), "0\n").unwrap();
        RunFolder::open(&run, OpenMode::Resume, &d).unwrap();
    }

    #[test]
    fn a_finished_run_is_resumed_or_replaced_on_purpose_only() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let d = data(tmp.path(), "a");
        drop(RunFolder::open(&run, OpenMode::Fresh, &d).unwrap());
        std::fs::write(run.join("metrics.jsonl"), "{}\n").unwrap();
        let e = RunFolder::open(&run, OpenMode::Fresh, &d).unwrap_err();
        assert!(e.to_string().contains("already holds a run"), "{e}");
        assert!(run.join("metrics.jsonl").exists());
        drop(RunFolder::open(&run, OpenMode::Resume, &d).unwrap());
        drop(RunFolder::open(&run, OpenMode::Force { resume: false }, &d).unwrap());
        assert!(!run.join("metrics.jsonl").exists());
    }

    #[test]
    fn a_resume_with_other_data_is_refused_unless_forced() {
        let tmp = tempfile::tempdir().unwrap();
        let run = tmp.path().join("run");
        let a = data(tmp.path(), "a");
        drop(RunFolder::open(&run, OpenMode::Fresh, &a).unwrap());
        let b = data(tmp.path(), "b");
        assert_ne!(a.fingerprint, b.fingerprint);
        let e = RunFolder::open(&run, OpenMode::Resume, &b).unwrap_err();
        assert!(e.to_string().contains("other training data"), "{e}");
        drop(RunFolder::open(&run, OpenMode::Force { resume: true }, &b).unwrap());
        // The same data resumes.
        drop(RunFolder::open(&run, OpenMode::Resume, &a).unwrap());
    }
}
