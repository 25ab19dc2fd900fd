"""The verdict: on this GPU, is Unsloth's bf16 Split LoRA worth it over Unsloth's own 4-bit QLoRA?

The seed notebook's rule, made to survive a sceptic:
  - the reference is unsloth_4bit and nothing else: other 4-bit arms are reported beside it, never in its place;
  - each ratio is paired per draw (draw k of both arms, measured next to each other in time), and the interval is
    a hierarchical bootstrap (resample the pairs, then the timed steps inside each draw);
  - VIABLE when the interval's low end is >= verdict.min_speedup (expert LoRA present, and the bf16 arm's
    fine-tune passing its gates), NOT VIABLE when its high end is below, INCONCLUSIVE when it straddles, NOT
    TESTABLE when the reference did not run, is degraded, has too few draws, or fails its validation.
Pure functions over what aggregate read from the draws: a test can build every outcome.
"""
from __future__ import annotations

import random
import statistics
from dataclasses import dataclass, field

from .io import shorten

CANDIDATE, REFERENCE = "unsloth_bf16", "unsloth_4bit"
OTHER_FOUR_BIT = ("e4b_4bit", "hf_bnb4")


@dataclass
class Draw:
    """One fresh-process draw of one arm: its timed step times and how it ended."""
    arm: str
    draw: int
    steps: list[float] = field(default_factory=list)  # timed step times, seconds
    status: str = "measured"  # measured / degraded / skipped / failed
    reason: str = ""
    started: str = ""  # ISO time the process started (env.json): proves the interleaving
    expert_lora_params: float | None = None
    expert_4bit_fraction: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.steps)


def pairs(cand: list[Draw], ref: list[Draw]) -> list[tuple[Draw, Draw]]:
    """Draw k of the candidate with draw k of the reference: the interleaved driver runs them back to back."""
    by_k = {d.draw: d for d in ref}
    return [(c, by_k[c.draw]) for c in sorted(cand, key=lambda d: d.draw) if c.draw in by_k]


def paired_ratios(ps: list[tuple[Draw, Draw]]) -> list[float]:
    """Reference step time over candidate step time, per pair (> 1: the candidate is faster)."""
    return [r.median / c.median for c, r in ps]


def _resampled_median(xs: list[float], rng: random.Random) -> float:
    return statistics.median(rng.choices(xs, k=len(xs)))


def bootstrap(ps: list[tuple[Draw, Draw]], reps: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Hierarchical bootstrap of the median paired ratio: resample the pairs (draw-to-draw spread, the larger
    one), then the timed steps inside each draw of each arm; the percentile interval at `level`."""
    rng = random.Random(seed)
    stats = []
    for _ in range(reps):
        chosen = rng.choices(ps, k=len(ps))
        ratios = [_resampled_median(r.steps, rng) / _resampled_median(c.steps, rng) for c, r in chosen]
        stats.append(statistics.median(ratios))
    stats.sort()
    tail = (1 - level) / 2
    lo = stats[int(tail * (reps - 1))]
    hi = stats[int(round((1 - tail) * (reps - 1)))]
    return lo, hi


def interleaved(ps: list[tuple[Draw, Draw]]) -> bool:
    """True when, in start order, the two arms' draws alternate (A B A B … or B A B A …): drift then hits both."""
    seq = sorted((d.started, d.arm) for pair in ps for d in pair)
    if any(not s for s, _ in seq):
        return False
    arms = [a for _, a in seq]
    return all(a != b for a, b in zip(arms, arms[1:]))


def _not_testable(why: str, min_speedup: float) -> dict:
    return {"verdict": "NOT TESTABLE", "reason": why, "speedup": None, "interval": None, "min_speedup": min_speedup,
            "reference": None}


def _blocked(arm: str, draws: list[Draw], allow_degraded: bool) -> str | None:
    """Why this arm's draws cannot carry a verdict (None when they can)."""
    if not draws:
        return f"{arm} not in this run"
    usable = [d for d in draws if d.status == "measured" or (allow_degraded and d.status == "degraded")]
    if usable and len(usable) == len(draws):
        return None
    bad = next(d for d in draws if d not in usable)
    what = "degraded (a library announced a fallback path)" if bad.status == "degraded" else bad.status
    return f"{arm} draw {bad.draw} {what}: {shorten(bad.reason, 200)}"


def speed_verdict(by_arm: dict[str, list[Draw]], min_speedup: float, min_draws: int = 3,
                  allow_degraded: bool = False, reps: int = 2000, level: float = 0.95) -> dict:
    """The interval rule on the candidate's and the reference's draws (see the module doc)."""
    cand, ref = by_arm.get(CANDIDATE, []), by_arm.get(REFERENCE, [])
    for arm, draws in ((CANDIDATE, cand), (REFERENCE, ref)):
        why = _blocked(arm, draws, allow_degraded)
        if why:
            return _not_testable(why, min_speedup)
    ps = pairs(cand, ref)
    ratios = paired_ratios(ps)
    if len(ps) < min_draws:  # the paired ratios are shown, labelled; no interval, no verdict
        seen = f" (paired ratios so far: {', '.join(f'{r:.2f}x' for r in ratios)})" if ratios else ""
        return {**_not_testable(f"{len(ps)} paired draws of {CANDIDATE} and {REFERENCE}; the rule needs >= "
                                f"{min_draws} fresh-process draws of each, interleaved{seen}", min_speedup),
                "paired_ratios": ratios, "n_draws": len(ps)}
    point = statistics.median(ratios)
    lo, hi = bootstrap(ps, reps=reps, level=level)
    lora = all((c.expert_lora_params or 0) > 0 for c, _ in ps)
    n_steps = sorted({len(d.steps) for p in ps for d in p})
    out = {"speedup": point, "interval": [lo, hi], "level": level, "n_draws": len(ps), "steps_per_draw": n_steps,
           "paired_ratios": ratios, "paired_min": min(ratios), "paired_max": max(ratios),
           "interleaved": interleaved(ps), "min_speedup": min_speedup, "reference": REFERENCE,
           "expert_lora_present": lora, "bootstrap": f"hierarchical (pairs, then steps), {reps} resamples"}
    stated = (f"{CANDIDATE} is {point:.2f}x {REFERENCE} (median of {len(ps)} paired draws; {level:.0%} interval "
              f"{lo:.2f}–{hi:.2f}; paired ratios {min(ratios):.2f}–{max(ratios):.2f})")
    if not lora:
        return {**out, "verdict": "NOT VIABLE", "reason": stated + "; but no expert LoRA was trained"}
    if lo >= min_speedup:
        v, rule = "VIABLE", f"the interval's low end >= {min_speedup}x"
    elif hi < min_speedup:
        v, rule = "NOT VIABLE", f"the interval's high end < {min_speedup}x"
    else:
        v, rule = "INCONCLUSIVE", f"the interval straddles {min_speedup}x"
    if not out["interleaved"]:
        rule += "; the draws were not interleaved in time"
    return {**out, "verdict": v, "reason": f"{stated}: {rule}"}


def beside(by_arm: dict[str, list[Draw]]) -> dict[str, dict]:
    """The candidate's ratio to each other 4-bit arm (median over medians): shown next to the verdict, never in
    the reference's place. The census says whether that arm's experts really are 4-bit."""
    cand = [d for d in by_arm.get(CANDIDATE, []) if d.status == "measured"]
    out = {}
    for arm in OTHER_FOUR_BIT:
        other = [d for d in by_arm.get(arm, []) if d.status == "measured"]
        if cand and other:
            out[arm] = {"speedup": statistics.median(d.median for d in other) / statistics.median(d.median for d in cand),
                        "draws": len(other), "expert_4bit_fraction": other[0].expert_4bit_fraction}
    return out


# ---- training health joins the speed verdict -----------------------------------------------------------------
def overall_verdict(bench_verdict: dict, gates: dict[str, dict], arm: str = CANDIDATE) -> dict:
    """The speed verdict with training health: VIABLE needs the candidate's fine-tune to pass every gate; a
    reference whose fine-tune fails makes the comparison NOT TESTABLE (it did not train what it claimed). `gates`
    maps arm -> that arm's gates.json document. A speed verdict without a training result cannot be VIABLE."""
    per_arm = {a: _arm_training(d) for a, d in sorted(gates.items())}
    out = {**bench_verdict, "speed_verdict": bench_verdict.get("verdict"), "training": per_arm}
    speed, base = bench_verdict.get("verdict"), bench_verdict.get("reason", "")
    ref = bench_verdict.get("reference")
    if ref and per_arm.get(ref, {}).get("result") == "FAIL":
        out.update(verdict="NOT TESTABLE", reason=f"{base}; but the reference {ref}'s training fails gates: "
                                                  f"{per_arm[ref]['why']}")
        return out
    note = ""
    if ref and ref in per_arm and per_arm[ref]["result"] != "PASS":
        note = f" [the reference {ref}'s training validation: {per_arm[ref]['result']}: {per_arm[ref]['why']}]"
    if speed != "VIABLE":
        out["reason"] = base + note
        return out  # NOT VIABLE, INCONCLUSIVE or NOT TESTABLE on speed alone; the gates cannot rescue it
    mine = per_arm.get(arm)
    if mine is None:
        out.update(verdict="NOT TESTABLE", reason=f"{base}; {arm} was not validated (no gates.json){note}")
    elif mine["result"] == "PASS":
        out.update(verdict="VIABLE", reason=f"{base}; {arm} training passes every gate ({', '.join(mine['gates'])}){note}")
    elif mine["result"] == "FAIL":
        out.update(verdict="NOT VIABLE", reason=f"{base}; but {arm} training fails gates: {mine['why']}{note}")
    else:
        out.update(verdict="NOT TESTABLE", reason=f"{base}; {arm} training {mine['result'].lower()}: {mine['why']}{note}")
    return out


# A reload result without this row was measured by the first check, which compared the trainer's bf16-autocast
# forward of the trained model with a plain reloaded one: it measured autocast, not the adapter (on the H100 the
# old hf_bf16 "reload difference", 3.1875, is exactly the autocast difference measured since, with a reload at 0).
PLAIN_FORWARD_ROW = "reload_trained_autocast_max_abs_diff"
SUPERSEDED = "reload measured by the superseded check (autocast forward vs plain reload): re-run validate"


def mark_superseded(gates: dict[str, dict], rows) -> dict[str, dict]:
    """arm -> gates.json document, with `reload_superseded` set where the arm's validate rows lack the
    plain-forward row (its reload gate then counts as not measured)."""
    plain = {r.arm for r in rows if r.stage == "validate" and r.metric == PLAIN_FORWARD_ROW}
    return {a: {**d, "reload_superseded": True} if d.get("status") == "measured" and a not in plain else d
            for a, d in gates.items()}


def _arm_training(doc: dict) -> dict:
    if doc.get("status") != "measured":
        return {"result": (doc.get("status") or "absent").upper(), "why": doc.get("reason", ""), "gates": []}
    gs = doc.get("gates", [])
    void = doc.get("reload_superseded")
    failed = [f"{g['name']} ({g['detail']})" for g in gs if not g["passed"] and not (void and g["name"] == "reload")]
    names = [g["name"] + (" (superseded)" if void and g["name"] == "reload" else "") for g in gs]
    if failed or not void:
        return {"result": "FAIL" if failed or not doc.get("passed") else "PASS", "why": "; ".join(failed),
                "gates": names}
    return {"result": "UNVERIFIED", "why": SUPERSEDED, "gates": names}
