"""Numbers against their logs: each number of the provenance re-derived from the `MOEBENCH_ROW` line of its
source log, every row of every stage log (and every log the run's config and tier plan expect) found in the
provenance, and metrics.csv against the provenance.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from pathlib import Path

from .. import workflowlib as wl
from ..chain import resolve_source
from ..harness import draw_console
from ..ids import number_id, row_id
from ..io import read_json, sha256_file
from ..metrics import LOG_TAG, Row, read_rows
from .levels import Findings


FIELDS = ("value", "unit", "status", "reason", "n", "spread")


def parse_log(path: Path, F: Findings) -> dict[str, Row]:
    """{id: Row} of a log's MOEBENCH_ROW lines; a malformed line or a repeated id is a failure naming the line.
    A model record (model.sha256) is read as its router-calibration rows, derived again from the file."""
    out: dict[str, Row] = {}
    if path.name == "model.sha256":
        return {row_id(r): r for r in model_record_rows(path)}
    for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if LOG_TAG + " " not in line:
            continue
        try:
            row = Row(**json.loads(line.split(LOG_TAG + " ", 1)[1]))
        except (ValueError, TypeError) as exc:
            F.fail(f"{path}:{i}: malformed {LOG_TAG} line ({exc})")
            continue
        rid = row_id(row)
        if rid in out:
            F.fail(f"{path}:{i}: {rid} logged twice: which value is the measured one is ambiguous")
        out[rid] = row
    return out


def same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return a == b or math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b or (a in (None, "") and b in (None, ""))


def diff(number: dict, row: dict, log: Path | None = None) -> list[str]:
    fields = FIELDS
    if log is not None and console_degraded(number, row, log):
        fields = tuple(f for f in FIELDS if f not in ("status", "reason"))
    return [f"{f}: provenance {number.get(f)!r} vs log {row.get(f)!r}" for f in fields
            if not same(number.get(f), row.get(f))]


CONSOLE_MORE = re.compile(r" \(\+\d+ more\)$")


def console_degraded(number: dict, row: dict, log: Path) -> bool:
    """A row logged `measured` that the aggregate marked `degraded` afterwards, for a fallback line its console.log
    holds (aggregate.console_degraded: draws measured before the process looked for such lines): true only when
    that line really is in the console.log beside the log."""
    reason = str(number.get("reason") or "")
    if number.get("status") != "degraded" or row.get("status") != "measured" or not reason.startswith("console: "):
        return False
    line = CONSOLE_MORE.sub("", reason.removeprefix("console: ")).removesuffix(" …")
    return bool(line) and line in draw_console(log.parent)





# Every stage's own logs (rule logs under logs/ echo them and are not sources).
STAGE_LOGS = ("arms/*/draw*/run.log", "validate/*/run.log", "offload/*/*/run.log", "sweep/*/*.log",
              "shapes/*.log", "routing_ab/*/run.log", "points/*.log")


def expected_logs(doc: dict, run_dir: Path) -> list[Path]:
    """The stage logs the run's config and tier plan say it made: each arm's draws, each validated arm, each
    offload run, each sweep, shape curve and routing A/B. A missing one is a dropped stage, not an absent file
    by design."""
    cfg = (doc.get("inputs", {}).get("config") or {}).get("content") or {}
    tier = run_dir / "tier.json"
    draws = (read_json(tier).get("plan") or {}).get("draws") if tier.is_file() else None
    arms = cfg.get("arms") or []
    out = [run_dir / "arms" / a / f"draw{k}" / "run.log" for a in arms for k in range(1, (draws or 0) + 1)]
    validate = (cfg.get("validate") or {}).get("arms")
    out += [run_dir / "validate" / a / "run.log" for a in (arms if validate is None else validate) if a in arms]
    for spec in (cfg.get("offload") or {}).get("runs") or []:
        arm, mode = spec.split(":")
        out.append(run_dir / "offload" / arm / mode / "run.log")
    out += [run_dir / "sweep" / a / f"{k}.log" for a, k in wl.sweeps({**cfg, "arms": arms})]
    out += [run_dir / "shapes" / f"{a}.log" for a in (cfg.get("shape_curve") or {}).get("arms") or []]
    out += [run_dir / "routing_ab" / a / "run.log" for a in (cfg.get("routing_ab") or {}).get("arms") or []]
    out += [Path(t).with_suffix(".log") for t in wl.point_targets(cfg, str(run_dir))]
    return out


def check_numbers(doc: dict, run_dir: Path, root: Path, F: Findings) -> dict[Path, dict[str, Row]]:
    """Every number of a log against that log; every row of every stage log must be in the provenance. Returns
    {log: {id: row}}."""
    logs: dict[Path, dict[str, Row]] = {}
    numbers = doc.get("numbers") or []
    ids = {n.get("id") for n in numbers}
    for n in numbers:
        if n.get("stage") in ("comparison", "compare"):
            continue  # recomputed in check_derived
        nid = n.get("id")
        expected = number_id(n.get("run"), n.get("stage"), n.get("arm"), n.get("draw"), n.get("metric"))
        if nid != expected:
            F.fail(f"number {nid}: its id does not match its fields ({expected})")
        src = resolve_source(n.get("source", ""), run_dir, root)
        if src is None:
            F.fail(f"number {nid}: source log {n.get('source')!r} is missing")
            continue
        src = src.resolve()
        if src not in logs:
            logs[src] = parse_log(src, F)
            got = sha256_file(src)
            if got != n.get("source_sha256"):
                F.fail(f"{_rel(src, root)} changed since the provenance was written (sha256 "
                       f"{n.get('source_sha256', '')[:16]} -> {got[:16]})")
        row = logs[src].get(nid)
        if row is None:
            F.fail(f"number {nid} = {n.get('value')!r}: not in its source log {_rel(src, root)}")
            continue
        bad = diff(n, asdict(row), src)
        if bad:
            F.fail(f"number {nid}: does not match its source log {_rel(src, root)}: " + "; ".join(bad))
        else:
            F.checked["numbers"] += 1
    for pattern in STAGE_LOGS:
        for log in sorted(run_dir.glob(pattern)):
            if log.resolve() not in logs:
                logs[log.resolve()] = parse_log(log, F)
    for log in expected_logs(doc, run_dir):
        if not log.is_file():
            F.fail(f"{_rel(log, root)} is missing: the run's config and tier plan say this stage ran, and its rows "
                   "are not in the provenance")
    for src, rows in logs.items():
        F.checked["logs"] += 1
        for rid in rows:
            if rid not in ids:
                F.fail(f"{_rel(src, root)}: logged number {rid} is missing from the provenance")
    return logs


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def check_metrics_csv(doc: dict, run_dir: Path, F: Findings) -> None:
    path = run_dir / "metrics.csv"
    if not path.is_file():
        F.warn(f"{path} not present; numbers checked against the logs only")
        return
    by_id = {n["id"]: n for n in doc.get("numbers", [])}
    seen = set()
    for r in read_rows(path):
        n = by_id.get(row_id(r))
        seen.add(row_id(r))
        if n is None:
            F.fail(f"{path}: row {row_id(r)} is missing from the provenance")
        elif diff(n, asdict(r)):
            F.fail(f"{path}: row {row_id(r)} differs from the provenance: " + "; ".join(diff(n, asdict(r))))
    for nid, n in by_id.items():
        if n.get("stage") not in ("comparison", "compare") and nid not in seen:
            F.fail(f"{path}: row {nid} of the provenance is missing from it")


def model_record_rows(path: Path) -> list[Row]:
    """The calibration rows of a run's model.sha256 as aggregate made them (run, tier and model from the run's
    config.yaml and tier.json beside it; the source as the repository-relative path aggregate was given)."""
    import yaml

    from ..router_calibration import record_rows

    run_dir = path.parent
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {} if (run_dir / "config.yaml").is_file() else {}
    tier = read_json(run_dir / "tier.json").get("tier", "") if (run_dir / "tier.json").is_file() else ""
    src = f"results/{run_dir.name}/{path.name}"
    return record_rows(str(path), cfg.get("run", run_dir.name), tier, (cfg.get("model") or {}).get("name", ""),
                       source=src)
