"""Capacity sweeps: the longest sequence each arm trains at batch 1 (`--kind seq`, 1k-64k) and the largest batch
at the tier's sequence length (`--kind batch`), so a failing probe costs seconds, not a model load.

1. The ladder: ONE process loads the arm once and trains a few steps at increasing sizes (doubling) up to the
   first out-of-memory, which is a recorded result (a failed row "OOM ..."), not a crash; `refine` bisects
   between the last fit and that OOM in the same process. Then, under each memory cap (config offload.caps_gb,
   via torch.cuda.set_per_process_memory_fraction) that changes the answer, i.e. one below the peak of the largest
   uncapped fit, the same climb again. A cap that cannot change it is a `skipped` row saying why.
2. The boundary, confirmed in fresh processes (one `moebench.bench` draw each, as the benchmark measures): the
   largest in-process fit must fit fresh (else the next smaller size is tried), and the first OOM must OOM fresh
   (else the fresh process's fit stands and the next size up is tried). A fragmented allocator in the ladder can
   make it pessimistic; a fresh draw also gives the boundary setting its second draw for the recipe.

Rows carry their shape in the metric name (grid.shape_metric): `tokens_per_s@1x8192`, `peak_reserved_gb@1x8192`,
`loss_first@1x8192`, ...; `@cap24` under a cap. A ladder probe repeats one batch, so its loss falls if the
setting trains (the recipe's smallest-that-trains test). The ladder's rows are draw 0, fresh confirmations draw 1. The
answer is `max_seq_len` / `max_batch` (and `max_seq_len@cap24`, ...). Without a GPU every sweep is `skipped`.
The ladders' limits, refinement, steps and time limit are config `capacity`.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path
from typing import Callable

from . import arms as arm_registry
from . import config as cfgmod
from . import harness, probe
from .grid import parse_shape_metric, shape_metric
from .io import logger, read_json, run_bounded
from .metrics import Row, log_row, read_rows, write_rows

GIB = 2**30
# A probe answers: "measured" (trained), "oom", or "failed: <reason>" (anything else: stop, say why).
Probe = Callable[[int], str]
KEEP = ("tokens_per_s", "step_s", "peak_reserved_gb", "peak_alloc_gb", "peak_rss_gb", "loss_first", "loss_last",
        "j_per_token", "j_per_token_net")


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


def settings(cfg: dict) -> dict:
    """The ladders' settings (config `capacity`; the schema fills its defaults)."""
    return {"seq_min": 1024, "seq_max": 65536, "batch_max": 64, "refine": 0, "steps": 3, **(cfg.get("capacity") or {})}


def limits(kind: str, sw: dict) -> tuple[int, int, int]:
    """(smallest, largest, quantum) of the ladder: sequence 1k-64k at batch 1, or batch 1..batch_max."""
    if kind == "seq":
        return sw.get("seq_min", 1024), sw.get("seq_max", 65536), 1024
    return 1, sw.get("batch_max", 64), 1


def shape(kind: str, v: int, plan: dict) -> tuple[int, int]:
    """(batch, seq) of ladder value v."""
    return (1, v) if kind == "seq" else (v, plan["seq_len"])


def confirm(fresh: Probe, ok: int | None, bad: int | None, lo: int, hi: int, tries: int = 2) -> tuple[int | None, list]:
    """The boundary in fresh processes. Returns (confirmed largest fit or None, [(value, fresh outcome)...])."""
    seen = []
    if ok is not None:
        v = ok
        for _ in range(tries):  # the in-process fit must fit fresh; else step down
            out = fresh(v)
            seen.append((v, out))
            if out == "measured":
                break
            bad = None  # a fresh failure above the fit already marks the boundary
            v //= 2
            if v < lo:
                return None, seen
        else:
            return None, seen
        ok = v
    if bad is not None and (ok is None or bad > ok):
        v = bad
        for _ in range(tries):  # the first OOM must OOM fresh; else the fresh fit stands and we step up
            out = fresh(v)
            seen.append((v, out))
            if out != "measured":
                break
            ok, v = v, v * 2
            if v > hi:
                break
    return ok, seen


# ---------------------------------------------------------------- the ladder process
class InProcess:
    """One probe of the ladder: a few training steps at one size on the already loaded model."""

    def __init__(self, ctx, model, opt, kind, plan, tok, data, steps, cuda, log, cap=None):
        self.ctx, self.model, self.opt, self.kind, self.plan = ctx, model, opt, kind, plan
        self.tok, self.data, self.steps, self.cuda, self.log, self.cap = tok, data, steps, cuda, log, cap

    def __call__(self, v: int) -> str:
        import torch

        from . import measure

        b, s = shape(self.kind, v, self.plan)
        name = lambda m: shape_metric(m, b, s, self.cap)  # noqa: E731
        reason, oom, losses = None, False, []
        timer = measure.StepTimer(self.cuda)
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            # one batch, repeated: the same routing in every step, and a loss that must fall if the setting trains
            x = next(harness.batches(self.data, self.tok, s, b, 1, 0)).to("cuda" if self.cuda else "cpu")
            for i in range(self.steps):
                if i == 0:  # warm-up: kernels for a new shape
                    losses.append(float(harness.train_step(self.model, self.opt, x)))
                    continue
                with timer:
                    loss = harness.train_step(self.model, self.opt, x)
                losses.append(float(loss))
        except Exception as exc:  # noqa: BLE001 - an OOM here is the answer, not a crash
            reason, oom = harness.failure_reason(exc), harness.is_oom(exc)
        self.opt.zero_grad(set_to_none=True)
        if reason:  # the exception (and the activations it holds) is gone: give the memory back before going on
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
            self.ctx.add(name("step_s"), status="failed", reason=reason)
            self.log.info("probe %dx%d%s: %s", b, s, f" cap {self.cap:g} GiB" if self.cap else "", reason)
            return "oom" if oom else f"failed: {reason}"
        sm = measure.summary(timer.times)
        self.ctx.add(name("step_s"), sm["median"], "s", n=sm["n"], spread=sm["iqr"])
        self.ctx.add(name("tokens_per_s"), b * s / sm["median"], "tokens/s", n=sm["n"])
        for k, val in measure.memory_peak(self.cuda).items():
            self.ctx.add(name(k), val, "GB")
        self.ctx.add(name("loss_first"), losses[0], "nats")
        self.ctx.add(name("loss_last"), losses[-1], "nats")
        self.log.info("probe %dx%d: %.0f tokens/s, losses %s", b, s, b * s / sm["median"], [round(x, 3) for x in losses])
        return "measured"


def ladder(ctx, arm, cfg: dict, tier: dict, kind: str, model_dir: str, data: str, log, progress=None) -> None:
    """Load once, climb uncapped, then climb again under each cap that changes the answer."""
    arm.preimport()
    import torch
    from transformers import AutoTokenizer

    cuda = torch.cuda.is_available()
    plan = tier["plan"]
    sw = settings(cfg)
    lo, hi, quantum = limits(kind, sw)
    load_plan = {**plan, "seq_len": hi if kind == "seq" else plan["seq_len"]}  # Unsloth's max_seq_length
    model = harness.load_model(ctx, arm, cfg, load_plan, model_dir, log, cuda)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    tok = AutoTokenizer.from_pretrained(model_dir)
    steps = sw["steps"]
    probe = InProcess(ctx, model, opt, kind, plan, tok, data, steps, cuda, log)
    if progress:
        progress.enter(f"{kind} ladder, uncapped")
    ok, bad, tried = search(probe, lo, hi, sw["refine"], quantum)
    log.info("uncapped ladder: %s", tried)
    if not cuda:
        return
    total = torch.cuda.get_device_properties(0).total_memory
    peak = _peak_at(ctx.rows, kind, ok, plan)
    for cap in sorted(cfg.get("offload", {}).get("caps_gb", []), reverse=True):
        why = cap_reason(cap, total, peak)
        metric = f"{'max_seq_len' if kind == 'seq' else 'max_batch'}@cap{cap:g}"
        if why:
            ctx.add(metric, status="skipped", reason=why)
            continue
        if progress:
            progress.enter(f"{kind} ladder under a {cap:g} GiB cap")
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * GIB / total), 0)
        probe.cap = cap
        c_ok, c_bad, c_tried = search(probe, lo, hi, sw["refine"], quantum)
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
        log.info("ladder under %g GiB: %s", cap, c_tried)
        if c_ok is None:
            loaded = next((r.value for r in ctx.rows if r.metric == "reserved_after_load_gb"), None)
            held = f"; the loaded model alone held {loaded:.1f} GB" if isinstance(loaded, float) else ""
            ctx.add(metric, status="failed",
                    reason=f"smallest probe {lo} did not fit under {cap:g} GiB ({c_tried[-1][1]}){held}")
        else:
            ctx.add(metric, c_ok, "tokens" if kind == "seq" else "sequences", n=len(c_tried),
                    reason=f"in-process ladder under the cap; next probe {c_bad}: {c_tried[-1][1]}" if c_bad else
                    "largest probe fitted under the cap (search limit)")


def cap_reason(cap: float, total_bytes: int, peak_gb: float | None) -> str | None:
    """Why a cap needs no ladder of its own (None: it may change the answer)."""
    if cap * GIB > total_bytes * 1.03:
        return f"cap {cap:g} GiB is above this card ({total_bytes / GIB:.1f} GiB)"
    if peak_gb is not None and peak_gb * 1e9 <= cap * GIB:
        return (f"cap {cap:g} GiB cannot change the answer: the largest uncapped fit peaked at "
                f"{peak_gb * 1e9 / GIB:.1f} GiB reserved")
    return None


def _peak_at(rows: list[Row], kind: str, v: int | None, plan: dict) -> float | None:
    if v is None:
        return None
    b, s = shape(kind, v, plan)
    return next((r.value for r in rows if r.metric == shape_metric("peak_reserved_gb", b, s)), None)


# ---------------------------------------------------------------- fresh-process confirmation
def bench_probe(args, plan_change: dict, workdir: Path, log) -> tuple[str, list[Row]]:
    """One fresh bench process with the plan changed, as a memory probe: (outcome, its rows)."""
    tag = "_".join(f"{k}{v}" for k, v in plan_change.items())
    plog = Path(args.log).with_name(f"probe_{args.kind}_{tag}") / "run.log"  # its steps.csv/power.csv beside it
    return probe.bench_probe(args, plan_change, workdir, plog, log)


def relabel(rows: list[Row], batch: int, seq: int, source: str) -> list[Row]:
    """A fresh probe's rows as sweep rows of its shape (draw 1: the second process at that setting)."""
    return probe.relabel(rows, batch, seq, source, "sweep", KEEP)


def ladder_outcomes(rows: list[Row], kind: str) -> tuple[int | None, int | None, list]:
    """(largest fit, first failure, [(value, outcome)]) of the uncapped ladder, read back from its rows."""
    seen = {}
    for r in rows:
        p = parse_shape_metric(r.metric)
        if not p or p[3] is not None:
            continue
        v = p[2] if kind == "seq" else p[1]
        if p[0] == "tokens_per_s" and r.status in ("measured", "degraded"):  # it fitted, on whatever path
            seen[v] = "measured"
        elif p[0] == "step_s" and r.status == "failed":
            seen[v] = "oom" if r.reason.startswith("OOM") else f"failed: {r.reason}"
    fits = [v for v, o in seen.items() if o == "measured"]
    bads = [v for v, o in seen.items() if o != "measured" and (not fits or v > max(fits))]
    return (max(fits) if fits else None), (min(bads) if bads else None), sorted(seen.items())


def run_ladder(ctx, arm, cfg: dict, tier: dict, args, skip: str | None, metric: str, log) -> None:
    """The ladder under the time limit, its console watched as bench's is: a ladder that printed one of the
    arm's fallback lines (config degraded_patterns) has its measured rows `degraded`, as a bench draw would."""
    with harness.console_watch(cfg, arm.name) as console:
        harness.guarded(ctx, log, lambda progress: ladder(ctx, arm, cfg, tier, args.kind, args.model, args.data, log,
                                                          progress),
                        ladder_timeout(cfg), skip=skip, metric=metric, phase=f"{args.kind} ladder")
    harness.mark_degraded(ctx, harness.console_reason(console.matches()), log)


def run_ladder_process(args, log) -> list[Row]:
    csv = Path(args.log).with_name(f"{args.kind}_ladder.csv")
    cmd = [sys.executable, "-m", "moebench.sweep", "--ladder", *[x for k in ("config", "tier", "model", "data", "arm",
           "kind") for x in (f"--{k}", getattr(args, k))], "--out", str(csv),
           "--log", str(Path(args.log).with_name(f"{args.kind}_ladder.log"))]
    cfg = cfgmod.load(args.config)
    code, text = run_bounded(cmd, ladder_timeout(cfg) + 120)
    if not csv.exists():
        log.error("ladder process wrote nothing (exit %s): %s", code, text[-2000:])
        return []
    return read_rows(csv)


def ladder_timeout(cfg: dict) -> int:
    return int(settings(cfg).get("timeout_s") or 2 * cfg["arm_timeout_s"])


def answer(ctx, kind: str, sw: dict, ladder_rows: list[Row], fresh: Probe, log) -> None:
    lo, hi, _ = limits(kind, sw)
    metric = "max_seq_len" if kind == "seq" else "max_batch"
    unit = "tokens" if kind == "seq" else "sequences"
    ok, bad, tried = ladder_outcomes(ladder_rows, kind)
    if ok is None and bad is None:  # the ladder itself failed (load, timeout) and said so in its rows, or wrote none
        if not any(r.metric == metric for r in ladder_rows):
            ctx.add(metric, status="failed", reason="the ladder process wrote no result (see its log)")
        return
    final, seen = confirm(fresh, ok, bad, lo, hi)
    log.info("ladder %s; fresh processes %s", tried, seen)
    stopped = next((r.reason for r in ladder_rows if r.metric == metric and r.status == "failed"), None)
    first = (f"first failure {bad} ({dict(tried)[bad]})" if bad else f"the ladder stopped early ({stopped})" if stopped
             else f"no failure up to the search limit {hi}")
    text = f"in-process ladder: fit {ok}, {first}; fresh processes: " + ", ".join(f"{v} {o}" for v, o in seen)
    if final is None:
        ctx.add(metric, status="failed", reason=f"nothing fitted in a fresh process; {text}")
    else:
        ctx.add(metric, final, unit, n=len(tried) + len(seen), reason=text)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    for a in ("--config", "--tier", "--model", "--data", "--arm", "--out", "--log"):
        ap.add_argument(a, required=True)
    ap.add_argument("--kind", choices=["seq", "batch"], required=True)
    ap.add_argument("--ladder", action="store_true", help="(internal) the one-process ladder")
    args = ap.parse_args(argv)
    log = logger("sweep", args.log)
    cfg, tier = cfgmod.load(args.config), read_json(args.tier)
    arm = arm_registry.get(args.arm)
    ctx = harness.Ctx(cfg["run"], tier["tier"], cfg["model"]["name"], arm.name, arm.precision,
                      0 if args.ladder else None, args.log, stage="sweep")
    metric = "max_seq_len" if args.kind == "seq" else "max_batch"
    skip = ("capacity sweeps find GPU memory limits: no GPU on this host (CPU tier)" if tier.get("gpu") is None
            else harness.unavailable(arm, tier["plan"], True, args.model))
    if args.ladder:
        run_ladder(ctx, arm, cfg, tier, args, skip, metric, log)
    elif skip:
        log.info("skipped: %s", skip)
        ctx.add(metric, status="skipped", reason=skip)
    else:
        rows = run_ladder_process(args, log)
        ctx.rows.extend(rows)
        with tempfile.TemporaryDirectory() as tmp:
            def fresh(v: int) -> str:
                b, s = shape(args.kind, v, tier["plan"])
                out, probe_rows = bench_probe(args, {"batch": b, "seq_len": s}, Path(tmp), log)
                ctx.rows.extend(relabel(probe_rows, b, s, args.log))
                return out

            answer(ctx, args.kind, settings(cfg), rows, fresh, log)
    for r in ctx.rows:
        if r.source == args.log:  # the ladder's rows are in the ladder's log
            log_row(log, r)
    write_rows(args.out, ctx.rows)


if __name__ == "__main__":
    main()
