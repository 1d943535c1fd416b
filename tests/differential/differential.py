#!/usr/bin/env python3
"""Differential test: agt-jail's policy kernel against AGT's own evaluators.

Generates (policy, context) pairs, asks AGT (agent-governance-toolkit-core 5.0.0:
agentmesh.governance.PolicyEngine for governance.toolkit/v1 and
agent_os.policies.PolicyEvaluator for Agent-OS v4) and `agt-jail policy eval --batch`, and
compares the action, the matched rule and the reason of every decision.

The generated corpus stays inside what AGT's regex-based evaluator handles correctly (see
docs/agt-differences.md); a separate, small set of known-quirk cases is run too and reported,
but only the well-formed corpus counts towards disagreements.
"""
import argparse
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore")
logging.disable(logging.CRITICAL)

import yaml  # noqa: E402  (PyYAML comes with AGT)
from agentmesh.governance.policy import PolicyEngine  # noqa: E402
from agent_os.policies.evaluator import PolicyEvaluator  # noqa: E402
from agent_os.policies.schema import PolicyDocument  # noqa: E402

CONTEXTS_PER_GROUP = 25

# ------------------------------------------------------------------ OS event contexts

PATHS = [
    "event", "agent.did", "agent.ring", "agent.trust", "agent.tier", "agent.session",
    "proc.pid", "proc.uid", "proc.comm", "proc.exe", "exec.path", "exec.argv",
    "exec.interpreter", "file.path", "file.access", "net.port", "net.addr", "net.domain",
    "net.protocol", "net.family", "missing", "proc.missing", "event.sub", "flag",
]
WORDS = ["exec", "file_open", "connect", "unlink", "rm", "curl", "python3", "/bin/sh",
         "/usr/bin/rm", "/home/u/.ssh/id_rsa", "/etc/passwd", ".env", "api.github.com",
         "pypi.org", "tcp", "udp", "read", "write", "inet", "did:agt:coder", "did:agt:plugin",
         "ab", "a_b", "x.y", "12", "7", "3.5", " 7 ", "1e3", "1_000", "inf", "nan", "-4",
         "abc", "0", "true", "yes", "ring2", "Exec", "élan"]
EVENTS = ["exec", "file_open", "connect", "unlink"]
AGENTS = ["did:agt:coder", "did:agt:plugin", "did:agt:data"]


def rand_scalar(r):
    k = r.random()
    if k < 0.45:
        return r.choice(WORDS)
    if k < 0.65:
        return r.choice([0, 1, 2, 3, 5, 7, 10, 22, 443, 1000, -3, 65535])
    if k < 0.75:
        return r.choice([0.5, 3.5, 7.0, 10.25, -1.5, 1e3])
    if k < 0.85:
        return r.choice([True, False])
    return None


def rand_value(r, depth=0):
    k = r.random()
    if k < 0.8 or depth > 1:
        return rand_scalar(r)
    if k < 0.92:
        return [rand_scalar(r) for _ in range(r.randint(0, 3))]
    return {r.choice(["a", "b", "path"]): rand_scalar(r) for _ in range(r.randint(0, 2))}


def rand_os_context(r):
    ctx = {}
    if r.random() < 0.7:
        ctx["event"] = r.choice(EVENTS)
    for p in PATHS:
        if r.random() < 0.6:
            parts = p.split(".")
            cur = ctx
            ok = True
            for part in parts[:-1]:
                nxt = cur.setdefault(part, {})
                if not isinstance(nxt, dict):
                    ok = False
                    break
                cur = nxt
            if ok and parts[-1] not in cur:
                cur[parts[-1]] = rand_value(r)
    if r.random() < 0.85:
        ctx.setdefault("agent", {})
        if isinstance(ctx["agent"], dict):
            ctx["agent"]["did"] = r.choice(AGENTS)
    # Keys spelled like literals: AGT reads a bare `true` or `1` condition as such a key.
    for key in LITERAL_KEYS:
        if r.random() < 0.1:
            ctx[key] = rand_scalar(r)
    return ctx


# ------------------------------------------------------------------ toolkit (v1) corpus

SAFE_STR = ["exec", "file_open", "connect", "rm", "curl", "/usr/bin/rm", "/etc/passwd",
            ".env", "api.github.com", "pypi.org", "tcp", "read", "write", "12", "7", "3.5",
            "did:agt:coder", "did:agt:plugin", "ab", "a_b", "x.y", "true", "abc", "Exec",
            "élan", "two words"]


# Bare literals standing as a whole test (AGT reads a word as a context key, the rest as false).
BARE_LITERALS = ["true", "True", "false", "1", "0", "1.5", "None", "'x'", '"yes"', "-1", "[1]"]
LITERAL_KEYS = ["true", "True", "false", "1", "0", "None"]


def rand_atom(r):
    path = r.choice(PATHS)
    k = r.random()
    if k < 0.04:
        return r.choice(BARE_LITERALS)
    if k < 0.3:
        return f"{path} {r.choice(['==', '!='])} '{r.choice(SAFE_STR)}'"
    if k < 0.45:
        items = ", ".join(f"'{s}'" for s in r.sample(SAFE_STR, r.randint(1, 4)))
        return f"{path} in [{items}]"
    if k < 0.8:
        num = r.choice(["0", "1", "5", "7", "10", "443", "1000", "3.5", "0.5", "22"])
        return f"{path} {r.choice(['<', '<=', '>', '>='])} {num}"
    return path


def rand_condition(r):
    atoms = [rand_atom(r) for _ in range(r.randint(1, 3))]
    out = atoms[0]
    for a in atoms[1:]:
        out += f" {r.choice(['and', 'or'])} {a}"
    return out


def rand_toolkit_group(r, gid):
    strategy = r.choice(["priority_first_match", "deny_overrides", "allow_overrides",
                         "most_specific_wins"])
    docs = []
    for d in range(r.randint(1, 2)):
        doc = {"apiVersion": "governance.toolkit/v1", "name": f"g{gid}-p{d}"}
        if d == 0:
            doc["conflict_strategy"] = strategy
        k = r.random()
        if k < 0.6:
            doc["agents"] = ["*"]
        elif k < 0.8:
            doc["agents"] = r.sample(AGENTS, r.randint(1, 2))
        elif k < 0.9:
            doc["agent"] = r.choice(AGENTS)
        if r.random() < 0.7:
            doc["default_action"] = r.choice(["allow", "deny"])
        if r.random() < 0.5:
            doc["scope"] = r.choice(["global", "tenant", "organization", "agent", "bogus"])
        rules = []
        # Half the policies guard most rules on the event type, which makes agt-jail index them.
        guarded = r.random() < 0.5
        for i in range(r.randint(1, 14)):
            cond = rand_condition(r)
            if guarded and r.random() < 0.85:
                if r.random() < 0.7:
                    cond = f"event == '{r.choice(EVENTS)}' and {cond}"
                else:
                    cond = f"event in ['{r.choice(EVENTS)}', '{r.choice(EVENTS)}'] and {cond}"
            rule = {"name": f"r{i}", "condition": cond}
            if r.random() < 0.9:
                rule["action"] = r.choice(["allow", "deny", "warn", "require_approval", "log"])
            if r.random() < 0.8:
                rule["priority"] = r.choice([0, 1, 5, 10, 10, 100, -1])
            if r.random() < 0.15:
                rule["stage"] = r.choice(["pre_tool", "post_tool", "pre_input"])
            if r.random() < 0.1:
                rule["enabled"] = False
            if r.random() < 0.1:
                rule["limit"] = f"{r.randint(1, 3)}/{r.choice(['hour', 'day'])}"
            if r.random() < 0.3:
                rule["description"] = f"why {i}"
            rules.append(rule)
        doc["rules"] = rules
        docs.append(doc)
    contexts = [rand_os_context(r) for _ in range(CONTEXTS_PER_GROUP)]
    return {"kind": "toolkit", "strategy": strategy, "docs": docs, "contexts": contexts}


def agent_of(ctx):
    a = ctx.get("agent")
    if isinstance(a, dict):
        for k in ("did", "id"):
            if isinstance(a.get(k), str):
                return a[k]
    return ""


def oracle_toolkit(group, files):
    engine = PolicyEngine(conflict_strategy=group["strategy"])
    for f in files:
        engine.load_yaml_file(f)
    out = []
    for ctx in group["contexts"]:
        d = engine.evaluate(agent_of(ctx), json.loads(json.dumps(ctx)), stage=group.get("stage", "pre_tool"))
        out.append({"action": d.action, "matched_rule": d.matched_rule, "reason": d.reason})
    return out


# ------------------------------------------------------------------ Agent-OS v4 corpus

V4_FIELDS = ["tool_name", "count", "path", "tags", "flag", "meta", "ratio", "missing"]
V4_REGEX = ["^ab", "c$", "a.c", "[0-9]+", "foo|bar", "\\d{2}", "^/etc/", "rm", "^$", "True"]


def rand_v4_value(r, op):
    if op == "matches":
        return r.choice(V4_REGEX + [12, True])
    k = r.random()
    if op in ("in", "not_in") and k < 0.7:
        return [rand_scalar(r) for _ in range(r.randint(0, 4))] if r.random() < 0.8 else r.choice(["abcdef", "/etc/passwd"])
    if op == "contains" and k < 0.5:
        return r.choice(["a", "rm", "/etc", "x", 1, True])
    if k < 0.1:
        return {"a": 1}
    return rand_value(r)


def rand_v4_context(r):
    ctx = {}
    for f in V4_FIELDS:
        if r.random() < 0.75:
            ctx[f] = rand_value(r)
    return ctx


def rand_v4_group(r, gid):
    docs = []
    for d in range(r.randint(1, 2)):
        doc = {"version": "1.0", "name": f"v{gid}-{d}"}
        if r.random() < 0.8:
            doc["defaults"] = {"action": r.choice(["allow", "deny", "audit", "block"])}
        rules = []
        for i in range(r.randint(1, 6)):
            op = r.choice(["eq", "ne", "gt", "lt", "gte", "lte", "in", "not_in", "matches", "contains"])
            rule = {"name": f"r{i}",
                    "condition": {"field": r.choice(V4_FIELDS), "operator": op, "value": rand_v4_value(r, op)},
                    "action": r.choice(["allow", "deny", "audit", "block"])}
            if r.random() < 0.8:
                rule["priority"] = r.choice([0, 1, 5, 10, 10, 100, -1])
            if r.random() < 0.3:
                rule["message"] = f"msg {i}"
            rules.append(rule)
        doc["rules"] = rules
        docs.append(doc)
    return {"kind": "v4", "docs": docs, "contexts": [rand_v4_context(r) for _ in range(CONTEXTS_PER_GROUP)]}


def oracle_v4(group, files):
    ev = PolicyEvaluator(policies=[PolicyDocument.from_yaml(f) for f in files])
    out = []
    for ctx in group["contexts"]:
        d = ev.evaluate(json.loads(json.dumps(ctx)))
        out.append({"action": d.action, "matched_rule": d.matched_rule, "reason": d.reason})
    return out


# ------------------------------------------------------------------ known AGT quirks

QUIRKS = [
    # (why, condition, context)
    ("' or ' inside a string literal is split by AGT", "event == 'a or b'", {"event": "a or b"}),
    ("' and ' inside a string literal is split by AGT", "event == 'a and b'", {"event": "a and b"}),
    ("AGT cannot compare with an unquoted number using ==", "proc.uid == 0", {"proc": {"uid": 0}}),
    ("AGT has no `not in`", "event not in ['exec']", {"event": "open"}),
    ("AGT has no negative number literals", "net.port > -1", {"net": {"port": 80}}),
    ("AGT has no parentheses", "(event == 'exec')", {"event": "exec"}),
    ("AGT has no `not`", "not flag", {"flag": False}),
    ("AGT reads unquoted list items as strings", "proc.uid in [0, 1]", {"proc": {"uid": 0}}),
    ("AGT cannot match an empty string", "event == ''", {"event": ""}),
    ("AGT ignores text after the first comparison", "event == 'exec' junk", {"event": "exec"}),
]


def quirk_groups():
    groups = []
    for i, (why, cond, ctx) in enumerate(QUIRKS):
        doc = {"apiVersion": "governance.toolkit/v1", "name": f"quirk{i}", "agents": ["*"],
               "default_action": "allow", "rules": [{"name": "q", "condition": cond, "action": "deny"}]}
        groups.append({"kind": "toolkit", "strategy": "priority_first_match", "docs": [doc],
                       "contexts": [ctx], "why": why})
    return groups


# ------------------------------------------------------------------ driver

def run_agt_jail(binary, files, contexts, stage=None):
    # --stage is refused for v4 policies (they have no stages), so it is passed for toolkit only.
    cmd = [binary, "policy", "eval", "--batch", "--input", "-"] + (["--stage", stage] if stage else [])
    for f in files:
        cmd += ["--policy", f]
    inp = "".join(json.dumps(c) + "\n" for c in contexts)
    p = subprocess.run(cmd, input=inp, capture_output=True, text=True)
    if p.returncode != 0:
        return None, p.stderr.strip()
    return [json.loads(line) for line in p.stdout.splitlines()], None


def write_group(tmp, gid, group):
    files = []
    for i, doc in enumerate(group["docs"]):
        path = os.path.join(tmp, f"g{gid}-{i}.yaml")
        with open(path, "w", encoding="utf-8") as fh:
            yaml.safe_dump(doc, fh, allow_unicode=True, sort_keys=False)
        files.append(path)
    return files


STATS = {}


def compare(binary, tmp, gid, group):
    files = write_group(tmp, gid, group)
    if group["kind"] == "toolkit":
        expected = oracle_toolkit(group, files)
    else:
        expected = oracle_v4(group, files)
    got, err = run_agt_jail(binary, files, group["contexts"],
                            stage="pre_tool" if group["kind"] == "toolkit" else None)
    for e in expected:
        STATS[(group["kind"], e["action"], e["matched_rule"] is not None)] = STATS.get((group["kind"], e["action"], e["matched_rule"] is not None), 0) + 1
    diffs = []
    if got is None or len(got) != len(expected):
        return len(expected), [(gid, None, "agt-jail failed: %s" % err, files)]
    for i, (e, g) in enumerate(zip(expected, got)):
        # agt-jail appends the error detail to AGT's fail-closed reason; otherwise reasons match.
        reason_ok = g["reason"] == e["reason"] or (g.get("error") and g["reason"].startswith(e["reason"]))
        if e["action"] != g["action"] or e["matched_rule"] != g["matched_rule"] or not reason_ok:
            diffs.append((gid, i, f"AGT {e} vs agt-jail {{'action': {g['action']!r}, 'matched_rule': {g['matched_rule']!r}, 'reason': {g['reason']!r}}} "
                          f"context={json.dumps(group['contexts'][i])}", files))
    return len(expected), diffs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.environ.get("AGT_JAIL_BIN", "target/debug/agt-jail"))
    ap.add_argument("--seed", type=int, default=20260522)
    ap.add_argument("--toolkit-groups", type=int, default=300)
    ap.add_argument("--v4-groups", type=int, default=200)
    ap.add_argument("--keep", action="store_true", help="keep the generated policies")
    args = ap.parse_args()
    r = random.Random(args.seed)
    tmp = tempfile.mkdtemp(prefix="agt-differential-")
    groups = [rand_toolkit_group(r, g) for g in range(args.toolkit_groups)]
    groups += [rand_v4_group(r, args.toolkit_groups + g) for g in range(args.v4_groups)]
    total, all_diffs = 0, []
    for gid, group in enumerate(groups):
        n, diffs = compare(args.bin, tmp, gid, group)
        total += n
        all_diffs += diffs
    for gid, i, msg, files in all_diffs[:20]:
        print(f"DISAGREE group {gid} case {i}: {msg}\n  policies: {' '.join(files)}")
    summary = ", ".join(f"{k[0]}/{k[1]}/{'rule' if k[2] else 'default'}={v}" for k, v in sorted(STATS.items()))
    print(f"corpus coverage (kind/action/source=count): {summary}")
    # Known quirks: expected to differ, reported separately.
    quirk_diffs = 0
    for j, group in enumerate(quirk_groups()):
        _, diffs = compare(args.bin, tmp, 100000 + j, group)
        status = "differs (documented)" if diffs else "same"
        quirk_diffs += bool(diffs)
        print(f"quirk: {group['why']}: {group['docs'][0]['rules'][0]['condition']!r}: {status}")
    print(f"documented AGT quirks exercised: {len(QUIRKS)}, of which differ: {quirk_diffs}")
    print(f"differential: {total} cases, {len(all_diffs)} disagreements")
    if not args.keep and not all_diffs:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"generated policies kept in {tmp}")
    return 1 if all_diffs else 0


if __name__ == "__main__":
    sys.exit(main())
