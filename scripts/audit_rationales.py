#!/usr/bin/env python3
"""Audit the navigation facts in agents' replies (episodes.jsonl of `teamtune eval`).

For every assistant reply whose rationale has the experts' form "At (x,y), LABEL (tx,ty): x a?b
[, y c?d], so DIR.", checks, against the user message it answered:
  pos   - the stated position is the one the prompt gave;
  facts - each comparison is true of the numbers written, and the numbers are the stated cells';
  rule  - DIR is the step the facts imply (x first, then y; "there" when equal);
  act   - action_name is DIR;
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
CMP = re.compile(r"([xy]) (\d+)([<>=])(\d+)")


def sign(a, b):
    return "<" if a < b else (">" if a > b else "=")


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
                    ok = True
                    for axis, a, c, b in CMP.findall(facts):
                        a, b = int(a), int(b)
                        want = (ax, tx) if axis == "x" else (ay, ty)
                        ok &= (a, b) == want and c == sign(a, b)
                    s["facts_ok"] += ok
                    implied = step(ax, ay, tx, ty)
                    s["rule_ok"] += said == implied or (implied is None and facts.startswith("there"))
                    s["act_ok"] += action == said
    cols = ["replies", "nav_rationales", "pos_ok", "facts_ok", "rule_ok", "act_ok", "nav_turns", "nav_good"]
    print(f"{'task':16}" + "".join(f"{c:>15}" for c in cols))
    total = defaultdict(int)
    for task in sorted(stats):
        s = stats[task]
        for c in cols:
            total[c] += s[c]
        print(f"{task:16}" + "".join(f"{s[c]:>15}" for c in cols))
    print(f"{'total':16}" + "".join(f"{total[c]:>15}" for c in cols))
    n = max(total["nav_rationales"], 1)
    print(f"of nav rationales: position {total['pos_ok']/n:.0%}, facts {total['facts_ok']/n:.0%}, "
          f"rule {total['rule_ok']/n:.0%}, action = rationale {total['act_ok']/n:.0%}; "
          f"single_nav good steps {total['nav_good']}/{total['nav_turns']}")


if __name__ == "__main__":
    main(sys.argv[1:])
