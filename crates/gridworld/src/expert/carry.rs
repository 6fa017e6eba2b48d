//! Carry (single_pick, multi_pick, permission_pick): pick items, carry them, drop them on
//! targets.
//!
//! As in hidden points, the expert decides from one turn's prompt only. What it must not forget
//! it writes to its memory, which every prompt shows, in forms short enough for the reply
//! schema's memory field: its own claim while it walks to an item ("Mine: a."), teammates'
//! claims read in its inbox ("Bob takes b.", "Bob to (0,2).", "Bob dropped b."), and owners it
//! has learnt ("c is Eve's."). The goal lists items and targets nearest first, each with the way there, so the
//! item or target it heads for is the first free one of a list, and the way is copied.
//!
//! Rules: holding an item, it takes the first empty target no teammate brings an item to, and
//! drops when the way there is "here"; holding nothing, it takes the first item on the ground
//! (not on a target) that no teammate has claimed and that it may pick, and picks when the way
//! there is "here". What it holds comes first in every rationale ("holding nothing; item a",
//! "holding a; target"): that, not the cell, tells "here, so pick" from "here, so drop". A claim two agents made at once is kept by the one earlier in the
//! turn order.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::{nav_facts, Expert};
use crate::geom::Pos;
use crate::observe::{GoalView, ItemPlace, Observation};
use crate::reply::Reply;
use crate::task::ActionName;

/// What an agent's memory and this turn's inbox say about claims and owners.
#[derive(Default)]
struct Claims {
    /// The item this agent walks to.
    mine: Option<char>,
    /// Items teammates have claimed (not yet delivered), with the claimant.
    items: BTreeMap<char, String>,
    /// Targets teammates bring an item to.
    targets: BTreeMap<Pos, String>,
    /// Owners learnt from cells and messages (permissions hidden from the goal).
    owners: BTreeMap<char, String>,
}

fn item_id(rest: &str) -> Option<char> {
    rest.chars().next().filter(|c| c.is_ascii_lowercase())
}

impl Claims {
    /// Reads one memory sentence (the agent's own lines and those copied from its inbox).
    fn read_memory(&mut self, sentence: &str) {
        let cells = Pos::find_all(sentence);
        if let Some(rest) = sentence.strip_prefix("Mine: ") {
            self.mine = item_id(rest);
        } else if sentence.starts_with("Delivered ") || sentence.starts_with("Gave up ") {
            self.mine = None;
        } else if let Some((rest, owner)) = sentence.split_once(" is ") {
            if let Some(id) = item_id(rest).filter(|_| rest.len() == 1) {
                let owner = owner.split('\'').next().unwrap_or("").trim();
                if !owner.is_empty() {
                    self.owners.insert(id, owner.to_string());
                    // only its owner can carry it: any other claim on it is void
                    self.items.retain(|i, who| *i != id || who == owner);
                }
            }
        } else if let Some((who, rest)) = sentence.split_once(" takes ") {
            if let Some(id) = item_id(rest) {
                self.items.insert(id, who.to_string());
            }
        } else if let Some((who, _)) = sentence.split_once(" to (") {
            if let Some(&t) = cells.first() {
                self.targets.insert(t, who.to_string());
            }
        } else if let Some((who, rest)) = sentence.split_once(" dropped ") {
            if let Some(id) = item_id(rest) {
                self.items.retain(|i, w| !(*i == id && w == who));
                self.targets.retain(|_, w| w != who);
            }
        }
    }

    fn read_all_memory(memory: &[String]) -> Self {
        let mut claims = Claims::default();
        for line in memory {
            for sentence in line.split_inclusive(". ") {
                claims.read_memory(sentence.trim());
            }
        }
        claims
    }
}

/// A teammate's message as the memory line that keeps it (`None`: nothing to keep).
fn remembered(from: &str, sentence: &str) -> Option<String> {
    let cells = Pos::find_all(sentence);
    if let Some(rest) = sentence.strip_prefix("I take item ") {
        item_id(rest).map(|id| format!("{from} takes {id}."))
    } else if let Some(rest) = sentence.strip_prefix("I bring item ") {
        item_id(rest)?;
        cells.first().map(|t| format!("{from} to {t}."))
    } else if let Some(rest) = sentence.strip_prefix("Dropped item ") {
        item_id(rest).map(|id| format!("{from} dropped {id}."))
    } else if let Some(rest) = sentence.strip_prefix("Item ") {
        let id = item_id(rest)?;
        let (_, owner) = sentence.split_once(" is ")?;
        let owner = owner.split('\'').next()?.trim();
        (!owner.is_empty() && !owner.contains(' ')).then(|| format!("{id} is {owner}'s."))
    } else {
        None
    }
}

/// The parts of a carry reply built up over one turn.
#[derive(Default)]
struct Notes {
    rationale: Vec<String>,
    message: Vec<String>,
    memory: Vec<String>,
}

impl Notes {
    fn reply(self, action: ActionName, decision: String) -> Reply {
        let mut rationale = self.rationale;
        rationale.push(decision);
        let mut r = Expert::reply(action, rationale.join(" "));
        r.message = self.message.join(" ");
        r.add_memory = self.memory.join(" ");
        r
    }
}

impl Expert {
    pub(super) fn carry(&mut self, obs: &Observation) -> Reply {
        let me = self.b.my_name().to_string();
        let my_turn = self.b.me;
        let turn_of = |name: &str| self.b.names.iter().position(|n| n == name);
        let mut claims = Claims::read_all_memory(&obs.memory);
        let mut notes = Notes::default();
        for m in &obs.inbox {
            for sentence in m.text.split_inclusive(". ") {
                if let Some(line) = remembered(&m.from, sentence.trim()) {
                    claims.read_memory(&line);
                    notes.memory.push(line);
                }
            }
        }
        let here = obs.pos;
        let GoalView::Carry { items, targets } = &obs.goal else {
            return Self::reply(
                ActionName::Skip,
                format!("At {here}, no items given, so skip."),
            );
        };
        for it in items {
            if let Some(o) = &it.owner {
                claims.owners.insert(it.id, o.clone());
            }
        }
        let target_cells: BTreeSet<Pos> = targets.iter().map(|t| t.pos).collect();

        let alone = self.b.names.len() == 1;
        // The first empty target no teammate brings an item to, as the goal lists them
        // (nearest first): chosen afresh each turn, so nothing about it is remembered.
        let free_target = || {
            targets
                .iter()
                .filter(|tv| !tv.filled)
                .map(|tv| tv.pos)
                .find(|t| claims.targets.get(t).is_none_or(|who| *who == me))
        };
        if let Some(h) = obs.holding {
            let Some(t) = free_target() else {
                return notes.reply(
                    ActionName::Skip,
                    format!("At {here}, holding {h}; no free target, so skip."),
                );
            };
            if here == t && !alone {
                notes.message = vec![format!("Dropped item {h} on {t}.")];
                notes.memory.push(format!("Delivered {h}."));
            }
            // "here, so drop" as every arrival reads: the way printed beside the target
            let (a, facts) = nav_facts(here, t, ActionName::Drop);
            return notes.reply(a, format!("At {here}, holding {h}; target {t}: {facts}."));
        }

        // Holding nothing.
        let on_ground = |id: char| {
            items.iter().find_map(|it| match it.place {
                ItemPlace::Ground(p) if it.id == id && !target_cells.contains(&p) => Some(p),
                _ => None,
            })
        };
        for ci in &obs.cell.items {
            if let Some(o) = &ci.owner {
                if o != &me && claims.owners.get(&ci.id) != Some(o) {
                    // learnt here: tell the owner, remember it
                    notes
                        .message
                        .push(format!("Item {} at {here} is {o}'s.", ci.id));
                    notes.memory.push(format!("{} is {o}'s.", ci.id));
                }
                claims.owners.insert(ci.id, o.clone());
            }
        }
        let may = |id: char| claims.owners.get(&id).is_none_or(|o| *o == me);
        // a teammate's claim on an item: it keeps it unless mine came first in turn order
        let theirs = |id: char| {
            claims.items.get(&id).is_some_and(|who| {
                let mine_too = claims.mine == Some(id);
                *who != me && (!mine_too || turn_of(who).is_none_or(|t| t < my_turn))
            })
        };
        let mine = claims
            .mine
            .filter(|&id| on_ground(id).is_some() && may(id) && !theirs(id));
        if let Some(id) = claims.mine {
            if mine.is_none() {
                notes.memory.push(format!("Gave up {id}."));
                if !may(id) {
                    notes.rationale.push(format!("Item {id} is not mine."));
                }
            }
        }
        let id = match mine {
            Some(id) => id,
            None => {
                let skipped: Vec<String> = items
                    .iter()
                    .take_while(|it| {
                        matches!(it.place, ItemPlace::Ground(p) if !target_cells.contains(&p))
                            && (!may(it.id) || theirs(it.id))
                    })
                    .map(|it| it.id.to_string())
                    .collect();
                let Some(id) = items
                    .iter()
                    .map(|it| it.id)
                    .find(|&id| on_ground(id).is_some() && may(id) && !theirs(id))
                else {
                    return notes.reply(
                        ActionName::Skip,
                        format!("At {here}, holding nothing; no free item for me, so skip."),
                    );
                };
                match skipped.as_slice() {
                    [] => {}
                    [one] => notes.rationale.push(format!("Item {one} is taken.")),
                    many => notes
                        .rationale
                        .push(format!("Items {} are taken.", many.join(", "))),
                }
                // remembered while it walks there; an item picked at once needs no claim
                if !alone && on_ground(id) != Some(here) {
                    notes.message.push(format!("I take item {id}."));
                    notes.memory.push(format!("Mine: {id}."));
                }
                id
            }
        };
        let p = on_ground(id).expect("a claimed item is on the ground");
        let (a, facts) = nav_facts(here, p, ActionName::Pick);
        let mut r = notes.reply(
            a,
            format!("At {here}, holding nothing; item {id} {p}: {facts}."),
        );
        if a == ActionName::Pick {
            r.action_parameters
                .insert("item".into(), Value::String(id.to_string()));
            // the target it will carry the item to, for teammates to leave alone
            if let (false, Some(t)) = (alone, free_target()) {
                if !r.message.is_empty() {
                    r.message.push(' ');
                }
                r.message.push_str(&format!("I bring item {id} to {t}."));
            }
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_read_from_memory_in_order() {
        let memory = vec![
            "Mine: a.".to_string(),
            "Bob takes b. Eve takes c. Eve to (2,2).".to_string(),
            "d is Eve's. Ann takes d.".to_string(),
            "Eve dropped c.".to_string(),
        ];
        let c = Claims::read_all_memory(&memory);
        assert_eq!(c.mine, Some('a'));
        assert_eq!(c.items.get(&'b').map(String::as_str), Some("Bob"));
        assert!(!c.items.contains_key(&'c'));
        assert!(c.targets.is_empty());
        assert_eq!(c.owners.get(&'d').map(String::as_str), Some("Eve"));
        assert_eq!(c.items.get(&'d').map(String::as_str), Some("Ann"));
        let c = Claims::read_all_memory(&["Mine: a. Ann takes e. e is Bob's.".into()]);
        assert!(
            !c.items.contains_key(&'e'),
            "an owner voids another's claim"
        );
        let c = Claims::read_all_memory(&["Mine: a.".into(), "Delivered a.".into()]);
        assert_eq!(c.mine, None);
    }

    #[test]
    fn messages_become_memory_lines_that_read_back() {
        for (message, line) in [
            ("I take item b.", "Bob takes b."),
            ("I bring item b to (1,2).", "Bob to (1,2)."),
            ("Dropped item b on (1,2).", "Bob dropped b."),
            ("Item c at (0,0) is Eve's.", "c is Eve's."),
        ] {
            assert_eq!(remembered("Bob", message).unwrap(), line);
        }
        assert_eq!(remembered("Bob", "Hello."), None);
        let c = Claims::read_all_memory(&["Bob takes b. Bob to (1,2). c is Eve's.".into()]);
        assert_eq!(c.items.get(&'b').map(String::as_str), Some("Bob"));
        assert_eq!(
            c.targets.get(&Pos::new(1, 2)).map(String::as_str),
            Some("Bob")
        );
        assert_eq!(c.owners.get(&'c').map(String::as_str), Some("Eve"));
    }
}
