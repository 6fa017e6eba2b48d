//! Who answers a turn. Every policy takes the waiting turns of several episodes at once, so
//! that the model policy can decode them as one batch; the others simply loop.

use teamtune_gridworld::{Briefing, Expert, Message, Observation, TaskSpec};

use crate::error::Result;

/// One agent's turn waiting for a reply.
#[derive(Debug, Clone, Copy)]
pub struct TurnRequest<'a> {
    /// The runner's slot of the episode: state kept per episode (caches, experts) is keyed by
    /// it and dropped by [`Policy::end_episode`].
    pub slot: usize,
    pub agent: usize,
    pub task: &'a TaskSpec,
    /// The episode's seed (experts draw from it; seeded sampling derives from it).
    pub seed: u64,
    pub briefing: &'a Briefing,
    pub observation: &'a Observation,
    /// The agent's conversation so far: system, then user/assistant turns, ending with the
    /// user message this reply answers.
    pub messages: &'a [Message],
}

/// A policy's answer to one turn.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyReply {
    pub text: String,
    /// Tokens the policy read as new input for this turn (0 where it does not know).
    pub prompt_tokens: usize,
    /// Tokens it generated (0 for the scripted experts).
    pub generated_tokens: usize,
}

pub trait Policy {
    /// A short name for records and tables (`expert`, `model`, `openai:<model>`).
    fn name(&self) -> String;

    /// Answers `requests` (at most one per episode), in their order.
    fn reply(&mut self, requests: &[TurnRequest<'_>]) -> Result<Vec<PolicyReply>>;

    /// The episode in `slot` ended: drop what was kept for it.
    fn end_episode(&mut self, _slot: usize) {}
}

/// The scripted experts of the grid-world, one per agent of each episode.
#[derive(Default)]
pub struct ExpertPolicy {
    experts: std::collections::HashMap<(usize, usize), Expert>,
}

impl Policy for ExpertPolicy {
    fn name(&self) -> String {
        "expert".into()
    }

    fn reply(&mut self, requests: &[TurnRequest<'_>]) -> Result<Vec<PolicyReply>> {
        Ok(requests
            .iter()
            .map(|r| {
                let expert = self
                    .experts
                    .entry((r.slot, r.agent))
                    .or_insert_with(|| Expert::new(r.briefing.clone(), r.seed));
                PolicyReply {
                    text: expert.act(r.observation).to_json(),
                    ..Default::default()
                }
            })
            .collect())
    }

    fn end_episode(&mut self, slot: usize) {
        self.experts.retain(|(s, _), _| *s != slot);
    }
}
