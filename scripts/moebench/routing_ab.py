"""Raw against calibrated routers inside one process (issue 20): load one arm once, then alternate timed windows
with the raw and the calibrated router tensors swapped in place, so the process-to-process spread (20-30 %
between draws) does not swamp what the load changes.

The two router sets come from the model rule's model.routers.safetensors (`raw/<name>`, `saved/<name>`; see
router_calibration.save_routers). Every window replays the same token blocks, so the windows differ in their
routers only (the first Qwen3 A/B, sitting 5, fed each window new blocks, and the load moved with the data).
Before any timing, each set runs two untimed steps (what an arm compiles or autotunes per expert-load shape is
paid there), and the timed windows go A B B A (raw first), so a steady drift over the process (clocks, heat, a
cache still warming: Qwen3's unsloth_bf16 windows fell 0.64 -> 0.38 s over sitting 5's A B A B) weighs on both
sets alike. Each window warms up one step after its swap, then times `steps` LoRA training steps (CUDA events,
as the bench; sitting 6 timed with a synchronizing wall clock); its rows carry
the step time, peak memory and the load the routers really routed in that window. The learning rate is 0
throughout (every step does a training step's full work, AdamW included, but no weight moves): random-init
training skews the routing within a few steps, which would blur the two sets' loads into one. Console lines that
announce a fallback make the rows `degraded`, as in a bench draw.
"""
from __future__ import annotations

import argparse
import re
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

from . import arms as arm_registry
from . import config as cfgmod
from . import harness, measure, routing
from .grid import window_metric
from .harness import Ctx, Progress
from .io import logger, read_json, write_json
from .metrics import log_row, write_rows

SETS = {"raw": "raw", "calibrated": "saved"}  # row prefix -> key prefix in model.routers.safetensors


def router_sets(path: str) -> dict[str, dict[int, dict[str, object]]]:
    """{"raw"|"calibrated": {layer: {"weight"|"bias": tensor}}} from the routers file."""
    from safetensors.torch import load_file

    out: dict = {k: {} for k in SETS}
    for key, t in load_file(path).items():
        prefix, name = key.split("/", 1)
        m = re.search(r"layers\.(\d+)\..*\.(weight|bias)$", name)
        for label, p in SETS.items():
            if prefix == p and m:
                out[label].setdefault(int(m.group(1)), {})[m.group(2)] = t
    return out


def swap(model, routers: dict[int, dict]) -> int:
    """Copy one router set into the loaded model's routers in place (whatever wraps them: PEFT, Unsloth).
    Returns the number of tensors copied; a router the file lacks, a trainable one, or a model whose routers hold
    no tensor the file names (nothing would be swapped: both "sets" would time the same load) is an error."""
    import torch

    n = 0
    with torch.no_grad():
        for layer, mod in routing.routers(model):
            # recurse: Unsloth's GPT-OSS router keeps its tensors in a child (`router.linear.weight`) behind a
            # `weight` property, so the router module itself owns no parameter
            for name, p in mod.named_parameters():
                k = name.rsplit(".", 1)[-1]
                if k not in routers.get(layer, {}):
                    raise KeyError(f"routers file has no layer {layer} router {k}: was it written for this model?")
                if p.requires_grad:
                    raise ValueError(f"layer {layer} router {k} is trainable in this arm: swapping it would fight "
                                     "the optimizer")
                p.copy_(routers[layer][k].to(p.device, p.dtype))
                n += 1
    if n == 0:
        raise RuntimeError("no router tensor found to swap in this model: the A/B would compare a set with itself")
    return n


def identical(sets: dict) -> bool:
    import torch

    raw, cal = sets["raw"], sets["calibrated"]
    return raw.keys() == cal.keys() and all(torch.equal(raw[l][k], cal[l][k]) for l in raw for k in raw[l])


def window(model, opt, xs, load, cuda: bool) -> tuple[list[float], dict, dict]:
    """One warm-up step, then the timed steps: (step times, peak memory, tokens per expert per layer)."""
    import torch

    harness.train_step(model, opt, xs[0])
    before = load.counts()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    timer = measure.StepTimer(cuda)  # CUDA events, as the bench times its steps
    for x in xs[1:]:
        with timer:
            harness.train_step(model, opt, x)
    times = timer.times
    after = load.counts()
    counts = {l: [a - b for a, b in zip(c, before.get(l, [0] * len(c)))] for l, c in after.items()}
    return times, measure.memory_peak(cuda), counts


def load_rows(ctx: Ctx, name, counts: dict) -> None:
    """The load one window routed, averaged over layers (n = layers); `name(metric)` is the window's row name."""
    per = [routing.summary(c) for c in counts.values()]
    per = [s for s in per if s["max_over_mean"] is not None]
    if not per:
        ctx.add(name("router_max_over_mean"), status="unavailable",
                reason="no router reported its top-k choice in this window")
        return
    for k, unit in (("max_over_mean", "ratio"), ("entropy_norm", "fraction of log E"), ("unused", "count")):
        ctx.add(name(f"router_{k}"), sum(s[k] for s in per) / len(per), unit, n=len(per))


def run(ctx: Ctx, arm, cfg: dict, tier: dict, model_dir: str, routers_path: str, data_path: str, log,
        windows: int, steps: int, progress: Progress | None = None) -> None:
    arm.preimport()
    import torch

    sets = router_sets(routers_path)
    if identical(sets):
        raise arm_registry.ArmUnavailable("raw and calibrated routers are identical (router_load raw, or a "
                                          "from_pretrained model): nothing to compare")
    plan, cuda = tier["plan"], torch.cuda.is_available()
    torch.manual_seed(cfg["seed"])
    model = harness.load_model(ctx, arm, cfg, plan, model_dir, log, cuda)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    harness.freeze(opt)  # lr 0: each window routes its own set's load, not what earlier windows' training made it
    ctx.conditions["learning_rate"] = "0 (frozen: the full training step's work, no weight moves)"
    xs = harness.make_inputs(model_dir, data_path, plan, steps + 1, cfg["seed"], cuda)  # every window: these
    model.train()
    load = routing.RouterLoad.of(model)
    load.counting = True  # on throughout: switching a hook's flag would retrace a compiled layer
    for label in SETS:  # untimed: compile and autotune for both loads before any window is timed
        if progress:
            progress.enter(f"priming ({label} routers)")
        swap(model, sets[label])
        # two steps suffice: compile and autotune happen at the first; sitting 6's full-length priming left the
        # timed windows flat (first and last raw window within 0.3%), so more steps only spent GPU time
        window(model, opt, xs[:2], load, cuda)
    ctx.add("windows_same_blocks", 1, "flag")  # what aggregate's note says: the data is not a second variable
    times: dict = {label: [] for label in SETS}
    for w, label in enumerate(order(windows)):
        if progress:
            progress.enter(f"window {w + 1}/{windows} ({label} routers)")
        log.info("window %d/%d: %s routers (%d tensors swapped in)", w + 1, windows, label, swap(model, sets[label]))
        t, mem, counts = window(model, opt, xs, load, cuda)
        s = measure.summary(t)
        log.info("window %d/%d %s: median step %.4f s, %s", w + 1, windows, label, s["median"], mem)
        name = partial(window_metric, window=w + 1, routers=label)  # this window's row names
        ctx.add(name("step_s"), s["median"], "s", n=s["n"], spread=s["iqr"])
        for k, v in mem.items():
            ctx.add(name(k), v, "GB")
        load_rows(ctx, name, counts)
        times[label] += t
    load.remove()
    summary_rows(ctx, times)


def order(windows: int) -> list[str]:
    """A B B A A B B A ...: raw first; a linear drift over the windows then weighs on both sets alike."""
    raw, cal = SETS
    return [(raw, cal, cal, raw)[w % 4] for w in range(windows)]


def summary_rows(ctx: Ctx, times: dict) -> None:
    """Median step time per router set over all its windows, and calibrated over raw."""
    med = {label: measure.summary(t) for label, t in times.items() if t}
    for label, s in med.items():
        ctx.add(f"{label}_step_s", s["median"], "s", n=s["n"], spread=s["iqr"])
    if len(med) == 2:
        ctx.add("calibrated_over_raw_step_s", med["calibrated"]["median"] / med["raw"]["median"], "ratio",
                n=min(s["n"] for s in med.values()))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", required=True)
    ap.add_argument("--tier", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--routers", required=True, help="model.routers.safetensors")
    ap.add_argument("--data", required=True, help="train.jsonl")
    ap.add_argument("--arm", required=True)
    ap.add_argument("--windows", type=int, help="timed windows, alternating raw and calibrated (config routing_ab)")
    ap.add_argument("--steps", type=int, help="timed steps per window, after one warm-up step (config routing_ab)")
    ap.add_argument("--out", required=True, help="metrics.csv")
    ap.add_argument("--log", required=True)
    a = ap.parse_args(argv)
    log = logger("routing_ab", a.log)
    cfg, tier = cfgmod.load(a.config), read_json(a.tier)
    windows, steps = a.windows or cfg["routing_ab"]["windows"], a.steps or cfg["routing_ab"]["steps"]
    arm = arm_registry.get(a.arm)
    ctx = Ctx(cfg["run"], tier["tier"], cfg["model"]["name"], arm.name, arm.precision, None, a.log,
              stage="routing_ab")
    started = datetime.now(timezone.utc).isoformat()
    skip = harness.unavailable(arm, tier["plan"], tier.get("gpu") is not None, a.model)
    with harness.console_watch(cfg, arm.name) as console:  # third-party prints announce fallbacks
        harness.guarded(ctx, log, lambda progress: run(ctx, arm, cfg, tier, a.model, a.routers, a.data, log,
                                                       windows, steps, progress),
                        cfg["arm_timeout_s"], skip=skip, metric="calibrated_over_raw_step_s", stage="routing_ab")
    harness.mark_degraded(ctx, harness.console_reason(console.matches()), log)
    for r in ctx.rows:
        log_row(log, r)
    write_json(Path(a.out).parent / "env.json", {"arm": arm.name, **harness.environment(started, tier),
                                                 "conditions": ctx.conditions})
    write_rows(a.out, ctx.rows)


if __name__ == "__main__":
    main()
