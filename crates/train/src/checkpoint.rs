//! Checkpoints: `checkpoints/step-NNNNNN/{adapter/, optimizer.*, trainer_state.json}`, each
//! written into a temporary folder and renamed into place, with `checkpoints/latest` naming
//! the newest; and reading one back for an exact resume.

use std::path::{Path, PathBuf};

use candle_core::Var;
use serde::{Deserialize, Serialize};
use teamtune_llama::Llama;

use crate::error::{io_err, Result, TrainError};
use crate::optim::AdamW;
use crate::schedule::Schedule;

/// Where training stands; saved in each checkpoint as `trainer_state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: usize,
    pub total_steps: usize,
    /// Current epoch and the index of its next micro-batch (data position).
    pub epoch: usize,
    pub batch_in_epoch: usize,
    /// The data order and the dropout masks are pure functions of (seed, epoch, step): this is
    /// the whole RNG state.
    pub seed: u64,
    pub schedule: Schedule,
    pub last_loss: Option<f64>,
}

/// A checkpoint folder itself, or a run folder whose latest checkpoint is meant: the
/// `step-N` folder with the highest N. Checkpoints are renamed into place whole, so every such
/// folder is complete; the `latest` file is written after the rename, and a process killed in
/// between leaves it naming the previous checkpoint (or missing), so it is not what decides.
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join("trainer_state.json").is_file() {
        return Ok(path.to_owned());
    }
    let root = path.join("checkpoints");
    let entries = std::fs::read_dir(&root).map_err(io_err(&root))?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step: u64 = name.strip_prefix("step-")?.parse().ok()?;
            e.path()
                .join("trainer_state.json")
                .is_file()
                .then(|| (step, e.path()))
        })
        .max_by_key(|(step, _)| *step)
        .map(|(_, dir)| dir)
        .ok_or_else(|| TrainError::State {
            path: root.clone(),
            message: "no checkpoint (step-N folder) to resume from".into(),
        })
}

/// Writes a checkpoint of `adapter` under `run/checkpoints` and returns its folder.
pub fn save(
    run: &Path,
    model: &Llama,
    adapter: &str,
    opt: &AdamW,
    state: &TrainerState,
) -> Result<PathBuf> {
    let root = run.join("checkpoints");
    let name = format!("step-{:06}", state.step);
    let tmp = root.join(format!(".tmp-{name}"));
    let dir = root.join(&name);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    model.save_adapter(adapter, &tmp.join("adapter"))?;
    opt.save(&tmp)?;
    let sp = tmp.join("trainer_state.json");
    std::fs::write(&sp, serde_json::to_vec_pretty(state)?).map_err(io_err(&sp))?;
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
    }
    std::fs::rename(&tmp, &dir).map_err(io_err(&dir))?;
    let latest = root.join("latest");
    teamtune_formats::write_atomic(&latest, name.as_bytes()).map_err(io_err(&latest))?;
    tracing::info!(step = state.step, dir = %dir.display(), "checkpoint");
    Ok(dir)
}

/// Restores the adapter weights `vars` and the optimizer from checkpoint `dir`.
pub fn load(
    dir: &Path,
    vars: &[(String, Var)],
    opt: &mut AdamW,
    model: &Llama,
) -> Result<TrainerState> {
    let sp = dir.join("trainer_state.json");
    let text = std::fs::read(&sp).map_err(io_err(&sp))?;
    let state: TrainerState = serde_json::from_slice(&text).map_err(|e| TrainError::State {
        path: sp.clone(),
        message: e.to_string(),
    })?;
    let wpath = dir.join("adapter").join("adapter_model.safetensors");
    let tensors =
        candle_core::safetensors::load(&wpath, model.device()).map_err(|e| TrainError::State {
            path: wpath.clone(),
            message: format!("cannot read the checkpoint's adapter (truncated or corrupt?): {e}"),
        })?;
    for (name, var) in vars {
        let t = tensors.get(name).ok_or_else(|| TrainError::State {
            path: wpath.clone(),
            message: format!("missing {name}"),
        })?;
        if t.dims() != var.dims() {
            return Err(TrainError::State {
                path: wpath.clone(),
                message: format!("{name}: shape {:?} != {:?}", t.dims(), var.dims()),
            });
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    opt.load(dir, model.device())?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_highest_complete_step_is_resumed_whatever_latest_says() {
        let run = tempfile::tempdir().unwrap();
        let root = run.path().join("checkpoints");
        let e = resolve(run.path()).unwrap_err();
        assert!(e.to_string().contains("checkpoints"), "{e}");
        for step in ["step-000001", "step-000003"] {
            std::fs::create_dir_all(root.join(step)).unwrap();
            std::fs::write(root.join(step).join("trainer_state.json"), "{}").unwrap();
        }
        // Killed between the rename and the pointer: latest names the older one, or is gone.
        std::fs::write(root.join("latest"), "step-000001").unwrap();
        assert_eq!(resolve(run.path()).unwrap(), root.join("step-000003"));
        std::fs::remove_file(root.join("latest")).unwrap();
        assert_eq!(resolve(run.path()).unwrap(), root.join("step-000003"));
        // A half-written temporary folder is not a checkpoint.
        std::fs::create_dir_all(root.join(".tmp-step-000004")).unwrap();
        std::fs::create_dir_all(root.join("step-000005")).unwrap();
        assert_eq!(resolve(run.path()).unwrap(), root.join("step-000003"));
        // A checkpoint folder is itself.
        let own = root.join("step-000001");
        assert_eq!(resolve(&own).unwrap(), own);
    }
}
