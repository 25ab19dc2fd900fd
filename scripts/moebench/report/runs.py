"""Reading a run for the report: its rows, tier and verdict, and one metric per arm as a Series (per-draw points,
the median drawn as a bar, or the gap's reason). Every id is ids.row_id's, the id provenance.json uses."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..ids import number_id, row_id
from ..io import read_json
from ..metrics import VALUED, Row, read_rows

ARM_ORDER = ["hf_bf16", "hf_bnb4", "unsloth_bf16", "unsloth_4bit", "e4b_4bit"]
GIB_TO_GB = 2**30 / 1e9  # detect.py stores the card's size in GiB; measure.py reports memory in GB (1e9)
DRAWN = VALUED  # rows with a value; a degraded one is drawn as such, never as a plain measurement


@dataclass
class Run:
    name: str
    rows: list[Row]
    tier: dict | None = None
    verdict: dict | None = None
    directory: Path | None = None
    missing: list[str] = field(default_factory=list)  # files the run lacks, named in empty views

    def config(self) -> dict:
        """The run's effective config.yaml ({} when absent)."""
        p = (self.directory or Path(".")) / "config.yaml"
        return (yaml.safe_load(p.read_text()) or {}) if p.is_file() else {}


def maybe_json(path: Path):
    return read_json(path) if path.exists() else None


def load_run(run_dir) -> Run:
    d = Path(run_dir)
    rows = read_rows(d / "metrics.csv") if (d / "metrics.csv").exists() else []
    run = Run(d.name, rows, maybe_json(d / "tier.json"), maybe_json(d / "verdict.json"), d)
    run.missing = [f for f in ("metrics.csv", "tier.json", "verdict.json") if not (d / f).exists()]
    return run


def prov_id(r: Row, run: str | None = None) -> str:
    """The provenance.json id of a row (`.../all/<metric>` for a row over all draws)."""
    return row_id(r, run)


def split_arm(arm: str) -> tuple[str, str]:
    """Offload rows name their arm `base+mode`; bench arms run fully resident."""
    base, _, mode = arm.partition("+")
    return base, mode or "resident"


def arm_order(arms) -> list[str]:
    arms = set(arms)
    known = [a for a in ARM_ORDER if a in arms]
    return known + sorted(arms - set(known))


def card_gb(tier: dict | None) -> tuple[float | None, str]:
    """The card's memory in GB (1e9 bytes, the unit of the measured peaks) and a label saying where it came from."""
    gpu = (tier or {}).get("gpu")
    if not gpu:
        return None, "no GPU in tier.json (CPU run): no card line"
    if gpu.get("memory_bytes"):
        gb = gpu["memory_bytes"] / 1e9
    elif gpu.get("memory_gib") is not None:
        gb = gpu["memory_gib"] * GIB_TO_GB
    elif gpu.get("memory_gb") is not None:
        gb = gpu["memory_gb"] * GIB_TO_GB  # detect.py: total_memory / 2**30
    else:
        return None, "tier.json names no GPU memory: no card line"
    return gb, f"{gpu.get('name', 'GPU')}: {gb:.1f} GB"


@dataclass
class Series:
    """One arm's values of one metric: the per-draw points, the median drawn as a bar, or the gap's reason.
    `degraded` holds the reason when any value drawn came from a fallback path a library announced."""

    arm: str
    metric: str
    unit: str = ""
    points: list[dict] = field(default_factory=list)
    median: float | None = None
    median_ids: list[str] = field(default_factory=list)
    how: str = ""
    gap: str | None = None  # "skipped: <reason>" when nothing measured
    degraded: str | None = None

    def as_json(self) -> dict:
        return {"arm": self.arm, "metric": self.metric, "unit": self.unit, "points": self.points,
                "median": self.median, "median_from": self.median_ids, "how": self.how, "gap": self.gap,
                "degraded": self.degraded}


def gap_reason(rows: list[Row], arm: str, metric: str, stage: str) -> str:
    mine = [r for r in rows if r.arm == arm and r.stage == stage]
    bad = [r for r in mine if r.metric == metric and r.status not in DRAWN] or \
          [r for r in mine if r.status not in DRAWN]
    if bad:
        return f"{bad[0].status}: {bad[0].reason}"
    if mine:
        return f"absent: no measured {metric} row (stage {stage})"
    return f"absent: no {stage} rows"


def series(run: Run, stage: str, metric: str, arms: list[str]) -> list[Series]:
    out = []
    for arm in arms:
        mine = [r for r in run.rows if r.arm == arm and r.stage == stage and r.metric == metric
                and r.status in DRAWN and isinstance(r.value, (int, float))]
        s = Series(arm, metric, mine[0].unit if mine else "")
        bad = [r for r in mine if r.status == "degraded"]
        s.degraded = f"degraded: {bad[0].reason}" if bad else None
        draws = sorted((r for r in mine if r.draw is not None), key=lambda r: r.draw)
        s.points = [{"draw": r.draw, "value": r.value, "spread": r.spread, "n": r.n, "id": prov_id(r, run.name),
                     "source": r.source, "status": r.status} for r in draws]
        agg = [r for r in mine if r.draw is None]
        if agg:
            s.median, s.median_ids, s.how = agg[0].value, [prov_id(agg[0], run.name)], "aggregate row"
        elif draws:
            s.median = statistics.median(r.value for r in draws)
            s.median_ids, s.how = [p["id"] for p in s.points], f"median of {len(draws)} draws"
        else:
            s.gap = gap_reason(run.rows, arm, metric, stage)
        out.append(s)
    return out


def stage_arms(run: Run, stage: str) -> list[str]:
    return arm_order({r.arm for r in run.rows if r.stage == stage})


def pick_metric(run: Run, stage: str, candidates: list[str]) -> str:
    """The first candidate with any measured row (e.g. GPU peak_alloc_gb, else host peak_rss_gb on CPU)."""
    for m in candidates:
        if any(r.stage == stage and r.metric == m and r.status in DRAWN for r in run.rows):
            return m
    return candidates[0]


def validation_absent_reason(run: Run) -> str:
    """Why a run has no training validation to show, from its own config and rows."""
    rows = [r for r in run.rows if r.stage == "validate"]
    if rows:
        bad = [r for r in rows if r.status not in DRAWN]
        return (f"validation rows exist but none has a loss curve ({bad[0].status}: {bad[0].reason})" if bad
                else "validation rows exist but no validate/<arm>/loss.csv was written")
    cfg = run.config()
    if not cfg:
        return f"results/{run.name} has no config.yaml, so why no arm was validated is not recorded"
    arms = (cfg.get("validate") or {}).get("arms", "absent")
    if arms == []:
        return (f"this run's config sets validate.arms: [] (no arm validated; the run measured speed and memory "
                f"only; see config/runs/{run.name}.yaml)")
    if "validate" not in cfg:
        return "this run predates the validation stage (its config has no `validate` section)"
    return f"validation was configured (validate.arms: {arms}) but wrote no rows: see results/{run.name}/logs/"


def aggregate_id(run: str, stage: str, arm: str, metric: str) -> str:
    return number_id(run, stage, arm, None, metric)
