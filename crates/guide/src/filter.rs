//! A reply's constraint as the decoder's [`TokenFilter`]: the one adapter every decoder of the
//! workspace uses (the agents' model policy, the server's batch rows).

use teamtune_llama::{LlamaError, TokenFilter};

use crate::constraint::{ReplyConstraint, ReplyGrammar};

/// [`ReplyConstraint`] as a [`TokenFilter`]: masks each step, commits each token, hands the
/// decoder the forced tokens, and ends the row with the end-of-turn token.
#[derive(Debug, Clone)]
pub struct ConstraintFilter {
    constraint: ReplyConstraint,
    /// Forced tokens the constraint already committed in `fast_forward`; the decoder commits
    /// them again, which must be skipped.
    already_committed: usize,
}

impl ConstraintFilter {
    pub fn new(constraint: ReplyConstraint) -> Self {
        ConstraintFilter {
            constraint,
            already_committed: 0,
        }
    }

    pub fn constraint(&self) -> &ReplyConstraint {
        &self.constraint
    }
}

impl From<ReplyConstraint> for ConstraintFilter {
    fn from(constraint: ReplyConstraint) -> Self {
        ConstraintFilter::new(constraint)
    }
}

impl ReplyGrammar {
    /// The filter of one new reply: [`constraint`](Self::constraint) for a decoder.
    pub fn filter(&self) -> ConstraintFilter {
        ConstraintFilter::new(self.constraint())
    }
}

fn filter_err(e: impl std::fmt::Display) -> LlamaError {
    LlamaError::Filter(e.to_string())
}

impl TokenFilter for ConstraintFilter {
    fn forced(&mut self) -> Vec<u32> {
        match self.constraint.fast_forward() {
            Ok(tokens) => {
                self.already_committed += tokens.len();
                tokens
            }
            // The mask reports the same state as an error on the next call.
            Err(_) => Vec::new(),
        }
    }

    fn mask(&mut self, logits: &mut [f32]) -> teamtune_llama::Result<()> {
        self.constraint.mask_logits(logits).map_err(filter_err)
    }

    fn commit(&mut self, token: u32) -> teamtune_llama::Result<()> {
        if self.already_committed > 0 {
            self.already_committed -= 1;
            return Ok(());
        }
        self.constraint.commit(token).map_err(filter_err)
    }

    fn is_done(&self) -> bool {
        self.constraint.is_done()
    }
}
