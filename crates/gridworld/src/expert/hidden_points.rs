//! Hidden points: find the hidden targets and stand on them all at once.
//!
//! The expert decides from one turn's prompt only: its memory (targets held: "I hold target
//! (2,3)." and "Bob holds target (0,1)."), this turn's inbox, its cell, and the goal line's
//! cells it has not stood on, nearest first. A model that sees one turn at a time (the demo's
//! window) has every fact of each decision in front of it, and the way to the cell it searches
//! next is printed beside that cell, to be copied as the other tasks' ways are.
//!
//! Rules, in order: a holder stays on its target; an agent on a target nobody holds takes it
//! (stays, says so, remembers it); otherwise it walks to the first cell of the goal's list that
//! no teammate has claimed this turn ("No target at (1,1). Next (1,0).": both cells) and no
//! teammate holds, announcing where it goes next.

use std::collections::{BTreeMap, BTreeSet};

use super::{nav_facts, Expert};
use crate::geom::Pos;
use crate::observe::{GoalView, Observation};
use crate::reply::Reply;
use crate::task::ActionName;

/// Who holds which found target, as memory lines say it.
const I_HOLD: &str = "I hold target ";
const HOLDS: &str = " holds target ";

/// The targets held, read from the agent's memory: `I` for its own.
fn held_targets(memory: &[String]) -> BTreeMap<Pos, String> {
    let mut held = BTreeMap::new();
    for line in memory {
        for sentence in line.split_inclusive(". ") {
            let sentence = sentence.trim();
            let Some(&at) = Pos::find_all(sentence).first() else {
                continue;
            };
            if sentence.starts_with(I_HOLD) {
                held.insert(at, "I".to_string());
            } else if let Some((who, _)) = sentence.split_once(HOLDS) {
                held.insert(at, who.to_string());
            }
        }
    }
    held
}

impl Expert {
    pub(super) fn hidden_points(&mut self, obs: &Observation) -> Reply {
        let here = obs.pos;
        let mut held = held_targets(&obs.memory);
        let mut memory = Vec::new();
        // cells a teammate says it has searched or goes to next
        let mut claimed = BTreeSet::new();
        for m in &obs.inbox {
            let cells = Pos::find_all(&m.text);
            if m.text.starts_with("Target at") {
                if let Some(&at) = cells.first() {
                    if held.get(&at) != Some(&m.from) {
                        memory.push(format!("{}{HOLDS}{at}.", m.from));
                    }
                    held.insert(at, m.from.clone());
                }
            } else if m.text.starts_with("No target at") {
                claimed.extend(cells);
            }
        }
        let memory = memory.join(" ");
        let holder = held.get(&here).cloned();
        // Every rationale starts with the cell as the prompt's Cell line gives it: what
        // follows (stay, or the next cell to search) is decided by a copied word.
        if holder.as_deref() == Some("I") {
            let mut r = Self::reply(
                ActionName::Skip,
                format!("At {here}, cell: a hidden target, so skip."),
            );
            r.add_memory = memory;
            return r;
        }
        if obs.cell.hidden_target && holder.is_none() {
            let mut r = Self::reply(
                ActionName::Skip,
                format!("At {here}, cell: a hidden target, so skip."),
            );
            if self.b.names.len() > 1 {
                r.message = format!("Target at {here}. I stay here.");
            }
            r.add_memory = [memory, format!("{I_HOLD}{here}.")]
                .join(" ")
                .trim()
                .to_string();
            return r;
        }
        let what = match &holder {
            Some(who) => format!("cell: a hidden target, {who}'s"),
            None => format!("cell: {}", obs.cell.text()),
        };
        let GoalView::HiddenPoints { unsearched, .. } = &obs.goal else {
            return Self::reply(
                ActionName::Skip,
                format!("At {here}, no cells given, so skip."),
            );
        };
        let taken = |p: &Pos| claimed.contains(p) || held.contains_key(p);
        let skipped: Vec<String> = unsearched
            .iter()
            .take_while(|p| taken(p))
            .map(|p| p.to_string())
            .collect();
        let Some(&next) = unsearched.iter().find(|p| !taken(p)) else {
            let mut r = Self::reply(
                ActionName::Skip,
                format!("At {here}, {what}; no cell left to search, so skip."),
            );
            r.add_memory = memory;
            return r;
        };
        let (a, facts) = nav_facts(here, next, ActionName::Skip);
        let rationale = if skipped.is_empty() {
            format!("At {here}, {what}; nearest not stood on {next}: {facts}.")
        } else {
            format!(
                "At {here}, {what}; {} taken; next not stood on {next}: {facts}.",
                skipped.join(", ")
            )
        };
        let mut r = Self::reply(a, rationale);
        if self.b.names.len() > 1 && holder.is_none() {
            r.message = format!("No target at {here}. Next {next}.");
        }
        r.add_memory = memory;
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_targets_are_read_from_memory_sentences() {
        let memory = vec![
            "I hold target (2,3).".to_string(),
            "Bob holds target (0,1). Eve holds target (4,4).".to_string(),
        ];
        let held = held_targets(&memory);
        assert_eq!(held[&Pos::new(2, 3)], "I");
        assert_eq!(held[&Pos::new(0, 1)], "Bob");
        assert_eq!(held[&Pos::new(4, 4)], "Eve");
        assert_eq!(held.len(), 3);
    }
}
