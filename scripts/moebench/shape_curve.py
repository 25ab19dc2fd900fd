"""The shape curve: how an arm's step time moves with tokens per step, so a ratio measured at the tier's shape can
be read against others (stack ratios move a lot between 1 x 2048 and 2 x 4096). One short measurement per shape
(config `shape_curve.shapes`, e.g. 1x2048, 4x4096, 1x16384), each in its own fresh `moebench.bench` process with
the usual steady warm-up and a short timed window (`shape_curve.timed_steps`, `min_timed_s`). These are single
draws: the figures label them so, and no verdict rests on them. An out-of-memory at a shape is a recorded result
(a failed `step_s@BxS` row "OOM ..."), not a crash; so is any other failure, with its reason.

The recipe's points (config `recipe.points`) run through the same code as stage `point`, with their own shapes
and draw number: `--stage point --shapes 4x4096 --draw 2`.

    python -m moebench.shape_curve --config C --tier T --model M --data D --arm unsloth_bf16 \\
        --out results/<run>/shapes/unsloth_bf16.csv --log results/<run>/shapes/unsloth_bf16.log
"""
from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

from . import arms as arm_registry
from . import config as cfgmod
from . import harness, probe
from .grid import shape_metric
from .io import logger, read_json
from .metrics import log_row, write_rows

KEEP = ("step_s", "tokens_per_s", "peak_alloc_gb", "peak_reserved_gb", "mfu", "loss_first", "loss_last")
SHAPE = re.compile(r"^(\d+)x(\d+)$")


def shapes(spec: list[str]) -> list[tuple[int, int]]:
    """"BxS" strings as (batch, seq), in the order given; a malformed one names itself."""
    out = []
    for s in spec:
        m = SHAPE.match(str(s))
        if not m:
            raise ValueError(f"shape_curve.shapes: {s!r} is not BATCHxSEQ (e.g. 1x2048)")
        out.append((int(m[1]), int(m[2])))
    return out


def point(args, ctx, batch: int, seq: int, timing: dict, workdir: Path, log) -> str:
    """One shape in its own process; its rows join ctx as rows of ctx's stage and draw. Returns the outcome."""
    plog = Path(args.log).with_name(f"{Path(args.out).stem}_{batch}x{seq}") / "run.log"
    out, rows = probe.bench_probe(args, {"batch": batch, "seq_len": seq}, workdir, plog, log, timing=timing,
                                  draw=ctx.draw)
    kept = probe.relabel(rows, batch, seq, args.log, ctx.stage, KEEP, draw=ctx.draw)
    if not any(r.metric == shape_metric("step_s", batch, seq) for r in kept):  # no step row: say why, at the shape
        ctx.add(shape_metric("step_s", batch, seq), status="failed", reason=out)
    ctx.rows.extend(kept)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for a in ("--config", "--tier", "--model", "--data", "--arm", "--out", "--log"):
        ap.add_argument(a, required=True)
    ap.add_argument("--shapes", help="comma-separated BxS, instead of config shape_curve.shapes")
    ap.add_argument("--draw", type=int, default=1, help="this draw's number (the recipe's points repeat)")
    ap.add_argument("--stage", default="shape", choices=("shape", "point"))
    args = ap.parse_args(argv)
    log = logger("shape_curve", args.log)
    cfg, tier = cfgmod.load(args.config), read_json(args.tier)
    arm, sc = arm_registry.get(args.arm), cfg["shape_curve"]  # the schema fills its defaults
    ctx = harness.Ctx(cfg["run"], tier["tier"], cfg["model"]["name"], arm.name, arm.precision, args.draw, args.log,
                      stage=args.stage)
    skip = harness.unavailable(arm, tier["plan"], tier.get("gpu") is not None, args.model)
    todo = shapes(args.shapes.split(",") if args.shapes else sc["shapes"])
    if skip:
        log.info("skipped: %s", skip)
        for b, s in todo:
            ctx.add(shape_metric("step_s", b, s), status="skipped", reason=skip)
    else:
        timing = {"timed_steps": sc["timed_steps"], "min_timed_s": sc["min_timed_s"]}
        with tempfile.TemporaryDirectory() as tmp:
            for i, (b, s) in enumerate(todo, 1):
                log.info("%s %d/%d (draw %d): %s at batch %d x seq %d (%d tokens per step), a fresh process",
                         args.stage, i, len(todo), args.draw, arm.name, b, s, b * s)
                log.info("shape %dx%d -> %s", b, s, point(args, ctx, b, s, timing, Path(tmp), log))
    for r in ctx.rows:
        log_row(log, r)
    write_rows(args.out, ctx.rows)


if __name__ == "__main__":
    main()
