"""docs/figures.json: every results figure of README.md and docs/results.md, cross-run ratios included. Its own
hash chain and proofs are checked like a run's, then each figure is recomputed here from the provenance ids it
names (independently of the renderer): a stale provenance hash, an edited value or a missing id is a FAIL.
"""
from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path

from ..chain import history_dir, sha256_bytes
from ..io import sha256_file
from .levels import Findings
from .proofs import check_chain, check_stamps

VALUED = ("measured", "degraded")  # this audit's own copy (it checks with independent code)
REL_TOL = 1e-9


def audit_figures(path: Path, results: Path, s: dict, check_calendars: bool = True) -> tuple[Findings, dict]:
    F = Findings()
    info = {"run": "cross-run-figures", "provenance": str(path)}
    data = path.read_bytes()
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as exc:
        F.fail(f"{path} is not valid JSON ({exc}): run `make docs`")
        info["level"] = F.level
        return F, info
    info.update(sha256=sha256_bytes(data), revision=doc.get("revision"), numbers=len(doc.get("figures") or []))
    hist = history_dir(s["history"], doc.get("run") or info["run"])
    chain = check_chain(path, data, doc, hist, F)
    # docs/ holds no provenance_stamp.json: the proofs in the chain are what is checked
    info["chain"] = check_stamps(chain, hist, path, path.parent, s, F, check_calendars)
    runs: dict[str, dict] = {}
    for fig in doc.get("figures") or []:
        check_figure(fig, results, runs, F)
    if not F.failed:
        F.ok(f"{len(doc.get('figures') or [])} figures recomputed from {len(runs)} runs' provenance")
    info["level"] = F.level
    return F, info


def _run(results: Path, run: str, runs: dict) -> dict | None:
    """A run's provenance: its sha256, numbers by id and verdict.json (None when it has none)."""
    if run not in runs:
        p = results / run / "provenance.json"
        if not p.is_file():
            runs[run] = None
        else:
            doc = json.loads(p.read_bytes())
            runs[run] = {"sha256": sha256_file(p), "numbers": {n["id"]: n for n in doc.get("numbers") or []},
                         "verdict_sha256": (doc.get("inputs", {}).get("verdict") or {}).get("sha256"),
                         "verdict": results / run / "verdict.json"}
    return runs[run]


def check_figure(fig: dict, results: Path, runs: dict, F: Findings) -> None:
    expr, label = fig.get("expr", ""), f"figure {fig.get('text')!r} ({fig.get('expr')})"
    for run, sha in (fig.get("provenance_sha256") or {}).items():
        r = _run(results, run, runs)
        if r is None:
            return F.fail(f"{label}: results/{run}/provenance.json is missing")
        if r["sha256"] != sha:
            return F.fail(f"{label}: rests on results/{run}/provenance.json {sha[:16]}, which is now "
                          f"{r['sha256'][:16]}: the figure is stale, run `make docs`")
    try:
        want = recompute(expr.split("|")[0].split(), fig.get("ids") or [], results, runs)
    except (KeyError, ValueError, TypeError, ZeroDivisionError) as exc:
        return F.fail(f"{label}: cannot be recomputed from its provenance ({exc})")
    if not _same(fig.get("value"), want):
        F.fail(f"{label}: says {fig.get('value')}, its provenance gives {want}")


def recompute(words: list[str], ids: list[str], results: Path, runs: dict):
    if words[0] == "verdict":  # a field of verdict.json, whose sha256 the provenance records
        run, key = words[1], words[2]
        r = _run(results, run, runs)
        if "verdict_doc" not in r:  # read and checked once per run
            if sha256_file(r["verdict"]) != r["verdict_sha256"]:
                raise ValueError(f"results/{run}/verdict.json is not the one its provenance records")
            r["verdict_doc"] = json.loads(r["verdict"].read_text())
        v = r["verdict_doc"]
        for part in key.split("."):
            v = v[int(part)] if isinstance(v, list) else v[part]
        return v
    if words[0] == "range":  # [min, max] over every valued id that matches the globs
        found = sorted(i for pat in words[1:] for i in _valued(results, pat.split("/", 1)[0], runs)
                       if fnmatch.fnmatchcase(i, pat))
        if sorted(ids) != found:
            raise ValueError(f"names {len(ids)} ids, the globs match {len(found)} valued ids")
        values = [_value(results, i, runs) for i in found]
        return [min(values), max(values)]
    text = " ".join(words)
    for op in (" / ", " * "):  # a ratio (e.g. the same arm on two cards) or a product (a fraction as a count)
        if op in text:
            a, b = (_value(results, p.strip(), runs) for p in text.split(op))
            return a / b if op == " / " else a * b
    if len(words) == 1:
        return _value(results, words[0], runs)
    raise ValueError(f"expression {text!r} is not an id, a ratio or a product of two")


def _valued(results: Path, run: str, runs: dict) -> list[str]:
    r = _run(results, run, runs) or {"numbers": {}}
    return [i for i, n in r["numbers"].items()
            if n.get("status") in VALUED and isinstance(n.get("value"), (int, float))]


def _value(results: Path, nid: str, runs: dict) -> float:
    nid, _, fld = nid.partition("#")
    n = _run(results, nid.split("/", 1)[0], runs)["numbers"][nid]
    if n.get("status") not in VALUED:
        raise ValueError(f"{nid} is {n.get('status')}, not a measured number")
    return float(n[fld or "value"])


def _same(a, b) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=1e-12)
    return a == b
