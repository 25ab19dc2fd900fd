"""Provenance of a run: every number of metrics.csv (and of comparison.csv) under a stable id, with its unit, its
source log and that log's sha256; the exact inputs, the environment, the git state and the run's times. Written to
results/<run>/provenance.json, rendered to PROVENANCE.md; the JSON is the authority.

Revisions form a hash chain: each names the sha256 of the one before it. Every revision is kept as
<history>/<run>/<sha256>.json (beside its OpenTimestamps proof, see stamp.py) and <history>/<run>/HEAD names the
newest. A new revision is made only when the content changed: an unchanged rerun rewrites the same bytes, so its
sha256 and its proof stay valid and the chain does not grow.

Log format the audit re-derives numbers from (written by metrics.log_row, read by parse_log_rows): one line per row,
`... MOEBENCH_ROW {"arm": ..., "metric": ..., "value": ...}` (json.dumps of the Row, sort_keys=True).
"""
from __future__ import annotations

import argparse
import csv
import json
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from .chain import DEFAULT_HISTORY, ChainError, commit, history_dir, resolve_source  # noqa: F401 (commit: __all__)
from .io import atomic_write, logger, package_versions, read_json, sha256_file
from .metrics import LOG_TAG, Row, log_row, parse_log_rows, read_rows

# The bench code writes each number into its run.log with log_row; the audit reads them back (parse_log_rows).
__all__ = ["LOG_TAG", "log_row", "parse_log_rows", "number_id", "row_id", "load_numbers", "build", "commit", "main"]

SCHEMA = "moebench.provenance/1"
# comparison.csv columns that are numbers, with their units (speedups are `compare` rows of metrics.csv already)
COMPARISON_UNITS = {"draws": "count", "step_s": "s", "step_s_iqr": "s", "draw_range_s": "s",
                    "tokens_per_s": "tokens/s", "peak_alloc_gb": "GB", "mem_after_load_gb": "GB", "load_s": "s",
                    "expert_lora_params": "params", "expert_4bit_fraction": "fraction"}
TOOLS = ("opentimestamps-client", "opentimestamps", "python-bitcoinlib", "snakemake", "pandas")


class ProvenanceError(ChainError):
    """Bad input or a broken history: the message says which file and what to do; nothing was written."""


# ---- ids and rows -------------------------------------------------------------------------------------------
def number_id(run: str, stage: str, arm: str, draw, metric: str) -> str:
    """Stable id of a number: the same run/stage/arm/draw/metric always gets the same id."""
    return f"{run}/{stage}/{arm}/{'all' if draw in (None, '') else f'd{int(draw)}'}/{metric}"


def row_id(row: Row) -> str:
    return number_id(row.run_id, row.stage, row.arm, row.draw, row.metric)


def numbers_from_rows(rows: list[Row], run_dir: Path, root: Path) -> list[dict]:
    """One entry per metrics row; a row without a readable source log is an error (it could not be audited)."""
    out, seen, missing, shas = [], {}, [], {}
    for r in rows:
        nid = row_id(r)
        if nid in seen:
            raise ProvenanceError(f"two metrics rows share the id {nid} (rows {seen[nid]} and {len(out) + 1}): "
                                  "each run/stage/arm/draw/metric must be measured once")
        seen[nid] = len(out) + 1
        src = resolve_source(r.source, run_dir, root)
        if src is None:
            missing.append(f"{nid} (source {r.source!r})")
            continue
        key = str(src)
        shas.setdefault(key, sha256_file(src))
        d = asdict(r)
        d.pop("run_id")
        out.append({"id": nid, "run": r.run_id, **d, "source_sha256": shas[key]})
    if missing:
        raise ProvenanceError(f"{len(missing)} row(s) have no readable source log, so they could not be audited: "
                              + "; ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
    return out


def numbers_from_comparison(path: Path, run: str, source: str, sha: str) -> list[dict]:
    """The derived cells of comparison.csv (medians over draws): the report shows them, so they are here too."""
    out = []
    with open(path, newline="") as fh:
        for rec in csv.DictReader(fh):
            for col, unit in COMPARISON_UNITS.items():
                text = rec.get(col, "")
                if text == "":
                    continue
                try:
                    value = float(text)
                except ValueError as exc:
                    raise ProvenanceError(f"{path}: column {col} of arm {rec.get('arm')} is not a number: {text!r}") \
                        from exc
                out.append({"id": number_id(run, "comparison", rec["arm"], None, col), "run": run,
                            "tier": rec.get("tier", ""), "model": rec.get("model", ""), "arm": rec["arm"],
                            "precision": rec.get("precision", ""), "stage": "comparison", "metric": col,
                            "value": value, "unit": unit, "n": int(float(rec["draws"] or 0)), "spread": None,
                            # a line with a degraded draw is degraded in every cell, with the line's reason
                            **({"status": "degraded", "reason": rec.get("reason", "")} if rec.get("status") == "degraded"
                               else {"status": "measured", "reason": ""}),
                            "source": source, "draw": None,
                            "source_sha256": sha, "derived": "median over draws of the bench rows (aggregate.py)"})
    return out


# ---- inputs, environment, git --------------------------------------------------------------------------------
def _file(path: Path, root: Path) -> dict:
    return {"path": _rel(path, root), "sha256": sha256_file(path)}


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _sha_lines(path: Path) -> dict:
    """`sha256  name` lines (sha256sum format) as {name: sha}."""
    out = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and len(parts[0]) == 64:
            out[parts[1].lstrip("*")] = parts[0]
    return out


def data_used(sha_file: Path) -> dict:
    """{name: sha256} of the data files as they are now (the bytes the jobs used: each job checked them against
    data.sha256 before it ran, moebench.inputs), which must still be what data.sha256 records."""
    recorded = _sha_lines(sha_file)
    if not recorded:
        raise ProvenanceError(f"{sha_file}: no `sha256  file` lines in it")
    out = {}
    for name, want in recorded.items():
        p = sha_file.parent / name
        if not p.is_file():
            raise ProvenanceError(f"{p} is missing: {sha_file} records it; rebuild it with snakemake --forcerun data")
        out[name] = sha256_file(p)
        if out[name] != want:
            raise ProvenanceError(f"{p} is not the file {sha_file} records (sha256 {out[name][:16]}, recorded "
                                  f"{want[:16]}): it changed after rule data wrote it; rebuild with snakemake "
                                  "--forcerun data")
    return out


def _fingerprint(model_sha: Path, root: Path) -> dict:
    """The weights' cheap fingerprint (sizes, safetensors headers, sampled chunks) jobs checked them against."""
    fp = model_sha.with_name(model_sha.name.removesuffix(".sha256") + ".fingerprint.json")
    return {"fingerprint": _file(fp, root)} if fp.is_file() else {}


def inputs(a, root: Path) -> dict:
    import yaml

    cfg_text = Path(a.config).read_text()
    cfg = yaml.safe_load(cfg_text) or {}
    model = read_json(a.model_sha)
    data = {**_file(Path(a.data_sha), root), "files": data_used(Path(a.data_sha))}
    return {
        "config": {**_file(Path(a.config), root), "content": cfg},
        "data": data,
        "model": {**_file(Path(a.model_sha), root), "config_sha256": model.get("config_sha256"),
                  "weights_sha256": model.get("weights_sha256"), "tokenizer_sha256": model.get("tokenizer_sha256"),
                  "how": model.get("how"), "source": model.get("model"), **_fingerprint(Path(a.model_sha), root)},
        "seeds": {"seed": cfg.get("seed"), "data.seed": (cfg.get("data") or {}).get("seed")},
        "tier": _file(Path(a.tier), root),
        "metrics": _file(Path(a.metrics), root),
        "comparison": _file(Path(a.comparison), root),
        **({"verdict": {**_file(Path(a.verdict), root), "content": read_json(a.verdict)}} if a.verdict else {}),
    }


def environment(run_dir: Path, tier: dict, root: Path) -> tuple[dict, dict]:
    """The host/GPU inventory of tier.json, each draw's env.json, and the versions of the provenance tools.
    Also returns the run's start and end (earliest start, latest end over the draws)."""
    arms = {}
    for env_path in sorted(run_dir.glob("arms/*/draw*/env.json")):
        env = read_json(env_path)
        arms[f"{env_path.parent.parent.name}/{env_path.parent.name}"] = {**_file(env_path, root), **env}
    tools = package_versions(TOOLS)
    starts = [e["started"] for e in arms.values() if e.get("started")]
    ends = [e["ended"] for e in arms.values() if e.get("ended")]
    env = {"tier": tier, "arms": arms,
           "provenance_tools": {"python": platform.python_version(), "packages": tools}}
    return env, {"started": min(starts, default=None), "ended": max(ends, default=None)}


def git_state(root: Path) -> dict:
    """The project's commit and whether the tree differs from it (results/ and audits/ are this workflow's own
    outputs and are left out of the dirty check)."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)

    try:
        inside = git("rev-parse", "--is-inside-work-tree")
        head = git("rev-parse", "--verify", "-q", "HEAD")
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"commit": None, "dirty": None, "note": f"git not usable: {exc}"}
    if inside.returncode != 0:
        return {"commit": None, "dirty": None, "note": "not a git checkout"}
    status = git("status", "--porcelain", "--", ".", ":(exclude)results", ":(exclude)audits")
    dirty = [line[3:] for line in status.stdout.splitlines() if line.strip()]
    if head.returncode != 0:
        return {"commit": None, "dirty": True, "dirty_paths": dirty[:50], "note": "the repository has no commit yet"}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty), "dirty_paths": dirty[:50],
            "note": "state when the provenance was assembled; results/ and audits/ not counted"}


def build(a, root: Path = Path(".")) -> dict:
    """The content of a revision (everything but the chain fields)."""
    for name in ("metrics", "tier", "data_sha", "model_sha", "comparison", "config"):
        p = getattr(a, name)
        if not Path(p).is_file():
            raise ProvenanceError(f"missing input {p} ({name}): run the workflow up to `aggregate` first")
    run_dir = Path(a.run_dir)
    try:
        rows = read_rows(a.metrics)
    except (ValueError, KeyError, TypeError) as exc:
        raise ProvenanceError(f"{a.metrics}: not a readable metrics table: {exc}") from exc
    if not rows:
        raise ProvenanceError(f"{a.metrics} has no rows: nothing to put in the provenance")
    runs = {r.run_id for r in rows}
    run = a.run or run_dir.name
    if runs != {run}:
        raise ProvenanceError(f"{a.metrics} holds rows of run(s) {sorted(runs)}, expected only {run!r}")
    tier = read_json(a.tier)
    nums = numbers_from_rows(rows, run_dir, root)
    comp = numbers_from_comparison(Path(a.comparison), run, _rel(Path(a.comparison), root),
                                   sha256_file(a.comparison))
    clash = {n["id"] for n in nums} & {n["id"] for n in comp}
    if clash:
        raise ProvenanceError(f"ids both in metrics.csv and comparison.csv: {sorted(clash)[:5]}")
    env, times = environment(run_dir, tier, root)
    counts = {}
    for n in nums:
        counts[n["status"]] = counts.get(n["status"], 0) + 1
    doc_inputs = inputs(a, root)
    claims = []
    if getattr(a, "claims", None):  # the claims ledger's verdicts, each with the ids it rests on
        claims = read_json(a.claims)["claims"]
        doc_inputs["claims"] = {"path": _rel(Path(a.claims), root), "sha256": sha256_file(a.claims)}
    return {"schema": SCHEMA, "run": run, "project": git_state(root), "times": times, "inputs": doc_inputs,
            "environment": env, "numbers": nums + comp, "claims": claims,
            "summary": {"rows": len(nums), "derived": len(comp), **{f"status_{k}": v for k, v in counts.items()}}}


# ---- rendering -----------------------------------------------------------------------------------------------
def _v(v) -> str:
    return "" if v is None else json.dumps(v)


def render_md(doc: dict, sha: str, json_path: str) -> str:
    git, t, inp = doc["project"], doc["times"], doc["inputs"]
    lines = [f"# Provenance of run `{doc['run']}`", "",
             f"Rendered from `{json_path}` (sha256 `{sha}`); the JSON is the authority. "
             f"Revision {doc['revision']}, previous revision sha256 `{doc['previous_sha256'] or 'none'}`, "
             f"created {doc['created']}.", "",
             f"Check it: `ots verify {json_path}.ots` (see `provenance_stamp.json` for the stamp's state).", "",
             "## Project and times", "",
             f"- git commit: `{git.get('commit') or 'none'}`; dirty: {git.get('dirty')}"
             + (f" ({git['note']})" if git.get("note") else ""),
             f"- run started {t.get('started')}, ended {t.get('ended')}", "",
             "## Inputs", ""]
    for key in ("config", "data", "model", "tier", "metrics", "comparison", "verdict", "claims"):
        if key in inp:
            lines.append(f"- {key}: `{inp[key]['path']}` sha256 `{inp[key]['sha256']}`")
    for name, s in sorted(inp["data"]["files"].items()):
        lines.append(f"  - data `{name}` sha256 `{s}`")
    lines.append(f"- model config sha256 `{inp['model'].get('config_sha256')}`")
    lines.append(f"- seeds: {', '.join(f'{k}={v}' for k, v in inp['seeds'].items())}")
    tier = doc["environment"]["tier"]
    gpu = tier.get("gpu") or {}
    lines += ["", "## Environment", "",
              f"- tier `{tier.get('tier')}`; GPU {gpu.get('name', 'none')}; driver {gpu.get('driver')}; "
              f"CUDA {gpu.get('cuda')}; host {json.dumps(tier.get('host'), sort_keys=True)}"]
    for key, env in sorted(doc["environment"]["arms"].items()):
        pk = ", ".join(f"{k} {v}" for k, v in sorted((env.get("packages") or {}).items()) if v)
        lines.append(f"- {key}: python {str(env.get('python', '')).split()[0]}; {pk}")
    lines += ["", "## Numbers", "", f"{len(doc['numbers'])} numbers: {json.dumps(doc['summary'], sort_keys=True)}", "",
              "| id | value | unit | n | spread | status | reason | source | source sha256 |", "|---" * 9 + "|"]
    for n in doc["numbers"]:
        reason = str(n.get("reason", "")).replace("|", "\\|")
        lines.append(f"| `{n['id']}` | {_v(n['value'])} | {n['unit']} | {_v(n['n'])} | {_v(n['spread'])} | "
                     f"{n['status']} | {reason} | `{n['source']}` | `{n['source_sha256'][:16]}` |")
    if doc.get("claims"):
        lines += ["", "## Claims", "", "| claim | verdict | value | rests on |", "|---|---|---|---|"]
        for c in doc["claims"]:
            ids = ", ".join(f"`{i}`" for i in c.get("provenance_ids", []))
            lines.append(f"| {c.get('id')} | {c.get('verdict')} | {_v(c.get('value'))} | {ids} |")
    return "\n".join(lines) + "\n"


def load_numbers(path: str | Path) -> dict[str, dict]:
    """{id: number} of a provenance.json: what the report and README may quote."""
    return {n["id"]: n for n in read_json(path)["numbers"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="results/<run>")
    ap.add_argument("--run", help="run name (default: the run directory's name)")
    ap.add_argument("--config", required=True, help="the run's effective config.yaml")
    ap.add_argument("--metrics", required=True)
    ap.add_argument("--tier", required=True)
    ap.add_argument("--data-sha", required=True)
    ap.add_argument("--model-sha", required=True)
    ap.add_argument("--comparison", required=True)
    ap.add_argument("--verdict")
    ap.add_argument("--claims", help="claims.json of the run (the ledger's verdicts)")
    ap.add_argument("--history", default=DEFAULT_HISTORY, help="where revisions are kept (default %(default)s)")
    ap.add_argument("--out-json", required=True)
    ap.add_argument("--out-md", required=True)
    ap.add_argument("--log")
    a = ap.parse_args(argv)
    log = logger("provenance", a.log)
    root = Path(".")
    try:
        content = build(a, root)
        hist = history_dir(a.history, content["run"])
        sha, new = commit(content, Path(a.out_json), hist, log)
        doc = read_json(a.out_json)
    except (ChainError, OSError, json.JSONDecodeError) as exc:
        log.error("provenance not written: %s", exc)
        return 2
    atomic_write(a.out_md, render_md(doc, sha, a.out_json))
    log.info("%s revision %d sha256 %s (%s); %d numbers", a.out_json, doc["revision"], sha,
             "new revision" if new else "content unchanged, chain not grown", len(doc["numbers"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
