"""One benchmark draw of one arm, in its own process: load, warm up, time the LoRA training step.

Writes metrics.csv (tidy rows), env.json and run.log into the draw's directory. An arm that cannot run here
gives `skipped` rows; one that crashes or runs out of memory gives `failed` rows: the workflow goes on.
"""
from __future__ import annotations

import argparse
import time
from datetime import datetime, timezone
from pathlib import Path

from . import arms as arm_registry
from . import config as cfgmod
from . import energy, harness, inspect, measure, routing
from .harness import Ctx, Progress
from .io import logger, read_json, write_json
from .metrics import log_row, write_rows


def run(ctx: Ctx, arm, cfg: dict, tier: dict, model_dir: str, data_path: str, log, bare_loop: bool,
        progress: Progress | None = None) -> None:
    backend = "nvml" if tier.get("gpu") else "rapl"  # chosen from the tier: asking torch would start CUDA
    idle = idle_before_cuda(cfg, tier, log)  # before the arm's imports: Unsloth starts CUDA at import
    arm.preimport()  # before transformers: Unsloth patches it at import
    import torch

    plan, cuda = tier["plan"], torch.cuda.is_available()
    lora = harness.lora_spec(cfg)
    torch.manual_seed(cfg["seed"] + ctx.draw)
    model = harness.load_model(ctx, arm, cfg, plan, model_dir, log, cuda)
    trainable = [p for p in model.parameters() if p.requires_grad]
    seq, bsz = plan["seq_len"], plan["batch"]
    warm, window = measure.WarmupPolicy.from_plan(plan), measure.WindowPolicy.from_plan(plan, arm.name)
    xs = harness.make_inputs(model_dir, data_path, plan, warm.max_steps + window.steps, cfg["seed"] + ctx.draw, cuda)
    opt = torch.optim.AdamW(trainable, lr=2e-4)
    ctx.conditions["optimizer"] = f"{type(opt).__module__}.{type(opt).__qualname__}"
    model.train()
    losses = []
    # counting stays on from the first step to the last: switching a hook's flag would retrace a compiled layer
    load = routing.RouterLoad.of(model)
    load.counting = True
    first_load: dict = {}  # the first step's router tallies: the routing the saved model gives this token stream
    frozen_all = bool(plan.get("frozen_warmup"))  # lr 0 from the first step: the model's routing holds throughout
    if frozen_all:
        harness.freeze(opt)
    ctx.add("frozen_warmup", float(frozen_all), "flag")
    warm_s = warmup(model, opt, xs[:warm.max_steps], losses, log, warm, cuda, progress,
                    after_first=lambda: first_load.update(load.snapshot()))
    if warm_s:  # compile/autotune cost a user pays once per process: a first step can take minutes
        ctx.add("first_step_s", warm_s[0], "s")
    ctx.add("warmup_steps_used", len(warm_s), "steps", reason=warm.outcome(warm_s)[1])
    frozen = frozen_all or bool(plan.get("frozen_timed"))
    if frozen:
        harness.freeze(opt)
    ctx.add("frozen_timed", float(frozen), "flag")
    timed_xs = xs[warm.max_steps:]
    times, window_s, meter, zeus = timed_window(model, opt, timed_xs, losses, load, window, backend, cuda, log,
                                                progress)
    n, tokens = len(times), seq * bsz
    s = measure.summary(times)
    ctx.add("step_s", s["median"], "s", n=s["n"], spread=s["iqr"])
    ctx.add("tokens_per_s", tokens / s["median"], "tokens/s", n=s["n"])
    # J/token's partner: tokens over the whole window that the joules were counted over
    ctx.add("tokens_per_s_mean_window", tokens * n / window_s, "tokens/s", n=n)
    ctx.add("timed_window_s", window_s, "s", n=n, reason=window.shortfall(n, window_s, meter.samples))
    capped = window.max_steps and n >= window.max_steps
    ctx.add("timed_steps_used", n, "steps", reason=f"capped by max_timed_steps={window.max_steps}" if capped else "")
    measure.write_steps(Path(ctx.log_path).with_name("steps.csv"), times, tokens)
    q = max(1, n // 4)  # a step time that drifts (routing moving as the LoRA trains) shows here
    first, last = measure.summary(times[:q])["median"], measure.summary(times[-q:])["median"]
    ctx.add("step_s_last_over_first_quarter", last / first, "ratio", n=q)
    router_rows(ctx, load, first_load)
    for k, v in measure.memory_peak(cuda).items():
        ctx.add(k, v, "GB")
    loss_vals = [float(v) for v in losses]
    log.info("losses: %s", [round(v, 4) for v in loss_vals])
    ctx.add("loss_first", loss_vals[0], "nats")
    ctx.add("loss_last", loss_vals[-1], "nats")
    check = inspect.expert_lora_check(model)
    log.info("expert LoRA check: %s", check)
    for k, v in check.items():
        ctx.add(k, v, "count" if not k.endswith("params") else "params")
    ctx.rows.extend(energy.energy_rows(meter.result, idle, tokens * n, **ctx.row_kwargs()))
    if cuda:  # Zeus over the same window: a second implementation to check ours against
        ctx.rows.extend(energy.zeus_rows(meter.result, zeus.result, tokens * n, **ctx.row_kwargs()))
    if meter.result.trace:
        energy.write_trace(Path(ctx.log_path).with_name("power.csv"), meter.result)
    flop_rows(ctx, model, lora, plan, arm, s["median"], cuda)
    if bare_loop:
        bare_xs = timed_xs[:window.steps]
        bare = bare_loop_step_s(model, opt, bare_xs, cuda)
        ctx.add("bare_loop_step_s", bare, "s", n=len(bare_xs))
        ctx.add("harness_over_bare", s["median"] / bare, "ratio")
    load.remove()


def idle_before_cuda(cfg: dict, tier: dict, log):
    """The GPU's idle power, read through NVML alone before this process creates a CUDA context (a context
    alone draws tens of watts, and the Unsloth arms create theirs at import) and after power has settled."""
    if not (tier.get("gpu") and cfg.get("idle_baseline_s")):
        return None
    idle = energy.idle_baseline(cfg["idle_baseline_s"], backend="nvml", settle_tol=cfg["idle_settle_tol"],
                                settle_max_s=cfg["idle_settle_max_s"])
    log.info("idle baseline over %.1f s after %s s settling: %s W %s", cfg["idle_baseline_s"], idle.settle_s,
             idle.mean_w, idle.settle_note or idle.reason)
    return idle


def timed_window(model, opt, xs, losses: list, load, policy, backend: str, cuda: bool, log,
                 progress: Progress | None = None):
    """Timed steps (CUDA events) under one energy meter until `policy` is satisfied, cycling through `xs`; the
    router load is marked after each step, on the device. Returns (step times, window seconds, meter, zeus)."""
    if progress:
        progress.enter(f"{policy.steps} timed steps" + (f" and {policy.min_s:g} s" if policy.min_s else ""))
    timer = measure.StepTimer(cuda)
    meter = energy.EnergyMeter(backend=backend)
    with meter, energy.ZeusWindow() as zeus:
        load.mark()
        t0 = time.perf_counter()
        while not policy.done(len(timer.times), time.perf_counter() - t0, meter.samples):
            with timer:
                losses.append(harness.train_step(model, opt, xs[len(timer.times) % len(xs)]))
            load.mark()
            log.info("timed step %d: %.4f s", len(timer.times), timer.times[-1])
        wall = time.perf_counter() - t0
    # the joules' own window where they were counted, so J/token and mean tokens/s share one denominator
    window_s = meter.result.seconds if meter.result.status == "measured" else wall
    return timer.times, window_s, meter, zeus


# Utilization is against the bf16 peak for every arm; where an arm's matmuls run at another rate, its rows say so.
PEAK_NOTES = {"bf16": "", "nf4": "nf4 arm: FLOPs against the bf16 peak (its matmuls run on dequantized bf16)",
              "fp8": "fp8 arm: FLOPs against the bf16 peak (fp8 matmuls can run at up to twice that rate)"}


def flop_rows(ctx: Ctx, model, lora, plan: dict, arm, step_s: float, cuda: bool) -> None:
    """Model and hardware FLOPs per step; on a GPU, MFU (no recompute) and HFU (with checkpointing's
    recompute) against the measured bf16 matmul rate and the datasheet's. A 4-bit arm counts the same FLOPs
    at the bf16 rate (its matmuls run on dequantized bf16), and its rows say so."""
    cfg_model = getattr(model, "config", None)
    if cfg_model is None or not routing.moe_shape(cfg_model)["experts"]:
        return
    fm = measure.FlopModel.from_config(cfg_model, lora.r, lora.experts)
    seq, tokens = plan["seq_len"], plan["seq_len"] * plan["batch"]
    model_flops = fm.step_flops(tokens, seq, recompute=False)
    hw_flops = fm.step_flops(tokens, seq, recompute=measure.recomputes(plan))
    ctx.add("model_tflop_per_step", model_flops / 1e12, "TFLOP")
    ctx.add("hardware_tflop_per_step", hw_flops / 1e12, "TFLOP")
    if not cuda:
        return
    rate = measure.matmul_tflops()
    ctx.add("matmul_bf16_tflops", rate, "TFLOP/s")
    note = PEAK_NOTES.get(arm.precision, f"{arm.precision} arm: FLOPs against the bf16 peak")
    for name, peak in (("measured_matmul", rate), ("datasheet", plan.get("datasheet_bf16_tflops"))):
        if peak:
            u = measure.utilization(model_flops, hw_flops, step_s, peak)
            ctx.add(f"mfu_vs_{name}", u["mfu"], "fraction of bf16 peak", reason=note)
            ctx.add(f"hfu_vs_{name}", u["hfu"], "fraction of bf16 peak", reason=note)


def warmup(model, opt, xs, losses: list, log, policy, cuda: bool, progress: Progress | None = None,
           after_first=None) -> list[float]:
    """Untimed warm-up steps until the step time is steady (`policy`: at least its minimum, at most its cap).
    Returns each step's time, on the timed steps' clock (the first holds any compile/autotune). `after_first`
    is called once after the first step (the router load before any LoRA update moved the routing)."""
    timer = measure.StepTimer(cuda)
    while policy.more(timer.times):
        i = len(timer.times)
        if progress:
            progress.enter(f"warm-up step {i + 1} (of {policy.min_steps} to {policy.max_steps})")
        with timer:
            losses.append(harness.train_step(model, opt, xs[i]))
        if i == 0 and after_first:
            after_first()
        log.info("warm-up step %d: %.3f s", i + 1, timer.times[-1])
    return timer.times


def router_rows(ctx: Ctx, load: "routing.RouterLoad", first: dict | None = None) -> None:
    """Expert load the arm really routed over its timed window (the skew the comparison ran under), how far it
    moved between the window's first and last quarter (routing drifts as the LoRA trains), and the load of the
    first warm-up step, before any update: set beside the model's calibrated held-out load, it tells drift from
    a token stream the calibration did not see."""
    overall = load.overall(load.window())
    if not overall:
        ctx.add("router_max_over_mean", status="unavailable",
                reason="no router module (mlp.router / mlp.gate) reported its top-k choice in this arm's forward")
        return
    at_first = load.overall(load.read(first)) if first else {}
    if at_first:
        ctx.add("router_max_over_mean_first_step", at_first["max_over_mean"], "ratio", n=at_first["layers"],
                reason="first warm-up step, before any LoRA update (its checkpoint recompute counted twice alike)")
        ctx.add("router_unused_experts_first_step", at_first["unused"], "count", n=at_first["layers"])
    ctx.add("router_max_over_mean", overall["max_over_mean"], "ratio", n=overall["layers"])
    ctx.add("router_max_over_mean_worst_layer", overall["max_over_mean_worst"], "ratio", n=overall["layers"])
    ctx.add("router_entropy_norm", overall["entropy_norm"], "fraction of log E", n=overall["layers"])
    ctx.add("router_unused_experts", overall["unused"], "count", n=overall["layers"])
    drift = load.drift()
    if not drift:
        ctx.add("router_drift_tv", status="unavailable", reason="fewer than two timed steps: no quarters to compare")
        return
    q = drift["quarter_steps"]
    ctx.add("router_drift_tv", drift["tv"], "fraction", n=q)  # first vs last quarter of the timed steps
    ctx.add("router_max_over_mean_first_quarter", drift["max_over_mean_first"], "ratio", n=q)
    ctx.add("router_max_over_mean_last_quarter", drift["max_over_mean_last"], "ratio", n=q)


def bare_loop_step_s(model, opt, xs, cuda: bool) -> float:
    """The same steps with no per-step instrumentation: one sync, one clock around the whole loop."""
    import torch

    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for x in xs:
        harness.train_step(model, opt, x)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / len(xs)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--tier", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="train.jsonl")
    ap.add_argument("--arm", required=True)
    ap.add_argument("--draw", type=int, required=True)
    ap.add_argument("--out", required=True, help="metrics.csv of this draw")
    ap.add_argument("--log", required=True)
    a = ap.parse_args(argv)
    log = logger("bench", a.log)
    cfg, tier = cfgmod.load(a.config), read_json(a.tier)
    arm = arm_registry.get(a.arm)
    ctx = Ctx(cfg["run"], tier["tier"], cfg["model"]["name"], arm.name, arm.precision, a.draw, a.log)
    started = datetime.now(timezone.utc).isoformat()
    skip = harness.unavailable(arm, tier["plan"], tier.get("gpu") is not None, a.model)
    bare = a.arm in cfg["bare_loop_arms"]
    # another process on the GPU (a previous draw still exiting, a neighbour) skews time, memory and energy
    shared = harness.isolate(ctx, cfg["isolation_wait_s"], log) if not skip and tier.get("gpu") else None
    with harness.console_watch(cfg, arm.name) as console:  # third-party prints announce fallbacks
        harness.guarded(ctx, log, lambda progress: run(ctx, arm, cfg, tier, a.model, a.data, log, bare, progress),
                        cfg["arm_timeout_s"], skip=skip)
    harness.spread_rows(ctx, cfg["spread_limit"], log)
    ctx.conditions["compile"] = inspect.compiled()
    harness.mark_degraded(ctx, "; ".join(filter(None, [harness.console_reason(console.matches()), shared])) or None,
                          log)
    for r in ctx.rows:
        log_row(log, r)
    write_json(Path(a.out).parent / "env.json", {"arm": arm.name, "draw": a.draw, **harness.environment(started, tier),
                                                 "conditions": ctx.conditions})
    if not any(r.metric == "timed_steps_used" for r in ctx.rows):  # timed nothing: a header-only steps.csv
        measure.write_steps(Path(a.out).with_name("steps.csv"), [], 0)
    write_rows(a.out, ctx.rows)  # last: its existence marks the draw complete


if __name__ == "__main__":
    main()
