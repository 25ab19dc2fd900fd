"""The per-run figures, drawn only from measured (or labelled degraded) rows: throughput, speedup, memory, the
memory/speed frontier, energy and loss. Each writes its PNG with sidecars (draw.save); a view with no measured
rows still renders and says why."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..grid import parse_window_metric
from ..metrics import VALUED, Row
from .draw import GAP_COLOR, MIN_FONT_PT, dotbar, empty, figure, note, save, write_notes
from .runs import Run, Series, arm_order, card_gb, gap_reason, pick_metric, prov_id, series, split_arm, stage_arms, \
    validation_absent_reason
from .tables import lit, num, rst_table, series_caption


def fig_throughput(run: Run, out: Path, **_):
    ss = series(run, "bench", "tokens_per_s", stage_arms(run, "bench"))
    notes: list[str] = []
    fig, (ax,) = figure()
    dotbar(ax, ss, "tokens/s (higher is better)", "tokens/s (stage bench)", notes)
    ax.set_title(f"{run.name}: training throughput per arm\nbar = median over draws, dots = one fresh process each")
    write_notes(fig, notes)
    save(fig, out, "throughput", {"run": run.name, "series": [s.as_json() for s in ss]},
         series_caption(run.name, "tokens/s per arm (stage ``bench``)", ss))


def _speedups(run: Run, base: str, arms: list[str]) -> list[Series]:
    """Speedup = baseline median step_s / arm median step_s (aggregate.py's rule); its `compare` row when present."""
    steps = {s.arm: s for s in series(run, "bench", "step_s", arms + [base])}
    b = steps[base]
    out = []
    for arm in arms:
        s, a = Series(arm, f"speedup_vs_{base}", "x"), steps[arm]
        row = next((r for r in run.rows if r.stage == "compare" and r.arm == arm and r.metric == s.metric
                    and r.status == "measured"), None)
        if b.median is None:
            s.gap = f"baseline {base} {b.gap}"
        elif a.median is None:
            s.gap = a.gap
        else:
            s.degraded = a.degraded or (f"baseline {base} {b.degraded}" if b.degraded else None)
            s.points = [{"draw": p["draw"], "value": b.median / p["value"], "id": p["id"], "status": p["status"],
                         "source": f"{base} median / this draw's step_s"} for p in a.points]
            if row is not None:
                s.median, s.median_ids, s.how = row.value, [prov_id(row, run.name)], "aggregate row"
            else:
                s.median, s.how = b.median / a.median, "computed here: baseline median / arm median step_s"
                s.median_ids = b.median_ids + a.median_ids
        out.append(s)
    return out


def fig_speedup(run: Run, out: Path, baselines=("hf_bf16", "unsloth_4bit"), **_):
    arms = stage_arms(run, "bench")
    panels = {b: _speedups(run, b, arms) for b in baselines}
    notes: list[str] = []
    fig, axes = figure(panels=len(baselines), height=4.8)
    for ax, (base, ss) in zip(axes, panels.items()):
        dotbar(ax, ss, f"speedup vs {base} (x)", f"speedup against {base}", notes)
        if any(s.median is not None for s in ss):
            ax.axhline(1.0, color="firebrick", ls="--", lw=1)
        ax.set_title(f"against {base}")
    fig.suptitle(f"{run.name}: speedup = baseline median step time / arm median step time (dots: per draw)")
    write_notes(fig, notes)
    cap = "\n".join(series_caption(run.name, f"speedup against ``{b}``", ss) for b, ss in panels.items())
    save(fig, out, "speedup", {"run": run.name, "baselines": {b: [s.as_json() for s in ss]
                                                              for b, ss in panels.items()}}, cap)


def fig_memory(run: Run, out: Path, **_):
    metric = pick_metric(run, "bench", ["peak_alloc_gb", "peak_rss_gb"])
    ss = series(run, "bench", metric, stage_arms(run, "bench"))
    gb, label = card_gb(run.tier)
    notes: list[str] = []
    fig, (ax,) = figure()
    what = "peak GPU memory allocated by torch" if metric == "peak_alloc_gb" else "peak host RSS (no GPU memory)"
    dotbar(ax, ss, f"{metric} (GB = 1e9 bytes)", f"{metric} (stage bench)", notes)
    if gb is not None and any(s.median is not None for s in ss):
        ax.axhline(gb, color="firebrick", ls="--", lw=1.2)
        ax.set_ylim(0, max(ax.get_ylim()[1], gb * 1.1))
        ax.text(len(ss) - 0.5, gb, f"card: {label}", color="firebrick", ha="right", va="bottom",
                fontsize=MIN_FONT_PT + 0.5)
    notes.append(f"card line: {label}")
    ax.set_title(f"{run.name}: {what} per arm\nbar = median over draws, dots = draws")
    write_notes(fig, notes)
    save(fig, out, "memory", {"run": run.name, "metric": metric, "card_gb": gb, "card": label,
                              "series": [s.as_json() for s in ss]},
         series_caption(run.name, f"``{metric}`` per arm (stage ``bench``)", ss, extra=f"Card line: {label}."))


def frontier_points(run: Run) -> tuple[list[dict], list[str]]:
    """(memory, tokens/s) per arm and offload mode: bench arms run resident, offload rows carry `arm+mode`."""
    mem = pick_metric(run, "bench", ["peak_alloc_gb", "peak_rss_gb"])
    pts, gaps = [], []
    for stage in ("bench", "offload"):
        m = mem if stage == "bench" else pick_metric(run, "offload", ["peak_alloc_gb", "peak_rss_gb"])
        arms = stage_arms(run, stage)
        for x, y in zip(series(run, stage, m, arms), series(run, stage, "tokens_per_s", arms)):
            base, mode = split_arm(x.arm)
            if x.median is None or y.median is None:
                gaps.append(f"{x.arm} ({stage}): {x.gap or y.gap}")
                continue
            pts.append({"arm": base, "mode": mode, "stage": stage, "memory_gb": x.median, "memory_metric": m,
                        "tokens_per_s": y.median, "memory_from": x.median_ids, "tokens_from": y.median_ids,
                        "degraded": x.degraded or y.degraded})
    return pts, gaps


MODE_MARKERS = {"resident": "o", "none": "s", "plain": "^", "unsloth": "D", "expert_offload": "v"}


def fig_frontier(run: Run, out: Path, **_):
    """One marker per arm and mode; labels are numbered keys (listed under the axes), so no label can stretch the
    image; the card line is labelled inside the axes."""
    pts, gaps = frontier_points(run)
    gb, label = card_gb(run.tier)
    notes = [f"[{i + 1}] {g}" for i, g in enumerate(gaps)]
    fig, (ax,) = figure(height=5.6)
    if not pts:
        empty(ax, "no measured rows for the memory/speed frontier (" + ("; ".join(gaps) or "no bench or offload rows")
              + ")")
    else:
        arms = arm_order({p["arm"] for p in pts})
        colors = dict(zip(arms, ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]))
        for k, p in enumerate(pts):
            ax.scatter(p["memory_gb"], p["tokens_per_s"], s=90, marker=MODE_MARKERS.get(p["mode"], "P"),
                       facecolor="white" if p["degraded"] else colors[p["arm"]], edgecolor=colors[p["arm"]],
                       hatch=None, linewidth=1.5, zorder=3)
            ax.annotate(str(k + 1), (p["memory_gb"], p["tokens_per_s"]), fontsize=MIN_FONT_PT, xytext=(5, 4),
                        textcoords="offset points", annotation_clip=True)
            notes.append(f"({k + 1}) {p['arm']} / {p['mode']}: {num(p['memory_gb'])} GB, {num(p['tokens_per_s'])} "
                         "tokens/s" + (f" — {p['degraded']}" if p["degraded"] else ""))
        xmax = max([p["memory_gb"] for p in pts] + ([gb] if gb else [])) * 1.08
        ax.set_xlim(0, xmax), ax.set_ylim(0, max(p["tokens_per_s"] for p in pts) * 1.15)
        if gb is not None:
            ax.axvline(gb, color="firebrick", ls="--", lw=1.2)
            ax.text(gb, ax.get_ylim()[1] * 0.98, f"card: {label} ", color="firebrick", va="top", ha="right",
                    fontsize=MIN_FONT_PT + 0.5)
        for arm in arms:
            ax.scatter([], [], color=colors[arm], label=arm)
        for mode in sorted({p["mode"] for p in pts}):
            ax.scatter([], [], marker=MODE_MARKERS.get(mode, "P"), color="0.3", label=f"mode: {mode}")
        if any(p["degraded"] for p in pts):
            ax.scatter([], [], facecolor="white", edgecolor="0.3", label="hollow = degraded")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.set_xlabel(f"peak memory, GB ({', '.join(sorted({p['memory_metric'] for p in pts}))}; lower is better)")
        ax.set_ylabel("tokens/s (higher is better)")
    notes.append(f"card line: {label}")
    ax.set_title(f"{run.name}: memory/speed frontier per arm and offload mode (medians over draws)")
    write_notes(fig, notes)
    rows = [[p["arm"], p["mode"] + (" **(degraded)**" if p["degraded"] else ""), f"{num(p['memory_gb'])} GB",
             f"{num(p['tokens_per_s'])} tokens/s", ", ".join(lit(i) for i in p["memory_from"] + p["tokens_from"])]
            for p in pts]
    rows += [["gap", "", "—", "—", lit(g)] for g in gaps]
    cap = (f"Numbers drawn — run ``{run.name}``, medians over draws; card line: {label}.\n\n"
           + rst_table(["arm", "mode", "memory", "throughput", "provenance ids / reason"], rows))
    save(fig, out, "frontier", {"run": run.name, "card_gb": gb, "points": pts, "gaps": gaps}, cap)


def fig_energy(run: Run, out: Path, **_):
    # the benchmark draws only: offload-mode processes time a few steps (their energy rows stay in metrics.csv), and
    # those of the first H100 run also counted their warm-up step in the window
    arms = [a for a in (stage_arms(run, "energy") or stage_arms(run, "bench")) if "+" not in a]
    panels = {"j_per_token": "J/token (whole card)", "j_per_token_net": "J/token minus idle baseline"}
    sers = {m: series(run, "energy", m, arms) for m in panels}
    notes: list[str] = []
    fig, axes = figure(panels=2, height=4.8)
    for ax, (m, ss) in zip(axes, sers.items()):
        dotbar(ax, ss, f"{panels[m]} (lower is better)", f"{m} (stage energy)", notes, color="#8fbf8f")
        ax.set_title(panels[m])
    fig.suptitle(f"{run.name}: energy per trained token from the device's cumulative counter (bar = median)")
    write_notes(fig, notes)
    cap = "\n".join(series_caption(run.name, f"``{m}`` (stage ``energy``)", ss) for m, ss in sers.items())
    save(fig, out, "energy", {"run": run.name, "series": {m: [s.as_json() for s in ss] for m, ss in sers.items()}},
         cap)


def loss_curves(run: Run) -> dict[str, pd.DataFrame]:
    """validate/<arm>/loss.csv: a step column (or the row order) and a loss column."""
    curves = {}
    for p in sorted((run.directory or Path(".")).glob("validate/*/loss.csv")):
        df = pd.read_csv(p)
        ycol = "loss" if "loss" in df.columns else next((c for c in df.columns if "loss" in c), None)
        if ycol is None or df.empty:
            continue
        x = df["step"] if "step" in df.columns else pd.Series(range(len(df)))
        curves[p.parent.name] = pd.DataFrame({"step": x, "loss": df[ycol], "source": str(p)})
    return curves


def fig_loss(run: Run, out: Path, **_):
    curves = loss_curves(run)
    val_arms = stage_arms(run, "validate")
    gaps = [f"{a}: {gap_reason(run.rows, a, 'loss', 'validate')}" for a in val_arms if a not in curves]
    notes = [f"[{i + 1}] {g}" for i, g in enumerate(gaps)]
    why = "" if curves else validation_absent_reason(run)
    fig, (ax,) = figure()
    if not curves:
        empty(ax, f"No training validation in this run: {why}.")
    else:
        for arm in arm_order(curves):
            c = curves[arm]
            ax.plot(c["step"], c["loss"], marker="o", markersize=3, label=arm)
        ax.legend()
        ax.set_xlabel("optimizer step"), ax.set_ylabel("training loss (nats)")
    ax.set_title(f"{run.name}: training loss per step (validation stage)")
    write_notes(fig, notes)
    rows = [[a, str(len(c)), f"{num(c['loss'].iloc[0])} → {num(c['loss'].iloc[-1])}",
             lit(c["source"].iloc[0])]
            for a, c in curves.items()] + [["gap", "", "—", lit(g)] for g in gaps]
    cap = f"Numbers drawn — run ``{run.name}``, loss curves." + (f" No training validation in this run: {lit(why)}."
                                                                 if why else "")
    cap += "\n\n" + rst_table(["arm", "steps", "first → last loss", "file"], rows)
    save(fig, out, "loss", {"run": run.name, "why_empty": why or None,
                            "curves": {a: {"steps": len(c), "first": float(c["loss"].iloc[0]),
                                           "last": float(c["loss"].iloc[-1]), "source": c["source"].iloc[0]}
                                       for a, c in curves.items()}, "gaps": gaps}, cap)


def curve_points(run: Run) -> tuple[list[dict], dict | None]:
    """(the shape curve's point ratios, the tier-shape verdict point) from verdict.json: unsloth_4bit step time
    over unsloth_bf16's against tokens per step."""
    v = run.verdict or {}
    pts = [p for p in v.get("shape_curve") or [] if "ratio_4bit_over_bf16" in p]
    sh = v.get("shape") or {}
    tier = None
    if v.get("reference") == "unsloth_4bit" and v.get("speedup") and sh.get("tokens_per_step"):
        tier = {"tokens_per_step": sh["tokens_per_step"], "ratio": v["speedup"], "interval": v.get("interval"),
                "n": v.get("n_draws"), "shape": f"{sh.get('batch')}x{sh.get('seq_len')}"}
    return pts, tier


def fig_shapes(run: Run, out: Path, **_):
    pts, tier = curve_points(run)
    fig, (ax,) = figure()
    why = "" if pts else ("no shape curve in this run (config shape_curve.arms is empty, or neither shape had both "
                          "unsloth_bf16 and unsloth_4bit measured)")
    if why and tier is None:
        empty(ax, why)
    else:
        if pts:
            ax.plot([p["tokens_per_step"] for p in pts], [p["ratio_4bit_over_bf16"] for p in pts], "o",
                    color="#7fa7d6", label="one fresh-process draw per shape")
        for p in pts:
            ax.annotate(f"{p['batch']}×{p['seq_len']}" + (" (degraded)" if p.get("degraded") else ""),
                        (p["tokens_per_step"], p["ratio_4bit_over_bf16"]), textcoords="offset points",
                        xytext=(5, 5), fontsize=MIN_FONT_PT)
        if tier:
            lo, hi = (tier["interval"] or [tier["ratio"]] * 2)
            ax.errorbar([tier["tokens_per_step"]], [tier["ratio"]], yerr=[[tier["ratio"] - lo], [hi - tier["ratio"]]],
                        fmt="s", color="firebrick", capsize=4,
                        label=f"tier shape {tier['shape']}: median of {tier['n']} paired draws, 95% interval")
        ax.set_xscale("log", base=2)
        ax.axhline(1.0, color="0.5", ls="--", lw=1)
        ax.set_xlabel("tokens per step (batch × sequence)"), ax.set_ylabel("unsloth_4bit step time / unsloth_bf16 (x)")
        ax.legend()
    ax.set_title(f"{run.name}: how the verdict pair's ratio moves with tokens per step")
    write_notes(fig, [why] if why and tier else [])
    rows = [[f"{p['batch']}×{p['seq_len']}", str(p["tokens_per_step"]), num(p["ratio_4bit_over_bf16"]),
             "single draw" + (", degraded" if p.get("degraded") else "")] for p in pts]
    if tier:
        rows.append([tier["shape"], str(tier["tokens_per_step"]), num(tier["ratio"]),
                     f"verdict: {tier['n']} paired draws, interval {tier['interval']}"])
    cap = (f"Numbers drawn — run ``{run.name}``, from verdict.json (``shape_curve``, ``speedup``)."
           + (f" {lit(why)}." if why else "") + "\n\n"
           + rst_table(["shape", "tokens/step", "4-bit / bf16 step time", "what"], rows))
    save(fig, out, "shapes", {"run": run.name, "points": pts, "tier": tier, "why_empty": why or None}, cap)


def routing_points(run: Run) -> tuple[list[dict], list[str]]:
    """Each routing A/B window (stage `routing_ab`) as a point: arm, router set, step time and the load it routed;
    and why each arm without windows has none."""
    rows = [r for r in run.rows if r.stage == "routing_ab"]
    windows: dict[tuple[str, int, str], dict[str, Row]] = {}  # (arm, window, router set) -> its rows by metric
    for r in rows:
        if p := parse_window_metric(r.metric):
            windows.setdefault((r.arm, p[1], p[2]), {})[p[0]] = r
    pts, gaps = [], []
    for arm in arm_order({r.arm for r in rows}):
        for (a, w, label), m in sorted(windows.items(), key=lambda kv: kv[0][1]):
            t, load = m.get("step_s"), m.get("router_max_over_mean")
            if a == arm and t and load and t.status in VALUED and load.status in VALUED:
                pts.append({"arm": arm, "window": w, "routers": label, "step_s": t.value, "load": load.value,
                            "degraded": "degraded" in (t.status, load.status),
                            "ids": [prov_id(t, run.name), prov_id(load, run.name)]})
        if not any(p["arm"] == arm for p in pts):
            bad = next((r for r in rows if r.arm == arm and r.metric == "calibrated_over_raw_step_s"), None) \
                or next(r for r in rows if r.arm == arm)
            gaps.append(f"{arm}: {bad.status}: {bad.reason}")
    return pts, gaps


BUILD_ROWS = (("router_heldout_max_over_mean_before", "held-out max/mean, raw routers"),
              ("router_heldout_max_over_mean_after", "held-out max/mean, saved routers"),
              ("router_heldout_worst_layer_after", "worst layer, saved routers"),
              ("router_uniform_floor", "a uniform router's floor"),
              ("router_unused_experts_before", "experts unused, raw (all layers)"),
              ("router_unused_experts_after", "experts unused, saved (all layers)"),
              ("router_target_reached", "target reached (1 yes, 0 no)"))


def build_load(run: Run) -> list[tuple[str, Row]]:
    """The model build's router calibration (stage `model` rows from model.sha256): what load the saved model
    routes with, before any draw trains it; empty for raw routers."""
    rows = {r.metric: r for r in run.rows if r.stage == "model"}
    return [(label, rows[m]) for m, label in BUILD_ROWS if m in rows]


def fig_routing(run: Run, out: Path, **_):
    pts, gaps = routing_points(run)
    build = build_load(run)
    fig, (ax,) = figure()
    why = "" if pts else ("no routing A/B in this run (config routing_ab.arms is empty, or no window measured)"
                          + (": " + "; ".join(gaps) if gaps else ""))
    if why:
        empty(ax, why)
    else:
        for label, r in build:
            if r.metric in ("router_heldout_max_over_mean_after", "router_uniform_floor"):
                ax.axvline(r.value, color="0.5", ls=":" if r.metric == "router_uniform_floor" else "--", lw=1,
                           label=f"build: {label}")
        for i, arm in enumerate(arm_order({p["arm"] for p in pts})):
            for label, marker in (("raw", "o"), ("calibrated", "s")):
                mine = [p for p in pts if p["arm"] == arm and p["routers"] == label]
                ax.plot([p["load"] for p in mine], [p["step_s"] for p in mine], marker, color=f"C{i}",
                        fillstyle="none" if label == "raw" else "full",
                        label=f"{arm}, {label} routers" + (" (degraded)" if any(p["degraded"] for p in mine) else ""))
        ax.set_xlabel("router load in the window: max/mean tokens per expert (mean over layers)")
        ax.set_ylabel("median step time in the window (s)")
        ax.legend()
    ax.set_title(f"{run.name}: step time against expert load, raw and calibrated routers in one process")
    write_notes(fig, gaps if pts else [])
    rows = [[p["arm"], str(p["window"]), p["routers"], num(p["load"]), num(p["step_s"]),
             lit(", ".join(p["ids"])) + (" (degraded)" if p["degraded"] else "")] for p in pts]
    cap = (f"Numbers drawn — run ``{run.name}``, stage ``routing_ab`` (windows alternate raw and calibrated routers "
           "in one process per arm)." + (f" {lit(why)}." if why else "") + "\n\n"
           + rst_table(["arm", "window", "routers", "load max/mean", "s/step", "provenance ids"], rows))
    cap += ("\n\nThe build's routers (``model.sha256``, the load the saved model routes with before any draw trains "
            "it; dashed and dotted lines above):\n\n" + rst_table(
                ["", "value", "provenance id"], [[label, num(r.value), lit(prov_id(r, run.name))] for label, r in build])
            if build else "\n\nThe build's routers: raw random-init (``model.router_load`` raw) or a checkpoint's own: "
            "nothing was calibrated.")
    save(fig, out, "routing", {"run": run.name, "points": pts, "gaps": gaps, "why_empty": why or None,
                               "build": [{"label": label, "value": r.value, "id": prov_id(r, run.name)}
                                         for label, r in build]}, cap)


FIGURES = {"throughput": fig_throughput, "speedup": fig_speedup, "memory": fig_memory, "frontier": fig_frontier,
           "energy": fig_energy, "loss": fig_loss, "shapes": fig_shapes, "routing": fig_routing}
__all__ = ["FIGURES", "GAP_COLOR", "frontier_points", "loss_curves"]
