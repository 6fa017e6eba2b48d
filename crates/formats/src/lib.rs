//! The formats teamtune's crates share, and the one way they are written.
//!
//! Owns: the chat message every crate speaks ([`Message`], [`Role`]: the grid-world writes it, the
//! data crate templates it, the agents prompt with it), the names and version tags of the files
//! one crate writes and another reads ([`EVAL_FORMAT`], [`EPISODE_FORMAT`], [`SHARD_FORMAT`],
//! [`METRICS_FILE`]), and
//! [`write_atomic`], the temporary-file-and-rename write that never leaves half a file, and the
//! path comparison commands use to refuse writing over their inputs ([`overlaps`],
//! [`same_path`]). Must not
//! own: the parsing or validation of any one file (each crate reads its own), models, tasks.

mod atomic;
mod message;
mod paths;

pub use atomic::{write_atomic, write_atomic_with};
pub use message::{Message, Role};
pub use paths::{overlaps, resolved, same_path};

/// Version tag of an evaluation's `eval.json` (written by the agents, read by reports).
pub const EVAL_FORMAT: &str = "teamtune-eval/1";

/// Version tag of one played episode's record (`episodes.jsonl`).
pub const EPISODE_FORMAT: &str = "teamtune-episode/1";

/// Version tag of a shard's `shard.json` (written by `eval`/`collect --shard`, read by their
/// `--merge`).
pub const SHARD_FORMAT: &str = "teamtune-shard/1";

/// The file in a shard's folder that says which shard of which run the folder holds.
pub const SHARD_FILE: &str = "shard.json";

/// The training run's metrics, one JSON object per line, in the run folder.
pub const METRICS_FILE: &str = "metrics.jsonl";
