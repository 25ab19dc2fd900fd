"""The measuring harness every measuring stage shares (bench, offload, validate): the process context that labels
rows, the time limit and heartbeat, the guard that turns an arm that cannot run into `skipped` rows and one that
crashes into `failed` rows, the environment record, and the common steps (load through the arm, feed packed
token blocks, one training step).

A stage imports this module, never another stage.
"""
from __future__ import annotations

import json
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

from . import arms as arm_registry
from . import inspect
from .io import package_versions
from .metrics import Row

PACKAGES = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo", "trl",
            "experts4bit-qlora", "grouped-nf4-gemm", "triton", "nvidia-ml-py"]
ENV_PREFIXES = ("UNSLOTH", "E4B", "CUDA_VISIBLE", "OFFLOAD", "SLURM_JOB_ID", "SLURM_JOB_PARTITION", "SLURMD_NODENAME")


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


# ---- the common steps: LoRA spec, load, inputs, one training step -----------------------------------------
def lora_spec(cfg: dict) -> arm_registry.LoRASpec:
    lo = cfg["lora"]
    return arm_registry.LoRASpec(lo["r"], lo["alpha"], lo.get("dropout", 0.0), tuple(lo.get("attention", ())),
                                 lo.get("experts", True))


def read_texts(path: str) -> list[str]:
    """The rendered conversations of a train/held-out .jsonl (one {"text": ...} per line)."""
    return [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]


def token_stream(tokenizer, texts: list[str]) -> list[int]:
    """The conversations as one token stream, each closed by EOS: what bench and validate both pack."""
    eos = tokenizer.eos_token_id
    return [i for t in texts for i in tokenizer(t)["input_ids"] + [eos]]


def batches(data_path: str, tokenizer, seq_len: int, batch: int, count: int, seed: int):
    """Pack the rendered conversations into one token stream and cut it into [batch, seq_len] blocks: every
    position is a real token (no padding, never zeros). Cycles through the stream when it is short."""
    import torch

    stream = token_stream(tokenizer, read_texts(data_path))
    need = seq_len * batch
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(stream, dtype=torch.long)
    while ids.numel() < need + 1:
        ids = torch.cat([ids, ids])
    for _ in range(count):
        start = int(torch.randint(0, ids.numel() - need, (1,), generator=g))
        yield ids[start:start + need].view(batch, seq_len)


def make_inputs(model_dir: str, data_path: str, plan: dict, count: int, seed: int, cuda: bool) -> list:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [x.to("cuda" if cuda else "cpu") for x in batches(data_path, tok, plan["seq_len"], plan["batch"], count, seed)]


def train_step(model, opt, x):
    opt.zero_grad(set_to_none=True)  # at the start, so the last step's gradients stay for the expert-LoRA check
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    opt.step()
    return out.loss.detach()


def load_model(ctx: Ctx, arm, cfg: dict, plan: dict, model_dir: str, log, cuda: bool):
    """Load through the arm (timed), then record memory after load and what really got loaded."""
    import torch

    from . import measure

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loaded = arm.load(model_dir, lora_spec(cfg), plan)
    if cuda:
        torch.cuda.synchronize()
    ctx.add("load_s", time.perf_counter() - t0, "s")
    model = loaded.model
    for k, v in measure.memory_now(cuda).items():
        ctx.add(f"{k.removesuffix('_gb')}_after_load_gb", v, "GB")
    census = inspect.census(model)
    log.info("loaded: %s", json.dumps(loaded.info, default=str))
    # Unsloth's GPT-OSS view (interleaved gate/up) applies to GPT-OSS only; other families run what it selected
    gpt_oss = getattr(getattr(loaded.model, "config", None), "model_type", "") == "gpt_oss"
    backend = (loaded.info.get("moe_backend_gpt_oss") if gpt_oss else loaded.info.get("moe_backend_selected")) or \
        loaded.info.get("moe_backend") or loaded.info.get("experts_implementation")
    if backend:  # what really ran, not what was asked for
        ctx.add("moe_backend", str(backend), "")
    log.info("dtype census after load: %s", json.dumps(census))
    ctx.add("trainable_params", sum(p.numel() for p in model.parameters() if p.requires_grad), "params")
    for cat in ("expert", "attention"):
        ctx.add(f"{cat}_weights_gb", inspect.weights_gb(census, cat), "GB")
        ctx.add(f"{cat}_weights_4bit_fraction", inspect.four_bit_fraction(census, cat), "fraction")
    return model
