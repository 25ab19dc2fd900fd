"""What memory costs in time: memory caps ("does it fit on my card?"), expert offload, checkpointing modes.

Memory caps. `torch.cuda.set_per_process_memory_fraction` limits what PyTorch's caching allocator may hold, so a
run under a 24 GiB cap on an 80 GiB card OOMs where a 24 GiB card would. Caps are GiB, the unit cards are sold
in; the CUDA context and non-PyTorch allocations sit outside the cap, so a fit under a cap is slightly
optimistic. A cap above the card is a `skipped` row ("card has only X GiB"); a cap within `CAP_TOLERANCE` above
it (80 on an H100 with 79.2 GiB usable) is run as the whole card and the rows say so.

Expert offload: `ExpertOffloader` (moebench/expert_offload.py, which describes how it works and its limits)
keeps frozen expert weights in pinned host memory and streams them to the GPU one decoder layer at a time; pair it
with checkpointing "plain".

Checkpointing modes: "none", "plain" (HF non-reentrant checkpointing, applied here) and "unsloth" (Unsloth's
offloaded-activation checkpointing, applied by the Unsloth arm at load time through
`FastLanguageModel.get_peft_model(..., use_gradient_checkpointing="unsloth")`, not here).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from .expert_offload import (ExpertOffloader, _checkpoint_saves, _Ref,  # noqa: F401 (offload.X as before)
                             find_expert_params, find_layers)
from .harness import is_oom
from .metrics import Row

GIB = 2**30
DEFAULT_CAPS_GB = (24, 40, 48, 80)
CAP_TOLERANCE = 0.03  # a cap at most 3% above the card runs as the whole card (sold "80 GB" vs 79.2 GiB usable)


# ---------------------------------------------------------------- memory caps
class CapTooLarge(ValueError):
    """The cap asks for more memory than the card has."""


def caps_from_config(config: dict | None) -> list[float]:
    caps = ((config or {}).get("offload") or {}).get("caps_gb", DEFAULT_CAPS_GB)
    return sorted(float(c) for c in caps)


def cap_fraction(cap_gb: float, total_bytes: int, tolerance: float = CAP_TOLERANCE) -> float:
    """Fraction of the card for `set_per_process_memory_fraction` that gives `cap_gb` GiB."""
    if cap_gb <= 0:
        raise ValueError(f"cap must be positive, got {cap_gb} GiB")
    if total_bytes <= 0:
        raise ValueError(f"card size must be positive, got {total_bytes} bytes")
    frac = cap_gb * GIB / total_bytes
    if frac > 1 + tolerance:
        raise CapTooLarge(f"cap {cap_gb:g} GiB is above this card: card has only {total_bytes / GIB:.1f} GiB")
    return min(frac, 1.0)


def apply_cap(cap_gb: float, device: int = 0, cuda=None) -> float:
    """Cap this process's allocator on `device`; returns the fraction used. Raises CapTooLarge."""
    cuda = cuda or _torch_cuda()
    frac = cap_fraction(cap_gb, cuda.get_device_properties(device).total_memory)
    cuda.set_per_process_memory_fraction(frac, device)
    return frac


def _torch_cuda():
    import torch

    return torch.cuda


@dataclass
class Attempt:
    """The outcome of one training run under one cap: fits / oom / error / skipped."""

    cap_gb: float
    outcome: str
    tokens_per_s: float | None = None
    peak_alloc_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    reason: str = ""  # why it did not fit / was skipped, or a note on a fitting run
    variant: str = ""  # e.g. "offload=experts,ckpt=plain"

    OUTCOMES = ("fits", "oom", "error", "skipped")

    def __post_init__(self):
        if self.outcome not in self.OUTCOMES:
            raise ValueError(f"outcome {self.outcome!r} is not one of {self.OUTCOMES}")


def try_at_cap(cap_gb: float, run: Callable[[], float], device: int = 0, variant: str = "", cuda=None) -> Attempt:
    """Run `run()` (returns tokens/s of the timed window) under the cap; an OOM is an outcome, not a crash.
    The cap is lifted afterwards so the next attempt starts clean."""
    cuda = cuda or _torch_cuda()
    total = cuda.get_device_properties(device).total_memory
    try:
        frac = cap_fraction(cap_gb, total)
    except CapTooLarge as e:
        return Attempt(cap_gb, "skipped", reason=str(e).split(": ", 1)[1], variant=variant)
    note = f"cap {cap_gb:g} GiB run as the whole card ({total / GIB:.1f} GiB)" if frac == 1.0 else ""
    cuda.empty_cache()
    cuda.reset_peak_memory_stats(device)
    cuda.set_per_process_memory_fraction(frac, device)
    try:
        tps = run()
        return Attempt(cap_gb, "fits", float(tps), cuda.max_memory_allocated(device),
                       cuda.max_memory_reserved(device), note, variant)
    except Exception as e:  # the run failed under the cap: say how, keep going with the next cap
        kind = "oom" if is_oom(e) else "error"
        why = f"OOM at cap {cap_gb:g} GiB" if kind == "oom" else f"error at cap {cap_gb:g} GiB: {e}"
        return Attempt(cap_gb, kind, reason=why, variant=variant)
    finally:
        cuda.set_per_process_memory_fraction(1.0, device)
        cuda.empty_cache()


_CAP_METRIC = re.compile(r"^(?P<metric>[a-z_]+)@cap(?P<cap>[0-9.]+)(?:\[(?P<variant>[^\]]*)\])?$")


def cap_metric(metric: str, cap_gb: float, variant: str = "") -> str:
    """Rows have no cap column: the cap (and variant) ride in the metric name, e.g. `fits@cap24[ckpt=plain]`."""
    return f"{metric}@cap{cap_gb:g}" + (f"[{variant}]" if variant else "")


def parse_cap_metric(name: str) -> tuple[str, float, str] | None:
    m = _CAP_METRIC.match(name)
    return (m["metric"], float(m["cap"]), m["variant"] or "") if m else None


def fit_rows(attempt: Attempt, **row_kwargs) -> list[Row]:
    """`fits` (1/0, a measured outcome) plus tokens/s and peak memory when it fits. An OOM gives fits=0 and
    `failed` speed/memory rows "OOM at cap 24 GiB"; an error or a skipped cap gives no fits value at all."""
    kw = dict(row_kwargs, stage="offload")
    a = attempt

    def row(metric, unit, value=None, status="measured", reason=""):
        return Row(metric=cap_metric(metric, a.cap_gb, a.variant), unit=unit, value=value, status=status,
                   reason=reason, **kw)

    if a.outcome == "fits":
        if a.tokens_per_s is None:
            raise ValueError(f"a fitting run at cap {a.cap_gb:g} GiB needs its tokens/s")
        out = [row("fits", "bool", 1.0, reason=a.reason), row("tokens_per_s", "tokens/s", a.tokens_per_s)]
        for m, b in (("peak_alloc_gb", a.peak_alloc_bytes), ("peak_reserved_gb", a.peak_reserved_bytes)):
            out.append(row(m, "GiB", b / GIB) if b is not None else
                       row(m, "GiB", status="unavailable", reason="peak memory not recorded"))
        return out
    status = {"oom": "failed", "error": "failed", "skipped": "skipped"}[a.outcome]
    why = a.reason or f"{a.outcome} at cap {a.cap_gb:g} GiB"
    fits = row("fits", "bool", 0.0, reason=why) if a.outcome == "oom" else row("fits", "bool", None, status, why)
    rest = [row(m, u, status=status, reason=why)
            for m, u in (("tokens_per_s", "tokens/s"), ("peak_alloc_gb", "GiB"), ("peak_reserved_gb", "GiB"))]
    return [fits, *rest]


# ---------------------------------------------------------------- checkpointing modes
CHECKPOINT_MODES = ("none", "plain", "unsloth")


def checkpoint_modes() -> list[str]:
    return list(CHECKPOINT_MODES)


def apply_checkpointing(model, mode: str):
    """Apply "none"/"plain" to an HF (or PEFT-wrapped HF) model. "unsloth" is chosen at load time by the
    Unsloth arm (`use_gradient_checkpointing="unsloth"`) and cannot be applied afterwards."""
    if mode == "plain":
        # non-reentrant: works with frozen inputs and keeps module hooks (expert offload) in the recompute
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if getattr(model, "config", None) is not None:
            model.config.use_cache = False  # a KV cache is incompatible with recompute
    elif mode == "none":
        if getattr(model, "is_gradient_checkpointing", False):
            model.gradient_checkpointing_disable()
    elif mode == "unsloth":
        raise ValueError('checkpointing "unsloth" is applied by the Unsloth arm at load '
                         '(use_gradient_checkpointing="unsloth"), not to a loaded HF model')
    else:
        raise ValueError(f"unknown checkpointing mode {mode!r}; one of {CHECKPOINT_MODES}")
    return model


# ---------------------------------------------------------------- the offload stage (one arm x mode a process)
MODES = ("none", "plain", "unsloth", "expert_offload")


def mode_plan(arm, mode: str, plan: dict) -> tuple[dict, str | None]:
    """The arm's plan for one offload mode, or a reason why the arm cannot run in that mode."""
    p = dict(plan)
    if mode == "unsloth":
        if arm.stack != "unsloth":
            return p, f"{arm.name}: Unsloth's offloaded-activation checkpointing needs an Unsloth arm"
        p["gradient_checkpointing"] = "unsloth"
    elif mode == "expert_offload":
        if arm.stack != "hf" or arm.precision != "bf16":
            return p, (f"{arm.name}: expert offload is implemented for hf_bf16 (ExpertOffloader); "
                       "experts4bit-qlora's OFFLOAD_EXPERTS refuses expert LoRA")
        p.update(gradient_checkpointing=True, load_on="cpu")  # the whole model never has to fit on the GPU
    else:
        p["gradient_checkpointing"] = mode == "plain"
    return p, None


def _timed_tokens_per_s(model, opt, xs, cuda, warm: int = 1, meter=None) -> tuple[float, list[float]]:
    """Warm up, then time; the energy meter (when given) covers the timed steps only."""
    from contextlib import nullcontext

    from . import harness, measure

    for x in xs[:warm]:
        harness.train_step(model, opt, x)
    timer = measure.StepTimer(cuda)
    with meter or nullcontext():
        for x in xs[warm:]:
            with timer:
                harness.train_step(model, opt, x)
    s = measure.summary(timer.times)
    return xs[0].numel() / s["median"], timer.times


def run_mode(ctx, arm, cfg: dict, tier: dict, mode: str, model_dir: str, data_path: str, log) -> None:
    """Load the arm in this mode, time it uncapped (speed, peak memory, energy), then under each memory cap."""
    from . import energy, harness, measure

    arm.preimport()
    import torch

    cuda = torch.cuda.is_available()
    plan, _ = mode_plan(arm, mode, tier["plan"])
    model = harness.load_model(ctx, arm, cfg, plan, model_dir, log, cuda)
    offloader = ExpertOffloader(model, "cuda").attach() if mode == "expert_offload" else None
    if offloader:
        ctx.add("alloc_after_offload_gb", torch.cuda.memory_allocated() / 1e9, "GB")
    steps = cfg["offload"]["steps"]
    xs = harness.make_inputs(model_dir, data_path, plan, steps + 1, cfg["seed"], cuda)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    model.train()
    torch.cuda.reset_peak_memory_stats()
    meter = energy.EnergyMeter(backend="auto")
    tps, times = _timed_tokens_per_s(model, opt, xs, cuda, meter=meter)
    s = measure.summary(times)
    ctx.add("step_s", s["median"], "s", n=s["n"], spread=s["iqr"], stage="offload")
    ctx.add("tokens_per_s", tps, "tokens/s", n=s["n"], stage="offload")
    for k, v in measure.memory_peak(cuda).items():
        ctx.add(k, v, "GB", stage="offload")
    ctx.rows.extend(energy.energy_rows(meter.result, None, xs[0].numel() * s["n"], **ctx.row_kwargs()))
    if offloader:
        log.info("offloader stats: %s", offloader.stats)
    for cap in sorted(caps_from_config(cfg), reverse=True):
        att = try_at_cap(cap, lambda: _timed_tokens_per_s(model, opt, xs[: min(len(xs), 4)], cuda)[0])
        log.info("cap %s GiB: %s %s", cap, att.outcome, att.reason)
        ctx.rows.extend(fit_rows(att, **ctx.row_kwargs()))


def main(argv=None):
    import argparse

    from . import arms as registry
    from . import config as cfgmod
    from . import harness
    from .io import logger, read_json
    from .metrics import log_row, write_rows

    ap = argparse.ArgumentParser(description="One arm in one offload mode: speed, memory, energy, memory caps.")
    for a in ("--config", "--tier", "--model", "--data", "--arm", "--mode", "--out", "--log"):
        ap.add_argument(a, required=True)
    a = ap.parse_args(argv)
    log = logger("offload", a.log)
    cfg, tier = cfgmod.load(a.config), read_json(a.tier)
    arm = registry.get(a.arm)
    ctx = harness.Ctx(cfg["run"], tier["tier"], cfg["model"]["name"], f"{arm.name}+{a.mode}", arm.precision, 1,
                      a.log)
    _, reason = mode_plan(arm, a.mode, tier["plan"])
    reason = reason or harness.unavailable(arm, tier["plan"], tier.get("gpu") is not None, a.model)
    if reason is None and tier.get("gpu") is None:
        reason = "offload and memory caps measure GPU memory; the CPU tier has none"
    with harness.console_watch(cfg, arm.name) as console:  # a fallback path taints this mode's rows too
        harness.guarded(ctx, log, lambda _: run_mode(ctx, arm, cfg, tier, a.mode, a.model, a.data, log),
                        cfg["arm_timeout_s"], skip=reason, stage="offload", phase=f"{arm.name} with {a.mode}")
    harness.mark_degraded(ctx, harness.console_reason(console.matches()))
    for r in ctx.rows:
        if r.stage == "bench":  # load-time rows of this process belong to the offload stage
            r.stage = "offload"
        log_row(log, r)
    write_rows(a.out, ctx.rows)


if __name__ == "__main__":
    main()
