"""The synthetic coding-agent conversations every run trains on: their generation (seeded, so the same config
gives the same conversations), their plain text (the tokenizer's training corpus) and the train/held-out split.

Shared: the data stage renders them to files and the models stage trains its tokenizer and calibrates its routers
on them; a stage may not import another, so they live here.
"""
from __future__ import annotations

import json
import random

LANGS = ["python", "rust", "go", "typescript"]
MODULES = ["parser", "scheduler", "cache", "tokenizer", "router", "storage", "auth", "metrics"]
FUNCS = ["merge_intervals", "parse_header", "retry_with_backoff", "topk_indices", "normalize_path",
         "lru_get", "chunk_iter", "dedupe_stable"]
ERRORS = ["IndexError: list index out of range", "AssertionError: expected 3, got 2",
          "TypeError: 'NoneType' object is not iterable", "KeyError: 'user_id'", "ValueError: empty sequence"]
SYSTEM = "You are a coding agent. Reasoning: medium. Valid channels: analysis, commentary, final."
DEVELOPER = ("Use the tools to inspect and test the repository before answering. "
             "Tools: run_shell(cmd), read_file(path), apply_patch(diff).")


def opening() -> list[dict]:
    """The system and developer turns every conversation starts with (fresh dicts: callers may edit them)."""
    return [{"role": "system", "content": SYSTEM}, {"role": "developer", "content": DEVELOPER}]


def _bugfix(rng: random.Random) -> list[dict]:
    mod, fn, err = rng.choice(MODULES), rng.choice(FUNCS), rng.choice(ERRORS)
    n = rng.randint(2, 40)
    return [
        {"role": "user", "content": f"tests/test_{mod}.py fails with `{err}` in {fn}. Please fix it."},
        {"role": "assistant", "thinking": f"Run the failing test first to see where {fn} breaks.",
         "tool_calls": [{"name": "run_shell", "arguments": {"cmd": f"pytest -x tests/test_{mod}.py -k {fn}"}}]},
        {"role": "tool", "name": "run_shell", "content": f"FAILED tests/test_{mod}.py::test_{fn}_{n} - {err}"},
        {"role": "assistant", "thinking": f"The loop in {fn} reads one past the end when len(items) == {n}; "
                                          "guard the boundary and add a regression test.",
         "tool_calls": [{"name": "apply_patch", "arguments": {"diff": f"--- a/src/{mod}.py\n+++ b/src/{mod}.py\n"
                                                                       f"-    for i in range(len(items) + 1):\n"
                                                                       f"+    for i in range(len(items)):"}}]},
        {"role": "tool", "name": "apply_patch", "content": "patch applied; 1 file changed"},
        {"role": "assistant", "content": f"Fixed an off-by-one in `{fn}` (src/{mod}.py): the loop ran to "
                                         f"len(items) inclusive. The test case with {n} items passes now."},
    ]


def _feature(rng: random.Random) -> list[dict]:
    lang, mod, fn = rng.choice(LANGS), rng.choice(MODULES), rng.choice(FUNCS)
    k = rng.randint(1, 9)
    return [
        {"role": "user", "content": f"Add a `{fn}` helper to the {mod} module ({lang}) with a test."},
        {"role": "assistant", "thinking": f"Read the {mod} module to follow its conventions.",
         "tool_calls": [{"name": "read_file", "arguments": {"path": f"src/{mod}.{lang[:2]}"}}]},
        {"role": "tool", "name": "read_file", "content": f"// {mod}: {k} public functions, snake_case, errors returned"},
        {"role": "assistant", "thinking": f"Keep it pure and total; {k} existing helpers return errors, so do that too.",
         "content": f"Added `{fn}` to src/{mod} following its error style, with a unit test covering empty input "
                    f"and {k} items. Run the module's tests to confirm."},
    ]


def _explain(rng: random.Random) -> list[dict]:
    mod, fn = rng.choice(MODULES), rng.choice(FUNCS)
    return [
        {"role": "user", "content": f"What does `{fn}` in the {mod} module cost for n items?"},
        {"role": "assistant", "thinking": f"{fn} makes one pass and keeps a hash set: linear time and space.",
         "content": f"`{fn}` is O(n) time and O(n) extra memory: one pass with a hash set of seen keys."},
    ]


TEMPLATES = {"bugfix": _bugfix, "feature": _feature, "explain": _explain}


def conversations(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    names = sorted(TEMPLATES)
    out = []
    for i in range(n):
        name = names[i % len(names)]
        out.append({"id": f"conv-{i:05d}", "template": name, "messages": opening() + TEMPLATES[name](rng)})
    return out


def corpus_text(n: int, seed: int) -> list[str]:
    """Plain text of every message (tokenizer training corpus)."""
    texts = []
    for conv in conversations(n, seed):
        for m in conv["messages"]:
            texts.extend(str(m.get(k, "")) for k in ("content", "thinking"))
            texts.extend(json.dumps(c["arguments"], sort_keys=True) for c in m.get("tool_calls", []))
    return [t for t in texts if t]


def split(convs: list[dict], heldout_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held out): a seeded shuffle picks the held-out share, each side keeps the generation order."""
    idx = list(range(len(convs)))
    random.Random(seed + 1).shuffle(idx)
    k = max(1, round(len(convs) * heldout_fraction))
    held = set(idx[:k])
    return [c for i, c in enumerate(convs) if i not in held], [c for i, c in enumerate(convs) if i in held]
