"""Capacity sweeps: the longest sequence each arm trains at batch 1, and the largest batch at the tier's
sequence length, before running out of GPU memory. Each probe is a fresh `moebench.bench` process, so one
probe's fragmentation or OOM never leaks into the next."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from . import config as cfgmod
from .io import logger, read_json, write_json
from .metrics import Row, log_row, read_rows, write_rows

# A probe answers: "measured" (trained), "oom", or "failed: <reason>" (anything else: stop, say why).
Probe = Callable[[int], str]


def search(probe: Probe, lo: int, hi: int, refine: int = 0, quantum: int = 1) -> tuple[int | None, int | None, list]:
    """Double from `lo` while the probe trains, then bisect `refine` times between the last fit and the first
    OOM. Returns (largest that trained, smallest that did not, [(value, outcome)...])."""
    tried, ok, bad = [], None, None
    v = lo
    while v <= hi:
        out = probe(v)
        tried.append((v, out))
        if out != "measured":
            bad = v
            break
        ok, v = v, v * 2
    for _ in range(refine if ok and bad and tried[-1][1] == "oom" else 0):
        mid = (ok + bad) // 2 // quantum * quantum
        if mid in (ok, bad):
            break
        out = probe(mid)
        tried.append((mid, out))
        ok, bad = (mid, bad) if out == "measured" else (ok, mid)
    return ok, bad, tried


def bench_probe(args, plan_change: dict, workdir: Path, log) -> str:
    """Run one bench process with the plan changed; read its outcome from its rows."""
    tier = read_json(args.tier)
    tier["plan"].update({"warmup_steps": 1, "timed_steps": 2, **plan_change})
    tag = "_".join(f"{k}{v}" for k, v in plan_change.items())
    tfile = workdir / f"tier_{tag}.json"
    write_json(tfile, tier)
    cfg = cfgmod.load(args.config)
    cfg.update({"idle_baseline_s": 0, "bare_loop_arms": []})
    cfile = workdir / "config.yaml"
    cfile.write_text(json.dumps(cfg))
    out = workdir / tag / "metrics.csv"
    cmd = [sys.executable, "-m", "moebench.bench", "--config", str(cfile), "--tier", str(tfile), "--model",
           args.model, "--data", args.data, "--arm", args.arm, "--draw", "0", "--out", str(out),
           "--log", str(Path(args.log).with_name(f"probe_{tag}.log"))]
    subprocess.run(cmd, check=False, timeout=cfg["arm_timeout_s"] + 60)
    step = next((r for r in read_rows(out) if r.metric == "step_s"), None) if out.exists() else None
    result = "failed: no result" if step is None else (
        "measured" if step.status == "measured" else "oom" if step.reason.startswith("OOM") else
        f"{step.status}: {step.reason}")
    log.info("probe %s -> %s", plan_change, result)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    for a in ("--config", "--tier", "--model", "--data", "--arm", "--out", "--log"):
        ap.add_argument(a, required=True)
    ap.add_argument("--kind", choices=["seq", "batch"], required=True)
    args = ap.parse_args(argv)
    log = logger("sweep", args.log)
    cfg, tier = cfgmod.load(args.config), read_json(args.tier)
    plan = tier["plan"]
    base = dict(run_id=cfg["run"], tier=tier["tier"], model=cfg["model"]["name"], arm=args.arm,
                precision="nf4" if args.arm.endswith(("4bit", "bnb4")) else "bf16", stage="sweep", source=args.log)
    metric = "max_seq_len" if args.kind == "seq" else "max_batch"
    if tier.get("gpu") is None:
        rows = [Row(**base, metric=metric, status="skipped",
                    reason="capacity sweeps find GPU memory limits; the CPU tier has none to find")]
    else:
        sw = plan.get("sweep", {})
        with tempfile.TemporaryDirectory() as tmp:
            if args.kind == "seq":
                fn = lambda v: bench_probe(args, {"seq_len": v, "batch": 1}, Path(tmp), log)
                ok, bad, tried = search(fn, sw.get("seq_min", 1024), sw.get("seq_max", 65536), sw.get("refine", 0), 1024)
            else:
                fn = lambda v: bench_probe(args, {"batch": v}, Path(tmp), log)
                ok, bad, tried = search(fn, 1, sw.get("batch_max", 64), sw.get("refine", 0))
        last = tried[-1][1] if tried else "no probe"
        if ok is None:
            rows = [Row(**base, metric=metric, status="failed", reason=f"smallest probe did not train ({last})")]
        else:
            why = f"next probe {bad}: {last}" if bad else "largest probe trained (search limit)"
            rows = [Row(**base, metric=metric, value=ok, unit="tokens" if args.kind == "seq" else "sequences",
                        n=len(tried), reason=why)]
        log.info("probes: %s", tried)
    for r in rows:
        log_row(log, r)
    write_rows(args.out, rows)


if __name__ == "__main__":
    main()
