"""The recipe for this card: from a run's measured grid (arm x batch x sequence x checkpointing/offload mode), the
fastest configuration that fits with memory headroom, the smallest-memory one that still trains, and the one with
the lowest net J/token (gross beside it).

Only measured settings compete (nothing is interpolated between grid points). A setting's value is the median over
its draws (fresh processes); a pick needs `min_draws` of them, `close_draws` when it is within `close` of the
runner-up, and says what is missing when it has fewer ("needs 1 more draw") instead of pretending. Degraded rows
(a fallback path a library announced) are left out unless `recipe.allow_degraded`. Arms that cannot win a pick are
named with the reason, so a refining search spends no GPU time on them.

Reads the tidy rows of bench, energy, offload (uncapped), shape curve, recipe points and sweep; writes
recipe.json and recipe.md, the page with a ready-to-paste training snippet per pick (pages and snippets:
report/recipe_page.py). `cost` says what the grid cost: the logged wall time of the processes behind it, per stage.
"""
from __future__ import annotations

import argparse
import math
import re
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from .grid import is_capped, mode_of, parse_shape_metric
from .io import atomic_write, logger, read_json, write_json
from .metrics import Row, read_many
from .report.recipe_page import render_html, render_md, render_snippet, snippet_kind  # noqa: F401 (API)

DEFAULTS = {"headroom": 0.10, "min_draws": 2, "close_draws": 3, "close": 0.05, "allow_degraded": False}
# shape: the shape curve's fresh-process points; point: the settings config recipe.points asked for
STAGES = ("bench", "energy", "offload", "sweep", "shape", "point")
GIB, GB = 2**30, 1e9
PEAKS = ("peak_reserved_gb", "peak_alloc_gb", "peak_rss_gb")  # preferred first


# ---------------------------------------------------------------- the grid
@dataclass
class Draw:
    """One fresh process at one setting: what it measured."""
    source: str
    draw: int | None
    stage: str = ""
    tokens_per_s: float | None = None
    peak_gib: float | None = None
    peak_metric: str = ""
    loss_first: float | None = None
    loss_last: float | None = None
    j_net: float | None = None
    j_gross: float | None = None
    degraded: list[str] = field(default_factory=list)
    failed: str | None = None  # OOM or crash at this setting
    ids: list[str] = field(default_factory=list)


@dataclass
class Setting:
    arm: str
    precision: str
    batch: int
    seq: int
    mode: str
    draws: dict = field(default_factory=dict)  # (source, draw) -> Draw
    skipped: str | None = None

    @property
    def label(self) -> str:
        return f"{self.arm} · batch {self.batch} × seq {self.seq} · {self.mode}"

    def spec(self) -> dict:
        return {"arm": self.arm, "precision": self.precision, "batch": self.batch, "seq_len": self.seq,
                "mode": self.mode}

    def ran(self) -> list[Draw]:
        return [d for d in self.draws.values() if d.tokens_per_s is not None and not d.failed]

    def failures(self) -> list[str]:
        return [d.failed for d in self.draws.values() if d.failed]

    def degraded(self) -> list[str]:
        return [why for d in self.draws.values() for why in d.degraded]

    def values(self, attr: str) -> list[float]:
        return [getattr(d, attr) for d in self.ran() if getattr(d, attr) is not None]

    def peak(self) -> float | None:
        """The largest peak over the draws: a setting fits only if every draw fitted."""
        v = self.values("peak_gib")
        return max(v) if v else None

    def trains(self) -> bool | None:
        """Finite loss that falls over the run, in every draw (None: no loss recorded)."""
        pairs = [(d.loss_first, d.loss_last) for d in self.ran() if d.loss_first is not None and d.loss_last is not None]
        if not pairs:
            return None
        return all(math.isfinite(a) and math.isfinite(b) and b < a for a, b in pairs)


def _mem_gib(row: Row) -> float:
    return float(row.value) * (GIB if row.unit == "GiB" else GB) / GIB


def _row_id(r: Row) -> str:
    """The same id provenance gives the number (provenance.number_id)."""
    d = "all" if r.draw in (None, "") else f"d{int(r.draw)}"
    return f"{r.run_id}/{r.stage}/{r.arm}/{d}/{r.metric}"


def setting_of(row: Row, plan: dict) -> tuple[tuple, str] | None:
    """(grid key, plain metric name) of a row, or None when the row is not a point of this card's grid."""
    if row.stage not in STAGES or is_capped(row.metric):
        return None
    arm, _, mode = row.arm.partition("+")  # offload rows are "<arm>+<mode>"
    shaped = parse_shape_metric(row.metric)
    metric, batch, seq = (shaped[0], shaped[1], shaped[2]) if shaped else (row.metric, plan["batch"], plan["seq_len"])
    return (arm, row.precision, int(batch), int(seq), mode or mode_of(plan.get("gradient_checkpointing"), arm)), metric


def collect(rows: list[Row], plan: dict) -> dict[tuple, Setting]:
    grid: dict[tuple, Setting] = {}
    for r in rows:
        where = setting_of(r, plan)
        if where is None:
            continue
        key, metric = where
        s = grid.setdefault(key, Setting(*key))
        if r.status == "skipped":
            s.skipped = s.skipped or r.reason
            continue
        d = s.draws.setdefault((r.source, r.draw), Draw(r.source, r.draw, r.stage))
        if r.status == "failed" and metric in ("step_s", "tokens_per_s", "error", "fits"):
            d.failed = d.failed or r.reason
        if r.status == "degraded":
            d.degraded.append(f"{metric}: {r.reason}")
        if r.status in ("measured", "degraded") and isinstance(r.value, (int, float)):
            _put(d, metric, r)
    return grid


def _put(d: Draw, metric: str, r: Row) -> None:
    if metric == "tokens_per_s":
        d.tokens_per_s = float(r.value)
    elif metric in PEAKS:
        # reserved is what the card must hold (the allocator's cache included); alloc when reserved is absent;
        # the host's peak RSS on the CPU tier
        if PEAKS.index(metric) <= (PEAKS.index(d.peak_metric) if d.peak_metric else len(PEAKS)):
            d.peak_gib, d.peak_metric = _mem_gib(r), metric
    elif metric in ("loss_first", "loss_last"):
        setattr(d, metric, float(r.value))
    elif metric == "j_per_token_net":
        d.j_net = float(r.value)
    elif metric == "j_per_token":
        d.j_gross = float(r.value)
    else:
        return
    d.ids.append(_row_id(r))


# ---------------------------------------------------------------- the picks
PICKS = {
    "fastest": ("the fastest configuration that fits with headroom", "tokens_per_s", "tokens/s", True),
    "smallest": ("the smallest-memory configuration that trains", "peak_gib", "GiB", False),
    "lowest_energy": ("the lowest net energy per token (fits with headroom)", "j_net", "J/token", False),
}


def eligibility(s: Setting, pick: str, limit_gib: float | None, allow_degraded: bool) -> str | None:
    """Why setting `s` cannot be `pick` (None: it can)."""
    if s.skipped and not s.draws:
        return f"skipped: {s.skipped}"
    if s.failures():
        n, m = len(s.failures()), len(s.draws)
        return f"failed in {n} of {m} draws ({s.failures()[0]})"
    if not s.ran():
        return "no measured draw"
    if s.degraded() and not allow_degraded:
        return f"degraded ({s.degraded()[0]}); recipe.allow_degraded is false"
    peak = s.peak()
    if peak is None:
        return "peak memory not recorded"
    if pick in ("fastest", "lowest_energy") and limit_gib is not None and peak > limit_gib:
        return f"peak {peak:.1f} GiB above the headroom limit {limit_gib:.1f} GiB"
    if pick == "smallest":
        t = s.trains()
        if t is None:
            return "no loss recorded (loss_first/loss_last), so training is not shown"
        if not t:
            return "loss not finite or did not fall"
    if pick == "lowest_energy" and not s.values("j_net"):
        return "no net J/token measured"
    return None


def score(s: Setting, attr: str) -> float:
    return statistics.median(s.values(attr)) if attr != "peak_gib" else s.peak()


def choose(grid: dict, pick: str, limit_gib: float | None, rules: dict) -> dict:
    title, attr, unit, higher = PICKS[pick]
    cands = [s for s in grid.values() if eligibility(s, pick, limit_gib, rules["allow_degraded"]) is None]
    out = {"question": title, "metric": attr, "unit": unit}
    if not cands:
        whys = {eligibility(s, pick, limit_gib, rules["allow_degraded"]) for s in grid.values()}
        why = ("nothing was measured" if not grid else
               "every setting ran out of memory" if all(s.failures() and not s.ran() for s in grid.values()) else
               f"no setting qualifies: {whys.pop()}" if len(whys) == 1 else "no setting qualifies (see `excluded`)")
        return {**out, "status": "none", "reason": why}
    # best first; ties broken by fewer draws needed elsewhere: less memory, then the label, so the pick is stable
    ranked = sorted(cands, key=lambda s: ((-1 if higher else 1) * score(s, attr), s.peak(), s.label))
    best = ranked[0]
    value = score(best, attr)
    vals = best.values(attr)
    out.update(status="measured", setting=best.spec(), label=best.label, value=value, n=len(vals),
               min=min(vals), max=max(vals), draws=vals,
               spread="min–max over fresh-process draws" if len(vals) > 1 else "one draw: no spread",
               ids=sorted({i for d in best.ran() for i in d.ids}),
               sources=sorted({d.source for d in best.ran()}))
    need = rules["min_draws"]
    if len(ranked) > 1:
        other = score(ranked[1], attr)
        gap = abs(value - other) / abs(value) if value else 0.0
        out["runner_up"] = {"label": ranked[1].label, "value": other, "gap": gap,
                            "n": len(ranked[1].values(attr))}
        if gap <= rules["close"]:
            need = rules["close_draws"]
            out["runner_up"]["note"] = f"within {rules['close']:.0%}: the pick needs {need} draws"
            if gap == 0:
                out["runner_up"]["note"] += " (a tie)"
    if pick == "lowest_energy":
        gross = best.values("j_gross")
        out["gross_j_per_token"] = statistics.median(gross) if gross else None
    if pick == "smallest":
        out["tokens_per_s"] = statistics.median(best.values("tokens_per_s"))
    n = len(vals)  # draws that measured this pick's quantity
    if n < need:
        k = need - n
        out.update(status="needs draws", missing=f"needs {k} more draw{'s' if k > 1 else ''}", draws_needed=k)
    return out


# ---------------------------------------------------------------- pruning
def prune(grid: dict) -> list[dict]:
    """Arms that cannot win a pick: none of their settings ran, or at every shape they share with another arm
    that arm is faster, smaller and no hungrier for energy. A refining search skips them."""
    by_arm: dict[str, list[Setting]] = {}
    for s in grid.values():
        by_arm.setdefault(s.arm, []).append(s)
    out = []
    for arm, settings in sorted(by_arm.items()):
        ran = [s for s in settings if s.ran() and not s.failures()]
        if not ran:
            why = next((s.skipped for s in settings if s.skipped), None) or next(
                (s.failures()[0] for s in settings if s.failures()), "no measured setting")
            out.append({"arm": arm, "why": f"no setting of it ran: {why}"})
            continue
        for other in sorted(by_arm):
            if other != arm and (why := _dominated(ran, by_arm[other])):
                out.append({"arm": arm, "why": f"{other} beats it at every shared shape: {why}"})
                break
    return out


def _dominated(mine: list[Setting], theirs: list[Setting]) -> str | None:
    reasons = []
    for s in mine:
        rivals = [t for t in theirs if (t.batch, t.seq) == (s.batch, s.seq) and t.ran() and not t.failures()]
        beat = [t for t in rivals if _beats(t, s)]
        if not beat:
            return None
        t = beat[0]
        reasons.append(f"{s.batch}×{s.seq}: {score(t, 'tokens_per_s'):.0f} vs {score(s, 'tokens_per_s'):.0f} tokens/s, "
                       f"{t.peak():.1f} vs {s.peak():.1f} GiB")
    return "; ".join(reasons)


def _beats(t: Setting, s: Setting) -> bool:
    if t.peak() is None or s.peak() is None:
        return False
    faster = score(t, "tokens_per_s") > score(s, "tokens_per_s")
    smaller = t.peak() <= s.peak()
    te, se = t.values("j_net"), s.values("j_net")
    greener = not te or not se or statistics.median(te) <= statistics.median(se)
    return faster and smaller and greener


def refine(grid: dict, picks: dict) -> list[dict]:
    """Unmeasured neighbours of the fastest pick (twice the batch, twice the sequence): where a refining search
    looks next, since more tokens per step can be faster while it still fits. Suggestions, never picks."""
    best = picks["fastest"].get("setting")
    if not best:
        return []
    out = []
    for b, q in ((best["batch"] * 2, best["seq_len"]), (best["batch"], best["seq_len"] * 2)):
        key = (best["arm"], best["precision"], b, q, best["mode"])
        if key not in grid:
            spec = {**best, "batch": b, "seq_len": q}
            out.append({"label": Setting(*key).label, "setting": spec,
                        "why": "an unmeasured neighbour of the fastest pick"})
    return out


# ---------------------------------------------------------------- what the grid cost
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def log_span_s(path: str) -> float | None:
    """Seconds from a log's first timestamped line to its last: the wall time of what it logged (None: no log)."""
    first = last = None
    p = Path(path)
    if not p.is_file():
        return None
    with p.open(errors="replace") as f:
        for line in f:
            if m := LOG_TIME.match(line):
                t = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S").timestamp() + int(m[2]) / 1e3
                first, last = (t if first is None else first), t
    return last - first if first is not None else None


def cost(rows: list[Row]) -> dict:
    """stage -> {seconds, logs, missing}: the span of each distinct log the grid's rows come from (a draw's run.log,
    a shape curve's, recipe point's or sweep's stage log); model builds and interpreter start-up are not in it.
    Energy rows share their draw's log and are not counted twice."""
    out: dict = {}
    for stage, src in sorted({(r.stage, r.source) for r in rows if r.stage in STAGES and r.stage != "energy"}):
        c = out.setdefault(stage, {"seconds": 0.0, "logs": 0, "missing": 0})
        s = log_span_s(src) if src else None
        if s is None:
            c["missing"] += 1
        else:
            c["seconds"] += s
            c["logs"] += 1
    return out


# ---------------------------------------------------------------- the search
def search(rows: list[Row], tier: dict, rules: dict | None = None) -> dict:
    rules = {**DEFAULTS, **(rules or {})}
    plan, gpu = tier["plan"], tier.get("gpu")
    grid = collect(rows, plan)
    card = gpu.get("memory_gb") if gpu else None  # GiB (detect: total_memory / 2**30)
    limit = card * (1 - rules["headroom"]) if card else None
    picks = {p: choose(grid, p, limit, rules) for p in PICKS}
    excluded = []
    for s in sorted(grid.values(), key=lambda s: s.label):
        whys = {p: w for p in PICKS if (w := eligibility(s, p, limit, rules["allow_degraded"]))}
        if whys:
            excluded.append({"label": s.label, "setting": s.spec(), "why": whys})
    nxt = [{"pick": p, "label": v["label"], "setting": v["setting"], "draws_needed": v["draws_needed"]}
           for p, v in picks.items() if v.get("draws_needed")]
    more = refine(grid, picks)
    for x in nxt + more:  # what config recipe.points measures: settings at the arm's own checkpointing mode
        s = x["setting"]
        if s["mode"] == mode_of(plan.get("gradient_checkpointing"), s["arm"]):
            x["point"] = f"{s['arm']}:{s['batch']}x{s['seq_len']}"
    return {"run": rows[0].run_id if rows else None, "tier": tier.get("tier"),
            "card": {"name": (gpu or {}).get("name"), "memory_gib": card},
            "headroom": rules["headroom"], "limit_gib": limit, "rules": rules, "picks": picks,
            "grid": [_summary(s) for s in sorted(grid.values(), key=lambda s: s.label)],
            "pruned": prune(grid), "excluded": excluded, "next": nxt, "refine": more, "cost": cost(rows),
            "note": None if gpu else "CPU tier: no card memory, so no headroom limit; the picks describe the CPU run"}


def _summary(s: Setting) -> dict:
    tps = s.values("tokens_per_s")
    return {"label": s.label, "setting": s.spec(), "draws": len(s.ran()), "failed": s.failures(),
            "tokens_per_s": statistics.median(tps) if tps else None, "peak_gib": s.peak(), "trains": s.trains(),
            "j_per_token_net": statistics.median(s.values("j_net")) if s.values("j_net") else None,
            "skipped": s.skipped}


def main(argv=None):
    from . import config as cfgmod

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--tier", required=True)
    ap.add_argument("--metrics", nargs="+", required=True, help="tidy metrics tables (the run's metrics.csv)")
    ap.add_argument("--out", required=True, help="recipe.json")
    ap.add_argument("--markdown", required=True, help="recipe.md")
    ap.add_argument("--out-html", help="the report's recipe page")
    ap.add_argument("--log", required=True)
    a = ap.parse_args(argv)
    log = logger("recipe", a.log)
    cfg, tier = cfgmod.load(a.config), read_json(a.tier)
    doc = search(read_many(a.metrics), tier, cfg.get("recipe"))
    for p, v in doc["picks"].items():
        log.info("%s: %s", p, v.get("label") or v.get("reason"))
    write_json(a.out, doc)
    atomic_write(a.markdown, render_md(doc, cfg, tier["plan"]))
    if a.out_html:
        atomic_write(a.out_html, render_html(doc, cfg, tier["plan"]))


if __name__ == "__main__":
    main()
