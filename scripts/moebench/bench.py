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
from . import harness, inspect, routing
from .harness import Ctx, Progress
from .io import logger, read_json, write_json
from .metrics import log_row, write_rows


def run(ctx: Ctx, arm, cfg: dict, tier: dict, model_dir: str, data_path: str, log, bare_loop: bool,
        progress: Progress | None = None) -> None:
    arm.preimport()  # before transformers: Unsloth patches it at import
    import torch

    from . import energy, measure

    plan, cuda = tier["plan"], torch.cuda.is_available()
    lora = harness.lora_spec(cfg)
    torch.manual_seed(cfg["seed"] + ctx.draw)
    idle = None
    if cuda and cfg.get("idle_baseline_s"):  # before this process puts anything on the GPU
        idle = energy.idle_baseline(cfg["idle_baseline_s"], backend="auto")
        log.info("idle baseline over %.1f s: %s W", cfg["idle_baseline_s"], idle.mean_w)
    model = harness.load_model(ctx, arm, cfg, plan, model_dir, log, cuda)
    trainable = [p for p in model.parameters() if p.requires_grad]
    seq, bsz = plan["seq_len"], plan["batch"]
    steps_warm, steps_timed = plan["warmup_steps"], plan["timed_steps"]
    xs = harness.make_inputs(model_dir, data_path, plan, steps_warm + steps_timed, cfg["seed"] + ctx.draw, cuda)
    opt = torch.optim.AdamW(trainable, lr=2e-4)
    model.train()
    losses = []
    load, warm_s = warmup(model, opt, xs[:steps_warm], losses, log, progress)
    if warm_s:  # compile/autotune cost a user pays once per process: a first step can take minutes
        ctx.add("first_step_s", warm_s[0], "s")
    router_rows(ctx, load)
    if progress:
        progress.enter(f"{steps_timed} timed steps")
    timer = measure.StepTimer(cuda)
    meter = energy.EnergyMeter(backend="auto")
    with meter, energy.ZeusWindow() as zeus:
        for i in range(steps_warm, steps_warm + steps_timed):
            with timer:
                losses.append(harness.train_step(model, opt, xs[i]))
            log.info("timed step %d/%d: %.4f s", i - steps_warm + 1, steps_timed, timer.times[-1])
    s = measure.summary(timer.times)
    tokens = seq * bsz
    ctx.add("step_s", s["median"], "s", n=s["n"], spread=s["iqr"])
    ctx.add("tokens_per_s", tokens / s["median"], "tokens/s", n=s["n"])
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
    ctx.rows.extend(energy.energy_rows(meter.result, idle, tokens * steps_timed, **ctx.row_kwargs()))
    if cuda:  # Zeus over the same window: a second implementation to check ours against
        ctx.rows.extend(energy.zeus_rows(meter.result, zeus.result, tokens * steps_timed, **ctx.row_kwargs()))
    if meter.result.trace:
        energy.write_trace(Path(ctx.log_path).with_name("power.csv"), meter.result)
    cfg_model = model.config if hasattr(model, "config") else None
    if cfg_model is not None and routing.moe_shape(cfg_model)["experts"]:
        fm = measure.FlopModel.from_config(cfg_model, lora.r, lora.experts)
        flops = fm.step_flops(tokens, seq, recompute=bool(plan.get("gradient_checkpointing")))
        ctx.add("model_tflop_per_step", flops / 1e12, "TFLOP")
        if cuda:
            rate = measure.matmul_tflops()
            ctx.add("matmul_bf16_tflops", rate, "TFLOP/s")
            ctx.add("mfu_vs_measured_matmul", flops / s["median"] / 1e12 / rate, "fraction")
            if plan.get("datasheet_bf16_tflops"):
                ctx.add("mfu_vs_datasheet", flops / s["median"] / 1e12 / plan["datasheet_bf16_tflops"], "fraction")
    if bare_loop:
        bare = bare_loop_step_s(model, opt, xs[steps_warm:], cuda)
        ctx.add("bare_loop_step_s", bare, "s", n=len(xs) - steps_warm)
        ctx.add("harness_over_bare", s["median"] / bare, "ratio")


def warmup(model, opt, xs, losses: list, log, progress: Progress | None = None):
    """The untimed warm-up steps, counting which experts the routers pick (hooks stay out of the timed window).
    Returns the router load and each step's wall time (the first holds any compile/autotune)."""
    load = routing.RouterLoad.of(model)
    load.counting = True
    times = []
    for i, x in enumerate(xs):
        if progress:
            progress.enter(f"warm-up step {i + 1}/{len(xs)}")
        t = time.perf_counter()
        losses.append(harness.train_step(model, opt, x))
        float(losses[-1])  # waits for the step, so the time is the step's and not its launch's
        times.append(time.perf_counter() - t)
        log.info("warm-up step %d/%d: %.1f s", i + 1, len(xs), times[-1])
    load.remove()
    return load, times


def router_rows(ctx: Ctx, load: "routing.RouterLoad") -> None:
    """Expert load the arm really routed in its warm-up steps: the skew the comparison ran under."""
    overall = load.overall()
    if not overall:
        ctx.add("router_max_over_mean", status="unavailable",
                reason="no router module (mlp.router / mlp.gate) reported its top-k choice in this arm's forward")
        return
    ctx.add("router_max_over_mean", overall["max_over_mean"], "ratio", n=overall["layers"])
    ctx.add("router_max_over_mean_worst_layer", overall["max_over_mean_worst"], "ratio", n=overall["layers"])
    ctx.add("router_entropy_norm", overall["entropy_norm"], "fraction of log E", n=overall["layers"])
    ctx.add("router_unused_experts", overall["unused"], "count", n=overall["layers"])


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
    harness.guarded(ctx, log, lambda progress: run(ctx, arm, cfg, tier, a.model, a.data, log, bare, progress),
                    cfg["arm_timeout_s"], skip=skip)
    for r in ctx.rows:
        log_row(log, r)
    write_json(Path(a.out).parent / "env.json", {"arm": arm.name, "draw": a.draw, **harness.environment(started, tier)})
    write_rows(a.out, ctx.rows)  # last: its existence marks the draw complete


if __name__ == "__main__":
    main()
