"""The measuring harness every measuring stage shares (bench, offload, validate): the process context that labels
rows, the time limit and heartbeat, the guard that turns an arm that cannot run into `skipped` rows and one that
crashes into `failed` rows, the environment record, and the common steps (load through the arm, feed packed
token blocks, one training step: `steps`), the degraded-path detection (`console`), device isolation and the
spread flag.

A stage imports this package, never another stage.
"""
from __future__ import annotations

import math
import os
import platform
import signal
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from .. import arms as arm_registry
from ..io import package_versions
from ..metrics import Row
from .console import (ConsoleMatcher, ConsoleTap, arm_patterns, console_reason, console_watch,  # noqa: F401
                      degraded_matches, draw_console, mark_degraded)
from .steps import (batches, freeze, load_model, lora_spec, make_inputs, read_texts, token_stream,  # noqa: F401
                    train_step)

PACKAGES = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo", "trl",
            "experts4bit-qlora", "grouped-nf4-gemm", "triton", "nvidia-ml-py"]
ENV_PREFIXES = ("UNSLOTH", "E4B", "CUDA_VISIBLE", "OFFLOAD", "TORCH_LOGS", "SLURM_JOB_ID", "SLURM_JOB_PARTITION", "SLURMD_NODENAME")


@dataclass
class Ctx:
    """Everything one process needs to label its rows (bench, offload and validate share it)."""
    run_id: str
    tier: str
    model: str
    arm: str
    precision: str
    draw: int | None
    log_path: str
    rows: list[Row] = field(default_factory=list)
    stage: str = "bench"
    conditions: dict = field(default_factory=dict)  # what the draw really ran under: env.json's `conditions`

    def add(self, metric, value=None, unit="", status="measured", reason="", n=None, spread=None, stage=None):
        """A number that is not finite cannot be a measured row: it becomes a failed one that says so."""
        if status == "measured" and (value is None or (isinstance(value, float) and not math.isfinite(value))):
            status, reason = "failed", f"not a finite number ({value})"
        r = Row(self.run_id, self.tier, self.model, self.arm, self.precision, stage or self.stage, metric, value, unit,
                n, spread, status, reason, self.log_path, self.draw)
        self.rows.append(r)
        return r

    def row_kwargs(self) -> dict:
        """The labels of this process's rows, for modules that build Rows themselves (energy, offload)."""
        return {"run_id": self.run_id, "tier": self.tier, "model": self.model, "arm": self.arm,
                "precision": self.precision, "source": self.log_path, "draw": self.draw}


# ---- what a measurement ran on ----------------------------------------------------------------------------
def versions() -> dict:
    return package_versions(PACKAGES)


def environment(started: str, tier: dict) -> dict:
    """What a measurement ran on and with: stored beside its rows so each result describes itself."""
    return {"started": started, "ended": datetime.now(timezone.utc).isoformat(), "python": sys.version,
            "platform": platform.platform(), "packages": versions(),
            "env": {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIXES)},
            "plan": tier["plan"], "gpu": tier.get("gpu"), "host": host()}


def host() -> dict:
    """Which machine ran this process: arms of one run measured on different machines (or leases) compare the
    machines as well as the stacks, and the aggregate says so when these differ."""
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = None
    gpu_uuid = None
    if "torch" in sys.modules:  # never import torch just for this (the CPU tests run without it loaded)
        torch = sys.modules["torch"]
        if torch.cuda.is_available():
            gpu_uuid = str(getattr(torch.cuda.get_device_properties(0), "uuid", "")) or None
    return {"hostname": platform.node(), "boot_id": boot_id, "gpu_uuid": gpu_uuid}


# ---- time limit and heartbeat -----------------------------------------------------------------------------
class ArmTimeout(Exception):
    pass


class Progress:
    """Where a draw is: logged every `every` seconds while one phase lasts (a first step can compile for
    minutes, and a silent log looks hung) and named in a timeout's message."""

    def __init__(self, log, every: float = 60.0, phase: str = "loading the model"):
        self.log, self.every = log, every
        self.enter(phase)

    def enter(self, phase: str) -> None:
        self.phase, self.since = phase, time.monotonic()

    def __str__(self) -> str:
        return f"{self.phase}, {time.monotonic() - self.since:.0f} s in"

    @contextmanager
    def beating(self):
        stop = threading.Event()

        def beat():
            while not stop.wait(self.every):
                self.log.info("still working: %s", self)

        thread = threading.Thread(target=beat, name="progress", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join(timeout=1)


@contextmanager
def time_limit(seconds: int, progress: Progress | None = None, setting: str = "arm_timeout_s"):
    """Stop a draw that overruns (a slow load can eat a GPU lease); it becomes a failed row saying where, and
    which config `setting` to raise."""
    def fire(signum, frame):
        where = f" (in {progress})" if progress else ""
        raise ArmTimeout(f"draw exceeded {setting}={seconds} s{where}")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextmanager
def watched(seconds: int, log, phase: str = "loading the model", setting: str = "arm_timeout_s"):
    """A measuring process's time limit and its heartbeat, sharing one Progress (yielded, so the work can name
    its phases): a timeout then says where it struck, and a long phase shows in the log while it lasts."""
    progress = Progress(log, phase=phase)
    with time_limit(seconds, progress, setting), progress.beating():
        yield progress


# ---- device isolation and spread --------------------------------------------------------------------------
def _own_gpu(nvml):
    """The NVML handle of the GPU this process will use: CUDA_VISIBLE_DEVICES' first entry (index or UUID) when
    NVML can see it, else GPU 0 (a Slurm cgroup shows NVML only the allocated GPU)."""
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    if first.startswith(("GPU-", "MIG-")):
        return nvml.nvmlDeviceGetHandleByUUID(first)
    index = int(first) if first.isdigit() and int(first) < nvml.nvmlDeviceGetCount() else 0
    return nvml.nvmlDeviceGetHandleByIndex(index)


def _others(nvml, handle) -> list[str]:
    me = os.getpid()
    procs = nvml.nvmlDeviceGetComputeRunningProcesses(handle)
    return [f"pid {p.pid} ({(getattr(p, 'usedGpuMemory', None) or 0) / 1e9:.1f} GB)" for p in procs if p.pid != me]


def isolate(ctx: Ctx, wait_s: float, log, nvml=None, sleep=time.sleep, clock=time.monotonic) -> str | None:
    """Before a GPU draw: wait up to `wait_s` for other processes on this GPU (NVML) to leave. Records
    `gpu_other_processes` (and how long it waited); returns a degraded reason when some stayed (the draw is
    timed anyway), None when the GPU was ours or NVML cannot list processes (then the row is `unavailable`)."""
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
        handle = _own_gpu(nvml)
        t0 = clock()
        others = _others(nvml, handle)
        while others and clock() - t0 < wait_s:
            sleep(1.0)
            others = _others(nvml, handle)
    except Exception as exc:  # noqa: BLE001 - no NVML, or a driver that will not list processes
        ctx.add("gpu_other_processes", status="unavailable",
                reason=f"unknown: NVML cannot list the processes on this GPU ({type(exc).__name__}: {exc})"[:300])
        return None
    waited = clock() - t0
    ctx.add("gpu_isolation_wait_s", waited, "s")
    ctx.add("gpu_other_processes", len(others), "processes")
    if not others:
        return None
    reason = (f"GPU shared: {len(others)} other process(es) still on it after isolation_wait_s={wait_s:g} s: "
              + ", ".join(others[:5]))
    log.warning("%s; timing anyway", reason)
    return reason


def spread_rows(ctx: Ctx, limit: float, log) -> None:
    """Flag (not drop) a draw whose timed step times spread: IQR/median of step_s above `limit` gives
    `spread_flag` 1 with the ratio in its reason, else 0; `step_iqr_over_median` holds the ratio."""
    step = next((r for r in ctx.rows if r.metric == "step_s" and r.status == "measured"), None)
    if step is None or step.spread is None or not step.value:
        return
    ratio = step.spread / step.value
    ctx.add("step_iqr_over_median", ratio, "fraction", n=step.n)
    flagged = ratio > limit
    why = f"step-time IQR/median {ratio:.3f} > spread_limit {limit:g}: this draw's steps were not steady" if flagged \
        else ""
    if flagged:
        log.warning("%s", why)
    ctx.add("spread_flag", 1 if flagged else 0, "flag", n=step.n, reason=why)


# ---- skipped / failed rows --------------------------------------------------------------------------------
def is_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError, or an allocator error that only says so in its message (bitsandbytes, triton)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
        return True
    return "out of memory" in str(exc).lower()


def failure_reason(exc: BaseException) -> str:
    """A failed row's reason: OOM or the exception's type, then the first line of its message."""
    kind = "OOM" if is_oom(exc) else type(exc).__name__
    return f"{kind}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


@dataclass
class Outcome:
    status: str  # measured / skipped / failed
    reason: str = ""
    result: Any = None  # what the body returned (measured only)


def guarded(ctx: Ctx, log, body: Callable[[Progress], Any], seconds: int, *, skip: str | None = None,
            metric: str = "step_s", stage: str | None = None, phase: str = "loading the model",
            setting: str = "arm_timeout_s") -> Outcome:
    """Run one measuring body under the time limit and heartbeat; never raises for the arm's sake.

    `skip` (a reason found before anything heavy ran), or ArmUnavailable raised by the arm, gives a `skipped`
    row for `metric`; any other exception (OOM, crash, timeout) a `failed` row with the error, on `metric`, or
    on `error` when `metric` was already recorded (rows measured before the failure stay: memory after load is
    telling when a step runs out of memory)."""
    if skip:
        log.info("skipped: %s", skip)
        ctx.add(metric, status="skipped", reason=skip, stage=stage)
        return Outcome("skipped", skip)
    try:
        with watched(seconds, log, phase=phase, setting=setting) as progress:
            return Outcome("measured", "", body(progress))
    except arm_registry.ArmUnavailable as exc:  # the arm itself found it cannot run here: say why
        log.info("skipped at load: %s", exc)
        reason = str(exc)[:600]
        ctx.add(metric, status="skipped", reason=reason, stage=stage)
        return Outcome("skipped", reason)
    except Exception as exc:  # noqa: BLE001 - a failed draw is a row, the workflow goes on
        log.error("failed: %s\n%s", exc, traceback.format_exc())
        reason = failure_reason(exc)
        done = any(r.metric == metric for r in ctx.rows)
        ctx.add("error" if done else metric, status="failed", reason=reason, stage=stage)
        return Outcome("failed", reason)


def unavailable(arm, plan: dict, cuda: bool, model_dir: str | None = None) -> str | None:
    """Why the arm cannot run here, found before its process imports anything heavy (None if it can)."""
    reason = arm.unavailable_reason(cuda)
    if reason is None and model_dir:
        reason = arm.refusal(model_dir, plan)
    if reason is None and arm.precision == "bf16" and not plan.get("bf16_viable", True):
        reason = f"{arm.name}: bf16 weights do not fit this tier's memory (tier plan: bf16_viable false)"
    return reason
