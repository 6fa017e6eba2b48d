//! Splitting a run's episodes across machines (`--shard K/N`): shard K plays the K-th of N
//! slices of the plan, so N machines together play exactly the episodes one machine would.
//!
//! K is 0-based (0 to N-1), as Slurm's `$SLURM_ARRAY_TASK_ID` (with `--array=0-N-1`) and a
//! Kubernetes indexed Job's `$JOB_COMPLETION_INDEX` are, so a job script passes its index as
//! it comes. The slice is round-robin over the flat plan (episode i of the plan belongs to
//! shard i mod N): every episode is in exactly one shard, shard sizes differ by at most one,
//! and every shard plays every task when there are at least N episodes per task, so no shard
//! is stuck with the slowest task.
//!
//! What makes a shard's episodes those of the whole run: every source of randomness is seeded
//! per episode (the experts from the episode's seed; the model's sampler per turn from the
//! run's seed, the episode's seed, the agent and the turn, one sampler per batch row), so no
//! draw depends on the shard or on the episodes batched beside it. The model's logits can
//! still differ by float rounding with the batch (see the README's "Past one machine").

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The K-th (0-based) of N slices of a run's episodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// Why a `K/N` or a slice is refused, in words for the person who typed it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ShardError(pub String);

impl FromStr for Shard {
    type Err = ShardError;

    /// `K/N` with 0 <= K < N; the message does not repeat the value (the caller names the flag).
    fn from_str(s: &str) -> Result<Self, ShardError> {
        let expected =
            || ShardError("expected K/N, like 0/4 (shard K of N, K from 0 to N-1)".into());
        let (k, n) = s.trim().split_once('/').ok_or_else(expected)?;
        let number = |v: &str| -> Result<usize, ShardError> {
            let v = v.trim();
            if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                return Err(expected());
            }
            v.parse()
                .map_err(|_| ShardError(format!("{v} is too large a shard number")))
        };
        let (index, count) = (number(k)?, number(n)?);
        if count == 0 {
            return Err(ShardError("N must be at least 1".into()));
        }
        if index >= count {
            return Err(ShardError(format!(
                "K must be below N (the {count} shards are numbered 0 to {})",
                count - 1
            )));
        }
        Ok(Shard { index, count })
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl Shard {
    /// The whole run as one shard.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// The plan positions (of `total` episodes) this shard plays, in plan order. More shards
    /// than episodes is an error rather than empty shards: an empty shard is almost always a
    /// mistake in the job's array size, and would cost a machine for nothing.
    pub fn indices(&self, total: usize) -> Result<Vec<usize>, ShardError> {
        if self.index >= self.count {
            return Err(ShardError(format!("shard {self}: K must be below N")));
        }
        if self.count > total {
            return Err(ShardError(format!(
                "the run has only {total} episode{}, so it splits into at most {total} shard{}",
                if total == 1 { "" } else { "s" },
                if total == 1 { "" } else { "s" },
            )));
        }
        Ok((self.index..total).step_by(self.count).collect())
    }

    /// This shard's items of `plan` with their plan positions (see [`Shard::indices`]).
    pub fn select<T: Clone>(&self, plan: &[T]) -> Result<Vec<(usize, T)>, ShardError> {
        Ok(self
            .indices(plan.len())?
            .into_iter()
            .map(|i| (i, plan[i].clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::plan;
    use teamtune_gridworld::builtin_tasks;

    fn parse(s: &str) -> Result<Shard, String> {
        s.parse::<Shard>().map_err(|e| e.to_string())
    }

    #[test]
    fn k_of_n_parses_zero_based_and_refuses_in_plain_words() {
        assert_eq!(parse("0/4"), Ok(Shard { index: 0, count: 4 }));
        assert_eq!(parse(" 3/4 "), Ok(Shard { index: 3, count: 4 }));
        assert_eq!(parse("0/1"), Ok(Shard::WHOLE));
        assert_eq!(Shard { index: 2, count: 7 }.to_string(), "2/7");
        for bad in [
            "abc", "", "3", "1/", "/4", "-1/4", "1.0/4", "1/4/5", "a/4", "1/b", "+1/4",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.starts_with("expected K/N, like 0/4"), "{bad}: {err}");
        }
        assert!(parse("3/2").unwrap_err().starts_with("K must be below N"));
        assert!(parse("4/4").unwrap_err().contains("numbered 0 to 3"));
        assert_eq!(parse("0/0").unwrap_err(), "N must be at least 1");
        assert!(parse("0/99999999999999999999999")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn shards_partition_the_plan_round_robin_and_balanced() {
        for total in [1usize, 2, 5, 14, 70, 71] {
            for count in 1..=total.min(9) {
                let mut seen = vec![0usize; total];
                let mut sizes = Vec::new();
                for index in 0..count {
                    let mine = Shard { index, count }.indices(total).unwrap();
                    assert!(mine.windows(2).all(|w| w[0] < w[1]), "plan order");
                    assert!(mine.iter().all(|&i| i % count == index), "round-robin");
                    for &i in &mine {
                        seen[i] += 1;
                    }
                    sizes.push(mine.len());
                }
                assert!(seen.iter().all(|&n| n == 1), "{total}/{count}: {seen:?}");
                let (lo, hi) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
                assert!(hi - lo <= 1, "{total}/{count}: {sizes:?}");
            }
        }
    }

    #[test]
    fn every_shard_plays_every_task_and_the_seeds_of_the_whole_plan() {
        let tasks = builtin_tasks();
        let whole = plan(&tasks, 5, 100);
        let mut union = Vec::new();
        for index in 0..3 {
            let mine = Shard { index, count: 3 }.select(&whole).unwrap();
            let ids: std::collections::BTreeSet<_> =
                mine.iter().map(|(_, p)| p.task.id.clone()).collect();
            assert_eq!(ids.len(), tasks.len(), "shard {index} plays every task");
            for (i, p) in &mine {
                assert_eq!((&p.task.id, p.seed), (&whole[*i].task.id, whole[*i].seed));
            }
            union.extend(mine.into_iter().map(|(i, _)| i));
        }
        union.sort();
        assert_eq!(union, (0..whole.len()).collect::<Vec<_>>());
    }

    #[test]
    fn more_shards_than_episodes_is_an_error_naming_the_limit() {
        let err = Shard { index: 0, count: 8 }
            .indices(7)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("only 7 episodes") && err.contains("at most 7 shards"),
            "{err}"
        );
        let err = Shard { index: 1, count: 2 }
            .indices(1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("only 1 episode,"), "{err}");
        assert_eq!(Shard { index: 6, count: 7 }.indices(7).unwrap(), vec![6]);
    }
}
