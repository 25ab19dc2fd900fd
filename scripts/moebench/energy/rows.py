"""What a metered window becomes: the J/token rows (gross and net of the idle baseline, `unavailable` with the
reason where a number cannot be computed, never a zero), the NVML state rows, the power trace CSV, and Zeus's
independent reading of the same window for comparison.
"""
from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..metrics import Row

if TYPE_CHECKING:  # annotations only: the rows read a result's fields, the meter package makes it
    from . import EnergyResult

J_PER_KWH = 3.6e6


def energy_rows(result: EnergyResult, idle: EnergyResult | None, tokens: int, **row_kwargs) -> list[Row]:
    """J/token and friends, gross and net of idle. `row_kwargs` fills run_id, tier, model, arm, precision,
    source, draw, n. A number that cannot be computed is an `unavailable` row with the reason."""
    kw = dict(row_kwargs, stage="energy")
    rows: list[Row] = []

    def put(metric, unit, value, why):
        if why:
            rows.append(Row(metric=metric, unit=unit, status="unavailable", reason=why, **kw))
        else:
            rows.append(Row(metric=metric, unit=unit, value=float(value), **kw))

    gross_why = _why_not(result, tokens)
    idle_w, idle_why = _idle_w(idle)
    j = result.joules if not gross_why else None
    net_j = j - idle_w * result.seconds if j is not None and idle_w is not None else None
    net_why = gross_why or idle_why or ("run drew no more than idle" if net_j is not None and net_j <= 0 else "")

    put("energy_j", "J", j, gross_why)
    put("j_per_token", "J/token", j / tokens if j else None, gross_why)
    put("j_per_token_net", "J/token", net_j / tokens if not net_why else None, net_why)
    put("tokens_per_kj", "tokens/kJ", tokens / (j / 1e3) if j else None, gross_why)
    put("tokens_per_kj_net", "tokens/kJ", tokens / (net_j / 1e3) if not net_why else None, net_why)
    put("kwh_per_mtok", "kWh/Mtok", j / tokens * 1e6 / J_PER_KWH if j else None, gross_why)
    put("kwh_per_mtok_net", "kWh/Mtok", net_j / tokens * 1e6 / J_PER_KWH if not net_why else None, net_why)
    put("mean_w", "W", result.mean_w, result.reason if result.status != "measured" else "")
    peak_why = result.reason if result.status != "measured" else ("" if result.peak_w is not None
                                                                  else "no power samples")
    put("peak_w", "W", result.peak_w, peak_why)
    put("idle_w", "W", idle_w, idle_why)
    if result.status == "measured":
        rows.append(Row(metric="energy_method", value=result.method, **kw))  # counter vs integrated samples
        rows.append(Row(metric="energy_window_s", value=float(result.seconds), unit="s", **kw))
        rows.append(Row(metric="power_samples", value=float(len(result.trace)), unit="count", **kw))
    if idle is not None and idle.status == "measured" and idle.settle_s is not None:
        rows.append(Row(metric="idle_settle_s", value=float(idle.settle_s), unit="s", reason=idle.settle_note, **kw))
    rows += state_rows("gpu", "_start", result.state_start, kw) + state_rows("gpu", "_end", result.state_end, kw)
    if idle is not None:
        rows += state_rows("idle_gpu", "", idle.state_start, kw)
    return rows


STATE_UNITS = {"sm_clock_mhz": "MHz", "mem_clock_mhz": "MHz", "power_limit_w": "W", "temp_c": "C", "throttle": ""}


def state_rows(prefix: str, suffix: str, state: dict, kw: dict) -> list[Row]:
    """One row per NVML reading of a window's start or end, e.g. gpu_sm_clock_mhz_start; one NVML refused is
    unavailable, never a zero."""
    rows = []
    for key, unit in STATE_UNITS.items():
        if key not in state:
            continue
        v, metric = state[key], f"{prefix}_{key}{suffix}"
        if v is None:
            rows.append(Row(metric=metric, unit=unit, status="unavailable", reason="NVML did not report it", **kw))
        else:
            rows.append(Row(metric=metric, unit=unit, value=v if isinstance(v, str) else float(v), **kw))
    return rows


def _idle_w(idle: EnergyResult | None) -> tuple[float | None, str]:
    if idle is None:
        return None, "no idle baseline"
    if idle.status != "measured" or idle.mean_w is None:
        return None, f"idle baseline unavailable: {idle.reason or 'no energy'}"
    return idle.mean_w, ""


def _why_not(result: EnergyResult, tokens: int) -> str:
    if result.status != "measured":
        return result.reason or "energy not measured"
    if not tokens or tokens <= 0:
        return "no tokens processed in the window"
    if result.joules is None or result.joules <= 0:
        return f"energy counter did not advance ({result.joules} J over {result.seconds:.3g} s)"
    return ""


def write_trace(path: str | os.PathLike, result: EnergyResult) -> Path:
    """The power trace as a small CSV (t_s, watts); written atomically like the metrics tables."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["t_s", "watts"])
        w.writerows((f"{t:.4f}", f"{p:.3f}") for t, p in result.trace)
    os.replace(tmp, path)
    return path


class ZeusWindow:
    """Zeus's GPU energy monitor over the same window as an EnergyMeter: an independent implementation (its own
    NVML reads and arithmetic) to compare with ours. Optional: without zeus, or without a GPU, `result` says
    why, and the wrapped work runs all the same."""

    def __init__(self, index: int = 0):
        self.index, self.mon = index, None
        self.result: dict = {"status": "unavailable", "reason": "window not run"}

    def __enter__(self):
        try:
            from zeus.monitor import ZeusMonitor

            self.mon = ZeusMonitor(gpu_indices=[self.index], cpu_indices=[])  # GPU only, as ours
            self.mon.begin_window("moebench")
        except Exception as e:  # not installed, no GPU, NVML refused
            self.mon, self.result = None, {"status": "unavailable", "reason": f"zeus: {type(e).__name__}: {e}"[:300]}
        return self

    def __exit__(self, *exc):
        if self.mon is not None:
            try:
                m = self.mon.end_window("moebench")
                self.result = {"status": "measured", "joules": float(m.total_energy), "seconds": float(m.time)}
            except Exception as e:
                self.result = {"status": "unavailable", "reason": f"zeus end_window: {e}"[:300]}
        return False


def zeus_rows(ours: EnergyResult, zeus: dict, tokens: int, **row_kwargs) -> list[Row]:
    """Zeus's joules for the window and its relative difference from ours ((zeus - ours) / ours)."""
    kw = dict(row_kwargs, stage="energy")
    if zeus.get("status") != "measured":
        return [Row(metric="energy_j_zeus", unit="J", status="unavailable", reason=zeus.get("reason", ""), **kw)]
    rows = [Row(metric="energy_j_zeus", unit="J", value=zeus["joules"], **kw),
            Row(metric="j_per_token_zeus", unit="J/token", value=zeus["joules"] / tokens, **kw)]
    if ours.status == "measured" and ours.joules:
        rows.append(Row(metric="zeus_vs_ours_rel_diff", unit="fraction",
                        value=(zeus["joules"] - ours.joules) / ours.joules, **kw))
    return rows
