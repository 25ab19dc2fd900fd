"""The tier comparison across runs: one row of panels per model shape (tokens/s, peak memory), one bar per run and
arm; under it the tokens/s ratio of every two runs that share a setting on different tiers. tiers.json keeps each
bar's and each ratio's provenance ids (the cross-run numbers no single run's provenance.json holds)."""
from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from .draw import DPI, MIN_FONT_PT, WIDTH_IN, empty, note, save, write_notes
from .runs import Run, arm_order, pick_metric, series
from .tables import lit, series_caption

RUN_COLORS = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974"]


def run_label(run: Run) -> str:
    t = run.tier or {}
    gpu = (t.get("gpu") or {}).get("name", "CPU")
    return f"{run.name} ({t.get('tier', '?')}, {gpu})"


def run_setting(run: Run) -> dict:
    """What two runs on different tiers must share for their ratio to compare the cards alone: the model, its
    effective shape and plan, LoRA, data and Unsloth's switches (draw counts and time limits may differ)."""
    cfg = run.config()
    plan = (run.tier or {}).get("plan") or {}
    return {"model": cfg.get("model"), "lora": cfg.get("lora"), "data": cfg.get("data"),
            "plan": {k: plan.get(k) for k in ("model_scale", "seq_len", "batch", "moe_backend",
                                              "gradient_checkpointing")},
            "unsloth_env": (cfg.get("plan_overrides") or {}).get("unsloth_env")}


def family(run: Run) -> str:
    """The panel a run is drawn in: its model at its scale (tokens/s compare within one model shape only)."""
    models = sorted({r.model for r in run.rows if r.stage == "bench" and r.model})
    scale = ((run.tier or {}).get("plan") or {}).get("model_scale")
    return f"{'/'.join(models) or 'model ?'} ({scale or 'scale ?'})"


def tier_ratios(runs: list[Run]) -> list[dict]:
    """Runs with the same setting on different tiers: median tokens/s per arm, one tier over the other, with the
    provenance ids of both medians. Each run's own draws give its medians, so a ratio also spans two machines."""
    out, setting = [], {r.name: run_setting(r) for r in runs}
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            ta, tb = (a.tier or {}).get("tier"), (b.tier or {}).get("tier")
            if not ta or not tb or ta == tb or setting[a.name] != setting[b.name]:
                continue
            a, b = sorted((a, b), key=lambda r: r.tier["tier"])
            arms = arm_order({r.arm for r in a.rows + b.rows if r.stage == "bench"})
            sa, sb = (dict((s.arm, s) for s in series(r, "bench", "tokens_per_s", arms)) for r in (a, b))
            ratios = {arm: {"ratio": sb[arm].median / sa[arm].median, "from": sa[arm].median_ids + sb[arm].median_ids}
                      for arm in arms if sa[arm].median and sb[arm].median}
            out.append({"runs": [a.name, b.name], "tiers": [a.tier["tier"], b.tier["tier"]], "family": family(a),
                        "tokens_per_s_ratio": ratios})
    return out


def ratio_line(r: dict) -> str:
    each = ", ".join(f"{arm} {v['ratio']:.2f}x" for arm, v in r["tokens_per_s_ratio"].items()) or "no arm in both"
    return f"{r['runs'][1]} over {r['runs'][0]} (same setting), tokens/s: {each}"


def _panel(ax, runs: list[Run], arms: list[str], metric_of, ylabel: str, notes: list[str], colors: dict):
    """Grouped bars: arms on x, one bar per run (its color names it in the shared legend), from zero. A missing
    bar is a gap, noted; a degraded median is hatched."""
    recs, caps = [], []
    width = 0.8 / max(len(runs), 1)
    for j, run in enumerate(runs):
        metric = metric_of(run)
        ss = series(run, "bench", metric, arms)
        caps.append(series_caption(run.name, f"``{metric}`` per arm", ss))
        for i, s in enumerate(ss):
            x = i - 0.4 + width * (j + 0.5)
            if s.median is not None:
                ax.bar(x, s.median, width=width * 0.95, color="white" if s.degraded else colors[run.name],
                       edgecolor=colors[run.name], hatch="///" if s.degraded else None)
                recs.append({"run": run.name, "label": run_label(run), "tier": (run.tier or {}).get("tier"),
                             "arm": s.arm, "metric": metric, "value": s.median, "from": s.median_ids,
                             "degraded": s.degraded})
            elif any(r.arm == s.arm for r in run.rows):
                note(notes, f"{run.name} / {s.arm}: {s.gap}")
            else:
                note(notes, f"{run.name} / {s.arm}: not in this run (its config's arms)")
    if not recs:
        empty(ax, "no measured bench rows in these runs")
        return recs, caps
    ax.set_xticks(np.arange(len(arms)), arms, rotation=15)
    ax.set_ylabel(ylabel)
    return recs, caps


def fig_tiers(runs: list[Run], out: Path):
    """Memory is each run's own measure, named in the legend: GPU memory allocated by torch, host RSS on CPU."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(family(run), []).append(run)
    colors = {r.name: RUN_COLORS[i % len(RUN_COLORS)] for i, r in enumerate(runs)}
    notes: list[str] = []
    rows = max(len(groups), 1)
    fig, axes = plt.subplots(rows, 2, figsize=(WIDTH_IN, 3.3 * rows + 0.8), squeeze=False)
    tps, mem, caps = [], [], []
    for (name, members), (ax_tps, ax_mem) in zip(sorted(groups.items()), axes):
        arms = arm_order({r.arm for run in members for r in run.rows if r.stage == "bench"})
        t, c1 = _panel(ax_tps, members, arms, lambda run: "tokens_per_s", "median tokens/s", notes, colors)
        m, c2 = _panel(ax_mem, members, arms, lambda run: pick_metric(run, "bench", ["peak_alloc_gb", "peak_rss_gb"]),
                       "median peak memory, GB", notes, colors)
        tps, mem, caps = tps + t, mem + m, caps + [f"**{lit(name)}**\n", *c1, *c2]
        ax_tps.set_title(f"{name}: tokens/s", fontsize=10)
        ax_mem.set_title(f"{name}: peak memory", fontsize=10)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[r.name]) for r in runs]
    fig.legend(handles, [run_label(r) for r in runs], loc="lower center", ncol=2, bbox_to_anchor=(0.5, 1.0),
               title="run (tier, card); memory: peak_alloc_gb on GPU runs, peak_rss_gb on CPU runs")
    ratios = tier_ratios(runs)
    notes = [f"tier ratio: {ratio_line(r)}" for r in ratios] + notes
    if not ratios:
        notes.insert(0, "no two runs share a setting on different tiers: no tier ratio to give yet")
    fig.tight_layout()
    write_notes(fig, notes)
    save(fig, out, "tiers", {"runs": [run_label(r) for r in runs],
                             "tiers": {r.name: (r.tier or {}).get("tier") for r in runs},
                             "groups": {g: [r.name for r in ms] for g, ms in sorted(groups.items())},
                             "bars": [{"run": r["label"], "arm": r["arm"], "tokens_per_s": r["value"],
                                       "from": r["from"], "degraded": r["degraded"]} for r in tps],
                             "memory": mem, "ratios": ratios, "gaps": notes},
         "Runs compared: " + ", ".join(lit(run_label(r)) for r in runs) + ".\n\n"
         + "".join(f"* Tier ratio: {lit(ratio_line(r))}\n" for r in ratios) + "\n" + "\n".join(caps))


__all__ = ["DPI", "MIN_FONT_PT", "fig_tiers", "tier_ratios", "ratio_line", "family", "run_label", "run_setting"]
