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
Prints one line per task and a total. Usage: audit_rationales.py EVAL_DIR/episodes.jsonl ...
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


def main(paths):
    stats = defaultdict(lambda: defaultdict(int))
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


if __name__ == "__main__":
    main(sys.argv[1:])
