"""Tables of the report: the shared HTML page and CSS, HTML and rst tables (the claims ledger renders with these
too), the numbers a figure draws as an rst caption, and the two per-run table pages (gates, every metrics row)."""
from __future__ import annotations

import html
import json
from pathlib import Path

from ..io import atomic_write, write_json
from ..metrics import Row
from .runs import Run, Series, arm_order, prov_id

# One stylesheet for every HTML page of the report (figure tables, gates, metrics, provenance, claims).
CSS = ("body{font-family:sans-serif;font-size:13px;margin:12px} table{border-collapse:collapse}"
       "td,th{border:1px solid #bbb;padding:3px 7px;text-align:left;vertical-align:top} th{background:#eee}"
       ".skipped,.failed,.unavailable{color:#777;font-style:italic} .degraded{background:#fff3cd}"
       ".holds{background:#e3f4e1} .does-not-hold{background:#fbe3e3} .not-testable-here{color:#666}"
       "code{font-size:12px}")


def html_page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{CSS}</style></head><body><h2>{html.escape(title)}</h2>{body}</body></html>\n")


def html_table(header: list[str], rows: list[list], classes: list[str] | None = None, raw: bool = False) -> str:
    """Cells are escaped unless `raw` (the caller built them from escaped parts)."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    trs = []
    for i, r in enumerate(rows):
        cls = f" class='{classes[i]}'" if classes else ""
        cells = (("" if c is None else str(c)) if raw else html.escape("" if c is None else str(c)) for c in r)
        trs.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{th}</tr>{''.join(trs)}</table>"


def lit(text) -> str:
    """rst inline literal (backticks in the text would end it early)."""
    t = str(text).replace("`", "'").replace("\n", " ").strip()
    return f"``{t}``" if t else "—"


def num(v) -> str:
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
    """The numbers a figure draws, each with its provenance id, as an rst table."""
    rows = []
    for s in ss:
        unit = s.unit or ""
        for p in s.points:
            what = f"draw {p['draw']}" + (" **(degraded)**" if p.get("status") == "degraded" else "")
            rows.append([s.arm, what, num(p["value"]) + f" {unit}", lit(p["id"])])
        if s.median is not None:
            src = lit(s.median_ids[0]) if s.how == "aggregate row" else f"{s.how} above"
            rows.append([s.arm, f"**median** ({s.metric})", f"**{num(s.median)}** {unit}", src])
            if s.degraded:
                rows.append([s.arm, "**degraded**", "—", lit(s.degraded)])
        else:
            rows.append([s.arm, "gap", "—", lit(s.gap)])
    head = f"Numbers drawn — run ``{run}``, {title}. {extra}".strip()
    return head + "\n\n" + rst_table(["arm", "what", "value", "provenance id / reason"], rows)


# ---- the per-run table pages --------------------------------------------------------------------------------
ROW_HEADER = ["stage", "arm", "draw", "metric", "value", "unit", "n", "IQR", "status", "reason", "provenance id",
              "source"]


def row_cells(r: Row, run: str) -> list:
    v = f"{r.value:.6g}" if isinstance(r.value, float) else r.value
    return [r.stage, r.arm, r.draw, r.metric, v, r.unit, r.n, r.spread, r.status, r.reason, prov_id(r, run), r.source]


def verdict_html(v: dict | None, missing: str) -> str:
    if not v:
        return f"<p><b>Verdict:</b> absent ({html.escape(missing)})</p>"
    rest = {k: val for k, val in v.items() if k not in ("verdict", "reason")}
    return (f"<p><b>Verdict: {html.escape(str(v.get('verdict')))}</b> — {html.escape(str(v.get('reason', '')))}</p>"
            f"<pre>{html.escape(json.dumps(rest, indent=2, default=str))}</pre>")


def table_gates(run: Run, out: Path, why_empty: str = "", **_):
    rows = [r for r in run.rows if r.stage == "validate" or r.metric.startswith("gate")]
    body = verdict_html(run.verdict, f"no verdict.json in results/{run.name}")
    if rows:
        body += html_table(ROW_HEADER, [row_cells(r, run.name) for r in rows], [r.status for r in rows])
    else:
        body += f"<p><i>No training validation in this run: {html.escape(why_empty)}.</i></p>"
    atomic_write(out / "gates.html", html_page(f"{run.name}: training-health gates and verdict", body))
    n_meas = sum(r.status == "measured" for r in rows)
    v = (run.verdict or {}).get("verdict", "absent")
    cap = (f"Run ``{run.name}``: {len(rows)} gate rows ({n_meas} measured, {len(rows) - n_meas} not), "
           f"verdict **{lit(v)}**. Each row in the table carries its provenance id."
           + (f" No training validation in this run: {lit(why_empty)}." if not rows else "") + "\n")
    write_json(out / "gates.json", {"run": run.name, "verdict": run.verdict, "why_empty": why_empty if not rows
                                    else None, "rows": [dict(zip(ROW_HEADER, row_cells(r, run.name))) for r in rows]})
    atomic_write(out / "gates.caption.rst", cap)


def table_metrics(run: Run, out: Path, **_):
    rows = sorted(run.rows, key=lambda r: (r.stage, arm_order([r.arm]), r.arm, r.metric, r.draw or -1))
    body = html_table(ROW_HEADER, [row_cells(r, run.name) for r in rows], [r.status for r in rows]) if rows \
        else "<p><i>metrics.csv has no rows</i></p>"
    atomic_write(out / "metrics.html", html_page(f"{run.name}: every row of metrics.csv", body))
    counts = {s: sum(r.status == s for r in rows) for s in ("measured", "degraded", "skipped", "failed",
                                                             "unavailable")}
    cap = (f"Run ``{run.name}``: every row of ``results/{run.name}/metrics.csv`` — "
           + ", ".join(f"{n} {s}" for s, n in counts.items()) + ". The provenance id column is the id the "
           "figure captions cite and ``provenance.json`` holds; the source column is the log the value was read "
           "from.\n")
    write_json(out / "metrics.json", {"run": run.name, "counts": counts})
    atomic_write(out / "metrics.caption.rst", cap)
