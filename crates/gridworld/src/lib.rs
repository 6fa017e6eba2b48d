//! The cooperative grid-world of teamtune (shared/GRIDWORLD.md): seven tasks with their
//! parameters as data, scoring, the text of system and user messages, tolerant reply parsing,
//! the turn loop, episode records (whose conversations are training lines), replay, rendering
//! and scripted experts.
//!
//! It must not own anything about models, tokens or training: its conversations are plain
//! [`Message`]s (`teamtune-formats`), which the data crate templates and the agents prompt with.
//!
//! The agent runtime drives an [`Episode`]: [`Episode::current`] gives whose turn it is and its
//! user message, [`Episode::messages`] the agent's whole conversation (trim it with
//! [`window`]), [`Episode::submit`] takes the reply text; [`Episode::record`] gives the
//! [`EpisodeRecord`] to write with [`append_records`].

mod episode;
mod error;
mod expert;
mod geom;
mod observe;
mod record;
mod render;
mod reply;
mod task;
mod world;

pub use episode::{
    replay, window, EndReason, Episode, EpisodeRecord, ReplayReport, TrainingConversation, Turn,
    TurnOutcome, TurnRecord,
};
pub use error::{EpisodeError, RecordError, RenderError, SpecError};
pub use expert::{play_expert, Expert, RandomPolicy};
pub use geom::{Dir, Pos};
pub use observe::{Briefing, CellView, GoalView, Observation};
pub use record::{append_records, read_record, read_records, training_lines, write_jsonl_atomic};
pub use render::{render_record, render_snapshots, render_text};
pub use reply::{
    parse_reply, Reply, ReplyError, MAX_MEMORY_CHARS, MAX_MESSAGE_CHARS, MAX_REPLY_CHARS,
    MAX_TEXT_CHARS,
};
pub use task::{builtin_tasks, ActionName, TaskKind, TaskRegistry, TaskSpec, BUILTIN_IDS, NAMES};
/// The chat message of the conversations an episode writes: the one message model of teamtune.
pub use teamtune_formats::{Message, Role};
pub use world::{Action, Item, World};
