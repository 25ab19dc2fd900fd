"""Report figures and tables, drawn only from measured rows.

Every view is written with two sidecars: `<name>.json` (the numbers drawn, each with its provenance id
`<run>/<stage>/<arm>/d<draw>/<metric>`, or `<run>/<stage>/<arm>/<metric>` for aggregates) and
`<name>.caption.rst` (the same numbers as an rst table, which the report caption includes). An arm that
was skipped, failed or is absent is a labelled gap with its reason, never a zero bar; a view with no
measured rows at all still renders and says so.
"""
from __future__ import annotations

import argparse
import html
import json
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the report builds on machines without a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import yaml  # noqa: E402

from .io import atomic_write, read_json, write_json  # noqa: E402
from .metrics import Row, read_rows  # noqa: E402

ARM_ORDER = ["hf_bf16", "hf_bnb4", "unsloth_bf16", "unsloth_4bit", "e4b_4bit"]
RUN_FIGURES = ["throughput", "speedup", "memory", "frontier", "energy", "loss"]
RUN_TABLES = ["gates", "metrics"]
GIB_TO_GB = 2**30 / 1e9  # detect.py stores the card's size in GiB; measure.py reports memory in GB (1e9)
GAP_COLOR = "0.45"


# ---- reading a run ----------------------------------------------------------------------------------------
@dataclass
class Run:
    name: str
    rows: list[Row]
    tier: dict | None = None
    verdict: dict | None = None
    directory: Path | None = None
    missing: list[str] = field(default_factory=list)  # files the run lacks, named in empty views


def _maybe_json(path: Path):
    return read_json(path) if path.exists() else None


def load_run(run_dir) -> Run:
    d = Path(run_dir)
    rows = read_rows(d / "metrics.csv") if (d / "metrics.csv").exists() else []
    run = Run(d.name, rows, _maybe_json(d / "tier.json"), _maybe_json(d / "verdict.json"), d)
    run.missing = [f for f in ("metrics.csv", "tier.json", "verdict.json") if not (d / f).exists()]
    return run


def prov_id(r: Row, run: str | None = None) -> str:
    base = f"{r.run_id or run}/{r.stage}/{r.arm}"
    return f"{base}/d{r.draw}/{r.metric}" if r.draw is not None else f"{base}/{r.metric}"


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


# ---- one metric per arm -----------------------------------------------------------------------------------
@dataclass
class Series:
    """One arm's values of one metric: the per-draw points, the median drawn as a bar, or the gap's reason."""

    arm: str
    metric: str
    unit: str = ""
    points: list[dict] = field(default_factory=list)
    median: float | None = None
    median_ids: list[str] = field(default_factory=list)
    how: str = ""
    gap: str | None = None  # "skipped: <reason>" when nothing measured

    def as_json(self) -> dict:
        return {"arm": self.arm, "metric": self.metric, "unit": self.unit, "points": self.points,
                "median": self.median, "median_from": self.median_ids, "how": self.how, "gap": self.gap}


def _gap_reason(rows: list[Row], arm: str, metric: str, stage: str) -> str:
    mine = [r for r in rows if r.arm == arm and r.stage == stage]
    bad = [r for r in mine if r.metric == metric and r.status != "measured"] or \
          [r for r in mine if r.status != "measured"]
    if bad:
        return f"{bad[0].status}: {bad[0].reason}"
    if mine:
        return f"absent: no measured {metric} row (stage {stage})"
    return f"absent: no {stage} rows"


def series(run: Run, stage: str, metric: str, arms: list[str]) -> list[Series]:
    out = []
    for arm in arms:
        mine = [r for r in run.rows if r.arm == arm and r.stage == stage and r.metric == metric
                and r.status == "measured" and isinstance(r.value, (int, float))]
        s = Series(arm, metric, mine[0].unit if mine else "")
        draws = sorted((r for r in mine if r.draw is not None), key=lambda r: r.draw)
        s.points = [{"draw": r.draw, "value": r.value, "spread": r.spread, "n": r.n, "id": prov_id(r, run.name),
                     "source": r.source} for r in draws]
        agg = [r for r in mine if r.draw is None]
        if agg:
            s.median, s.median_ids, s.how = agg[0].value, [prov_id(agg[0], run.name)], "aggregate row"
        elif draws:
            s.median = statistics.median(r.value for r in draws)
            s.median_ids, s.how = [p["id"] for p in s.points], f"median of {len(draws)} draws"
        else:
            s.gap = _gap_reason(run.rows, arm, metric, stage)
        out.append(s)
    return out


def stage_arms(run: Run, stage: str) -> list[str]:
    return arm_order({r.arm for r in run.rows if r.stage == stage})


def pick_metric(run: Run, stage: str, candidates: list[str]) -> str:
    """The first candidate with any measured row (e.g. GPU peak_alloc_gb, else host peak_rss_gb on CPU)."""
    for m in candidates:
        if any(r.stage == stage and r.metric == m and r.status == "measured" for r in run.rows):
            return m
    return candidates[0]


# ---- drawing ----------------------------------------------------------------------------------------------
def _figure(width: float = 11.0, panels: int = 1):
    fig, axes = plt.subplots(1, panels, figsize=(width, 4.8), squeeze=False)
    return fig, list(axes[0])


def _wrap(notes: list[str], width: int = 140) -> list[str]:
    return [line for n in notes for line in textwrap.wrap(n, width, subsequent_indent="      ")]


def _write_notes(fig, notes: list[str], width: int = 140):
    """Gap reasons and notes go under the axes; bbox_inches='tight' grows the image to hold them."""
    if notes:
        fig.text(0.01, -0.04, "\n".join(_wrap(notes, width)), va="top", ha="left", fontsize=8.5,
                 family="monospace")


def _empty(ax, message: str):
    ax.set_xticks([]), ax.set_yticks([])
    ax.text(0.5, 0.5, "\n".join(textwrap.wrap(message, 60)), ha="center", va="center", fontsize=11,
            color=GAP_COLOR, transform=ax.transAxes)


def note(notes: list[str], text: str) -> int:
    """Number a footnote, reusing the number of an identical one (the same gap in two panels)."""
    for i, n in enumerate(notes):
        if n.partition("] ")[2] == text:
            return i + 1
    notes.append(f"[{len(notes) + 1}] {text}")
    return len(notes)


def grouped_reasons(ss: list[Series]) -> str:
    """'skipped: needs CUDA — hf_bf16, hf_bnb4; ...': one entry per distinct reason, naming its arms."""
    by: dict[str, list[str]] = {}
    for s in ss:
        by.setdefault(s.gap or "no rows", []).append(s.arm)
    return "; ".join(f"{r} — {', '.join(a)}" for r, a in by.items()) if by else "no arms"


def dotbar(ax, ss: list[Series], ylabel: str, what: str, notes: list[str], hue: str | None = None):
    """Median bar per arm with each draw as a point; gaps keep their slot and carry a numbered reason."""
    order = [s.arm for s in ss]
    if not any(s.median is not None for s in ss):
        _empty(ax, f"no measured rows for {what} ({grouped_reasons(ss)})")
        return
    med = pd.DataFrame([{"arm": s.arm, "value": s.median} for s in ss if s.median is not None])
    pts = pd.DataFrame([{"arm": s.arm, "value": p["value"]} for s in ss for p in s.points])
    sns.barplot(data=med, x="arm", y="value", order=order, ax=ax, color=hue or "#7fa7d6", errorbar=None)
    if not pts.empty:
        sns.stripplot(data=pts, x="arm", y="value", order=order, ax=ax, color="black", size=6, jitter=0.12)
    top = max(med["value"].max(), pts["value"].max() if not pts.empty else 0)
    for i, s in enumerate(ss):
        if s.median is not None:
            hi = max([s.median] + [p["value"] for p in s.points])
            ax.text(i, hi + top * 0.02, f"{s.median:.3g}", ha="center", va="bottom", fontsize=9, weight="bold")
        else:
            k = note(notes, f"{s.arm}: {s.gap}")
            ax.text(i, top * 0.04, f"{s.gap.split(':')[0]} [{k}]", rotation=90, ha="center", va="bottom",
                    color=GAP_COLOR, fontsize=9, style="italic")
    ax.set_ylim(0, top * 1.12)
    ax.set_ylabel(ylabel), ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=15)


def _save(fig, out: Path, name: str, payload: dict, caption: str):
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_json(out / f"{name}.json", payload)
    atomic_write(out / f"{name}.caption.rst", caption)


# ---- captions: the numbers drawn, as an rst table --------------------------------------------------------
def _lit(text) -> str:
    t = str(text).replace("`", "'").replace("\n", " ").strip()
    return f"``{t}``" if t else "—"


def _num(v) -> str:
    return "—" if v is None else f"{v:.4g}"


def rst_table(header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return "*No rows.*\n"
    out = [".. list-table::", "   :header-rows: 1", ""]
    for r in [header] + rows:
        out.append(f"   * - {r[0]}")
        out.extend(f"     - {c}" for c in r[1:])
    return "\n".join(out) + "\n"


def series_caption(run: str, title: str, ss: list[Series], extra: str = "") -> str:
    rows = []
    for s in ss:
        unit = s.unit or ""
        for p in s.points:
            rows.append([s.arm, f"draw {p['draw']}", _num(p["value"]) + f" {unit}", _lit(p["id"])])
        if s.median is not None:
            src = _lit(s.median_ids[0]) if s.how == "aggregate row" else f"{s.how} above"
            rows.append([s.arm, f"**median** ({s.metric})", f"**{_num(s.median)}** {unit}", src])
        else:
            rows.append([s.arm, "gap", "—", _lit(s.gap)])
    head = f"Numbers drawn — run ``{run}``, {title}. {extra}".strip()
    return head + "\n\n" + rst_table(["arm", "what", "value", "provenance id / reason"], rows)


# ---- the per-run views ------------------------------------------------------------------------------------
def fig_throughput(run: Run, out: Path, **_):
    ss = series(run, "bench", "tokens_per_s", stage_arms(run, "bench"))
    notes: list[str] = []
    fig, (ax,) = _figure()
    dotbar(ax, ss, "tokens/s (higher is better)", "tokens/s (stage bench)", notes)
    ax.set_title(f"{run.name}: training throughput per arm — bar = median over draws, dots = one fresh process each")
    _write_notes(fig, notes)
    _save(fig, out, "throughput", {"run": run.name, "series": [s.as_json() for s in ss]},
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
            s.points = [{"draw": p["draw"], "value": b.median / p["value"], "id": p["id"],
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
    fig, axes = _figure(width=13, panels=len(baselines))
    for ax, (base, ss) in zip(axes, panels.items()):
        dotbar(ax, ss, f"speedup vs {base} (x)", f"speedup against {base}", notes)
        if any(s.median is not None for s in ss):
            ax.axhline(1.0, color="firebrick", ls="--", lw=1)
        ax.set_title(f"against {base}", fontsize=10)
    fig.suptitle(f"{run.name}: speedup = baseline median step time / arm median step time (dots: per draw)")
    _write_notes(fig, notes, 160)
    cap = "\n".join(series_caption(run.name, f"speedup against ``{b}``", ss) for b, ss in panels.items())
    _save(fig, out, "speedup", {"run": run.name, "baselines": {b: [s.as_json() for s in ss]
                                                               for b, ss in panels.items()}}, cap)


def fig_memory(run: Run, out: Path, **_):
    metric = pick_metric(run, "bench", ["peak_alloc_gb", "peak_rss_gb"])
    ss = series(run, "bench", metric, stage_arms(run, "bench"))
    gb, label = card_gb(run.tier)
    notes: list[str] = []
    fig, (ax,) = _figure()
    what = "peak GPU memory allocated by torch" if metric == "peak_alloc_gb" else "peak host RSS (no GPU memory)"
    dotbar(ax, ss, f"{metric} (GB = 1e9 bytes)", f"{metric} (stage bench)", notes)
    if gb is not None and any(s.median is not None for s in ss):
        ax.axhline(gb, color="firebrick", ls="--", lw=1.2)
        ax.set_ylim(0, max(ax.get_ylim()[1], gb * 1.08))
        ax.text(len(ss) - 0.5, gb, f"card: {label}", color="firebrick", ha="right", va="bottom", fontsize=9)
    notes.append(f"card line: {label}")
    ax.set_title(f"{run.name}: {what} per arm — bar = median over draws, dots = draws")
    _write_notes(fig, notes)
    _save(fig, out, "memory", {"run": run.name, "metric": metric, "card_gb": gb, "card": label,
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
                        "tokens_per_s": y.median, "memory_from": x.median_ids, "tokens_from": y.median_ids})
    return pts, gaps


def fig_frontier(run: Run, out: Path, **_):
    pts, gaps = frontier_points(run)
    gb, label = card_gb(run.tier)
    notes = [f"[{i + 1}] {g}" for i, g in enumerate(gaps)] + [f"card line: {label}"]
    fig, (ax,) = _figure()
    if not pts:
        _empty(ax, "no measured rows for the memory/speed frontier (" + ("; ".join(gaps) or "no bench or offload rows")
               + ")")
    else:
        df = pd.DataFrame(pts)
        sns.scatterplot(data=df, x="memory_gb", y="tokens_per_s", hue="arm", style="mode", s=110, ax=ax,
                        hue_order=arm_order(df["arm"]))
        for p in pts:
            ax.annotate(f"{p['arm']}\n{p['mode']}", (p["memory_gb"], p["tokens_per_s"]), fontsize=7.5,
                        xytext=(5, 4), textcoords="offset points")
        ax.set_xlim(left=0), ax.set_ylim(bottom=0)
        if gb is not None:
            ax.axvline(gb, color="firebrick", ls="--", lw=1.2)
            ax.text(gb, ax.get_ylim()[1], f" card: {label}", color="firebrick", va="top", fontsize=9)
        ax.set_xlabel(f"peak memory, GB ({', '.join(sorted({p['memory_metric'] for p in pts}))}; lower is better)")
        ax.set_ylabel("tokens/s (higher is better)")
        ax.legend(fontsize=8, loc="best")
    ax.set_title(f"{run.name}: memory/speed frontier per arm and offload mode (medians over draws)")
    _write_notes(fig, notes)
    rows = [[p["arm"], p["mode"], f"{_num(p['memory_gb'])} GB", f"{_num(p['tokens_per_s'])} tokens/s",
             ", ".join(_lit(i) for i in p["memory_from"] + p["tokens_from"])] for p in pts]
    rows += [["gap", "", "—", "—", _lit(g)] for g in gaps]
    cap = (f"Numbers drawn — run ``{run.name}``, medians over draws; card line: {label}.\n\n"
           + rst_table(["arm", "mode", "memory", "throughput", "provenance ids / reason"], rows))
    _save(fig, out, "frontier", {"run": run.name, "card_gb": gb, "points": pts, "gaps": gaps}, cap)


def fig_energy(run: Run, out: Path, **_):
    # the benchmark draws only: offload-mode processes time a few steps (their energy rows stay in metrics.csv), and
    # those of the first H100 run also counted their warm-up step in the window
    arms = [a for a in (stage_arms(run, "energy") or stage_arms(run, "bench")) if "+" not in a]
    panels = {"j_per_token": "J/token (whole card)", "j_per_token_net": "J/token minus idle baseline"}
    sers = {m: series(run, "energy", m, arms) for m in panels}
    notes: list[str] = []
    fig, axes = _figure(width=13, panels=2)
    for ax, (m, ss) in zip(axes, sers.items()):
        dotbar(ax, ss, f"{panels[m]} (lower is better)", f"{m} (stage energy)", notes, hue="#8fbf8f")
        ax.set_title(panels[m], fontsize=10)
    fig.suptitle(f"{run.name}: energy per trained token from NVML's cumulative counter (bar = median, dots = draws)")
    _write_notes(fig, notes, 160)
    cap = "\n".join(series_caption(run.name, f"``{m}`` (stage ``energy``)", ss) for m, ss in sers.items())
    _save(fig, out, "energy", {"run": run.name, "series": {m: [s.as_json() for s in ss] for m, ss in sers.items()}},
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
    gaps = [f"{a}: {_gap_reason(run.rows, a, 'loss', 'validate')}" for a in val_arms if a not in curves]
    notes = [f"[{i + 1}] {g}" for i, g in enumerate(gaps)]
    fig, (ax,) = _figure()
    if not curves:
        why = "; ".join(gaps) or f"no validate/*/loss.csv under results/{run.name}"
        _empty(ax, f"no measured rows for loss curves ({why})")
    else:
        df = pd.concat([c.assign(arm=a) for a, c in curves.items()])
        sns.lineplot(data=df, x="step", y="loss", hue="arm", hue_order=arm_order(curves), ax=ax, marker="o",
                     markersize=3)
        ax.set_ylabel("training loss (nats)")
    ax.set_title(f"{run.name}: training loss per step (validation stage)")
    _write_notes(fig, notes)
    rows = [[a, str(len(c)), f"{_num(c['loss'].iloc[0])} → {_num(c['loss'].iloc[-1])}",
             _lit(f"{run.name}/validate/{a}/loss_curve") + f" ({_lit(c['source'].iloc[0])})"]
            for a, c in curves.items()] + [["gap", "", "—", _lit(g)] for g in gaps]
    cap = f"Numbers drawn — run ``{run.name}``, loss curves.\n\n" + rst_table(
        ["arm", "steps", "first → last loss", "provenance id (file)"], rows)
    _save(fig, out, "loss", {"run": run.name, "curves": {a: {"steps": len(c), "first": float(c["loss"].iloc[0]),
                                                             "last": float(c["loss"].iloc[-1]),
                                                             "source": c["source"].iloc[0]}
                                                         for a, c in curves.items()}, "gaps": gaps}, cap)


# ---- tables (HTML pages in the report) --------------------------------------------------------------------
CSS = ("body{font-family:sans-serif;font-size:13px;margin:12px} table{border-collapse:collapse}"
       "td,th{border:1px solid #bbb;padding:3px 7px;text-align:left} th{background:#eee}"
       ".skipped,.failed,.unavailable{color:#777;font-style:italic} code{font-size:12px}")


def html_page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h2>{html.escape(title)}</h2>{body}</body></html>\n")


def html_table(header: list[str], rows: list[list], classes: list[str] | None = None) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = []
    for i, r in enumerate(rows):
        cls = f" class='{classes[i]}'" if classes else ""
        trs.append(f"<tr{cls}>" + "".join(f"<td>{html.escape('' if c is None else str(c))}</td>" for c in r) + "</tr>")
    return f"<table><tr>{th}</tr>{''.join(trs)}</table>"


def _row_cells(r: Row, run: str) -> list:
    v = f"{r.value:.6g}" if isinstance(r.value, float) else r.value
    return [r.stage, r.arm, r.draw, r.metric, v, r.unit, r.n, r.spread, r.status, r.reason, prov_id(r, run), r.source]


ROW_HEADER = ["stage", "arm", "draw", "metric", "value", "unit", "n", "IQR", "status", "reason", "provenance id",
              "source"]


def verdict_html(v: dict | None, missing: str) -> str:
    if not v:
        return f"<p><b>Verdict:</b> absent ({html.escape(missing)})</p>"
    rest = {k: val for k, val in v.items() if k not in ("verdict", "reason")}
    return (f"<p><b>Verdict: {html.escape(str(v.get('verdict')))}</b> — {html.escape(str(v.get('reason', '')))}</p>"
            f"<pre>{html.escape(json.dumps(rest, indent=2, default=str))}</pre>")


def table_gates(run: Run, out: Path, **_):
    rows = [r for r in run.rows if r.stage == "validate" or r.metric.startswith("gate")]
    body = verdict_html(run.verdict, f"no verdict.json in results/{run.name}")
    if rows:
        body += html_table(ROW_HEADER, [_row_cells(r, run.name) for r in rows], [r.status for r in rows])
    else:
        body += "<p><i>no measured rows for training gates (metrics.csv has no validate-stage rows)</i></p>"
    atomic_write(out / "gates.html", html_page(f"{run.name}: training-health gates and verdict", body))
    n_meas = sum(r.status == "measured" for r in rows)
    v = (run.verdict or {}).get("verdict", "absent")
    cap = (f"Run ``{run.name}``: {len(rows)} gate rows ({n_meas} measured, {len(rows) - n_meas} not), "
           f"verdict **{_lit(v)}**. Each row in the table carries its provenance id.\n")
    write_json(out / "gates.json", {"run": run.name, "verdict": run.verdict,
                                    "rows": [dict(zip(ROW_HEADER, _row_cells(r, run.name))) for r in rows]})
    atomic_write(out / "gates.caption.rst", cap)


def table_metrics(run: Run, out: Path, **_):
    rows = sorted(run.rows, key=lambda r: (r.stage, arm_order([r.arm]), r.arm, r.metric, r.draw or -1))
    body = html_table(ROW_HEADER, [_row_cells(r, run.name) for r in rows], [r.status for r in rows]) if rows \
        else "<p><i>metrics.csv has no rows</i></p>"
    atomic_write(out / "metrics.html", html_page(f"{run.name}: every row of metrics.csv", body))
    counts = {s: sum(r.status == s for r in rows) for s in ("measured", "skipped", "failed", "unavailable")}
    cap = (f"Run ``{run.name}``: every row of ``results/{run.name}/metrics.csv`` — "
           + ", ".join(f"{n} {s}" for s, n in counts.items()) + ". The provenance id column is the id the "
           "figure captions cite; the source column is the log the value was read from.\n")
    write_json(out / "metrics.json", {"run": run.name, "counts": counts})
    atomic_write(out / "metrics.caption.rst", cap)


VIEWS = {"throughput": fig_throughput, "speedup": fig_speedup, "memory": fig_memory, "frontier": fig_frontier,
         "energy": fig_energy, "loss": fig_loss, "gates": table_gates, "metrics": table_metrics}


def render_run(run_dir, out, baselines=("hf_bf16", "unsloth_4bit")):
    run, out = load_run(run_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for view in VIEWS.values():
        view(run, out, baselines=tuple(baselines))
    return run


# ---- across runs: tier comparison and the verdict summary for workflow.rst ---------------------------------
def run_label(run: Run) -> str:
    t = run.tier or {}
    gpu = (t.get("gpu") or {}).get("name", "CPU")
    return f"{run.name} ({t.get('tier', '?')}, {gpu})"


MEMORY_LABEL = {"peak_alloc_gb": "GPU memory allocated by torch", "peak_rss_gb": "host RSS (no GPU)"}


def run_setting(run: Run) -> dict:
    """What two runs on different tiers must share for their ratio to compare the cards alone: the model, its
    effective shape and plan, LoRA, data and Unsloth's switches (draw counts and time limits may differ)."""
    d = run.directory
    cfg = (yaml.safe_load((d / "config.yaml").read_text()) if d and (d / "config.yaml").exists() else None) or {}
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
    """Runs with the same setting on different tiers: median tokens/s per arm, one tier over the other. Each
    run's own draws give its medians, so a ratio also spans the two machines' sessions."""
    out, setting = [], {r.name: run_setting(r) for r in runs}  # each config.yaml read once, not per pair
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


def _ratio_line(r: dict) -> str:
    each = ", ".join(f"{arm} {v['ratio']:.2f}x" for arm, v in r["tokens_per_s_ratio"].items()) or "no arm in both"
    return f"{r['runs'][1]} over {r['runs'][0]} (same setting), tokens/s: {each}"


def _tier_panel(ax, runs: list[Run], arms: list[str], metric_of, ylabel: str, notes: list[str]):
    """One bar per run (hue: run, tier, card) and arm: the run's median of metric_of(run) over draws, on a
    linear axis from zero (the runs of one panel share a model shape). A missing bar is a gap, noted."""
    recs, caps = [], []
    for run in runs:
        metric = metric_of(run)
        ss = series(run, "bench", metric, arms)
        caps.append(series_caption(run.name, f"``{metric}`` per arm", ss))
        for s in ss:
            if s.median is not None:
                recs.append({"run": run.name, "label": f"{run_label(run)} — {metric}", "tier": (run.tier or {})
                             .get("tier"), "arm": s.arm, "metric": metric, "value": s.median, "from": s.median_ids})
            elif any(r.arm == s.arm for r in run.rows):
                note(notes, f"{run.name} / {s.arm}: {s.gap}")  # one note when both panels lack it alike
            else:
                note(notes, f"{run.name} / {s.arm}: not in this run (its config's arms)")
    if not recs:
        _empty(ax, "no measured bench rows in these runs")
        return recs, caps
    sns.barplot(data=pd.DataFrame(recs), x="arm", y="value", hue="label", order=arms, ax=ax, errorbar=None)
    ax.set_ylabel(ylabel, fontsize=9), ax.set_xlabel("")
    ax.tick_params(axis="x", rotation=15)
    return recs, caps


def fig_tiers(runs: list[Run], out: Path):
    """The tier comparison: one row of panels per model shape (tokens/s, peak memory), one bar per run and arm;
    under it, the tokens/s ratio of every pair of runs with the same setting on different tiers. Memory is each
    run's own measure, named in the legend: GPU memory allocated by torch, host RSS on CPU runs."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(family(run), []).append(run)
    notes: list[str] = []
    fig, axes = plt.subplots(max(len(groups), 1), 2, figsize=(17, 3.6 * max(len(groups), 1)), squeeze=False)
    tps, mem, caps = [], [], []
    for (name, members), (ax_tps, ax_mem) in zip(sorted(groups.items()), axes):
        arms = arm_order({r.arm for run in members for r in run.rows if r.stage == "bench"})
        t, c1 = _tier_panel(ax_tps, members, arms, lambda run: "tokens_per_s", "median tokens/s", notes)
        m, c2 = _tier_panel(ax_mem, members, arms,
                            lambda run: pick_metric(run, "bench", ["peak_alloc_gb", "peak_rss_gb"]),
                            "median peak memory, GB", notes)
        tps, mem, caps = tps + t, mem + m, caps + [f"**{_lit(name)}**\n", *c1, *c2]
        ax_tps.set_title(f"{name}: tokens/s per arm (higher is better)", fontsize=10)
        ax_mem.set_title(f"{name}: peak memory per arm", fontsize=10)
        if ax_tps.get_legend():
            ax_tps.get_legend().remove()
        if ax_mem.get_legend():
            ax_mem.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="run (tier, card)")
    ratios = tier_ratios(runs)
    notes = [f"tier ratio: {_ratio_line(r)}" for r in ratios] + notes
    if not ratios:
        notes.insert(0, "no two runs share a setting on different tiers: no tier ratio to give yet")
    fig.suptitle("Tiers compared, per model shape: compare arm rankings and, where two runs share a setting, the "
                 "cards (ratios under the panels); a missing bar is a gap, see notes", y=1.0)
    fig.tight_layout()
    _write_notes(fig, notes, 200)
    _save(fig, out, "tiers", {"runs": [run_label(r) for r in runs],
                              "tiers": {r.name: (r.tier or {}).get("tier") for r in runs},
                              "groups": {g: [r.name for r in ms] for g, ms in sorted(groups.items())},
                              "bars": [{"run": run_label(next(x for x in runs if x.name == r["run"])), "arm": r["arm"],
                                        "tokens_per_s": r["value"], "from": r["from"]} for r in tps],
                              "memory": mem, "ratios": ratios, "gaps": notes},
          "Runs compared: " + ", ".join(_lit(run_label(r)) for r in runs) + ".\n\n"
          + "".join(f"* Tier ratio: {_lit(_ratio_line(r))}\n" for r in ratios) + "\n" + "\n".join(caps))


def summary_rst(runs: list[Run]) -> str:
    """The verdict block workflow.rst includes: one line per run, read from each run's verdict.json."""
    out = []
    for run in runs:
        v = run.verdict or {}
        verdict = v.get("verdict", "absent (no verdict.json)")
        out.append(f"* ``{run.name}`` — tier ``{(run.tier or {}).get('tier', '?')}``, "
                   f"{_lit(run_label(run))}: **{verdict}** — {_lit(v.get('reason', ''))}")
    return "\n".join(out) + "\n" if out else "* no runs in ``results/``\n"


def render_runs(run_dirs, out):
    runs, out = [load_run(d) for d in run_dirs], Path(out)
    fig_tiers(runs, out)
    atomic_write(out / "summary.rst", summary_rst(runs))
    return runs


# ---- provenance page --------------------------------------------------------------------------------------
def provenance_page(run_dir, out):
    d, out = Path(run_dir), Path(out)
    stamp = _maybe_json(d / "provenance_stamp.json")
    status = (stamp or {}).get("status", "absent (no provenance_stamp.json)")
    files = {f: (d / f).exists() for f in ("provenance.json", "PROVENANCE.md", "provenance.json.ots",
                                          "provenance_stamp.json")}
    body = (f"<p><b>Stamp status: {html.escape(str(status))}</b></p>"
            + (f"<pre>{html.escape(json.dumps(stamp, indent=2, default=str))}</pre>" if stamp else "")
            + html_table(["file", "present"], [[f"results/{d.name}/{f}", "yes" if ok else "no"]
                                               for f, ok in files.items()])
            + "<h3>Check it yourself</h3><pre>"
            + html.escape(f"cd <repo>\nots upgrade results/{d.name}/provenance.json.ots   # fetch the Bitcoin "
                          f"attestation once the calendar has it\nots verify results/{d.name}/provenance.json.ots"
                          f"   # checks provenance.json against the timestamp\nsha256sum results/{d.name}/"
                          f"provenance.json") + "</pre>"
            + "<p><code>stamped</code>: the .ots file holds a complete Bitcoin attestation; <code>pending</code>:"
            " submitted to OpenTimestamps calendars, not yet in a block (run <code>ots upgrade</code> later); "
            "<code>unreachable</code>: no calendar could be reached when the run finished.</p>")
    md = d / "PROVENANCE.md"
    body += f"<h3>PROVENANCE.md</h3><pre>{html.escape(md.read_text())}</pre>" if md.exists() else \
        "<p><i>PROVENANCE.md absent</i></p>"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "provenance.html", html_page(f"{d.name}: provenance and timestamp", body))
    atomic_write(out / "provenance.caption.rst",
                 f"Run ``{d.name}``: stamp status **{_lit(status)}**; files present: "
                 + ", ".join(_lit(f) for f, ok in files.items() if ok) + ".\n")
    write_json(out / "provenance_status.json", {"run": d.name, "status": status, "files": files})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("run", help="figures and tables of one run")
    a.add_argument("--run-dir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--baselines", nargs="*", default=["hf_bf16", "unsloth_4bit"])
    b = sub.add_parser("runs", help="tier comparison and verdict summary across runs")
    b.add_argument("--run-dirs", nargs="+", required=True)
    b.add_argument("--out", required=True)
    c = sub.add_parser("provenance", help="the provenance page of one run")
    c.add_argument("--run-dir", required=True)
    c.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        render_run(args.run_dir, args.out, args.baselines)
    elif args.cmd == "runs":
        render_runs(args.run_dirs, args.out)
    else:
        provenance_page(args.run_dir, args.out)


if __name__ == "__main__":
    main()
