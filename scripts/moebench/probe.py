"""One fresh `moebench.bench` process with the tier plan changed (a shape, a step count), and its rows relabelled
as rows of the stage that asked: the capacity sweeps' boundary checks and the shape curve's points. A probe that
runs out of memory is a recorded outcome ("oom"), never a crash of the caller.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from . import config as cfgmod
from .grid import shape_metric
from .io import read_json, run_bounded, write_json
from .metrics import VALUED, Row, read_rows


def bench_probe(args, plan_change: dict, workdir: Path, plog: Path, log, timing: dict | None = None,
                draw: int = 1) -> tuple[str, list[Row]]:
    """Run one bench draw of args.arm with plan_change over the tier plan; (outcome, its rows). `timing` replaces
    the default memory-probe timing (1 warm-up step, 2 timed, no minimum window). Outcome: "measured", "oom",
    or "<status>: <reason>" / "failed: no result ..." when it did not train."""
    tier = read_json(args.tier)
    tier["plan"].update({"warmup_steps": 1, "warmup_max": 1, "timed_steps": 2, "min_timed_s": 0,
                         "min_power_samples": 0, **(timing or {}), **plan_change})
    tag = "_".join(f"{k}{v}" for k, v in plan_change.items())
    tfile = workdir / f"tier_{tag}.json"
    write_json(tfile, tier)
    cfg = cfgmod.load(args.config)
    cfg.update({"idle_baseline_s": 0, "bare_loop_arms": []})
    cfile = workdir / "config.yaml"
    cfile.write_text(json.dumps(cfg))
    out = workdir / tag / "metrics.csv"
    cmd = [sys.executable, "-m", "moebench.bench", "--config", str(cfile), "--tier", str(tfile), "--model",
           args.model, "--data", args.data, "--arm", args.arm, "--draw", str(draw), "--out", str(out), "--log",
           str(plog)]
    code, text = run_bounded(cmd, cfg["arm_timeout_s"] + 60)
    plog.parent.mkdir(parents=True, exist_ok=True)
    # what the process printed (Unsloth announces its fallbacks only on stdout), beside its run.log, as a draw's
    (plog.parent / "console.log").write_text(text)
    rows = read_rows(out) if out.exists() else []
    result = outcome(rows, code, text)
    log.info("probe %s -> %s", plan_change, result)
    return result, rows


def outcome(rows: list[Row], code: int, text: str) -> str:
    step = next((r for r in rows if r.metric == "step_s"), None)
    if step is None:
        last = text.strip().splitlines()[-1][:200] if text.strip() else ""
        return f"failed: no result (exit {code}): {last}"
    if step.status in VALUED:
        return "measured"
    return "oom" if step.reason.startswith("OOM") else f"{step.status}: {step.reason}"


def relabel(rows: list[Row], batch: int, seq: int, source: str, stage: str, keep, draw: int = 1) -> list[Row]:
    """A probe's rows (those named in `keep`) as `stage` rows of its shape (`tokens_per_s@1x8192`), logged in the
    asking stage's own log (`source`); the probe's log keeps its bench rows."""
    return [Row(r.run_id, r.tier, r.model, r.arm, r.precision, stage, shape_metric(r.metric, batch, seq), r.value,
                r.unit, r.n, r.spread, r.status, r.reason, source, draw) for r in rows if r.metric in keep]
