"""The audit's own arithmetic (not the bench's or aggregate.py's): each draw's step_s median and interquartile
range from its per-step lines and steps.csv, comparison.csv's medians and the speedups from the checked rows, and
every input re-hashed.
"""
from __future__ import annotations

import csv
import math
import re
from pathlib import Path

from ..chain import resolve_source
from ..io import sha256_file
from .levels import Findings
from .logs import _rel


VALUED = ("measured", "degraded")


# ---- per-step times: the audit's own median and interquartile range -----------------------------------------
TIMED = re.compile(r"timed step (\d+)(?:/(\d+))?: ([0-9.eE+-]+) s\b")


def _median(xs: list[float]) -> float:
    s, n = sorted(xs), len(xs)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def _quartile(s: list[float], q: float) -> float:
    """Linear interpolation between order statistics at q * (n - 1) (the 'inclusive' quartile)."""
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _iqr(xs: list[float]) -> float:
    s = sorted(xs)
    return _quartile(s, 0.75) - _quartile(s, 0.25) if len(s) > 1 else 0.0


def timed_steps(log: Path) -> tuple[list[float], list[str], int]:
    """The per-step times a log prints, problems with their numbering, and the decimals they are printed with."""
    times, problems, decimals = [], [], 9
    for m in TIMED.finditer(log.read_text(errors="replace")):
        i, n, x = int(m.group(1)), m.group(2), m.group(3)
        if i != len(times) + 1:
            problems.append(f"step {i} follows step {len(times)}")
        if n is not None and int(n) < i:
            problems.append(f"step {i}/{n}")
        times.append(float(x))
        decimals = min(decimals, len(x.split(".")[1]) if "." in x else 0)
    return times, problems, decimals


def steps_csv(path: Path) -> list[float] | None:
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        return [float(r["seconds"]) for r in csv.DictReader(fh)]


def check_steps(doc: dict, root: Path, run_dir: Path, F: Findings) -> None:
    """Each bench draw's step_s (median) and spread (IQR) recomputed from the per-step lines of its run.log, within
    their printed precision (each printed time is within half a unit of its last digit, so are the median and
    each quartile), and from steps.csv exactly where the draw wrote one."""
    for n in doc.get("numbers") or []:
        if n.get("stage") != "bench" or n.get("metric") != "step_s" or n.get("status") not in VALUED:
            continue
        src = resolve_source(n.get("source", ""), run_dir, root)
        if src is None:
            continue  # named by check_numbers
        times, problems, decimals = timed_steps(src)
        exact = steps_csv(src.with_name("steps.csv"))
        label = f"number {n['id']} = {n.get('value')!r}"
        if problems:
            F.fail(f"{label}: per-step lines of {_rel(src, root)} are out of order ({'; '.join(problems[:3])})")
        if not times and exact is None:
            F.fail(f"{label}: {_rel(src, root)} has no per-step lines ('timed step i/n: x s') to recompute it from")
            continue
        half = 0.5 * 10 ** -decimals + 1e-12
        for what, xs, tol in (("per-step lines", times, half), ("steps.csv", exact, 1e-9)):
            if not xs:
                continue
            bad = []
            if n.get("n") is not None and n["n"] != len(xs):
                bad.append(f"n {n['n']} but {len(xs)} steps")
            if not math.isclose(_median(xs), n["value"], rel_tol=1e-9, abs_tol=tol):
                bad.append(f"median {_median(xs):.6g}")
            if n.get("spread") is not None and not math.isclose(_iqr(xs), n["spread"], rel_tol=1e-9,
                                                                abs_tol=2 * tol):
                bad.append(f"interquartile range {_iqr(xs):.6g} (recorded {n['spread']:.6g})")
            if bad:
                F.fail(f"{label}: recomputed from the {what} of {_rel(src, root)}: " + ", ".join(bad))
            else:
                F.checked["steps"] += 1
        if times and exact is not None and (len(times) != len(exact) or any(
                abs(a - b) > half for a, b in zip(times, exact))):
            F.fail(f"{_rel(src.with_name('steps.csv'), root)} does not match the per-step lines of {_rel(src, root)}")




# ---- derived numbers: this module's own arithmetic (not aggregate.py's) -------------------------------------
# comparison.csv column -> (bench metric(s), how draws combine); the first metric with values is used
COMPARISON = {"step_s": (("step_s",), "median"), "tokens_per_s": (("tokens_per_s",), "median"),
              "peak_alloc_gb": (("peak_alloc_gb", "peak_rss_gb"), "max"),
              "mem_after_load_gb": (("alloc_after_load_gb", "rss_after_load_gb"), "median"),
              "load_s": (("load_s",), "median"), "expert_lora_params": (("expert_lora_params",), "median"),
              "expert_4bit_fraction": (("expert_weights_4bit_fraction",), "median")}


def arm_cells(rows: list[dict]) -> dict:
    """One arm's comparison cells from its bench numbers."""
    steps = [r for r in rows if r["metric"] == "step_s" and r["status"] in VALUED]
    if not steps:
        return {"draws": 0.0}
    vals = [r["value"] for r in steps]
    out = {"draws": float(len(steps)), "step_s_iqr": _median([r.get("spread") or 0.0 for r in steps]),
           "draw_range_s": max(vals) - min(vals)}
    for col, (metrics, how) in COMPARISON.items():
        for m in metrics:
            xs = [r["value"] for r in rows if r["metric"] == m and r["status"] in VALUED]
            if xs:
                out[col] = max(xs) if how == "max" else _median(xs)
                break
    return out


def check_derived(doc: dict, F: Findings) -> None:
    """comparison.csv's medians and the speedups (baseline median step_s / arm median step_s), recomputed from the
    provenance's bench numbers (each already checked against its log)."""
    numbers = doc.get("numbers") or []
    by_arm: dict[str, list[dict]] = {}
    for n in numbers:
        if n.get("stage") == "bench":
            by_arm.setdefault(n["arm"], []).append(n)
    cells = {arm: arm_cells(rows) for arm, rows in by_arm.items()}
    for n in numbers:
        if n.get("stage") == "comparison":
            got = cells.get(n["arm"], {}).get(n["metric"])
        elif n.get("stage") == "compare" and n["metric"].startswith("speedup_vs_"):
            base = n["metric"].removeprefix("speedup_vs_")
            a, b = cells.get(n["arm"], {}).get("step_s"), cells.get(base, {}).get("step_s")
            got = b / a if a and b else None
        else:
            continue
        if got is None or n.get("value") is None or not math.isclose(got, n["value"], rel_tol=1e-9, abs_tol=1e-12):
            F.fail(f"derived number {n['id']} = {n.get('value')!r}: recomputed from the checked rows it is {got!r}")
        else:
            F.checked["derived"] += 1


def check_inputs(doc: dict, root: Path, F: Findings) -> None:
    """Re-hash every input the provenance names. A file absent by design (model weights are not committed) is
    noted, not failed; one that is here and differs is a failure."""
    inputs = doc.get("inputs", {})
    files = [(k, v) for k, v in inputs.items() if isinstance(v, dict) and "sha256" in v and "path" in v]
    files += [(f"env {k}", v) for k, v in (doc.get("environment", {}).get("arms") or {}).items()]
    if isinstance((inputs.get("model") or {}).get("fingerprint"), dict):
        files.append(("model fingerprint", inputs["model"]["fingerprint"]))
    data_dir = Path(inputs.get("data", {}).get("path", "")).parent
    files += [(f"data {name}", {"path": str(data_dir / name), "sha256": sha})
              for name, sha in (inputs.get("data", {}).get("files") or {}).items()]
    for key, v in files:
        p = root / v["path"]
        if not p.is_file():
            F.warn(f"input {key}: {v['path']} not present here; not re-hashed")
            continue
        got = sha256_file(p)
        if got != v["sha256"]:
            F.fail(f"input {key}: {v['path']} changed since the provenance was written "
                   f"(sha256 {v['sha256'][:16]} -> {got[:16]})")
        else:
            F.checked["inputs"] += 1
