#!/usr/bin/env python3
"""Audit the navigation facts in agents' replies (episodes.jsonl of `teamtune eval`).

For every assistant reply whose rationale has the experts' form "At (x,y), LABEL (tx,ty): WAY,
so DIR." (WAY like "2 east, 1 north" or "here"), checks, against the user message it answered:
  pos    - the stated position is the one the prompt gave;
  facts  - WAY is the true way from the stated position to the stated cell;
  copied - "(tx,ty): WAY" appears in the prompt (the observation prints the way beside goal cells);
  rule   - DIR is WAY's first direction (any action when WAY is "here");
  act    - action_name is DIR;
and, for single_nav, whether the action is a shortest-path step toward the goal's target.
Prints one line per task and a total.

Then the facts a search or a carry decision rests on (random_points and the carry tasks), each
counted where it applies and checked against the prompt it answered:
  hold     - the rationale's "holding X" / "holding nothing" is what the prompt says is held;
  cell     - its "cell: ..." is what the prompt's Cell line shows;
  first    - the cell or item it heads for is the first of the prompt's list (random_points:
             the cells not stood on; carry: the items, or with an item held the empty targets);
  on_item  - standing on an item (not on a target) while holding nothing, the reply picks (an
             expert passes over items teammates claimed, so not every one);
  on_tgt   - standing on an empty target while holding an item, the reply drops;
  on_hid   - standing on a hidden target, the reply stays (skip);
  memory, message - replies that write memory, that send a message.
Usage: audit_rationales.py EVAL_DIR/episodes.jsonl ...
"""
import json
import re
import sys
from collections import defaultdict

AT = re.compile(r"At \((\d+),(\d+)\)[^:]*?\((\d+),(\d+)\)(?: \([^)]*\))?: (.*?), so (\w+)")
YOU = re.compile(r"You are at \((\d+),(\d+)\)")
GOAL = re.compile(r"reach the target \((\d+),(\d+)\)")


def way(ax, ay, tx, ty):
    parts = []
    if tx != ax:
        parts.append(f"{abs(tx - ax)} {'east' if tx > ax else 'west'}")
    if ty != ay:
        parts.append(f"{abs(ty - ay)} {'north' if ty > ay else 'south'}")
    return ", ".join(parts) or "here"


def step(ax, ay, tx, ty):
    if ax < tx:
        return "east"
    if ax > tx:
        return "west"
    if ay < ty:
        return "north"
    if ay > ty:
        return "south"
    return None


HOLD = re.compile(r"You hold (nothing|item (\w))\.")
CELL = re.compile(r"Cell: (.*)\.\n")
UNSTOOD = re.compile(r"Cells you have not stood on, nearest first: \((\d+),(\d+)\)")
ITEMS = re.compile(r"Items: (.*?)\. Targets: (.*?)\.\n")
FACT_COLS = ["hold", "hold_ok", "cell", "cell_ok", "first", "first_ok", "on_item", "picked",
             "on_tgt", "dropped", "on_hid", "stayed", "memory", "message"]


def decision_facts(task, user, reply, action, f):
    """Counts the search and carry facts of one reply into f."""
    rationale = reply.get("rationale", "")
    f["memory"] += bool(reply.get("add_memory"))
    f["message"] += bool(reply.get("message"))
    hold = HOLD.search(user)
    held = None if not hold or hold.group(1) == "nothing" else hold.group(2)
    cell = CELL.search(user)
    cell = cell.group(1) if cell else ""
    said = re.search(r"holding (nothing|\w)\b", rationale)
    if said and hold:
        f["hold"] += 1
        f["hold_ok"] += (said.group(1) == "nothing") == (held is None) and (
            held is None or said.group(1) == held)
    said_cell = re.search(r"cell: ((?:a )?hidden target|empty|item \w|a target)", rationale)
    if said_cell:
        f["cell"] += 1
        fact = said_cell.group(1)
        f["cell_ok"] += ("hidden target" in cell) if fact.endswith("hidden target") else fact in cell
    if task == "random_points":
        listed = UNSTOOD.search(user)
        named = re.search(r"not stood on \((\d+),(\d+)\)", rationale)
        if listed and named and "taken" not in rationale:
            f["first"] += 1
            f["first_ok"] += listed.groups() == named.groups()
        if "a hidden target" in cell:
            f["on_hid"] += 1
            f["stayed"] += action == "skip"
        return
    lists = ITEMS.search(user)
    if lists:
        items, targets = lists.groups()
        if held is None:
            ground = [e for e in items.split("; ") if " at (" in e]
            named = re.search(r"holding nothing; item (\w) \(", rationale)
            if ground and named and "taken" not in rationale:
                f["first"] += 1
                f["first_ok"] += ground[0].startswith(named.group(1))
        else:
            empty = [e for e in targets.split("; ") if e.startswith("empty ")]
            named = re.search(r"holding \w; target (\(\d+,\d+\))", rationale)
            if empty and named:
                f["first"] += 1
                f["first_ok"] += empty[0].startswith("empty " + named.group(1))
    if held is None and "item " in cell and "a target" not in cell:
        f["on_item"] += 1
        f["picked"] += action == "pick"
    if held is not None and "a target" in cell and "item " not in cell:
        f["on_tgt"] += 1
        f["dropped"] += action == "drop"


def main(paths):
    stats = defaultdict(lambda: defaultdict(int))
    facts_by_task = defaultdict(lambda: defaultdict(int))
    for path in paths:
        for line in open(path):
            rec = json.loads(line)
            task = rec["task"]
            for conv in rec["conversations"]:
                msgs = conv["messages"]
                for k, m in enumerate(msgs):
                    if m["role"] != "assistant" or k == 0:
                        continue
                    s = stats[task]
                    s["replies"] += 1
                    user = msgs[k - 1]["content"]
                    try:
                        reply = json.loads(m["content"])
                    except json.JSONDecodeError:
                        continue
                    action = reply.get("action_name") or reply.get("action")
                    if task == "random_points" or "pick" in task:
                        decision_facts(task, user, reply, action, facts_by_task[task])
                    you = YOU.search(user)
                    goal = GOAL.search(user)
                    if task == "single_nav" and you and goal:
                        ax, ay, tx, ty = map(int, you.groups() + goal.groups())
                        best = step(ax, ay, tx, ty)
                        s["nav_turns"] += 1
                        good = {d for d in ("east", "west", "north", "south")
                                if (d == "east" and ax < tx) or (d == "west" and ax > tx)
                                or (d == "north" and ay < ty) or (d == "south" and ay > ty)}
                        s["nav_good"] += action in good or (best is None and action == "skip")
                    at = AT.search(reply.get("rationale", ""))
                    if not at:
                        continue
                    s["nav_rationales"] += 1
                    ax, ay, tx, ty = map(int, at.groups()[:4])
                    facts, said = at.group(5), at.group(6)
                    if you and (ax, ay) == tuple(map(int, you.groups())):
                        s["pos_ok"] += 1
                    s["facts_ok"] += facts == way(ax, ay, tx, ty)
                    s["copied"] += f"({tx},{ty}): {facts}" in user
                    first = facts.split(", ")[0].split(" ")[-1]
                    s["rule_ok"] += said == first or facts == "here"
                    s["act_ok"] += action == said
    cols = ["replies", "nav_rationales", "pos_ok", "facts_ok", "copied", "rule_ok", "act_ok", "nav_turns", "nav_good"]
    print(f"{'task':16}" + "".join(f"{c:>13}" for c in cols))
    total = defaultdict(int)
    for task in sorted(stats):
        s = stats[task]
        for c in cols:
            total[c] += s[c]
        print(f"{task:16}" + "".join(f"{s[c]:>13}" for c in cols))
    print(f"{'total':16}" + "".join(f"{total[c]:>13}" for c in cols))
    n = max(total["nav_rationales"], 1)
    print(f"of nav rationales: position {total['pos_ok']/n:.0%}, facts {total['facts_ok']/n:.0%}, "
          f"copied {total['copied']/n:.0%}, rule {total['rule_ok']/n:.0%}, action = rationale {total['act_ok']/n:.0%}; "
          f"single_nav good steps {total['nav_good']}/{total['nav_turns']}")
    if facts_by_task:
        print()
        print(f"{'decision facts':16}" + "".join(f"{c:>9}" for c in FACT_COLS))
        for task in sorted(facts_by_task):
            f = facts_by_task[task]
            print(f"{task:16}" + "".join(f"{f[c]:>9}" for c in FACT_COLS))


if __name__ == "__main__":
    main(sys.argv[1:])
