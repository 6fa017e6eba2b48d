//! The scripted experts: scores over 200 seeds per task, valid replies, rationales that state
//! the facts before the decision and name the action taken.
//!
//! Measured (200 seeds, 0..200): 100 on every task except random_points (hidden targets), see
//! `cargo run -p teamtune-gridworld --release --example expert_scores -- 200`.

mod common;

use common::spec;
use teamtune_gridworld::{play_expert, Expert, Pos, Role, BUILTIN_IDS};

fn mean_score(id: &str, seeds: u64) -> f64 {
    let s = spec(id);
    (0..seeds)
        .map(|seed| play_expert(&s, seed).unwrap().score())
        .sum::<f64>()
        / seeds as f64
}

#[test]
fn expert_scores_over_200_seeds() {
    let mut table = Vec::new();
    for id in BUILTIN_IDS {
        let m = mean_score(id, 200);
        table.push(format!("{id}: {m:.1}"));
        let floor = match id {
            // hidden targets: measured 84.5 over seeds 0..200; the issue asks for >= 75
            "random_points" => 80.0,
            // all measured 100.0; the issue asks for >= 95
            _ => 99.0,
        };
        assert!(m >= floor, "{id}: mean {m:.1} < {floor}");
    }
    eprintln!("{}", table.join("\n"));
}

#[test]
fn expert_replies_are_valid_and_rationales_name_the_action() {
    for id in BUILTIN_IDS {
        for seed in 0..40 {
            let rec = play_expert(&spec(id), seed).unwrap().record();
            assert_eq!(rec.invalid_replies(), 0, "{id} seed {seed}");
            for conv in &rec.conversations {
                for m in conv.messages.iter().filter(|m| m.role == Role::Assistant) {
                    let v: serde_json::Value = serde_json::from_str(&m.content).unwrap();
                    assert_eq!(v.as_object().unwrap().len(), 6);
                    let order: Vec<usize> = [
                        "\"reflection\":",
                        "\"rationale\":",
                        "\"action_name\":",
                        "\"action_parameters\":",
                        "\"message\":",
                        "\"add_memory\":",
                    ]
                    .iter()
                    .map(|k| m.content.find(k).unwrap())
                    .collect();
                    assert!(order.windows(2).all(|p| p[0] < p[1]), "{}", m.content);
                    let action = v["action_name"].as_str().unwrap();
                    let rationale = v["rationale"].as_str().unwrap();
                    assert!(
                        rationale.ends_with(&format!("so {action}.")),
                        "{id}: rationale {rationale:?} does not end in the action {action}"
                    );
                    assert!(
                        rationale.contains("At ("),
                        "{id}: no position in {rationale:?}"
                    );
                    // facts before the decision: the position comes before "so"
                    assert!(rationale.find("At (").unwrap() < rationale.rfind("so ").unwrap());
                    assert!(!v["reflection"].as_str().unwrap().is_empty());
                    assert!(v["message"].as_str().unwrap().len() < 120);
                }
            }
        }
    }
}

/// Every expert reply of every built-in task over seeds `0..seeds`: `f(task, seed, the user
/// message it answered, the reply as JSON)`.
fn each_expert_reply(seeds: u64, mut f: impl FnMut(&str, u64, &str, &serde_json::Value)) {
    for id in BUILTIN_IDS {
        for seed in 0..seeds {
            let ep = play_expert(&spec(id), seed).unwrap();
            for i in 0..ep.agent_count() {
                let msgs = ep.messages(i);
                for (k, m) in msgs.iter().enumerate().skip(1) {
                    if m.role == Role::Assistant {
                        let v: serde_json::Value = serde_json::from_str(&m.content).unwrap();
                        f(id, seed, &msgs[k - 1].content, &v);
                    }
                }
            }
        }
    }
}

/// The reflection restates the previous action's outcome exactly as the user message's
/// `Last:` line gives it (capitalised): one fixed, copyable form, no distances to compute.
#[test]
fn reflections_restate_the_last_outcome() {
    each_expert_reply(20, |id, seed, user, v| {
        let last = user
            .lines()
            .find_map(|l| l.strip_prefix("Last: "))
            .unwrap_or_else(|| panic!("{id}: no Last line in {user:?}"));
        let refl = v["reflection"].as_str().unwrap();
        let mut want = last.to_string();
        want[..1].make_ascii_uppercase();
        assert_eq!(refl, want, "{id} seed {seed}");
    });
}

/// `2 east, 1 north`, `1 south`, `here`: the form of [`Pos::way_to`].
fn is_way(s: &str) -> bool {
    s == "here"
        || s.split(", ").all(|part| {
            part.split_once(' ').is_some_and(|(n, d)| {
                n.parse::<u32>().is_ok() && ["east", "west", "north", "south"].contains(&d)
            })
        })
}

/// A move's rationale "At P, LABEL T: WAY, so DIR." states the true way from P to T and moves
/// along its first direction (or does the arrival action when the way is "here").
#[test]
fn move_rationales_are_true() {
    let mut checked = 0;
    each_expert_reply(20, |id, seed, _, v| {
        let r = v["rationale"].as_str().unwrap();
        let a = v["action_name"].as_str().unwrap();
        let Some(so) = r.rfind(", so ") else { return };
        let Some(at) = r.rfind("At (").map(|i| Pos::find_all(&r[i..])[0]) else {
            return;
        };
        let facts = &r[..so];
        let way = facts.rsplit(": ").next().unwrap();
        if !is_way(way) {
            return;
        }
        let Some(&to) = Pos::find_all(facts).last() else {
            return;
        };
        let dir = r[so + 5..].trim_end_matches('.');
        assert_eq!(way, at.way_to(to), "{id} seed {seed}: {r}");
        assert_eq!(dir, a, "{id} seed {seed}: {r}");
        if way != "here" {
            let first = way.split(", ").next().unwrap();
            assert!(first.ends_with(a), "{id} seed {seed}: {r}");
        }
        checked += 1;
    });
    assert!(checked > 1000, "only {checked} move rationales");
}

/// Wherever the goal names the cell an expert heads for, the way in its rationale is a copy of
/// the way the user message prints beside that cell: the decision can be read, not computed.
/// (Hidden targets are not in the goal; searching cells is the exception.)
#[test]
fn the_way_in_a_rationale_is_copied_from_the_prompt() {
    let mut copied = 0;
    each_expert_reply(20, |id, seed, user, v| {
        if id == "random_points" {
            return;
        }
        let r = v["rationale"].as_str().unwrap();
        let Some(so) = r.rfind(", so ") else { return };
        let facts = &r[..so];
        let Some((cell_and_label, way)) = facts.rsplit_once(": ") else {
            return;
        };
        if !is_way(way) {
            return;
        }
        let cell = Pos::find_all(cell_and_label).last().copied().unwrap();
        let shown = format!("{cell}: {way}");
        assert!(
            user.contains(&shown),
            "{id} seed {seed}: {shown:?} of {r:?} is not in the prompt:\n{user}"
        );
        copied += 1;
    });
    assert!(copied > 1000, "only {copied} rationales");
}

/// Experts decide from what they are shown: two experts given the same briefing and the same
/// observations reply the same (there is no other input).
#[test]
fn experts_are_functions_of_their_prompts() {
    let s = spec("multi_pick");
    let ep = play_expert(&s, 3).unwrap();
    let mut a = Expert::new(ep.briefing(0).clone(), 3);
    let mut b = Expert::new(ep.briefing(0).clone(), 3);
    let fresh = teamtune_gridworld::Episode::new(&s, 3).unwrap();
    let obs = fresh.current().unwrap().observation.clone();
    assert_eq!(a.act(&obs), b.act(&obs));
}

/// User variants from TOML: permissions with owners hidden from the goal (learnt on the cell
/// and told by messages), permissions on multi_pick, a bigger corners grid, more items than
/// agents.
#[test]
fn experts_on_user_variants() {
    let mut reg = teamtune_gridworld::TaskRegistry::builtin();
    reg.add_toml(
        r#"
[[task]]
id = "permission_pick_hidden"
kind = "carry"
width = [3, 4]
height = [4, 5]
agents = [2, 3]
rounds = 15
permissions = true
owners_in_goal = false

[[task]]
id = "multi_pick_perm"
kind = "carry"
width = [3, 4, 5]
height = [3, 4, 5]
agents = [2, 3, 4]
rounds = 20
permissions = true

[[task]]
id = "big_corners"
kind = "corners"
width = [8]
height = [7]
agents = [4]
rounds = 14

[[task]]
id = "carry_extra"
kind = "carry"
width = [5]
height = [5]
agents = [2]
items = [3, 4]
rounds = 25
"#,
    )
    .unwrap();
    for (id, floor) in [
        ("permission_pick_hidden", 95.0),
        ("multi_pick_perm", 99.0),
        ("big_corners", 99.0),
        ("carry_extra", 99.0),
    ] {
        let s = reg.get(id).unwrap();
        let mean = (0..100)
            .map(|seed| play_expert(s, seed).unwrap().score())
            .sum::<f64>()
            / 100.0;
        eprintln!("{id}: {mean:.1}");
        assert!(mean >= floor, "{id}: mean {mean:.1} < {floor}");
        // the goal does not name owners when hidden
        if id == "permission_pick_hidden" {
            let ep = teamtune_gridworld::Episode::new(s, 1).unwrap();
            assert!(!ep.current().unwrap().user_message.contains("only)"));
        }
    }
}

/// In carry tasks every rationale states what the agent holds, as the prompt says it, before
/// the cell it heads for: the sub-goal (an item or a target) is decided by a copied fact.
#[test]
fn carry_rationales_state_what_is_held() {
    let mut seen = 0;
    each_expert_reply(20, |id, seed, user, v| {
        if !id.ends_with("_pick") {
            return;
        }
        let r = v["rationale"].as_str().unwrap();
        let held = if user.contains("You hold nothing.") {
            "holding nothing;".to_string()
        } else {
            let i = user
                .find("You hold item ")
                .expect("a carry prompt says what is held");
            let h = &user[i + "You hold item ".len()..][..1];
            format!("holding {h};")
        };
        assert!(
            r.contains(&held),
            "{id} seed {seed}: {r:?} lacks {held:?}\n{user}"
        );
        seen += 1;
    });
    assert!(seen > 500, "only {seen} carry replies");
}

/// The goal line lists corners nearest first, so an agent that has heard no claims takes the
/// first corner listed: its choice is read off the prompt.
#[test]
fn an_unclaimed_corner_choice_is_the_first_listed() {
    let mut seen = 0;
    each_expert_reply(20, |id, seed, user, v| {
        let r = v["rationale"].as_str().unwrap();
        let Some(rest) = r.strip_prefix("Taken: none. Nearest free corner ") else {
            return;
        };
        let chosen = Pos::find_all(rest)[0];
        let listed = user
            .split("nearest first: ")
            .nth(1)
            .expect("a corners goal line");
        assert_eq!(
            Pos::find_all(listed)[0],
            chosen,
            "{id} seed {seed}: {r}\n{user}"
        );
        seen += 1;
    });
    assert!(seen >= 20, "only {seen} first choices");
}
