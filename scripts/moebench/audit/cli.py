"""One run, all runs: the checks in order, the report (audits/AUDIT-<date>.md), the summary line and the exit
code. `python -m moebench.audit` runs main().
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

from ..chain import history_dir, settings, sha256_bytes
from ..io import atomic_write, logger
from .figures import audit_figures
from .levels import EXIT, Findings, worst
from .logs import check_metrics_csv, check_numbers
from .proofs import _redact, check_chain, check_stamps
from .recompute import check_derived, check_inputs, check_steps


def audit_run(run_dir: Path, s: dict, root: Path, check_calendars: bool = True) -> tuple[Findings, dict]:
    F = Findings()
    prov = run_dir / "provenance.json"
    info = {"run": run_dir.name, "provenance": str(prov)}
    if not prov.is_file():
        F.fail(f"{prov} is missing: run `snakemake provenance` for this run")
        return F, info
    data = prov.read_bytes()
    try:
        doc = json.loads(data)
    except json.JSONDecodeError as exc:
        F.fail(f"{prov} is not valid JSON ({exc}); it was damaged after it was written")
        doc = {}
    info.update(sha256=sha256_bytes(data), revision=doc.get("revision"), numbers=len(doc.get("numbers") or []))
    hist = history_dir(s["history"], doc.get("run") or run_dir.name)
    chain = check_chain(prov, data, doc, hist, F)
    info["chain"] = check_stamps(chain, hist, prov, run_dir, s, F, check_calendars)
    if doc:
        check_numbers(doc, run_dir, root, F)
        check_metrics_csv(doc, run_dir, F)
        check_steps(doc, root, run_dir, F)
        check_derived(doc, F)
        check_inputs(doc, root, F)
    info["level"] = F.level
    return F, info


def summary_line(level: str, results: list[tuple[Findings, dict]]) -> str:
    per_run = ", ".join(f"{info['run']} {info['level']}" for _, info in results)
    nfail = sum(len(F.failed) for F, _ in results)
    meaning = {"PROVEN": "every required revision's proof verified against a Bitcoin node",
               "ATTESTED": "complete proofs NOT checked against a Bitcoin node (unverified)",
               "PENDING": "numbers, chain and inputs check out; a proof awaits its Bitcoin block",
               "UNSTAMPED": "numbers, chain and inputs check out; a required revision has no proof yet",
               "FAILED": f"{nfail} failure(s)"}[level]
    return f"AUDIT {level}: {meaning} ({len(results)} run(s): {per_run})"


def render(date: str, level: str, results: list[tuple[Findings, dict]], s: dict, argv: list[str]) -> str:
    out = [f"# Audit {date}", "", f"**{level}** — {summary_line(level, results)}.", "",
           f"Command: `python -m moebench.audit {_redact(' '.join(argv))}`  ",
           f"Bitcoin node: {_redact(s.get('bitcoin_node')) or 'none (complete proofs can be ATTESTED at best)'}; "
           f"calendar timeout {s['timeout_s']} s.", "",
           "Levels: PROVEN (exit 0) > ATTESTED (3) > PENDING (4) > UNSTAMPED (5) > FAILED (1); below FAILED every "
           "number, row, the chain and the inputs checked out.", ""]
    for F, info in results:
        c = F.checked
        out += [f"## Run `{info['run']}`: {info['level']}", "",
                f"- `{info['provenance']}` sha256 `{info.get('sha256')}`, revision {info.get('revision')}, "
                f"{info.get('numbers')} numbers",
                f"- re-derived from logs: {c['numbers']}; stage logs scanned: {c['logs']}; step medians and "
                f"spreads recomputed: {c['steps']}; derived recomputed: {c['derived']}; inputs re-hashed: "
                f"{c['inputs']}; revisions checked: {c['revisions']}", "",
                "| revision | sha256 | stamp |", "|---|---|---|"]
        for r in info.get("chain", []):
            extra = f" (block {r['bitcoin'][0]})" if r.get("bitcoin") else ""
            out.append(f"| {r['revision']} | `{r['sha256']}` | {r['stamp']}{extra} |")
        out += ["", "Findings:", ""] + [f"- **{lvl}** {m}" for lvl, m in F.items] + [""]
    return "\n".join(out)


def write_report(out_dir: Path, date: str, text: str) -> Path:
    """audits/AUDIT-<date>.md; a different audit of the same day gets -2, -3 ... (none is overwritten)."""
    k = 1
    while True:
        p = out_dir / (f"AUDIT-{date}.md" if k == 1 else f"AUDIT-{date}-{k}.md")
        if not p.exists() or p.read_text() == text:
            atomic_write(p, text)
            return p
        k += 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # the package's docstring (levels and exit codes) is the help; prog as the rules call it, not __main__.py
    ap = argparse.ArgumentParser(prog="python -m moebench.audit", description=sys.modules[__package__].__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default="results", help="directory of runs (default %(default)s)")
    ap.add_argument("--run", action="append", help="audit only this run (repeat); default: every run with a "
                                                   "provenance.json")
    ap.add_argument("--config", help="config.yaml with the `provenance:` block")
    ap.add_argument("--settings", help="the `provenance:` block as JSON (over --config; the workflow passes it)")
    ap.add_argument("--history")
    ap.add_argument("--bitcoin-node", help="run `ots verify` of complete proofs against this node")
    ap.add_argument("--timeout", type=float, dest="timeout_s")
    ap.add_argument("--whitelist", "-l", action="append", help="extra calendar the audit may ask about pending "
                                                              "proofs (the configured calendars always are)")
    ap.add_argument("--allow-unstamped", action="store_true", help=argparse.SUPPRESS)  # levels replaced it
    ap.add_argument("--no-calendars", action="store_true", help="do not ask calendars about pending proofs")
    ap.add_argument("--out-dir", default="audits")
    ap.add_argument("--level-file", help="also write the summary line here")
    ap.add_argument("--date", help=argparse.SUPPRESS)
    ap.add_argument("--log")
    a = ap.parse_args(argv)
    log = logger("audit", a.log)
    try:
        cli = {"history": a.history, "bitcoin_node": a.bitcoin_node, "timeout_s": a.timeout_s}
        s = settings(a.config, **{**(json.loads(a.settings) if a.settings else {}),
                                  **{k: v for k, v in cli.items() if v is not None}})
        s["whitelist"] = list(s["whitelist"]) + (a.whitelist or [])
    except (OSError, ValueError) as exc:
        log.error("audit: cannot read the provenance settings (%s): %s", a.config or a.settings, exc)
        return 2
    base = Path(a.results)
    runs = [base / r for r in a.run] if a.run else sorted(p.parent for p in base.glob("*/provenance.json"))
    if not runs:
        log.error("audit: no run with a provenance.json under %s: run `snakemake provenance` first", base)
        return 2
    results = [audit_run(r, s, Path("."), not a.no_calendars) for r in runs]
    figures = base.parent / "docs" / "figures.json"  # README's figures, cross-run ratios included: own chain
    if figures.is_file() and not a.run:
        results.append(audit_figures(figures, base, s, not a.no_calendars))
    level = worst(info["level"] for _, info in results)
    date = a.date or datetime.now(timezone.utc).date().isoformat()
    path = write_report(Path(a.out_dir), date, render(date, level, results, s, argv))
    for F, info in results:
        for m in F.failed:
            log.error("FAIL [%s] %s", info["run"], m)
    line = summary_line(level, results)
    if a.level_file:
        atomic_write(a.level_file, f"{level}\n{line}\nreport: {path}\n")
    log.info("%s: %s", path, line)
    print(line)
    return EXIT[level]
