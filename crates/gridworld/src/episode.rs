//! The turn loop as a state machine.
//!
//! ```no_run
//! use teamtune_gridworld::{Episode, TaskSpec};
//! let spec = TaskSpec::builtin("corners").unwrap();
//! let mut ep = Episode::new(&spec, 7).unwrap();
//! while let Some(turn) = ep.current() {
//!     let _prompt = ep.messages(turn.agent); // system, user, assistant, ..., user
//!     let reply = r#"{"action_name":"skip"}"#; // from a policy
//!     ep.submit(reply).unwrap();
//! }
//! let record = ep.record();
//! ```
//!
//! One turn: the agent whose turn it is gets a user message (built when the turn starts; its
//! inbox is emptied into it), answers with text, the reply is parsed; if usable its message is
//! delivered to every other agent's inbox, its action applied and its memory extended; the
//! score is recomputed. A reply that cannot be used is a wasted turn whose reason the agent
//! reads next turn. The episode ends when the score reaches 100 or after the last round.

use crate::error::EpisodeError;
use crate::observe::{Briefing, CellView, GoalView, InboxMessage, Observation};
use crate::reply::{parse_reply, Reply, ReplyError};
use crate::task::{ActionName, TaskKind, TaskSpec};
use crate::world::World;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use teamtune_formats::{Message, Role, EPISODE_FORMAT};

/// Memory beyond this many characters drops its oldest notes.
pub const MAX_MEMORY_TOTAL_CHARS: usize = 600;

/// The system message plus the last `keep` messages of a conversation, starting at a user
/// message (the inference window; the original kept 8).
pub fn window(messages: &[Message], keep: usize) -> Vec<Message> {
    let Some(first) = messages.first() else {
        return Vec::new();
    };
    let rest = &messages[1..];
    let mut start = rest.len().saturating_sub(keep);
    while start < rest.len() && rest[start].role != Role::User {
        start += 1;
    }
    let mut out = vec![first.clone()];
    out.extend_from_slice(&rest[start..]);
    out
}

/// Why an episode ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The score reached 100.
    Solved,
    /// The last round was played.
    RoundLimit,
}

/// Whose turn it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Turn<'a> {
    pub agent: usize,
    pub name: &'a str,
    /// 1-based.
    pub round: u32,
    pub observation: &'a Observation,
    pub user_message: &'a str,
}

/// What a submitted reply did.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnOutcome {
    pub agent: usize,
    pub reply: Result<Reply, ReplyError>,
    /// The observation text of the result (the agent's next `Last:`).
    pub result: String,
    pub score: f64,
    pub done: bool,
}

/// One turn of the audit log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TurnRecord {
    pub round: u32,
    pub agent: usize,
    pub name: String,
    /// `None` for a reply that could not be used.
    pub action: Option<ActionName>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub action_parameters: Map<String, Value>,
    /// Why the reply could not be used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The message sent ("" for none).
    pub message: String,
    pub result: String,
    /// Score after this turn.
    pub score: f64,
}

/// One agent's conversation, directly in the training format of the data loader:
/// `{"messages": [...], "task": ..., "score": ..., ...}`; extra fields are kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingConversation {
    pub messages: Vec<Message>,
    pub task: String,
    /// The episode's final score.
    pub score: f64,
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub agent: String,
    #[serde(flatten, default)]
    pub extra: Map<String, Value>,
}

impl TrainingConversation {
    /// One conversation per assistant turn, holding what a policy with history window `keep`
    /// ([`window`]) saw at that turn, then its reply: training data that matches inference
    /// with `--history keep`. `keep` 1 gives `[system, user, assistant]` per turn.
    pub fn windows(&self, keep: usize) -> Vec<TrainingConversation> {
        self.messages
            .iter()
            .enumerate()
            .filter(|(k, m)| *k > 0 && m.role == Role::Assistant)
            .map(|(k, m)| {
                let mut messages = window(&self.messages[..k], keep);
                messages.push(m.clone());
                let mut extra = self.extra.clone();
                extra.insert("turn".into(), Value::from(k / 2));
                TrainingConversation {
                    messages,
                    extra,
                    ..self.clone()
                }
            })
            .collect()
    }
}

/// An episode: enough to replay and audit it; its conversations are training lines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpisodeRecord {
    pub format: String,
    pub task: String,
    pub seed: u64,
    /// The full task parameters (a user variant replays without its TOML file).
    pub spec: TaskSpec,
    /// Who played (free text set by the caller, e.g. "expert").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    pub width: i32,
    pub height: i32,
    /// Names in turn order.
    pub agents: Vec<String>,
    pub final_score: f64,
    pub rounds_played: u32,
    /// `None` when recorded before the end.
    pub end: Option<EndReason>,
    pub turns: Vec<TurnRecord>,
    /// One per agent, in turn order.
    pub conversations: Vec<TrainingConversation>,
}

impl EpisodeRecord {
    /// The training lines of this episode: one conversation per agent.
    pub fn training_lines(&self) -> Vec<TrainingConversation> {
        self.conversations.clone()
    }

    /// Count of turns whose reply could not be used.
    pub fn invalid_replies(&self) -> usize {
        self.turns.iter().filter(|t| t.action.is_none()).count()
    }
}

/// The episode state machine.
#[derive(Debug, Clone)]
pub struct Episode {
    spec: TaskSpec,
    seed: u64,
    world: World,
    briefings: Vec<Briefing>,
    conversations: Vec<Vec<Message>>,
    memories: Vec<Vec<String>>,
    inboxes: Vec<Vec<InboxMessage>>,
    last: Vec<String>,
    round: u32,
    agent: usize,
    pending: Option<(Observation, String)>,
    turns: Vec<TurnRecord>,
    end: Option<EndReason>,
    snapshots: Vec<(u32, World)>,
}

impl Episode {
    /// A new episode of `spec` drawn from `seed`; the first turn is ready.
    pub fn new(spec: &TaskSpec, seed: u64) -> Result<Episode, EpisodeError> {
        let world = World::generate(spec, seed)?;
        Ok(Self::from_world(spec, seed, world))
    }

    /// An episode on a hand-built world (tests, puzzles). `seed` is only recorded.
    pub fn from_world(spec: &TaskSpec, seed: u64, world: World) -> Episode {
        let n = world.agents.len();
        let briefings: Vec<Briefing> = (0..n).map(|i| Briefing::new(spec, &world, i)).collect();
        let conversations = briefings
            .iter()
            .map(|b| vec![Message::system(b.system_message())])
            .collect();
        let last = world
            .agents
            .iter()
            .map(|a| format!("you start at {}.", a.pos))
            .collect();
        let mut ep = Episode {
            spec: spec.clone(),
            seed,
            briefings,
            conversations,
            memories: vec![Vec::new(); n],
            inboxes: vec![Vec::new(); n],
            last,
            round: 1,
            agent: 0,
            pending: None,
            turns: Vec::new(),
            end: None,
            snapshots: vec![(0, world.clone())],
            world,
        };
        if ep.world.is_complete() {
            ep.end = Some(EndReason::Solved);
        } else {
            ep.prepare();
        }
        ep
    }

    fn prepare(&mut self) {
        let i = self.agent;
        let world = &self.world;
        let obs = Observation {
            round: self.round,
            rounds: self.spec.rounds,
            score: world.score(),
            memory: self.memories[i].clone(),
            goal: GoalView::new(world, i, self.spec.owners_in_goal),
            last: self.last[i].clone(),
            pos: world.agents[i].pos,
            holding: world.agents[i].holding.map(|k| world.items[k].id),
            cell: CellView::new(world, i),
            inbox: std::mem::take(&mut self.inboxes[i]),
            carry: world.kind == TaskKind::Carry,
        };
        let text = obs.user_message();
        self.conversations[i].push(Message::user(text.clone()));
        self.pending = Some((obs, text));
    }

    /// The turn waiting for a reply; `None` once the episode is over.
    pub fn current(&self) -> Option<Turn<'_>> {
        let (obs, text) = self.pending.as_ref()?;
        Some(Turn {
            agent: self.agent,
            name: &self.world.agents[self.agent].name,
            round: self.round,
            observation: obs,
            user_message: text,
        })
    }

    /// Parses and applies the reply of the agent whose turn it is.
    pub fn submit(&mut self, reply_text: &str) -> Result<TurnOutcome, EpisodeError> {
        let Some((_obs, _)) = self.pending.take() else {
            return Err(EpisodeError::Finished);
        };
        let i = self.agent;
        self.conversations[i].push(Message::assistant(reply_text));
        let parsed = parse_reply(reply_text, &self.briefings[i].actions);
        let (result, action, params, error, message) = match &parsed {
            Ok(reply) => {
                if !reply.message.is_empty() {
                    let from = self.world.agents[i].name.clone();
                    for (j, inbox) in self.inboxes.iter_mut().enumerate() {
                        if j != i {
                            inbox.push(InboxMessage {
                                from: from.clone(),
                                text: reply.message.clone(),
                            });
                        }
                    }
                }
                let result = self.world.apply(i, &reply.action());
                if !reply.add_memory.is_empty() {
                    let mem = &mut self.memories[i];
                    mem.push(reply.add_memory.clone());
                    while mem.len() > 1
                        && mem.iter().map(|m| m.chars().count() + 1).sum::<usize>()
                            > MAX_MEMORY_TOTAL_CHARS
                    {
                        mem.remove(0);
                    }
                }
                (
                    result,
                    Some(reply.action_name),
                    reply.action_parameters.clone(),
                    None,
                    reply.message.clone(),
                )
            }
            Err(e) => (
                format!("your reply was not used: {e}. Nothing happened."),
                None,
                Map::new(),
                Some(e.to_string()),
                String::new(),
            ),
        };
        if let Err(e) = &parsed {
            tracing::debug!(agent = %self.world.agents[i].name, error = %e, "unusable reply");
        }
        let score = self.world.score();
        self.turns.push(TurnRecord {
            round: self.round,
            agent: i,
            name: self.world.agents[i].name.clone(),
            action,
            action_parameters: params,
            error,
            message,
            result: result.clone(),
            score,
        });
        self.last[i] = result.clone();
        self.advance();
        Ok(TurnOutcome {
            agent: i,
            reply: parsed,
            result,
            score,
            done: self.end.is_some(),
        })
    }

    /// Serialises `reply` and submits it.
    pub fn submit_reply(&mut self, reply: &Reply) -> Result<TurnOutcome, EpisodeError> {
        self.submit(&reply.to_json())
    }

    fn advance(&mut self) {
        if self.world.is_complete() {
            self.end = Some(EndReason::Solved);
            self.snapshots.push((self.round, self.world.clone()));
            return;
        }
        self.agent += 1;
        if self.agent == self.world.agents.len() {
            self.snapshots.push((self.round, self.world.clone()));
            self.agent = 0;
            self.round += 1;
            if self.round > self.spec.rounds {
                self.end = Some(EndReason::RoundLimit);
                self.round = self.spec.rounds;
                return;
            }
        }
        self.prepare();
    }

    pub fn is_done(&self) -> bool {
        self.end.is_some()
    }

    pub fn end_reason(&self) -> Option<EndReason> {
        self.end
    }

    /// The current score (always up to date).
    pub fn score(&self) -> f64 {
        self.world.score()
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn spec(&self) -> &TaskSpec {
        &self.spec
    }

    /// The current round (1-based; the last round once over).
    pub fn round(&self) -> u32 {
        self.round
    }

    pub fn agent_count(&self) -> usize {
        self.world.agents.len()
    }

    pub fn agent_names(&self) -> Vec<&str> {
        self.world.agents.iter().map(|a| a.name.as_str()).collect()
    }

    /// What agent `i`'s system message says, as data.
    pub fn briefing(&self, i: usize) -> &Briefing {
        &self.briefings[i]
    }

    /// Agent `i`'s conversation so far (system first; ends with the pending user message when
    /// it is `i`'s turn).
    pub fn messages(&self, i: usize) -> &[Message] {
        &self.conversations[i]
    }

    /// The ground truth, for rendering and tests. Policies must not read it.
    pub fn world(&self) -> &World {
        &self.world
    }

    pub fn turns(&self) -> &[TurnRecord] {
        &self.turns
    }

    /// The world at the start (round 0) and after each round (and at a mid-round end).
    pub fn snapshots(&self) -> &[(u32, World)] {
        &self.snapshots
    }

    /// The record of the episode so far.
    pub fn record(&self) -> EpisodeRecord {
        let score = self.world.score();
        let rounds_played = self.turns.last().map(|t| t.round).unwrap_or(0);
        EpisodeRecord {
            format: EPISODE_FORMAT.to_string(),
            task: self.spec.id.clone(),
            seed: self.seed,
            spec: self.spec.clone(),
            policy: None,
            width: self.world.width,
            height: self.world.height,
            agents: self.world.agents.iter().map(|a| a.name.clone()).collect(),
            final_score: score,
            rounds_played,
            end: self.end,
            turns: self.turns.clone(),
            conversations: self
                .conversations
                .iter()
                .zip(&self.world.agents)
                .map(|(msgs, a)| TrainingConversation {
                    messages: msgs.clone(),
                    task: self.spec.id.clone(),
                    score,
                    seed: self.seed,
                    agent: a.name.clone(),
                    extra: Map::new(),
                })
                .collect(),
        }
    }
}

/// What a replay found.
#[derive(Debug, Clone)]
pub struct ReplayReport {
    pub turns: usize,
    pub final_score: f64,
    /// Empty when the replay matched the record turn by turn.
    pub mismatches: Vec<String>,
    /// The replayed episode (for rendering).
    pub episode: Episode,
}

impl ReplayReport {
    pub fn is_ok(&self) -> bool {
        self.mismatches.is_empty()
    }
}

/// Re-runs a record's replies on a fresh episode from its spec and seed and checks that the
/// world, user messages, actions and scores come out the same.
pub fn replay(record: &EpisodeRecord) -> Result<ReplayReport, EpisodeError> {
    let mut ep = Episode::new(&record.spec, record.seed)?;
    let mut mismatches = Vec::new();
    let names: Vec<String> = ep.agent_names().iter().map(|s| s.to_string()).collect();
    if names != record.agents || ep.world.width != record.width || ep.world.height != record.height
    {
        mismatches.push(format!(
            "world differs: {}x{} {:?} replayed, {}x{} {:?} recorded",
            ep.world.width, ep.world.height, names, record.width, record.height, record.agents
        ));
        return Ok(ReplayReport {
            turns: 0,
            final_score: ep.score(),
            mismatches,
            episode: ep,
        });
    }
    // The k-th assistant message of each agent, in order.
    let mut replies: Vec<std::vec::IntoIter<String>> = record
        .conversations
        .iter()
        .map(|c| {
            c.messages
                .iter()
                .filter(|m| m.role == Role::Assistant)
                .map(|m| m.content.clone())
                .collect::<Vec<_>>()
                .into_iter()
        })
        .collect();
    let mut done = 0;
    for (k, t) in record.turns.iter().enumerate() {
        let Some(turn) = ep.current() else {
            mismatches.push(format!(
                "turn {k}: the replay ended but {} turns were recorded",
                record.turns.len()
            ));
            break;
        };
        if turn.agent != t.agent {
            mismatches.push(format!(
                "turn {k}: agent {} plays, record says {}",
                turn.agent, t.agent
            ));
            break;
        }
        let Some(reply) = replies.get_mut(t.agent).and_then(|it| it.next()) else {
            mismatches.push(format!("turn {k}: no recorded reply for agent {}", t.agent));
            break;
        };
        let out = ep.submit(&reply)?;
        done += 1;
        let action = out.reply.as_ref().ok().map(|r| r.action_name);
        if action != t.action {
            mismatches.push(format!(
                "turn {k}: action {action:?} replayed, {:?} recorded",
                t.action
            ));
        }
        if out.result != t.result {
            mismatches.push(format!(
                "turn {k}: result {:?} replayed, {:?} recorded",
                out.result, t.result
            ));
        }
        if out.score != t.score {
            mismatches.push(format!(
                "turn {k}: score {} replayed, {} recorded",
                out.score, t.score
            ));
        }
    }
    if mismatches.is_empty() {
        if ep.score() != record.final_score {
            mismatches.push(format!(
                "final score {} replayed, {} recorded",
                ep.score(),
                record.final_score
            ));
        }
        if ep.end != record.end {
            mismatches.push(format!(
                "end {:?} replayed, {:?} recorded",
                ep.end, record.end
            ));
        }
        for (i, c) in record.conversations.iter().enumerate() {
            if let Some(mine) = ep.conversations.get(i) {
                if *mine != c.messages {
                    let at = mine
                        .iter()
                        .zip(&c.messages)
                        .position(|(a, b)| a != b)
                        .unwrap_or(mine.len().min(c.messages.len()));
                    mismatches.push(format!("conversation of {}: message {at} differs", c.agent));
                }
            }
        }
    }
    Ok(ReplayReport {
        turns: done,
        final_score: ep.score(),
        mismatches,
        episode: ep,
    })
}
