//! `--shard K/N` and `--merge DIR...` of `eval` and `collect`: parsing the flag, picking the
//! shard's episodes, and keeping a merge's outputs out of its inputs.

use std::path::{Path, PathBuf};

use anyhow::bail;
use teamtune_agents::{EpisodePlan, Shard};

/// `--shard K/N` as given, refused in words that name the flag and the value.
pub fn parse_shard(value: &str) -> anyhow::Result<Shard> {
    value
        .parse::<Shard>()
        .map_err(|e| anyhow::anyhow!("--shard {value}: {e}"))
}

/// The episodes of the plan that `shard` plays, with their positions in the whole plan (all of
/// them without `--shard`).
pub fn select(
    whole: &[EpisodePlan],
    shard: Option<Shard>,
    tasks: usize,
    episodes: u64,
) -> anyhow::Result<Vec<(usize, EpisodePlan)>> {
    let shard = shard.unwrap_or(Shard::WHOLE);
    shard.select(whole).map_err(|e| {
        anyhow::anyhow!(
            "--shard {shard}: {e} ({tasks} task{} x {episodes} episode{})",
            if tasks == 1 { "" } else { "s" },
            if episodes == 1 { "" } else { "s" },
        )
    })
}

/// Refuses an output of a merge (`flag`, `path`) that is one of the shard folders or lies
/// inside one: a merge never writes over, or into, what it reads.
pub fn check_merge_output(flag: &str, path: &Path, inputs: &[PathBuf]) -> anyhow::Result<()> {
    for dir in inputs {
        let (out, input) = (
            teamtune_formats::resolved(path),
            teamtune_formats::resolved(dir),
        );
        if out.starts_with(&input) {
            bail!(
                "{flag} {} is {} {}: a merge writes outside the shards it reads",
                path.display(),
                if out == input {
                    "the shard folder"
                } else {
                    "inside the shard folder"
                },
                dir.display()
            );
        }
    }
    Ok(())
}
