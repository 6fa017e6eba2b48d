//! A shard's account of itself (`shard.json`) and the merge of N shards' folders back into
//! what the unsharded run writes.
//!
//! A shard's folder holds its episode records (from `collect`, also its training lines) and
//! `shard.json`: which shard of how many, the whole run's identity (policy, task definitions,
//! episodes, seed, every setting the output depends on) and, for each episode it played, the
//! episode's plan position and costs. The merge refuses shards of different runs, duplicates
//! and missing shards, checks every record against the plan, and puts everything back in
//! plan order.
//!
//! Records and training lines are copied byte for byte, never re-serialised: serde_json's
//! default float parser can be one unit in the last place off on 17-digit numbers, which would
//! change a score's text and every mean computed from it. For the same reason each record's
//! `final_score` is read with Rust's own (exact) parser.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use teamtune_formats::{SHARD_FILE, SHARD_FORMAT};
use teamtune_gridworld::{EpisodeRecord, TaskSpec};

use crate::runner::PlayedEpisode;
use crate::shard::{Shard, ShardError};

/// What makes two shards slices of the same run: equal identities, and nothing else.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunIdentity {
    /// The policy's name (`expert`, `model:<model>[+adapter]`, `openai:<model>`).
    pub policy: String,
    /// The full definitions of the tasks, in plan order (a variant with a known id but other
    /// parameters is another run).
    pub tasks: Vec<Value>,
    pub episodes: u64,
    pub seed: u64,
    /// Everything else the output depends on, as the command records it (for `eval`, the
    /// `settings` of its eval.json; for `collect`, also `--min-score` and `--history`).
    pub settings: BTreeMap<String, Value>,
}

impl RunIdentity {
    /// The identity of a run of `tasks` x `episodes` from `seed` by the policy `policy`.
    pub fn new(
        policy: String,
        tasks: &[TaskSpec],
        episodes: u64,
        seed: u64,
        settings: BTreeMap<String, Value>,
    ) -> serde_json::Result<Self> {
        Ok(RunIdentity {
            policy,
            tasks: tasks
                .iter()
                .map(serde_json::to_value)
                .collect::<serde_json::Result<_>>()?,
            episodes,
            seed,
            settings,
        })
    }
}

/// One episode a shard played.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEpisode {
    /// Position in the whole run's plan.
    pub index: usize,
    pub task: String,
    pub seed: u64,
    /// Its record is in the records file (`collect --min-score` leaves the others out).
    pub kept: bool,
    /// Training lines its record gave in the training file (`collect --training-out`).
    #[serde(default)]
    pub training_lines: usize,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Wall time of the policy calls, shared among the turns of each call (as in eval.json).
    pub seconds: f64,
}

impl ShardEpisode {
    /// Episode `index` of the plan, played as `played`, its record kept.
    pub fn new(index: usize, played: &PlayedEpisode) -> Self {
        ShardEpisode {
            index,
            task: played.record.task.clone(),
            seed: played.record.seed,
            kept: true,
            training_lines: 0,
            prompt_tokens: played.prompt_tokens,
            generated_tokens: played.generated_tokens,
            seconds: played.seconds,
        }
    }
}

/// `shard.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardManifest {
    pub format: String,
    /// The command that wrote it (`eval`, `collect`): a shard merges only with its own kind.
    pub command: String,
    pub shard: Shard,
    pub run: RunIdentity,
    /// The file of its episode records, in the same folder.
    pub records: String,
    /// The file of its training lines, in the same folder (collect with `--training-out`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<String>,
    /// The episodes it played, in plan order.
    pub episodes: Vec<ShardEpisode>,
    pub wall_seconds: f64,
}

fn err<T>(message: String) -> Result<T, ShardError> {
    Err(ShardError(message))
}

impl ShardManifest {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(SHARD_FILE)
    }

    /// Writes `dir/shard.json` (temporary file, then rename).
    pub fn write(&self, dir: &Path) -> Result<(), ShardError> {
        let path = Self::path(dir);
        let json = serde_json::to_vec_pretty(self).expect("a manifest serialises");
        teamtune_formats::write_atomic(&path, &json)
            .map_err(|e| ShardError(format!("writing {}: {e}", path.display())))
    }

    /// Reads the manifest of the shard folder `dir`, written by `teamtune {command} --shard`.
    pub fn read(dir: &Path, command: &str) -> Result<Self, ShardError> {
        if dir.is_file() {
            return err(format!(
                "{} is a file; give the shard's folder (the one holding {SHARD_FILE})",
                dir.display()
            ));
        }
        if !dir.is_dir() {
            return err(format!("{}: no such folder", dir.display()));
        }
        let path = Self::path(dir);
        if !path.is_file() {
            return err(format!(
                "{} holds no {SHARD_FILE}: it is not the output of `teamtune {command} --shard K/N`",
                dir.display()
            ));
        }
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ShardError(format!("reading {}: {e}", path.display())))?;
        let manifest: ShardManifest = serde_json::from_str(&text)
            .map_err(|e| ShardError(format!("{}: not a shard manifest ({e})", path.display())))?;
        if manifest.format != SHARD_FORMAT {
            return err(format!(
                "{} is of format `{}`; this teamtune reads `{SHARD_FORMAT}`",
                path.display(),
                manifest.format
            ));
        }
        if manifest.command != command {
            return err(format!(
                "{} is a shard of `teamtune {}`, not of `teamtune {command}`",
                dir.display(),
                manifest.command
            ));
        }
        for name in std::iter::once(&manifest.records).chain(&manifest.training) {
            if Path::new(name).file_name() != Some(std::ffi::OsStr::new(name)) {
                return err(format!(
                    "{} names `{name}`, which is not a file name in its folder",
                    path.display()
                ));
            }
        }
        Ok(manifest)
    }
}

/// N shards put back together, in the whole run's plan order.
#[derive(Debug)]
pub struct MergedRun {
    pub run: RunIdentity,
    pub shards: usize,
    /// The shards' wall times added up: machine time, not the time the merged run took.
    pub wall_seconds: f64,
    /// The kept episodes, their records read exactly.
    pub played: Vec<PlayedEpisode>,
    /// The kept episodes' record lines as the shards wrote them.
    pub record_lines: Vec<Box<RawValue>>,
    /// The training lines, in plan order; `Err(folder)`: that shard wrote none.
    pub training_lines: Result<Vec<Box<RawValue>>, PathBuf>,
    /// Episodes played but left out of the records (`collect --min-score`).
    pub pruned: usize,
}

/// The first place where `a` and `b` differ: (path, a's value, b's value).
fn difference(a: &Value, b: &Value, path: &str) -> Option<(String, String, String)> {
    let show = |v: Option<&Value>| {
        let s = v.map_or("absent".to_owned(), Value::to_string);
        if s.chars().count() > 80 {
            format!("{}...", s.chars().take(77).collect::<String>())
        } else {
            s
        }
    };
    let join = |key: &str| {
        if path.is_empty() {
            key.to_owned()
        } else {
            format!("{path}.{key}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys = x.keys().chain(y.keys().filter(|k| !x.contains_key(*k)));
            for k in keys {
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => {
                        if let Some(d) = difference(va, vb, &join(k)) {
                            return Some(d);
                        }
                    }
                    (va, vb) => return Some((join(k), show(va), show(vb))),
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (va, vb))| difference(va, vb, &format!("{path}[{i}]"))),
        _ if a == b => None,
        _ => Some((path.to_owned(), show(Some(a)), show(Some(b)))),
    }
}

/// Refuses a set of shards that is not exactly the N shards of one run.
fn check_set(shards: &[(PathBuf, ShardManifest)]) -> Result<(), ShardError> {
    let Some((d0, m0)) = shards.first() else {
        return err("no shard folders to merge".into());
    };
    let identity = |m: &ShardManifest| {
        let mut v = serde_json::to_value(&m.run).expect("an identity serialises");
        // The settings' own keys read better without the `settings.` prefix.
        if let Some(settings) = v.as_object_mut().and_then(|o| o.remove("settings")) {
            v.as_object_mut()
                .expect("an object")
                .extend(settings.as_object().cloned().unwrap_or_default());
        }
        v
    };
    let first = identity(m0);
    for (d, m) in &shards[1..] {
        if let Some((what, a, b)) = difference(&first, &identity(m), "") {
            return err(format!(
                "{} is a shard of another run than {}: its {what} is {b}, where {}'s is {a}",
                d.display(),
                d0.display(),
                d0.display()
            ));
        }
        if m.shard.count != m0.shard.count {
            return err(format!(
                "{} is shard {} and {} is shard {}: slices of {} and of {} shards do not merge",
                d.display(),
                m.shard,
                d0.display(),
                m0.shard,
                m.shard.count,
                m0.shard.count
            ));
        }
    }
    let count = m0.shard.count;
    let mut by_index: BTreeMap<usize, &PathBuf> = BTreeMap::new();
    for (d, m) in shards {
        if let Some(other) = by_index.insert(m.shard.index, d) {
            return err(format!(
                "shard {} given twice: {} and {}",
                m.shard,
                other.display(),
                d.display()
            ));
        }
    }
    let missing: Vec<String> = (0..count)
        .filter(|i| !by_index.contains_key(i))
        .map(|i| format!("{i}/{count}"))
        .collect();
    if !missing.is_empty() {
        return err(format!(
            "shard{} {} missing (the run was split into {count}; given: {})",
            if missing.len() == 1 { "" } else { "s" },
            missing.join(", "),
            by_index
                .keys()
                .map(|i| format!("{i}/{count}"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(())
}

/// The non-blank lines of a JSON Lines file.
fn lines(path: &Path) -> Result<Vec<(usize, String)>, ShardError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ShardError(format!("reading {}: {e}", path.display())))?;
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.to_owned()))
        .collect())
}

#[derive(Deserialize)]
struct ExactScore<'a> {
    #[serde(borrow)]
    final_score: &'a RawValue,
}

/// A record line: its exact text and the record, `final_score` read exactly.
fn record_of(
    path: &Path,
    line_no: usize,
    line: String,
) -> Result<(Box<RawValue>, EpisodeRecord), ShardError> {
    let at = || format!("{} line {line_no}", path.display());
    let mut record: EpisodeRecord = serde_json::from_str(&line)
        .map_err(|e| ShardError(format!("{}: not an episode record ({e})", at())))?;
    if record.format != teamtune_formats::EPISODE_FORMAT {
        return err(format!(
            "{}: a record of format `{}`; this teamtune reads `{}`",
            at(),
            record.format,
            teamtune_formats::EPISODE_FORMAT
        ));
    }
    let exact: ExactScore = serde_json::from_str(&line).expect("parsed above");
    record.final_score = exact
        .final_score
        .get()
        .parse()
        .map_err(|e| ShardError(format!("{}: final_score: {e}", at())))?;
    let raw = RawValue::from_string(line).expect("parsed above");
    Ok((raw, record))
}

struct Slot {
    kept: Option<(Box<RawValue>, PlayedEpisode)>,
    training: Vec<Box<RawValue>>,
}

/// Reads, checks and merges the shard folders `dirs` (any order) of `teamtune {command}`.
pub fn merge_shards(command: &str, dirs: &[PathBuf]) -> Result<MergedRun, ShardError> {
    let shards = dirs
        .iter()
        .map(|d| Ok((d.clone(), ShardManifest::read(d, command)?)))
        .collect::<Result<Vec<_>, ShardError>>()?;
    check_set(&shards)?;
    let run = shards[0].1.run.clone();
    let ids: Vec<String> = run
        .tasks
        .iter()
        .map(|t| t.get("id").and_then(Value::as_str).unwrap_or("").to_owned())
        .collect();
    let per_task = run.episodes as usize;
    let total = ids.len().saturating_mul(per_task);
    let mut slots: Vec<Option<Slot>> = (0..total).map(|_| None).collect();
    let mut wall_seconds = 0.0;
    let mut no_training = None;
    for (dir, m) in &shards {
        let manifest = ShardManifest::path(dir);
        let expected = m
            .shard
            .indices(total)
            .map_err(|e| ShardError(format!("{}: {e}", manifest.display())))?;
        let listed = m.episodes.len() == expected.len()
            && m.episodes.iter().zip(&expected).all(|(e, &i)| {
                e.index == i
                    && e.task == ids[i / per_task]
                    && e.seed == run.seed + (i % per_task) as u64
            });
        if !listed {
            return err(format!(
                "{} does not list the episodes of shard {} of its run (was it edited?)",
                manifest.display(),
                m.shard
            ));
        }
        wall_seconds += m.wall_seconds;
        let kept: Vec<&ShardEpisode> = m.episodes.iter().filter(|e| e.kept).collect();
        let records_path = dir.join(&m.records);
        let record_lines = lines(&records_path)?;
        if record_lines.len() != kept.len() {
            return err(format!(
                "{} holds {} records, but {} lists {} (was it changed after the shard ran?)",
                records_path.display(),
                record_lines.len(),
                manifest.display(),
                kept.len()
            ));
        }
        let mut training = match &m.training {
            Some(name) => {
                let path = dir.join(name);
                let all = lines(&path)?;
                let want: usize = kept.iter().map(|e| e.training_lines).sum();
                if all.len() != want {
                    return err(format!(
                        "{} holds {} training lines, but {} lists {want}",
                        path.display(),
                        all.len(),
                        manifest.display()
                    ));
                }
                let mut raws = Vec::with_capacity(all.len());
                for (n, l) in all {
                    raws.push(RawValue::from_string(l).map_err(|e| {
                        ShardError(format!("{} line {n}: not JSON ({e})", path.display()))
                    })?);
                }
                Some(raws.into_iter())
            }
            None => {
                no_training.get_or_insert_with(|| dir.clone());
                None
            }
        };
        let mut kept_lines = record_lines.into_iter();
        for e in &m.episodes {
            let mut slot = Slot {
                kept: None,
                training: Vec::new(),
            };
            if e.kept {
                let (n, line) = kept_lines.next().expect("counted above");
                let (raw, record) = record_of(&records_path, n, line)?;
                if (record.task.as_str(), record.seed) != (e.task.as_str(), e.seed) {
                    return err(format!(
                        "{} line {n} is {} seed {}, but {} lists {} seed {} there",
                        records_path.display(),
                        record.task,
                        record.seed,
                        manifest.display(),
                        e.task,
                        e.seed
                    ));
                }
                let played = PlayedEpisode {
                    record,
                    prompt_tokens: e.prompt_tokens,
                    generated_tokens: e.generated_tokens,
                    seconds: e.seconds,
                };
                slot.kept = Some((raw, played));
                if let Some(t) = training.as_mut() {
                    slot.training = t.by_ref().take(e.training_lines).collect();
                }
            }
            slots[e.index] = Some(slot);
        }
    }
    let mut merged = MergedRun {
        run,
        shards: shards.len(),
        wall_seconds,
        played: Vec::new(),
        record_lines: Vec::new(),
        training_lines: match no_training {
            Some(dir) => Err(dir),
            None => Ok(Vec::new()),
        },
        pruned: 0,
    };
    for slot in slots {
        let slot = slot.expect("the shards' slices cover the plan");
        match slot.kept {
            Some((raw, played)) => {
                merged.record_lines.push(raw);
                merged.played.push(played);
                if let Ok(t) = merged.training_lines.as_mut() {
                    t.extend(slot.training);
                }
            }
            None => merged.pruned += 1,
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn manifest(index: usize, count: usize, seed: u64) -> (PathBuf, ShardManifest) {
        let m = ShardManifest {
            format: SHARD_FORMAT.into(),
            command: "eval".into(),
            shard: Shard { index, count },
            run: RunIdentity {
                policy: "expert".into(),
                tasks: vec![json!({"id": "single_nav", "rounds": 3})],
                episodes: 6,
                seed,
                settings: [("settings".to_owned(), json!({"temperature": 0.0}))].into(),
            },
            records: "episodes.jsonl".into(),
            training: None,
            episodes: Vec::new(),
            wall_seconds: 1.0,
        };
        (PathBuf::from(format!("shard-{index}-s{seed}")), m)
    }

    #[test]
    fn a_set_is_refused_unless_it_is_every_shard_of_one_run_once() {
        let ok = vec![manifest(1, 3, 0), manifest(0, 3, 0), manifest(2, 3, 0)];
        check_set(&ok).unwrap();
        let e = check_set(&ok[..2]).unwrap_err().to_string();
        assert_eq!(
            e,
            "shard 2/3 missing (the run was split into 3; given: 0/3, 1/3)"
        );
        let e = check_set(&[manifest(1, 4, 0)]).unwrap_err().to_string();
        assert!(e.starts_with("shards 0/4, 2/4, 3/4 missing"), "{e}");
        let e = check_set(&[manifest(0, 2, 0), manifest(1, 2, 0), manifest(1, 2, 0)])
            .unwrap_err()
            .to_string();
        assert_eq!(e, "shard 1/2 given twice: shard-1-s0 and shard-1-s0");
        let e = check_set(&[manifest(0, 2, 0), manifest(1, 2, 5)])
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "shard-1-s5 is a shard of another run than shard-0-s0: its seed is 5, where \
             shard-0-s0's is 0"
        );
        let e = check_set(&[manifest(0, 2, 0), manifest(1, 3, 0)])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("slices of 3 and of 2 shards do not merge"),
            "{e}"
        );
        let mut hot = manifest(1, 2, 0);
        hot.1
            .run
            .settings
            .insert("settings".into(), json!({"temperature": 0.7}));
        let e = check_set(&[manifest(0, 2, 0), hot])
            .unwrap_err()
            .to_string();
        assert!(e.contains("its settings.temperature is 0.7, where"), "{e}");
        let mut variant = manifest(1, 2, 0);
        variant.1.run.tasks[0]["rounds"] = json!(4);
        let e = check_set(&[manifest(0, 2, 0), variant])
            .unwrap_err()
            .to_string();
        assert!(e.contains("its tasks[0].rounds is 4"), "{e}");
    }
}
