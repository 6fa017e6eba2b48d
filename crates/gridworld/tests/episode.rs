//! The turn loop: inbox rules, wasted turns, episode end, drop on the last turn, records,
//! replay round trip, training lines.

mod common;

use common::*;
use teamtune_gridworld::{
    append_records, play_expert, read_record, read_records, replay, training_lines, window,
    EndReason, Episode, EpisodeError, Message, Pos, Role, TaskKind, BUILTIN_IDS,
};

fn last_user(ep: &Episode, i: usize) -> String {
    ep.messages(i)
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .unwrap()
        .content
        .clone()
}

fn inbox_line(user: &str) -> &str {
    user.lines().find(|l| l.starts_with("Inbox:")).unwrap()
}

#[test]
fn inbox_rules() {
    let w = world(
        TaskKind::Corners,
        5,
        5,
        &[
            ("Alice", (2, 2)),
            ("Bob", (2, 2)),
            ("Carol", (2, 2)),
            ("Dan", (2, 2)),
        ],
    );
    let mut ep = Episode::from_world(&spec("corners"), 0, w);
    // Round 1: Alice speaks first; Bob and Carol read her on their turn in the same round.
    assert_eq!(ep.current().unwrap().agent, 0);
    assert_eq!(inbox_line(&last_user(&ep, 0)), "Inbox: empty.");
    ep.submit(&act("skip", "one from Alice")).unwrap();
    assert_eq!(
        inbox_line(ep.current().unwrap().user_message),
        "Inbox: Alice: one from Alice"
    );
    ep.submit(&act("skip", "")).unwrap(); // Bob: silent
    assert_eq!(
        inbox_line(ep.current().unwrap().user_message),
        "Inbox: Alice: one from Alice"
    );
    ep.submit(&act("skip", "one from Carol")).unwrap();
    // Dan: both, in send order
    assert_eq!(
        inbox_line(ep.current().unwrap().user_message),
        "Inbox: Alice: one from Alice | Carol: one from Carol"
    );
    ep.submit(&act("skip", "")).unwrap();
    // Round 2, Alice: Carol's message, never her own
    let u = ep.current().unwrap().user_message.to_string();
    assert!(u.starts_with("Round 2/10."));
    assert_eq!(inbox_line(&u), "Inbox: Carol: one from Carol");
    ep.submit(&act("skip", "")).unwrap();
    // Bob: Carol's (sent after his previous turn); Alice's was emptied last turn
    assert_eq!(
        inbox_line(ep.current().unwrap().user_message),
        "Inbox: Carol: one from Carol"
    );
    ep.submit(&act("skip", "")).unwrap();
    // Carol: nothing (her own is not delivered to her; Alice's was read last round)
    assert_eq!(
        inbox_line(ep.current().unwrap().user_message),
        "Inbox: empty."
    );
    ep.submit(&act("skip", "")).unwrap();
    // Dan: emptied after his previous turn
    assert_eq!(
        inbox_line(ep.current().unwrap().user_message),
        "Inbox: empty."
    );
    // the record keeps the messages
    let rec = ep.record();
    assert_eq!(rec.turns[0].message, "one from Alice");
    assert_eq!(rec.turns[1].message, "");
}

#[test]
fn broken_replies_are_wasted_turns_with_a_reason() {
    let w = world(
        TaskKind::Corners,
        4,
        4,
        &[("Alice", (1, 1)), ("Bob", (2, 2))],
    );
    let mut s = spec("corners");
    s.agents = vec![2];
    let mut ep = Episode::from_world(&s, 0, w);
    // broken JSON carrying a message: nothing moves, nothing is delivered
    let out = ep
        .submit(r#"{"action_name": "north", "message": "hi Bob""#)
        .unwrap();
    assert!(out.reply.is_err());
    assert!(!out.done);
    assert_eq!(ep.world().agents[0].pos, Pos::new(1, 1));
    assert_eq!(
        inbox_line(ep.current().unwrap().user_message),
        "Inbox: empty."
    );
    ep.submit(&act("fly", "")).unwrap();
    assert_eq!(ep.world().agents[1].pos, Pos::new(2, 2));
    // the next observations say exactly why
    let u = ep.current().unwrap().user_message.to_string();
    assert!(
        u.contains("Last: your reply was not used: the JSON object was never closed with } (cut off?). Nothing happened."),
        "{u}"
    );
    ep.submit("").unwrap();
    let u = ep.current().unwrap().user_message.to_string();
    assert!(
        u.contains("Last: your reply was not used: unknown action \"fly\"; use one of: north, south, east, west, skip. Nothing happened."),
        "{u}"
    );
    let rec = ep.record();
    assert_eq!(rec.invalid_replies(), 3);
    assert_eq!(rec.turns[0].action, None);
    assert!(rec.turns[1]
        .error
        .as_deref()
        .unwrap()
        .contains("unknown action"));
    // the raw replies are kept in the conversation
    assert_eq!(rec.conversations[1].messages[2].content, act("fly", ""));
}

#[test]
fn off_grid_move_uses_the_turn() {
    let w = world(TaskKind::Navigate, 4, 4, &[("Alice", (0, 0))]);
    let mut w = w;
    w.targets = vec![Pos::new(3, 3)];
    let mut ep = Episode::from_world(&spec("single_nav"), 0, w);
    let out = ep.submit(&act("west", "")).unwrap();
    assert_eq!(out.result, "west is off the grid; you stayed at (0,0).");
    assert_eq!(ep.round(), 2);
    let u = ep.current().unwrap().user_message;
    assert!(u.contains("Last: west is off the grid; you stayed at (0,0).\nYou are at (0,0)."));
    ep.submit(&act("south", "")).unwrap();
    assert_eq!(ep.world().agents[0].pos, Pos::new(0, 0));
}

#[test]
fn user_message_layout() {
    let mut w = world(TaskKind::Carry, 4, 4, &[("Alice", (1, 2)), ("Bob", (2, 1))]);
    w.permissions = true;
    w.items = vec![item('a', (1, 2), Some(1)), item('b', (0, 0), Some(0))];
    w.targets = vec![Pos::new(3, 0), Pos::new(2, 3)];
    let ep = Episode::from_world(&spec("permission_pick"), 0, w);
    assert_eq!(
        ep.current().unwrap().user_message,
        "Round 1/15. Score 0.\n\
         Memory: none.\n\
         Goal: put an item on every target. Items: a (Bob only) at (1,2): here; b (Alice only) at (0,0): 1 west, 2 south. Targets: empty (3,0): 2 east, 2 south; empty (2,3): 1 east, 1 north.\n\
         Last: you start at (1,2).\n\
         You are at (1,2). You hold nothing. Cell: item a (Bob may pick).\n\
         Inbox: empty."
    );
    let sys = &ep.messages(0)[0].content;
    assert!(sys.contains("Each item may be picked only by the agent named for it."));
    assert!(sys.contains("pick (take an item from your cell; you hold at most one), drop (put your item on your cell)"));
    assert!(
        !sys.contains("(2,1)"),
        "no position of Bob in Alice's system message"
    );
}

#[test]
fn memory_is_appended_and_shown() {
    let w = world(TaskKind::Corners, 4, 4, &[("Alice", (1, 1))]);
    let mut s = spec("corners");
    s.agents = vec![1];
    let mut ep = Episode::from_world(&s, 0, w);
    ep.submit(r#"{"action_name":"skip","add_memory":"My corner (0,0)."}"#)
        .unwrap();
    ep.submit(r#"{"action":"west","add_memory":{"plan":"south next"}}"#)
        .unwrap();
    let u = ep.current().unwrap().user_message;
    assert!(
        u.contains(r#"Memory: My corner (0,0). {"plan":"south next"}"#),
        "{u}"
    );
    assert!(u.contains("Last: moved to (0,1)."));
}

#[test]
fn episode_ends_at_100_or_the_round_limit() {
    // solved mid-round: later agents do not act
    let w = world(
        TaskKind::Corners,
        4,
        4,
        &[
            ("Alice", (1, 0)),
            ("Bob", (3, 0)),
            ("Carol", (0, 3)),
            ("Dan", (3, 3)),
        ],
    );
    let mut ep = Episode::from_world(&spec("corners"), 0, w);
    assert_eq!(ep.score(), 75.0);
    let out = ep.submit(&act("west", "")).unwrap();
    assert!(out.done);
    assert_eq!(out.score, 100.0);
    assert_eq!(ep.end_reason(), Some(EndReason::Solved));
    assert!(ep.current().is_none());
    assert!(matches!(
        ep.submit(&act("skip", "")),
        Err(EpisodeError::Finished)
    ));
    // round limit: 3 rounds of skips by 2 agents = 6 turns
    let mut s = spec_rounds("random_points", 3);
    s.agents = vec![2];
    let mut ep = Episode::new(&s, 1).unwrap();
    let mut n = 0;
    while ep.current().is_some() {
        ep.submit(&act("skip", "")).unwrap();
        n += 1;
    }
    assert_eq!(n, 6);
    assert_eq!(ep.end_reason(), Some(EndReason::RoundLimit));
    let rec = ep.record();
    assert_eq!(rec.rounds_played, 3);
    assert_eq!(rec.turns.last().unwrap().round, 3);
}

#[test]
fn drop_on_the_last_turn_counts() {
    // single agent: round 2 of 2 is the last turn
    let mut w = world(TaskKind::Carry, 3, 3, &[("Alice", (0, 0))]);
    w.items = vec![item('a', (0, 0), None)];
    w.targets = vec![Pos::new(1, 0)];
    let mut s = spec_rounds("single_pick", 3);
    s.rounds = 3;
    let mut ep = Episode::from_world(&s, 0, w);
    ep.submit(&act("pick", "")).unwrap();
    ep.submit(&act("east", "")).unwrap();
    let out = ep.submit(&act("drop", "")).unwrap();
    assert_eq!(out.result, "dropped item a at (1,0), a target.");
    assert_eq!(out.score, 100.0);
    assert!(out.done);
    assert_eq!(ep.record().final_score, 100.0);

    // two agents: the second agent's drop in the final round counts for the final score
    let mut w = world(TaskKind::Carry, 4, 4, &[("Alice", (0, 0)), ("Bob", (3, 3))]);
    w.items = vec![item('a', (0, 1), None), item('b', (3, 3), None)];
    w.targets = vec![Pos::new(0, 3), Pos::new(3, 2)];
    let mut s = spec_rounds("multi_pick", 2);
    s.agents = vec![2];
    let mut ep = Episode::from_world(&s, 0, w);
    ep.submit(&act("skip", "")).unwrap(); // Alice
    ep.submit(&act("pick", "")).unwrap(); // Bob picks b
    ep.submit(&act("skip", "")).unwrap(); // Alice
    assert_eq!(ep.current().unwrap().round, 2);
    ep.submit(&act("south", "")).unwrap(); // Bob to (3,2), holding b
                                           // a fresh episode to drop on the very last turn
    let mut w = world(TaskKind::Carry, 4, 4, &[("Alice", (0, 0)), ("Bob", (3, 2))]);
    w.items = vec![item('a', (0, 1), None), item('b', (3, 3), None)];
    w.targets = vec![Pos::new(0, 3), Pos::new(3, 2)];
    w.items[1].pos = None;
    w.items[1].holder = Some(1);
    w.agents[1].holding = Some(1);
    let mut ep = Episode::from_world(&s, 0, w);
    for _ in 0..3 {
        ep.submit(&act("skip", "")).unwrap();
    }
    let out = ep.submit(&act("drop", "")).unwrap(); // Bob, round 2 of 2, last turn
    assert!(out.done);
    assert_eq!(out.score, 50.0);
    let rec = ep.record();
    assert_eq!(rec.end, Some(EndReason::RoundLimit));
    assert_eq!(rec.final_score, 50.0);
    assert_eq!(rec.turns.last().unwrap().score, 50.0);
}

#[test]
fn pick_while_holding_keeps_the_first_item() {
    let mut w = world(TaskKind::Carry, 4, 4, &[("Alice", (0, 0))]);
    w.items = vec![item('a', (0, 0), None), item('b', (0, 1), None)];
    w.targets = vec![Pos::new(3, 3), Pos::new(2, 2)];
    let mut s = spec("single_pick");
    s.items = vec![2];
    let mut ep = Episode::from_world(&s, 0, w);
    ep.submit(&act("pick", "")).unwrap();
    ep.submit(&act("north", "")).unwrap();
    let out = ep.submit(&act("pick", "")).unwrap();
    assert_eq!(
        out.result,
        "pick refused: you already hold item a; drop it first."
    );
    let w = ep.world();
    assert_eq!(w.agents[0].holding, Some(0));
    assert_eq!(w.items[1].pos, Some(Pos::new(0, 1)));
    assert!(ep
        .current()
        .unwrap()
        .user_message
        .contains("You hold item a. Cell: item b."));
}

#[test]
fn no_builtin_episode_starts_solved() {
    for id in BUILTIN_IDS {
        for seed in 0..2000 {
            let ep = Episode::new(&spec(id), seed).unwrap();
            assert!(ep.current().is_some(), "{id} seed {seed} starts solved");
        }
    }
}

#[test]
fn records_round_trip_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub").join("episodes.jsonl");
    let mut records = Vec::new();
    for (k, id) in BUILTIN_IDS.iter().enumerate() {
        let mut rec = play_expert(&spec(id), k as u64 + 10).unwrap().record();
        rec.policy = Some("expert".into());
        records.push(rec);
    }
    // a model-like episode with broken replies
    let mut ep = Episode::new(&spec("multi_pick"), 3).unwrap();
    let replies = [
        "nonsense",
        &act("east", "hi"),
        "{\"action\":\"pick\"}",
        "{",
        &act("drop", ""),
    ];
    let mut k = 0;
    while ep.current().is_some() {
        ep.submit(replies[k % replies.len()]).unwrap();
        k += 1;
    }
    records.push(ep.record());
    // appended in two writes: the first write is never lost
    append_records(&path, &records[..3]).unwrap();
    append_records(&path, &records[3..]).unwrap();
    let back = read_records(&path).unwrap();
    assert_eq!(back, records);
    assert_eq!(read_record(&path, 7).unwrap(), records[7]);
    assert!(read_record(&path, 8).is_err());
    for rec in &back {
        let rep = replay(rec).unwrap();
        assert!(rep.is_ok(), "{}: {:?}", rec.task, rep.mismatches);
        assert_eq!(rep.final_score, rec.final_score);
        assert_eq!(rep.turns, rec.turns.len());
    }
    // tampering is caught
    let mut bad = records[1].clone();
    bad.turns[2].score += 25.0;
    assert!(!replay(&bad).unwrap().is_ok());
    let mut bad = records[0].clone();
    let first_reply = bad.conversations[0]
        .messages
        .iter_mut()
        .find(|m| m.role == Role::Assistant)
        .unwrap();
    first_reply.content = act("skip", "");
    let rep = replay(&bad).unwrap();
    assert!(!rep.is_ok());
    let mut bad = records[2].clone();
    bad.seed += 1;
    assert!(!replay(&bad).unwrap().is_ok());
}

#[test]
fn training_lines_are_the_chat_format() {
    let rec = play_expert(&spec("corners"), 5).unwrap().record();
    let lines = rec.training_lines();
    assert_eq!(lines.len(), 4);
    for (i, line) in lines.iter().enumerate() {
        let v = serde_json::to_value(line).unwrap();
        assert_eq!(v["task"], "corners");
        assert_eq!(v["score"], rec.final_score);
        assert_eq!(v["agent"], rec.agents[i].as_str());
        let msgs = v["messages"].as_array().unwrap();
        assert_eq!(msgs[0]["role"], "system");
        for (k, m) in msgs.iter().enumerate().skip(1) {
            let want = if k % 2 == 1 { "user" } else { "assistant" };
            assert_eq!(m["role"], want);
            assert!(m["content"].is_string());
            assert_eq!(m.as_object().unwrap().len(), 2);
        }
        assert_eq!(msgs.last().unwrap()["role"], "assistant");
    }
    // extra fields survive a round trip
    let mut v = serde_json::to_value(&lines[0]).unwrap();
    v["run"] = "r1".into();
    let back: teamtune_gridworld::TrainingConversation = serde_json::from_value(v).unwrap();
    assert_eq!(back.extra["run"], "r1");
    // pruning by score
    let low = Episode::new(&spec("corners"), 5).unwrap().record();
    assert_eq!(
        training_lines(&[rec.clone(), low.clone()], Some(50.0)).len(),
        4
    );
    assert_eq!(training_lines(&[rec, low], None).len(), 8);
}

#[test]
fn inference_window() {
    let mut msgs = vec![Message::system("s")];
    for k in 0..6 {
        msgs.push(Message::user(format!("u{k}")));
        msgs.push(Message::assistant(format!("a{k}")));
    }
    msgs.push(Message::user("u6"));
    // the last 8 would start at an assistant message: the window starts at the next user one
    let w = window(&msgs, 8);
    assert_eq!(w.len(), 8);
    assert_eq!(w[0].content, "s");
    assert_eq!(w[1].content, "u3");
    assert_eq!(w.last().unwrap().content, "u6");
    // an odd window never starts with an assistant message
    let w = window(&msgs, 4);
    assert_eq!(w[1].content, "u5");
    assert_eq!(window(&msgs, 100).len(), msgs.len());
}

/// Windowed training lines: one per assistant turn, each exactly what the policy with that
/// window was prompted with at that turn, then its reply.
#[test]
fn training_windows_match_the_inference_window() {
    let rec = play_expert(&spec("corners"), 5).unwrap().record();
    for conv in rec.training_lines() {
        let replies: Vec<usize> = (1..conv.messages.len())
            .filter(|&k| conv.messages[k].role == Role::Assistant)
            .collect();
        for keep in [1, 2, 3, 8] {
            let lines = conv.windows(keep);
            assert_eq!(lines.len(), replies.len());
            for (line, &k) in lines.iter().zip(&replies) {
                let mut want = window(&conv.messages[..k], keep);
                want.push(conv.messages[k].clone());
                assert_eq!(line.messages, want);
                assert_eq!(
                    (line.task.as_str(), line.score),
                    ("corners", rec.final_score)
                );
                assert_eq!(line.agent, conv.agent);
            }
            if keep == 1 {
                // system, the turn's user message, the reply
                let turn: Vec<_> = lines.iter().map(|l| l.messages.len()).collect();
                assert!(turn.iter().all(|&n| n == 3), "{turn:?}");
                assert_eq!(lines[0].extra["turn"], 1);
            }
        }
    }
}

#[test]
fn same_seed_same_episode_and_records() {
    for id in BUILTIN_IDS {
        let a = play_expert(&spec(id), 99).unwrap().record();
        let b = play_expert(&spec(id), 99).unwrap().record();
        assert_eq!(a, b);
        let c = play_expert(&spec(id), 100).unwrap().record();
        assert_ne!(a.conversations, c.conversations);
    }
}
