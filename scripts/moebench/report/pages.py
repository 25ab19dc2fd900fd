"""The report's pages and its command line: every view of one run (figures and tables), the cross-run views (tier
comparison, the verdict summary workflow.rst includes) and each run's provenance page.

    python -m moebench.report run --run-dir results/<run> --out results/<run>/plots [--baselines ...]
    python -m moebench.report runs --run-dirs results/a results/b --out results/_report
    python -m moebench.report provenance --run-dir results/<run> --out results/<run>/report
"""
from __future__ import annotations

import argparse
import html
import json
from pathlib import Path

from ..io import atomic_write, write_json
from .figures import FIGURES
from .runs import load_run, maybe_json, validation_absent_reason
from .tables import html_page, html_table, lit, table_gates, table_metrics
from .tiers import fig_tiers, run_label

VIEWS = {**FIGURES, "gates": table_gates, "metrics": table_metrics}


def render_run(run_dir, out, baselines=("hf_bf16", "unsloth_4bit")):
    run, out = load_run(run_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    why = "" if any(r.stage == "validate" for r in run.rows) else validation_absent_reason(run)
    for view in VIEWS.values():
        view(run, out, baselines=tuple(baselines), why_empty=why)
    return run


def summary_rst(runs) -> str:
    """The verdict block workflow.rst includes: one line per run, read from each run's verdict.json."""
    out = []
    for run in runs:
        v = run.verdict or {}
        verdict = v.get("verdict", "absent (no verdict.json)")
        out.append(f"* ``{run.name}`` — tier ``{(run.tier or {}).get('tier', '?')}``, "
                   f"{lit(run_label(run))}: **{verdict}** — {lit(v.get('reason', ''))}")
    return "\n".join(out) + "\n" if out else "* no runs in ``results/``\n"


def render_runs(run_dirs, out):
    runs, out = [load_run(d) for d in run_dirs], Path(out)
    fig_tiers(runs, out)
    atomic_write(out / "summary.rst", summary_rst(runs))
    return runs


def provenance_page(run_dir, out):
    d, out = Path(run_dir), Path(out)
    stamp = maybe_json(d / "provenance_stamp.json")
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
                 f"Run ``{d.name}``: stamp status **{lit(status)}**; files present: "
                 + ", ".join(lit(f) for f, ok in files.items() if ok) + ".\n")
    write_json(out / "provenance_status.json", {"run": d.name, "status": status, "files": files})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
